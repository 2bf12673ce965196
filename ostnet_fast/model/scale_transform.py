"""Scale transformation module (OSTNet sec. 3.2): T_theta, F_fc and the TPS grid generator.

z = T_theta([x_S, x_D, x_S - mean_S, x_D - mean_D])     (eq. 1-2), a 4-layer MLP over the keypoints
C = target + max_offset * tanh(F_fc(z))                    T fiducials in the driving image, bounded
I_Dh = warp(I_D, TPS(C))                                   (eq. 3), the scale-rectified driving frame

F_fc starts at zero, so C starts at the fixed target fiducials: the identity TPS (STN's usual start).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels import tps_solve, tps_warp


def fiducial_layout(num_fiducials: int) -> torch.Tensor:
    """Fixed target fiducials (T, 2): a rows x cols grid over [-1, 1]^2, rows the largest divisor of T
    that is <= sqrt(T) (T = 20 -> 4 x 5). TPS needs points off one line, so rows and cols must be >= 2."""
    rows = max(d for d in range(1, int(math.isqrt(num_fiducials)) + 1) if num_fiducials % d == 0)
    cols = num_fiducials // rows
    if rows < 2:
        raise ValueError(f"num_fiducials must factor as rows x cols with both >= 2 (e.g. 20 = 4 x 5), "
                         f"got {num_fiducials}")
    y, x = torch.meshgrid(torch.linspace(-1, 1, rows, dtype=torch.float64),
                          torch.linspace(-1, 1, cols, dtype=torch.float64), indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=1)


class ScaleTransformation(nn.Module):
    def __init__(self, num_kp: int, num_fiducials: int = 20, hidden_dim: int = 256, z_dim: int = 128,
                 num_layers: int = 4, max_offset: float = 0.5):
        super().__init__()
        dims = [4 * num_kp * 2] + [hidden_dim] * (num_layers - 1) + [z_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.ReLU(inplace=True))
        self.T_theta = nn.Sequential(*layers)
        self.F_fc = nn.Linear(z_dim, num_fiducials * 2)
        nn.init.zeros_(self.F_fc.weight)
        nn.init.zeros_(self.F_fc.bias)
        self.num_fiducials = num_fiducials
        self.z_dim = z_dim
        self.max_offset = max_offset
        target = fiducial_layout(num_fiducials)
        # Derived from the config, so not saved in checkpoints; solved once, in float64.
        self.register_buffer("target_points", target.float(), persistent=False)  # (T, 2)
        self.register_buffer("tps_coef", tps_solve(target).float(), persistent=False)  # (T+3, T)

    def forward(self, kp_source: torch.Tensor, kp_driving: torch.Tensor):
        """kp (B, K, 2) each -> z (B, z_dim), fiducials C (B, T, 2) in the driving image."""
        b = kp_source.shape[0]
        dtype = self.F_fc.weight.dtype  # keypoints come out in fp32; follow the layers (e.g. after .half())
        kp_source, kp_driving = kp_source.to(dtype), kp_driving.to(dtype)
        feats = [kp_source, kp_driving,
                 kp_source - kp_source.mean(dim=1, keepdim=True),
                 kp_driving - kp_driving.mean(dim=1, keepdim=True)]
        z = self.T_theta(torch.cat([f.reshape(b, -1) for f in feats], dim=1))  # (B, z_dim)
        offsets = torch.tanh(self.F_fc(z)).view(b, self.num_fiducials, 2)
        fiducials = self.target_points.to(offsets.dtype) + self.max_offset * offsets  # (B, T, 2)
        return z, fiducials

    def warp(self, image: torch.Tensor, fiducials: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        """I_Dh = image sampled at TPS(fiducials), same size as the image."""
        return tps_warp(image, fiducials, self.target_points, self.tps_coef, impl=impl)
