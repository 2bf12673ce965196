"""C++ embedding: compile the AOTInductor packages, build csrc/ostnet_infer against the installed torch's
libtorch with CMake, run it on raw tensor files and compare with Python. CPU here; the GPU variant
compiles the packages for CUDA."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ostnet_fast import OSTNet
from ostnet_fast.config import load_config
from ostnet_fast.export.aoti import export_aoti
from ostnet_fast.export.raw_tensor import read_ostt, write_ostt

ROOT = Path(__file__).resolve().parent.parent
TINY = "tests/configs/tiny.yaml"

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                                reason="needs cmake and a C++ compiler")


def build_example(build_dir: Path) -> Path:
    subprocess.run(["cmake", "-S", str(ROOT / "csrc"), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                    f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", "-DOSTNET_WITH_TENSORRT=OFF"],
                   check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build_dir), "-j2"], check=True, capture_output=True, text=True)
    return build_dir / "ostnet_infer"


def run_round_trip(tmp_path: Path, device: str):
    torch.manual_seed(0)
    model = OSTNet(TINY).eval()
    export_aoti(model, load_config(TINY), tmp_path / "aoti", device=device, max_batch=4)
    exe = build_example(tmp_path / "build")
    source, frames = torch.rand(1, 3, 64, 64), torch.rand(5, 3, 64, 64)
    write_ostt(tmp_path / "source.ostt", source)
    write_ostt(tmp_path / "frames.ostt", frames)
    proc = subprocess.run([str(exe), "--backend", "aoti", "--model", str(tmp_path / "aoti"), "--device", device,
                           "--source", str(tmp_path / "source.ostt"), "--driving", str(tmp_path / "frames.ostt"),
                           "--out", str(tmp_path / "out.ostt"), "--batch", "3"],  # batches 3 + 2
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = read_ostt(tmp_path / "out.ostt")
    with torch.no_grad():
        want = model.animate(model.encode_source(source), frames)["prediction"]
    assert got.shape == want.shape
    # CUDA packages run cuDNN convolutions in TF32 (PyTorch's default), the CPU reference in fp32.
    assert (got - want).abs().max() <= (1e-4 if device == "cpu" else 3e-3)
    return exe


def test_ostt_round_trip(tmp_path):
    t = torch.randn(2, 3, 5)
    write_ostt(tmp_path / "t.ostt", t)
    assert torch.equal(read_ostt(tmp_path / "t.ostt"), t)
    (tmp_path / "bad.ostt").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not an OSTT"):
        read_ostt(tmp_path / "bad.ostt")


@pytest.mark.slow
def test_aoti_cpp_example_matches_python_cpu(tmp_path):
    exe = run_round_trip(tmp_path, "cpu")
    # Bad input: one clear line and a non-zero exit, no output file.
    proc = subprocess.run([str(exe), "--backend", "aoti", "--model", str(tmp_path / "aoti"), "--device", "cpu",
                           "--source", str(tmp_path / "missing.ostt"), "--driving", str(tmp_path / "frames.ostt"),
                           "--out", str(tmp_path / "never.ostt")], capture_output=True, text=True)
    assert proc.returncode == 1 and "cannot open tensor file" in proc.stderr
    assert not (tmp_path / "never.ostt").exists()
    assert subprocess.run([str(exe)], capture_output=True).returncode == 2  # usage


@pytest.mark.gpu
def test_aoti_cpp_example_matches_python_cuda(tmp_path):
    run_round_trip(tmp_path, "cuda")
