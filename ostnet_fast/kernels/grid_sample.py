"""Bilinear grid_sample, zeros padding, align_corners=True.

Convention (the whole package): grids hold (x, y) in [-1, 1], x along width; -1 and +1 are the centres of
the corner pixels (align_corners=True, FOMM's convention). Sample points outside the image read zeros.

Triton path (what is fused, and the design limits):
- forward: one program owns BLOCK_P output pixels of one sample; it reads their grid points once, computes
  the 4 tap addresses and weights once, then loops over the channels BLOCK_C at a time. NCHW and
  channels-last inputs are read in place (strides passed, the unit stride a constexpr so channels-last
  loads are vectorised along C); the output has the input's memory format and dtype; maths in fp32
  (fp64 for fp64 inputs, which the CPU tests use).
- backward, one kernel, flags for the grads that are needed (ctx.needs_input_grad):
  grid grad: each output pixel owns its (x, y) gradient, reduced over channels in registers, no atomics.
  input grad: a scatter (any grid may map many outputs to one input pixel), done with fp32 atomics
  (`sem="relaxed"`) into a zero-filled fp32 buffer, cast to the input dtype at the end (no cast when the
  input is fp32). Contention is low by construction: a program handles a tile of output pixels and loops
  over channels, so the weights are computed once per pixel and each atomic is one (pixel, channel) pair;
  neighbouring outputs usually hit neighbouring inputs, at most ~4 writers per input element for smooth
  warps. A gather formulation would need the inverse map (not available for an arbitrary grid), so it was
  not an option; the result is not bitwise deterministic (fp32 add order).
  Layouts: the buffer has a channels-last input's strides. An NCHW input puts a tap's channels in planes
  H_in * W_in apart, one sector of memory traffic per (tap, channel) for its gathers and its atomics, so
  the backward reads the upstream grad as it comes and, from CHANNELS_LAST_BWD_FROM channels (a multiple of
  16), runs on a channels-last copy of the input, its grad copied back to NCHW; else it scatters into a
  channels-last scratch padded to whole channel blocks (a tap's channels in one sector) and copies that
  to NCHW with the cast. H200, batch 8, random grids, forward + backward against F.grid_sample, fp32
  (bench/results/h200-2026-12-01-s12/kernels_*.json, same-run ratios): 256x64x64 NCHW 1.41x with the
  scratch alone, 2.07x with the channels-last copy (backward alone ~2.3x); 3-channel images 1.2x.
- limits: C * H_in * W_in and H * W * 2 of one sample below 2**31 (int32 offsets), B <= 65535; the
  grid is made contiguous; an input that is neither NCHW- nor channels-last-dense is copied to NCHW.
  The fp16/bf16 path computes coordinates from the grid in fp32 (the reference first rounds the grid to
  the input dtype, so low-precision results differ from it by that rounding, not by our arithmetic).
  Not twice differentiable (backward is once_differentiable).
- NCHW fp32 images of 1-4 channels take the optional CUDA C++ extension where it is built (cuda_ext.py,
  csrc/ext/grid_sample_small_c.cu): a channels-last copy padded to 4 channels, one float4 gather and one
  float4 atomic per tap. Eagerly, when a backward is to come, the copy is made once in the forward and
  saved for the backward (4/C times the input's size, 4/3 for images, held as long as the autograd graph),
  and when the input grad is wanted the forward kernel also zeroes its packed scratch (as large again),
  which saves the backward a fill and a launch; the custom ops (torch.compile) make both in the backward.
  A forward with no backward to come gathers from the NCHW planes. Images whose backward fits in one
  block's shared memory (the image and its grad's sums: 64x64 with 3 channels is 96 KB), in batches of at
  least cuda_ext.SHARED_MIN_SAMPLES, take its shared-memory kernels instead: one block per sample, no copy,
  the input grad summed with shared-memory atomics.
  Where the extension is not built, or has no code for the GPU, these inputs take Triton.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _triton_utils as tu
from . import cuda_ext
from ._dispatch import use_triton

if tu.HAS_TRITON:
    import triton
    import triton.language as tl


def grid_sample_reference(input: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """input (B, C, H_in, W_in), grid (B, H, W, 2) -> (B, C, H, W)."""
    return F.grid_sample(input, grid.to(input.dtype), mode="bilinear", padding_mode="zeros",
                         align_corners=True)


if tu.HAS_TRITON:

    @triton.jit
    def _grid_sample_fwd_kernel(
        in_ptr,  # (B, C, H_in, W_in) input, NCHW or channels-last
        grid_ptr,  # (B, H, W, 2) contiguous grid, (x, y) in [-1, 1]
        out_ptr,  # (B, C, H, W) output, the input's memory format and dtype
        C, H_in, W_in, HW,  # HW = H * W output pixels per sample
        s_b, s_c, s_h, s_w,  # input strides
        o_b, o_c, o_p,  # output strides of a sample, a channel, a flat pixel h * W + w
        CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        if CHANNELS_LAST:
            s_c = 1
            o_c = 1
        else:
            s_w = 1
            o_p = 1
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < HW
        gx, gy = tu.load_grid(grid_ptr + b * HW * 2, offs_p, mask_p, ACC)
        off00, off01, off10, off11, m00, m01, m10, m11, wx1, wy1 = tu.bilinear_taps(
            gx, gy, H_in, W_in, mask_p, s_h, s_w)
        tu.sample_fwd_channels(in_ptr + b * s_b, out_ptr + b * o_b, C, s_c, o_c, o_p, offs_p, mask_p,
                               off00, off01, off10, off11, m00, m01, m10, m11, wx1, wy1,
                               ACC=ACC, BLOCK_C=BLOCK_C)

    # Backward maths (derived in _triton_utils.sample_bwd_channels): with ix = (gx + 1) / 2 * (W_in - 1),
    #   dL/dgx = dL/dix * (W_in - 1) / 2,   dL/dgy = dL/diy * (H_in - 1) / 2,
    # dL/dix = sum_c g_c (wy0 (v01 - v00) + wy1 (v11 - v10)); input grad scattered with the tap weights.
    @triton.jit
    def _grid_sample_bwd_kernel(
        in_ptr,  # (B, C, H_in, W_in) saved input
        grid_ptr,  # (B, H, W, 2) contiguous saved grid
        gout_ptr,  # (B, C, H, W) upstream grad, the input's memory format
        gin_ptr,  # fp32/fp64 zero-filled input grad: the input's strides, or (B, H_in, W_in, GIN_PIXEL_STRIDE)
        ggrid_ptr,  # (B, H, W, 2) grid grad, the grid's dtype
        C, H_in, W_in, HW,
        s_b, s_c, s_h, s_w,  # input strides (and gin's, if GIN_PIXEL_STRIDE == 0)
        gin_b,  # gin's sample stride
        g_b, g_c, g_p,  # upstream grad strides of a sample, a channel, a flat pixel
        CHANNELS_LAST: tl.constexpr, GRAD_CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr, NEED_INPUT_GRAD: tl.constexpr, NEED_GRID_GRAD: tl.constexpr,
        GIN_PIXEL_STRIDE: tl.constexpr,
    ):
        if CHANNELS_LAST:
            s_c = 1
        else:
            s_w = 1
        if GRAD_CHANNELS_LAST:  # the upstream grad is read in its own layout (NCHW or channels-last)
            g_c = 1
        else:
            g_p = 1
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < HW
        gx, gy = tu.load_grid(grid_ptr + b * HW * 2, offs_p, mask_p, ACC)
        off00, off01, off10, off11, m00, m01, m10, m11, wx1, wy1 = tu.bilinear_taps(
            gx, gy, H_in, W_in, mask_p, s_h, s_w)
        dix, diy = tu.sample_bwd_channels(in_ptr + b * s_b, gout_ptr + b * g_b, gin_ptr + b * gin_b, C, s_c, g_c,
                                          g_p, offs_p, mask_p, off00, off01, off10, off11, m00, m01, m10, m11,
                                          wx1, wy1, ACC=ACC, BLOCK_C=BLOCK_C, NEED_INPUT_GRAD=NEED_INPUT_GRAD,
                                          NEED_GRID_GRAD=NEED_GRID_GRAD, GIN_PIXEL_STRIDE=GIN_PIXEL_STRIDE)
        if NEED_GRID_GRAD:
            tu.store_grid(ggrid_ptr + b * HW * 2, offs_p, mask_p, dix * (0.5 * (W_in - 1)), diy * (0.5 * (H_in - 1)))


def _prepare(input: torch.Tensor, grid: torch.Tensor):
    if not input.is_floating_point() or not grid.is_floating_point():
        raise TypeError(f"grid_sample: floating-point input and grid expected, got {input.dtype} and {grid.dtype}")
    if input.device != grid.device:
        raise ValueError(f"grid_sample: input on {input.device} but grid on {grid.device}")
    b, c, h_in, w_in = input.shape
    _, h, w, _ = grid.shape
    tu.check_launch("grid_sample", b, max(c * h_in * w_in, c * h * w, h * w * 2))
    return tu.dense_4d(input), grid.contiguous()


def _grid_sample_fwd(input: torch.Tensor, grid: torch.Tensor, kernels: str | None) -> torch.Tensor:
    """input (B, C, H_in, W_in) NCHW/channels-last, grid (B, H, W, 2) contiguous -> (B, C, H, W); kernels:
    cuda_ext.grid_sample_kernels(input, grid), asked once per call by the caller."""
    if kernels == "shared":
        return cuda_ext.grid_sample_shared_forward(input, grid)
    if kernels == "packed":  # no backward to come (GridSampleFn packs for one): from the NCHW planes
        return cuda_ext.grid_sample_forward(input, grid)
    b, c, h_in, w_in = input.shape
    _, h, w, _ = grid.shape
    cl = tu.is_channels_last(input)
    out = tu.empty_output((b, c, h, w), device=input.device, dtype=input.dtype,
                          memory_format=tu.memory_format(cl))
    if out.numel() == 0:
        return out
    block_p, block_c, warps = tu.sample_blocks(c, cl)
    launch = (triton.cdiv(h * w, block_p), b)
    _grid_sample_fwd_kernel[launch](
        in_ptr=input, grid_ptr=grid, out_ptr=out, C=c, H_in=h_in, W_in=w_in, HW=h * w,
        s_b=input.stride(0), s_c=input.stride(1), s_h=input.stride(2), s_w=input.stride(3),
        o_b=out.stride(0), o_c=out.stride(1), o_p=tu.pixel_stride(out),
        CHANNELS_LAST=cl, ACC=tu.acc_dtype(input), BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps)
    return out


# From this many channels (a multiple of 16) an NCHW backward runs on a channels-last copy (_grid_sample_bwd).
CHANNELS_LAST_BWD_FROM = 16


def _grid_sample_bwd(grad_out: torch.Tensor, input: torch.Tensor, grid: torch.Tensor, need_input: bool,
                     need_grid: bool, kernels: str | None):
    """-> (grad_input or None, grad_grid or None); kernels as _grid_sample_fwd's."""
    if kernels == "shared":
        return cuda_ext.grid_sample_shared_backward(grad_out, input, grid, need_input, need_grid)
    if kernels == "packed":
        return cuda_ext.grid_sample_backward(grad_out, cuda_ext.grid_sample_pack(input), grid, need_input, need_grid)
    b, c, h_in, w_in = input.shape
    _, h, w, _ = grid.shape
    cl = tu.is_channels_last(input)
    if not cl and c >= CHANNELS_LAST_BWD_FROM and c % 16 == 0:
        # NCHW with many channels: the backward's gathers and scatters, a few per (pixel, channel), land on
        # C planes far apart; a channels-last copy of the input puts a tap's channels side by side, and two
        # transposing copies (the input in, its grad out) cost less than the scattered traffic they save.
        # The upstream grad is read as it is (NCHW: along the pixels, coalesced). C % 16 == 0: the
        # channels-last kernel's aligned tiles (tu.sample_blocks), the case measured (256 and 512 channels).
        copy = input.contiguous(memory_format=torch.channels_last)
        if tu.is_channels_last(copy):  # not for 1x1 or empty maps, where both layouts are the same
            gin, ggrid = _grid_sample_bwd(grad_out, copy, grid, need_input, need_grid, None)  # (not NCHW: Triton)
            return (gin.contiguous() if gin is not None else None), ggrid
    grad_out = tu.dense_4d(grad_out)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    ggrid = tu.empty_output(grid.shape, device=grid.device, dtype=grid.dtype) if need_grid else None
    if grad_out.numel() == 0:
        if ggrid is not None:
            ggrid.zero_()
        return (torch.zeros_like(input) if need_input else None), ggrid
    block_p, block_c, warps = tu.sample_blocks(c, cl)
    # An NCHW input's grad is scattered into a channels-last scratch first (padded to whole channel blocks),
    # then copied to NCHW with the cast: a pixel's channels are then neighbours, so each thread's atomics
    # for one tap go out as vectors and a warp's fall in a few sectors, where NCHW spreads every channel of
    # a tap over its own plane (module docstring).
    scratch = need_input and not cl
    pixel_stride = triton.cdiv(c, block_c) * block_c if scratch else 0
    if scratch:
        tu.check_launch("grid_sample", b, h_in * w_in * pixel_stride)
        gin = torch.zeros(b, h_in, w_in, pixel_stride, device=input.device, dtype=acc)
    else:  # zeros_like keeps the strides of a dense input exactly, so gin shares the input's strides
        gin = torch.zeros_like(input, dtype=acc) if need_input else None
    launch = (triton.cdiv(h * w, block_p), b)
    _grid_sample_bwd_kernel[launch](
        in_ptr=input, grid_ptr=grid, gout_ptr=grad_out, gin_ptr=gin if need_input else input,
        ggrid_ptr=ggrid if need_grid else grid, C=c, H_in=h_in, W_in=w_in, HW=h * w,
        s_b=input.stride(0), s_c=input.stride(1), s_h=input.stride(2), s_w=input.stride(3),
        gin_b=gin.stride(0) if need_input else 0,
        g_b=grad_out.stride(0), g_c=grad_out.stride(1), g_p=tu.pixel_stride(grad_out),
        CHANNELS_LAST=cl, GRAD_CHANNELS_LAST=tu.is_channels_last(grad_out), ACC=tu.acc_dtype(input),
        BLOCK_P=block_p, BLOCK_C=block_c, NEED_INPUT_GRAD=need_input, NEED_GRID_GRAD=need_grid,
        GIN_PIXEL_STRIDE=pixel_stride, num_warps=warps)
    if scratch:
        out = torch.empty_like(input)  # NCHW, the input's dtype: the copy transposes and casts in one pass
        out.copy_(gin[..., :c].permute(0, 3, 1, 2))
        gin = out
    elif gin is not None and gin.dtype != input.dtype:
        gin = gin.to(input.dtype)
    return gin, ggrid


class GridSampleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        input, grid = _prepare(input, grid)
        # grid_sample() applies this Function only when a grad is wanted (without one it calls _grid_sample_fwd)
        ctx.kernels = cuda_ext.grid_sample_kernels(input, grid)
        if ctx.kernels == "packed":  # the extension's packed copy serves the forward and is kept for the backward
            packed = cuda_ext.grid_sample_pack(input)
            # the input grad's scratch, zeroed by the forward kernel; spent by the first backward
            scratch = torch.empty_like(packed) if ctx.needs_input_grad[0] else None
            ctx.scratch_fresh = scratch is not None
            ctx.save_for_backward(packed, grid, scratch)
            return cuda_ext.grid_sample_packed_forward(packed, grid, input.shape[1], scratch)
        ctx.save_for_backward(input, grid)  # (the shared-memory kernels take the input itself)
        return _grid_sample_fwd(input, grid, ctx.kernels)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        saved, grid, *scratch = ctx.saved_tensors
        need_input, need_grid = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_input or need_grid):
            return None, None
        if ctx.kernels == "packed":
            # a second backward (retain_graph=True) finds the scratch holding the first one's sums: a fresh one
            fresh, ctx.scratch_fresh = ctx.scratch_fresh, False
            return cuda_ext.grid_sample_backward(grad_out, saved, grid, need_input, need_grid,
                                                 scratch[0] if fresh else None)
        return _grid_sample_bwd(grad_out, saved, grid, need_input, need_grid, ctx.kernels)


# The same kernels as custom ops, for torch.compile: opaque to dynamo, so inductor compiles the code around
# them (GridSampleFn's Python launch code cannot be traced). Eager calls take GridSampleFn (less overhead).
@torch.library.custom_op("ostnet::grid_sample", mutates_args=())
def _grid_sample_op(input: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return _grid_sample_fwd(input, grid, cuda_ext.grid_sample_kernels(input, grid))


@_grid_sample_op.register_fake
def _(input, grid):
    return torch.empty((*input.shape[:2], *grid.shape[1:3]), device=input.device, dtype=input.dtype,
                       memory_format=tu.memory_format(tu.is_channels_last(input)))


@torch.library.custom_op("ostnet::grid_sample_backward", mutates_args=())
def _grid_sample_backward_op(grad_out: torch.Tensor, input: torch.Tensor, grid: torch.Tensor, need_input: bool,
                             need_grid: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gin, ggrid = _grid_sample_bwd(grad_out, input, grid, need_input, need_grid,
                                  cuda_ext.grid_sample_kernels(input, grid))
    return (input.new_empty(0) if gin is None else gin), (grid.new_empty(0) if ggrid is None else ggrid)


@_grid_sample_backward_op.register_fake
def _(grad_out, input, grid, need_input, need_grid):
    return (torch.empty_like(input) if need_input else input.new_empty(0),
            torch.empty_like(grid) if need_grid else grid.new_empty(0))


def _grid_sample_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grid_sample_backward(ctx, grad_out):
    input, grid = ctx.saved_tensors
    need_input, need_grid = ctx.needs_input_grad
    gin, ggrid = _grid_sample_backward_op(grad_out, input, grid, need_input, need_grid)
    return (gin if need_input else None), (ggrid if need_grid else None)


_grid_sample_op.register_autograd(_grid_sample_backward, setup_context=_grid_sample_setup)


def grid_sample(input: torch.Tensor, grid: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    if input.dim() != 4 or grid.dim() != 4 or grid.shape[-1] != 2 or grid.shape[0] != input.shape[0]:
        raise ValueError(f"grid_sample: input must be (B, C, H, W) and grid (B, H, W, 2), got "
                         f"{tuple(input.shape)} and {tuple(grid.shape)}")
    if use_triton("grid_sample", impl, input, grid):
        if torch.compiler.is_compiling():
            return _grid_sample_op(*_prepare(input, grid))
        if not (torch.is_grad_enabled() and (input.requires_grad or grid.requires_grad)):
            input, grid = _prepare(input, grid)  # no graph to record (needs_input_grad would say yes)
            return _grid_sample_fwd(input, grid, cuda_ext.grid_sample_kernels(input, grid))
        return GridSampleFn.apply(input, grid)
    return grid_sample_reference(input, grid)
