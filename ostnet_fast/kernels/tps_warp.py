"""TPS warp: image + control points -> warped image (the grid is never written to memory when fused)."""
from __future__ import annotations

import torch

from ._dispatch import use_triton
from .grid_sample import grid_sample_reference
from .tps_grid import check_tps_args, tps_grid_reference


def tps_warp_reference(image: torch.Tensor, control_points: torch.Tensor, target_points: torch.Tensor,
                       coef: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """image (B, C, H_in, W_in) -> (B, C, H, W); size defaults to the input's."""
    size = tuple(image.shape[-2:]) if size is None else size
    grid = tps_grid_reference(control_points, target_points, coef, size)
    return grid_sample_reference(image, grid)


def tps_warp(image: torch.Tensor, control_points: torch.Tensor, target_points: torch.Tensor,
             coef: torch.Tensor, size: tuple[int, int] | None = None, impl: str = "auto") -> torch.Tensor:
    check_tps_args(control_points, target_points, coef)
    if image.dim() != 4 or image.shape[0] != control_points.shape[0]:
        raise ValueError(f"tps_warp: image must be (B, C, H, W) with B = {control_points.shape[0]}, "
                         f"got {tuple(image.shape)}")
    if use_triton("tps_warp", impl, image, control_points):
        raise NotImplementedError("tps_warp: Triton kernel not written yet")
    return tps_warp_reference(image, control_points, target_points, coef, size)
