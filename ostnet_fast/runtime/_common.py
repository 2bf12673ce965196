"""Shared by the ONNX Runtime and TensorRT runtimes: the pair of sidecars and input checks."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..export.common import GRAPHS, read_sidecar

CONSISTENT_KEYS = ("image_size", "config", "checkpoint_sha256", "precision")


def load_pair(paths: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Sidecars of the source and frame files; they must come from one export."""
    sides = {g: read_sidecar(paths[g]) for g in GRAPHS}
    for key in CONSISTENT_KEYS:
        a, b = sides["source"].get(key), sides["frame"].get(key)
        if a != b:
            raise ValueError(f"{paths['source'].name} and {paths['frame'].name} come from different exports "
                             f"({key}: {str(a)[:80]!r} vs {str(b)[:80]!r}); re-export both")
    source_outputs = [t["name"] for t in sides["source"]["outputs"]]
    frame_inputs = [t["name"] for t in sides["frame"]["inputs"]]
    if frame_inputs[:-1] != source_outputs or frame_inputs[-1] != "driving":
        raise ValueError(f"frame inputs {frame_inputs} do not match source outputs {source_outputs} + driving")
    return sides


def check_image(x: Any, what: str, channels: int, size: int, batch: int | None = None,
                batch_range: tuple[int, int] | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor (N, {channels}, {size}, {size}), got {type(x).__name__}")
    if x.dim() != 4 or tuple(x.shape[1:]) != (channels, size, size):
        raise ValueError(f"{what} must be (N, {channels}, {size}, {size}) float in [0, 1] (the exported size), "
                         f"got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a float tensor in [0, 1], got {x.dtype}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{what} must have batch {batch}, got {tuple(x.shape)}")
    if batch_range is not None and not batch_range[0] <= x.shape[0] <= batch_range[1]:
        raise ValueError(f"{what} batch {x.shape[0]} is outside the engine's profile "
                         f"[{batch_range[0]}, {batch_range[1]}]; rebuild with build_trt.py --batch MIN:OPT:MAX")
