"""z-additive conv block: (f + b) -> [nearest 2x upsample] -> conv3x3 -> BN -> ReLU -> [2x2 avg-pool].

b = W_i z is one vector per sample and input channel (B, C_in), broadcast over H x W (OSTNet eq. 5), or
None (plain FOMM block). Fused, f + b is never materialised: conv(f + b) = conv(f) + E(b), where E(b)
depends only on which zero-padding border an output pixel touches (9 classes for a 3x3 conv), so the
convolution stays in cuDNN and one epilogue adds E(b), the BN, the ReLU and the pooling.

Fused path (`impl="triton"`, or "auto" on CUDA):
  conv_out = F.conv2d(x or upsample(x), W, bias=None, padding=1)     cuDNN, autograd as usual (kernels.conv2d:
             the split-K kernel for small outputs at inference; large eager up blocks at low resolution).
             Down / same blocks given NCHW convolve channels-last (CONV_CHANNELS_LAST, below).
  E        = from zb, W and the tap masks M by matmuls (border_bias)    (B, 9, C_out), torch, fp32
  out      = ZConvEpilogueFn(conv_out, E, conv.bias, BN params)          Triton:
    inference: one pass over conv_out: y = conv_out + bias + E[class] -> folded BN -> ReLU -> pool,
               written once in the block's memory format (the pre-pool tensor is never written);
    training : one statistics pass (per-program count, mean and M2 of y, from sums shifted by the first
               tile's mean; merged chunk by chunk with Chan's formula, so no E[y^2] - E[y]^2 cancellation),
               one finalize launch (batch mean / invstd, running-stat update exactly as nn.BatchNorm2d:
               momentum or cumulative average, unbiased running variance), then the epilogue pass.
  backward : one reduction pass (per-program partial sums for the BN backward), one small launch over the O(H + W)
             border pixels only (per-border-class sums, only with zb), one small launch for the per-channel
             math (_zconv_bwd_finalize_kernel), and one pass writing dL/dconv_out; the conv backward is
             cuDNN's (autograd of F.conv2d) and dL/dzb and the E part of dL/dW come from autograd of the tiny
             E matmul, fed with
             dL/dE[n, q, o] = sum over the class-q pixels of dL/dy (derivation above _zconv_grad_tile).
  Tiles (TILE, RED_TILE, ... below): (pixels x channels), wide along the contiguous axis. The reductions
  sum RED_LOOP tiles a program lane by lane and reduce across threads once; their partial rows are merged
  by the finalize launches. Sizes chosen on an H200 (bench/results/h200-2026-12-01-s14, zconv_sweep*.txt).
Border classes: q = 3 r + s, r = 0 (first row), 2 (last row), 1 (other rows); s likewise for columns. For
H == 1 (or W == 1) the single row is both first and last: its class r = 0 then drops both taps.

Design limits: 3x3 conv, stride 1, padding 1, dilation 1, groups 1, zero padding (anything else takes the
reference; impl="triton" raises). fp32 math (fp64 when conv_out is fp64: tests, gradcheck). Offsets are
int32: B * C * H * W of the conv output, and of the backward's partial-sum buffers, must stay below
2**31. Tiles are (pixels x channels), addresses from the strides, so NCHW and channels-last both work
(contiguous loads along W or along C). The BN momentum and eps reach the kernel as fp32 scalars (so fp64
running stats agree with PyTorch to ~1e-9).
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from . import _triton_utils as tu
from ._dispatch import forced, use_triton
from .conv2d import conv2d, conv2d_module, from_block, relayout, to_channels_last, upsampled_conv3x3

from ._triton_utils import HAS_TRITON, tl, triton  # one import guard for every kernel

log = logging.getLogger("ostnet_fast.kernels")
MODES = ("same", "down", "up")
INT32_MAX = 2 ** 31 - 1


# Tests set this to True: every buffer a kernel must overwrite then starts as NaN (poisoned outputs).
POISON_OUTPUTS = False


def _empty(*shape, **kwargs) -> torch.Tensor:
    """torch.empty, or NaN-filled while POISON_OUTPUTS is set."""
    t = torch.empty(*shape, **kwargs)
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


def zconv_block_reference(x: torch.Tensor, zb: torch.Tensor | None, conv: nn.Conv2d, norm: nn.BatchNorm2d,
                          mode: str, conv_impl: str = "reference") -> torch.Tensor:
    """The block in PyTorch ops. conv_impl is the convolution's (kernels.conv2d): zconv_block passes "auto"
    where it does not take the fused epilogue (under torch.compile), so the convolution can still take the
    split-K kernel."""
    if mode == "up":
        x = F.interpolate(x, scale_factor=2)
    if zb is not None:
        x = x + zb[:, :, None, None].to(x.dtype)
    out = F.relu(norm(conv2d_module(conv, x, conv_impl)))
    if mode == "down":
        out = F.avg_pool2d(out, kernel_size=2)
    return out


# ----------------------------------------------------------------------------------------------------
# Border classes and E(b)
# ----------------------------------------------------------------------------------------------------

def _line_taps(n: int) -> list[list[int]]:
    """(3 classes, 3 taps): which taps of a 3-tap, padding-1 conv read inside a line of n pixels, for the
    first pixel, the middle ones and the last one. n == 1: the one pixel is class 0 and keeps only tap 1."""
    taps = [[0, 1, 1], [1, 1, 1], [1, 1, 0]]
    if n == 1:
        taps[0] = [0, 1, 0]
    return taps


def _line_counts(n: int) -> list[int]:
    """Number of pixels in each class of a line of n pixels."""
    return [1, max(n - 2, 0), 1 if n > 1 else 0]


@functools.lru_cache(maxsize=None)
def _class_tables(hc: int, wc: int) -> tuple[tuple[tuple[float, ...], ...], tuple[float, ...]]:
    ty, tx = _line_taps(hc), _line_taps(wc)
    cy, cx = _line_counts(hc), _line_counts(wc)
    masks = tuple(tuple(float(ty[q // 3][t // 3] * tx[q % 3][t % 3]) for t in range(9)) for q in range(9))
    counts = tuple(float(cy[q // 3] * cx[q % 3]) for q in range(9))
    return masks, counts


_TABLE_CACHE: dict = {}


def _tables(hc: int, wc: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(9 classes, 9 taps) tap masks and (9,) class pixel counts as tensors, cached per device (no host
    to device copy per call, so the fused block can be captured in a CUDA graph after one warm-up call)."""
    key = (hc, wc, str(device), dtype)
    if key not in _TABLE_CACHE:
        masks, counts = _class_tables(hc, wc)
        _TABLE_CACHE[key] = (torch.tensor(masks, device=device, dtype=dtype),
                             torch.tensor(counts, device=device, dtype=dtype))
    return _TABLE_CACHE[key]


def border_bias(zb: torch.Tensor, weight: torch.Tensor, hc: int, wc: int, dtype) -> torch.Tensor:
    """E[n, q, o] = sum_{c, ky, kx} W[o, c, ky, kx] zb[n, c] mask_q[ky, kx] -> (B, 9, C_out) in `dtype`,
    contiguous (the kernels' loads of it are vector loads along C_out only then). Matmuls against W as it
    is laid out (no relayout of it; a cast where W is not in `dtype`); differentiable (autograd gives dL/dzb
    and the E part of dL/dW):
    - channels-last W (the down / same blocks convolve so): per tap first, T[n, o, t] = sum_c zb[n, c]
      W[o, c, t], a (B, C_in) x (C_in, C_out * 9) matmul against W viewed as (C_out * 9, C_in), then
      E[n] = mask @ T[n]^T. H200, down 256 -> 512 training fp32: 30 us of matmuls forward + backward, where
      the masked form below took 43 us;
    - NCHW W: masked, (B * 9, C_in * 9) x (C_in * 9, C_out) against W viewed as (C_out, C_in * 9) (9x the
      products, but per tap it would need W copied channels-last: slower on the up blocks' small W)."""
    masks, _ = _tables(hc, wc, zb.device, dtype)  # (9 classes, 9 taps)
    b, cin = zb.shape
    cout = weight.shape[0]
    zb = zb.to(dtype)
    if tu.is_channels_last(weight):
        w = weight.to(dtype).permute(0, 2, 3, 1).reshape(cout * 9, cin)  # rows (o, t): a view
        return masks @ (zb @ w.t()).view(b, cout, 9).transpose(1, 2)
    k = zb[:, None, :, None] * masks[None, :, None, :]  # (B, 9, C_in, 9)
    return (k.reshape(b * 9, cin * 9) @ weight.to(dtype).reshape(cout, cin * 9).t()).view(b, 9, cout)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _line_class(i, n):
        """Border class of position i along a line of n conv-output pixels: 0 the first (also when n == 1), 2
        the last, 1 those between (_line_taps)."""
        return tl.where(i == 0, 0, tl.where(i == n - 1, 2, 1))

    @triton.jit
    def _zconv_y(c_base,  # conv output of this sample
                 e_base,  # (9, C) E of this sample
                 cb, e_mid,  # (BLOCK_C,) conv bias, E of the interior class
                 cy, cx,  # (BLOCK_P,) conv-output row / column
                 c_off,  # (BLOCK_P, BLOCK_C) offsets into c_base
                 offs_c, mask2, Hc, Wc, e_sq, e_sc,
                 HAS_E: tl.constexpr, ACC: tl.constexpr):
        """y = conv_out + bias + E[class] on a (BLOCK_P, BLOCK_C) tile, 0 where mask2 is False. Only
        border pixels gather E (interior lanes take e_mid from registers, their loads are masked off)."""
        y = tl.load(c_base + c_off, mask=mask2, other=0.0).to(ACC) + (cb + e_mid)[None, :]
        if HAS_E:
            q = 3 * _line_class(cy, Hc) + _line_class(cx, Wc)
            border = q != 4
            if tl.max(border.to(tl.int32), axis=0) > 0:  # only tiles that touch the border gather E
                eb = tl.load(e_base + q[:, None] * e_sq + offs_c[None, :] * e_sc, mask=mask2 & border[:, None],
                             other=0.0).to(ACC)
                y += tl.where(border[:, None], eb - e_mid[None, :], 0.0)
        return tl.where(mask2, y, 0.0)

    @triton.jit
    def _zconv_channel_vectors(cb_ptr, e_base, stat_ptr, offs_c, mc, C, e_sq, e_sc,
                               HAS_E: tl.constexpr, HAS_CB: tl.constexpr, ACC: tl.constexpr):
        """Per-channel vectors of a tile: conv bias, interior E, and the BN statistics
        stat = (4 + B, C): mean, invstd, scale = gamma * invstd, shift = beta - mean * scale (rows 0-3 here)."""
        if HAS_CB:
            cb = tl.load(cb_ptr + offs_c, mask=mc, other=0.0).to(ACC)
        else:
            cb = tl.zeros(offs_c.shape, ACC)
        if HAS_E:
            e_mid = tl.load(e_base + 4 * e_sq + offs_c * e_sc, mask=mc, other=0.0).to(ACC)
        else:
            e_mid = tl.zeros(offs_c.shape, ACC)
        mean = tl.load(stat_ptr + offs_c, mask=mc, other=0.0).to(ACC)
        invstd = tl.load(stat_ptr + C + offs_c, mask=mc, other=0.0).to(ACC)
        scale = tl.load(stat_ptr + 2 * C + offs_c, mask=mc, other=0.0).to(ACC)
        shift = tl.load(stat_ptr + 3 * C + offs_c, mask=mc, other=0.0).to(ACC)
        return cb, e_mid, mean, invstd, scale, shift

    @triton.jit
    def _zconv_stats_kernel(
        c_ptr,  # (B, C, Hc, Wc) conv output without bias, flat (h, w) plane, any channel stride
        e_ptr,  # (B, 9, C) E(zb) if HAS_E
        cb_ptr,  # (C,) conv bias if HAS_CB
        part_ptr,  # (B * rows_per_plane, 3, C) out: per-program count, mean, M2 of y
        C, Hc, Wc, rows_per_plane,
        c_sn, c_sc, c_sw, e_sn, e_sq, e_sc,
        CL: tl.constexpr, HAS_E: tl.constexpr, HAS_CB: tl.constexpr, ACC: tl.constexpr,
        LOOP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Count, mean and M2 of y = conv_out + bias + E[class] per channel over LOOP consecutive tiles;
        program (tile group, channel block, sample). The first tile's mean is the shift K (one cross-thread
        sum); every tile then adds y - K and (y - K)^2 lane by lane, and one cross-thread step at the end
        gives mean = K + S1 / n, M2 = S2 - S1^2 / n, with |S1 / n| small against the spread (shifted data:
        no E[y^2] - E[y]^2 cancellation)."""
        if CL:  # unit strides as constants: vector loads along C (NHWC) or along the pixels (NCHW)
            c_sc = 1
        else:
            c_sw = 1
        pid_p = tl.program_id(0)
        pid_c = tl.program_id(1)
        n = tl.program_id(2)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mc = offs_c < C
        e_base = e_ptr + n * e_sn
        c_base = c_ptr + n * c_sn
        if HAS_CB:
            cb = tl.load(cb_ptr + offs_c, mask=mc, other=0.0).to(ACC)
        else:
            cb = tl.zeros([BLOCK_C], ACC)
        if HAS_E:
            e_mid = tl.load(e_base + 4 * e_sq + offs_c * e_sc, mask=mc, other=0.0).to(ACC)
        else:
            e_mid = tl.zeros([BLOCK_C], ACC)
        s1 = tl.zeros([BLOCK_P, BLOCK_C], ACC)
        s2 = tl.zeros([BLOCK_P, BLOCK_C], ACC)
        cnt = tl.zeros([BLOCK_P], ACC)
        shift = tl.zeros([BLOCK_C], ACC)
        for k in tl.static_range(LOOP):
            offs_p = (pid_p * LOOP + k) * BLOCK_P + tl.arange(0, BLOCK_P)
            mp = offs_p < Hc * Wc
            mask2 = mp[:, None] & mc[None, :]
            cy = offs_p // Wc
            cx = offs_p - cy * Wc
            c_off = (offs_p * c_sw)[:, None] + (offs_c * c_sc)[None, :]
            y = _zconv_y(c_base, e_base, cb, e_mid, cy, cx, c_off, offs_c, mask2, Hc, Wc, e_sq, e_sc, HAS_E, ACC)
            if k == 0:  # the first tile has a pixel (the launch has no empty group)
                shift = tl.sum(y, axis=0) / tl.sum(mp.to(ACC), axis=0)
            d = tl.where(mask2, y - shift[None, :], 0.0)
            s1 += d
            s2 += d * d
            cnt += mp.to(ACC)
        n_t = tl.sum(cnt, axis=0)
        t1 = tl.sum(s1, axis=0)
        base = part_ptr + (n * rows_per_plane + pid_p) * 3 * C + offs_c
        tl.store(base, tl.zeros([BLOCK_C], ACC) + n_t, mask=mc)
        tl.store(base + C, shift + t1 / n_t, mask=mc)
        tl.store(base + 2 * C, tl.maximum(tl.sum(s2, axis=0) - t1 * t1 / n_t, 0.0), mask=mc)

    @triton.jit
    def _zconv_finalize_kernel(
        part_ptr,  # (B * rows_per_plane, 3, C) from _zconv_stats_kernel, if BATCH_STATS
        w_ptr, b_ptr,  # (C,) BN weight / bias, if AFFINE
        rm_ptr, rv_ptr,  # (C,) running mean / var: read
        rm_out_ptr, rv_out_ptr,  # (C,) out if UPDATE: the updated running stats (may be rm_ptr / rv_ptr)
        stat_ptr,  # (4 + B, C) out: mean, invstd, scale, shift, then X[n] = sum over sample n of x^
        B, C, rows_per_plane, eps, factor,
        BATCH_STATS: tl.constexpr, UPDATE: tl.constexpr, AFFINE: tl.constexpr, ACC: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Per channel: the normalisation statistics (batch statistics from the per-program partials, or the
        running ones) and the folded scale / shift. The partials merge BLOCK_S rows at a time: a chunk's
        n = sum n_i, mean = sum n_i mean_i / n, M2 = sum M2_i + sum n_i (mean_i - mean)^2 (no E[y^2] - E[y]^2
        cancellation), and chunks combine with Chan's formula:
          n = n_a + n_b, mean = mean_a + d n_b / n, M2 = M2_a + M2_b + d^2 n_a n_b / n, d = mean_b - mean_a.
        Running update as F.batch_norm:
          running_mean = (1 - f) running_mean + f mean,  running_var = (1 - f) running_var + f M2 / (n - 1).
        Program (channel block, g), g < G: each merges all rows (a few extra reads, not a second launch);
        program g == 0 writes the statistics and the running update, and each program the samples
        n = g, g + G, ...: X[n] = sum_p x^ = invstd sum_rows n_i (mean_i - mean) over the sample's rows (0
        without batch statistics); the backward needs it (dL/dE) and so does not sum x^ again. G = min(B,
        FIN_SAMPLE_PROGRAMS): the samples in parallel, the re-merged rows growing as G B, not B^2."""
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        g = tl.program_id(1)
        n_prog = tl.num_programs(1)
        mc = offs_c < C
        offs_s = tl.arange(0, BLOCK_S)
        n_rows = B * rows_per_plane
        if BATCH_STATS:
            cnt = tl.zeros([BLOCK_C], ACC)
            mean = tl.zeros([BLOCK_C], ACC)
            m2 = tl.zeros([BLOCK_C], ACC)
            for r0 in range(0, n_rows, BLOCK_S):
                r = r0 + offs_s
                m = (r < n_rows)[:, None] & mc[None, :]
                off = (r * 3 * C)[:, None] + offs_c[None, :]
                cnt_s = tl.load(part_ptr + off, mask=m, other=0.0).to(ACC)
                mean_s = tl.load(part_ptr + off + C, mask=m, other=0.0).to(ACC)
                m2_s = tl.load(part_ptr + off + 2 * C, mask=m, other=0.0).to(ACC)
                cnt_b = tl.sum(cnt_s, axis=0)
                mean_b = tl.sum(cnt_s * mean_s, axis=0) / tl.where(cnt_b > 0, cnt_b, 1.0)
                dev = mean_s - mean_b[None, :]
                m2_b = tl.sum(m2_s + cnt_s * dev * dev, axis=0)
                tot = cnt + cnt_b
                frac = tl.where(tot > 0, cnt_b / tl.where(tot > 0, tot, 1.0), 0.0)
                delta = mean_b - mean
                mean += delta * frac
                m2 += m2_b + delta * delta * cnt * frac
                cnt = tot
            cnt = tl.where(mc, cnt, 2.0)  # lanes past C: keep them finite
            var = m2 / cnt
            if UPDATE and g == 0:
                rm = tl.load(rm_ptr + offs_c, mask=mc, other=0.0)
                rv = tl.load(rv_ptr + offs_c, mask=mc, other=0.0)
                new_rm = (1.0 - factor) * rm.to(ACC) + factor * mean
                new_rv = (1.0 - factor) * rv.to(ACC) + factor * (m2 / (cnt - 1.0))
                tl.store(rm_out_ptr + offs_c, new_rm.to(rm.dtype), mask=mc)
                tl.store(rv_out_ptr + offs_c, new_rv.to(rv.dtype), mask=mc)
        else:
            mean = tl.load(rm_ptr + offs_c, mask=mc, other=0.0).to(ACC)
            var = tl.load(rv_ptr + offs_c, mask=mc, other=1.0).to(ACC)
        invstd = 1.0 / tl.sqrt(var + eps)
        if AFFINE:
            gamma = tl.load(w_ptr + offs_c, mask=mc, other=0.0).to(ACC)
            beta = tl.load(b_ptr + offs_c, mask=mc, other=0.0).to(ACC)
        else:
            gamma = tl.full([BLOCK_C], 1.0, ACC)
            beta = tl.zeros([BLOCK_C], ACC)
        scale = gamma * invstd
        if g == 0:
            tl.store(stat_ptr + offs_c, mean, mask=mc)
            tl.store(stat_ptr + C + offs_c, invstd, mask=mc)
            tl.store(stat_ptr + 2 * C + offs_c, scale, mask=mc)
            tl.store(stat_ptr + 3 * C + offs_c, beta - mean * scale, mask=mc)
        for n in range(g, B, n_prog):
            xn = tl.zeros([BLOCK_C], ACC)
            if BATCH_STATS:
                for r0 in range(0, rows_per_plane, BLOCK_S):
                    r = r0 + offs_s
                    m = (r < rows_per_plane)[:, None] & mc[None, :]
                    off = ((n * rows_per_plane + r) * 3 * C)[:, None] + offs_c[None, :]
                    cnt_s = tl.load(part_ptr + off, mask=m, other=0.0).to(ACC)
                    mean_s = tl.load(part_ptr + off + C, mask=m, other=0.0).to(ACC)
                    xn += tl.sum(cnt_s * (mean_s - mean[None, :]), axis=0)
            tl.store(stat_ptr + (4 + n) * C + offs_c, xn * invstd, mask=mc)

    @triton.jit
    def _zconv_fwd_kernel(
        c_ptr,  # (B, C, Hc, Wc) conv output without bias, flat (h, w) plane
        e_ptr,  # (B, 9, C) E(zb) if HAS_E
        cb_ptr,  # (C,) conv bias if HAS_CB
        stat_ptr,  # (4 + B, C) mean, invstd, scale, shift, ...
        out_ptr,  # (B, C, Ho, Wo) out, flat (h, w) plane; Ho = Hc // 2 when POOL
        C, Hc, Wc, Ho, Wo,
        c_sn, c_sc, c_sh, c_sw, c_pw, e_sn, e_sq, e_sc, o_sn, o_sc, o_sw,
        CL: tl.constexpr, O_CL: tl.constexpr, HAS_E: tl.constexpr, HAS_CB: tl.constexpr, POOL: tl.constexpr,
        ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """out = [avgpool2x2] relu(scale * (conv_out + bias + E[class]) + shift), one program per
        (BLOCK_P output pixels, BLOCK_C channels, sample). CL / O_CL: conv_out / out channels-last (they may
        differ: a channels-last convolution inside an NCHW block)."""
        if CL:  # unit strides as constants: vector loads along C (NHWC) or along the pixels (NCHW)
            c_sc = 1
        else:
            c_pw = 1
            c_sw = 1
        if O_CL:
            o_sc = 1
        else:
            o_sw = 1
        pid_p = tl.program_id(0)
        pid_c = tl.program_id(1)
        n = tl.program_id(2)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mp = offs_p < Ho * Wo
        mc = offs_c < C
        mask2 = mp[:, None] & mc[None, :]
        e_base = e_ptr + n * e_sn
        c_base = c_ptr + n * c_sn
        cb, e_mid, mean, invstd, scale, shift = _zconv_channel_vectors(cb_ptr, e_base, stat_ptr, offs_c, mc, C,
                                                                       e_sq, e_sc, HAS_E, HAS_CB, ACC)
        oy = offs_p // Wo
        ox = offs_p - oy * Wo
        if POOL:
            acc = tl.zeros([BLOCK_P, BLOCK_C], ACC)
            for d in tl.static_range(4):
                cy = 2 * oy + d // 2
                cx = 2 * ox + d % 2
                c_off = (cy * c_sh + cx * c_sw)[:, None] + (offs_c * c_sc)[None, :]
                y = _zconv_y(c_base, e_base, cb, e_mid, cy, cx, c_off, offs_c, mask2, Hc, Wc, e_sq, e_sc,
                             HAS_E, ACC)
                acc += tl.maximum(y * scale[None, :] + shift[None, :], 0.0)
            res = acc * 0.25
        else:
            c_off = (offs_p * c_pw)[:, None] + (offs_c * c_sc)[None, :]  # flat plane: vector loads
            y = _zconv_y(c_base, e_base, cb, e_mid, oy, ox, c_off, offs_c, mask2, Hc, Wc, e_sq, e_sc,
                         HAS_E, ACC)
            res = tl.maximum(y * scale[None, :] + shift[None, :], 0.0)
        o_off = (offs_p * o_sw)[:, None] + (offs_c * o_sc)[None, :]
        tl.store(out_ptr + n * o_sn + o_off, res.to(out_ptr.dtype.element_ty), mask=mask2)

    # Backward maths. Per channel o, with y the pre-BN value, x^ = (y - mean) invstd, z = gamma x^ + beta,
    # r = relu(z), out = pool(r), g = dL/dr (pool backward: dL/dout / 4 at the 4 pixels of a window, 0 at a
    # leftover odd row / column) and g' = g [z > 0]:
    #   dL/dbeta = sum_p g' = S1,   dL/dgamma = sum_p g' x^ = S2      (sums over all B x Hc x Wc pixels)
    #   batch statistics (M = B Hc Wc):  dL/dy = a (g' - S1 / M - x^ S2 / M),   a = gamma invstd
    #   running statistics:              dL/dy = a g'
    # written as dL/dy = a g' + u + v y with u = a (-S1 + S2 mean invstd) / M, v = -a S2 invstd / M (0, 0
    # in eval). E enters y as y[n, o, p] += E[n, class(p), o], so dL/dE[n, q, o] = sum_{p in q} dL/dy:
    #   G[n, q, o] = a (S1[n, q] - count_q S1 / M - X[n, q] S2 / M),   X[n, q] = sum_{p in q} x^
    # (S1[n, q]: the class-q part of S1 for sample n). dL/dbias[o] = sum_{n, q} G. Only the 8 border classes
    # need class sums; the interior one is the per-sample total minus them, so the reduction pass takes
    # per-sample totals of (g', g' x^) over all pixels and class sums of (g', x^) over the border pixels
    # only. The per-sample total of x^ (X[n], needed with batch statistics only) comes from the forward's
    # statistics partials (_zconv_finalize_kernel): the reduction pass does not sum x^.
    # dL/dzb[n, c] and the E term of dL/dW follow from G by autograd of `border_bias`:
    #   dL/dzb[n, c] = sum_{o, q} G[n, q, o] sum_{ky, kx} W[o, c, ky, kx] mask_q[ky, kx].

    @triton.jit
    def _zconv_grad_tile(c_base, e_base, go_base, cb, e_mid, mean, invstd, scale, shift,
                         cy, cx, c_off, go_p, offs_c, mask2, Hc, Wc, Ho, Wo, e_sq, e_sc, go_sc, go_sh, go_sw,
                         HAS_E: tl.constexpr, POOL: tl.constexpr, ACC: tl.constexpr):
        """(y, g', x^) on a tile of conv-output pixels (cy, cx); all 0 where mask2 is False. go_p: the
        pixels' offsets into dL/dout when not POOL (flat index times the pixel stride: vector loads)."""
        y = _zconv_y(c_base, e_base, cb, e_mid, cy, cx, c_off, offs_c, mask2, Hc, Wc, e_sq, e_sc, HAS_E, ACC)
        z = y * scale[None, :] + shift[None, :]
        if POOL:
            inside = ((cy < 2 * Ho) & (cx < 2 * Wo))[:, None]
            go_off = ((cy // 2) * go_sh + (cx // 2) * go_sw)[:, None] + (offs_c * go_sc)[None, :]
            g = tl.load(go_base + go_off, mask=mask2 & inside, other=0.0).to(ACC) * 0.25
        else:
            go_off = go_p[:, None] + (offs_c * go_sc)[None, :]
            g = tl.load(go_base + go_off, mask=mask2, other=0.0).to(ACC)
        gp = tl.where(z > 0, g, 0.0)
        xh = tl.where(mask2, (y - mean[None, :]) * invstd[None, :], 0.0)
        return y, gp, xh

    @triton.jit
    def _zconv_bwd_reduce_kernel(
        c_ptr,  # (B, C, Hc, Wc) conv output, flat plane
        e_ptr,  # (B, 9, C) E if HAS_E
        cb_ptr,  # (C,) conv bias if HAS_CB
        stat_ptr,  # (4 + B, C) mean, invstd, scale, shift, ... of the forward
        go_ptr,  # (B, C, Ho, Wo) dL/dout
        part_ptr,  # (B, rows_per_plane, 2, C) out: per-program sums of g', g' x^
        bord_ptr,  # (B, 2, 9, C) out if HAS_E: per-class sums of g', x^ over the border classes (4 unused)
        C, Hc, Wc, Ho, Wo, rows_per_plane,
        c_sn, c_sc, c_sw, e_sn, e_sq, e_sc, go_sn, go_sc, go_sh, go_sw, go_pw,
        CL: tl.constexpr, HAS_E: tl.constexpr, HAS_CB: tl.constexpr, POOL: tl.constexpr, ACC: tl.constexpr,
        BORDER: tl.constexpr, LOOP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Not BORDER: program (tile group, channel block, sample) sums LOOP consecutive tiles. BORDER (a
        second launch, only with HAS_E; its own compiled variant, so the class sums do not raise the register
        count of the main pass): program (border line, channel block, sample) sums the line's pixels by
        class, BLOCK_P of them a step."""
        if CL:  # unit strides as constants: vector loads along C (NHWC) or along the pixels (NCHW)
            c_sc = 1
            go_sc = 1
        else:
            c_sw = 1
            go_sw = 1
            go_pw = 1
        pid_p = tl.program_id(0)
        pid_c = tl.program_id(1)
        n = tl.program_id(2)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mc = offs_c < C
        e_base = e_ptr + n * e_sn
        c_base = c_ptr + n * c_sn
        go_base = go_ptr + n * go_sn
        cb, e_mid, mean, invstd, scale, shift = _zconv_channel_vectors(cb_ptr, e_base, stat_ptr, offs_c, mc, C,
                                                                       e_sq, e_sc, HAS_E, HAS_CB, ACC)
        if not BORDER:
            a1 = tl.zeros([BLOCK_P, BLOCK_C], ACC)
            a2 = tl.zeros([BLOCK_P, BLOCK_C], ACC)
            for k in tl.static_range(LOOP):  # lane-wise sums, one cross-thread step at the end
                offs_p = (pid_p * LOOP + k) * BLOCK_P + tl.arange(0, BLOCK_P)
                mask2 = (offs_p < Hc * Wc)[:, None] & mc[None, :]
                cy = offs_p // Wc
                cx = offs_p - cy * Wc
                c_off = (offs_p * c_sw)[:, None] + (offs_c * c_sc)[None, :]
                y, gp, xh = _zconv_grad_tile(c_base, e_base, go_base, cb, e_mid, mean, invstd, scale, shift,
                                             cy, cx, c_off, offs_p * go_pw, offs_c, mask2, Hc, Wc, Ho, Wo,
                                             e_sq, e_sc, go_sc, go_sh, go_sw, HAS_E, POOL, ACC)
                a1 += gp
                a2 += gp * xh
            base = part_ptr + (n * rows_per_plane + pid_p) * 2 * C + offs_c
            tl.store(base, tl.sum(a1, axis=0), mask=mc)
            tl.store(base + C, tl.sum(a2, axis=0), mask=mc)
        else:
            # Border line pid_p: 0 the row 0, 1 the row Hc - 1 (if Hc > 1), 2 the column 0 and 3 the column
            # Wc - 1 (if Wc > 1) of the rows in between. A row's pixels fall in three classes (first, middle,
            # last column), a column's in one (3 or 5). Each class has one line, so its sums go straight to
            # bord; a line that does not exist writes zeros.
            line = pid_p
            is_row = line < 2
            length = tl.where(is_row, Wc, tl.maximum(Hc - 2, 0))
            length = tl.where(((line == 1) & (Hc < 2)) | ((line == 3) & (Wc < 2)), 0, length)
            g0 = tl.zeros([BLOCK_P, BLOCK_C], ACC)
            g1 = tl.zeros([BLOCK_P, BLOCK_C], ACC)
            g2 = tl.zeros([BLOCK_P, BLOCK_C], ACC)
            x0 = tl.zeros([BLOCK_P, BLOCK_C], ACC)
            x1 = tl.zeros([BLOCK_P, BLOCK_C], ACC)
            x2 = tl.zeros([BLOCK_P, BLOCK_C], ACC)
            for start in range(0, length, BLOCK_P):
                offs = start + tl.arange(0, BLOCK_P)
                mask2 = (offs < length)[:, None] & mc[None, :]
                cy = tl.where(is_row, tl.where(line == 0, 0, Hc - 1), 1 + offs)
                cx = tl.where(is_row, offs, tl.where(line == 2, 0, Wc - 1))
                c_off = (cy * (c_sw * Wc) + cx * c_sw)[:, None] + (offs_c * c_sc)[None, :]
                y, gp, xh = _zconv_grad_tile(c_base, e_base, go_base, cb, e_mid, mean, invstd, scale, shift,
                                             cy, cx, c_off, cy * go_sh + cx * go_sw, offs_c, mask2, Hc, Wc, Ho,
                                             Wo, e_sq, e_sc, go_sc, go_sh, go_sw, HAS_E, POOL, ACC)
                k = tl.where(is_row, _line_class(cx, Wc), 0)[:, None]
                g0 += tl.where(k == 0, gp, 0.0)
                g1 += tl.where(k == 1, gp, 0.0)
                g2 += tl.where(k == 2, gp, 0.0)
                x0 += tl.where(k == 0, xh, 0.0)
                x1 += tl.where(k == 1, xh, 0.0)
                x2 += tl.where(k == 2, xh, 0.0)
            # first class of the line: 0 (row 0), 6 (row Hc - 1), 3 (column 0), 5 (column Wc - 1)
            q0 = tl.where(line == 0, 0, tl.where(line == 1, 6, tl.where(line == 2, 3, 5)))
            base_g = bord_ptr + (n * 18 + q0) * C + offs_c
            base_x = base_g + 9 * C
            tl.store(base_g, tl.sum(g0, axis=0), mask=mc)
            tl.store(base_x, tl.sum(x0, axis=0), mask=mc)
            if line < 2:
                tl.store(base_g + C, tl.sum(g1, axis=0), mask=mc)
                tl.store(base_x + C, tl.sum(x1, axis=0), mask=mc)
                tl.store(base_g + 2 * C, tl.sum(g2, axis=0), mask=mc)
                tl.store(base_x + 2 * C, tl.sum(x2, axis=0), mask=mc)

    @triton.jit
    def _zconv_bwd_kernel(
        c_ptr,  # (B, C, Hc, Wc) conv output, flat plane
        e_ptr,  # (B, 9, C) E if HAS_E
        cb_ptr,  # (C,) conv bias if HAS_CB
        stat_ptr,  # (4 + B, C) mean, invstd, scale, shift, ...
        coef_ptr,  # (3, C) a, u, v: dL/dy = a g' + u + v y
        go_ptr,  # (B, C, Ho, Wo) dL/dout
        gy_ptr,  # (B, C, Hc, Wc) out: dL/dconv_out, conv_out's strides
        C, Hc, Wc, Ho, Wo,
        c_sn, c_sc, c_sw, e_sn, e_sq, e_sc, go_sn, go_sc, go_sh, go_sw, go_pw,
        CL: tl.constexpr, HAS_E: tl.constexpr, HAS_CB: tl.constexpr, POOL: tl.constexpr, ACC: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        if CL:  # unit strides as constants: vector loads along C (NHWC) or along the pixels (NCHW)
            c_sc = 1
            go_sc = 1
        else:
            c_sw = 1
            go_sw = 1
            go_pw = 1
        pid_p = tl.program_id(0)
        pid_c = tl.program_id(1)
        n = tl.program_id(2)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mc = offs_c < C
        mask2 = (offs_p < Hc * Wc)[:, None] & mc[None, :]
        e_base = e_ptr + n * e_sn
        cb, e_mid, mean, invstd, scale, shift = _zconv_channel_vectors(cb_ptr, e_base, stat_ptr, offs_c, mc, C,
                                                                       e_sq, e_sc, HAS_E, HAS_CB, ACC)
        a = tl.load(coef_ptr + offs_c, mask=mc, other=0.0).to(ACC)
        u = tl.load(coef_ptr + C + offs_c, mask=mc, other=0.0).to(ACC)
        v = tl.load(coef_ptr + 2 * C + offs_c, mask=mc, other=0.0).to(ACC)
        cy = offs_p // Wc
        cx = offs_p - cy * Wc
        c_off = (offs_p * c_sw)[:, None] + (offs_c * c_sc)[None, :]
        y, gp, xh = _zconv_grad_tile(c_ptr + n * c_sn, e_base, go_ptr + n * go_sn, cb, e_mid, mean, invstd,
                                     scale, shift, cy, cx, c_off, offs_p * go_pw, offs_c, mask2, Hc, Wc, Ho, Wo,
                                     e_sq, e_sc, go_sc, go_sh, go_sw, HAS_E, POOL, ACC)
        gy = a[None, :] * gp + u[None, :] + v[None, :] * y
        tl.store(gy_ptr + n * c_sn + c_off, gy.to(gy_ptr.dtype.element_ty), mask=mask2)

    @triton.jit
    def _zconv_bwd_finalize_kernel(
        part_ptr,  # (B, rows_per_plane, 2, C) from _zconv_bwd_reduce_kernel: sums of g', g' x^
        bord_ptr,  # (B, 2, 9, C) if HAS_E: per-class sums of g', x^ (class 4 unused)
        stat_ptr,  # (4 + B, C): mean, invstd, scale, shift, X[n] (_zconv_finalize_kernel)
        w_ptr,  # (C,) BN weight, if AFFINE
        cnt_ptr,  # (9,) pixels per border class, if HAS_E
        coef_ptr,  # (3, C) out: a, u, v of dL/dy = a g' + u + v y (y the pre-BN value; _zconv_bwd_kernel)
        ge_ptr,  # (B, 9, C) out if HAS_E: dL/dE
        gcb_ptr, gg_ptr, gb_ptr,  # (C,) out: dL/dconv bias, dL/dgamma, dL/dbeta
        B, C, rows_per_plane, M,  # M = B * Hc * Wc pixels per channel
        BATCH_STATS: tl.constexpr, HAS_E: tl.constexpr, AFFINE: tl.constexpr, ACC: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Program (channel block, sample n). Per channel: S1 = sum g', Sx = sum g' x^ over the batch (every
        program sums all B * rows_per_plane rows: a few extra reads, not a second launch), X = sum_n X[n]; with
        a = gamma invstd and (batch statistics) k1 = S1 / M, k2 = Sx / M, program n == 0 writes
          dL/dbeta = S1, dL/dgamma = Sx, coef = (a, a (k2 mean invstd - k1), -a k2 invstd),
          dL/dconv bias = sum_p dL/dy = a (S1 - M k1 - k2 X),
        and each program its sample's dL/dE[n, q] = a (S1[n, q] - count_q k1 - X[n, q] k2) (interior class
        4 = the sample's total minus its border classes)."""
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        n = tl.program_id(1)
        mc = offs_c < C
        offs_s = tl.arange(0, BLOCK_S)
        s1 = tl.zeros([BLOCK_C], ACC)
        sx = tl.zeros([BLOCK_C], ACC)
        rows = B * rows_per_plane
        for r0 in range(0, rows, BLOCK_S):  # (BLOCK_S partials x BLOCK_C channels) a step
            r = r0 + offs_s
            off = (r * 2 * C)[:, None] + offs_c[None, :]
            m2 = (r < rows)[:, None] & mc[None, :]
            s1 += tl.sum(tl.load(part_ptr + off, mask=m2, other=0.0).to(ACC), axis=0)
            sx += tl.sum(tl.load(part_ptr + off + C, mask=m2, other=0.0).to(ACC), axis=0)
        xs = tl.zeros([BLOCK_C], ACC)
        for i in range(B):
            xs += tl.load(stat_ptr + (4 + i) * C + offs_c, mask=mc, other=0.0).to(ACC)
        mean = tl.load(stat_ptr + offs_c, mask=mc, other=0.0).to(ACC)
        invstd = tl.load(stat_ptr + C + offs_c, mask=mc, other=0.0).to(ACC)
        if AFFINE:
            a = tl.load(w_ptr + offs_c, mask=mc, other=0.0).to(ACC) * invstd
        else:
            a = invstd
        m = tl.zeros([BLOCK_C], ACC) + M  # exact in fp32 below 2**24 pixels, and M may be a constexpr 1
        if BATCH_STATS:
            k1 = s1 / m
            k2 = sx / m
        else:
            k1 = tl.zeros([BLOCK_C], ACC)
            k2 = tl.zeros([BLOCK_C], ACC)
        if n == 0:
            tl.store(coef_ptr + offs_c, a, mask=mc)
            tl.store(coef_ptr + C + offs_c, a * (k2 * mean * invstd - k1), mask=mc)
            tl.store(coef_ptr + 2 * C + offs_c, -a * k2 * invstd, mask=mc)
            tl.store(gg_ptr + offs_c, sx, mask=mc)
            tl.store(gb_ptr + offs_c, s1, mask=mc)
            tl.store(gcb_ptr + offs_c, a * (s1 - m * k1 - k2 * xs), mask=mc)
        if HAS_E:
            if n < B:  # (an empty batch still runs one program: the per-channel outputs above)
                t1 = tl.zeros([BLOCK_C], ACC)  # this sample's S1 and X, then minus its border classes
                tx = tl.load(stat_ptr + (4 + n) * C + offs_c, mask=mc, other=0.0).to(ACC)
                for r0 in range(0, rows_per_plane, BLOCK_S):
                    r = r0 + offs_s
                    off = ((n * rows_per_plane + r) * 2 * C)[:, None] + offs_c[None, :]
                    m2 = (r < rows_per_plane)[:, None] & mc[None, :]
                    t1 += tl.sum(tl.load(part_ptr + off, mask=m2, other=0.0).to(ACC), axis=0)
                for q in tl.static_range(9):
                    if q != 4:
                        b1 = tl.load(bord_ptr + (n * 18 + q) * C + offs_c, mask=mc, other=0.0).to(ACC)
                        bx = tl.load(bord_ptr + (n * 18 + 9 + q) * C + offs_c, mask=mc, other=0.0).to(ACC)
                        ge = a * (b1 - tl.load(cnt_ptr + q).to(ACC) * k1 - bx * k2)
                        tl.store(ge_ptr + (n * 9 + q) * C + offs_c, ge, mask=mc)
                        t1 -= b1
                        tx -= bx
                ge = a * (t1 - tl.load(cnt_ptr + 4).to(ACC) * k1 - tx * k2)
                tl.store(ge_ptr + (n * 9 + 4) * C + offs_c, ge, mask=mc)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------

def _acc(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _acc_torch(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# Tile sizes (elements per (BLOCK_P, BLOCK_C) tile) and warps. The epilogue passes (forward, dL/dconv_out)
# keep 1024-element tiles: bigger ones push the pooled epilogue past 200 registers per thread (sm_90). The
# reductions (statistics, backward sums) sum RED_LOOP tiles of RED_TILE a program, lane by lane. FIN_ROWS x
# FIN_CHANNELS: the partial rows and channels a finalize step merges at once. Chosen on an H200, batch 8
# (bench/results/h200-2026-12-01-s14/zconv_sweep4.txt): one 4096-element tile a program at 8 warps with
# 64-channel channels-last tiles, down 256 -> 512 training 1.42x / 1.41x the unfused block (fp32 / fp16);
# 4 warps, 2 tiles and 32 channels, 1.50x / 1.69x. Bigger epilogue tiles changed little.
TILE, TILE_WARPS = 1024, 4
RED_TILE, RED_WARPS, RED_LOOP = 4096, 4, 2
FIN_ROWS, FIN_CHANNELS = 128, 16
FIN_SAMPLE_PROGRAMS = 8  # the statistics finalize's programs a channel block (samples in parallel)
BORDER_PIXELS = 32  # pixels of a border line a step (by the epilogue tiles' channels)
CL_BLOCK_C = 32  # channels of a channels-last tile


def _tiles(c: int, channels_last: bool, tile: int | None = None) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of `tile` (default TILE) elements, wide along the contiguous axis (C for
    channels-last, the pixels for NCHW)."""
    tile = TILE if tile is None else tile
    block_c = min(CL_BLOCK_C if channels_last else 4, tu.next_pow2(c))
    return max(16, tile // block_c), block_c


def _tile_groups(pixels: int, block_p: int) -> tuple[int, int]:
    """(tiles a reduction program sums, programs = partial rows a plane): RED_LOOP tiles, fewer where the
    plane has fewer, so no program is empty."""
    tiles = triton.cdiv(pixels, block_p)
    loop = max(1, min(RED_LOOP, tiles))
    return loop, triton.cdiv(tiles, loop)


def _e_strides(e: torch.Tensor | None) -> tuple[int, int, int]:
    return tuple(e.stride()) if e is not None else (0, 0, 0)


def _check_numel(t: torch.Tensor) -> None:
    if t.numel() > INT32_MAX:
        raise ValueError(f"zconv_block: tensor of shape {tuple(t.shape)} has {t.numel()} elements, over the "
                         f"int32 offset limit {INT32_MAX}")


def _zconv_fwd(conv_out, e, cbias, gamma, beta, running_mean, running_var, batch_stats: bool, update: bool,
               factor: float, eps: float, pool: bool, out_channels_last: bool | None = None, running_out=None):
    """-> (out, stat (4 + B, C): mean, invstd, scale, shift, X[n] (_zconv_finalize_kernel)). out is
    channels-last if out_channels_last (default: as conv_out). With `update`, the new running statistics go
    to running_out = (mean, var) if given, else into running_mean / running_var in place."""
    b, c, hc, wc = conv_out.shape
    _check_numel(conv_out)
    cl = tu.is_channels_last(conv_out)
    out_cl = cl if out_channels_last is None else out_channels_last
    conv_out = relayout(conv_out, cl)
    ho, wo = (hc // 2, wc // 2) if pool else (hc, wc)
    acc, acc_t = _acc(conv_out), _acc_torch(conv_out)
    e_sn, e_sq, e_sc = _e_strides(e)
    dummy = conv_out
    stat = _empty(4 + b, c, device=conv_out.device, dtype=acc_t)
    part = None
    rpp = 0
    if batch_stats:
        block_p, block_c = _tiles(c, cl, RED_TILE)
        loop, rpp = _tile_groups(hc * wc, block_p)
        part = _empty(b * rpp, 3, c, device=conv_out.device, dtype=acc_t)
        _zconv_stats_kernel[(rpp, triton.cdiv(c, block_c), b)](
            c_ptr=conv_out, e_ptr=e if e is not None else dummy, cb_ptr=cbias if cbias is not None else dummy,
            part_ptr=part, C=c, Hc=hc, Wc=wc, rows_per_plane=rpp,
            c_sn=conv_out.stride(0), c_sc=conv_out.stride(1), c_sw=tu.pixel_stride(conv_out),
            e_sn=e_sn, e_sq=e_sq, e_sc=e_sc, CL=cl, HAS_E=e is not None, HAS_CB=cbias is not None, ACC=acc,
            LOOP=loop, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=RED_WARPS)
    # (at least one program a channel block: an empty batch still gets its statistics rows)
    _zconv_finalize_kernel[(triton.cdiv(c, FIN_CHANNELS), max(1, min(b, FIN_SAMPLE_PROGRAMS)))](
        part_ptr=part if part is not None else stat, w_ptr=gamma if gamma is not None else stat,
        b_ptr=beta if beta is not None else stat,
        rm_ptr=running_mean if running_mean is not None else stat,
        rv_ptr=running_var if running_var is not None else stat,
        rm_out_ptr=running_out[0] if running_out is not None else (running_mean if update else stat),
        rv_out_ptr=running_out[1] if running_out is not None else (running_var if update else stat), stat_ptr=stat,
        B=b, C=c, rows_per_plane=rpp, eps=float(eps), factor=float(factor), BATCH_STATS=batch_stats, UPDATE=update,
        AFFINE=gamma is not None, ACC=acc, BLOCK_S=FIN_ROWS, BLOCK_C=FIN_CHANNELS)
    out = _empty((b, c, ho, wo), device=conv_out.device, dtype=conv_out.dtype,
                 memory_format=tu.memory_format(out_cl))
    if out.numel() == 0:
        return out, stat
    block_p, block_c = _tiles(c, cl)
    _zconv_fwd_kernel[(triton.cdiv(ho * wo, block_p), triton.cdiv(c, block_c), b)](
        c_ptr=conv_out, e_ptr=e if e is not None else dummy, cb_ptr=cbias if cbias is not None else dummy,
        stat_ptr=stat, out_ptr=out, C=c, Hc=hc, Wc=wc, Ho=ho, Wo=wo,
        c_sn=conv_out.stride(0), c_sc=conv_out.stride(1), c_sh=conv_out.stride(2), c_sw=conv_out.stride(3),
        c_pw=tu.pixel_stride(conv_out), e_sn=e_sn, e_sq=e_sq, e_sc=e_sc, o_sn=out.stride(0), o_sc=out.stride(1),
        o_sw=tu.pixel_stride(out), CL=cl, O_CL=out_cl, HAS_E=e is not None, HAS_CB=cbias is not None, POOL=pool,
        ACC=acc, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=TILE_WARPS)
    return out, stat


def _zconv_bwd(grad_out, conv_out, e, cbias, gamma, stat, batch_stats: bool, pool: bool,
               need_e: bool):
    """-> (dL/dconv_out in conv_out's layout, dL/dE (B, 9, C) or None, dL/dbias (C,), dL/dgamma (C,),
    dL/dbeta (C,)), the per-channel ones in the accumulation dtype."""
    b, c, hc, wc = conv_out.shape
    cl = tu.is_channels_last(conv_out)
    # dL/dout in conv_out's layout (a channels-last convolution inside an NCHW block gets it NCHW): the
    # kernels read it along the same axis as conv_out; gathered across the other, its loads were 2-4 useful
    # bytes a 32-byte sector.
    grad_out = relayout(grad_out, cl)
    ho, wo = grad_out.shape[2:]
    acc, acc_t = _acc(conv_out), _acc_torch(conv_out)
    e_sn, e_sq, e_sc = _e_strides(e)
    has_e = e is not None
    dummy = conv_out
    common = dict(c_ptr=conv_out, e_ptr=e if has_e else dummy, cb_ptr=cbias if cbias is not None else dummy,
                  stat_ptr=stat, go_ptr=grad_out, C=c, Hc=hc, Wc=wc, Ho=ho, Wo=wo,
                  c_sn=conv_out.stride(0), c_sc=conv_out.stride(1), c_sw=tu.pixel_stride(conv_out),
                  e_sn=e_sn, e_sq=e_sq, e_sc=e_sc, go_sn=grad_out.stride(0), go_sc=grad_out.stride(1),
                  go_sh=grad_out.stride(2), go_sw=grad_out.stride(3), go_pw=tu.pixel_stride(grad_out),
                  CL=cl, HAS_E=has_e, HAS_CB=cbias is not None, POOL=pool, ACC=acc)
    block_p, block_c = _tiles(c, cl, RED_TILE)
    n_cb = triton.cdiv(c, block_c)
    loop, rpp = _tile_groups(hc * wc, block_p)
    part = _empty(b, rpp, 2, c, device=conv_out.device, dtype=acc_t)
    bord = _empty(b, 2, 9, c, device=conv_out.device, dtype=acc_t) if has_e else part
    _check_numel(bord)  # 18 B C: more than conv_out on maps of under 18 pixels
    _zconv_bwd_reduce_kernel[(rpp, n_cb, b)](part_ptr=part, bord_ptr=bord, rows_per_plane=rpp, BORDER=False,
                                            LOOP=loop, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=RED_WARPS,
                                            **common)
    if has_e:  # the four border lines
        bc = _tiles(c, cl)[1]
        _zconv_bwd_reduce_kernel[(4, triton.cdiv(c, bc), b)](
            part_ptr=part, bord_ptr=bord, rows_per_plane=rpp, BORDER=True, LOOP=1, BLOCK_P=BORDER_PIXELS,
            BLOCK_C=bc, num_warps=TILE_WARPS, **common)
    # The per-channel math between the two passes, in one launch (it was ~20 small torch ops a block).
    coef = _empty(3, c, device=conv_out.device, dtype=acc_t)
    grad_e = _empty(b, 9, c, device=conv_out.device, dtype=acc_t) if has_e else None
    grad_cb, d_gamma, d_beta = (_empty(c, device=conv_out.device, dtype=acc_t) for _ in range(3))
    counts = _tables(hc, wc, conv_out.device, acc_t)[1] if has_e else stat
    _zconv_bwd_finalize_kernel[(triton.cdiv(c, FIN_CHANNELS), max(b, 1) if has_e else 1)](
        part_ptr=part, bord_ptr=bord, stat_ptr=stat, w_ptr=gamma if gamma is not None else stat, cnt_ptr=counts,
        coef_ptr=coef, ge_ptr=grad_e if has_e else coef, gcb_ptr=grad_cb, gg_ptr=d_gamma, gb_ptr=d_beta,
        B=b, C=c, rows_per_plane=rpp, M=b * hc * wc, BATCH_STATS=batch_stats, HAS_E=has_e,
        AFFINE=gamma is not None, ACC=acc, BLOCK_S=FIN_ROWS, BLOCK_C=FIN_CHANNELS)
    grad_conv = _empty(conv_out.shape, device=conv_out.device, dtype=conv_out.dtype,
                       memory_format=tu.memory_format(cl))
    block_p, block_c = _tiles(c, cl)
    _zconv_bwd_kernel[(triton.cdiv(hc * wc, block_p), triton.cdiv(c, block_c), b)](
        coef_ptr=coef, gy_ptr=grad_conv, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=TILE_WARPS, **common)
    return grad_conv, grad_e if need_e else None, grad_cb, d_gamma, d_beta


# ----------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------

class ZConvEpilogueFn(torch.autograd.Function):
    """(conv_out, E, conv bias, BN weight, BN bias) -> [pool] relu(BN(conv_out + bias + E[class]))."""

    @staticmethod
    def forward(ctx, conv_out, e, cbias, gamma, beta, running_mean, running_var, batch_stats, update, factor,
                eps, pool, out_channels_last=None):
        out, stat = _zconv_fwd(conv_out, e, cbias, gamma, beta, running_mean, running_var, batch_stats, update,
                               factor, eps, pool, out_channels_last)
        ctx.save_for_backward(conv_out, e, cbias, gamma, stat)
        ctx.batch_stats, ctx.pool = batch_stats, pool
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _zconv_grads(ctx, grad_out, _zconv_bwd)


def _zconv_grads(ctx, grad_out, backward):
    """The epilogue's input gradients from ctx (conv_out, E, conv bias, gamma, stat; batch_stats, pool) through
    `backward`: the kernels (eager Function) or the backward op (custom op, under torch.compile)."""
    conv_out, e, cbias, gamma, stat = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_conv, grad_e, grad_cb, grad_gamma, grad_beta = backward(
        grad_out, conv_out, e, cbias, gamma, stat, ctx.batch_stats, ctx.pool, need[1])

    def cast(g, ref, wanted):
        return g.to(ref.dtype) if (wanted and ref is not None) else None

    return (grad_conv if need[0] else None, cast(grad_e, e, need[1]), cast(grad_cb, cbias, need[2]),
            cast(grad_gamma, gamma, need[3]), cast(grad_beta, gamma, need[4])) + (None,) * (len(need) - 5)


# ----------------------------------------------------------------------------------------------------
# The epilogue as a custom op, for torch.compile (see grid_sample.py): conv_out -> (out, stat, and with
# `update` the new BN running statistics, which the caller copies into the buffers: an op with an
# autograd formula must not mutate its inputs).
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("ostnet::zconv_epilogue", mutates_args=())
def _zconv_op(conv_out: torch.Tensor, e: torch.Tensor | None, cbias: torch.Tensor | None, gamma: torch.Tensor | None,
              beta: torch.Tensor | None, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
              batch_stats: bool, update: bool, factor: float, eps: float,
              pool: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # The new running stats go to fresh tensors (an op must not mutate its inputs); two empty ones without
    # `update` (outputs must not alias).
    new_stats = (torch.empty_like(running_mean), torch.empty_like(running_var)) if update else None
    out, stat = _zconv_fwd(conv_out, e, cbias, gamma, beta, running_mean, running_var, batch_stats, update, factor,
                           eps, pool, running_out=new_stats)
    return (out, stat) + (new_stats if update else (stat.new_empty(0), stat.new_empty(0)))


@_zconv_op.register_fake
def _(conv_out, e, cbias, gamma, beta, running_mean, running_var, batch_stats, update, factor, eps, pool):
    b, c, hc, wc = conv_out.shape
    ho, wo = (hc // 2, wc // 2) if pool else (hc, wc)
    fmt = tu.memory_format(tu.is_channels_last(conv_out))
    stat = conv_out.new_empty((4 + b, c), dtype=_acc_torch(conv_out))
    return (torch.empty((b, c, ho, wo), device=conv_out.device, dtype=conv_out.dtype, memory_format=fmt), stat,
            torch.empty_like(running_mean) if update else stat.new_empty(0),
            torch.empty_like(running_var) if update else stat.new_empty(0))


@torch.library.custom_op("ostnet::zconv_epilogue_backward", mutates_args=())
def _zconv_backward_op(grad_out: torch.Tensor, conv_out: torch.Tensor, e: torch.Tensor | None,
                       cbias: torch.Tensor | None, gamma: torch.Tensor | None, stat: torch.Tensor, batch_stats: bool,
                       pool: bool, need_e: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor]:
    grad_conv, grad_e, grad_cb, d_gamma, d_beta = _zconv_bwd(grad_out, conv_out, e, cbias, gamma, stat, batch_stats,
                                                             pool, need_e)
    return grad_conv, stat.new_empty(0) if grad_e is None else grad_e, grad_cb, d_gamma, d_beta


@_zconv_backward_op.register_fake
def _(grad_out, conv_out, e, cbias, gamma, stat, batch_stats, pool, need_e):
    b, c = conv_out.shape[:2]
    fmt = tu.memory_format(tu.is_channels_last(conv_out))
    acc_t = _acc_torch(conv_out)
    return (torch.empty(conv_out.shape, device=conv_out.device, dtype=conv_out.dtype, memory_format=fmt),
            conv_out.new_empty((b, 9, c), dtype=acc_t) if need_e and e is not None else stat.new_empty(0),
            conv_out.new_empty((c,), dtype=acc_t), conv_out.new_empty((c,), dtype=acc_t),
            conv_out.new_empty((c,), dtype=acc_t))


def _zconv_setup(ctx, inputs, output):
    conv_out, e, cbias, gamma, beta, *_, batch_stats, update, factor, eps, pool = inputs
    ctx.save_for_backward(conv_out, e, cbias, gamma, output[1])
    ctx.batch_stats, ctx.pool = batch_stats, pool
    ctx.mark_non_differentiable(*output[1:])


def _zconv_backward(ctx, grad_out, *_grad_stats):
    return _zconv_grads(ctx, grad_out, _zconv_backward_op)


_zconv_op.register_autograd(_zconv_backward, setup_context=_zconv_setup)


# ----------------------------------------------------------------------------------------------------
# Public dispatch
# ----------------------------------------------------------------------------------------------------

def _fusable(conv: nn.Conv2d) -> str | None:
    """None if the fused path supports this conv, else why not."""
    if not isinstance(conv, nn.Conv2d):
        return f"conv must be nn.Conv2d, got {type(conv).__name__}"
    for name, want in (("kernel_size", (3, 3)), ("stride", (1, 1)), ("padding", (1, 1)), ("dilation", (1, 1)),
                       ("groups", 1), ("padding_mode", "zeros")):
        got = getattr(conv, name)
        if got != want:
            return f"conv.{name} must be {want!r}, got {got!r}"
    return None


@functools.lru_cache(maxsize=None)
def _log_once(why: str) -> None:
    log.info("zconv_block: using the PyTorch reference (%s)", why)


# Down and same blocks given NCHW convolve channels-last (eagerly): cuDNN's kernels are NHWC on sm_80+, so an
# NCHW convolution transposes x, its output, and in the backward dL/dconv_out (twice) and x again. Here x is
# transposed once, the epilogue reads the channels-last output and writes the NCHW block output, and writes
# dL/dconv_out channels-last; dL/dx comes back to NCHW in one more copy. Measured in
# bench/results/h200-2026-12-01-s14.
CONV_CHANNELS_LAST = True


def _zconv_block_triton(x, zb, conv: nn.Conv2d, norm: nn.BatchNorm2d, mode: str, impl: str) -> torch.Tensor:
    # (B, C_out, Hc, Wc), no bias, no zb: cuDNN, or the split-K kernel on small maps at inference; an up
    # block's on the low-resolution map where its output is large (conv2d.upsampled_conv3x3)
    out_cl = None
    weight = conv.weight
    if mode == "up":
        conv_out = upsampled_conv3x3(x, weight, from_block(impl))
    else:
        if CONV_CHANNELS_LAST and not torch.compiler.is_compiling() and not tu.is_channels_last(x):
            out_cl = False
            x = to_channels_last(x)
        if tu.is_channels_last(x):  # cuDNN's channels-last convolution takes its weight so too: our copy,
            weight = to_channels_last(weight)  # shared with E (else F.conv2d makes torch's slower one)
        conv_out = conv2d(x, weight, None, (1, 1), from_block(impl))
    b, c, hc, wc = conv_out.shape
    if norm.num_features != c:
        raise ValueError(f"zconv_block: norm has {norm.num_features} features, conv gives {c} channels")
    acc_t = _acc_torch(conv_out)
    e = None
    if zb is not None:
        with torch.autocast(device_type=conv_out.device.type, enabled=False):
            e = border_bias(zb, weight, hc, wc, acc_t)  # (B, 9, C_out)
    # F.batch_norm's rules: batch statistics in training or without running stats; the running stats are
    # updated only in training with track_running_stats.
    batch_stats = norm.training or (norm.running_mean is None and norm.running_var is None)
    update = norm.training and norm.track_running_stats and norm.running_mean is not None
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    if batch_stats and b * hc * wc <= 1:
        raise ValueError(f"zconv_block: expected more than 1 value per channel when training, got input size "
                         f"{tuple(conv_out.shape)}")
    args = (conv_out, e, conv.bias, norm.weight, norm.bias,
            norm.running_mean if not norm.training or norm.track_running_stats else None,
            norm.running_var if not norm.training or norm.track_running_stats else None,
            batch_stats, update, float(factor), float(norm.eps), mode == "down")
    if torch.compiler.is_compiling():  # (out_cl is None here)
        out, _, running_mean, running_var = _zconv_op(*args)
        if update:
            with torch.no_grad():
                norm.running_mean.copy_(running_mean)
                norm.running_var.copy_(running_var)
        return out
    return ZConvEpilogueFn.apply(*args, out_cl)


def zconv_block(x: torch.Tensor, zb: torch.Tensor | None, conv: nn.Conv2d, norm: nn.BatchNorm2d,
                mode: str, impl: str = "auto") -> torch.Tensor:
    """[nearest 2x up] -> (x + zb) -> conv3x3 -> BN -> ReLU -> [2x2 avg-pool]; x (B, C_in, H, W), zb (B, C_in)."""
    if mode not in MODES:
        raise ValueError(f"zconv_block: mode must be one of {MODES}, got {mode!r}")
    if x.dim() != 4:
        raise ValueError(f"zconv_block: x must be (B, C_in, H, W), got {tuple(x.shape)}")
    if zb is not None and zb.shape != (x.shape[0], x.shape[1]):
        raise ValueError(f"zconv_block: zb must be (B, C_in) = {(x.shape[0], x.shape[1])}, got {tuple(zb.shape)}")
    if use_triton("zconv_block", impl, x, zb):
        why = _fusable(conv)
        if why is None and not isinstance(norm, nn.BatchNorm2d):
            why = f"norm must be nn.BatchNorm2d, got {type(norm).__name__}"
        if why is None and torch.compiler.is_compiling() and not forced(impl):
            # Inductor fuses the BN, ReLU and pool (and their backward) around cuDNN's conv itself; our op is
            # opaque to it. H200, training step b8 bf16 channels-last: 31.0 ms without it, 37.5 ms with it.
            why = "under torch.compile inductor's fusion of this block is faster"
        if why is None and norm.momentum is None and norm.training and torch.compiler.is_compiling():
            why = "BatchNorm momentum=None under torch.compile (its factor 1/n would be read from the GPU)"
        if why is None:
            return _zconv_block_triton(x, zb, conv, norm, mode, impl)
        if impl == "triton":
            raise ValueError(f"zconv_block: the fused kernel does not support this block: {why}")
        if not torch.compiler.is_compiling():  # a logger call would break dynamo's graph
            _log_once(why)
        return zconv_block_reference(x, zb, conv, norm, mode, conv_impl="auto")
    return zconv_block_reference(x, zb, conv, norm, mode)
