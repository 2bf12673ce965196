"""Small geometry helpers shared by the model and the kernels' references.

Convention (the whole package): (x, y) order, x along width, in [-1, 1] with -1/+1 at the centres of
the corner pixels (align_corners=True, as FOMM). Keypoints are (B, K, 2) in that frame; Jacobians are
(B, K, 2, 2) acting on column vectors (x, y)^T.
"""
from __future__ import annotations

import torch


def pixel_coordinates(size: tuple[int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """(H, W, 2) grid of pixel centres in [-1, 1], (x, y) order (FOMM's make_coordinate_grid)."""
    h, w = size
    x = torch.arange(w, device=device, dtype=dtype)
    y = torch.arange(h, device=device, dtype=dtype)
    x = 2 * (x / max(w - 1, 1)) - 1
    y = 2 * (y / max(h - 1, 1)) - 1
    return torch.stack([x.view(1, w).expand(h, w), y.view(h, 1).expand(h, w)], dim=-1)


def kp2gaussian(kp: torch.Tensor, size: tuple[int, int], kp_variance: float) -> torch.Tensor:
    """(B, K, 2) keypoints -> (B, K, H, W) unnormalised Gaussians exp(-|p - kp|^2 / (2 var))."""
    grid = pixel_coordinates(size, device=kp.device, dtype=kp.dtype)  # (H, W, 2)
    d = grid[None, None] - kp[:, :, None, None, :]  # (B, K, H, W, 2)
    return torch.exp(-0.5 * (d ** 2).sum(-1) / kp_variance)


def inverse_2x2(m: torch.Tensor) -> torch.Tensor:
    """Closed-form inverse of (..., 2, 2) matrices: no torch.inverse (no fp16 kernel, no ONNX op)."""
    a, b, c, d = m[..., 0, 0], m[..., 0, 1], m[..., 1, 0], m[..., 1, 1]
    det = a * d - b * c
    return torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) / det[..., None, None]
