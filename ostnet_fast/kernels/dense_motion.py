"""Dense-motion front end and combine (FOMM's DenseMotionNetwork, the parts around its hourglass).

front:   source (downscaled), kp_S, kp_D, J = J_S J_D^-1 -> hourglass input (heatmap differences and the
         K+1 deformed sources, interleaved per keypoint as FOMM) + the sparse motions.
combine: mask logits -> softmax over K+1 -> weighted sum of sparse motions = deformation; warp the
         bottleneck feature map by it (resized bilinearly when its size differs) and multiply by the
         occlusion map.
Convention: see geometry.py.

Fused (Triton) paths:
- front, forward: one program per (BLOCK_P pixels, motion j in 0..K, sample): pixel grid, Gaussian
  difference, sparse motion J_k (p - kp_D) + kp_S (identity for j = 0), the bilinear taps of that motion
  and the C source channels sampled there, all written straight into FOMM's channel order
  [heat_j, deformed_j(C channels)] of the hourglass input, and the motion into (B, K+1, h, w, 2).
  Backward, one kernel: motion gradient = dL/dmotion + sum_c dL/ddeformed_c * d sample/d motion (a
  register reduction over channels); dL/dsource by fp32 atomics (a scatter: 4 taps per pixel and motion);
  per-tile partial sums for kp_S, kp_D, J written without atomics and summed by the launcher.
- combine, (Hf, Wf) == (h, w): one kernel: softmax over K+1 and the weighted sum of motions in registers,
  the deformation written once, then the feature sampled at it (channel loop, tap addresses and weights
  computed once per pixel) and multiplied by the occlusion. Backward, one kernel: per pixel the sampling
  gradient (channel reduction in registers) + dL/ddeformation, then the softmax backward, dL/dfeature by
  fp32 atomics.
- combine, sizes differ (OSTNet's bottleneck at 32x32 or 16x16, dense motion at 64x64): the deformation
  kernel alone (same code, DEFORM only), then the reference's own F.interpolate(bilinear,
  align_corners=False) of the deformation (B, h, w, 2) and occlusion (B, 1, h, w) in torch (tiny tensors;
  autograd handles their backward), then the sampling kernel (SAMPLE only) on the resized grid. Not fusing
  the resize keeps bit-for-bit PyTorch's resize rules (scale = in / out, clamping) at the cost of two
  small launches.

Design limits: int32 offsets (one sample of each tensor below 2**31 elements); B <= 65535; K + 1 <= 128
(the softmax holds a (BLOCK_P, next_pow2(K + 1)) register tile). fp32 maths (fp64 for fp64 inputs: the
CPU tests and gradcheck); outputs in the input dtypes. The fused kernels sample from fp32 coordinates (the
reference rounds the grid to the feature dtype first), so fp16 / bf16 results differ from the reference by
that rounding. Atomics make dL/dsource and dL/dfeature not bitwise deterministic. kp_variance reaches the
GPU kernel as an fp32 scalar. The bilinear taps are _triton_utils.bilinear_taps (shared with
grid_sample and tps_warp); the 4-tap gather over a channel tile is local (`_dm_gather4`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import use_triton
from .geometry import kp2gaussian, pixel_coordinates
from .grid_sample import grid_sample_reference

from ._triton_utils import HAS_TRITON, tl, triton  # one import guard for every kernel

if HAS_TRITON:
    from ._triton_utils import bilinear_taps

INT32_MAX = 2 ** 31 - 1


# Tests set this to True: every buffer a kernel must overwrite then starts as NaN (poisoned outputs).
POISON_OUTPUTS = False


def _empty(*shape, **kwargs) -> torch.Tensor:
    """torch.empty, or NaN-filled while POISON_OUTPUTS is set."""
    t = torch.empty(*shape, **kwargs)
    return t.fill_(float("nan")) if POISON_OUTPUTS else t
MAX_GRID_Y = 65535
MAX_MOTIONS = 128


def sparse_motions_reference(size: tuple[int, int], kp_source: torch.Tensor, kp_driving: torch.Tensor,
                             jacobian: torch.Tensor | None) -> torch.Tensor:
    """-> (B, K+1, h, w, 2): identity, then J_k (p - kp_D_k) + kp_S_k for each keypoint k."""
    b, k, _ = kp_driving.shape
    identity = pixel_coordinates(size, device=kp_driving.device, dtype=kp_driving.dtype)  # (h, w, 2)
    coords = identity[None, None] - kp_driving[:, :, None, None, :]  # (B, K, h, w, 2)
    if jacobian is not None:
        coords = torch.einsum("bkij,bkhwj->bkhwi", jacobian, coords)
    driving_to_source = coords + kp_source[:, :, None, None, :]
    return torch.cat([identity[None, None].expand(b, 1, *identity.shape), driving_to_source], dim=1)


def dense_motion_front_reference(source: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor,
                                 jacobian: torch.Tensor | None, kp_variance: float):
    """source (B, C, h, w) -> (hourglass input (B, (K+1)*(C+1), h, w), sparse motions (B, K+1, h, w, 2))."""
    b, c, h, w = source.shape
    k = kp_driving.shape[1]
    heat = kp2gaussian(kp_driving, (h, w), kp_variance) - kp2gaussian(kp_source, (h, w), kp_variance)
    heat = torch.cat([heat.new_zeros(b, 1, h, w), heat], dim=1).unsqueeze(2)  # (B, K+1, 1, h, w)
    motions = sparse_motions_reference((h, w), kp_source, kp_driving, jacobian)  # (B, K+1, h, w, 2)
    repeated = source.unsqueeze(1).expand(b, k + 1, c, h, w).reshape(b * (k + 1), c, h, w)
    deformed = grid_sample_reference(repeated, motions.reshape(b * (k + 1), h, w, 2))
    deformed = deformed.view(b, k + 1, c, h, w)
    return torch.cat([heat, deformed], dim=2).view(b, (k + 1) * (c + 1), h, w), motions


def dense_motion_combine_reference(mask_logits: torch.Tensor, motions: torch.Tensor, feature: torch.Tensor,
                                   occlusion: torch.Tensor | None):
    """mask_logits (B, K+1, h, w), motions (B, K+1, h, w, 2), feature (B, C, H, W), occlusion (B, 1, h, w)
    -> (deformation (B, h, w, 2), warped feature (B, C, H, W))."""
    mask = F.softmax(mask_logits, dim=1)
    deformation = (motions * mask.unsqueeze(-1)).sum(dim=1)  # (B, h, w, 2)
    size = tuple(feature.shape[-2:])
    grid = deformation
    if tuple(deformation.shape[1:3]) != size:
        grid = F.interpolate(deformation.permute(0, 3, 1, 2), size=size, mode="bilinear").permute(0, 2, 3, 1)
    warped = grid_sample_reference(feature, grid)
    if occlusion is not None:
        if tuple(occlusion.shape[-2:]) != size:
            occlusion = F.interpolate(occlusion, size=size, mode="bilinear")
        warped = warped * occlusion
    return deformation, warped


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _dm_pixel_xy(offs_p, W, H1, W1, ACC: tl.constexpr):
        """Flat pixel index -> (x, y) in [-1, 1], geometry.pixel_coordinates' op order.
        H1 = max(H - 1, 1), W1 = max(W - 1, 1)."""
        hh = offs_p // W
        ww = offs_p - hh * W
        px = 2 * (ww.to(ACC) / W1) - 1
        py = 2 * (hh.to(ACC) / H1) - 1
        return px, py

    @triton.jit
    def _dm_gather4(base, cin, mc, off00, off01, off10, off11, m00, m01, m10, m11, ACC: tl.constexpr):
        """The 4 tap values of a (BLOCK_P, BLOCK_C) tile, 0 at invalid taps (zeros padding)."""
        v00 = tl.load(base + off00[:, None] + cin, mask=m00[:, None] & mc, other=0.0).to(ACC)
        v01 = tl.load(base + off01[:, None] + cin, mask=m01[:, None] & mc, other=0.0).to(ACC)
        v10 = tl.load(base + off10[:, None] + cin, mask=m10[:, None] & mc, other=0.0).to(ACC)
        v11 = tl.load(base + off11[:, None] + cin, mask=m11[:, None] & mc, other=0.0).to(ACC)
        return v00, v01, v10, v11

    @triton.jit
    def _dm_kp_motion(kps_ptr, kpd_ptr, jac_ptr, n, j, K, px, py, HAS_JAC: tl.constexpr, ACC: tl.constexpr):
        """Motion j of sample n at pixels (px, py): identity for j = 0, else J_k (p - kp_D) + kp_S with
        k = j - 1. Returns (mx, my, dx, dy, ksx, ksy), d = p - kp_D."""
        kk = tl.maximum(j - 1, 0)
        ksx = tl.load(kps_ptr + (n * K + kk) * 2).to(ACC)
        ksy = tl.load(kps_ptr + (n * K + kk) * 2 + 1).to(ACC)
        kdx = tl.load(kpd_ptr + (n * K + kk) * 2).to(ACC)
        kdy = tl.load(kpd_ptr + (n * K + kk) * 2 + 1).to(ACC)
        dx = px - kdx
        dy = py - kdy
        if HAS_JAC:
            jb = jac_ptr + (n * K + kk) * 4
            j00 = tl.load(jb).to(ACC)
            j01 = tl.load(jb + 1).to(ACC)
            j10 = tl.load(jb + 2).to(ACC)
            j11 = tl.load(jb + 3).to(ACC)
            mx = j00 * dx + j01 * dy + ksx
            my = j10 * dx + j11 * dy + ksy
        else:
            mx = dx + ksx
            my = dy + ksy
        mx = tl.where(j == 0, px, mx)
        my = tl.where(j == 0, py, my)
        return mx, my, dx, dy, ksx, ksy

    @triton.jit
    def _dm_front_fwd_kernel(
        src_ptr,  # (B, C, h, w) source, any strides
        kps_ptr,  # (B, K, 2) kp_source, contiguous
        kpd_ptr,  # (B, K, 2) kp_driving, contiguous
        jac_ptr,  # (B, K, 2, 2) J = J_S J_D^-1, contiguous, if HAS_JAC
        hg_ptr,  # (B, (K+1)(C+1), h, w) out: hourglass input, contiguous
        mot_ptr,  # (B, K+1, h, w, 2) out: sparse motions, contiguous
        C, H, W, K, H1, W1, var,
        s_n, s_c, s_h, s_w,
        HAS_JAC: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid_p = tl.program_id(0)
        j = tl.program_id(1)
        n = tl.program_id(2)
        HW = H * W
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        mp = offs_p < HW
        px, py = _dm_pixel_xy(offs_p, W, H1, W1, ACC)
        mx, my, dx, dy, ksx, ksy = _dm_kp_motion(kps_ptr, kpd_ptr, jac_ptr, n, j, K, px, py, HAS_JAC, ACC)
        # kp2gaussian: exp(-0.5 * |p - kp|^2 / var), driving minus source; 0 for the identity motion.
        gd = tl.exp(-0.5 * (dx * dx + dy * dy) / var)
        sx = px - ksx
        sy = py - ksy
        gs = tl.exp(-0.5 * (sx * sx + sy * sy) / var)
        heat = tl.where(j == 0, 0.0, gd - gs)
        hg_base = hg_ptr + (n * (K + 1) + j) * (C + 1) * HW
        tl.store(hg_base + offs_p, heat.to(hg_ptr.dtype.element_ty), mask=mp)
        mot_base = mot_ptr + (n * (K + 1) + j) * HW * 2
        tl.store(mot_base + offs_p * 2, mx.to(mot_ptr.dtype.element_ty), mask=mp)
        tl.store(mot_base + offs_p * 2 + 1, my.to(mot_ptr.dtype.element_ty), mask=mp)
        off00, off01, off10, off11, m00, m01, m10, m11, wx1, wy1 = bilinear_taps(mx, my, H, W, mp, s_h, s_w)
        wx0 = 1 - wx1
        wy0 = 1 - wy1
        src_base = src_ptr + n * s_n
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mc = (offs_c < C)[None, :]
            v00, v01, v10, v11 = _dm_gather4(src_base, offs_c[None, :] * s_c, mc, off00, off01, off10, off11,
                                             m00, m01, m10, m11, ACC)
            val = wy0[:, None] * (wx0[:, None] * v00 + wx1[:, None] * v01) + \
                wy1[:, None] * (wx0[:, None] * v10 + wx1[:, None] * v11)
            out_off = (1 + offs_c[None, :]) * HW + offs_p[:, None]
            tl.store(hg_base + out_off, val.to(hg_ptr.dtype.element_ty), mask=mp[:, None] & mc)

    # Front backward. Per pixel p and motion j >= 1 (k = j - 1), d = p - kp_D, m = J d + kp_S:
    #   dL/dm = dL/dmotion + sum_c dL/ddef_c * (d sample_c / d m), with sample = wy0 (wx0 v00 + wx1 v01)
    #           + wy1 (wx0 v10 + wx1 v11): d/dix = wy0 (v01 - v00) + wy1 (v11 - v10), d/diy = wx0 (v10 - v00)
    #           + wx1 (v11 - v01), and dix/dmx = (W - 1) / 2, diy/dmy = (H - 1) / 2 (align_corners=True).
    #   dL/dkp_S += dL/dm;  dL/dkp_D += -J^T dL/dm;  dL/dJ[i, l] += dL/dm_i d_l
    #   heat = G_D - G_S, G = exp(-|p - kp|^2 / (2 var)):  dG/dkp = G (p - kp) / var, so
    #   dL/dkp_D += dL/dheat G_D d / var;  dL/dkp_S -= dL/dheat G_S (p - kp_S) / var
    #   dL/dsource[c, tap] += dL/ddef_c w_tap  (scatter, atomics)
    # A program writes its tile's 10 sums (sum dL/dm (2), sum dL/dm_i d_l (4), the two heat terms (2 + 2))
    # into its own slot of a (B, K, tiles, 10) buffer; the launcher sums the tiles and applies J^T.

    @triton.jit
    def _dm_front_bwd_kernel(
        src_ptr,  # (B, C, h, w) source, any strides
        kps_ptr, kpd_ptr,  # (B, K, 2) contiguous
        jac_ptr,  # (B, K, 2, 2) contiguous, if HAS_JAC
        ghg_ptr,  # (B, (K+1)(C+1), h, w) dL/dhourglass input, contiguous, if HAS_GHG
        gmot_ptr,  # (B, K+1, h, w, 2) dL/dmotions, contiguous, if HAS_GMOT
        gsrc_ptr,  # (B, C, h, w) out: dL/dsource accumulator (fp32/fp64, the source's strides), NEED_SRC
        part_ptr,  # (B, K, n_tiles, 10) out: per-tile sums for the keypoint grads, if NEED_KP
        C, H, W, K, H1, W1, var, n_tiles,
        s_n, s_c, s_h, s_w,
        HAS_JAC: tl.constexpr, HAS_GHG: tl.constexpr, HAS_GMOT: tl.constexpr, NEED_SRC: tl.constexpr,
        NEED_KP: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid_p = tl.program_id(0)
        j = tl.program_id(1)
        n = tl.program_id(2)
        HW = H * W
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        mp = offs_p < HW
        px, py = _dm_pixel_xy(offs_p, W, H1, W1, ACC)
        mx, my, dx, dy, ksx, ksy = _dm_kp_motion(kps_ptr, kpd_ptr, jac_ptr, n, j, K, px, py, HAS_JAC, ACC)
        hg_base = ghg_ptr + (n * (K + 1) + j) * (C + 1) * HW
        gmx = tl.zeros([BLOCK_P], ACC)
        gmy = tl.zeros([BLOCK_P], ACC)
        if HAS_GMOT:
            mot_base = gmot_ptr + (n * (K + 1) + j) * HW * 2
            gmx += tl.load(mot_base + offs_p * 2, mask=mp, other=0.0).to(ACC)
            gmy += tl.load(mot_base + offs_p * 2 + 1, mask=mp, other=0.0).to(ACC)
        if HAS_GHG:
            off00, off01, off10, off11, m00, m01, m10, m11, wx1, wy1 = bilinear_taps(mx, my, H, W, mp, s_h, s_w)
            wx0 = 1 - wx1
            wy0 = 1 - wy1
            src_base = src_ptr + n * s_n
            gsrc_base = gsrc_ptr + n * s_n
            dix = tl.zeros([BLOCK_P], ACC)
            diy = tl.zeros([BLOCK_P], ACC)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mc = (offs_c < C)[None, :]
                cin = offs_c[None, :] * s_c
                g = tl.load(hg_base + (1 + offs_c[None, :]) * HW + offs_p[:, None], mask=mp[:, None] & mc,
                            other=0.0).to(ACC)
                if NEED_KP:
                    v00, v01, v10, v11 = _dm_gather4(src_base, cin, mc, off00, off01, off10, off11,
                                                     m00, m01, m10, m11, ACC)
                    dix += tl.sum(g * (wy0[:, None] * (v01 - v00) + wy1[:, None] * (v11 - v10)), axis=1)
                    diy += tl.sum(g * (wx0[:, None] * (v10 - v00) + wx1[:, None] * (v11 - v01)), axis=1)
                if NEED_SRC:
                    tl.atomic_add(gsrc_base + off00[:, None] + cin, g * (wy0 * wx0)[:, None],
                                  mask=m00[:, None] & mc, sem="relaxed")
                    tl.atomic_add(gsrc_base + off01[:, None] + cin, g * (wy0 * wx1)[:, None],
                                  mask=m01[:, None] & mc, sem="relaxed")
                    tl.atomic_add(gsrc_base + off10[:, None] + cin, g * (wy1 * wx0)[:, None],
                                  mask=m10[:, None] & mc, sem="relaxed")
                    tl.atomic_add(gsrc_base + off11[:, None] + cin, g * (wy1 * wx1)[:, None],
                                  mask=m11[:, None] & mc, sem="relaxed")
            gmx += dix * (0.5 * (W - 1))
            gmy += diy * (0.5 * (H - 1))
        if NEED_KP:
            if j > 0:
                gmx = tl.where(mp, gmx, 0.0)
                gmy = tl.where(mp, gmy, 0.0)
                slot = part_ptr + ((n * K + j - 1) * n_tiles + pid_p) * 10
                tl.store(slot, tl.sum(gmx, axis=0))
                tl.store(slot + 1, tl.sum(gmy, axis=0))
                tl.store(slot + 2, tl.sum(gmx * dx, axis=0))
                tl.store(slot + 3, tl.sum(gmx * dy, axis=0))
                tl.store(slot + 4, tl.sum(gmy * dx, axis=0))
                tl.store(slot + 5, tl.sum(gmy * dy, axis=0))
                if HAS_GHG:
                    gh = tl.load(hg_base + offs_p, mask=mp, other=0.0).to(ACC)
                    sx = px - ksx
                    sy = py - ksy
                    hd = gh * tl.exp(-0.5 * (dx * dx + dy * dy) / var) / var
                    hs = gh * tl.exp(-0.5 * (sx * sx + sy * sy) / var) / var
                    tl.store(slot + 6, tl.sum(hd * dx, axis=0))
                    tl.store(slot + 7, tl.sum(hd * dy, axis=0))
                    tl.store(slot + 8, tl.sum(hs * sx, axis=0))
                    tl.store(slot + 9, tl.sum(hs * sy, axis=0))
                else:
                    zero = tl.sum(gmx * 0.0, axis=0)
                    tl.store(slot + 6, zero)
                    tl.store(slot + 7, zero)
                    tl.store(slot + 8, zero)
                    tl.store(slot + 9, zero)

    @triton.jit
    def _dm_softmax_motion(lg_base, mot_base, offs_p, mp, KP1, HW, l_sk, l_sp,
                           ACC: tl.constexpr, BLOCK_K: tl.constexpr):
        """Softmax over the K+1 logits of each pixel and the weighted sum of the motions.
        Returns s, mx, my (BLOCK_P, BLOCK_K; 0 in padded columns) and the deformation (dx, dy)."""
        offs_k = tl.arange(0, BLOCK_K)
        mk = (offs_k < KP1)[None, :]
        m2 = mp[:, None] & mk
        logit = tl.load(lg_base + offs_k[None, :] * l_sk + offs_p[:, None] * l_sp, mask=m2, other=0.0).to(ACC)
        logit = tl.where(mk, logit, float("-inf"))
        e = tl.exp(logit - tl.max(logit, axis=1)[:, None])
        e = tl.where(mk, e, 0.0)
        s = e / tl.sum(e, axis=1)[:, None]
        mo = (offs_k[None, :] * HW + offs_p[:, None]) * 2
        mx = tl.load(mot_base + mo, mask=m2, other=0.0).to(ACC)
        my = tl.load(mot_base + mo + 1, mask=m2, other=0.0).to(ACC)
        return s, mx, my, tl.sum(s * mx, axis=1), tl.sum(s * my, axis=1)

    @triton.jit
    def _dm_combine_fwd_kernel(
        lg_ptr,  # (B, K+1, Hp, Wp) mask logits, flat plane, if DEFORM
        mot_ptr,  # (B, K+1, Hp, Wp, 2) sparse motions, contiguous, if DEFORM
        grid_ptr,  # (B, Hp, Wp, 2) contiguous: the deformation (out) if DEFORM, else the grid (in)
        feat_ptr,  # (B, Cf, Hf, Wf) feature, any strides, if SAMPLE
        occ_ptr,  # (B, 1, Hp, Wp) occlusion, flat plane, if HAS_OCC
        out_ptr,  # (B, Cf, Hp, Wp) out: warped feature, flat plane, if SAMPLE
        KP1, Cf, Hp, Wp, Hf, Wf,
        l_sn, l_sk, l_sp, f_sn, f_sc, f_sh, f_sw, oc_sn, oc_sp, o_sn, o_sc, o_sp,
        DEFORM: tl.constexpr, SAMPLE: tl.constexpr, HAS_OCC: tl.constexpr, ACC: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """One program per (BLOCK_P pixels of the (Hp, Wp) output plane, sample). With DEFORM and SAMPLE
        (same sizes) the deformation goes from registers to the sampler; (Hp, Wp) == (Hf, Wf) then."""
        pid_p = tl.program_id(0)
        n = tl.program_id(1)
        HW = Hp * Wp
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        mp = offs_p < HW
        grid_base = grid_ptr + n * HW * 2
        if DEFORM:
            s, mx, my, gx, gy = _dm_softmax_motion(lg_ptr + n * l_sn, mot_ptr + n * KP1 * HW * 2, offs_p, mp,
                                                   KP1, HW, l_sk, l_sp, ACC, BLOCK_K)
            tl.store(grid_base + offs_p * 2, gx.to(grid_ptr.dtype.element_ty), mask=mp)
            tl.store(grid_base + offs_p * 2 + 1, gy.to(grid_ptr.dtype.element_ty), mask=mp)
        else:
            gx = tl.load(grid_base + offs_p * 2, mask=mp, other=0.0).to(ACC)
            gy = tl.load(grid_base + offs_p * 2 + 1, mask=mp, other=0.0).to(ACC)
        if SAMPLE:
            off00, off01, off10, off11, m00, m01, m10, m11, wx1, wy1 = bilinear_taps(gx, gy, Hf, Wf, mp, f_sh, f_sw)
            wx0 = 1 - wx1
            wy0 = 1 - wy1
            w00 = (wy0 * wx0)[:, None]
            w01 = (wy0 * wx1)[:, None]
            w10 = (wy1 * wx0)[:, None]
            w11 = (wy1 * wx1)[:, None]
            if HAS_OCC:
                occ = tl.load(occ_ptr + n * oc_sn + offs_p * oc_sp, mask=mp, other=0.0).to(ACC)[:, None]
            f_base = feat_ptr + n * f_sn
            o_base = out_ptr + n * o_sn + offs_p[:, None] * o_sp
            for c0 in range(0, Cf, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mc = (offs_c < Cf)[None, :]
                v00, v01, v10, v11 = _dm_gather4(f_base, offs_c[None, :] * f_sc, mc, off00, off01, off10, off11,
                                                 m00, m01, m10, m11, ACC)
                val = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11
                if HAS_OCC:
                    val = val * occ
                tl.store(o_base + offs_c[None, :] * o_sc, val.to(out_ptr.dtype.element_ty), mask=mp[:, None] & mc)

    # Combine backward. warped_c = occ * sample_c(feature, D); D = sum_k s_k m_k, s = softmax(logits):
    #   dL/docc = sum_c g_c sample_c;   g'_c = occ g_c
    #   dL/dD = dL/ddeformation + ((W - 1) / 2 sum_c g'_c dsample_c/dix, (H - 1) / 2 sum_c g'_c dsample_c/diy)
    #   dL/dm_k = s_k dL/dD;   dL/dlogit_k = s_k (dL/dD . m_k - dL/dD . D)      (softmax backward)
    #   dL/dfeature[c, tap] += g'_c w_tap                                         (scatter, atomics)

    @triton.jit
    def _dm_combine_bwd_kernel(
        lg_ptr, mot_ptr,  # as in the forward, if DEFORM
        grid_ptr,  # (B, Hp, Wp, 2) the sampling grid, if not DEFORM
        feat_ptr,  # (B, Cf, Hf, Wf) feature, any strides, if SAMPLE
        occ_ptr,  # (B, 1, Hp, Wp) occlusion, flat plane, if HAS_OCC
        gdef_ptr,  # (B, Hp, Wp, 2) dL/ddeformation, contiguous, if HAS_GDEF
        gout_ptr,  # (B, Cf, Hp, Wp) dL/dwarped, flat plane, if SAMPLE
        gfeat_ptr,  # (B, Cf, Hf, Wf) out: dL/dfeature accumulator (fp32/fp64, feature's strides), NEED_FEAT
        gocc_ptr,  # (B, 1, Hp, Wp) out: dL/docclusion, contiguous, if HAS_OCC and NEED_OCC
        ggrid_ptr,  # (B, Hp, Wp, 2) out: dL/dgrid, contiguous, if SAMPLE and not DEFORM
        glg_ptr,  # (B, K+1, Hp, Wp) out: dL/dlogits, contiguous, if DEFORM
        gmot_ptr,  # (B, K+1, Hp, Wp, 2) out: dL/dmotions, contiguous, if DEFORM
        KP1, Cf, Hp, Wp, Hf, Wf,
        l_sn, l_sk, l_sp, f_sn, f_sc, f_sh, f_sw, oc_sn, oc_sp, g_sn, g_sc, g_sp,
        DEFORM: tl.constexpr, SAMPLE: tl.constexpr, HAS_OCC: tl.constexpr, HAS_GDEF: tl.constexpr,
        NEED_FEAT: tl.constexpr, NEED_OCC: tl.constexpr, ACC: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid_p = tl.program_id(0)
        n = tl.program_id(1)
        HW = Hp * Wp
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        mp = offs_p < HW
        if DEFORM:
            s, mx, my, gx, gy = _dm_softmax_motion(lg_ptr + n * l_sn, mot_ptr + n * KP1 * HW * 2, offs_p, mp,
                                                   KP1, HW, l_sk, l_sp, ACC, BLOCK_K)
        else:
            gx = tl.load(grid_ptr + n * HW * 2 + offs_p * 2, mask=mp, other=0.0).to(ACC)
            gy = tl.load(grid_ptr + n * HW * 2 + offs_p * 2 + 1, mask=mp, other=0.0).to(ACC)
        ggx = tl.zeros([BLOCK_P], ACC)
        ggy = tl.zeros([BLOCK_P], ACC)
        if SAMPLE:
            off00, off01, off10, off11, m00, m01, m10, m11, wx1, wy1 = bilinear_taps(gx, gy, Hf, Wf, mp, f_sh, f_sw)
            wx0 = 1 - wx1
            wy0 = 1 - wy1
            w00 = (wy0 * wx0)[:, None]
            w01 = (wy0 * wx1)[:, None]
            w10 = (wy1 * wx0)[:, None]
            w11 = (wy1 * wx1)[:, None]
            if HAS_OCC:
                occ = tl.load(occ_ptr + n * oc_sn + offs_p * oc_sp, mask=mp, other=0.0).to(ACC)
            gocc = tl.zeros([BLOCK_P], ACC)
            f_base = feat_ptr + n * f_sn
            gf_base = gfeat_ptr + n * f_sn
            g_base = gout_ptr + n * g_sn + offs_p[:, None] * g_sp
            for c0 in range(0, Cf, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mc = (offs_c < Cf)[None, :]
                cin = offs_c[None, :] * f_sc
                g = tl.load(g_base + offs_c[None, :] * g_sc, mask=mp[:, None] & mc, other=0.0).to(ACC)
                v00, v01, v10, v11 = _dm_gather4(f_base, cin, mc, off00, off01, off10, off11,
                                                 m00, m01, m10, m11, ACC)
                if HAS_OCC:
                    gocc += tl.sum(g * (w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11), axis=1)
                    g = g * occ[:, None]
                ggx += tl.sum(g * (wy0[:, None] * (v01 - v00) + wy1[:, None] * (v11 - v10)), axis=1)
                ggy += tl.sum(g * (wx0[:, None] * (v10 - v00) + wx1[:, None] * (v11 - v01)), axis=1)
                if NEED_FEAT:
                    tl.atomic_add(gf_base + off00[:, None] + cin, g * w00, mask=m00[:, None] & mc, sem="relaxed")
                    tl.atomic_add(gf_base + off01[:, None] + cin, g * w01, mask=m01[:, None] & mc, sem="relaxed")
                    tl.atomic_add(gf_base + off10[:, None] + cin, g * w10, mask=m10[:, None] & mc, sem="relaxed")
                    tl.atomic_add(gf_base + off11[:, None] + cin, g * w11, mask=m11[:, None] & mc, sem="relaxed")
            ggx = ggx * (0.5 * (Wf - 1))
            ggy = ggy * (0.5 * (Hf - 1))
            if HAS_OCC:
                if NEED_OCC:
                    tl.store(gocc_ptr + n * HW + offs_p, gocc.to(gocc_ptr.dtype.element_ty), mask=mp)
        if DEFORM:
            if HAS_GDEF:
                ggx += tl.load(gdef_ptr + n * HW * 2 + offs_p * 2, mask=mp, other=0.0).to(ACC)
                ggy += tl.load(gdef_ptr + n * HW * 2 + offs_p * 2 + 1, mask=mp, other=0.0).to(ACC)
            offs_k = tl.arange(0, BLOCK_K)
            m2 = mp[:, None] & (offs_k < KP1)[None, :]
            mo = n * KP1 * HW * 2 + (offs_k[None, :] * HW + offs_p[:, None]) * 2
            tl.store(gmot_ptr + mo, (s * ggx[:, None]).to(gmot_ptr.dtype.element_ty), mask=m2)
            tl.store(gmot_ptr + mo + 1, (s * ggy[:, None]).to(gmot_ptr.dtype.element_ty), mask=m2)
            dot_d = ggx * gx + ggy * gy
            glg = s * (ggx[:, None] * mx + ggy[:, None] * my - dot_d[:, None])
            tl.store(glg_ptr + (n * KP1 + offs_k[None, :]) * HW + offs_p[:, None],
                     glg.to(glg_ptr.dtype.element_ty), mask=m2)
        else:
            tl.store(ggrid_ptr + n * HW * 2 + offs_p * 2, ggx.to(ggrid_ptr.dtype.element_ty), mask=mp)
            tl.store(ggrid_ptr + n * HW * 2 + offs_p * 2 + 1, ggy.to(ggrid_ptr.dtype.element_ty), mask=mp)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------

def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _acc(*tensors):
    return tl.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else tl.float32


def _acc_torch(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _has_flat_plane(t: torch.Tensor) -> bool:
    """One pixel stride walks the (h, w) plane: p = h * W + w."""
    return t.shape[2] == 1 or t.shape[3] == 1 or t.stride(2) == t.shape[3] * t.stride(3)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t if NCHW- or channels-last-dense with a flat (h, w) plane, else an NCHW copy."""
    if (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)) and _has_flat_plane(t):
        return t
    return t.contiguous()


def _flat_plane(t: torch.Tensor) -> torch.Tensor:
    """t if its (h, w) plane is flat, whatever its batch and channel strides, else an NCHW copy: the mask
    logits may be a channel slice of the stacked 7x7 heads (model.blocks.conv_heads), which the kernels
    read through their own strides (l_sn, l_sk, l_sp) without a copy."""
    return t if _has_flat_plane(t) else t.contiguous()


def _pixel_stride(t: torch.Tensor) -> int:
    return t.stride(3) if t.shape[3] > 1 else t.stride(2)


def _check(op: str, batch: int, *numels: int) -> None:
    if batch > MAX_GRID_Y:
        raise ValueError(f"{op}: batch {batch} exceeds the launch limit {MAX_GRID_Y}")
    for n in numels:
        if n > INT32_MAX:
            raise ValueError(f"{op}: a tensor of {n} elements exceeds the int32 offset limit {INT32_MAX}")


def _channel_blocks(channels: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) for the sampling loops: wide channel chunks for channels-last (contiguous
    along C), narrow ones and wide pixel tiles for NCHW; ~2k-element tiles."""
    block_c = min(_next_pow2(channels), 32 if channels_last else 8)
    return max(32, min(128, 2048 // block_c)), block_c


def _front_fwd(source, kp_source, kp_driving, jacobian, kp_variance: float):
    b, c, h, w = source.shape
    k = kp_driving.shape[1]
    _check("dense_motion_front", b, source.numel() // max(b, 1) * (k + 1) * 2)
    # dtypes as the reference: motions from the keypoints (and J), heatmaps in the keypoints' dtype
    # concatenated with the deformed sources in the source's dtype.
    mot_dtype = torch.promote_types(kp_source.dtype, kp_driving.dtype)
    if jacobian is not None:
        mot_dtype = torch.promote_types(mot_dtype, jacobian.dtype)
    hg_dtype = torch.promote_types(source.dtype, kp_driving.dtype)
    hg = _empty(b, (k + 1) * (c + 1), h, w, device=source.device, dtype=hg_dtype)
    motions = _empty(b, k + 1, h, w, 2, device=source.device, dtype=mot_dtype)
    block_p = 128
    block_c = min(_next_pow2(c), 8)
    _dm_front_fwd_kernel[(triton.cdiv(h * w, block_p), k + 1, b)](
        src_ptr=source, kps_ptr=kp_source, kpd_ptr=kp_driving,
        jac_ptr=jacobian if jacobian is not None else kp_driving, hg_ptr=hg, mot_ptr=motions,
        C=c, H=h, W=w, K=k, H1=max(h - 1, 1), W1=max(w - 1, 1), var=float(kp_variance),
        s_n=source.stride(0), s_c=source.stride(1), s_h=source.stride(2), s_w=source.stride(3),
        HAS_JAC=jacobian is not None, ACC=_acc(source, kp_source, kp_driving, jacobian),
        BLOCK_P=block_p, BLOCK_C=block_c)
    return hg, motions


def _front_bwd(g_hg, g_mot, source, kp_source, kp_driving, jacobian, kp_variance: float, need_src: bool,
               need_kp: bool):
    """-> (dL/dsource, dL/dkp_source, dL/dkp_driving, dL/djacobian), None where not needed."""
    b, c, h, w = source.shape
    k = kp_driving.shape[1]
    acc_t = _acc_torch(source, kp_source, kp_driving, jacobian)
    block_p = 128
    block_c = min(_next_pow2(c), 8)
    n_tiles = triton.cdiv(h * w, block_p)
    gsrc = torch.zeros_like(source, dtype=acc_t) if need_src else None
    part = _empty(b, k, n_tiles, 10, device=source.device, dtype=acc_t) if need_kp else None
    if g_hg is not None:
        g_hg = g_hg.contiguous()
    if g_mot is not None:
        g_mot = g_mot.contiguous()
    dummy = kp_driving
    _dm_front_bwd_kernel[(n_tiles, k + 1, b)](
        src_ptr=source, kps_ptr=kp_source, kpd_ptr=kp_driving,
        jac_ptr=jacobian if jacobian is not None else dummy,
        ghg_ptr=g_hg if g_hg is not None else dummy, gmot_ptr=g_mot if g_mot is not None else dummy,
        gsrc_ptr=gsrc if gsrc is not None else dummy, part_ptr=part if part is not None else dummy,
        C=c, H=h, W=w, K=k, H1=max(h - 1, 1), W1=max(w - 1, 1), var=float(kp_variance), n_tiles=n_tiles,
        s_n=source.stride(0), s_c=source.stride(1), s_h=source.stride(2), s_w=source.stride(3),
        HAS_JAC=jacobian is not None, HAS_GHG=g_hg is not None, HAS_GMOT=g_mot is not None,
        NEED_SRC=need_src and g_hg is not None, NEED_KP=need_kp,
        ACC=_acc(source, kp_source, kp_driving, jacobian), BLOCK_P=block_p, BLOCK_C=block_c)
    g_src = gsrc.to(source.dtype) if gsrc is not None else None
    if not need_kp:
        return g_src, None, None, None
    sums = part.sum(2)  # (B, K, 10)
    gm = sums[..., 0:2]  # sum_p dL/dm
    g_kps = gm - sums[..., 8:10]
    if jacobian is not None:
        g_kpd = sums[..., 6:8] - torch.einsum("bkil,bki->bkl", jacobian.to(acc_t), gm)
        g_jac = sums[..., 2:6].reshape(b, k, 2, 2)
    else:
        g_kpd = sums[..., 6:8] - gm
        g_jac = None
    return (g_src, g_kps.to(kp_source.dtype), g_kpd.to(kp_driving.dtype),
            g_jac.to(jacobian.dtype) if g_jac is not None else None)


def _combine_launch_common(feature, b, hp, wp):
    cl = _channels_last(feature)
    block_p, block_c = _channel_blocks(feature.shape[1], cl)
    return cl, block_p, block_c, (triton.cdiv(hp * wp, block_p), b)


def _combine_fwd(mask_logits, motions, grid, feature, occlusion, deform: bool, sample: bool):
    """DEFORM: deformation from (mask_logits, motions) on their (h, w) plane (and written out); SAMPLE:
    feature sampled at the deformation (DEFORM) or at `grid`, times the occlusion. -> (grid/deformation,
    warped or None)."""
    if deform:
        b, kp1, hp, wp = mask_logits.shape
        grid = _empty(b, hp, wp, 2, device=motions.device, dtype=torch.result_type(motions, mask_logits))
    else:
        b, hp, wp, _ = grid.shape
        kp1 = 1
    block_k = _next_pow2(kp1)
    out = None
    if sample:
        cf, hf, wf = feature.shape[1:]
        cl, block_p, block_c, launch = _combine_launch_common(feature, b, hp, wp)
        out_dtype = torch.result_type(feature, occlusion) if occlusion is not None else feature.dtype
        fmt = torch.channels_last if cl else torch.contiguous_format
        out = _empty(b, cf, hp, wp, device=feature.device, dtype=out_dtype, memory_format=fmt)
    else:
        cf, hf, wf = 1, 1, 1
        block_p, block_c, launch = 64, 1, (triton.cdiv(hp * wp, 64), b)
    ref = mask_logits if deform else grid
    _dm_combine_fwd_kernel[launch](
        lg_ptr=mask_logits if deform else ref, mot_ptr=motions if deform else ref, grid_ptr=grid,
        feat_ptr=feature if sample else ref, occ_ptr=occlusion if occlusion is not None else ref,
        out_ptr=out if out is not None else ref,
        KP1=kp1, Cf=cf, Hp=hp, Wp=wp, Hf=hf, Wf=wf,
        l_sn=mask_logits.stride(0) if deform else 0, l_sk=mask_logits.stride(1) if deform else 0,
        l_sp=_pixel_stride(mask_logits) if deform else 0,
        f_sn=feature.stride(0) if sample else 0, f_sc=feature.stride(1) if sample else 0,
        f_sh=feature.stride(2) if sample else 0, f_sw=feature.stride(3) if sample else 0,
        oc_sn=occlusion.stride(0) if occlusion is not None else 0,
        oc_sp=_pixel_stride(occlusion) if occlusion is not None else 0,
        o_sn=out.stride(0) if out is not None else 0, o_sc=out.stride(1) if out is not None else 0,
        o_sp=_pixel_stride(out) if out is not None else 0,
        DEFORM=deform, SAMPLE=sample, HAS_OCC=sample and occlusion is not None,
        ACC=_acc(mask_logits, motions, grid, feature, occlusion), BLOCK_P=block_p, BLOCK_K=block_k,
        BLOCK_C=block_c)
    return grid, out


def _combine_bwd(g_def, g_out, mask_logits, motions, grid, feature, occlusion, deform: bool, sample: bool,
                 need_feat: bool, need_occ: bool):
    """-> (dL/dlogits, dL/dmotions, dL/dgrid, dL/dfeature, dL/docclusion), None where not computed."""
    if deform:
        b, kp1, hp, wp = mask_logits.shape
    else:
        b, hp, wp, _ = grid.shape
        kp1 = 1
    block_k = _next_pow2(kp1)
    acc_t = _acc_torch(mask_logits, motions, grid, feature, occlusion)
    if sample and g_out is not None:
        cf, hf, wf = feature.shape[1:]
        cl, block_p, block_c, launch = _combine_launch_common(feature, b, hp, wp)
        g_out = g_out.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        if g_out.shape[2] > 1 and g_out.shape[3] > 1 and g_out.stride(2) != g_out.shape[3] * g_out.stride(3):
            g_out = g_out.contiguous()  # pragma: no cover
    else:
        sample = False
        cf, hf, wf = 1, 1, 1
        block_p, block_c, launch = 64, 1, (triton.cdiv(hp * wp, 64), b)
    need_feat = need_feat and sample
    need_occ = need_occ and sample and occlusion is not None
    gfeat = torch.zeros_like(feature, dtype=acc_t) if need_feat else None
    gocc = _empty(b, 1, hp, wp, device=occlusion.device, dtype=occlusion.dtype) if need_occ else None
    glg = gmot = ggrid = None
    if deform:
        glg = _empty(b, kp1, hp, wp, device=mask_logits.device, dtype=mask_logits.dtype)
        gmot = _empty(b, kp1, hp, wp, 2, device=motions.device, dtype=motions.dtype)
    else:
        ggrid = _empty(grid.shape, device=grid.device, dtype=grid.dtype)
    if g_def is not None:
        g_def = g_def.contiguous()
    ref = mask_logits if deform else grid
    _dm_combine_bwd_kernel[launch](
        lg_ptr=mask_logits if deform else ref, mot_ptr=motions if deform else ref,
        grid_ptr=grid if not deform else ref, feat_ptr=feature if sample else ref,
        occ_ptr=occlusion if occlusion is not None else ref, gdef_ptr=g_def if g_def is not None else ref,
        gout_ptr=g_out if sample else ref, gfeat_ptr=gfeat if gfeat is not None else ref,
        gocc_ptr=gocc if gocc is not None else ref, ggrid_ptr=ggrid if ggrid is not None else ref,
        glg_ptr=glg if glg is not None else ref, gmot_ptr=gmot if gmot is not None else ref,
        KP1=kp1, Cf=cf, Hp=hp, Wp=wp, Hf=hf, Wf=wf,
        l_sn=mask_logits.stride(0) if deform else 0, l_sk=mask_logits.stride(1) if deform else 0,
        l_sp=_pixel_stride(mask_logits) if deform else 0,
        f_sn=feature.stride(0) if sample else 0, f_sc=feature.stride(1) if sample else 0,
        f_sh=feature.stride(2) if sample else 0, f_sw=feature.stride(3) if sample else 0,
        oc_sn=occlusion.stride(0) if occlusion is not None else 0,
        oc_sp=_pixel_stride(occlusion) if occlusion is not None else 0,
        g_sn=g_out.stride(0) if sample else 0, g_sc=g_out.stride(1) if sample else 0,
        g_sp=_pixel_stride(g_out) if sample else 0,
        DEFORM=deform, SAMPLE=sample, HAS_OCC=sample and occlusion is not None, HAS_GDEF=g_def is not None,
        NEED_FEAT=need_feat, NEED_OCC=need_occ, ACC=_acc(mask_logits, motions, grid, feature, occlusion),
        BLOCK_P=block_p, BLOCK_K=block_k, BLOCK_C=block_c)
    if ggrid is not None and not sample:
        ggrid.zero_()
    g_feat = gfeat.to(feature.dtype) if gfeat is not None else None
    return glg, gmot, ggrid, g_feat, gocc


# ----------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------

class DenseMotionFrontFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, source, kp_source, kp_driving, jacobian, kp_variance):
        hg, motions = _front_fwd(source, kp_source, kp_driving, jacobian, kp_variance)
        ctx.save_for_backward(source, kp_source, kp_driving, jacobian)
        ctx.kp_variance = kp_variance
        ctx.set_materialize_grads(False)
        return hg, motions

    @staticmethod
    def backward(ctx, g_hg, g_mot):
        return _front_grads(ctx, g_hg, g_mot, _front_bwd)


def _front_grads(ctx, g_hg, g_mot, backward):
    """The front's input gradients from ctx (saved inputs, kp_variance) through `backward`: the kernel
    (eager Function) or the backward op (custom op, under torch.compile)."""
    source, kp_source, kp_driving, jacobian = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_kp = need[1] or need[2] or need[3]
    if not (need[0] or need_kp) or (g_hg is None and g_mot is None):
        return None, None, None, None, None
    g_src, g_kps, g_kpd, g_jac = backward(g_hg, g_mot, source, kp_source, kp_driving, jacobian, ctx.kp_variance,
                                          need[0], need_kp)
    return (g_src if need[0] else None, g_kps if need[1] else None, g_kpd if need[2] else None,
            g_jac if need[3] else None, None)


class DenseMotionCombineFn(torch.autograd.Function):
    """(Hf, Wf) == (h, w): deformation and warped feature in one kernel, backward in one kernel."""

    @staticmethod
    def forward(ctx, mask_logits, motions, feature, occlusion):
        deformation, warped = _combine_fwd(mask_logits, motions, None, feature, occlusion, True, True)
        ctx.save_for_backward(mask_logits, motions, feature, occlusion)
        ctx.set_materialize_grads(False)
        return deformation, warped

    @staticmethod
    def backward(ctx, g_def, g_out):
        mask_logits, motions, feature, occlusion = ctx.saved_tensors
        need = ctx.needs_input_grad
        glg, gmot, _, g_feat, g_occ = _combine_bwd(g_def, g_out, mask_logits, motions, None, feature, occlusion,
                                                   True, True, need[2], need[3])
        if g_def is None and g_out is None:
            glg, gmot = torch.zeros_like(mask_logits), torch.zeros_like(motions)
        return (glg if need[0] else None, gmot if need[1] else None, g_feat if need[2] else None,
                g_occ if need[3] else None)


class DeformationFn(torch.autograd.Function):
    """softmax(mask_logits) . motions -> deformation (B, h, w, 2) (the resize path's first step)."""

    @staticmethod
    def forward(ctx, mask_logits, motions):
        deformation, _ = _combine_fwd(mask_logits, motions, None, None, None, True, False)
        ctx.save_for_backward(mask_logits, motions)
        return deformation

    @staticmethod
    def backward(ctx, g_def):
        mask_logits, motions = ctx.saved_tensors
        glg, gmot, _, _, _ = _combine_bwd(g_def, None, mask_logits, motions, None, None, None, True, False,
                                          False, False)
        return glg, gmot


class WarpOcclusionFn(torch.autograd.Function):
    """feature sampled at grid (B, Hf, Wf, 2), times occlusion (B, 1, Hf, Wf) (the resize path's last step)."""

    @staticmethod
    def forward(ctx, feature, grid, occlusion):
        _, warped = _combine_fwd(None, None, grid, feature, occlusion, False, True)
        ctx.save_for_backward(feature, grid, occlusion)
        return warped

    @staticmethod
    def backward(ctx, g_out):
        feature, grid, occlusion = ctx.saved_tensors
        need = ctx.needs_input_grad
        _, _, ggrid, g_feat, g_occ = _combine_bwd(None, g_out, None, None, grid, feature, occlusion, False, True,
                                                  need[0], need[2])
        return g_feat if need[0] else None, ggrid if need[1] else None, g_occ if need[2] else None


# ----------------------------------------------------------------------------------------------------
# The kernels as custom ops, for torch.compile (see grid_sample.py). Optional inputs are None, outputs
# that were not computed are empty tensors (an op returns tensors, never None or its own inputs).
# ----------------------------------------------------------------------------------------------------

def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t.contiguous()


@torch.library.custom_op("ostnet::dense_motion_front", mutates_args=())
def _front_op(source: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor, jacobian: torch.Tensor | None,
              kp_variance: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _front_fwd(source, kp_source, kp_driving, jacobian, kp_variance)


@_front_op.register_fake
def _(source, kp_source, kp_driving, jacobian, kp_variance):
    b, c, h, w = source.shape
    k = kp_driving.shape[1]
    mot_dtype = torch.promote_types(kp_source.dtype, kp_driving.dtype)
    if jacobian is not None:
        mot_dtype = torch.promote_types(mot_dtype, jacobian.dtype)
    hg_dtype = torch.promote_types(source.dtype, kp_driving.dtype)
    return (source.new_empty((b, (k + 1) * (c + 1), h, w), dtype=hg_dtype),
            source.new_empty((b, k + 1, h, w, 2), dtype=mot_dtype))


@torch.library.custom_op("ostnet::dense_motion_front_backward", mutates_args=())
def _front_backward_op(g_hg: torch.Tensor | None, g_mot: torch.Tensor | None, source: torch.Tensor,
                       kp_source: torch.Tensor, kp_driving: torch.Tensor, jacobian: torch.Tensor | None,
                       kp_variance: float, need_src: bool, need_kp: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g_src, g_kps, g_kpd, g_jac = _front_bwd(g_hg, g_mot, source, kp_source, kp_driving, jacobian, kp_variance,
                                            need_src, need_kp)
    return (source.new_empty(0) if g_src is None else g_src, _or_empty(g_kps, kp_source),
            _or_empty(g_kpd, kp_driving), _or_empty(g_jac, kp_driving))


@_front_backward_op.register_fake
def _(g_hg, g_mot, source, kp_source, kp_driving, jacobian, kp_variance, need_src, need_kp):
    return (torch.empty_like(source) if need_src else source.new_empty(0),
            kp_source.new_empty(kp_source.shape) if need_kp else kp_source.new_empty(0),
            kp_driving.new_empty(kp_driving.shape) if need_kp else kp_driving.new_empty(0),
            jacobian.new_empty(jacobian.shape) if need_kp and jacobian is not None else kp_driving.new_empty(0))


def _front_setup(ctx, inputs, output):
    source, kp_source, kp_driving, jacobian, kp_variance = inputs
    ctx.save_for_backward(source, kp_source, kp_driving, jacobian)
    ctx.kp_variance = kp_variance


def _front_backward(ctx, g_hg, g_mot):
    return _front_grads(ctx, g_hg, g_mot, _front_backward_op)


_front_op.register_autograd(_front_backward, setup_context=_front_setup)


@torch.library.custom_op("ostnet::dense_motion_combine", mutates_args=())
def _combine_op(mask_logits: torch.Tensor | None, motions: torch.Tensor | None, grid: torch.Tensor | None,
                feature: torch.Tensor | None, occlusion: torch.Tensor | None, deform: bool,
                sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """DEFORM: (mask_logits, motions) -> deformation; SAMPLE: feature at the deformation (or at `grid`) x
    occlusion -> warped. -> (deformation or empty, warped or empty)."""
    deformation, warped = _combine_fwd(mask_logits, motions, grid, feature, occlusion, deform, sample)
    ref = mask_logits if deform else grid
    return (deformation if deform else ref.new_empty(0)), (warped if sample else ref.new_empty(0))


@_combine_op.register_fake
def _(mask_logits, motions, grid, feature, occlusion, deform, sample):
    if deform:
        b, _, hp, wp = mask_logits.shape
        deformation = mask_logits.new_empty((b, hp, wp, 2), dtype=torch.result_type(motions, mask_logits))
    else:
        b, hp, wp, _ = grid.shape
        deformation = grid.new_empty(0)
    if not sample:
        return deformation, (mask_logits if deform else grid).new_empty(0)  # as the real op
    dtype = torch.result_type(feature, occlusion) if occlusion is not None else feature.dtype
    fmt = torch.channels_last if _channels_last(feature) else torch.contiguous_format
    return deformation, torch.empty((b, feature.shape[1], hp, wp), device=feature.device, dtype=dtype,
                                    memory_format=fmt)


@torch.library.custom_op("ostnet::dense_motion_combine_backward", mutates_args=())
def _combine_backward_op(g_def: torch.Tensor | None, g_out: torch.Tensor | None, mask_logits: torch.Tensor | None,
                         motions: torch.Tensor | None, grid: torch.Tensor | None, feature: torch.Tensor | None,
                         occlusion: torch.Tensor | None, deform: bool, sample: bool, need_feat: bool,
                         need_occ: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
    grads = _combine_bwd(g_def, g_out, mask_logits, motions, grid, feature, occlusion, deform, sample,
                         need_feat, need_occ)
    ref = mask_logits if deform else grid
    return tuple(ref.new_empty(0) if g is None else g for g in grads)


@_combine_backward_op.register_fake
def _(g_def, g_out, mask_logits, motions, grid, feature, occlusion, deform, sample, need_feat, need_occ):
    ref = mask_logits if deform else grid
    sample = sample and g_out is not None
    hp, wp = (mask_logits.shape[2:] if deform else grid.shape[1:3])
    return (mask_logits.new_empty(mask_logits.shape) if deform else ref.new_empty(0),
            motions.new_empty(motions.shape) if deform else ref.new_empty(0),
            ref.new_empty(0) if deform else grid.new_empty(grid.shape),
            torch.empty_like(feature) if need_feat and sample else ref.new_empty(0),
            occlusion.new_empty((ref.shape[0], 1, hp, wp)) if need_occ and sample and occlusion is not None
            else ref.new_empty(0))


def _combine_setup(ctx, inputs, output):
    *tensors, deform, sample = inputs
    ctx.save_for_backward(*tensors)
    ctx.deform, ctx.sample = deform, sample


def _combine_backward(ctx, g_def, g_out):
    mask_logits, motions, grid, feature, occlusion = ctx.saved_tensors
    need = ctx.needs_input_grad
    if g_def is None and g_out is None:  # nothing flows back: zeros, not the kernel's unwritten buffers
        return tuple(torch.zeros_like(t) if n and t is not None else None
                     for t, n in zip(ctx.saved_tensors, need)) + (None, None)
    grads = _combine_backward_op(g_def if ctx.deform else None, g_out if ctx.sample else None, mask_logits,
                                 motions, grid, feature, occlusion, ctx.deform, ctx.sample, need[3], need[4])
    return tuple(g if n else None for g, n in zip(grads, need)) + (None, None)


_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


# ----------------------------------------------------------------------------------------------------
# Public dispatch
# ----------------------------------------------------------------------------------------------------

def _check_front(source, kp_source, kp_driving, jacobian):
    if source.dim() != 4:
        raise ValueError(f"dense_motion_front: source must be (B, C, h, w), got {tuple(source.shape)}")
    b = source.shape[0]
    if kp_driving.dim() != 3 or kp_driving.shape[0] != b or kp_driving.shape[2] != 2:
        raise ValueError(f"dense_motion_front: kp_driving must be (B, K, 2) with B = {b}, got "
                         f"{tuple(kp_driving.shape)}")
    if kp_source.shape != kp_driving.shape:
        raise ValueError(f"dense_motion_front: kp_source must match kp_driving {tuple(kp_driving.shape)}, got "
                         f"{tuple(kp_source.shape)}")
    if jacobian is not None and jacobian.shape != (*kp_driving.shape[:2], 2, 2):
        raise ValueError(f"dense_motion_front: jacobian must be (B, K, 2, 2) = {(*kp_driving.shape[:2], 2, 2)}, "
                         f"got {tuple(jacobian.shape)}")


def dense_motion_front(source, kp_source, kp_driving, jacobian, kp_variance: float, impl: str = "auto"):
    """source (B, C, h, w), kp_source / kp_driving (B, K, 2), jacobian (B, K, 2, 2) or None ->
    (hourglass input (B, (K+1)(C+1), h, w), sparse motions (B, K+1, h, w, 2))."""
    _check_front(source, kp_source, kp_driving, jacobian)
    if use_triton("dense_motion_front", impl, source, kp_source, kp_driving, jacobian):
        if kp_variance <= 0:
            raise ValueError(f"dense_motion_front: kp_variance must be > 0, got {kp_variance}")
        source = _dense(source)
        front = _front_op if torch.compiler.is_compiling() else DenseMotionFrontFn.apply
        return front(source, kp_source.contiguous(), kp_driving.contiguous(),
                                        jacobian.contiguous() if jacobian is not None else None,
                                        float(kp_variance))
    return dense_motion_front_reference(source, kp_source, kp_driving, jacobian, kp_variance)


def _check_combine(mask_logits, motions, feature, occlusion):
    if mask_logits.dim() != 4:
        raise ValueError(f"dense_motion_combine: mask_logits must be (B, K+1, h, w), got {tuple(mask_logits.shape)}")
    b, kp1, h, w = mask_logits.shape
    if motions.shape != (b, kp1, h, w, 2):
        raise ValueError(f"dense_motion_combine: motions must be (B, K+1, h, w, 2) = {(b, kp1, h, w, 2)}, got "
                         f"{tuple(motions.shape)}")
    if feature.dim() != 4 or feature.shape[0] != b:
        raise ValueError(f"dense_motion_combine: feature must be (B, C, H, W) with B = {b}, got "
                         f"{tuple(feature.shape)}")
    if occlusion is not None and occlusion.shape != (b, 1, h, w):
        raise ValueError(f"dense_motion_combine: occlusion must be (B, 1, h, w) = {(b, 1, h, w)}, got "
                         f"{tuple(occlusion.shape)}")
    if kp1 > MAX_MOTIONS:
        raise ValueError(f"dense_motion_combine: at most {MAX_MOTIONS} motions (K+1), got {kp1}")


def dense_motion_combine(mask_logits, motions, feature, occlusion, impl: str = "auto"):
    """mask_logits (B, K+1, h, w), motions (B, K+1, h, w, 2), feature (B, C, H, W), occlusion (B, 1, h, w) or
    None -> (deformation (B, h, w, 2), warped feature (B, C, H, W))."""
    _check_combine(mask_logits, motions, feature, occlusion)
    if use_triton("dense_motion_combine", impl, mask_logits, motions, feature, occlusion):
        compiling = torch.compiler.is_compiling()
        mask_logits = _flat_plane(mask_logits)
        motions = motions.contiguous()
        feature = _dense(feature)
        size = tuple(feature.shape[-2:])
        if tuple(mask_logits.shape[-2:]) == size:
            occ = _dense(occlusion) if occlusion is not None else None
            if compiling:
                return _combine_op(mask_logits, motions, None, feature, occ, True, True)
            return DenseMotionCombineFn.apply(mask_logits, motions, feature, occ)
        # Sizes differ: the deformation kernel, PyTorch's bilinear resize (align_corners=False, as the
        # reference), then the sampling kernel.
        if compiling:
            deformation = _combine_op(mask_logits, motions, None, None, None, True, False)[0]
        else:
            deformation = DeformationFn.apply(mask_logits, motions)  # (B, h, w, 2)
        grid = F.interpolate(deformation.permute(0, 3, 1, 2), size=size, mode="bilinear")
        grid = grid.permute(0, 2, 3, 1).contiguous()  # (B, Hf, Wf, 2)
        occ = None
        if occlusion is not None:
            occ = _dense(F.interpolate(occlusion, size=size, mode="bilinear"))  # (B, 1, Hf, Wf)
        if compiling:
            return deformation, _combine_op(None, None, grid, feature, occ, False, True)[1]
        return deformation, WarpOcclusionFn.apply(feature, grid, occ)
    return dense_motion_combine_reference(mask_logits, motions, feature, occlusion)
