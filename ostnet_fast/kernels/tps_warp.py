"""TPS warp: image + control points -> warped image (the grid is never written to memory when fused).

Convention: see tps_grid.py (TPS map, control vs target points) and grid_sample.py (bilinear, zeros
padding, align_corners=True).

Triton path (what is fused, and the design limits):
- forward, ONE kernel: a program owns BLOCK_P output pixels (one a thread) of up to four samples,
  evaluates their TPS maps in registers with one radial basis (`tu.tps_map`, one fast log a fiducial:
  `tu.FAST_LOG`; params = coef @ C precomputed in torch, tiny: a Triton kernel for it measured 2 us slower
  than torch's cast + batched matmul on the H200, and computing them in the warp kernel's programs doubled
  its time), then samples each image bilinearly, looping over channels with the tap weights computed once
  (the same device functions as grid_sample, `_triton_utils`). No grid tensor is written or read.
- backward, ONE kernel, flags for the grads that are needed: the grid is recomputed in registers
  (`tu.tps_map` per sample; the (BLOCK_P, BLOCK_T) basis tile, shared by up to 4 samples, serves the
  params reduction); image grad is scattered with fp32 atomics into a zero-filled buffer as in
  grid_sample's backward (see its header for why atomics and why contention stays low); the grid grad
  of each pixel is reduced over channels in registers and chained straight into the TPS params
  reduction (dL/dw_i = sum_p U_i(p) g(p), affine rows likewise), written per program to a
  (B, programs, T+3, 2) partial buffer (no atomics) that torch sums; dL/dC = coef^T @ dL/dparams.
  Target points and coef are constants: no grad.
- NCHW and channels-last images (output in the image's memory format and dtype); maths in fp32 (fp64 when
  the image or the control points are fp64). The reference rounds the grid to the control points' and
  then the image's dtype; the fused path keeps it in fp32, so fp16/bf16 results differ by that rounding.
- limits: T <= 128, C * H * W of one sample < 2**31, B <= 65535; not twice differentiable.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import _triton_utils as tu
from ._dispatch import use_triton
from .grid_sample import grid_sample_reference
from .tps_grid import (MAP_BLOCK_P, MAP_WARPS, check_tps_args, map_launch, tps_blocks, tps_grid_reference, tps_launch,
                       tps_params, tps_params_backward)

if tu.HAS_TRITON:
    import triton
    import triton.language as tl


def tps_warp_reference(image: torch.Tensor, control_points: torch.Tensor, target_points: torch.Tensor,
                       coef: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """image (B, C, H_in, W_in) -> (B, C, H, W); size defaults to the input's."""
    size = tuple(image.shape[-2:]) if size is None else size
    grid = tps_grid_reference(control_points, target_points, coef, size)
    return grid_sample_reference(image, grid)


if tu.HAS_TRITON:

    @triton.jit
    def _sample(img_ptr, out_ptr, gx, gy, C, H_in, W_in, s_c, s_h, s_w, o_c, o_p, offs_p, mask_p,
                ACC: tl.constexpr, BLOCK_C: tl.constexpr):
        """One sample's output pixels: bilinear taps at (gx, gy), all channels."""
        off00, off01, off10, off11, m00, m01, m10, m11, wx1, wy1 = tu.bilinear_taps(
            gx, gy, H_in, W_in, mask_p, s_h, s_w)
        tu.sample_fwd_channels(img_ptr, out_ptr, C, s_c, o_c, o_p, offs_p, mask_p,
                               off00, off01, off10, off11, m00, m01, m10, m11, wx1, wy1, ACC=ACC, BLOCK_C=BLOCK_C)

    @triton.jit
    def _tps_warp_fwd_kernel(
        img_ptr,  # (B, C, H_in, W_in) image, NCHW or channels-last
        par_ptr,  # (B, T+3, 2) contiguous TPS params [w; a], ACC dtype
        tgt_ptr,  # (T, 2) contiguous target fiducials, ACC dtype
        out_ptr,  # (B, C, H, W) output, the image's memory format and dtype
        B, C, H_in, W_in, T, HW, W, H1, W1,  # H1 = max(H - 1, 1), W1 = max(W - 1, 1)
        s_b, s_c, s_h, s_w,  # image strides
        o_b, o_c, o_p,  # output strides of a sample, a channel, a flat pixel h * W + w
        CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
        SAMPLES: tl.constexpr,
    ):
        if CHANNELS_LAST:
            s_c = 1
            o_c = 1
        else:
            s_w = 1
            o_p = 1
        b0, b1, b2, b3, has_b1, has_b2, has_b3 = tu.sample_group(B, SAMPLES)
        offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < HW
        px, py = tu.pixel_xy(offs_p, W, H1, W1, ACC)
        gx0, gy0, gx1, gy1, gx2, gy2, gx3, gy3 = tu.tps_map(px, py, tgt_ptr, par_ptr, b0, b1, b2, b3, T, ACC,
                                                            SAMPLES)
        _sample(img_ptr + b0 * s_b, out_ptr + b0 * o_b, gx0, gy0, C, H_in, W_in, s_c, s_h, s_w, o_c, o_p,
                offs_p, mask_p, ACC, BLOCK_C)
        if SAMPLES > 1:
            _sample(img_ptr + b1 * s_b, out_ptr + b1 * o_b, gx1, gy1, C, H_in, W_in, s_c, s_h, s_w, o_c, o_p,
                    offs_p, mask_p & has_b1, ACC, BLOCK_C)
        if SAMPLES > 2:
            _sample(img_ptr + b2 * s_b, out_ptr + b2 * o_b, gx2, gy2, C, H_in, W_in, s_c, s_h, s_w, o_c, o_p,
                    offs_p, mask_p & has_b2, ACC, BLOCK_C)
            _sample(img_ptr + b3 * s_b, out_ptr + b3 * o_b, gx3, gy3, C, H_in, W_in, s_c, s_h, s_w, o_c, o_p,
                    offs_p, mask_p & has_b3, ACC, BLOCK_C)

    # Backward maths: out(p) = bilinear(image, f(p)), f = TPS map linear in params.
    #   dL/dgrid(p) = (dL/dix * (W_in - 1) / 2, dL/diy * (H_in - 1) / 2)   (tu.sample_bwd_channels)
    #   dL/dparams = sum_p [U_1(p) .. U_T(p), 1, x, y]^T dL/dgrid(p)         (tu.tps_params_grad)
    # The grid grad never leaves registers; masked pixels carry 0.
    @triton.jit
    def _tps_warp_bwd_kernel(
        img_ptr,  # (B, C, H_in, W_in) saved image
        par_ptr,  # (B, T+3, 2) contiguous params, ACC dtype
        tgt_ptr,  # (T, 2) contiguous target fiducials, ACC dtype
        gout_ptr,  # (B, C, H, W) upstream grad, the image's memory format
        gin_ptr,  # (B, C, H_in, W_in) fp32/fp64 zero-filled image grad, the image's strides
        part_ptr,  # (B, programs, T+3, 2) partial dL/dparams, ACC dtype
        B, C, H_in, W_in, T, HW, W, H1, W1,
        s_b, s_c, s_h, s_w,  # image (and gin) strides
        g_b, g_c, g_p,  # upstream grad strides
        CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_C: tl.constexpr, NEED_INPUT_GRAD: tl.constexpr, NEED_GRID_GRAD: tl.constexpr,
        SAMPLES: tl.constexpr,
    ):
        if CHANNELS_LAST:
            s_c = 1
            g_c = 1
        else:
            s_w = 1
            g_p = 1
        pid = tl.program_id(0)
        offs_p, mask_p, px, py, u = tu.tps_tile(tgt_ptr, T, HW, W, H1, W1, ACC, BLOCK_P, BLOCK_T)
        for s in tl.static_range(SAMPLES):
            b = tl.program_id(1).to(tl.int64) * SAMPLES + s
            if b < B:
                gx, gy, _, _, _, _, _, _ = tu.tps_map(px, py, tgt_ptr, par_ptr, b, b, b, b, T, ACC, 1)
                off00, off01, off10, off11, m00, m01, m10, m11, wx1, wy1 = tu.bilinear_taps(
                    gx, gy, H_in, W_in, mask_p, s_h, s_w)
                dix, diy = tu.sample_bwd_channels(
                    img_ptr + b * s_b, gout_ptr + b * g_b, gin_ptr + b * s_b, C, s_c, g_c, g_p, offs_p, mask_p,
                    off00, off01, off10, off11, m00, m01, m10, m11, wx1, wy1, ACC=ACC, BLOCK_C=BLOCK_C,
                    NEED_INPUT_GRAD=NEED_INPUT_GRAD, NEED_GRID_GRAD=NEED_GRID_GRAD, GIN_PIXEL_STRIDE=0)
                if NEED_GRID_GRAD:
                    ggx = tl.where(mask_p, dix * (0.5 * (W_in - 1)), 0.0)
                    ggy = tl.where(mask_p, diy * (0.5 * (H_in - 1)), 0.0)
                    tu.tps_params_grad(px, py, u, ggx, ggy,
                                       part_ptr + (b * tl.num_programs(0) + pid) * (T + 3) * 2, T, BLOCK_T)


def _warp_blocks(channels: int, channels_last: bool, backward: bool, fp64: bool) -> tuple[int, int]:
    """(BLOCK_C, num_warps of the backward; the forward runs MAP_WARPS). From sm_90 SASS compiled offline
    with the launches' own specialisations (`bench/sass_report.py`; T = 20, not timed):
    - forward: one pixel per thread for the map, so a chunk of channels that the loads would vectorise
      along pixels (NCHW) forces layout conversions: NCHW chunk 4 took 109 registers and 47 barriers,
      chunk 1 takes 40 and none. Channels-last: chunk 2 for an even C (64 registers; chunk 16 took 255),
      else 1 (the model's RGB, 38).
    - backward: NCHW C = 3 chunk 1 (64 registers); channels-last chunk 4 when C % 4 == 0 (126; 16 took
      255), else 1 (58).
    float64 (tests only) takes a chunk of at least 4: Triton 3.6 fails to compile the fp64 image-only
    backward with a chunk of 1 (RemoveLayoutConversions: "operand does not dominate this use")."""
    if channels_last:
        block_c = (4 if channels % 4 == 0 else 1) if backward else (2 if channels % 2 == 0 else 1)
    elif backward:
        block_c = 1 if channels <= 4 else 4
    else:
        block_c = 1
    return (max(block_c, 4) if fp64 else block_c), 8


def _launch_args(image: torch.Tensor, t: int, size: tuple[int, int], backward: bool, fp64: bool):
    b, c, h_in, w_in = image.shape
    h, w = size
    cl = tu.is_channels_last(image)
    block_c, warps = _warp_blocks(c, cl, backward, fp64)
    common = dict(B=b, C=c, H_in=h_in, W_in=w_in, T=t, HW=h * w, W=w, H1=max(h - 1, 1), W1=max(w - 1, 1),
                  s_b=image.stride(0), s_c=image.stride(1), s_h=image.stride(2), s_w=image.stride(3),
                  CHANNELS_LAST=cl, BLOCK_C=block_c)
    if not backward:  # tu.tps_map: one pixel per thread, groups of up to four samples
        launch, samples = map_launch(h * w, b, t)
        common.update(BLOCK_P=MAP_BLOCK_P, SAMPLES=samples, num_warps=MAP_WARPS)
        return cl, launch, common
    block_p, block_t, _ = tps_blocks(t)
    launch, samples = tps_launch(h * w, b, block_p)
    common.update(BLOCK_P=block_p, BLOCK_T=block_t, SAMPLES=samples, num_warps=warps)
    return cl, launch, common


def _tps_warp_fwd(image: torch.Tensor, params: torch.Tensor, target: torch.Tensor,
                  size: tuple[int, int]) -> torch.Tensor:
    """image (B, C, H_in, W_in) dense, params (B, T+3, 2), target (T, 2) -> (B, C, H, W)."""
    b, c = image.shape[:2]
    h, w = size
    cl, launch, common = _launch_args(image, target.shape[0], size, backward=False,
                                      fp64=params.dtype == torch.float64)
    out = tu.empty_output((b, c, h, w), device=image.device, dtype=image.dtype,
                          memory_format=tu.memory_format(cl))
    if out.numel() == 0:
        return out
    _tps_warp_fwd_kernel[launch](
        img_ptr=image, par_ptr=params, tgt_ptr=target, out_ptr=out,
        o_b=out.stride(0), o_c=out.stride(1), o_p=tu.pixel_stride(out), ACC=tu.acc_dtype(params), **common)
    return out


def _tps_warp_bwd(grad_out: torch.Tensor, image: torch.Tensor, params: torch.Tensor, target: torch.Tensor,
                  need_image: bool, need_grid: bool):
    """-> (dL/dimage or None, partial dL/dparams (B, programs, T+3, 2) or None)."""
    b, c, h, w = grad_out.shape
    t = target.shape[0]
    cl, launch, common = _launch_args(image, t, (h, w), backward=True, fp64=params.dtype == torch.float64)
    grad_out = grad_out.contiguous(memory_format=tu.memory_format(cl))
    # fp32 (fp64 in fp64 mode) accumulation buffer; zeros_like keeps the image's strides exactly.
    gin = torch.zeros_like(image, dtype=params.dtype) if need_image else None
    part = (tu.empty_output((b, launch[0], t + 3, 2), device=image.device, dtype=params.dtype)
            if need_grid else None)
    if grad_out.numel() > 0:
        _tps_warp_bwd_kernel[launch](
            img_ptr=image, par_ptr=params, tgt_ptr=target, gout_ptr=grad_out,
            gin_ptr=gin if need_image else image, part_ptr=part if need_grid else params,
            g_b=grad_out.stride(0), g_c=grad_out.stride(1), g_p=tu.pixel_stride(grad_out),
            ACC=tu.acc_dtype(params), NEED_INPUT_GRAD=need_image, NEED_GRID_GRAD=need_grid, **common)
    if gin is not None and gin.dtype != image.dtype:
        gin = gin.to(image.dtype)
    return gin, part


def _prepare(image, control_points, target_points, coef, size):
    """-> (dense image, params (B, T+3, 2), target (T, 2)) in the kernels' working precision."""
    if not image.is_floating_point():
        raise TypeError(f"tps_warp: floating-point image expected, got {image.dtype}")
    b, c, h_in, w_in = image.shape
    tu.check_launch("tps_warp", b, max(c * h_in * w_in, c * size[0] * size[1]))
    work = torch.float64 if torch.float64 in (image.dtype, control_points.dtype) else torch.float32
    params = tps_params(control_points.to(work), coef)
    return tu.dense_4d(image), params, target_points.to(work).contiguous()


class TpsWarpFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image: torch.Tensor, control_points: torch.Tensor, target_points: torch.Tensor,
                coef: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        image, params, target = _prepare(image, control_points, target_points, coef, size)
        ctx.save_for_backward(image, params, target, coef)
        ctx.control_dtype = control_points.dtype
        return _tps_warp_fwd(image, params, target, size)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        image, params, target, coef = ctx.saved_tensors
        need_image, need_grid = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_image or need_grid):
            return None, None, None, None, None
        gin, part = _tps_warp_bwd(grad_out, image, params, target, need_image, need_grid)
        grad_c = tps_params_backward(part, coef, ctx.control_dtype) if need_grid else None
        return gin, grad_c, None, None, None


# The kernels as custom ops, for torch.compile (see grid_sample.py); params = coef @ C stays in the traced
# graph, the ops map (image, params) -> warped and back.
@torch.library.custom_op("ostnet::tps_warp", mutates_args=())
def _tps_warp_op(image: torch.Tensor, params: torch.Tensor, target: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return _tps_warp_fwd(image, params, target, (h, w))


@_tps_warp_op.register_fake
def _(image, params, target, h, w):
    return torch.empty((*image.shape[:2], h, w), device=image.device, dtype=image.dtype,
                       memory_format=tu.memory_format(tu.is_channels_last(image)))


@torch.library.custom_op("ostnet::tps_warp_backward", mutates_args=())
def _tps_warp_backward_op(grad_out: torch.Tensor, image: torch.Tensor, params: torch.Tensor, target: torch.Tensor,
                          need_image: bool, need_params: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gin, part = _tps_warp_bwd(grad_out, image, params, target, need_image, need_params)
    return (image.new_empty(0) if gin is None else gin), (params.new_empty(0) if part is None else part.sum(dim=1))


@_tps_warp_backward_op.register_fake
def _(grad_out, image, params, target, need_image, need_params):
    return (torch.empty_like(image) if need_image else image.new_empty(0),
            params.new_empty(params.shape) if need_params else params.new_empty(0))


def _tps_warp_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])


def _tps_warp_backward(ctx, grad_out):
    image, params, target = ctx.saved_tensors
    need_image, need_params = ctx.needs_input_grad[:2]
    gin, grad_params = _tps_warp_backward_op(grad_out, image, params, target, need_image, need_params)
    return (gin if need_image else None), (grad_params if need_params else None), None, None, None


_tps_warp_op.register_autograd(_tps_warp_backward, setup_context=_tps_warp_setup)


def tps_warp(image: torch.Tensor, control_points: torch.Tensor, target_points: torch.Tensor,
             coef: torch.Tensor, size: tuple[int, int] | None = None, impl: str = "auto") -> torch.Tensor:
    check_tps_args(control_points, target_points, coef)
    if image.dim() != 4 or image.shape[0] != control_points.shape[0]:
        raise ValueError(f"tps_warp: image must be (B, C, H, W) with B = {control_points.shape[0]}, "
                         f"got {tuple(image.shape)}")
    if use_triton("tps_warp", impl, image, control_points):
        size = tuple(image.shape[-2:]) if size is None else tuple(size)
        if torch.compiler.is_compiling():
            image, params, target = _prepare(image, control_points, target_points, coef, size)
            return _tps_warp_op(image, params, target, int(size[0]), int(size[1]))
        return TpsWarpFn.apply(image, control_points, target_points, coef, size)
    return tps_warp_reference(image, control_points, target_points, coef, size)
