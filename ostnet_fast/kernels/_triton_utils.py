"""Triton device functions shared by grid_sample, tps_grid and tps_warp, and their launch heuristics.

Written once here and imported by the kernels (a `@triton.jit` function may call jit functions of other
modules). Everything Triton is defined only when triton imports, so the package imports without it.

Convention (the whole package): (x, y) in [-1, 1], x along width, align_corners=True: pixel coordinate
ix = (gx + 1) / 2 * (W_in - 1); zeros padding (taps outside the image read 0 and receive no gradient).

Numerics: every device function works in `ACC` (tl.float32, or tl.float64 when the caller's tensors are
float64, which is what the CPU tests and gradcheck use); loads are upcast to ACC, stores cast to the
pointer's element type.

Design limits (checked by `check_launch`): per-sample offsets are int32, so C * H * W of one sample (and
H * W * 2 of one grid) must stay below 2**31; batches go on launch axis 1, so B <= 65535.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    HAS_TRITON = False

INT32_MAX = 2 ** 31 - 1
MAX_GRID_Y = 65535
MAX_FIDUCIALS = 128  # TPS basis is a (BLOCK_P, BLOCK_T) register tile; keep T small

# The TPS loops are mostly one log per fiducial and pixel. Compiled, fp32 takes libdevice's fast_logf
# (lg2.approx: MUFU.LG2 and a multiply, where logf is a ~20-instruction polynomial); its absolute error,
# <= 2**-22.6 * ln 2 on log(x) (PTX ISA), puts at most 8 * 1.1e-7 on U = d2 log d2 for d2 <= 8 (pixels
# and fiducials in [-1, 1]): fp32 rounding size. sm_90 SASS: 37 -> 23 instructions a fiducial; H200, batch 8
# 3x256x256 warp forward 21.4 -> 18.5 us. The interpreter has no extern functions: exact log there.
FAST_LOG = HAS_TRITON and not triton.knobs.runtime.interpret

# Test hook: when True, every buffer a kernel must fully overwrite starts as NaN (see tests/kernels).
POISON_OUTPUTS = False


def empty_output(shape, *, device, dtype, memory_format=torch.contiguous_format) -> torch.Tensor:
    """torch.empty for kernel outputs that every program overwrites; NaN-filled under POISON_OUTPUTS."""
    out = torch.empty(shape, device=device, dtype=dtype, memory_format=memory_format)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def acc_dtype(*tensors: torch.Tensor):
    """tl.float64 if any tensor is float64 (tests, gradcheck), else tl.float32."""
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def is_channels_last(x: torch.Tensor) -> bool:
    """True for an NHWC-strided (B, C, H, W) tensor that is not also plain contiguous."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def dense_4d(x: torch.Tensor) -> torch.Tensor:
    """x itself if NCHW- or channels-last-contiguous, else an NCHW-contiguous copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def pixel_stride(x: torch.Tensor) -> int:
    """Stride of one step of the flat pixel index p = h * W + w of a dense (B, C, H, W) tensor (NCHW or
    channels-last): stride(3), or stride(2) when W == 1 (size-1 dims may carry any stride)."""
    return x.stride(3) if x.shape[3] > 1 else x.stride(2)


def memory_format(channels_last: bool):
    return torch.channels_last if channels_last else torch.contiguous_format


def sample_blocks(channels: int, channels_last: bool) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) for grid_sample's kernels (forward and backward).

    A program owns BLOCK_P output pixels and loops over channels BLOCK_C at a time; the tap weights and
    addresses are computed once per pixel. Chosen from register counts of the sm_90 builds (compiled on
    a CPU machine with the bundled ptxas; no timing yet, the lead tunes on the H100):
    - NCHW: 128 pixels x 4 channels on 4 warps (C <= 4; 32-86 registers), or x 8 channels on 8 warps
      (80-151 registers; on 4 warps fp16 needs 251, as the vectorised stores give each thread 8 pixels).
    - channels-last with C % 16 == 0 (Triton then knows the pixel strides are 16-aligned and loads
      4-channel vectors): 32 x 32 (or 64 x 16) tiles, 60-124 registers.
    - other channels-last (C = 3, ...): a C-chunk of 1, one pixel per thread, since an unaligned chunk
      makes Triton spread one pixel over several threads (4x the per-pixel work, 2-3x the registers).
    """
    if channels_last and channels % 16 == 0:
        return (32, 32, 4) if channels >= 32 else (64, 16, 4)
    if channels_last:
        return 128, 1, 4
    return (128, 4, 4) if channels <= 4 else (128, 8, 8)


def check_launch(op: str, batch: int, per_sample: int) -> None:
    if batch > MAX_GRID_Y:
        raise ValueError(f"{op}: batch {batch} exceeds the launch limit {MAX_GRID_Y}")
    if per_sample > INT32_MAX:
        raise ValueError(f"{op}: one sample holds {per_sample} elements, over the int32 offset limit {INT32_MAX}")


if HAS_TRITON:

    @triton.jit
    def pixel_xy(offs_p, W, H1, W1, ACC: tl.constexpr):
        """Flat output pixel index -> (x, y) in [-1, 1] (geometry.pixel_coordinates, same op order).
        H1 = max(H - 1, 1), W1 = max(W - 1, 1)."""
        h = offs_p // W
        w = offs_p % W
        px = 2 * (w.to(ACC) / W1) - 1
        py = 2 * (h.to(ACC) / H1) - 1
        return px, py

    @triton.jit
    def load_grid(grid_ptr, offs_p, mask_p, ACC: tl.constexpr):
        """(x, y) pairs of a contiguous (..., 2) grid for the pixels offs_p, upcast to ACC."""
        two = tl.arange(0, 2)
        g = tl.load(grid_ptr + offs_p[:, None] * 2 + two[None, :], mask=mask_p[:, None], other=0.0)
        gx, gy = tl.split(g.to(ACC))
        return gx, gy

    @triton.jit
    def store_grid(grid_ptr, offs_p, mask_p, gx, gy):
        """Write (x, y) pairs into a contiguous (..., 2) tensor (one contiguous [P, 2] store)."""
        two = tl.arange(0, 2)
        g = tl.join(gx, gy).to(grid_ptr.dtype.element_ty)
        tl.store(grid_ptr + offs_p[:, None] * 2 + two[None, :], g, mask=mask_p[:, None])

    @triton.jit
    def bilinear_taps(gx, gy, H_in, W_in, mask_p, s_h, s_w):
        """Grid (x, y) -> pixel coordinates and the 4 bilinear taps (00 = top-left, 01 = top-right,
        10 = bottom-left, 11 = bottom-right): their input offsets (without the channel term), validity
        masks (zeros padding) and fractional weights wx1 = ix - x0, wy1 = iy - y0."""
        ix = (gx + 1) * 0.5 * (W_in - 1)
        iy = (gy + 1) * 0.5 * (H_in - 1)
        # Beyond one pixel outside, every tap is invalid whatever the value; the clamp only keeps the
        # float -> int conversion in range (huge or inf coordinates).
        ix = tl.minimum(tl.maximum(ix, -2.0), W_in + 1.0)
        iy = tl.minimum(tl.maximum(iy, -2.0), H_in + 1.0)
        x0f = tl.floor(ix)
        y0f = tl.floor(iy)
        wx1 = ix - x0f
        wy1 = iy - y0f
        x0 = x0f.to(tl.int32)
        y0 = y0f.to(tl.int32)
        x1 = x0 + 1
        y1 = y0 + 1
        vx0 = (x0 >= 0) & (x0 < W_in)
        vx1 = (x1 >= 0) & (x1 < W_in)
        vy0 = (y0 >= 0) & (y0 < H_in)
        vy1 = (y1 >= 0) & (y1 < H_in)
        m00 = mask_p & vy0 & vx0
        m01 = mask_p & vy0 & vx1
        m10 = mask_p & vy1 & vx0
        m11 = mask_p & vy1 & vx1
        off00 = y0 * s_h + x0 * s_w
        off01 = off00 + s_w
        off10 = off00 + s_h
        off11 = off10 + s_w
        return off00, off01, off10, off11, m00, m01, m10, m11, wx1, wy1

    @triton.jit
    def sample_fwd_channels(in_ptr, out_ptr, C, s_c, o_c, o_p, offs_p, mask_p,
                            off00, off01, off10, off11, m00, m01, m10, m11, wx1, wy1,
                            ACC: tl.constexpr, BLOCK_C: tl.constexpr):
        """out[p, c] = sum_taps w_tap(p) * in[tap(p), c] for all channels, BLOCK_C at a time.
        in_ptr / out_ptr already point at this sample."""
        wx0 = 1 - wx1
        wy0 = 1 - wy1
        w00 = (wy0 * wx0)[:, None]
        w01 = (wy0 * wx1)[:, None]
        w10 = (wy1 * wx0)[:, None]
        w11 = (wy1 * wx1)[:, None]
        o_off = offs_p[:, None] * o_p
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mc = (offs_c < C)[None, :]
            cin = offs_c[None, :] * s_c
            v00 = tl.load(in_ptr + off00[:, None] + cin, mask=m00[:, None] & mc, other=0.0).to(ACC)
            v01 = tl.load(in_ptr + off01[:, None] + cin, mask=m01[:, None] & mc, other=0.0).to(ACC)
            v10 = tl.load(in_ptr + off10[:, None] + cin, mask=m10[:, None] & mc, other=0.0).to(ACC)
            v11 = tl.load(in_ptr + off11[:, None] + cin, mask=m11[:, None] & mc, other=0.0).to(ACC)
            out = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11
            tl.store(out_ptr + o_off + offs_c[None, :] * o_c, out.to(out_ptr.dtype.element_ty),
                     mask=mask_p[:, None] & mc)

    @triton.jit
    def sample_bwd_channels(in_ptr, gout_ptr, gin_ptr, C, s_c, g_c, g_p, offs_p, mask_p,
                            off00, off01, off10, off11, m00, m01, m10, m11, wx1, wy1,
                            ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                            NEED_INPUT_GRAD: tl.constexpr, NEED_GRID_GRAD: tl.constexpr,
                            GIN_PIXEL_STRIDE: tl.constexpr):
        """Backward of sample_fwd_channels for one tile of output pixels, looping over channels.

        With g = dL/dout[p, c] and out = wy0 (wx0 v00 + wx1 v01) + wy1 (wx0 v10 + wx1 v11):
          dL/din[tap, c] += g * w_tap                       (scatter: fp32/fp64 atomics into gin_ptr,
                                                             which has the input's strides; or, with
                                                             GIN_PIXEL_STRIDE > 0 and an NCHW-dense
                                                             input, whose tap offsets are then pixel
                                                             indices, a channels-last scratch with that
                                                             pixel stride, a multiple of BLOCK_C)
          dL/dix[p] = sum_c g * (wy0 (v01 - v00) + wy1 (v11 - v10))   (d wx1/dix = 1, d wx0/dix = -1)
          dL/diy[p] = sum_c g * (wx0 (v10 - v00) + wx1 (v11 - v01))
        Invalid taps read v = 0, as PyTorch's zeros padding. Returns (dL/dix, dL/diy) in pixel units;
        the caller multiplies by (W_in - 1) / 2 and (H_in - 1) / 2. The reduction over channels happens
        in registers: each output pixel owns its grid gradient, no atomics for it.
        """
        wx0 = 1 - wx1
        wy0 = 1 - wy1
        dix = tl.zeros_like(wx1)
        diy = tl.zeros_like(wx1)
        g_off = offs_p[:, None] * g_p
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mc = (offs_c < C)[None, :]
            g = tl.load(gout_ptr + g_off + offs_c[None, :] * g_c, mask=mask_p[:, None] & mc, other=0.0).to(ACC)
            cin = offs_c[None, :] * s_c
            if NEED_GRID_GRAD:
                v00 = tl.load(in_ptr + off00[:, None] + cin, mask=m00[:, None] & mc, other=0.0).to(ACC)
                v01 = tl.load(in_ptr + off01[:, None] + cin, mask=m01[:, None] & mc, other=0.0).to(ACC)
                v10 = tl.load(in_ptr + off10[:, None] + cin, mask=m10[:, None] & mc, other=0.0).to(ACC)
                v11 = tl.load(in_ptr + off11[:, None] + cin, mask=m11[:, None] & mc, other=0.0).to(ACC)
                dix += tl.sum(g * (wy0[:, None] * (v01 - v00) + wy1[:, None] * (v11 - v10)), axis=1)
                diy += tl.sum(g * (wx0[:, None] * (v10 - v00) + wx1[:, None] * (v11 - v01)), axis=1)
            if NEED_INPUT_GRAD:
                if GIN_PIXEL_STRIDE > 0:
                    # Consecutive channels of a tap are neighbours in the scratch, and every channel up to
                    # its padded width exists there (g is 0 past C): no channel mask, so the atomics of
                    # a thread's channels can go out as one vector (sm_90) and a warp's share sectors.
                    gc = offs_c[None, :]
                    s00 = off00[:, None] * GIN_PIXEL_STRIDE + gc
                    s01 = off01[:, None] * GIN_PIXEL_STRIDE + gc
                    s10 = off10[:, None] * GIN_PIXEL_STRIDE + gc
                    s11 = off11[:, None] * GIN_PIXEL_STRIDE + gc
                    k00 = m00[:, None]
                    k01 = m01[:, None]
                    k10 = m10[:, None]
                    k11 = m11[:, None]
                else:
                    s00 = off00[:, None] + cin
                    s01 = off01[:, None] + cin
                    s10 = off10[:, None] + cin
                    s11 = off11[:, None] + cin
                    k00 = m00[:, None] & mc
                    k01 = m01[:, None] & mc
                    k10 = m10[:, None] & mc
                    k11 = m11[:, None] & mc
                tl.atomic_add(gin_ptr + s00, g * (wy0 * wx0)[:, None], mask=k00, sem="relaxed")
                tl.atomic_add(gin_ptr + s01, g * (wy0 * wx1)[:, None], mask=k01, sem="relaxed")
                tl.atomic_add(gin_ptr + s10, g * (wy1 * wx0)[:, None], mask=k10, sem="relaxed")
                tl.atomic_add(gin_ptr + s11, g * (wy1 * wx1)[:, None], mask=k11, sem="relaxed")
        return dix, diy

    _FAST_LOG: tl.constexpr = tl.constexpr(FAST_LOG)

    @triton.jit
    def radial_log(d2, ACC: tl.constexpr):
        """log(max(d2, 1e-30)), so that d2 * log(.) -> 0 as d2 -> 0 (no log(0) = -inf times 0); see FAST_LOG."""
        x = tl.maximum(d2, 1e-30)
        if _FAST_LOG and ACC == tl.float32:
            return libdevice.fast_logf(x)
        return tl.log(x)

    @triton.jit
    def tps_basis(px, py, tgt_ptr, T, ACC: tl.constexpr, BLOCK_T: tl.constexpr):
        """U(|p - t_i|) = d2 log d2 (0 at d2 = 0) as a (BLOCK_P, BLOCK_T) register tile; columns
        i >= T are 0. tgt_ptr: (T, 2) target fiducials."""
        offs_t = tl.arange(0, BLOCK_T)
        mt = offs_t < T
        tx = tl.load(tgt_ptr + 2 * offs_t, mask=mt, other=0.0).to(ACC)
        ty = tl.load(tgt_ptr + 2 * offs_t + 1, mask=mt, other=0.0).to(ACC)
        dx = px[:, None] - tx[None, :]
        dy = py[:, None] - ty[None, :]
        d2 = dx * dx + dy * dy
        u = d2 * radial_log(d2, ACC)
        return tl.where(mt[None, :], u, 0.0)

    @triton.jit
    def tps_tile(tgt_ptr, T, HW, W, H1, W1, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr):
        """This program's BLOCK_P output pixels: (offs_p, mask_p, px, py, u), u the radial-basis tile
        (tps_basis), which does not depend on the sample: the TPS kernels reuse it for several."""
        offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < HW
        px, py = pixel_xy(offs_p, W, H1, W1, ACC)
        u = tps_basis(px, py, tgt_ptr, T, ACC, BLOCK_T)
        return offs_p, mask_p, px, py, u

    @triton.jit
    def sample_group(B, SAMPLES: tl.constexpr):
        """This program's samples on grid axis 1, SAMPLES (1, 2 or 4) a program: (b0, b1, b2, b3, has_b1,
        has_b2, has_b3). A sample past the batch repeats the last one, has_b* False: compute it, store
        nothing. Unused slots (past SAMPLES) are b0."""
        b0 = tl.program_id(1).to(tl.int64) * SAMPLES
        has_b1 = (SAMPLES > 1) & (b0 + 1 < B)
        has_b2 = (SAMPLES > 2) & (b0 + 2 < B)
        has_b3 = (SAMPLES > 3) & (b0 + 3 < B)
        return (b0, tl.where(has_b1, b0 + 1, b0), tl.where(has_b2, b0 + 2, b0), tl.where(has_b3, b0 + 3, b0),
                has_b1, has_b2, has_b3)

    @triton.jit
    def tps_affine(px, py, aff_ptr, ACC: tl.constexpr):
        """a_0 + a_x x + a_y y per coordinate; aff_ptr: the (3, 2) affine rows of a sample's params."""
        gx = tl.load(aff_ptr).to(ACC) + tl.load(aff_ptr + 2).to(ACC) * px + tl.load(aff_ptr + 4).to(ACC) * py
        gy = tl.load(aff_ptr + 1).to(ACC) + tl.load(aff_ptr + 3).to(ACC) * px + tl.load(aff_ptr + 5).to(ACC) * py
        return gx, gy

    @triton.jit
    def tps_map(px, py, tgt_ptr, par_ptr, b0, b1, b2, b3, T, ACC: tl.constexpr, SAMPLES: tl.constexpr):
        """f(p) = a_0 + a_x x + a_y y + sum_i w_i U(|p - t_i|) for 1-D pixel vectors, for SAMPLES (1, 2 or 4)
        samples b0.. whose (T+3, 2) params are rows of par_ptr (B, T+3, 2): the radial basis (the costly
        part, a log per fiducial) is evaluated once for all of them. -> (gx0, gy0, .., gx3, gy3); slots past
        SAMPLES hold sample 0's affine part only (unused). A loop over the fiducials keeps every sum in its
        lane's registers. (Summing the (BLOCK_P, BLOCK_T) tile of tps_basis over T instead, as the kernels
        did, spreads T over a warp's 32 lanes: 160 shuffles per thread and sample on sm_90, and the SASS of
        the forward kernels was mostly those.) Four samples: 15.5 us against 18.8 with pairs for the warp
        forward, batch 8 3x256x256 fp32 (H200, bench/results/h200-2026-12-01-s10)."""
        p0 = par_ptr + b0 * (T + 3) * 2
        p1 = par_ptr + b1 * (T + 3) * 2
        p2 = par_ptr + b2 * (T + 3) * 2
        p3 = par_ptr + b3 * (T + 3) * 2
        gx0, gy0 = tps_affine(px, py, p0 + 2 * T, ACC)
        gx1, gy1, gx2, gy2, gx3, gy3 = gx0, gy0, gx0, gy0, gx0, gy0
        if SAMPLES > 1:
            gx1, gy1 = tps_affine(px, py, p1 + 2 * T, ACC)
        if SAMPLES > 2:
            gx2, gy2 = tps_affine(px, py, p2 + 2 * T, ACC)
            gx3, gy3 = tps_affine(px, py, p3 + 2 * T, ACC)
        for i in range(T):
            dx = px - tl.load(tgt_ptr + 2 * i).to(ACC)
            dy = py - tl.load(tgt_ptr + 2 * i + 1).to(ACC)
            d2 = dx * dx + dy * dy
            u = d2 * radial_log(d2, ACC)
            gx0 += tl.load(p0 + 2 * i).to(ACC) * u
            gy0 += tl.load(p0 + 2 * i + 1).to(ACC) * u
            if SAMPLES > 1:
                gx1 += tl.load(p1 + 2 * i).to(ACC) * u
                gy1 += tl.load(p1 + 2 * i + 1).to(ACC) * u
            if SAMPLES > 2:
                gx2 += tl.load(p2 + 2 * i).to(ACC) * u
                gy2 += tl.load(p2 + 2 * i + 1).to(ACC) * u
                gx3 += tl.load(p3 + 2 * i).to(ACC) * u
                gy3 += tl.load(p3 + 2 * i + 1).to(ACC) * u
        return gx0, gy0, gx1, gy1, gx2, gy2, gx3, gy3

    @triton.jit
    def tps_params_grad(px, py, u, ggx, ggy, part_ptr, T, BLOCK_T: tl.constexpr):
        """Backward of tps_map for one tile of tps_basis, reduced over its pixels and written (no atomics) to
        part_ptr: (T+3, 2), this program's slot of a (B, programs, T+3, 2) buffer the launcher sums.
          dL/dw_i = sum_p U_i(p) g(p);  dL/da_0 = sum_p g(p);  dL/da_x = sum_p x g(p);  dL/da_y = sum_p y g(p)
        ggx / ggy must be 0 at masked pixels."""
        offs_t = tl.arange(0, BLOCK_T)
        mt = offs_t < T
        dwx = tl.sum(u * ggx[:, None], axis=0)
        dwy = tl.sum(u * ggy[:, None], axis=0)
        ty = part_ptr.dtype.element_ty
        tl.store(part_ptr + 2 * offs_t, dwx.to(ty), mask=mt)
        tl.store(part_ptr + 2 * offs_t + 1, dwy.to(ty), mask=mt)
        tl.store(part_ptr + 2 * T, tl.sum(ggx, axis=0).to(ty))
        tl.store(part_ptr + 2 * T + 1, tl.sum(ggy, axis=0).to(ty))
        tl.store(part_ptr + 2 * T + 2, tl.sum(px * ggx, axis=0).to(ty))
        tl.store(part_ptr + 2 * T + 3, tl.sum(px * ggy, axis=0).to(ty))
        tl.store(part_ptr + 2 * T + 4, tl.sum(py * ggx, axis=0).to(ty))
        tl.store(part_ptr + 2 * T + 5, tl.sum(py * ggy, axis=0).to(ty))
