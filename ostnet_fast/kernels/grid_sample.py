"""Bilinear grid_sample, zeros padding, align_corners=True.

Convention (the whole package): grids hold (x, y) in [-1, 1], x along width; -1 and +1 are the centres of
the corner pixels (align_corners=True, FOMM's convention). Sample points outside the image read zeros.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import use_triton


def grid_sample_reference(input: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """input (B, C, H_in, W_in), grid (B, H, W, 2) -> (B, C, H, W)."""
    return F.grid_sample(input, grid.to(input.dtype), mode="bilinear", padding_mode="zeros",
                         align_corners=True)


def grid_sample(input: torch.Tensor, grid: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    if input.dim() != 4 or grid.dim() != 4 or grid.shape[-1] != 2 or grid.shape[0] != input.shape[0]:
        raise ValueError(f"grid_sample: input must be (B, C, H, W) and grid (B, H, W, 2), got "
                         f"{tuple(input.shape)} and {tuple(grid.shape)}")
    if use_triton("grid_sample", impl, input, grid):
        raise NotImplementedError("grid_sample: Triton kernel not written yet")
    return grid_sample_reference(input, grid)
