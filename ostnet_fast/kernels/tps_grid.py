"""Thin-plate-spline sampling grid (RARE / STN-TPS grid generator).

Convention: points are (x, y) in [-1, 1] with align_corners=True pixel centres (see grid_sample.py).
`target_points` (T, 2) are fixed fiducials in the OUTPUT image; `control_points` (B, T, 2) are where
those fiducials sit in the INPUT image. The map f(p) = sum_i w_i U(|p - t_i|) + a_0 + a_1 x + a_2 y, with
U(r) = r^2 log r^2 (U(0) = 0), interpolates f(t_i) = c_i exactly. Its coefficients [w; a] = coef @ C,
where coef = L^-1[:, :T] of the (T+3)x(T+3) TPS system, solved once in float64 (`tps_solve`), so the
forward pass has no inverse or solve (ONNX/TensorRT friendly).

Triton path (what is fused, and the design limits):
- forward: params = coef @ C, (B, T+3, 2), is tiny and done in torch (fp32, fp64 for fp64 control
  points). One program then owns BLOCK_P pixels (one a thread) of up to four samples (`tu.tps_map`): a
  loop over the fiducials evaluates U(|p - t_i|) once for all of them (it does not depend on the sample)
  and accumulates their maps in registers. No (H*W, T) matrix is ever materialised, and no sum crosses lanes.
- backward (to the control points only; target points and coef are constants, they get no grad):
  dL/dw_i = sum_p U_i(p) g(p), dL/da = sum_p (1, x, y) g(p). Here the basis is a (BLOCK_P, BLOCK_T)
  register tile, shared by up to 4 samples of a program (`tps_samples`), reduced over its pixels and
  written to a (B, programs, T+3, 2) partial buffer (no atomics, deterministic), summed in torch; then
  dL/dC = coef^T @ dL/dparams.
- limits: T <= 128 (the basis tile lives in registers), H * W * 2 < 2**31, B <= 65535. The output has the
  control points' dtype (the reference's); the maths is fp32 (fp64 for fp64 control points).
  Not twice differentiable (backward is once_differentiable).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import _triton_utils as tu
from ._dispatch import use_triton
from .geometry import pixel_coordinates

if tu.HAS_TRITON:
    import triton
    import triton.language as tl


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
    pa = torch.cat([torch.ones(t, 1, dtype=torch.float64, device=p.device), p], dim=1)  # (T, 3)
    system = torch.zeros(t + 3, t + 3, dtype=torch.float64, device=p.device)
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


if tu.HAS_TRITON:

    @triton.jit
    def _tps_grid_fwd_kernel(
        par_ptr,  # (B, T+3, 2) contiguous params [w; a], ACC dtype
        tgt_ptr,  # (T, 2) contiguous target fiducials, ACC dtype
        grid_ptr,  # (B, H, W, 2) output grid, the control points' dtype
        B, T, HW, W, H1, W1,  # H1 = max(H - 1, 1), W1 = max(W - 1, 1)
        ACC: tl.constexpr, BLOCK_P: tl.constexpr, SAMPLES: tl.constexpr,
    ):
        b0, b1, b2, b3, has_b1, has_b2, has_b3 = tu.sample_group(B, SAMPLES)
        offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < HW
        px, py = tu.pixel_xy(offs_p, W, H1, W1, ACC)
        gx0, gy0, gx1, gy1, gx2, gy2, gx3, gy3 = tu.tps_map(px, py, tgt_ptr, par_ptr, b0, b1, b2, b3, T, ACC,
                                                            SAMPLES)
        tu.store_grid(grid_ptr + b0 * HW * 2, offs_p, mask_p, gx0, gy0)
        if SAMPLES > 1:
            tu.store_grid(grid_ptr + b1 * HW * 2, offs_p, mask_p & has_b1, gx1, gy1)
        if SAMPLES > 2:
            tu.store_grid(grid_ptr + b2 * HW * 2, offs_p, mask_p & has_b2, gx2, gy2)
            tu.store_grid(grid_ptr + b3 * HW * 2, offs_p, mask_p & has_b3, gx3, gy3)

    # Backward maths: f(p) = sum_i w_i U_i(p) + a_0 + a_x x + a_y y is linear in the params, so with
    # g(p) = dL/dgrid(p): dL/dw_i = sum_p U_i(p) g(p), dL/da_0 = sum_p g(p), dL/da_x = sum_p x g(p),
    # dL/da_y = sum_p y g(p) (per output coordinate). Each program reduces its pixels (tu.tps_params_grad).
    @triton.jit
    def _tps_grid_bwd_kernel(
        ggrid_ptr,  # (B, H, W, 2) contiguous upstream grad
        tgt_ptr,  # (T, 2) contiguous target fiducials, ACC dtype
        part_ptr,  # (B, programs, T+3, 2) partial dL/dparams, ACC dtype
        B, T, HW, W, H1, W1,
        ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr, SAMPLES: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_p, mask_p, px, py, u = tu.tps_tile(tgt_ptr, T, HW, W, H1, W1, ACC, BLOCK_P, BLOCK_T)
        for s in tl.static_range(SAMPLES):
            b = tl.program_id(1).to(tl.int64) * SAMPLES + s
            if b < B:
                ggx, ggy = tu.load_grid(ggrid_ptr + b * HW * 2, offs_p, mask_p, ACC)  # 0 at masked pixels
                tu.tps_params_grad(px, py, u, ggx, ggy, part_ptr + (b * tl.num_programs(0) + pid) * (T + 3) * 2,
                                   T, BLOCK_T)


# Forward kernels (tu.tps_map): one pixel per thread, 4 warps, up to four samples per program.
MAP_BLOCK_P, MAP_WARPS = 128, 4


def map_launch(hw: int, batch: int, t: int) -> tuple[tuple[int, int], int]:
    """(grid, SAMPLES) of a forward kernel: pixel blocks x groups of SAMPLES samples (tu.sample_group), 4
    when the batch divides by 4, else pairs when batch > 1 (a partial group computes samples it does not
    store: never more than one). Refuses a T over the backward's limit now rather than at the backward
    (the forward has none)."""
    check_fiducial_count(t)
    samples = 4 if batch % 4 == 0 else (2 if batch > 1 else 1)
    return (triton.cdiv(hw, MAP_BLOCK_P), triton.cdiv(batch, samples)), samples


def check_fiducial_count(t: int) -> None:
    if t > tu.MAX_FIDUCIALS:
        raise ValueError(f"TPS kernels keep the basis in registers: T must be <= {tu.MAX_FIDUCIALS}, got {t}")


def tps_blocks(t: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_T, num_warps) for the TPS kernels' basis tile (backward); raises past the
    register-tile limit on T. 128 pixels on 8 warps: 108 registers for the grid's backward on sm_90
    (T = 20, one sample a program); 4 warps doubles that (168)."""
    check_fiducial_count(t)
    block_t = max(tu.next_pow2(t), 2)
    return max(16, min(128, 4096 // block_t)), block_t, 8


def tps_samples(batch: int) -> int:
    """Samples per program of the TPS backward kernels: the radial basis tile (for the params reduction)
    depends only on the pixel and the fixed target points, so one program evaluates it once for up to 4
    samples; 256x256 at batch 8 still launches 1024 programs. (The warp's backward also recomputes each
    sample's map with tu.tps_map, T more logs per sample, to keep its sum over T off the shuffles.)"""
    return min(4, tu.next_pow2(max(batch, 1)))


def tps_launch(hw: int, batch: int, block_p: int) -> tuple[tuple[int, int], int]:
    """(grid, SAMPLES) of a TPS kernel over hw pixels of `batch` samples."""
    samples = tps_samples(batch)
    return (triton.cdiv(hw, block_p), triton.cdiv(batch, samples)), samples


def tps_params(control_points: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """(B, T, 2) -> contiguous (B, T+3, 2) [w; a] = coef @ C in fp32 (fp64 for fp64 control points)."""
    dtype = torch.promote_types(control_points.dtype, torch.float32)
    return (coef.to(dtype) @ control_points.to(dtype)).contiguous()


def tps_params_backward(part: torch.Tensor, coef: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, programs, T+3, 2) partial dL/dparams -> dL/dC (B, T, 2) = coef^T @ sum of the partials."""
    grad_params = part.sum(dim=1)  # (B, T+3, 2)
    return (coef.to(grad_params.dtype).transpose(0, 1) @ grad_params).to(dtype)


def _tps_grid_fwd(params: torch.Tensor, target: torch.Tensor, size: tuple[int, int], out_dtype) -> torch.Tensor:
    """params (B, T+3, 2), target (T, 2), both contiguous in the compute dtype -> grid (B, H, W, 2)."""
    b, t = params.shape[0], target.shape[0]
    h, w = size
    grid = tu.empty_output((b, h, w, 2), device=params.device, dtype=out_dtype)
    if grid.numel() == 0:
        return grid
    tu.check_launch("tps_grid", b, h * w * 2)
    launch, samples = map_launch(h * w, b, t)
    _tps_grid_fwd_kernel[launch](
        par_ptr=params, tgt_ptr=target, grid_ptr=grid, B=b, T=t, HW=h * w, W=w, H1=max(h - 1, 1),
        W1=max(w - 1, 1), ACC=tu.acc_dtype(params), BLOCK_P=MAP_BLOCK_P, SAMPLES=samples, num_warps=MAP_WARPS)
    return grid


def _tps_grid_bwd(grad_grid: torch.Tensor, target: torch.Tensor, coef: torch.Tensor, dtype) -> torch.Tensor:
    """grad_grid (B, H, W, 2) -> dL/dC (B, T, 2) in `dtype`."""
    return tps_params_backward(_tps_grid_partials(grad_grid, target), coef, dtype)


def _tps_grid_partials(grad_grid: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """grad_grid (B, H, W, 2) -> per-program partial dL/dparams (B, programs, T+3, 2) in target's dtype."""
    b, h, w, _ = grad_grid.shape
    t = target.shape[0]
    block_p, block_t, warps = tps_blocks(t)
    launch, samples = tps_launch(h * w, b, block_p)
    part = tu.empty_output((b, launch[0], t + 3, 2), device=grad_grid.device, dtype=target.dtype)
    if grad_grid.numel() > 0:
        _tps_grid_bwd_kernel[launch](
            ggrid_ptr=grad_grid.contiguous(), tgt_ptr=target, part_ptr=part, B=b, T=t, HW=h * w, W=w,
            H1=max(h - 1, 1), W1=max(w - 1, 1), ACC=tu.acc_dtype(target), BLOCK_P=block_p, BLOCK_T=block_t,
            SAMPLES=samples, num_warps=warps)
    return part


class TpsGridFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, control_points: torch.Tensor, target_points: torch.Tensor, coef: torch.Tensor,
                size: tuple[int, int]) -> torch.Tensor:
        params = tps_params(control_points, coef)  # (B, T+3, 2)
        target = target_points.to(params.dtype).contiguous()  # (T, 2)
        ctx.save_for_backward(target, coef)
        ctx.control_dtype = control_points.dtype
        return _tps_grid_fwd(params, target, size, control_points.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_grid: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        target, coef = ctx.saved_tensors
        return _tps_grid_bwd(grad_grid, target, coef, ctx.control_dtype), None, None, None


# The kernels as custom ops, for torch.compile (see grid_sample.py). The params = coef @ C step stays in
# the traced graph (autograd differentiates it); the ops map params -> grid and dL/dgrid -> dL/dparams.
@torch.library.custom_op("ostnet::tps_grid", mutates_args=())
def _tps_grid_op(params: torch.Tensor, target: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    return _tps_grid_fwd(params, target, (h, w), dtype)


@_tps_grid_op.register_fake
def _(params, target, h, w, dtype):
    return params.new_empty((params.shape[0], h, w, 2), dtype=dtype)


@torch.library.custom_op("ostnet::tps_grid_backward", mutates_args=())
def _tps_grid_backward_op(grad_grid: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _tps_grid_partials(grad_grid, target).sum(dim=1)


@_tps_grid_backward_op.register_fake
def _(grad_grid, target):
    return target.new_empty((grad_grid.shape[0], target.shape[0] + 3, 2))


def _tps_grid_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _tps_grid_backward(ctx, grad_grid):
    (target,) = ctx.saved_tensors
    grad_params = _tps_grid_backward_op(grad_grid, target) if ctx.needs_input_grad[0] else None
    return grad_params, None, None, None, None


_tps_grid_op.register_autograd(_tps_grid_backward, setup_context=_tps_grid_setup)


def tps_grid(control_points: torch.Tensor, target_points: torch.Tensor, coef: torch.Tensor,
             size: tuple[int, int], impl: str = "auto") -> torch.Tensor:
    check_tps_args(control_points, target_points, coef)
    if use_triton("tps_grid", impl, control_points):
        if torch.compiler.is_compiling():
            params = tps_params(control_points, coef)
            return _tps_grid_op(params, target_points.to(params.dtype).contiguous(), int(size[0]), int(size[1]),
                                control_points.dtype)
        return TpsGridFn.apply(control_points, target_points, coef, tuple(size))
    return tps_grid_reference(control_points, target_points, coef, size)
