"""ONNX export: `source.onnx` + `frame.onnx` (see graphs.py), cleaned, checked, with JSON sidecars.

    python export/export_onnx.py --checkpoint PATH [--config NAME] --out DIR [--opset 17] [--size S]
                                 [--fp16] [--no-rectified] [--verify]

Exporter: `torch.onnx.export(dynamo=False)`, the TorchScript tracer, on purpose. torch >= 2.9 defaults
to the dynamo exporter, whose floor is opset 18: asked for 17 it silently writes 18, so it cannot
honour --opset 16/17 (the opsets with the longest TensorRT parser history for GridSample). The tracer
writes exactly the opset asked for, runs the eager reference path (our dispatch takes the reference
under `torch.onnx.is_in_onnx_export()`), and takes ~0.5 s instead of ~8 s on the tiny test model. Its
noisy shape plumbing (Shape/Gather/Where) is folded away by onnx-graphsurgeon. `exporter="dynamo"`
is kept for opset 18/19 users; the tests use the default. The TorchScript exporter is deprecated
upstream: if a future torch drops it, switch the default to dynamo and the default opset to 18.

Graph rules, checked on every export (`check_graph`): only the default ONNX domain (no custom ops), no
Inverse, every GridSample 2-D (rank-4 input) with mode bilinear, zeros padding and align_corners=1.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import __version__
from ..checkpoint import CheckpointError, load_checkpoint, load_fomm_checkpoint
from ..config import Config, load_config
from ..model import OSTNet
from .common import (DEFAULT_OPSET, GRID_SAMPLE_NOTE, ExportError, check_opset, onnx_name, sha256_file,
                     sidecar_path, staged, write_json)
from .graphs import FrameGraph, SourceGraph

log = logging.getLogger("ostnet_fast.export")
EXPORTERS = ("torchscript", "dynamo")
TRACE_BATCH = 2  # != 1, so SourceState.expand's batch-1 -> N broadcast is traced (N stays dynamic)
FOMM_SUFFIXES = (".tar", ".pth", ".pt", ".ckpt")
VERIFY_ATOL = 1e-4  # fp32, issue 5


@dataclass
class ModelSource:
    """Where the weights came from, for the sidecar."""
    checkpoint: str | None
    checkpoint_sha256: str | None
    kind: str  # "ostnet-fast" | "fomm" | "random"


def load_model(checkpoint: str | Path | None, config: str | Config | None = None) -> tuple[OSTNet, Config,
                                                                                            ModelSource]:
    """-> (eval model on CPU, config, provenance). No checkpoint -> random weights, loudly."""
    if checkpoint is None:
        cfg = load_config(config)
        log.warning("=" * 78)
        log.warning("NO CHECKPOINT: exporting RANDOM WEIGHTS (config %s). The graphs are valid for "
                    "testing the toolchain only; their output is noise.", cfg.name)
        log.warning("=" * 78)
        return OSTNet(cfg.model).eval(), cfg, ModelSource(None, None, "random")
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix in FOMM_SUFFIXES:
        model, cfg = load_fomm_checkpoint(path, config if config is not None else "fomm-vox-256")
        kind = "fomm"
    else:
        model, cfg = load_checkpoint(path)
        if config is not None:
            asked = load_config(config)
            if asked.model != cfg.model:
                raise CheckpointError(f"{path} stores config {cfg.name!r} whose model differs from "
                                      f"--config {asked.name!r}; drop --config (the checkpoint's wins)")
        kind = "ostnet-fast"
    return model.eval(), cfg, ModelSource(str(path), sha256_file(path), kind)


# ----------------------------------------------------------------------------------------------------
# graph inspection


def _dtype_name(elem_type: int) -> str:
    import onnx
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name


def value_infos(values) -> list[dict[str, Any]]:
    """ONNX ValueInfos -> [{'name', 'shape' (ints, or the symbol of a dynamic axis), 'dtype'}]."""
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None)
                 for d in t.shape.dim]
        out.append({"name": v.name, "shape": shape, "dtype": _dtype_name(t.elem_type)})
    return out


def _attr(node, name: str, default):
    import onnx
    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def check_graph(model) -> dict[str, Any]:
    """Refuse what TensorRT cannot parse faithfully; return a summary {'ops', 'grid_samples'}."""
    import onnx
    opset = {o.domain: o.version for o in model.opset_import}
    custom = sorted(d for d in opset if d not in ("", "ai.onnx"))
    ops = sorted({n.op_type for n in model.graph.node})
    problems = []
    if custom:
        problems.append(f"custom opset domains {custom}")
    nodes_custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if nodes_custom:
        problems.append(f"custom ops {nodes_custom}")
    if "Inverse" in ops:
        problems.append("an Inverse op (no TensorRT path; write 2x2 inverses in closed form)")
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
             if v.type.tensor_type.HasField("shape")}
    grid_samples = []
    for n in model.graph.node:
        if n.op_type != "GridSample":
            continue
        gs = {"name": n.name, "mode": _attr(n, "mode", "bilinear"),
              "padding_mode": _attr(n, "padding_mode", "zeros"),
              "align_corners": int(_attr(n, "align_corners", 0)), "rank": ranks.get(n.input[0])}
        grid_samples.append(gs)
        if (gs["mode"], gs["padding_mode"], gs["align_corners"]) != ("bilinear", "zeros", 1):
            problems.append(f"GridSample {n.name!r} is mode={gs['mode']} padding={gs['padding_mode']} "
                            f"align_corners={gs['align_corners']}, expected bilinear/zeros/1")
        if gs["rank"] != 4:
            problems.append(f"GridSample {n.name!r} input rank {gs['rank']} (TensorRT samples 2-D only)")
    if problems:
        raise ExportError("exported graph breaks the export rules: " + "; ".join(problems))
    return {"ops": ops, "grid_samples": grid_samples}


def _float16_ranges_as_float32(graph) -> int:
    """float16 Range -> Cast(float32) -> Range -> Cast(float16). ONNX's Range has no float16 (the model
    is invalid until it is folded, so ONNX Runtime, which graphsurgeon folds with, refuses the whole
    graph); `pixel_coordinates(dtype=float16)` traces to one in the fp16 graphs. Exact: the values are
    small integers before the affine map to [-1, 1]. The rewritten Range then folds to a constant."""
    import numpy as np
    import onnx
    import onnx_graphsurgeon as gs
    count = 0
    for node in list(graph.nodes):
        if node.op != "Range" or node.outputs[0].dtype != np.float16:
            continue
        inputs = []
        for i, x in enumerate(node.inputs):
            y = gs.Variable(f"{node.name}_input{i}_fp32", dtype=np.float32, shape=x.shape)
            graph.nodes.append(gs.Node("Cast", f"{node.name}_cast{i}", {"to": onnx.TensorProto.FLOAT},
                                       inputs=[x], outputs=[y]))
            inputs.append(y)
        out = node.outputs[0]
        mid = gs.Variable(f"{node.name}_fp32", dtype=np.float32, shape=out.shape)
        node.inputs = inputs
        node.outputs = [mid]
        graph.nodes.append(gs.Node("Cast", f"{node.name}_cast_out", {"to": onnx.TensorProto.FLOAT16},
                                   inputs=[mid], outputs=[out]))
        count += 1
    if count:
        graph.toposort()
    return count


def dedupe_initializers(model) -> int:
    """Identical initializers -> one. The tracer folds BatchNorm into each Conv per call, so the keypoint
    detector, run on the driving and on the rectified frame, would be stored twice (57 MB at 256)."""
    import hashlib
    from onnx import numpy_helper
    canonical: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    keep = []
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        key = (a.dtype.str, a.shape, hashlib.sha256(a.tobytes()).hexdigest())
        if key in canonical:
            rename[init.name] = canonical[key]
        else:
            canonical[key] = init.name
            keep.append(init)
    if rename:
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
    return len(rename)


def clean_graph(path: Path, max_passes: int = 5) -> "onnx.ModelProto":
    """onnx-graphsurgeon: fold constants (shapes included), drop dead nodes, toposort, repeated with
    ONNX shape inference in between until the node count stops falling (the tracer's shape plumbing
    folds in 2-3 passes: ~570 -> ~350 nodes on the frame graph); then onnx.checker (full check)."""
    import onnx
    import onnx_graphsurgeon as gs
    import onnxruntime
    onnxruntime.set_default_logger_severity(3)  # graphsurgeon folds through ORT, which is chatty
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    model = onnx.load(str(path))
    count = len(model.graph.node)
    for _ in range(max_passes):
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        graph = gs.import_onnx(model)
        _float16_ranges_as_float32(graph)
        graph.fold_constants(fold_shapes=True)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        model = gs.export_onnx(graph)
        if len(model.graph.node) >= count:
            break
        count = len(model.graph.node)
    dedupe_initializers(model)
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    onnx.checker.check_model(model, full_check=True)
    return model


# ----------------------------------------------------------------------------------------------------
# export


def _export_one(module: torch.nn.Module, args: tuple, path: Path, input_names, output_names,
                dynamic: dict[str, dict[int, str]], opset: int, exporter: str) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns on every Python shape check (image size, SourceState.expand's batch test):
        # expected. S is fixed per export, and the batch test is traced at TRACE_BATCH != 1 so the Expand
        # is recorded and N stays dynamic (verified by running batch 1 and 3 in the tests).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # strided Slice: kept
        # The TorchScript exporter is chosen on purpose (module docstring); its deprecation notices say so.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        if exporter == "torchscript":
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=dynamic, do_constant_folding=True)
        else:
            dyn = torch.export.Dim("N", min=1, max=1024)
            shapes = tuple({0: dyn} if n in dynamic else None for n in input_names)
            prog = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                     input_names=list(input_names), output_names=list(output_names),
                                     dynamic_shapes=(shapes,) if len(args) > 1 else shapes)
            prog.save(str(path))


def export_graphs(model: OSTNet, config: Config, out_dir: str | Path, opset: int = DEFAULT_OPSET,
                  size: int | None = None, precisions: Sequence[str] = ("fp32",), rectified: bool = True,
                  source: ModelSource | None = None, exporter: str = "torchscript",
                  seed: int = 0) -> dict[str, Path]:
    """Write source/frame graphs (+ sidecars) for each precision; -> {'source': path, 'frame': ...,
    'source_fp16': ...}. Raises ValueError on bad arguments, ExportError when a graph breaks a rule."""
    check_opset(opset)
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if exporter == "dynamo" and opset < 18:
        raise ValueError(f"the dynamo exporter writes opset 18 or newer, got --opset {opset}")
    if size is not None and size < 16:
        raise ValueError(f"--size must be >= 16, got {size}")
    size = int(size or config.model.image_size)
    c = config.model.num_channels
    model.check_image(torch.zeros(1, c, size, size), "source")  # validates S before any work
    source = source or ModelSource(None, None, "random")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    example_source = torch.rand(1, c, size, size, generator=g)  # (1, C, S, S)
    example_driving = torch.rand(TRACE_BATCH, c, size, size, generator=g)  # (N, C, S, S)
    written: dict[str, Path] = {}
    with staged(out_dir) as stage:  # a failed or interrupted export leaves the folder as it was
        for precision in precisions:
            half = precision == "fp16"
            sg = SourceGraph(model, half=half)
            fg = FrameGraph(model, size, half=half, rectified=rectified)
            with torch.no_grad():
                source_tensors = sg(example_source)
            dynamic = {"driving": {0: "N"}, **{n: {0: "N"} for n in fg.output_names}}
            plans = [("source", sg, (example_source,), ("source",), sg.output_names, {}),
                     ("frame", fg, (*source_tensors, example_driving), fg.input_names, fg.output_names, dynamic)]
            for graph, module, args, inputs, outputs, dyn in plans:
                path = stage / onnx_name(graph, precision)
                log.info("exporting %s (%s, opset %d, %dx%d) -> %s", graph, precision, opset, size, size,
                         out_dir / path.name)
                try:
                    _export_one(module, args, path, inputs, outputs, dyn, opset, exporter)
                    proto = clean_graph(path)
                    summary = check_graph(proto)
                except ExportError:
                    path.unlink(missing_ok=True)
                    raise
                except Exception as e:
                    path.unlink(missing_ok=True)
                    raise ExportError(f"exporting {graph} ({precision}) failed: {type(e).__name__}: {e}") from e
                import onnx
                onnx.save(proto, str(path))
                write_json(sidecar_path(path), {
                    "format": "ostnet-fast-onnx", "graph": graph, "file": path.name, "precision": precision,
                    "inputs": value_infos(proto.graph.input), "outputs": value_infos(proto.graph.output),
                    "dynamic_axes": {k: {str(a): s for a, s in v.items()} for k, v in dyn.items()},
                    "image_size": size, "opset": opset, "exporter": exporter, "ops": summary["ops"],
                    "grid_sample": GRID_SAMPLE_NOTE, "grid_samples": summary["grid_samples"],
                    "tps": "grid = A @ C, A (S*S, T) constant (solved in float64 at export), then GridSample",
                    "io_dtype": "float32 (fp16 graphs cast inside)",
                    "onnx_sha256": sha256_file(path),
                    "config_name": config.name, "config": config.to_dict(),
                    "checkpoint": source.checkpoint, "checkpoint_sha256": source.checkpoint_sha256,
                    "weights": source.kind, "package_version": __version__, "torch_version": torch.__version__,
                    "onnx_version": onnx.__version__,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                })
                written[graph if precision == "fp32" else f"{graph}_{precision}"] = out_dir / path.name
                log.info("  %s: %d nodes, ops %s", path.name, len(proto.graph.node), " ".join(summary["ops"]))
    return written


# ----------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="export_onnx.py", description=(
        "Export OSTNet to source.onnx + frame.onnx (standard ONNX ops, TensorRT-parsable) with JSON sidecars."))
    p.add_argument("--checkpoint", help="ostnet-fast .safetensors checkpoint, or a FOMM .pth.tar "
                   "(loaded with --config, default fomm-vox-256); omit for random weights (testing only)")
    p.add_argument("--config", help="shipped config name or YAML path (random weights / FOMM checkpoints)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset, 16..19 (20+ refused)")
    p.add_argument("--size", type=int, help="image size S (default: the config's image_size)")
    p.add_argument("--fp16", action="store_true", help="also write *_fp16.onnx (float16 compute, float32 I/O)")
    p.add_argument("--no-rectified", action="store_true", help="frame graph without the 'rectified' output")
    p.add_argument("--exporter", choices=EXPORTERS, default="torchscript",
                   help="torch.onnx exporter (dynamo needs --opset 18 or 19)")
    p.add_argument("--verify", action="store_true", help="check ONNX Runtime against PyTorch after export "
                   "(fp32 graphs, random frames; exit 1 above 1e-4)")
    return p


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        check_opset(args.opset)
        model, cfg, src = load_model(args.checkpoint, args.config)
        precisions = ("fp32", "fp16") if args.fp16 else ("fp32",)
        written = export_graphs(model, cfg, args.out, opset=args.opset, size=args.size, precisions=precisions,
                                rectified=not args.no_rectified, source=src, exporter=args.exporter)
        if args.verify:
            from ..runtime.parity import verify_onnx_export
            report = verify_onnx_export(model, args.out, size=args.size or cfg.model.image_size)
            log.info("ONNX Runtime (CPU) vs PyTorch, random frames, batch 1 and 3: max abs %.2e over the "
                     "source tensors, prediction and rectified (tolerance %.0e)", report["max_abs"], VERIFY_ATOL)
            if report["max_abs"] > VERIFY_ATOL:
                print(f"export_onnx: error: ONNX Runtime differs from PyTorch by {report['max_abs']:.2e} "
                      f"> {VERIFY_ATOL:.0e}: {report}", file=sys.stderr)
                return 1
    except (CheckpointError, OSError, ValueError, ExportError) as e:  # OSError: --out a file, unwritable
        print(f"export_onnx: error: {e}", file=sys.stderr)
        return 2
    for name, path in written.items():
        log.info("wrote %s (+ %s)", path, sidecar_path(path).name)
    return 0
