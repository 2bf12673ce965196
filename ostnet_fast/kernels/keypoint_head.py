"""Keypoint head: heatmap logits (+ Jacobian maps) -> keypoints (+ 2x2 Jacobians) (FOMM's gaussian2kp).

heatmap = softmax(logits / temperature) over the h x w pixels of each keypoint, in >= fp32;
value   = sum_p heatmap(p) * (x_p, y_p)                    (B, K, 2), pixel centres in [-1, 1]
jacobian = sum_p heatmap(p) * jacobian_map(p)              (B, K, 2, 2)

In PyTorch this is a softmax, a small fp32 matmul for the coordinates and a broadcast multiply +
reduction for the Jacobians (two ~20 us reductions per frame in the H100 profile of the fused model,
bench/results/h100-2026-11-25-s2). Fused: ONE program per (sample, keypoint) streams its logits twice
(online max / sum, then the weighted sums), nothing but the 6 results is written. Backward, one kernel:
    g_heat(p) = x_p gv_x + y_p gv_y + sum_c J_c(p) gj_c,  sum_p heat g_heat = value . gv + jacobian . gj
    d logits  = heat (g_heat - value . gv - jacobian . gj) / temperature,  d J_c = heat gj_c
Limits: one Jacobian map per keypoint (FOMM's single_jacobian_map takes the reference); h * w and the
strides of one sample < 2**31.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _triton_utils as tu
from ._dispatch import use_triton
from .geometry import pixel_coordinates

if tu.HAS_TRITON:
    import triton
    import triton.language as tl


def keypoint_head_reference(logits: torch.Tensor, jacobian_map: torch.Tensor | None, temperature: float
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits (B, K, h, w), jacobian_map (B, J, 4, h, w) with J in {1, K} or None ->
    value (B, K, 2), jacobian (B, K, 2, 2) or None, in fp32 (fp64 for fp64 logits)."""
    b, k, h, w = logits.shape
    # Softmax in fp32: at temperature 0.1 fp16 logits lose the peak.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    heatmap = F.softmax(logits.reshape(b, k, -1) / temperature, dim=2).view(b, k, h, w)
    grid = pixel_coordinates((h, w), device=logits.device, dtype=heatmap.dtype)  # (h, w, 2)
    value = torch.einsum("bkhw,hwc->bkc", heatmap, grid)
    if jacobian_map is None:
        return value, None
    jac = (heatmap.unsqueeze(2) * jacobian_map.to(heatmap.dtype)).sum(dim=(-2, -1))  # (B, K, 4)
    return value, jac.view(b, k, 2, 2)


if tu.HAS_TRITON:

    @triton.jit
    def _pixel_offsets(start, HW, W, s_h, s_w, BLOCK: tl.constexpr):
        p = start + tl.arange(0, BLOCK)
        mask = p < HW
        hh = p // W
        ww = p - hh * W
        return hh, ww, mask, hh * s_h + ww * s_w

    @triton.jit
    def _kp_head_fwd_kernel(
        lg_ptr,  # (B, K, h, w) logits, any strides
        jm_ptr,  # (B, K, 4, h, w) Jacobian maps, any strides, if HAS_JAC
        val_ptr,  # (B, K, 2) out, contiguous, ACC
        jac_ptr,  # (B, K, 4) out, contiguous, ACC, if HAS_JAC
        stat_ptr,  # (B, K, 2) out: softmax max and sum of the scaled logits, for the backward
        K, HW, W, inv_t, W1, H1,  # W1 = max(w - 1, 1), H1 = max(h - 1, 1)
        l_b, l_k, l_h, l_w, j_b, j_k, j_c, j_h, j_w,
        HAS_JAC: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    ):
        k = tl.program_id(0)
        b = tl.program_id(1)
        lg = lg_ptr + b.to(tl.int64) * l_b + k * l_k
        jm = jm_ptr + b.to(tl.int64) * j_b + k * j_k
        m = tl.full([], float("-inf"), ACC)
        s = tl.zeros([], ACC)
        for start in range(0, HW, BLOCK):  # pass 1: online max and sum of exp
            hh, ww, mask, off = _pixel_offsets(start, HW, W, l_h, l_w, BLOCK)
            x = tl.load(lg + off, mask=mask, other=float("-inf")).to(ACC) * inv_t
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        vx = tl.zeros([BLOCK], ACC)
        vy = tl.zeros([BLOCK], ACC)
        a0 = tl.zeros([BLOCK], ACC)
        a1 = tl.zeros([BLOCK], ACC)
        a2 = tl.zeros([BLOCK], ACC)
        a3 = tl.zeros([BLOCK], ACC)
        for start in range(0, HW, BLOCK):  # pass 2: the heatmap-weighted sums
            hh, ww, mask, off = _pixel_offsets(start, HW, W, l_h, l_w, BLOCK)
            x = tl.load(lg + off, mask=mask, other=float("-inf")).to(ACC) * inv_t
            heat = tl.exp(x - m) / s
            vx += heat * (2 * ww.to(ACC) / W1 - 1)
            vy += heat * (2 * hh.to(ACC) / H1 - 1)
            if HAS_JAC:
                joff = hh * j_h + ww * j_w
                a0 += heat * tl.load(jm + joff, mask=mask, other=0).to(ACC)
                a1 += heat * tl.load(jm + j_c + joff, mask=mask, other=0).to(ACC)
                a2 += heat * tl.load(jm + 2 * j_c + joff, mask=mask, other=0).to(ACC)
                a3 += heat * tl.load(jm + 3 * j_c + joff, mask=mask, other=0).to(ACC)
        row = b.to(tl.int64) * K + k
        tl.store(val_ptr + row * 2, tl.sum(vx, axis=0))
        tl.store(val_ptr + row * 2 + 1, tl.sum(vy, axis=0))
        tl.store(stat_ptr + row * 2, m)
        tl.store(stat_ptr + row * 2 + 1, s)
        if HAS_JAC:
            tl.store(jac_ptr + row * 4, tl.sum(a0, axis=0))
            tl.store(jac_ptr + row * 4 + 1, tl.sum(a1, axis=0))
            tl.store(jac_ptr + row * 4 + 2, tl.sum(a2, axis=0))
            tl.store(jac_ptr + row * 4 + 3, tl.sum(a3, axis=0))

    @triton.jit
    def _kp_head_bwd_kernel(
        lg_ptr, jm_ptr, val_ptr, jac_ptr, stat_ptr,  # as in the forward (inputs here)
        gval_ptr,  # (B, K, 2) contiguous dL/dvalue, ACC
        gjac_ptr,  # (B, K, 4) contiguous dL/djacobian, ACC, if HAS_JAC
        glg_ptr,  # (B, K, h, w) out: dL/dlogits, strides g_*
        gjm_ptr,  # (B, K, 4, h, w) out: dL/djacobian_map, strides gj_*, if NEED_JM
        K, HW, W, inv_t, W1, H1,
        l_b, l_k, l_h, l_w, j_b, j_k, j_c, j_h, j_w,
        g_b, g_k, g_h, g_w, gj_b, gj_k, gj_c, gj_h, gj_w,
        HAS_JAC: tl.constexpr, NEED_JM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    ):
        k = tl.program_id(0)
        b = tl.program_id(1)
        row = b.to(tl.int64) * K + k
        lg = lg_ptr + b.to(tl.int64) * l_b + k * l_k
        jm = jm_ptr + b.to(tl.int64) * j_b + k * j_k
        glg = glg_ptr + b.to(tl.int64) * g_b + k * g_k
        gjm = gjm_ptr + b.to(tl.int64) * gj_b + k * gj_k
        m = tl.load(stat_ptr + row * 2)
        s = tl.load(stat_ptr + row * 2 + 1)
        gvx = tl.load(gval_ptr + row * 2)
        gvy = tl.load(gval_ptr + row * 2 + 1)
        dot = tl.load(val_ptr + row * 2) * gvx + tl.load(val_ptr + row * 2 + 1) * gvy
        if HAS_JAC:
            g0 = tl.load(gjac_ptr + row * 4)
            g1 = tl.load(gjac_ptr + row * 4 + 1)
            g2 = tl.load(gjac_ptr + row * 4 + 2)
            g3 = tl.load(gjac_ptr + row * 4 + 3)
            dot += (tl.load(jac_ptr + row * 4) * g0 + tl.load(jac_ptr + row * 4 + 1) * g1
                    + tl.load(jac_ptr + row * 4 + 2) * g2 + tl.load(jac_ptr + row * 4 + 3) * g3)
        for start in range(0, HW, BLOCK):
            hh, ww, mask, off = _pixel_offsets(start, HW, W, l_h, l_w, BLOCK)
            x = tl.load(lg + off, mask=mask, other=float("-inf")).to(ACC) * inv_t
            heat = tl.exp(x - m) / s
            g_heat = (2 * ww.to(ACC) / W1 - 1) * gvx + (2 * hh.to(ACC) / H1 - 1) * gvy
            if HAS_JAC:
                joff = hh * j_h + ww * j_w
                g_heat += (tl.load(jm + joff, mask=mask, other=0).to(ACC) * g0
                           + tl.load(jm + j_c + joff, mask=mask, other=0).to(ACC) * g1
                           + tl.load(jm + 2 * j_c + joff, mask=mask, other=0).to(ACC) * g2
                           + tl.load(jm + 3 * j_c + joff, mask=mask, other=0).to(ACC) * g3)
                if NEED_JM:
                    goff = hh * gj_h + ww * gj_w
                    tl.store(gjm + goff, heat * g0, mask=mask)
                    tl.store(gjm + gj_c + goff, heat * g1, mask=mask)
                    tl.store(gjm + 2 * gj_c + goff, heat * g2, mask=mask)
                    tl.store(gjm + 3 * gj_c + goff, heat * g3, mask=mask)
            tl.store(glg + hh * g_h + ww * g_w, heat * (g_heat - dot) * inv_t, mask=mask)


_BLOCK = 1024  # pixels per step of a program's loop (58 x 58 = 3364 heatmap pixels: 4 steps)


def _launch_common(logits: torch.Tensor, jmap: torch.Tensor | None):
    b, k, h, w = logits.shape
    jm = jmap if jmap is not None else logits.unsqueeze(2)  # a dummy with valid strides when no Jacobian
    return dict(K=k, HW=h * w, W=w, W1=max(w - 1, 1), H1=max(h - 1, 1),
                l_b=logits.stride(0), l_k=logits.stride(1), l_h=logits.stride(2), l_w=logits.stride(3),
                j_b=jm.stride(0), j_k=jm.stride(1), j_c=jm.stride(2), j_h=jm.stride(3), j_w=jm.stride(4),
                HAS_JAC=jmap is not None, ACC=tu.acc_dtype(logits), BLOCK=min(_BLOCK, tu.next_pow2(h * w))), jm


def _kp_head_fwd(logits: torch.Tensor, jmap: torch.Tensor | None, inv_t: float):
    """-> value (B, K, 2), jac (B, K, 4), stat (B, K, 2: the softmax's max and sum, for the backward)."""
    b, k, h, w = logits.shape
    acc = torch.promote_types(logits.dtype, torch.float32)
    value = tu.empty_output((b, k, 2), device=logits.device, dtype=acc)
    jac = tu.empty_output((b, k, 4), device=logits.device, dtype=acc)
    stat = torch.empty((b, k, 2), device=logits.device, dtype=acc)
    common, jm = _launch_common(logits, jmap)
    _kp_head_fwd_kernel[(k, b)](logits, jm, value, jac, stat, inv_t=inv_t, **common, num_warps=4)
    return value, jac, stat


class KeypointHeadFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, jmap: torch.Tensor | None, temperature: float):
        value, jac, stat = _kp_head_fwd(logits, jmap, 1.0 / temperature)
        ctx.save_for_backward(logits, jmap, value, jac, stat)
        ctx.inv_t = 1.0 / temperature
        if jmap is None:
            ctx.mark_non_differentiable(jac)
        return value, jac

    @staticmethod
    @once_differentiable
    def backward(ctx, g_value: torch.Tensor | None, g_jac: torch.Tensor | None):
        return _kp_head_grads(ctx, g_value, g_jac, _kp_head_bwd)


def _kp_head_grads(ctx, g_value, g_jac, backward):
    """The head's input gradients from ctx (logits, jmap, value, jac, stat; inv_t) through `backward`: the
    kernel (eager Function) or the backward op (custom op, under torch.compile)."""
    logits, jmap, value, jac, stat = ctx.saved_tensors
    need_logits = ctx.needs_input_grad[0]
    need_jm = jmap is not None and ctx.needs_input_grad[1]
    if not (need_logits or need_jm):
        return None, None, None
    g_logits, g_jm = backward(g_value, g_jac, logits, jmap, value, jac, stat, ctx.inv_t, need_jm)
    return (g_logits if need_logits else None), (g_jm if need_jm else None), None


def _kp_head_bwd(g_value, g_jac, logits, jmap, value, jac, stat, inv_t: float, need_jm: bool):
    """-> (dL/dlogits, dL/djmap or None); g_value / g_jac may be None (zeros)."""
    g_value = torch.zeros_like(value) if g_value is None else g_value.to(value.dtype).contiguous()
    g_jac = torch.zeros_like(jac) if g_jac is None else g_jac.to(jac.dtype).contiguous()
    g_logits = torch.empty_like(logits)  # its own strides go to the kernel (inputs may be channel slices)
    g_jm = torch.empty_like(jmap) if need_jm else None
    common, jm = _launch_common(logits, jmap)
    gj = g_jm if g_jm is not None else jm
    b, k = logits.shape[:2]
    _kp_head_bwd_kernel[(k, b)](
        logits, jm, value, jac, stat, g_value, g_jac, g_logits, gj, inv_t=inv_t,
        g_b=g_logits.stride(0), g_k=g_logits.stride(1), g_h=g_logits.stride(2), g_w=g_logits.stride(3),
        gj_b=gj.stride(0), gj_k=gj.stride(1), gj_c=gj.stride(2), gj_h=gj.stride(3), gj_w=gj.stride(4),
        NEED_JM=need_jm, **common, num_warps=4)
    return g_logits, g_jm


# The kernels as custom ops, for torch.compile (see grid_sample.py).
@torch.library.custom_op("ostnet::keypoint_head", mutates_args=())
def _keypoint_head_op(logits: torch.Tensor, jmap: torch.Tensor | None,
                      inv_t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    value, jac, stat = _kp_head_fwd(logits, jmap, inv_t)
    if jmap is None:
        jac.zero_()  # not written by the kernel then; an op's outputs must be defined
    return value, jac, stat


@_keypoint_head_op.register_fake
def _(logits, jmap, inv_t):
    b, k = logits.shape[:2]
    acc = torch.promote_types(logits.dtype, torch.float32)
    return (logits.new_empty((b, k, 2), dtype=acc), logits.new_empty((b, k, 4), dtype=acc),
            logits.new_empty((b, k, 2), dtype=acc))


@torch.library.custom_op("ostnet::keypoint_head_backward", mutates_args=())
def _keypoint_head_backward_op(g_value: torch.Tensor | None, g_jac: torch.Tensor | None, logits: torch.Tensor,
                               jmap: torch.Tensor | None, value: torch.Tensor, jac: torch.Tensor, stat: torch.Tensor,
                               inv_t: float, need_jm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g_logits, g_jm = _kp_head_bwd(g_value, g_jac, logits, jmap, value, jac, stat, inv_t, need_jm)
    return g_logits, (logits.new_empty(0) if g_jm is None else g_jm)


@_keypoint_head_backward_op.register_fake
def _(g_value, g_jac, logits, jmap, value, jac, stat, inv_t, need_jm):
    return torch.empty_like(logits), (torch.empty_like(jmap) if need_jm else logits.new_empty(0))


def _keypoint_head_setup(ctx, inputs, output):
    logits, jmap, inv_t = inputs
    ctx.save_for_backward(logits, jmap, *output)
    ctx.inv_t = inv_t
    ctx.mark_non_differentiable(output[2])


def _keypoint_head_backward(ctx, g_value, g_jac, _g_stat):
    return _kp_head_grads(ctx, g_value, g_jac, _keypoint_head_backward_op)


_keypoint_head_op.register_autograd(_keypoint_head_backward, setup_context=_keypoint_head_setup)


def keypoint_head(logits: torch.Tensor, jacobian_map: torch.Tensor | None, temperature: float,
                  impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """See keypoint_head_reference. The fused kernel needs one Jacobian map per keypoint (J == K)."""
    if logits.dim() != 4:
        raise ValueError(f"keypoint_head: logits must be (B, K, h, w), got {tuple(logits.shape)}")
    b, k, h, w = logits.shape
    if jacobian_map is not None and (jacobian_map.dim() != 5 or jacobian_map.shape[0] != b
                                     or jacobian_map.shape[1] not in (1, k) or jacobian_map.shape[2:] != (4, h, w)):
        raise ValueError(f"keypoint_head: jacobian_map must be (B, 1 or K, 4, h, w) = ({b}, 1|{k}, 4, {h}, {w}), "
                         f"got {tuple(jacobian_map.shape)}")
    if temperature <= 0:
        raise ValueError(f"keypoint_head: temperature must be > 0, got {temperature}")
    fusable = jacobian_map is None or jacobian_map.shape[1] == k
    if use_triton("keypoint_head", impl, logits, jacobian_map) and (fusable or impl == "triton"):
        if not fusable:
            raise ValueError("keypoint_head: the fused kernel needs one Jacobian map per keypoint")
        tu.check_launch("keypoint_head", b, max(logits.stride(0), jacobian_map.stride(0) if jacobian_map is not None else 0))
        if torch.compiler.is_compiling():
            value, jac, _ = _keypoint_head_op(logits, jacobian_map, 1.0 / float(temperature))
        else:
            value, jac = KeypointHeadFn.apply(logits, jacobian_map, float(temperature))
        return value, (jac.view(b, k, 2, 2) if jacobian_map is not None else None)
    return keypoint_head_reference(logits, jacobian_map, temperature)
