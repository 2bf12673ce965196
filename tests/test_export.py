"""ONNX export (issue 5): standard ops only, sidecars, ONNX Runtime parity with the PyTorch reference on
random and real frames, dynamic batch, and the CLI's refusals. Tiny config at 64x64: seconds on CPU."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

from ostnet_fast import __version__
from ostnet_fast.checkpoint import save_checkpoint
from ostnet_fast.config import load_config
from ostnet_fast.export import onnx_export
from ostnet_fast.export.common import GRID_SAMPLE_NOTE, ExportError, sha256_file
from ostnet_fast.model import OSTNet

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")
# Every op the exported graphs may hold: all in the default ONNX domain and parsed by TensorRT.
STANDARD_OPS = {"Add", "AveragePool", "BatchNormalization", "Cast", "Concat", "ConstantOfShape", "Conv", "Div",
                "Einsum", "Equal", "Exp", "Expand", "Gather", "Gemm", "GridSample", "MatMul", "Mul", "Neg",
                "Pad", "Pow", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Resize", "Shape", "Sigmoid",
                "Slice", "Softmax", "Sub", "Tanh", "Transpose", "Unsqueeze", "Where"}
ATOL_FP32 = 1e-4  # issue 5: ORT vs PyTorch, fp32


def tiny_model(seed: int = 0) -> OSTNet:
    """The tiny OSTNet with every OSTNet-specific part switched on: F_fc != 0 (non-identity TPS), Jacobian
    head != identity, BatchNorm statistics != (0, 1), so parity exercises every path."""
    g = torch.Generator().manual_seed(seed)
    model = OSTNet(load_config(TINY).model).eval()
    with torch.no_grad():
        model.scale_transform.F_fc.weight.copy_(0.2 * torch.randn(model.scale_transform.F_fc.weight.shape, generator=g))
        jac = model.kp_detector.jacobian.weight
        jac.copy_(0.01 * torch.randn(jac.shape, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def export_tiny(root: Path, fp16: bool = True) -> tuple[OSTNet, Path, Path]:
    """-> (model, checkpoint, export dir): the CLI path, checkpoint in, graphs + sidecars out."""
    model = tiny_model()
    ckpt = save_checkpoint(root / "tiny.safetensors", model, load_config(TINY))
    out = root / "onnx"
    rc = onnx_export.main(["--checkpoint", str(ckpt), "--out", str(out)] + (["--fp16"] if fp16 else []))
    assert rc == 0
    return model, ckpt, out


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("export"))


def grid_samples(model: onnx.ModelProto) -> list[dict]:
    out = []
    for n in model.graph.node:
        if n.op_type == "GridSample":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            out.append({k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()})
    return out


@pytest.mark.parametrize("name", ["source.onnx", "frame.onnx", "source_fp16.onnx", "frame_fp16.onnx"])
def test_graphs_hold_standard_ops_only(tiny_export, name):
    _, _, out = tiny_export
    model = onnx.load(str(out / name))
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    ops = {n.op_type for n in model.graph.node}
    assert ops <= STANDARD_OPS, f"unexpected ops {sorted(ops - STANDARD_OPS)}"
    assert "Inverse" not in ops
    if name.startswith("frame"):
        # TPS warp, dense-motion front (K+1 deformed sources), bottleneck warp: three 2-D bilinear samplers.
        gss = grid_samples(model)
        assert len(gss) == 3
        assert all(g.get("mode", "bilinear") == "bilinear" and g.get("align_corners") == 1
                   and g.get("padding_mode", "zeros") == "zeros" for g in gss), gss
        assert "MatMul" in ops  # grid = A @ C


def test_sidecars(tiny_export):
    _, ckpt, out = tiny_export
    cfg = load_config(TINY)
    for name in ("source", "frame", "source_fp16", "frame_fp16"):
        side = json.loads((out / f"{name}.json").read_text())
        assert side["file"] == f"{name}.onnx"
        assert side["opset"] == 17 and side["image_size"] == 64
        assert side["precision"] == ("fp16" if name.endswith("fp16") else "fp32")
        assert side["config"] == cfg.to_dict()
        assert side["checkpoint_sha256"] == sha256_file(ckpt) and side["weights"] == "ostnet-fast"
        assert side["package_version"] == __version__
        assert side["grid_sample"] == GRID_SAMPLE_NOTE and "align_corners=1" in side["grid_sample"]
        assert side["onnx_sha256"] == sha256_file(out / f"{name}.onnx")
        assert all(t["dtype"] == "float32" for t in side["inputs"] + side["outputs"])  # fp16: cast inside
    source = json.loads((out / "source.json").read_text())
    assert source["inputs"] == [{"name": "source", "shape": [1, 3, 64, 64], "dtype": "float32"}]
    assert [(t["name"], t["shape"]) for t in source["outputs"]] == [
        ("kp_value", [1, 5, 2]), ("kp_jacobian", [1, 5, 2, 2]), ("source_small", [1, 3, 16, 16]),
        ("source_f1", [1, 8, 64, 64])]
    frame = json.loads((out / "frame.json").read_text())
    assert [t["name"] for t in frame["inputs"]] == [t["name"] for t in source["outputs"]] + ["driving"]
    assert frame["inputs"][-1]["shape"] == ["N", 3, 64, 64]  # dynamic batch
    assert [(t["name"], t["shape"]) for t in frame["outputs"]] == [
        ("prediction", ["N", 3, 64, 64]), ("rectified", ["N", 3, 64, 64])]


def test_ort_parity_random_frames_dynamic_batch(tiny_export):
    from ostnet_fast.runtime.parity import verify_onnx_export
    model, _, out = tiny_export
    report = verify_onnx_export(model, out, batches=(1, 3), seed=1)  # batch 1 and 3 from one graph
    assert set(report) >= {"source", "batch1", "batch3"}
    assert report["max_abs"] <= ATOL_FP32, report


def test_ort_parity_real_frames(tiny_export):
    from ostnet_fast.runtime.parity import real_frames, verify_onnx_export
    model, _, out = tiny_export
    frames = real_frames(64, count=4)  # the bundled talking-head video, square-cropped to 64x64
    with torch.no_grad():  # the reference output must not be flat, or parity would prove little
        pred = model.animate(model.encode_source(frames[:1]), frames[1:])["prediction"]
    assert pred.std() > 1e-3
    report = verify_onnx_export(model, out, source=frames[:1], driving=frames[1:])
    assert report["max_abs"] <= ATOL_FP32, report


def test_ort_fp16_graph_close_to_fp32_reference(tiny_export):
    from ostnet_fast.runtime import ORTReenactor
    from ostnet_fast.runtime.parity import psnr
    model, _, out = tiny_export
    g = torch.Generator().manual_seed(2)
    source, driving = torch.rand(1, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    r = ORTReenactor(out, providers=["CPUExecutionProvider"], fp16=True)
    r.set_source(source)
    with torch.no_grad():
        ref = model.animate(model.encode_source(source), driving)["prediction"]
    got = r(driving)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert float(psnr(ref, got).min()) > 40.0  # fp16 compute: ~1e-3 errors at most


def test_missing_checkpoint_exits_2_with_one_line(tmp_path, capsys):
    rc = onnx_export.main(["--checkpoint", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "checkpoint not found" in err[0] and "nope.safetensors" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("what, out, size, message", [
    ("--out is a file", "file.txt", None, "file.txt"),
    ("--out under a file", "file.txt/sub", None, "file.txt"),
    ("a size the model cannot run at", "o", 50, "multiples of 32"),
    ("size zero", "o", 0, "--size must be >= 16"),
])
def test_bad_out_or_size_exits_2_with_one_line(tmp_path, capsys, what, out, size, message):
    (tmp_path / "file.txt").write_text("x")
    rc = onnx_export.main(["--config", TINY, "--out", str(tmp_path / out)] + ([] if size is None else ["--size", str(size)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], (what, err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("failure", [RuntimeError("the frame graph broke"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_export_leaves_no_half_set(tmp_path, monkeypatch, failure):
    real = onnx_export._export_one

    def frame_fails(module, *args):
        if type(module).__name__ == "FrameGraph":
            raise failure
        return real(module, *args)
    (tmp_path / "source.onnx").write_text("the previous export")
    (tmp_path / "frame.onnx").write_text("the previous export")
    monkeypatch.setattr(onnx_export, "_export_one", frame_fails)
    with pytest.raises((ExportError, KeyboardInterrupt)):
        onnx_export.export_graphs(tiny_model(), load_config(TINY), tmp_path)
    # The folder is as it was: the previous pair, no new source graph beside it, no staging left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frame.onnx", "source.onnx"]
    assert (tmp_path / "source.onnx").read_text() == "the previous export"


def test_aoti_refuses_a_batch_below_one(tmp_path, capsys):
    from ostnet_fast.export import aoti
    rc = aoti.main(["--config", TINY, "--out", str(tmp_path / "a"), "--device", "cpu", "--max-batch", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--max-batch must be >= 1" in err[0]
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("opset,why", [(20, "4646"), (21, "4646"), (15, "GridSample needs opset 16")])
def test_bad_opset_refused(tmp_path, capsys, opset, why):
    rc = onnx_export.main(["--config", TINY, "--out", str(tmp_path), "--opset", str(opset)])
    err = capsys.readouterr().err
    assert rc == 2 and f"opset {opset} refused" in err and why in err


def test_random_weights_warn_and_opset_19(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="ostnet_fast.export"):
        written = onnx_export.export_graphs(*onnx_export.load_model(None, TINY)[:2], tmp_path, opset=19)
    assert any("RANDOM WEIGHTS" in r.getMessage() for r in caplog.records)
    model = onnx.load(str(written["frame"]))
    assert model.opset_import[0].version == 19
    assert {g.get("mode") for g in grid_samples(model)} == {"bilinear"}  # the opset-20 rename is not used
    side = json.loads((tmp_path / "frame.json").read_text())
    assert side["checkpoint"] is None and side["weights"] == "random"


def _graph(node: onnx.NodeProto, opset=17, domain_opsets=()) -> onnx.ModelProto:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4])
    g = onnx.helper.make_tensor_value_info("g", onnx.TensorProto.FLOAT, [1, 4, 4, 2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    graph = onnx.helper.make_graph([node], "t", [x, g], [y])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset), *domain_opsets])


@pytest.mark.parametrize("node,message", [
    (onnx.helper.make_node("GridSample", ["x", "g"], ["y"], mode="nearest", align_corners=1), "mode=nearest"),
    (onnx.helper.make_node("GridSample", ["x", "g"], ["y"], mode="bilinear"), "align_corners=0"),
    (onnx.helper.make_node("Inverse", ["x"], ["y"], domain="com.microsoft"), "custom"),
])
def test_check_graph_refuses(node, message):
    extra = [onnx.helper.make_opsetid("com.microsoft", 1)] if node.domain else []
    with pytest.raises(ExportError, match=message):
        onnx_export.check_graph(_graph(node, domain_opsets=extra))


def test_check_graph_accepts_bilinear_align_corners():
    node = onnx.helper.make_node("GridSample", ["x", "g"], ["y"], mode="bilinear", align_corners=1)
    summary = onnx_export.check_graph(_graph(node))
    assert summary["grid_samples"][0]["rank"] == 4


def test_export_does_not_touch_the_callers_model(tiny_export):
    model, _, _ = tiny_export
    before = {k: v.clone() for k, v in model.state_dict().items()}
    onnx_export.SourceGraph(model, half=True)
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in model.state_dict().items())
    assert not hasattr(model.scale_transform, "__dict__") or "warp" not in model.scale_transform.__dict__
