"""Runtimes (issue 5): ORTReenactor's protocol and input checks, the engine-sidecar validation of
TRTReenactor (pure logic, on CPU with fake sidecars), parity helpers, lazy imports; running TensorRT
engines is a GPU test, skipped unless the installed TensorRT can run on the GPU at hand."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from ostnet_fast.runtime.parity import max_abs, psnr
from ostnet_fast.runtime.trt import EngineMismatch, cc_in_targets, check_engine_sidecar

from .test_export import ATOL_FP32, export_tiny


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("runtime"), fp16=False)


def test_importing_runtime_imports_no_backend():
    code = ("import sys, ostnet_fast.runtime as r; "
            "bad = [m for m in ('onnxruntime', 'tensorrt', 'tensorrt_rtx_bindings', 'onnx') if m in sys.modules]; "
            "assert not bad, bad; assert r.ORTReenactor.__name__ == 'ORTReenactor'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


def test_ort_reenactor_protocol_matches_reference(tiny_onnx):
    from ostnet_fast.runtime import ORTReenactor
    model, _, out = tiny_onnx
    r = ORTReenactor(out, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(3)
    source = torch.rand(1, 3, 64, 64, generator=g)
    r.set_source(source)
    state = model.encode_source(source)
    for n in (1, 3):  # dynamic batch
        driving = -0.1 + 1.2 * torch.rand(n, 3, 64, 64, generator=g)  # off-range values pass through too
        got = r(driving)
        with torch.no_grad():
            ref = model.animate(state, driving)["prediction"]
        assert got.shape == (n, 3, 64, 64) and got.dtype == torch.float32 and got.device == driving.device
        assert max_abs(ref, got) <= ATOL_FP32
    assert set(r.run(driving)) == {"prediction", "rectified"}


@pytest.mark.parametrize("shape,call,match", [
    ((1, 3, 32, 32), "source", r"\(N, 3, 64, 64\).*got \(1, 3, 32, 32\)"),  # wrong size
    ((2, 3, 64, 64), "source", "batch 1"),                                  # one source image
    ((3, 64, 64), "driving", r"got \(3, 64, 64\)"),                          # missing batch axis
    ((1, 1, 64, 64), "driving", r"\(N, 3, 64, 64\)"),                        # grey frame
])
def test_ort_reenactor_bad_inputs(tiny_onnx, shape, call, match):
    from ostnet_fast.runtime import ORTReenactor
    r = ORTReenactor(tiny_onnx[2], providers=["CPUExecutionProvider"])
    r.set_source(torch.rand(1, 3, 64, 64))
    fn = r.set_source if call == "source" else r
    with pytest.raises(ValueError, match=match):
        fn(torch.rand(shape))


def test_ort_reenactor_state_and_files(tiny_onnx, tmp_path):
    from ostnet_fast.runtime import ORTReenactor
    out = tiny_onnx[2]
    r = ORTReenactor(out, providers=["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="set_source"):
        r(torch.rand(1, 3, 64, 64))
    with pytest.raises(TypeError, match="float"):
        r.set_source(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(FileNotFoundError, match="source.onnx"):
        ORTReenactor(tmp_path)
    with pytest.raises(FileNotFoundError, match="--fp16"):
        ORTReenactor(out, fp16=True)  # exported without --fp16
    bad = tmp_path / "mixed"
    shutil.copytree(out, bad)
    side = json.loads((bad / "frame.json").read_text())
    side["image_size"] = 128
    (bad / "frame.json").write_text(json.dumps(side))
    with pytest.raises(ValueError, match="different exports.*image_size"):
        ORTReenactor(bad)
    with pytest.raises(ValueError, match="not available"):
        ORTReenactor(out, providers=["NoSuchExecutionProvider"])


# ------------------------------------------------------------------------------------------------
# Engine sidecar validation (TRTReenactor refuses mismatched engines), pure logic on fake sidecars


def fake_sidecar(flavour="tensorrt", version="10.9.0", gpu="NVIDIA H100 80GB HBM3", cc="9.0", targets=None):
    targets = targets if targets is not None else ([cc] if flavour == "tensorrt" else ["8.0", "8.6", "8.9", "12.x"])
    return {"file": "frame.engine", "tensorrt": {"flavour": flavour, "module": "tensorrt", "version": version},
            "built_for": {"gpu": gpu, "compute_capability": cc, "targets": targets}}


def test_sidecar_accepted_on_the_gpu_it_was_built_for():
    assert check_engine_sidecar(fake_sidecar(), "tensorrt", "10.9.0", "NVIDIA H100 80GB HBM3", "9.0") == []


@pytest.mark.parametrize("runtime,match", [
    (("tensorrt", "10.10.0", "NVIDIA H100 80GB HBM3", "9.0"), "built with tensorrt 10.9.0 but this runtime has 10.10.0"),
    (("tensorrt-rtx", "10.9.0", "NVIDIA H100 80GB HBM3", "9.0"), "built with 'tensorrt' but this runtime is 'tensorrt-rtx'"),
    (("tensorrt", "10.9.0", "NVIDIA A100-SXM4-80GB", "8.0"), r"built for NVIDIA H100 80GB HBM3 \(compute capability 9.0\)"),
    (("tensorrt", "10.9.0", "NVIDIA H200", "9.0"), "strict_gpu=False"),  # same CC, other GPU model
])
def test_sidecar_mismatch_refused(runtime, match):
    with pytest.raises(EngineMismatch, match=match):
        check_engine_sidecar(fake_sidecar(), *runtime)


def test_same_cc_other_gpu_is_a_warning_when_not_strict():
    warnings = check_engine_sidecar(fake_sidecar(), "tensorrt", "10.9.0", "NVIDIA H200", "9.0", strict_gpu=False)
    assert len(warnings) == 1 and "NVIDIA H200" in warnings[0]


def test_rtx_cpu_built_engine_targets():
    side = fake_sidecar("tensorrt-rtx", "1.7.1.116", "cpu-build (TensorRT-RTX, no GPU)", None)
    assert check_engine_sidecar(side, "tensorrt-rtx", "1.7.1.116", "NVIDIA GeForce RTX 4090", "8.9") == []
    assert check_engine_sidecar(side, "tensorrt-rtx", "1.7.1.116", "NVIDIA GeForce RTX 5090", "12.0") == []
    with pytest.raises(EngineMismatch, match="H100.*9.0.*8.0/8.6/8.9/12.x only"):
        check_engine_sidecar(side, "tensorrt-rtx", "1.7.1.116", "NVIDIA H100 80GB HBM3", "9.0")


@pytest.mark.parametrize("cc,targets,ok", [
    ("8.6", ["8.0", "8.6", "8.9", "12.x"], True),
    ("12.1", ["8.0", "8.6", "8.9", "12.x"], True),   # M.x: any minor
    ("9.0", ["8.0", "8.6", "8.9", "12.x"], False),   # Hopper: not a TensorRT-RTX target
    ("7.5", ["8.6"], False),
])
def test_cc_in_targets(cc, targets, ok):
    assert cc_in_targets(cc, targets) is ok


def test_trt_reenactor_missing_engines(tmp_path):
    from ostnet_fast.runtime import TRTReenactor
    with pytest.raises(FileNotFoundError, match="source.engine"):
        TRTReenactor(tmp_path)


# ------------------------------------------------------------------------------------------------
# parity helpers


def test_psnr_and_max_abs_known_values():
    ref = torch.zeros(2, 3, 4, 4)
    out = ref.clone()
    out[1] += 0.1  # mse 0.01 -> 20 dB
    p = psnr(ref, out)
    assert math.isinf(float(p[0])) and float(p[1]) == pytest.approx(20.0)
    assert max_abs(ref, out) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="shape mismatch"):
        max_abs(ref, out[:1])


def test_real_frames_shape_and_range():
    from ostnet_fast.runtime.parity import real_frames
    frames = real_frames(64, count=2)
    assert frames.shape == (2, 3, 64, 64) and frames.dtype == torch.float32
    assert 0 <= float(frames.min()) and float(frames.max()) <= 1 and float(frames.std()) > 0.05


# ------------------------------------------------------------------------------------------------
# TensorRT engines on a GPU (the lead's GPU machine; skipped here)


def trt_can_run() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU"
    from ostnet_fast.export.build_trt import RTX_DEFAULT_TARGETS, TensorRTNotInstalled, import_tensorrt
    try:
        _, flavour = import_tensorrt()
    except TensorRTNotInstalled:
        return False, "no TensorRT installed"
    cc = "%d.%d" % torch.cuda.get_device_capability()
    if flavour == "tensorrt-rtx" and not cc_in_targets(cc, RTX_DEFAULT_TARGETS):
        return False, f"TensorRT-RTX does not run on compute capability {cc}"
    return True, ""


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not trt_can_run()[0], reason=trt_can_run()[1] or "TensorRT cannot run here")
@pytest.mark.parametrize("fp16", [False, True])
def test_trt_reenactor_matches_reference(tmp_path, fp16):
    from ostnet_fast.export import build_trt
    from ostnet_fast.runtime import TRTReenactor
    model, _, onnx_dir = export_tiny(tmp_path, fp16=fp16)
    assert build_trt.main(["--onnx", str(onnx_dir), "--out", str(tmp_path / "e"), "--batch", "1:2:4"]
                          + (["--fp16"] if fp16 else [])) == 0
    r = TRTReenactor(tmp_path / "e")
    g = torch.Generator().manual_seed(4)
    source = torch.rand(1, 3, 64, 64, generator=g)
    r.set_source(source.cuda())
    state = model.encode_source(source)
    for n in (1, 3, 1):  # back to 1: per-batch buffers are rebound
        driving = torch.rand(n, 3, 64, 64, generator=g)
        got = r(driving.cuda()).float().cpu()
        with torch.no_grad():
            ref = model.animate(state, driving)["prediction"]
        if fp16:
            assert float(psnr(ref, got).min()) > 40
        else:
            assert max_abs(ref, got) <= 1e-3  # TensorRT's fp32 kernels (no TF32), not bit-exact
    with pytest.raises(ValueError, match="outside the engine's profile"):
        r(torch.rand(5, 3, 64, 64, device="cuda"))
