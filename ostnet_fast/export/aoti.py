"""AOTInductor export: `source.pt2` + `frame.pt2`, compiled C++ packages that libtorch runs without
Python (csrc/ostnet_infer's AOTInductor path, or torch._inductor.aoti_load_package from Python).

    python export/export_aoti.py [--checkpoint PATH] [--config NAME] --out DIR [--device cuda|cpu]
                                 [--max-batch 16]

The graphs are the ONNX export's (graphs.py): source image -> source tensors; (source tensors...,
driving (N, 3, S, S)) -> (prediction, rectified), N dynamic in [1, max_batch]. A package is compiled for
one device; the source tensors are its outputs in the order of the sidecar's `source_tensors`.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .. import __version__
from ..checkpoint import CheckpointError
from .common import ExportError, staged, write_json
from .graphs import FrameGraph, SourceGraph
from .onnx_export import load_model, setup_logging

log = logging.getLogger("ostnet_fast.export")


def export_aoti(model, config, out_dir: str | Path, device: str = "cuda", max_batch: int = 16) -> dict[str, Path]:
    if max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = config.model.image_size
    source_graph = SourceGraph(model).to(device)
    frame_graph = FrameGraph(model, size).to(device)
    source = torch.rand(1, 3, size, size, device=device)
    with torch.no_grad():
        # AOTInductor bakes the example inputs' strides into the package: trace with contiguous source
        # tensors (what source.pt2 returns and what C++ callers pass), not eager's strided views.
        state = tuple(t.contiguous() for t in source_graph(source))
    # A dynamic batch needs a range (min < max): --max-batch 1 compiles a static batch of one.
    driving = torch.rand(min(2, max_batch), 3, size, size, device=device)
    frame_dynamic = None if max_batch == 1 else {
        "inputs": (*[None] * len(state), {0: torch.export.Dim("batch", min=1, max=max_batch)})}
    written = {}
    with staged(out) as stage:  # a failed or interrupted compile leaves the folder as it was
        for name, module, args, dynamic in (
                ("source", source_graph, (source,), None),
                ("frame", frame_graph, (*state, driving), frame_dynamic)):
            t0 = time.perf_counter()
            # cuDNN off while tracing: on CUDA, F.grid_sample would record aten.cudnn_grid_sampler, which
            # torch.export cannot trace (no fake kernel); the portable grid_sampler_2d is recorded instead.
            with torch.no_grad(), torch.backends.cudnn.flags(enabled=False):
                program = torch.export.export(module, args, dynamic_shapes=dynamic)
                path = torch._inductor.aoti_compile_and_package(program, package_path=str(stage / f"{name}.pt2"))
            written[name] = out / Path(path).name
            log.info("compiled %s in %.1f s", written[name], time.perf_counter() - t0)
        write_json(stage / "aoti.json", {
            "format": "ostnet-fast-aoti", "version": __version__, "torch": torch.__version__, "device": device,
            "image_size": size, "max_batch": max_batch,
            "source_tensors": list(source_graph.output_names), "frame_inputs": list(frame_graph.input_names),
            "frame_outputs": list(frame_graph.output_names), "config": config.to_dict()})
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="export_aoti.py", description=(
        "Compile OSTNet's source and frame steps to AOTInductor packages (source.pt2, frame.pt2) for C++."))
    p.add_argument("--checkpoint", help="ostnet-fast .safetensors or FOMM .pth.tar; omit for random weights")
    p.add_argument("--config", help="shipped config name or YAML path")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"),
                   help="device the packages are compiled for (default: cuda when available)")
    p.add_argument("--max-batch", type=int, default=16, help="largest driving batch the frame package takes")
    args = p.parse_args(argv)
    setup_logging()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("export_aoti: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    try:
        model, cfg, _ = load_model(args.checkpoint, args.config)
        export_aoti(model, cfg, args.out, device=args.device, max_batch=args.max_batch)
    except (CheckpointError, OSError, ValueError, ExportError) as e:  # OSError: --out a file, unwritable
        print(f"export_aoti: error: {e}", file=sys.stderr)
        return 2
    return 0
