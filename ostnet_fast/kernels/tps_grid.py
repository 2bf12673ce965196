"""Thin-plate-spline sampling grid (RARE / STN-TPS grid generator).

Convention: points are (x, y) in [-1, 1] with align_corners=True pixel centres (see grid_sample.py).
`target_points` (T, 2) are fixed fiducials in the OUTPUT image; `control_points` (B, T, 2) are where
those fiducials sit in the INPUT image. The map f(p) = sum_i w_i U(|p - t_i|) + a_0 + a_1 x + a_2 y, with
U(r) = r^2 log r^2 (U(0) = 0), interpolates f(t_i) = c_i exactly. Its coefficients [w; a] = coef @ C,
where coef = L^-1[:, :T] of the (T+3)x(T+3) TPS system, solved once in float64 (`tps_solve`), so the
forward pass has no inverse or solve (ONNX/TensorRT friendly).
"""
from __future__ import annotations

import torch

from ._dispatch import use_triton
from .geometry import pixel_coordinates


def tps_radial(d2: torch.Tensor) -> torch.Tensor:
    """U as a function of the squared distance: r^2 log r^2, 0 at r = 0."""
    return d2 * torch.log(d2.clamp_min(torch.finfo(d2.dtype).tiny))


def tps_solve(target_points: torch.Tensor) -> torch.Tensor:
    """(T, 2) target fiducials -> coef (T+3, T) float64, so that [w; a] = coef @ C."""
    p = target_points.detach().to(torch.float64, copy=True)
    if p.dim() != 2 or p.shape[1] != 2:
        raise ValueError(f"target points must be (T, 2), got {tuple(p.shape)}")
    t = p.shape[0]
    k = tps_radial(((p[:, None, :] - p[None, :, :]) ** 2).sum(-1))  # (T, T)
    pa = torch.cat([torch.ones(t, 1, dtype=torch.float64), p], dim=1)  # (T, 3)
    system = torch.zeros(t + 3, t + 3, dtype=torch.float64)
    system[:t, :t] = k
    system[:t, t:] = pa
    system[t:, :t] = pa.T
    return torch.linalg.inv(system)[:, :t].contiguous()  # construction time only


def tps_grid_matrix(target_points: torch.Tensor, coef: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (H*W, T) with grid = A @ C: the form ONNX export uses (one MatMul with a constant)."""
    dtype = torch.float64
    p = pixel_coordinates(size, dtype=dtype, device=coef.device).reshape(-1, 2)  # (HW, 2)
    t = target_points.to(dtype)
    u = tps_radial(((p[:, None, :] - t[None, :, :]) ** 2).sum(-1))  # (HW, T)
    basis = torch.cat([u, torch.ones_like(p[:, :1]), p], dim=1)  # (HW, T+3)
    return basis @ coef.to(dtype)  # (HW, T)


def tps_grid_reference(control_points: torch.Tensor, target_points: torch.Tensor, coef: torch.Tensor,
                       size: tuple[int, int]) -> torch.Tensor:
    """control_points (B, T, 2) -> grid (B, H, W, 2), computed per pixel from the radial basis."""
    dtype = torch.promote_types(control_points.dtype, torch.float32)
    c = control_points.to(dtype)
    params = coef.to(dtype) @ c  # (B, T+3, 2): w_1..w_T, a_0, a_x, a_y
    p = pixel_coordinates(size, device=c.device, dtype=dtype)  # (H, W, 2)
    t = target_points.to(dtype)
    u = tps_radial(((p[:, :, None, :] - t) ** 2).sum(-1))  # (H, W, T)
    t_count = t.shape[0]
    grid = torch.einsum("hwt,btc->bhwc", u, params[:, :t_count])
    grid = grid + params[:, None, None, t_count] + p[..., :1] * params[:, None, None, t_count + 1] \
        + p[..., 1:] * params[:, None, None, t_count + 2]
    return grid.to(control_points.dtype)


def check_tps_args(control_points: torch.Tensor, target_points: torch.Tensor, coef: torch.Tensor) -> None:
    t = target_points.shape[0]
    if control_points.dim() != 3 or control_points.shape[1:] != (t, 2):
        raise ValueError(f"control points must be (B, {t}, 2), got {tuple(control_points.shape)}")
    if coef.shape != (t + 3, t):
        raise ValueError(f"coef must be ({t + 3}, {t}), got {tuple(coef.shape)}")


def tps_grid(control_points: torch.Tensor, target_points: torch.Tensor, coef: torch.Tensor,
             size: tuple[int, int], impl: str = "auto") -> torch.Tensor:
    check_tps_args(control_points, target_points, coef)
    if use_triton("tps_grid", impl, control_points):
        raise NotImplementedError("tps_grid: Triton kernel not written yet")
    return tps_grid_reference(control_points, target_points, coef, size)
