"""build_trt (issue 5) with whichever TensorRT is installed; on CI that is TensorRT for RTX, which parses
and builds on a CPU-only machine (it cannot run engines there). The grid-sample check on the parsed
network is the parity evidence where engines cannot run."""
from __future__ import annotations

import json
import sys
import time

import onnx
import pytest
import torch

from ostnet_fast.export import build_trt
from ostnet_fast.export.common import ExportError, sha256_file

from .test_export import TINY, export_tiny

try:
    TRT, FLAVOUR = build_trt.import_tensorrt()
except build_trt.TensorRTNotInstalled:
    TRT, FLAVOUR = None, None
needs_trt = pytest.mark.skipif(TRT is None, reason="neither tensorrt nor tensorrt_rtx_bindings is installed")
pytestmark = pytest.mark.tensorrt


@pytest.fixture(scope="module")
def tiny_engines(tmp_path_factory):
    if TRT is None:
        pytest.skip("no TensorRT")
    root = tmp_path_factory.mktemp("trt")
    _, _, onnx_dir = export_tiny(root, fp16=False)
    rc = build_trt.main(["--onnx", str(onnx_dir), "--out", str(root / "engines"), "--batch", "1:2:4",
                         "--workspace", "0.5"])
    assert rc == 0
    return onnx_dir, root / "engines"


@needs_trt
def test_engines_and_sidecars_written(tiny_engines):
    onnx_dir, engines = tiny_engines
    for graph in ("source", "frame"):
        engine = engines / f"{graph}.engine"
        side = json.loads((engines / f"{graph}.engine.json").read_text())
        assert engine.stat().st_size > 0 and side["engine_sha256"] == sha256_file(engine)
        assert side["tensorrt"] == {"flavour": FLAVOUR, "module": TRT.__name__, "version": TRT.__version__}
        assert side["precision"] == "fp32" and side["strongly_typed"] is True
        assert side["onnx"] == f"{graph}.onnx" and side["onnx_sha256"] == sha256_file(onnx_dir / f"{graph}.onnx")
        assert side["image_size"] == 64 and side["opset"] == 17 and side["config_name"] == "tiny"
        assert side["workspace_bytes"] == 1 << 29
        if not torch.cuda.is_available():
            assert side["built_for"]["gpu"] == "cpu-build (TensorRT-RTX, no GPU)"
            assert side["built_for"]["targets"] == build_trt.RTX_DEFAULT_TARGETS
    frame = json.loads((engines / "frame.engine.json").read_text())
    assert frame["batch"] == [1, 2, 4]
    assert frame["profile"] == {"driving": {"min": [1, 3, 64, 64], "opt": [2, 3, 64, 64], "max": [4, 3, 64, 64]}}
    assert [t["name"] for t in frame["inputs"]] == ["kp_value", "kp_jacobian", "source_small", "source_f1", "driving"]
    assert frame["inputs"][-1]["shape"] == [-1, 3, 64, 64]
    assert [t["name"] for t in frame["outputs"]] == ["prediction", "rectified"]
    # The parity evidence: all three samplers parsed as bilinear, align_corners, zeros padding.
    layers = frame["grid_sample_layers"]
    assert len(layers) == 3 and all((g["interpolation"], g["align_corners"], g["sample_mode"]) ==
                                    ("LINEAR", True, "FILL") for g in layers), layers
    source = json.loads((engines / "source.engine.json").read_text())
    assert source["batch"] is None and source["profile"] == {}


@needs_trt
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_trt_reenactor_refuses_without_cuda(tiny_engines):
    from ostnet_fast.runtime import TRTReenactor
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        TRTReenactor(tiny_engines[1])


@needs_trt
def test_fp16_build_exporting_first(tmp_path):
    # No --onnx: exports the fp16 graphs first (random weights), then builds them strongly typed.
    rc = build_trt.main(["--config", TINY, "--out", str(tmp_path), "--fp16", "--batch", "1:1:2"])
    assert rc == 0
    assert (tmp_path / "onnx" / "frame_fp16.onnx").is_file()
    side = json.loads((tmp_path / "frame.engine.json").read_text())
    assert side["precision"] == "fp16" and side["onnx"] == "frame_fp16.onnx"
    assert all(t["dtype"] == "float" for t in side["inputs"] + side["outputs"])  # fp32 I/O, fp16 inside
    assert len(side["grid_sample_layers"]) == 3


@needs_trt
def test_fp16_needs_fp16_graphs(tiny_engines, tmp_path, capsys):
    onnx_dir, _ = tiny_engines  # exported without --fp16
    rc = build_trt.main(["--onnx", str(onnx_dir), "--out", str(tmp_path), "--fp16"])
    err = capsys.readouterr().err
    assert rc == 2 and "frame_fp16.onnx" in err and "--fp16" in err


@needs_trt
def test_a_frame_graph_that_fails_leaves_the_folder_as_it_was(tiny_engines, tmp_path, capsys):
    import shutil
    onnx_dir, _ = tiny_engines
    broken = tmp_path / "onnx"
    shutil.copytree(onnx_dir, broken)
    (broken / "frame.onnx").write_bytes(b"not onnx")
    (broken / "frame.json").write_text(json.dumps({k: v for k, v in json.loads((onnx_dir / "frame.json").read_text())
                                                   .items() if k != "onnx_sha256"}))
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "source.engine").write_text("the previous build")
    rc = build_trt.main(["--onnx", str(broken), "--out", str(tmp_path / "engines")])
    assert rc == 2 and "frame" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "engines").iterdir()] == ["source.engine"]  # as it was
    assert (tmp_path / "engines" / "source.engine").read_text() == "the previous build"


def _sampler_graph(path, mode: str, opset: int = 17):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4])
    g = onnx.helper.make_tensor_value_info("g", onnx.TensorProto.FLOAT, [1, 4, 4, 2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 4, 4])
    node = onnx.helper.make_node("GridSample", ["x", "g"], ["y"], name="sampler", mode=mode, align_corners=1)
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "t", [x, g], [y]),
                                   opset_imports=[onnx.helper.make_opsetid("", opset)])
    onnx.save(model, str(path))
    return path


@needs_trt
@pytest.mark.parametrize("mode,opset,ok", [
    ("bilinear", 17, True),   # what we export
    ("nearest", 17, False),   # a sampler that is not bilinear must stop the build
])
def test_grid_sample_mode_check(tmp_path, mode, opset, ok):
    builder = build_trt.EngineBuilder(TRT, FLAVOUR)
    path = _sampler_graph(tmp_path / "g.onnx", mode, opset)
    if ok:
        builder.create_network(path)
        assert builder.grid_samples == [{"name": "sampler", "interpolation": "LINEAR", "align_corners": True,
                                         "sample_mode": "FILL"}]
    else:
        with pytest.raises(ExportError, match="refusing to build"):
            builder.create_network(path)


@needs_trt
def test_parser_error_names_the_node(tmp_path, caplog):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    node = onnx.helper.make_node("NoSuchOp", ["x"], ["y"], name="the_bad_node", domain="ostnet.test")
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "t", [x], [y]),
                                   opset_imports=[onnx.helper.make_opsetid("", 17),
                                                  onnx.helper.make_opsetid("ostnet.test", 1)])
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with caplog.at_level("ERROR", logger="ostnet_fast.export.trt"), pytest.raises(ExportError, match="the_bad_node"):
        build_trt.EngineBuilder(TRT, FLAVOUR).create_network(tmp_path / "bad.onnx")
    assert any("the_bad_node" in r.getMessage() and "NoSuchOp" in r.getMessage() for r in caplog.records)


def test_neither_tensorrt_installed_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OSTNET_TENSORRT", raising=False)
    for module in build_trt.FLAVOURS.values():
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(build_trt.TensorRTNotInstalled, match="pip install tensorrt-rtx-cu13-libs"):
        build_trt.import_tensorrt()
    rc = build_trt.main(["--onnx", str(tmp_path), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "pip install tensorrt" in err[0] and "tensorrt-rtx-cu13-bindings" in err[0]


def test_bad_workspace_refused(tmp_path, capsys):
    rc = build_trt.main(["--onnx", str(tmp_path), "--out", str(tmp_path / "e"), "--workspace", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--workspace must be a positive number" in err[0]


@needs_trt
def test_compute_capability_major_x_means_every_minor():
    if FLAVOUR != "tensorrt-rtx":
        pytest.skip("a TensorRT-RTX option")
    builder = build_trt.EngineBuilder(TRT, FLAVOUR)
    known = [m for m in TRT.ComputeCapability.__members__ if m.startswith("SM12")]
    assert builder._set_compute_capabilities(["8.6", "12.x"]) == ["8.6"] + [f"{m[2:-1]}.{m[-1]}" for m in known]
    with pytest.raises(ValueError, match="not a TensorRT-RTX target"):
        builder._set_compute_capabilities(["9.x"])  # Hopper: not an RTX target


@pytest.mark.parametrize("text", ["1:8:4", "0:1:2", "1:2", "a:b:c"])
def test_bad_batch_refused(text):
    with pytest.raises(ValueError, match="--batch"):
        build_trt.parse_batch(text)


@needs_trt
def test_real_256_graphs_parse_and_build(tmp_path):
    """CI's proof that the production graphs (ostnet-vox-256, random weights) parse and build: export
    (~15 s) + parse + build of both graphs (~5 s with TensorRT-RTX on 2 cores, ~35 s in all)."""
    t0 = time.perf_counter()
    rc = build_trt.main(["--config", "ostnet-vox-256", "--out", str(tmp_path), "--batch", "1:1:8"])
    assert rc == 0
    side = json.loads((tmp_path / "frame.engine.json").read_text())
    assert side["image_size"] == 256 and side["config_name"] == "ostnet-vox-256"
    assert side["inputs"][-1]["shape"] == [-1, 3, 256, 256]
    assert len(side["grid_sample_layers"]) == 3
    assert all(g["interpolation"] == "LINEAR" for g in side["grid_sample_layers"])
    assert time.perf_counter() - t0 < 300
