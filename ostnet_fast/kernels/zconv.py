"""z-additive conv block: (f + b) -> [nearest 2x upsample] -> conv3x3 -> BN -> ReLU -> [2x2 avg-pool].

b = W_i z is one vector per sample and input channel (B, C_in), broadcast over H x W (OSTNet eq. 5), or
None (plain FOMM block). Fused, f + b is never materialised: conv(f + b) = conv(f) + E(b), where E(b)
depends only on which zero-padding border an output pixel touches (9 classes for a 3x3 conv), so the
convolution stays in cuDNN and one epilogue adds E(b), the BN, the ReLU and the pooling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._dispatch import use_triton

MODES = ("same", "down", "up")


def zconv_block_reference(x: torch.Tensor, zb: torch.Tensor | None, conv: nn.Conv2d, norm: nn.BatchNorm2d,
                          mode: str) -> torch.Tensor:
    if mode == "up":
        x = F.interpolate(x, scale_factor=2)
    if zb is not None:
        x = x + zb[:, :, None, None].to(x.dtype)
    out = F.relu(norm(conv(x)))
    if mode == "down":
        out = F.avg_pool2d(out, kernel_size=2)
    return out


def zconv_block(x: torch.Tensor, zb: torch.Tensor | None, conv: nn.Conv2d, norm: nn.BatchNorm2d,
                mode: str, impl: str = "auto") -> torch.Tensor:
    if mode not in MODES:
        raise ValueError(f"zconv_block: mode must be one of {MODES}, got {mode!r}")
    if zb is not None and zb.shape != (x.shape[0], x.shape[1]):
        raise ValueError(f"zconv_block: zb must be (B, C_in) = {(x.shape[0], x.shape[1])}, got {tuple(zb.shape)}")
    if use_triton("zconv_block", impl, x, zb):
        raise NotImplementedError("zconv_block: Triton kernel not written yet")
    return zconv_block_reference(x, zb, conv, norm, mode)
