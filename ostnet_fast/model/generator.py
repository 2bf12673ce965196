"""Occlusion-aware generator G with multi-layer scale embedding (OSTNet sec. 3.3, eq. 5).

f_1 = F_en(I_S)                         `first` (FOMM name), source-only: cached per source
f_{i+1} = F_down^i(f_i + W_i z)         `down_blocks[i]`, `W_down[i]`
f_L^w = warp(f_L, M) * occlusion         fused dense-motion combine
f_L^w = bottleneck(f_L^w)               FOMM's residual blocks
f_i^w = F_up^i(f_{i+1}^w + W_i^w z)     `up_blocks[i]`, `W_up[i]`
I_out = sigmoid(final(f_1^w))           1x1 (paper) or 7x7 (FOMM) conv

Module names follow FOMM (first, down_blocks, bottleneck, up_blocks, final, dense_motion_network) so
FOMM checkpoints load; W_down / W_up are OSTNet's own. With W = 0 the output does not depend on z.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import dense_motion_combine
from .blocks import DownBlock2d, ResBlock2d, SameBlock2d, UpBlock2d
from .dense_motion import DenseMotionNetwork


class OcclusionAwareGenerator(nn.Module):
    def __init__(self, num_channels, num_kp, block_expansion, max_features, num_down_blocks,
                 num_bottleneck_blocks, z_dim, estimate_occlusion_map=False, dense_motion_params=None,
                 final_kernel_size=1):
        super().__init__()
        self.dense_motion_network = DenseMotionNetwork(num_kp=num_kp, num_channels=num_channels,
                                                       estimate_occlusion_map=estimate_occlusion_map,
                                                       **(dense_motion_params or {}))
        self.first = SameBlock2d(num_channels, block_expansion, kernel_size=(7, 7), padding=(3, 3))
        down_in = [min(max_features, block_expansion * (2 ** i)) for i in range(num_down_blocks)]
        down_out = [min(max_features, block_expansion * (2 ** (i + 1))) for i in range(num_down_blocks)]
        self.down_blocks = nn.ModuleList([DownBlock2d(i, o) for i, o in zip(down_in, down_out)])
        up_in = [min(max_features, block_expansion * (2 ** (num_down_blocks - i))) for i in range(num_down_blocks)]
        up_out = [min(max_features, block_expansion * (2 ** (num_down_blocks - i - 1))) for i in range(num_down_blocks)]
        self.up_blocks = nn.ModuleList([UpBlock2d(i, o) for i, o in zip(up_in, up_out)])
        bottleneck_features = min(max_features, block_expansion * (2 ** num_down_blocks))
        self.bottleneck = nn.Sequential()
        for i in range(num_bottleneck_blocks):
            self.bottleneck.add_module("r" + str(i), ResBlock2d(bottleneck_features, kernel_size=(3, 3), padding=(1, 1)))
        self.final = nn.Conv2d(block_expansion, num_channels, kernel_size=final_kernel_size,
                               padding=final_kernel_size // 2)
        # W_i and W_i^w: z -> one vector per sample and input channel of each block.
        self.W_down = nn.ModuleList([nn.Linear(z_dim, c) for c in down_in])
        self.W_up = nn.ModuleList([nn.Linear(z_dim, c) for c in up_in])
        self.num_channels = num_channels

    def encode(self, source: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        """f_1 = F_en(I_S): (B, C, H, W) -> (B, block_expansion, H, W). Source-only."""
        return self.first(source, impl=impl)

    def forward(self, f1: torch.Tensor, motion: dict[str, torch.Tensor], z: torch.Tensor,
                impl: str = "auto") -> dict[str, torch.Tensor]:
        """f1 from `encode`, motion from the dense motion network, z (B, z_dim) -> prediction in [0, 1]."""
        out = f1
        for block, w in zip(self.down_blocks, self.W_down):
            out = block(out, w(z).to(out.dtype), impl=impl)  # (B, C_{i+1}, H/2^i, W/2^i)
        deformation, out = dense_motion_combine(motion["mask_logits"], motion["sparse_motion"], out,
                                                motion.get("occlusion_map"), impl=impl)
        for block in self.bottleneck:
            out = block(out, impl=impl)
        for block, w in zip(self.up_blocks, self.W_up):
            out = block(out, w(z).to(out.dtype), impl=impl)
        prediction = torch.sigmoid(self.final(out))  # (B, C, H, W)
        return {"prediction": prediction, "deformation": deformation}
