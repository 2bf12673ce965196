"""Keypoint detector F_kp (FOMM): hourglass on the image downscaled 4x, softmax heatmaps with
temperature 0.1, keypoints as expected coordinates in [-1, 1], optional 2x2 Jacobians."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import keypoint_head
from .blocks import AntiAliasInterpolation2d, Hourglass, conv_heads, merge_heads


class KPDetector(nn.Module):
    def __init__(self, block_expansion, num_kp, num_channels, max_features, num_blocks, temperature,
                 estimate_jacobian=False, scale_factor=1, single_jacobian_map=False, pad=0):
        super().__init__()
        self.predictor = Hourglass(block_expansion, in_features=num_channels, max_features=max_features,
                                   num_blocks=num_blocks)
        self.kp = nn.Conv2d(self.predictor.out_filters, num_kp, kernel_size=(7, 7), padding=pad)
        if estimate_jacobian:
            self.num_jacobian_maps = 1 if single_jacobian_map else num_kp
            self.jacobian = nn.Conv2d(self.predictor.out_filters, 4 * self.num_jacobian_maps,
                                      kernel_size=(7, 7), padding=pad)
            # Start at the identity Jacobian (FOMM).
            self.jacobian.weight.data.zero_()
            self.jacobian.bias.data.copy_(torch.tensor([1, 0, 0, 1] * self.num_jacobian_maps, dtype=torch.float))
        else:
            self.jacobian = None
        self.temperature = temperature
        self.scale_factor = scale_factor
        if scale_factor != 1:
            self.down = AntiAliasInterpolation2d(num_channels, scale_factor)

    def forward(self, x: torch.Tensor, impl: str = "auto") -> dict[str, torch.Tensor]:
        """x (B, C, H, W) in [0, 1] -> {'value': (B, K, 2), 'jacobian': (B, K, 2, 2)}."""
        if self.scale_factor != 1:
            x = self.down(x, impl=impl)
        feature_map = self.predictor(x, impl=impl)  # (B, F, h, w)
        jmap = None
        if self.jacobian is not None:  # both 7x7 heads as one convolution on the fused path
            prediction, jmap = conv_heads(feature_map, (self.kp, self.jacobian), merge_heads(impl, feature_map))
        else:
            prediction = self.kp(feature_map)  # (B, K, h', w')
        b, k, h, w = prediction.shape
        if jmap is not None:
            jmap = jmap.view(b, self.num_jacobian_maps, 4, h, w)
        # Softmax heatmaps (>= fp32), expected coordinates and heatmap-weighted Jacobians.
        value, jacobian = keypoint_head(prediction, jmap, self.temperature, impl=impl)
        out = {"value": value}  # (B, K, 2)
        if jacobian is not None:
            out["jacobian"] = jacobian  # (B, K, 2, 2)
        return out
