"""Expression-preserving augmentation (OSTNet sec. 3.4): change the face's scale, keep pose and expression.

Per sample, alpha, beta ~ U[1 - delta, 1 + delta]; resize the (H, W) frame to (alpha H, beta W), pad it
to a square with zeros (content centred), resize back to (H, W). The ground truth stays the frame before
augmentation. Training frames are square (H = W); for a non-square frame we pad to the frame's own
aspect ratio (the same thing when H = W), so alpha = beta = 1 stays the identity.

Batched form: the three steps compose to one axis-aligned affine map, so the whole batch is one
`grid_sample` (bilinear, zeros outside the content). With m = max(alpha, beta) (the padded canvas is
(m H, m W), a square when H = W), an output pixel at normalised (x, y) reads the input at

    x_in = x * m / beta,   y_in = y * m / alpha        (|x_in| > 1 or |y_in| > 1 -> padding)

Convention: (x, y) in [-1, 1], align_corners=True (package-wide). Sizes are continuous (no rounding of
alpha H to whole pixels) and the two resizes become one resampling, so the result differs from a
resize -> pad -> resize pipeline by sub-pixel interpolation only. Content is shrunk along one axis by
at most (1 - delta) / (1 + delta) (0.54 at delta = 0.3) and never enlarged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def draw_factors(batch: int, delta: float, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha (height factor), beta (width factor): (B,) each, uniform in [1 - delta, 1 + delta], float32 CPU."""
    if not 0 <= delta < 1:
        raise ValueError(f"augmentation delta must be in [0, 1), got {delta}")
    u = torch.rand(batch, 2, generator=generator)
    f = 1 - delta + 2 * delta * u  # (B, 2)
    return f[:, 0].contiguous(), f[:, 1].contiguous()


def scale_augment(images: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """images (B, C, H, W); alpha, beta (B,) -> (B, C, H, W): stretch to (alpha H, beta W), zero-pad to a
    square (centred; the frame's aspect ratio when H != W), resize back to (H, W)."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    b, _, h, w = images.shape
    if alpha.shape != (b,) or beta.shape != (b,):
        raise ValueError(f"alpha and beta must be ({b},), got {tuple(alpha.shape)} and {tuple(beta.shape)}")
    if (alpha <= 0).any() or (beta <= 0).any():
        raise ValueError(f"alpha and beta must be positive, got {alpha.tolist()} and {beta.tolist()}")
    dtype = torch.float32 if images.dtype in (torch.float16, torch.bfloat16) else images.dtype
    alpha = alpha.to(images.device, dtype)
    beta = beta.to(images.device, dtype)
    m = torch.maximum(alpha, beta)  # (B,) the padded canvas is (m H, m W)
    theta = torch.zeros(b, 2, 3, device=images.device, dtype=dtype)
    theta[:, 0, 0] = m / beta  # x_in = x * m / beta
    theta[:, 1, 1] = m / alpha  # y_in = y * m / alpha
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=True)  # (B, H, W, 2)
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros",
                         align_corners=True)


def expression_preserving_augment(images: torch.Tensor, delta: float = 0.3,
                                  generator: torch.Generator | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random per-sample factors from `generator` (CPU) -> (augmented, alpha, beta)."""
    alpha, beta = draw_factors(images.shape[0], delta, generator)
    return scale_augment(images, alpha, beta), alpha, beta
