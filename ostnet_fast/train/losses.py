"""Training losses (OSTNet eq. 6-10, FOMM's implementations).

L = lambda_1 (L_rec(I_out) + L_rec(I_Dh)) + lambda_2 L_eq + lambda_3 L_dist,   lambda = 10 (appendix B)

- L_rec: VGG-19 perceptual loss over an image pyramid (FOMM): for every pyramid scale and each of the
  slices relu1_1 .. relu5_1, weight_i * mean |V_i(I_GT) - V_i(I)|. lambda_1 lives in the per-layer
  weights ([10] * 5, FOMM's `loss_weights.perceptual`). Applied to the prediction AND to the rectified
  driving frame, both against the ground truth (the driving frame before augmentation, eq. 7).
- L_eq: FOMM's equivariance loss under a random affine + TPS transform (eq. 8), value and Jacobian
  terms. The transform's Jacobian is written in closed form (FOMM takes it with autograd.grad(...,
  create_graph=True), which makes the step need double backward and breaks torch.compile), and the
  2x2 inverse is `inverse_2x2` (no torch.inverse).
- L_dist: keypoint distance loss (eq. 9), gamma = 0.1, over pairs i != j. Printed eq. 9 reads
  max(0, |x_i - x_j|_1 - gamma), which pulls keypoints together, the opposite of its stated purpose
  ("prevent the keypoints from clustering") and of face-vid2vid's loss it cites; we use the hinge that
  pushes apart: max(0, gamma - |x_i - x_j|_1), averaged over the K (K - 1) ordered pairs and the batch.

VGG-19 weights: torchvision's ImageNet file `vgg19-dcbb9e9d.pth` (its `features.*` keys), from a path or
torchvision's cache; nothing is downloaded. `random_weights=True` is for tests and smoke runs only.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_state_dict_file
from ..kernels import inverse_2x2, pixel_coordinates
from ..model.blocks import AntiAliasInterpolation2d

VGG19_FILE = "vgg19-dcbb9e9d.pth"
# torchvision's vgg19 `features`: conv widths, "M" = 2x2 max pool (config "E"); module indices 0 .. 36.
_VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"]
# FOMM's slices: features[0:2] -> relu1_1, [2:7] -> relu2_1, [7:12] -> relu3_1, [12:21] -> relu4_1,
# [21:30] -> relu5_1. Layers 30 .. 36 exist so torchvision's state dict loads; they never run.
_VGG19_SLICES = [(0, 2), (2, 7), (7, 12), (12, 21), (21, 30)]


class Vgg19(nn.Module):
    """VGG-19 feature extractor with torchvision's module indices (`features.0` ... `features.36`).

    Input (B, 3, H, W) in [0, 1]; ImageNet normalisation inside; returns the 5 slice outputs
    [relu1_1, relu2_1, relu3_1, relu4_1, relu5_1]. Frozen (requires_grad False), always in eval mode.
    `width_divisor` > 1 shrinks every layer (tests only: the torchvision weights no longer fit)."""

    def __init__(self, width_divisor: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG19_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                c_out = max(1, v // width_divisor)
                layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen feature extractor: never in training mode
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        outs = []
        for start, stop in _VGG19_SLICES:
            for i in range(start, stop):
                h = self.features[i](h)
            outs.append(h)
        return outs


def torch_cache_dir() -> Path:
    """torchvision's weight cache: $TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return Path(home) / "hub" / "checkpoints"


def load_vgg19(path: str | Path | None = None, random_weights: bool = False, width_divisor: int = 1) -> Vgg19:
    """VGG-19 with ImageNet weights from `path` (torchvision's .pth or a .safetensors with the same
    keys), else from torchvision's cache ($TORCH_HOME/hub/checkpoints/vgg19-dcbb9e9d.pth). Nothing is
    downloaded. `random_weights=True`: seeded random init, for tests and smoke runs (the perceptual loss
    then means nothing)."""
    if random_weights:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(0)  # the same random VGG every time, without disturbing the caller's RNG
        model = Vgg19(width_divisor)
        torch.random.set_rng_state(gen_state)
        return model
    if width_divisor != 1:
        raise ValueError(f"width_divisor={width_divisor} only works with random_weights=True")
    if path is None:
        path = torch_cache_dir() / VGG19_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"VGG-19 ImageNet weights not found: expected torchvision's {VGG19_FILE} at {path} "
                f"(set $TORCH_HOME to the folder holding hub/checkpoints/{VGG19_FILE}, or pass --vgg PATH; "
                "--random-vgg runs with random weights for smoke tests only)")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VGG-19 weights file not found: {path} (expected torchvision's {VGG19_FILE})")
    state = load_state_dict_file(path, "VGG-19 state dict")
    state = {k: v for k, v in state.items() if k.startswith("features.")}  # classifier.* not needed
    model = Vgg19()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
           if k in state and state[k].shape != expected[k].shape]
    if missing or bad:
        raise ValueError(f"{path} is not torchvision's VGG-19 (missing {missing[:4]}, shape mismatch {bad[:4]})")
    model.load_state_dict(state)
    return model


class ImagePyramide(nn.Module):
    """FOMM's image pyramid: {'prediction_<scale>': AntiAliasInterpolation2d(scale)(x)}."""

    def __init__(self, scales, num_channels: int):
        super().__init__()
        self.scales = [float(s) for s in scales]
        self.downs = nn.ModuleDict({str(s).replace(".", "-"): AntiAliasInterpolation2d(num_channels, s)
                                    for s in self.scales})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"prediction_" + k.replace("-", "."): down(x) for k, down in self.downs.items()}


class PerceptualLoss(nn.Module):
    """sum over scales and VGG slices of weight_i * mean |V_i(target) - V_i(x)| (FOMM).

    `forward(target, *inputs)` returns one loss per input; the target's features are computed once,
    without grad, and shared."""

    def __init__(self, vgg: Vgg19, scales, weights, num_channels: int = 3):
        super().__init__()
        self.vgg = vgg
        self.pyramid = ImagePyramide(scales, num_channels)
        self.weights = [float(w) for w in weights]
        if len(self.weights) != len(_VGG19_SLICES):
            raise ValueError(f"perceptual weights: one per VGG slice ({len(_VGG19_SLICES)}), got {self.weights}")

    def forward(self, target: torch.Tensor, *inputs: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            target_feats = {k: self.vgg(v) for k, v in self.pyramid(target).items()}
        totals = []
        for x in inputs:
            total = x.new_zeros((), dtype=torch.float32)
            for key, xs in self.pyramid(x).items():
                for w, fx, fy in zip(self.weights, self.vgg(xs), target_feats[key]):
                    if w:
                        total = total + w * (fx.float() - fy.float()).abs().mean()
            totals.append(total)
        return totals


class Transform:
    """FOMM's random transform for the equivariance loss: affine + TPS with L1 radial distances.

    warp(p) = theta[:, :2] p + theta[:, 2] + sum_k w_k d_k^2 log(d_k + 1e-6),  d_k = |p - c_k|_1,
    the TPS term added to both coordinates (FOMM's exact form). theta = I + N(0, sigma_affine),
    c_k a points_tps x points_tps grid over [-1, 1]^2, w_k ~ N(0, sigma_tps). `Transform.random` draws
    from a CPU torch.Generator so a run is reproducible and resumable; the constructor takes the drawn
    tensors (so a compiled training step sees plain inputs, no RNG inside the graph).

    Convention: (x, y) in [-1, 1], align_corners=True; frames are resampled with reflection padding."""

    def __init__(self, theta: torch.Tensor, control_params: torch.Tensor | None = None):
        self.theta = theta  # (B, 2, 3)
        self.bs = theta.shape[0]
        self.tps = control_params is not None and control_params.numel() > 0
        if self.tps:
            points = int(round(control_params.shape[-1] ** 0.5))
            self.control_points = pixel_coordinates((points, points), device=theta.device,
                                                    dtype=theta.dtype).view(1, -1, 2)  # (1, P, 2)
            self.control_params = control_params.view(self.bs, 1, points * points)  # (B, 1, P)

    @staticmethod
    def draw(bs: int, sigma_affine: float, sigma_tps: float, points_tps: int,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> theta (B, 2, 3), control_params (B, 1, P) (P = 0 without TPS), on the CPU, float32."""
        noise = torch.normal(mean=0.0, std=sigma_affine * torch.ones(bs, 2, 3), generator=generator)
        theta = noise + torch.eye(2, 3).view(1, 2, 3)
        p = points_tps ** 2 if sigma_tps > 0 and points_tps > 0 else 0
        params = torch.normal(mean=0.0, std=sigma_tps * torch.ones(bs, 1, p), generator=generator) if p \
            else torch.zeros(bs, 1, 0)
        return theta, params

    @classmethod
    def random(cls, bs: int, sigma_affine: float, sigma_tps: float, points_tps: int,
               generator: torch.Generator | None = None, device=None) -> "Transform":
        theta, params = cls.draw(bs, sigma_affine, sigma_tps, points_tps, generator)
        return cls(theta.to(device), params.to(device))

    def warp_coordinates(self, coordinates: torch.Tensor) -> torch.Tensor:
        """(B or 1, N, 2) -> (B, N, 2)."""
        theta = self.theta.to(coordinates.dtype).unsqueeze(1)  # (B, 1, 2, 3)
        out = (theta[..., :2] @ coordinates.unsqueeze(-1)).squeeze(-1) + theta[..., 2]  # (B, N, 2)
        if self.tps:
            d = (coordinates.unsqueeze(2) - self.control_points.to(coordinates.dtype).unsqueeze(1))  # (B, N, P, 2)
            d = d.abs().sum(-1)  # (B, N, P) L1 distances
            r = (d ** 2 * torch.log(d + 1e-6) * self.control_params.to(coordinates.dtype)).sum(-1)  # (B, N)
            out = out + r.unsqueeze(-1)
        return out

    def jacobian(self, coordinates: torch.Tensor) -> torch.Tensor:
        """d warp / d p at (B, N, 2) points -> (B, N, 2, 2), in closed form (no autograd.grad).

        d/dp [d^2 log(d + eps)] = (2 d log(d + eps) + d^2 / (d + eps)) * sign(p - c) (sign(0) = 0, as
        autograd's |.|'), and the TPS term adds the same row vector g to both output coordinates."""
        b = self.bs
        jac = self.theta[:, :, :2].to(coordinates.dtype).unsqueeze(1).expand(b, coordinates.shape[1], 2, 2)
        if self.tps:
            diff = coordinates.unsqueeze(2) - self.control_points.to(coordinates.dtype).unsqueeze(1)  # (B, N, P, 2)
            d = diff.abs().sum(-1, keepdim=True)  # (B, N, P, 1)
            dfdd = 2 * d * torch.log(d + 1e-6) + d ** 2 / (d + 1e-6)  # (B, N, P, 1)
            w = self.control_params.to(coordinates.dtype).unsqueeze(-1)  # (B, 1, P, 1)
            g = (w * dfdd * torch.sign(diff)).sum(2)  # (B, N, 2)
            jac = jac + g.unsqueeze(-2)  # row vector g added to both rows
        return jac

    def transform_frame(self, frame: torch.Tensor) -> torch.Tensor:
        """Resample frame (B, C, H, W) at warp(grid): the transformed image."""
        h, w = frame.shape[-2:]
        grid = pixel_coordinates((h, w), device=frame.device, dtype=torch.float32).view(1, h * w, 2)
        grid = self.warp_coordinates(grid).view(self.bs, h, w, 2)
        return F.grid_sample(frame, grid.to(frame.dtype), padding_mode="reflection", align_corners=True)


def equivariance_losses(kp: dict[str, torch.Tensor], kp_transformed: dict[str, torch.Tensor],
                        transform: Transform) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FOMM's equivariance terms (unweighted): value |kp - T(kp_T)|, Jacobian |I - J^-1 (dT J_T)|.
    Computed in fp32 even under autocast (2x2 inverses and products of Jacobians lose too much in bf16)."""
    dtype = torch.promote_types(kp["value"].dtype, torch.float32)
    with torch.autocast(device_type=kp["value"].device.type, enabled=False):
        value = (kp["value"].to(dtype) - transform.warp_coordinates(kp_transformed["value"].to(dtype))).abs().mean()
        if "jacobian" not in kp:
            return value, None
        jac_t = transform.jacobian(kp_transformed["value"].to(dtype)) @ kp_transformed["jacobian"].to(dtype)  # (B, K, 2, 2)
        prod = inverse_2x2(kp["jacobian"].to(dtype)) @ jac_t  # (B, K, 2, 2)
        eye = torch.eye(2, device=prod.device, dtype=prod.dtype)
        return value, (eye - prod).abs().mean()


def keypoint_distance_loss(kp: torch.Tensor, gamma: float = 0.1) -> torch.Tensor:
    """(B, K, 2) -> mean over batch and ordered pairs i != j of max(0, gamma - |x_i - x_j|_1)."""
    b, k, _ = kp.shape
    if k < 2:
        return kp.new_zeros(())
    dist = (kp.unsqueeze(2) - kp.unsqueeze(1)).abs().sum(-1).float()  # (B, K, K)
    # A multiplied mask, not boolean indexing: that one reads the mask on the host (no CUDA graph capture).
    off_diag = 1.0 - torch.eye(k, dtype=dist.dtype, device=kp.device)
    return (F.relu(gamma - dist) * off_diag).sum() / (b * k * (k - 1))


class TrainingModel(nn.Module):
    """OSTNet + the training objective (eq. 6 / 10) in one module: what DDP wraps and torch.compile
    compiles. forward(source, driving, target, theta, tps_params) -> (total, {name: weighted term}).

    `driving` is the augmented driving frame, `target` the same frame before augmentation (I_GT);
    theta / tps_params are the equivariance transform's draws (`Transform.draw`). The frozen VGG has no
    trainable parameters, so DDP and the optimizer see only the OSTNet's."""

    def __init__(self, model: nn.Module, train_config, vgg: Vgg19):
        super().__init__()
        self.model = model
        self.cfg = train_config
        w = train_config.loss_weights
        self.perceptual = PerceptualLoss(vgg, train_config.scales, w.perceptual, model.config.num_channels)
        self.weights = {"equivariance_value": float(w.equivariance_value),
                        "equivariance_jacobian": float(w.equivariance_jacobian),
                        "keypoint_distance": float(w.keypoint_distance)}

    def forward(self, source, driving, target, theta=None, tps_params=None):
        out = self.model(source, driving)
        losses: dict[str, torch.Tensor] = {}
        if any(self.perceptual.weights):
            rec, rec_rect = self.perceptual(target, out["prediction"], out["rectified"])
            losses["perceptual"] = rec  # L_rec(I_out), weights inside
            losses["perceptual_rectified"] = rec_rect  # L_rec(I_Dh)
        if theta is not None and (self.weights["equivariance_value"] or self.weights["equivariance_jacobian"]):
            # Eq. 8 on the source frame: F_kp(T(I_S)) against T(F_kp(I_S)).
            transform = Transform(theta.to(source.device, torch.float32),
                                  None if tps_params is None else tps_params.to(source.device, torch.float32))
            kp_t = self.model.kp_detector(transform.transform_frame(source), impl=self.model.impl)
            value, jac = equivariance_losses(out["kp_source"], kp_t, transform)
            if self.weights["equivariance_value"]:
                losses["equivariance_value"] = self.weights["equivariance_value"] * value
            if jac is not None and self.weights["equivariance_jacobian"]:
                losses["equivariance_jacobian"] = self.weights["equivariance_jacobian"] * jac
        if self.weights["keypoint_distance"]:
            losses["keypoint_distance"] = self.weights["keypoint_distance"] * keypoint_distance_loss(
                out["kp_source"]["value"], self.cfg.keypoint_distance_gamma)
        total = sum(losses.values())
        return total, losses
