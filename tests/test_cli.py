"""`ostnet-fast` CLI end to end on CPU with the tiny config: bundled data, custom inputs with audio, and
every bad input -> one line on stderr, exit code 2, no output file."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from ostnet_fast.cli import build_parser, main
from ostnet_fast.pipeline.video import probe

from .test_video import make_video, synthetic_frames

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_reenact_bundled_data_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo" / "out.mp4"  # the folder does not exist yet: made
    code, stdout, stderr = run(capsys, "reenact", "--config", TINY, "--max-frames", 3, "--out", out, "--quiet")
    assert code == 0, stderr
    info = probe(out)
    assert (info.frame_count, info.width, info.height) == (3, 64, 64)
    assert info.fps == Fraction(30000, 1001)  # the bundled video's rate
    assert f"wrote {out.resolve()}" in stdout and "3 frames" in stdout and "FPS" in stdout
    assert "RANDOM weights" in stderr  # no checkpoint: said loudly
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.mp4"]


def test_reenact_custom_inputs_paste_back_and_audio(tmp_path, capsys):
    from PIL import Image
    src = tmp_path / "me.jpg"
    Image.fromarray(synthetic_frames(1, 90, 70, seed=2)[0]).save(src)
    driving = make_video(tmp_path / "talk.mkv", n=5, size=(48, 64), audio="pcm_s16le", fmt="matroska")
    out = tmp_path / "out.mp4"
    code, stdout, stderr = run(capsys, "reenact", "--source", src, "--driving", driving, "--out", out,
                               "--config", TINY, "--batch", 2, "--paste-back", "--relative", "--quiet",
                               "--detector", "center")
    assert code == 0, stderr
    info = probe(out)
    assert (info.frame_count, info.width, info.height, info.fps) == (5, 64, 48, Fraction(25))
    assert info.has_audio and info.audio_codec == "aac"  # PCM re-encoded for .mp4


def test_checkpoint_is_used(tmp_path, capsys):
    from ostnet_fast import OSTNet, save_checkpoint
    from ostnet_fast.config import load_config
    cfg = load_config(TINY)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "w.safetensors", OSTNet(cfg.model), cfg)
    out = tmp_path / "o.mp4"
    code, _, stderr = run(capsys, "reenact", "--checkpoint", ckpt, "--max-frames", 2, "--out", out, "--quiet",
                          "--size", 32)
    assert code == 0, stderr
    assert "RANDOM" not in stderr
    assert (probe(out).width, probe(out).frame_count) == (32, 2)


def _png(path):
    from PIL import Image
    Image.fromarray(synthetic_frames(1, 32, 32)[0]).save(path)
    return path


BAD = {
    "source missing": (lambda d: ["--source", d / "nope.png"], "source image not found"),
    "source unreadable": (lambda d: ["--source", _text(d / "fake.png")], "not a readable image"),
    "source is a video": (lambda d: ["--source", make_video(d / "v.mp4", n=2)], "not a readable image"),
    "driving missing": (lambda d: ["--driving", d / "nope.mp4"], "driving video not found"),
    "driving is an image": (lambda d: ["--driving", _png(d / "still.png")], "still image"),
    "driving corrupt": (lambda d: ["--driving", _noise(d / "noise.mp4")], "not a readable video"),
    "driving truncated": (lambda d: ["--driving", _truncated(d)], "not a readable video"),
    "out folder is a file": (lambda d: ["--out", _text(d / "file") / "o.mp4"], "not a directory"),
    "out unknown container": (lambda d: ["--out", d / "o.gif"], "unknown video container"),
    "out is a folder": (lambda d: ["--out", _mkdir(d / "o.mp4")], "is a directory"),
    "fp16 on cpu": (lambda d: ["--fp16"], "--fp16 needs --device cuda"),
    "bad batch": (lambda d: ["--batch", "0"], "--batch must be >= 1"),
    "size the model cannot run at": (lambda d: ["--size", "50"], "--size 50x50: this model runs at sides that are "
                                     "multiples of 32 (e.g. 64)"),
    "checkpoint missing": (lambda d: ["--checkpoint", d / "w.safetensors"], "checkpoint not found"),
    "checkpoint corrupt": (lambda d: ["--checkpoint", _noise(d / "w.safetensors")], "not a readable safetensors"),
    "config unknown": (lambda d: ["--config", "vox-9000"], "unknown config"),
    "fomm checkpoint corrupt": (lambda d: ["--checkpoint", _noise(d / "vox-cpk.pth.tar")],
                                "not a loadable FOMM checkpoint"),
    "relative on onnx": (lambda d: ["--backend", "onnxruntime", "--relative"], "--relative needs"),
    "compile on torch backend": (lambda d: ["--compile"], "--compile needs --backend fused"),
}
if importlib.util.find_spec("facenet_pytorch") is None:
    BAD["mtcnn without facenet-pytorch"] = (lambda d: ["--detector", "mtcnn"], "--detector mtcnn needs facenet-pytorch")
if not torch.cuda.is_available():
    BAD["cuda without cuda"] = (lambda d: ["--device", "cuda"], "CUDA is not available")


def _text(path: Path) -> Path:
    path.write_text("hello\n")
    return path


def _noise(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _truncated(d: Path) -> Path:
    good = make_video(d / "good.mp4", n=6)
    bad = d / "cut.mp4"
    bad.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    return bad


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    make_args, message = BAD[case]
    work = tmp_path / "work"
    work.mkdir()
    args = make_args(work)
    out_dir = tmp_path / "results"
    argv = ["reenact", "--config", TINY, "--max-frames", "2", "--quiet"]
    if "--config" in args:
        argv = argv[:1] + argv[3:]
    if "--out" not in args:
        argv += ["--out", out_dir / "o.mp4"]
    code, stdout, stderr = run(capsys, *argv, *args)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("ostnet-fast: error: ") and message in lines[0]
    assert stdout == ""
    made = [p for p in tmp_path.rglob("*") if p.suffix in (".mp4", ".gif") and p.is_file()
            and p.parent != work]
    assert made == []  # no output, no temp file
    assert not any(".partial" in p.name for p in tmp_path.rglob("*"))


def test_refused_run_creates_no_output_folder(tmp_path, capsys):
    out = tmp_path / "new" / "sub" / "o.mp4"
    code, _, stderr = run(capsys, "reenact", "--config", TINY, "--checkpoint", tmp_path / "missing.safetensors",
                          "--out", out, "--quiet")
    assert code == 2 and "checkpoint not found" in stderr
    assert not (tmp_path / "new").exists()


def test_sigterm_mid_write_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    # `kill` (SIGTERM) is handled like Ctrl-C: the writer aborts and removes its temp file.
    import ostnet_fast.pipeline.run as run_module
    from ostnet_fast.pipeline.video import VideoWriter

    def killed_mid_write(reenactor, driving, out, **kw):
        with VideoWriter(out, 25, 32, 32) as writer:
            writer.write(np.zeros((32, 32, 3), np.uint8))
            os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("not reached")

    monkeypatch.setattr(run_module, "reenact_video", killed_mid_write)
    out = tmp_path / "out" / "o.mp4"
    code, _, stderr = run(capsys, "reenact", "--config", TINY, "--max-frames", 2, "--out", out, "--quiet")
    assert code != 0 and "interrupted" in stderr
    assert not out.exists()
    assert not [p for p in tmp_path.rglob("*") if ".partial" in p.name]
    assert signal.getsignal(signal.SIGTERM) is not None  # restored after main returns


def test_cuda_runs_turn_on_cudnn_benchmark(monkeypatch):
    # --device cuda: cuDNN's benchmark mode, as every benchmark in bench/ runs (a branch no CPU run takes
    # end to end: the Reenactor is stood in for).
    import ostnet_fast.pipeline.reenactor as reenactor
    from ostnet_fast.cli import _make_reenactor
    made = []
    monkeypatch.setattr(reenactor, "Reenactor", lambda **kw: made.append(kw) or "reenactor")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    args = build_parser().parse_args(["reenact", "--device", "cuda", "--backend", "fused", "--fp16"])
    assert _make_reenactor(args) == "reenactor" and made[0]["device"] == "cuda" and made[0]["fp16"]
    assert torch.backends.cudnn.benchmark
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    _make_reenactor(build_parser().parse_args(["reenact"]))  # cpu: left alone
    assert not torch.backends.cudnn.benchmark


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["reenact", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--source", "--driving", "--out", "--checkpoint", "--config", "--device", "--fp16",
                   "--backend", "--batch", "--relative", "--paste-back", "--max-frames", "--size"):
        assert option in text
    assert "onnxruntime" in text and "tensorrt" in text
    with pytest.raises(SystemExit):
        main(["live", "--help"])
    assert "--camera" in capsys.readouterr().out


def test_parser_builds_with_or_without_the_train_cli():
    parser = build_parser()
    assert parser.parse_args(["reenact"]).out == "ostnet_out.mp4"
    assert parser.parse_args(["live", "--camera", "1"]).camera == "1"


def test_live_without_a_camera_is_a_clear_error(tmp_path, capsys):
    code, _, stderr = run(capsys, "live", "--camera", "/dev/no-such-camera", "--out", tmp_path / "l.mp4",
                          "--config", TINY)
    assert code == 2 and "camera device not found" in stderr


def test_python_dash_m_works():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "ostnet_fast", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "reenact" in res.stdout and "live" in res.stdout
