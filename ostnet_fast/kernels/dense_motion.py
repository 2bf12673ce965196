"""Dense-motion front end and combine (FOMM's DenseMotionNetwork, the parts around its hourglass).

front:   source (downscaled), kp_S, kp_D, J = J_S J_D^-1 -> hourglass input (heatmap differences and the
         K+1 deformed sources, interleaved per keypoint as FOMM) + the sparse motions.
combine: mask logits -> softmax over K+1 -> weighted sum of sparse motions = deformation; warp the
         bottleneck feature map by it (resized bilinearly when its size differs) and multiply by the
         occlusion map.
Convention: see geometry.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import use_triton
from .geometry import kp2gaussian, pixel_coordinates
from .grid_sample import grid_sample_reference


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


def dense_motion_front(source, kp_source, kp_driving, jacobian, kp_variance: float, impl: str = "auto"):
    if use_triton("dense_motion_front", impl, source, kp_source, kp_driving, jacobian):
        raise NotImplementedError("dense_motion_front: Triton kernel not written yet")
    return dense_motion_front_reference(source, kp_source, kp_driving, jacobian, kp_variance)


def dense_motion_combine(mask_logits, motions, feature, occlusion, impl: str = "auto"):
    if use_triton("dense_motion_combine", impl, mask_logits, motions, feature, occlusion):
        raise NotImplementedError("dense_motion_combine: Triton kernel not written yet")
    return dense_motion_combine_reference(mask_logits, motions, feature, occlusion)
