"""Dense motion network (FOMM): predicts, from the source and the two keypoint sets, a mask over K+1
sparse motions (K keypoint-local affine motions and the identity) and an occlusion map.

The front end (heatmaps + K+1 deformed sources) and the combine step (softmax, weighted sum, warp of
the generator's bottleneck, occlusion) are fused kernels; the combine runs in the generator, where the
feature map to warp lives.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import dense_motion_front, inverse_2x2
from ..kernels._triton_utils import is_channels_last
from .blocks import AntiAliasInterpolation2d, Hourglass, conv_heads, merge_heads


class DenseMotionNetwork(nn.Module):
    def __init__(self, block_expansion, num_blocks, max_features, num_kp, num_channels,
                 estimate_occlusion_map=False, scale_factor=1, kp_variance=0.01):
        super().__init__()
        self.hourglass = Hourglass(block_expansion=block_expansion, in_features=(num_kp + 1) * (num_channels + 1),
                                   max_features=max_features, num_blocks=num_blocks)
        self.mask = nn.Conv2d(self.hourglass.out_filters, num_kp + 1, kernel_size=(7, 7), padding=(3, 3))
        if estimate_occlusion_map:
            self.occlusion = nn.Conv2d(self.hourglass.out_filters, 1, kernel_size=(7, 7), padding=(3, 3))
        else:
            self.occlusion = None
        self.num_kp = num_kp
        self.scale_factor = scale_factor
        self.kp_variance = kp_variance
        if scale_factor != 1:
            self.down = AntiAliasInterpolation2d(num_channels, scale_factor)

    def downsample(self, source: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        return self.down(source, impl=impl) if self.scale_factor != 1 else source

    def forward(self, source_small: torch.Tensor, kp_driving: dict, kp_source: dict,
                impl: str = "auto") -> dict[str, torch.Tensor]:
        """source_small: the source already passed through `downsample` (cached per source)."""
        jacobian = None
        if "jacobian" in kp_driving and "jacobian" in kp_source:
            # J_S J_D^-1, closed-form 2x2 inverse (no torch.inverse: fp16 and ONNX friendly).
            jacobian = kp_source["jacobian"] @ inverse_2x2(kp_driving["jacobian"])  # (B, K, 2, 2)
        kp_s = kp_source["value"].to(source_small.dtype)
        kp_d = kp_driving["value"].to(source_small.dtype)
        if jacobian is not None:
            jacobian = jacobian.to(source_small.dtype)
        hourglass_in, motions = dense_motion_front(source_small, kp_s, kp_d, jacobian, self.kp_variance,
                                                   impl=impl)  # (B, (K+1)(C+1), h, w), (B, K+1, h, w, 2)
        # a cached source is expanded over the batch (stride 0): judge one sample
        if is_channels_last(source_small[:1]):
            # The front writes NCHW; the hourglass runs in the source's layout, and so does its output (the
            # concat of its decoder with this input), which the 7x7 heads read: channels-last, the heads'
            # convolution can take the split-K kernel (kernels.conv2d.plan).
            hourglass_in = hourglass_in.contiguous(memory_format=torch.channels_last)
        prediction = self.hourglass(hourglass_in, impl=impl)
        if self.occlusion is None:
            return {"mask_logits": self.mask(prediction), "sparse_motion": motions}  # (B, K+1, h, w)
        # Both 7x7 heads as one convolution on the fused path.
        mask_logits, occlusion = conv_heads(prediction, (self.mask, self.occlusion), merge_heads(impl, prediction))
        return {"mask_logits": mask_logits, "sparse_motion": motions,
                "occlusion_map": torch.sigmoid(occlusion)}  # (B, 1, h, w)
