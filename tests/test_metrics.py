"""Metrics on known pairs, SSIM against skimage, LPIPS loading, optional face metrics, `ostnet-fast eval`."""
import argparse
import importlib.util
import json
import sys

import pytest
import torch

from ostnet_fast import OSTNet, load_config, save_checkpoint
from ostnet_fast.train.evaluate import EvalOptions, evaluate, format_table
from ostnet_fast.train.metrics import PSNR_CAP, LPIPS, FaceMetrics, MissingDependencyError, l1, load_lpips, psnr, ssim

from .test_dataset import make_video

TINY = "tests/configs/tiny.yaml"


def test_identical_images_score_perfectly():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(l1(x, x), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(psnr(x, x), torch.full((2,), PSNR_CAP, dtype=torch.float64))  # inf capped
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)


def test_constant_shift_gives_known_l1_and_psnr():
    torch.manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(1, 3, 20, 24, dtype=torch.float64)
    y = x + 0.1  # MSE = 0.01 -> PSNR = 10 log10(1 / 0.01) = 20 dB
    assert l1(x, y).item() == pytest.approx(0.1, abs=1e-12)
    assert psnr(x, y).item() == pytest.approx(20.0, abs=1e-9)
    assert psnr(x, x + 0.01).item() == pytest.approx(40.0, abs=1e-9)


@pytest.mark.parametrize("shape", [
    (1, 3, 32, 40),  # non-square colour image
    (2, 1, 11, 11),  # the smallest image the 11-tap window fits
    (1, 3, 37, 23),  # odd sizes
])
def test_ssim_matches_skimage_gaussian(shape):
    from skimage.metrics import structural_similarity
    g = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    y = (0.7 * x + 0.3 * torch.rand(shape, generator=g, dtype=torch.float64)).clamp(0, 1)  # correlated pair
    ours = ssim(x, y)
    for i in range(shape[0]):
        ref = structural_similarity(x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy(),
                                    gaussian_weights=True, data_range=1.0, channel_axis=-1)
        assert ours[i].item() == pytest.approx(ref, abs=1e-7)


def test_metric_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\(1, 3, 8, 8\) and \(1, 3, 8, 9\)"):
        l1(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def _lpips_files(tmp_path):
    torch.manual_seed(0)
    ref = LPIPS()
    for p in ref.parameters():
        p.data.uniform_(0, 0.1) if p.dim() == 4 and p.shape[-1] == 1 else None
    trunk = {k: v for k, v in ref.state_dict().items() if k.startswith("features.")}
    trunk["classifier.1.weight"] = torch.zeros(2, 2)  # torchvision's file has a classifier: ignored
    lins = {f"lin{i}.model.1.weight": ref.lins[i].weight.detach() for i in range(5)}  # the lpips package's layout
    torch.save(trunk, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save(lins, tmp_path / "alex.pth")
    return ref


def test_lpips_from_state_dict_files(tmp_path):
    ref = _lpips_files(tmp_path)
    model = load_lpips(tmp_path / "alex.pth", tmp_path / "alexnet-owt-7be5be79.pth")
    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    d = model(x, y)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(d, ref(x, y))
    assert torch.equal(model(x, x), torch.zeros(2))


def test_lpips_missing_trunk_names_the_file(tmp_path, monkeypatch):
    _lpips_files(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        load_lpips(tmp_path / "alex.pth")


def test_lpips_file_that_is_not_tensors_is_one_line(tmp_path):
    junk = tmp_path / "alex.pth"
    junk.write_bytes(b"\x80\x04junk" * 50)
    with pytest.raises(ValueError) as e:
        load_lpips(junk, junk)
    assert "is not a loadable LPIPS state dict" in str(e.value) and "\n" not in str(e.value)


def test_face_metrics_need_their_packages(monkeypatch):
    # Each package made absent in turn (the dev install has both): dlib cannot be imported; then
    # face_recognition_models cannot be found (find_spec, not import: its __init__ imports pkg_resources,
    # gone from new setuptools).
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "dlib", None)  # `import dlib` raises ImportError
        with pytest.raises(MissingDependencyError, match="pip install dlib face-recognition-models"):
            FaceMetrics()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "face_recognition_models" else real_find_spec(name, *a))
    if real_find_spec("dlib") is not None:  # else the dlib case above already covers this environment
        with pytest.raises(MissingDependencyError, match="pip install dlib face-recognition-models"):
            FaceMetrics()


def _checkpoint_and_data(tmp_path):
    torch.manual_seed(0)
    cfg = load_config(TINY)
    save_checkpoint(tmp_path / "model.safetensors", OSTNet(cfg.model), cfg)
    make_video(tmp_path / "data" / "test" / "t0.mp4", n=5, seed=3)
    make_video(tmp_path / "data" / "train" / "x.mp4", n=3, seed=4)  # not evaluated
    return tmp_path / "model.safetensors", tmp_path / "data"


def test_eval_both_protocols(tmp_path):
    ckpt, data = _checkpoint_and_data(tmp_path)
    doc = evaluate(EvalOptions(checkpoint=str(ckpt), data=str(data), out=str(tmp_path / "m.json"), device="cpu",
                               batch_size=2), progress=False)
    res = doc["results"]
    assert set(res) == {"same_scale", "different_scale"} and doc["videos"] == 1
    for r in res.values():
        assert r["pairs"] == 5 and 0 <= r["l1"] <= 1 and 0 <= r["ssim"] <= 1 and r["psnr"] > 0
        assert r["lpips"] is None and r["akd"] is None  # not asked for
    assert res["same_scale"]["l1"] != res["different_scale"]["l1"]  # the rescaled driving frames differ
    assert json.loads((tmp_path / "m.json").read_text())["results"] == res
    again = evaluate(EvalOptions(checkpoint=str(ckpt), data=str(data), device="cpu", batch_size=5), progress=False)
    for p, r in res.items():  # seeded protocol: the batch size changes only float summation order
        assert {k: v for k, v in again["results"][p].items() if v is not None} == \
            pytest.approx({k: v for k, v in r.items() if v is not None}, rel=1e-6)
    assert "different_scale" in format_table(doc)


def _eval_cli(argv):
    from ostnet_fast.train.cli import register
    parser = argparse.ArgumentParser(prog="ostnet-fast")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


def test_eval_cli(tmp_path, capsys):
    ckpt, data = _checkpoint_and_data(tmp_path)
    assert _eval_cli(["--checkpoint", str(ckpt), "--data", str(data), "--device", "cpu", "--no-progress",
                      "--protocol", "same_scale", "--max-frames", "2"]) == 0
    assert "same_scale" in capsys.readouterr().out
    assert _eval_cli(["--checkpoint", str(tmp_path / "nope.safetensors"), "--data", str(data)]) == 2
    assert _eval_cli(["--checkpoint", str(ckpt), "--data", str(tmp_path / "nodata"), "--no-progress"]) == 2
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert _eval_cli(["--checkpoint", str(tmp_path / "junk.safetensors"), "--data", str(data), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("ostnet-fast eval: error:") for line in err)


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--stride", "0"], "--stride must be >= 1"),
    (["--max-frames", "0"], "--max-frames must be >= 1"),
    (["--device", "tpu9"], "--device tpu9"),
    (["--out", "{tmp}"], "is a directory"),
    (["--out", "{tmp}/file.txt/eval.json"], "is not a directory"),
    (["--split", "nosuch"], "--split nosuch: there is no folder"),
])
def test_eval_cli_refuses_bad_flags_before_any_work(tmp_path, capsys, flags, message):
    ckpt = tmp_path / "w.safetensors"
    save_checkpoint(ckpt, OSTNet(load_config("tests/configs/tiny.yaml").model), load_config("tests/configs/tiny.yaml"))
    (tmp_path / "file.txt").write_text("x")
    flags = [f.format(tmp=tmp_path) for f in flags]
    data = tmp_path if "--split" in flags else tmp_path / "no-data-needed"
    assert _eval_cli(["--checkpoint", str(ckpt), "--data", str(data), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
