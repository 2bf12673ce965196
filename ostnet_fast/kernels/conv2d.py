"""Convolution as an implicit GEMM with split-K, for the frame's small-output convolutions; and the frame's
other convolutions where cuDNN is slow as called: odd channel counts, the strided anti-alias blur.

out[n, o, h, w] = bias[o] + sum_{c, i, j} x[n, c, h + i - ph, w + j - pw] W[o, c, i, j]   (stride 1, zeros)

As a GEMM: M = B * H * W output pixels, N = C_out, K = kh * kw * C_in, with K walked tap by tap (one tap and
BLOCK_K input channels per step, so the loads run along the contiguous channels of channels-last memory).
cuDNN serves the model's big maps well, but at batch 1 the hourglass bottlenecks (4x4 and 8x8 maps, 0.5-2K
channels) leave it few output tiles for many weights: a 1024 -> 1024 3x3 conv on a 4x4 map reads 19 MB of
fp16 weights (~4 us at HBM speed) and took cuDNN 20 us (H200, bench/results/h200-2026-12-01-s10). Split-K
gives every SM a share of the weights: program (m, n, s) sums the s-th slice of K for one output tile and
writes an fp32 partial. Eagerly one more launch sums the partials (+ bias, cast); under torch.compile the
sum is torch ops, which inductor fuses into the batch norm + ReLU kernel that follows where it can (in the
compiled frame about half of them; the others cost a small reduction kernel each). With one split the
kernel adds the bias and writes the output in the input's dtype itself.

Forward only: the backward is cuDNN's (aten.convolution_backward), the same as the reference's. fp32 inputs
use exact fp32 dot products (no TF32), fp64 runs in fp64 (tests). Which convolutions take this kernel, and
with which tiles, is `plan`'s rule, measured against cuDNN (bench/bench_conv2d.py); `pads_for_cudnn` and
`blur_downsample` say what happens to the others.
Limits: stride 1, dilation 1, groups 1, zero padding; offsets int32 (x and the partials below 2**31 elements).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _triton_utils as tu
from ._dispatch import interpreting, use_triton

if tu.HAS_TRITON:
    import triton
    import triton.language as tl


class Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    splits: int
    warps: int
    stages: int


def conv2d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     padding: tuple[int, int]) -> torch.Tensor:
    return F.conv2d(x, weight, bias, padding=padding)


if tu.HAS_TRITON:

    # The sizes vary per layer and do not shape the code: no recompile for each (strides, C_in and C_out
    # stay specialised: their divisibility by 16 makes the channel loads vector loads).
    @triton.jit(do_not_specialize=["HWO", "WO", "H", "W", "M", "CBLOCKS", "STEPS_PER_SPLIT", "TOTAL_STEPS"])
    def _conv2d_fwd_kernel(
        x_ptr,  # (B, C_in, H, W), any strides
        w_ptr,  # (C_out, C_in, KH, KW), any strides
        b_ptr,  # (C_out,) bias, if HAS_BIAS
        out_ptr,  # SPLIT: (splits, M, C_out) fp32 partials; else (M, C_out) output rows (pixel-major, i.e.
                  # channels-last) in x's dtype
        HWO, WO, H, W,  # output map (HWO = its pixels), input map
        CIN, COUT, M, CBLOCKS, STEPS_PER_SPLIT, TOTAL_STEPS,
        x_n, x_c, x_h, x_w, w_o, w_c, w_h, w_w,
        KW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < COUT
        n = offs_m // HWO
        hw = offs_m - n * HWO
        h = hw // WO
        w = hw - h * WO
        x_pix = x_ptr + n * x_n  # (BLOCK_M,) pointers to each output pixel's sample
        w_out = w_ptr + offs_n * w_o
        acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        start = pid_s * STEPS_PER_SPLIT
        end = tl.minimum(start + STEPS_PER_SPLIT, TOTAL_STEPS)
        for step in range(start, end):  # one step: one tap (i, j) and BLOCK_K input channels
            tap = step // CBLOCKS
            c = (step - tap * CBLOCKS) * BLOCK_K + offs_k
            i = tap // KW
            j = tap - i * KW
            hh = h + (i - PH)
            ww = w + (j - PW)
            ok_m = mask_m & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            ok_c = c < CIN
            a = tl.load((x_pix + hh * x_h + ww * x_w)[:, None] + (c * x_c)[None, :],
                        mask=ok_m[:, None] & ok_c[None, :], other=0.0)
            b = tl.load((w_out + i * w_h + j * w_w)[None, :] + (c * w_c)[:, None],
                        mask=ok_c[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
        rows = offs_m[:, None] * COUT + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT:
            tl.store(out_ptr + pid_s * M * COUT + rows, acc, mask=mask)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
            tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=mask)


if tu.HAS_TRITON:

    @triton.jit(do_not_specialize=["MN"])
    def _conv2d_sum_kernel(part_ptr, b_ptr, out_ptr, MN, COUT, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                           ACC: tl.constexpr, BLOCK: tl.constexpr):
        """out[i] = sum_s part[s, i] (+ bias[i % C_out]) in out's dtype: the eager path's one launch after a
        split kernel (compiled, torch ops: see _finish_traced)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros([BLOCK], ACC)
        for s in tl.static_range(SPLITS):  # unrolled: the loads go out together
            acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs % COUT, mask=mask, other=0.0).to(ACC)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def out_size(x: torch.Tensor, weight: torch.Tensor, padding) -> tuple[int, int]:
    return x.shape[2] + 2 * padding[0] - weight.shape[2] + 1, x.shape[3] + 2 * padding[1] - weight.shape[3] + 1


def _precision(x: torch.Tensor) -> str:
    # fp32: exact products (Triton's default is TF32, 10-bit mantissas); fp16/bf16 products are exact anyway.
    return "ieee" if x.dtype in (torch.float32, torch.float64) else "tf32"


def conv2d_partials(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int],
                    tiles: Tiles) -> torch.Tensor:
    """The kernel: with tiles.splits == 1 the output (B, C_out, H, W) channels-last in x's dtype, bias added;
    else (splits, B, H, W, C_out) partial sums in fp32 (fp64 for fp64 x), no bias."""
    if bias is not None and tiles.splits > 1:
        raise ValueError("conv2d_partials: the bias goes to the partials' sum when splits > 1")
    bsz, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho, wo = out_size(x, weight, padding)
    m = bsz * ho * wo
    cblocks = triton.cdiv(cin, tiles.block_k)
    total = kh * kw * cblocks
    per_split = triton.cdiv(total, tiles.splits)
    acc = torch.promote_types(x.dtype, torch.float32)
    if tiles.splits == 1:
        out = tu.empty_output((bsz, cout, ho, wo), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    else:
        out = tu.empty_output((tiles.splits, bsz, ho, wo, cout), device=x.device, dtype=acc)
    grid = (triton.cdiv(m, tiles.block_m), triton.cdiv(cout, tiles.block_n), tiles.splits)
    _conv2d_fwd_kernel[grid](
        x, weight, bias if bias is not None else x, out,
        ho * wo, wo, h, w, cin, cout, m, cblocks, per_split, total,
        *x.stride(), *weight.stride(),
        KW=kw, PH=padding[0], PW=padding[1], HAS_BIAS=bias is not None, SPLIT=tiles.splits > 1,
        ACC=tu.acc_dtype(x), PRECISION=_precision(x),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.warps, num_stages=tiles.stages)
    return out


def sum_partials(part: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(splits, B, H, W, C_out) partials -> their sum + bias, (B, C_out, H, W) channels-last in `dtype`."""
    splits, bsz, h, w, cout = part.shape
    out = tu.empty_output((bsz, cout, h, w), device=part.device, dtype=dtype, memory_format=torch.channels_last)
    mn = bsz * h * w * cout
    block = 1024
    _conv2d_sum_kernel[(triton.cdiv(mn, block),)](
        part, bias if bias is not None else part, out, mn, cout, SPLITS=splits, HAS_BIAS=bias is not None,
        ACC=tu.acc_dtype(part), BLOCK=block, num_warps=4)
    return out


def _finish_traced(part: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, splits: int) -> torch.Tensor:
    """sum_partials in torch ops, under torch.compile: inductor can fuse the sum, the bias and the cast into
    the pointwise kernel that follows the convolution (batch norm, ReLU), where split-K then costs no launch."""
    if splits == 1:
        return part
    out = part.sum(0)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x.dtype).permute(0, 3, 1, 2)


def _conv_backward(grad, x, weight, has_bias: bool, padding, needs):
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]] if has_bias else None, [1, 1], list(padding), [1, 1], False, [0, 0],
        1, [needs[0], needs[1], has_bias and needs[2]])
    return gx, gw, gb


class Conv2dFn(torch.autograd.Function):
    """The kernel and (with splits > 1) sum_partials, eagerly; the backward is cuDNN's."""
    @staticmethod
    def forward(ctx, x, weight, bias, padding, tiles):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        if tiles.splits == 1:
            return conv2d_partials(x, weight, bias, padding, tiles)
        return sum_partials(conv2d_partials(x, weight, None, padding, tiles), bias, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx, gw, gb = _conv_backward(grad, x, weight, ctx.has_bias, ctx.padding, ctx.needs_input_grad)
        return gx, gw, gb, None, None


# The kernel as a custom op, for torch.compile: opaque to inductor, which may fuse the partials' sum, the
# bias and the pointwise work that follows into one kernel.
@torch.library.custom_op("ostnet::conv2d_partials", mutates_args=())
def _conv2d_partials_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: list[int],
                        tiles: list[int]) -> torch.Tensor:
    return conv2d_partials(x, weight, bias, tuple(padding), Tiles(*tiles))


@_conv2d_partials_op.register_fake
def _(x, weight, bias, padding, tiles):
    bsz, cout = x.shape[0], weight.shape[0]
    ho, wo = out_size(x, weight, padding)
    if tiles[3] == 1:
        return torch.empty((bsz, cout, ho, wo), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    return x.new_empty((tiles[3], bsz, ho, wo, cout), dtype=torch.promote_types(x.dtype, torch.float32))


def _partials_setup(ctx, inputs, output):
    x, weight, bias, padding, tiles = inputs
    ctx.save_for_backward(x, weight)
    ctx.padding, ctx.has_bias, ctx.splits = padding, bias is not None, tiles[3]


def _partials_backward(ctx, grad):
    """grad is dL/d(partials): every split's partial enters the output with weight 1, so dL/dout is any
    split's slice (all the same: the sum's backward broadcasts), and with one split it is dL/dout itself."""
    x, weight = ctx.saved_tensors
    # (B, H, W, C_out) -> an NCHW view; split partials are fp32, cuDNN's backward wants x's dtype
    g = grad if ctx.splits == 1 else grad[0].permute(0, 3, 1, 2).to(x.dtype)
    gx, gw, gb = _conv_backward(g, x, weight, ctx.has_bias, ctx.padding, ctx.needs_input_grad)
    return gx, gw, gb, None, None


_conv2d_partials_op.register_autograd(_partials_backward, setup_context=_partials_setup)


def _inference(*tensors: torch.Tensor) -> bool:
    """No gradient will flow to these tensors: the paths below are measured at inference only."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


# plan's bound on M * C_out, the output's size: above it cuDNN (see plan).
SMALL_OUTPUT = 2 ** 18

# Output tiles x splits per launch that `plan` aims for: two programs per SM of an H100/H200 (132 SMs).
TARGET_PROGRAMS = 264


def plan(x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int]) -> Tiles | None:
    """The kernel's tiles for this convolution at inference, or None where cuDNN is taken.

    The kernel is taken where the output is small, M * C_out <= 2**18 values (M = B * H_out * W_out): too
    few output tiles for cuDNN to spread over the GPU, so it streams the weights through a few SMs. Measured
    on an H200 (bench/results/h200-2026-12-01-s11/: conv2d_sweep.json, the frame's shapes at batch 1 and 8,
    fp16 channels-last, weights read from HBM), the kernel alone with its best tiles is 1.2-3.8x faster than
    cuDNN at every such shape with C_in % 16 == 0, e.g. the hourglass bottleneck 1024 -> 512 on 4x4 (21.4 ->
    5.6 us) and the 128 -> 17 7x7 mask head on 64x64 (36 -> 16 us); with the tiles below 1.3-3.3x at batch 1
    (conv2d_plan.json). The bound 2**18 rests on one in-frame measurement: the generator's twelve 512 -> 512
    convolutions on 32x32 (M * C_out = 2**19) tie in isolation (19 us) but lost inside the compiled frame,
    where cuDNN took 15.5 us and the split-K partials cost a reduction kernel each. Some larger outputs do
    win in isolation (64 -> 128 on 32x32 at batch 8), others lose (64x64 maps with 256-512 channels,
    0.7-0.9x); they are left to cuDNN unmeasured in the frame. C_in % 16 != 0 (3 and 35 channels) loses.
    Tiles: 16 pixel rows for the 4x4 maps at batch 1, else 64; 64 or 128 output channels; K-splits (powers
    of 2, up to 32, about 2 or more steps each) until the programs reach TARGET_PROGRAMS, then as few splits
    as give every split the same rounded-up number of steps, so that none is empty (that last step is not
    measured: it only drops programs that wrote zeros). At most 22% slower than the sweep's best tiles at any
    planned shape, most within 12% (conv2d_plan.json).
    Inference only (gradients off): in training the forward is a small part of a step whose backward
    stays cuDNN's."""
    if not _inference(x, weight):
        return None
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        return None
    if not (tu.is_channels_last(x) and weight.is_contiguous(memory_format=torch.channels_last)):
        return None
    bsz, cin = x.shape[:2]
    cout, _, kh, kw = weight.shape
    if kh != kw or kh not in (3, 7) or cin % 16:
        return None
    ho, wo = out_size(x, weight, padding)
    m = bsz * ho * wo
    if m * cout > SMALL_OUTPUT:
        return None
    block_m = 16 if m <= 16 else 64
    block_n = 64 if (cout <= 64 or block_m == 16) else 128
    block_k = 64
    out_tiles = -(-m // block_m) * -(-cout // block_n)
    steps = kh * kw * -(-cin // block_k)
    splits = 1
    while splits < 32 and out_tiles * splits * 2 <= TARGET_PROGRAMS and steps >= 4 * splits:
        splits *= 2
    per_split = -(-steps // splits)
    splits = -(-steps // per_split)  # e.g. 72 steps in 16 splits of 5: 15 splits, none empty
    return Tiles(block_m, block_n, block_k, splits, warps=4, stages=4 if m <= 128 else 3)


def pads_for_cudnn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether conv2d zero-pads the channels to multiples of 8 before cuDNN (inference under torch.compile,
    fp16/bf16 channels-last, C_in >= 16, C_in or C_out not a multiple of 8). cuDNN's tensor-core kernels
    want multiples of 8; otherwise it pads x, the weights and the output itself, launch by launch (memsets
    and `nhwcAddPaddingKernel`s). Padded by us, inductor writes the zero channels in the kernel that makes x.
    H200, batch 1 / 8, fp16, compiled, CUDA graphs (bench/results/h200-2026-12-01-s12/conv_variants.json):
    the keypoint heads 35 -> 75 7x7 on 64x64 29.4 -> 22.9 / 83.3 -> 66.7 us, the mask heads 128 -> 17
    35.6 -> 26.8 / 80.0 -> 67.9 us. 3-channel images stay as they are: cuDNN has a direct kernel for them,
    and 3 -> 8 channels made the 3 -> 64 convolution no faster (8.4 against 9.3 us, 14.0 against 13.1)."""
    if not torch.compiler.is_compiling() or not _inference(x, weight):
        return False
    if x.dtype not in (torch.float16, torch.bfloat16) or not tu.is_channels_last(x):
        return False
    return x.shape[1] >= 16 and bool(x.shape[1] % 8 or weight.shape[0] % 8)


def conv2d_channel_padded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          padding: tuple[int, int]) -> torch.Tensor:
    """F.conv2d with C_in and C_out zero-padded to multiples of 8, the extra output channels dropped (a view).
    The same sums: the zero input channels meet zero weights."""
    cin, cout = x.shape[1], weight.shape[0]
    pad_in, pad_out = -cin % 8, -cout % 8
    x = F.pad(x, (0, 0, 0, 0, 0, pad_in))
    weight = F.pad(weight, (0, 0, 0, 0, 0, pad_in, 0, pad_out))
    bias = F.pad(bias, (0, pad_out)) if bias is not None else None
    return F.conv2d(x, weight, bias, padding=padding)[:, :cout]


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding=(0, 0),
           impl: str = "auto", tiles: Tiles | None = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=padding) (stride 1), under torch.compile through the split-K kernel
    where `plan` finds it faster than cuDNN, else cuDNN, with the channels padded where `pads_for_cudnn`
    says. Eagerly "auto" is cuDNN as given: there the partials' sum is a launch of its own, and at the
    planned shapes kernel + sum saved 71 us a frame at batch 1 but was slower than cuDNN at six of them
    (bench/results/h200-2026-12-01-s11/conv2d_plan.json, `plan_us`, measured before the sum's loop over
    the splits was unrolled), where inside the compiled frame the sum mostly joins the kernel after it.
    impl="triton" always takes the kernel (with `tiles`, or a default where `plan` has none);
    OSTNET_IMPL=triton in the environment does not: it forces the other kernels, and this one computes the
    same convolution as cuDNN, chosen for speed."""
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"conv2d: x (B, C_in, H, W) and weight (C_out, C_in, kh, kw) must agree, got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    padding = _pair(padding)
    if use_triton("conv2d", impl, x, weight, bias):
        if tiles is None and (impl == "triton" or torch.compiler.is_compiling()):
            tiles = plan(x, weight, padding)
            if tiles is None and impl == "triton":
                tiles = DEFAULT_TILES
        if tiles is not None:
            if x.dtype != weight.dtype:  # plan declines these; only a forced kernel gets here
                raise ValueError(f"conv2d: x is {x.dtype} and weight {weight.dtype}; the kernel wants one dtype")
            ho, wo = out_size(x, weight, padding)
            if ho <= 0 or wo <= 0:
                raise ValueError(f"conv2d: a {tuple(weight.shape[2:])} kernel with padding {padding} leaves no "
                                 f"output on a {tuple(x.shape[2:])} map")
            # int32 offsets: x's, and the (splits, M, C_out) partials' (one sample reported: the grid's rows
            # are pixels, not samples)
            tu.check_launch("conv2d", 1, max(x.numel(), tiles.splits * x.shape[0] * ho * wo * weight.shape[0]))
            if not torch.compiler.is_compiling():
                return Conv2dFn.apply(x, weight, bias, padding, tiles)
            part = _conv2d_partials_op(x, weight, bias if tiles.splits == 1 else None, list(padding), list(tiles))
            return _finish_traced(part, x, bias, tiles.splits)
        if pads_for_cudnn(x, weight):
            return conv2d_channel_padded(x, weight, bias, padding)
    return conv2d_reference(x, weight, bias, padding)


def upsampled_conv3x3(x: torch.Tensor, weight: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """F.conv2d(F.interpolate(x, scale_factor=2), weight, padding=1): nearest 2x upsampling, then a 3x3
    convolution without bias (the fused z-conv "up" block's).

    Eagerly on the fused path (CUDA, "auto"), where the output exceeds SUBPIXEL_FROM values, as one
    convolution on the low-resolution map (`subpixel_conv3x3`): 2.25x fewer multiply-adds, and the
    upsampled input is never written, for ~15 small launches that build its weights. H200, batch 8,
    eager fused block against the unfused eager one (bench/results/h200-2026-12-01-s12, the same kernel
    bench before and after, on two machines): up 512 -> 256 on 32x32 1.15 -> 1.22x (fp32) and 1.17 ->
    1.34x (fp16) at inference, 1.01 -> 1.12x / 0.96 -> 1.03x forward + backward; up 128 -> 64 on 128x128
    1.46 -> 1.74x / 1.47 -> 2.32x, 1.40 -> 1.49x / 1.56 -> 1.73x (the s13 figures, after the channels-last
    convolution and the Triton interleave, are in subpixel_conv3x3). Smaller outputs keep the upsampled
    convolution: at batch 1 (H200, GPU time, bench/results/h200-2026-12-01-s17/subpixel_b1_ab.py) up 512 ->
    256 on 32x32 (1M output values) took 97 -> 119 us low-resolution (fp32 inference), 234 -> 397 us (fp16
    forward + backward): its weight launches and a (B, 1024, 33, 33) convolution cost more than it saves;
    up 128 -> 64 on 128x128 (4.2M) 125 -> 82 us and 339 -> 228 us. Under torch.compile it is not measured."""
    out_values = x.shape[0] * weight.shape[0] * 4 * x.shape[2] * x.shape[3]
    if (use_triton("conv2d", impl, x, weight) and not torch.compiler.is_compiling()
            and weight.shape[-2:] == (3, 3) and out_values > SUBPIXEL_FROM):
        return subpixel_conv3x3(x, weight)
    return conv2d(F.interpolate(x, scale_factor=2), weight, None, (1, 1), impl)


# upsampled_conv3x3 takes the low-resolution form above this many output values (B * C_out * 2H * 2W):
# between the blocks it was measured slower at (1M values: up 512 -> 256 on 32x32 at batch 1) and faster at
# (4.2M: up 128 -> 64 on 128x128 at batch 1; 8.4M and 33.6M, both up blocks at batch 8).
SUBPIXEL_FROM = 2 ** 21


RELAYOUT_BLOCK = 64  # (channels x pixels) tile of relayout's copy


def relayout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """x's values in the given layout (x itself if already so): a Triton tiled copy for CUDA (or
    interpreter) tensors, torch's copy otherwise. H200: torch's copy between NCHW and channels-last (an
    elementwise kernel with strided stores) ran at about a third of the bandwidth of this one
    (bench/results/h200-2026-12-01-s14)."""
    fmt = tu.memory_format(channels_last)
    if x.is_contiguous(memory_format=fmt):
        return x
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    if not (dense and tu.HAS_TRITON and (x.is_cuda or interpreting())) or x.numel() == 0:
        return x.contiguous(memory_format=fmt)  # (other strides: one copy either way)
    b, c, h, w = x.shape
    tu.check_launch("relayout", b, c * h * w)
    out = tu.empty_output(x.shape, device=x.device, dtype=x.dtype, memory_format=fmt)
    # square tiles, but no wider along the pixels than a small plane (a 3x3 weight's 9 "pixels"): the
    # channels take the rest of the tile
    blk_p = min(RELAYOUT_BLOCK, max(tu.next_pow2(h * w), 4))
    blk_c = RELAYOUT_BLOCK * RELAYOUT_BLOCK // blk_p
    _relayout_kernel[(triton.cdiv(h * w, blk_p), triton.cdiv(c, blk_c), b)](
        x, out, c, h * w, x.stride(0), x.stride(1), tu.pixel_stride(x), out.stride(0), out.stride(1),
        tu.pixel_stride(out), BLOCK_C=blk_c, BLOCK_P=blk_p, num_warps=4)
    return out


class _ToChannelsLastFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.channels_last = tu.is_channels_last(x)
        return relayout(x, channels_last=True)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return relayout(grad, ctx.channels_last)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """relayout(x, channels_last=True), differentiable: x's grad comes back in x's layout (one more copy,
    which otherwise the op that made x, or a leaf's AccumulateGrad, makes with torch's slower one). Under
    torch.compile, torch's copy: inductor plans the layouts itself."""
    if torch.compiler.is_compiling():
        return x.contiguous(memory_format=torch.channels_last)
    return _ToChannelsLastFn.apply(x)


if tu.HAS_TRITON:

    @triton.jit
    def _relayout_kernel(src_ptr, dst_ptr, C, P, s_n, s_c, s_p, d_n, d_c, d_p,
                         BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """dst[n, c, p] = src[n, c, p], p the flat (h, w) pixel, each side with its own strides: NCHW <->
        channels-last as one tiled copy (Triton stages the tile through shared memory between the two
        access orders; unit strides are specialised by the compiler)."""
        offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        n = tl.program_id(2).to(tl.int64)
        m = (offs_c < C)[:, None] & (offs_p < P)[None, :]
        v = tl.load(src_ptr + n * s_n + offs_c[:, None] * s_c + offs_p[None, :] * s_p, mask=m)
        tl.store(dst_ptr + n * d_n + offs_c[:, None] * d_c + offs_p[None, :] * d_p, v, mask=m)


def subpixel_weights(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> (4 C_out, C_in, 2, 2), channel (2 py + px) C_out + o: the 2x2 kernel output
    pixel (2 i + py, 2 j + px) of the upsampled convolution applies to low-resolution rows (i - 1, i) for
    py = 0 (rows 0 and 1 + 2 of the 3x3 kernel land there) or (i, i + 1) for py = 1 (rows 0 + 1 and 2);
    columns likewise. Parity-major, so that in a channels-last map one parity's channels are contiguous."""
    def pairs(w, dim):  # the two parities along one kernel axis, each 2 taps wide
        a, b_, c = w.unbind(dim)
        return torch.stack([a, b_ + c], dim), torch.stack([a + b_, c], dim)
    kernels = [k for rows in pairs(weight, 2) for k in pairs(rows, 3)]  # (py, px) = 00, 01, 10, 11
    return torch.cat(kernels, 0)


def subpixel_conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """upsampled_conv3x3 as one convolution on x itself: the four output parities' 2x2 kernels stacked as
    4 C_out channels, padding 1, so parity (py, px)'s output (i, j) sits at (i + py, j + px); then the
    parities are interleaved (SubpixelInterleaveFn) into x's memory format. The same sums as the upsampled
    convolution (the weights of taps that land on the same input pixel are added first).

    The convolution runs channels-last whatever x's layout: cuDNN's Hopper kernels are NHWC, and on NCHW
    maps they transposed input, output and grads inside each of the forward, input-grad and weight-grad
    convolutions (9 transposes, ~170 us of 1.32 ms for up 512 -> 256 on 32x32, batch 8, fp32, H200). Here
    x is copied once each way (to_channels_last), and the interleave writes x's layout (for NCHW x, one
    Triton transpose each way). Once differentiable (the interleave's backward is not differentiated).
    H200, batch 8, against the unfused eager block (bench/results/h200-2026-12-01-s13): forward + backward
    up 512 -> 256 1.12 -> 1.56x (fp32), 1.03 -> 1.39x (fp16); up 128 -> 64 1.49 -> 2.61x, 1.73 -> 3.06x;
    inference 1.22 -> 1.64x, 1.34 -> 1.67x, 1.74 -> 2.82x, 2.32 -> 3.55x."""
    _, _, h, w = x.shape
    k = subpixel_weights(weight.to(torch.promote_types(weight.dtype, torch.float32))).to(x.dtype)  # sums in fp32
    x_cl = tu.is_channels_last(x)
    x = to_channels_last(x)
    k = k.contiguous(memory_format=torch.channels_last)
    q = F.conv2d(x, k, None, padding=1)
    return SubpixelInterleaveFn.apply(q, h, w, x_cl)


class SubpixelInterleaveFn(torch.autograd.Function):
    """(B, 4 C_out, H + 1, W + 1) parity planes, channel (2 py + px) C_out + o -> (B, C_out, 2H, 2W),
    channels-last or not: out[2 i + py, 2 j + px] = q[(2 py + px) C_out + o][i + py, j + px]; the grad in
    q's memory format.

    From channels-last q to NCHW out (training on NCHW maps) it is a transpose, done by one Triton kernel
    each way (_interleave_fwd_kernel, _interleave_bwd_kernel: tiles loaded along the channels and stored
    along the width; the backward writes every element of its grad, zeros included). Otherwise four
    strided copies each way (the reference for those kernels). Autograd of the same slicing and stacking
    zero-filled a gradient of q's full size per parity and added them up: on the H200 (up 512 -> 256 on
    32x32, batch 8, fp32) 18 copies, 13 fills and 19 adds took ~340 us of the block's 1.32 ms forward +
    backward; as strided copies from channels-last q to NCHW, 11 copies still took 250 us of 1.12 ms."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, h: int, w: int, channels_last: bool) -> torch.Tensor:
        b, c4 = q.shape[:2]
        out = torch.empty(b, c4 // 4, 2 * h, 2 * w, device=q.device, dtype=q.dtype,
                          memory_format=tu.memory_format(channels_last))
        ctx.hw, ctx.fmt = (h, w), tu.memory_format(tu.is_channels_last(q))
        ctx.kernel = _interleave_kernel_applies(q, out)
        if ctx.kernel:
            _interleave_launch(_interleave_fwd_kernel, q, out, (b * 2 * h, w, c4 // 4), h, w)
        else:
            for src, dst in _parities(q, out, h, w):
                dst.copy_(src)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        h, w = ctx.hw
        b, c = grad_out.shape[:2]
        grad_q = tu.empty_output((b, 4 * c, h + 1, w + 1), device=grad_out.device, dtype=grad_out.dtype,
                                 memory_format=ctx.fmt)  # q's memory format, for cuDNN's backward
        if ctx.kernel:
            _interleave_launch(_interleave_bwd_kernel, grad_q, grad_out, (b * (h + 1), w + 1, c), h, w)
            return grad_q, None, None, None
        grad_q.zero_()  # the row (or column) of q a parity does not use gets no gradient
        for dst, src in _parities(grad_q, grad_out, h, w):
            dst.copy_(src)
        return grad_q, None, None, None


def _parities(q: torch.Tensor, out: torch.Tensor, h: int, w: int):
    """For each parity (py, px): the (B, C_out, H, W) views of q's plane and of the pixels of out it fills."""
    q6 = q.unflatten(1, (2, 2, q.shape[1] // 4))  # (B, py, px, C_out, H + 1, W + 1)
    o6 = out.unflatten(3, (w, 2)).unflatten(2, (h, 2))  # (B, C_out, H, py, W, px): splitting a dim is a view
    for py in (0, 1):
        for px in (0, 1):
            yield q6[:, py, px, :, py:py + h, px:px + w], o6[:, :, :, py, :, px]


def _interleave_kernel_applies(q: torch.Tensor, out: torch.Tensor) -> bool:
    """The Triton interleave for channels-last q and NCHW out (on CUDA, or interpreted in the tests)."""
    return (tu.HAS_TRITON and (q.is_cuda or interpreting()) and tu.is_channels_last(q)
            and not tu.is_channels_last(out) and out.numel() > 0)


INTERLEAVE_BLOCK_O, INTERLEAVE_BLOCK_J = 32, 32


def _interleave_launch(kernel, q, out, rows_cols_channels, h, w):
    rows, cols, channels = rows_cols_channels
    tu.check_launch("subpixel interleave", 1, max(q.numel(), out.numel()))
    grid = (rows, triton.cdiv(cols, INTERLEAVE_BLOCK_J), triton.cdiv(channels, INTERLEAVE_BLOCK_O))
    kernel[grid](q, out, out.shape[1], h, w, *q.stride(), *out.stride(),
                 BLOCK_O=INTERLEAVE_BLOCK_O, BLOCK_J=INTERLEAVE_BLOCK_J, num_warps=4)


if tu.HAS_TRITON:

    @triton.jit
    def _interleave_fwd_kernel(q_ptr, out_ptr, C, H, W, q_sb, q_sc, q_sh, q_sw, o_sb, o_sc, o_sh, o_sw,
                               BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr):
        """One program: output row Y of sample b, BLOCK_J column pairs, BLOCK_O channels. Its two parities
        (py, 0) and (py, 1) are loaded along the channels and joined into 2 BLOCK_J output columns."""
        row = tl.program_id(0)
        b = (row // (2 * H)).to(tl.int64)
        y = row % (2 * H)
        py = y % 2
        r = y // 2 + py  # q's row
        j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        o = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
        mask = (o < C)[:, None] & (j < W)[None, :]
        base = q_ptr + b * q_sb + r * q_sh
        a0 = tl.load(base + ((2 * py) * C + o)[:, None] * q_sc + j[None, :] * q_sw, mask=mask)
        a1 = tl.load(base + ((2 * py + 1) * C + o)[:, None] * q_sc + (j + 1)[None, :] * q_sw, mask=mask)
        v = tl.reshape(tl.join(a0, a1), (BLOCK_O, 2 * BLOCK_J))  # column 2 j + px
        x = 2 * tl.program_id(1) * BLOCK_J + tl.arange(0, 2 * BLOCK_J)
        omask = (o < C)[:, None] & (x < 2 * W)[None, :]
        tl.store(out_ptr + b * o_sb + o[:, None] * o_sc + y * o_sh + x[None, :] * o_sw, v, mask=omask)

    @triton.jit
    def _interleave_bwd_kernel(gq_ptr, g_ptr, C, H, W, q_sb, q_sc, q_sh, q_sw, g_sb, g_sc, g_sh, g_sw,
                               BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr):
        """One program: q row r of sample b, BLOCK_J q columns, BLOCK_O channels, all four parities. Parity
        (py, px) of q pixel (r, c) is output pixel (2 (r - py) + py, 2 (c - px) + px), or nothing (0)."""
        row = tl.program_id(0)
        b = (row // (H + 1)).to(tl.int64)
        r = row % (H + 1)
        c = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        o = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
        mo = o < C
        smask = mo[:, None] & (c < W + 1)[None, :]
        k = tl.arange(0, 2)  # k = 0: px = 1, output column 2 c - 1; k = 1: px = 0, column 2 c
        jx = c[:, None] - 1 + k[None, :]  # the output column pair j = c - px
        xmask = (jx >= 0) & (jx < W)
        gbase = g_ptr + b * g_sb + o[:, None, None] * g_sc + (2 * c[:, None] - 1 + k[None, :])[None, :, :] * g_sw
        qbase = gq_ptr + b * q_sb + r * q_sh + c[None, :] * q_sw
        for py in tl.static_range(2):
            i = r - py
            lmask = mo[:, None, None] & xmask[None, :, :] & (i >= 0) & (i < H)
            t = tl.load(gbase + (2 * i + py) * g_sh, mask=lmask, other=0.0)
            g_px1, g_px0 = tl.split(t)
            tl.store(qbase + ((2 * py) * C + o)[:, None] * q_sc, g_px0, mask=smask)
            tl.store(qbase + ((2 * py + 1) * C + o)[:, None] * q_sc, g_px1, mask=smask)


def blur_downsample(x: torch.Tensor, weight: torch.Tensor, factor: torch.Tensor, step: int,
                    impl: str = "auto") -> torch.Tensor:
    """FOMM's anti-alias downscaling: the depthwise Gaussian blur `weight` (C, 1, k, k), k odd, at stride
    `step` with k // 2 zero padding. `factor` (k,) is its 1-D profile, weight[c, 0] = outer(factor, factor).

    Under torch.compile on the fused path (CUDA, "auto") at inference, the same sums as two 1-D passes, each
    an unfold and a sum that inductor compiles into one small kernel: cuDNN's grouped kernels take ~19 us on
    a 3x256x256 image at batch 1 and 8 alike (3 launches, one per channel), the two passes 7.2 / 10.9 us
    (H200, fp16, CUDA graphs; bench/results/h200-2026-12-01-s12/conv_variants.json). The products are
    summed in fp32 (fp64 for fp64); the output has the dtype F.conv2d would give (autocast's, where on).
    Eagerly, when exporting and with gradients (the backward of overlapping unfolds is a scatter of float
    atomics, unmeasured and not deterministic): F.conv2d."""
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"blur_downsample: {weight.shape[0]} filters for {x.shape[1]} channels")
    if use_triton("conv2d", impl, x) and torch.compiler.is_compiling() and _inference(x):  # see below
        autocast = torch.is_autocast_enabled("cuda") and x.dtype != torch.float64  # autocast leaves fp64 be
        dtype = torch.get_autocast_dtype("cuda") if autocast else x.dtype
        out = blur_two_passes(x, factor, step).to(dtype)
        # in x's layout, as cuDNN's output: the keypoint hourglass concatenates this image with its decoder's
        # output, and an NCHW part would make the 7x7 heads' input NCHW (no channel padding for them)
        return out.contiguous(memory_format=torch.channels_last) if tu.is_channels_last(x) else out
    return F.conv2d(x, weight.to(x.dtype), groups=x.shape[1], stride=step, padding=weight.shape[-1] // 2)


def blur_two_passes(x: torch.Tensor, factor: torch.Tensor, step: int) -> torch.Tensor:
    """blur_downsample's compiled form, in fp32 (fp64 for fp64 x)."""
    k = factor.numel()
    pad = k // 2
    acc = torch.promote_types(x.dtype, torch.float32)
    f = factor.to(acc)
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (xp.unfold(2, k, step).to(acc) * f).sum(-1)  # (B, C, H_out, W + 2 pad): blurred down the columns
    return (rows.unfold(3, k, step) * f).sum(-1)  # then along the rows


def _pair(padding) -> tuple[int, int]:
    if isinstance(padding, int):
        return padding, padding
    if isinstance(padding, str) or len(padding) != 2:
        raise ValueError(f"conv2d: padding must be an int or (ph, pw), got {padding!r}")
    return int(padding[0]), int(padding[1])


def from_block(impl: str) -> str:
    """conv2d's impl inside a block called with `impl`: "reference" stays, anything else is "auto". Forcing
    a block's kernels does not force this one: it computes the same convolution as cuDNN, and `plan` takes it
    only where it is faster."""
    return "reference" if impl == "reference" else "auto"


def conv2d_module(conv: torch.nn.Conv2d, x: torch.Tensor, block_impl: str = "auto") -> torch.Tensor:
    """conv(x) inside a block called with block_impl: through conv2d where the kernel supports the module's
    geometry, else the module itself."""
    impl = from_block(block_impl)
    if (conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)):
        return conv2d(x, conv.weight, conv.bias, conv.padding, impl)
    return conv(x)


DEFAULT_TILES = Tiles(block_m=32, block_n=64, block_k=32, splits=2, warps=4, stages=2)
