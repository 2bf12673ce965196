"""OSTNet: keypoint detector + scale transformation + occlusion-aware generator (paper fig. 2).

Per source (cached):   kp_S = KP(I_S), the source downscaled for the dense motion net, f_1 = F_en(I_S)
Per driving frame:     kp_D = KP(I_D); z, C = ST(kp_S, kp_D); I_Dh = warp(I_D, TPS(C)); kp_Dh = KP(I_Dh)
                       M, occ = DenseMotion(I_S, kp_S, kp_Dh); I_out = G(f_1, M, occ, z)

Note: z is added before every down block, so the encoder beyond f_1 depends on the driving frame and
cannot be cached per source (only f_1, kp_S and the downscaled source can).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import nn

from ..config import Config, ModelConfig, load_config, size_multiple
from .generator import OcclusionAwareGenerator
from .keypoint_detector import KPDetector
from .scale_transform import ScaleTransformation


@dataclass
class SourceState:
    """Everything per-frame work needs from the source, computed once by `OSTNet.encode_source`."""
    image: torch.Tensor          # (B, C, H, W) the source image
    kp_value: torch.Tensor       # (B, K, 2)
    kp_jacobian: torch.Tensor | None  # (B, K, 2, 2)
    small: torch.Tensor          # (B, C, h, w) source downscaled for the dense motion network
    f1: torch.Tensor             # (B, F, H, W) F_en(I_S)

    @property
    def kp(self) -> dict[str, torch.Tensor]:
        kp = {"value": self.kp_value}
        if self.kp_jacobian is not None:
            kp["jacobian"] = self.kp_jacobian
        return kp

    def expand(self, batch: int) -> "SourceState":
        """One source for a batch of driving frames: broadcast views, no copies."""
        if self.image.shape[0] != 1:  # branch on the (static) source batch only: export-friendly
            if self.image.shape[0] != batch:
                raise ValueError(f"source batch {self.image.shape[0]} does not match driving batch {batch}")
            return self
        return SourceState(**{f.name: None if getattr(self, f.name) is None else
                              getattr(self, f.name).expand(batch, *getattr(self, f.name).shape[1:])
                              for f in fields(self)})


class OSTNet(nn.Module):
    def __init__(self, config: ModelConfig | Config | str | None = None, fused: bool = False):
        super().__init__()
        if not isinstance(config, ModelConfig):
            config = load_config(config).model
        self.config = config
        self.size_multiple = size_multiple(config)  # image sides must be multiples of this
        c = config
        self.kp_detector = KPDetector(num_kp=c.num_kp, num_channels=c.num_channels,
                                      estimate_jacobian=c.estimate_jacobian, **vars(c.kp_detector))
        self.scale_transform = ScaleTransformation(num_kp=c.num_kp, **vars(c.scale_transform))
        g = c.generator
        self.generator = OcclusionAwareGenerator(
            num_channels=c.num_channels, num_kp=c.num_kp, block_expansion=g.block_expansion,
            max_features=g.max_features, num_down_blocks=g.num_down_blocks,
            num_bottleneck_blocks=g.num_bottleneck_blocks, z_dim=c.scale_transform.z_dim,
            estimate_occlusion_map=g.estimate_occlusion_map, dense_motion_params=vars(c.dense_motion),
            final_kernel_size=g.final_kernel_size)
        self.fused = fused

    def cast_conv_weights(self, dtype: torch.dtype) -> "OSTNet":
        """Store every convolution's weight and bias in `dtype` (in place), for inference under
        torch.autocast(dtype). Autocast casts fp32 weights again at every call (always so inside CUDA graphs
        and torch.compile): ~28 cast kernels and 0.17 ms of a 1.39 ms frame at batch 1 fp16 (H200,
        bench/results/h200-2026-12-01-s10). Weights already in autocast's dtype are used as they are, so
        every convolution autocast runs computes the same values. The fused z-conv blocks also read their
        conv's bias (epilogue) and weight (border term) outside autocast: those now see the fp16-rounded
        values, a change at fp16 rounding level. Linear layers, norms and buffers stay fp32 (the scale
        transform follows its F_fc's dtype). Not for training: the optimizer would step fp16 weights."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.to(dtype)
        return self

    @property
    def impl(self) -> str:
        """Fused kernels where they can run (CUDA), the reference elsewhere."""
        return "auto" if self.fused else "reference"

    def check_image(self, image: torch.Tensor, name: str) -> None:
        c = self.config.num_channels
        if image.dim() != 4 or image.shape[1] != c:
            raise ValueError(f"{name} must be (B, {c}, H, W) in [0, 1], got {tuple(image.shape)}")
        if image.shape[-1] < 16 or image.shape[-2] < 16:
            raise ValueError(f"{name} is too small: {tuple(image.shape)}, need at least 16x16")
        self.check_size(image.shape[-2], image.shape[-1], name)

    def check_size(self, height: int, width: int, name: str = "size") -> None:
        """Refuse sides the model cannot run at (ValueError): the down-sampling paths must halve evenly."""
        m = self.size_multiple
        if height % m or width % m:
            raise ValueError(f"{name} is {height}x{width}: this model runs at sides that are "
                             f"multiples of {m} (e.g. {m * max(1, round(self.config.image_size / m))})")

    def encode_source(self, source: torch.Tensor) -> SourceState:
        self.check_image(source, "source")
        kp = self.kp_detector(source, impl=self.impl)
        return SourceState(image=source, kp_value=kp["value"], kp_jacobian=kp.get("jacobian"),
                           small=self.generator.dense_motion_network.downsample(source, impl=self.impl),
                           f1=self.generator.encode(source, impl=self.impl))

    def animate(self, state: SourceState, driving: torch.Tensor,
                kp_transform: Callable[[dict], dict] | None = None) -> dict[str, torch.Tensor]:
        """One batch of driving frames (B, C, H, W) -> dict with 'prediction' (B, C, H, W) in [0, 1],
        'rectified' I_Dh, 'kp_driving', 'kp_rectified' (after kp_transform, if given), 'z', 'fiducials'.
        kp_transform (e.g. FOMM's relative motion) maps the rectified keypoints before dense motion."""
        self.check_image(driving, "driving")
        state = state.expand(driving.shape[0])
        kp_driving = self.kp_detector(driving, impl=self.impl)
        z, fiducials = self.scale_transform(state.kp_value, kp_driving["value"])
        rectified = self.scale_transform.warp(driving, fiducials.to(driving.dtype), impl=self.impl)
        kp_rectified = self.kp_detector(rectified, impl=self.impl)
        if kp_transform is not None:
            kp_rectified = kp_transform(kp_rectified)
        motion = self.generator.dense_motion_network(state.small, kp_driving=kp_rectified,
                                                     kp_source=state.kp, impl=self.impl)
        out = self.generator(state.f1, motion, z, impl=self.impl)
        out.update(rectified=rectified, kp_driving=kp_driving, kp_rectified=kp_rectified, z=z,
                   fiducials=fiducials, mask_logits=motion["mask_logits"])
        if "occlusion_map" in motion:
            out["occlusion_map"] = motion["occlusion_map"]
        return out

    def forward(self, source: torch.Tensor, driving: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training / full forward: animate plus the source keypoints (for the losses)."""
        state = self.encode_source(source)
        out = self.animate(state, driving)
        out["kp_source"] = state.kp
        return out

    @torch.no_grad()
    def reset_scale_embedding(self) -> None:
        """W_i = W_i^w = 0 and fiducials = targets: the OSTNet parts become the identity (FOMM's output)."""
        for lin in list(self.generator.W_down) + list(self.generator.W_up):
            lin.weight.zero_()
            lin.bias.zero_()
        self.scale_transform.F_fc.weight.zero_()
        self.scale_transform.F_fc.bias.zero_()
