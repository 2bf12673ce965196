"""Reconstruction metrics of the paper's tables: L1, PSNR, SSIM, LPIPS, AKD, AED.

All take (B, C, H, W) float images in [0, 1] and return one value per image (B,); averages are the
caller's. Definitions:

- L1: mean |x - y| over pixels and channels.
- PSNR: 10 log10(1 / MSE) in dB (data range 1), capped at PSNR_CAP = 100 dB (identical images).
- SSIM: Wang et al. with a Gaussian window of 11 taps (sigma 1.5, truncated at 3.5 sigma), K1 = 0.01,
  K2 = 0.03, data range 1, covariances with the sample (N - 1) normalisation over the N = 121 window
  taps, mean over the valid region (5 pixels in from each border), averaged over channels. This equals
  `skimage.metrics.structural_similarity(x, y, gaussian_weights=True, data_range=1, channel_axis=-1)`
  with its other defaults (tested).
- LPIPS (v0.1, AlexNet): only with weights given by path (`load_lpips`); nothing is downloaded.
- AKD: mean L2 distance in pixels between the 68 facial landmarks (dlib, `face-recognition-models`)
  of the prediction and the ground truth; AED: mean L2 distance between their 128-d dlib face
  embeddings. One face per image: dlib's HOG detector (upsampled once), its most confident face.
  Pairs where either face is not found are counted separately (not in the mean). Both need the
  optional packages `dlib` (or `dlib-bin`, a prebuilt wheel that imports as dlib) and
  `face-recognition-models`; without them `FaceMetrics` raises. Measured: AKD of an image moved k px
  is k within 0.2 px; AED of a moved image is <= 0.05 (0.6 is dlib's same-person threshold).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_state_dict_file

PSNR_CAP = 100.0


class MissingDependencyError(RuntimeError):
    """An optional package a requested metric needs is not installed."""


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"metrics need two (B, C, H, W) images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    _check_pair(x, y)
    return (x.double() - y.double()).abs().flatten(1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor, cap: float = PSNR_CAP) -> torch.Tensor:
    _check_pair(x, y)
    mse = ((x.double() - y.double()) ** 2).flatten(1).mean(1)
    value = 10 * torch.log10(1.0 / mse.clamp_min(1e-300))
    return value.clamp(max=cap)


def _gaussian_1d(sigma: float = 1.5, truncate: float = 3.5, dtype=torch.float64) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)  # scipy.ndimage's rule: 5 taps each side for sigma 1.5
    x = torch.arange(-radius, radius + 1, dtype=dtype)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, k1: float = 0.01, k2: float = 0.03, sigma: float = 1.5,
         sample_covariance: bool = True) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B,) SSIM, definition in the module docstring."""
    _check_pair(x, y)
    g = _gaussian_1d(sigma).to(x.device)
    win = g.numel()
    if min(x.shape[-2:]) < win:
        raise ValueError(f"SSIM needs images of at least {win}x{win}, got {tuple(x.shape[-2:])}")
    c = x.shape[1]
    x, y = x.double(), y.double()
    kx = g.view(1, 1, 1, win).repeat(c, 1, 1, 1)
    ky = g.view(1, 1, win, 1).repeat(c, 1, 1, 1)

    def filt(t):  # separable Gaussian, 'valid' region only (= skimage's filter then crop by win // 2)
        return F.conv2d(F.conv2d(t, kx, groups=c), ky, groups=c)

    cov_norm = win * win / (win * win - 1) if sample_covariance else 1.0
    ux, uy = filt(x), filt(y)
    vx = cov_norm * (filt(x * x) - ux * ux)
    vy = cov_norm * (filt(y * y) - uy * uy)
    vxy = cov_norm * (filt(x * y) - ux * uy)
    c1, c2 = (k1 * 1.0) ** 2, (k2 * 1.0) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(2, 3)).mean(dim=1)  # mean over the valid region, then over channels


# ----------------------------------------------------------------------------------------------------
# LPIPS v0.1 (Zhang et al. 2018), AlexNet backbone


class LPIPS(nn.Module):
    """LPIPS with the AlexNet trunk (torchvision's `features.*` layout) and the 5 linear layers
    (`lin{0..4}.model.1.weight`, 1x1 convs without bias) of the `lpips` package's weights/v0.1/alex.pth.
    Input (B, 3, H, W) in [0, 1]; returns (B,) distances."""

    _CHANNELS = (64, 192, 384, 256, 256)

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(),        # 0, 1 -> relu1
            nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(),  # 2, 3, 4 -> relu2
            nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),  # 5, 6, 7 -> relu3
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),                  # 8, 9 -> relu4
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU())                  # 10, 11 -> relu5
        self._taps = (1, 4, 7, 9, 11)
        self.lins = nn.ModuleList([nn.Conv2d(ch, 1, 1, bias=False) for ch in self._CHANNELS])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _feats(self, x):
        h = ((2 * x - 1) - self.shift) / self.scale  # lpips expects [-1, 1], then its ScalingLayer
        outs = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self._taps:
                outs.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return outs

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_pair(x, y)
        total = x.new_zeros(x.shape[0])
        for lin, fx, fy in zip(self.lins, self._feats(x.float()), self._feats(y.float())):
            total = total + lin((fx - fy) ** 2).mean(dim=(1, 2, 3))
        return total


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS weights not found: {path}")
    return load_state_dict_file(path, "LPIPS state dict")


def load_lpips(path: str | Path, backbone: str | Path | None = None) -> LPIPS:
    """LPIPS from `path`: either one file with both `features.*` (AlexNet) and `lin{i}.model.1.weight`
    keys, or the `lpips` package's alex.pth (lin layers only) plus `backbone`, torchvision's AlexNet
    weights (alexnet-owt-7be5be79.pth; default: torchvision's cache under $TORCH_HOME)."""
    from .losses import torch_cache_dir
    state = dict(_read_state(Path(path)))
    if not any(k.startswith("features.") for k in state):
        backbone = Path(backbone) if backbone else torch_cache_dir() / "alexnet-owt-7be5be79.pth"
        if not backbone.is_file():
            raise FileNotFoundError(f"LPIPS: {path} holds only the linear layers; the AlexNet trunk is expected "
                                    f"at {backbone} (torchvision's alexnet-owt-7be5be79.pth; set $TORCH_HOME or "
                                    "pass --lpips-backbone PATH)")
        state.update({k: v for k, v in _read_state(backbone).items() if k.startswith("features.")})
    model = LPIPS()
    mapped = {}
    for k, v in state.items():
        if k.startswith("features."):
            mapped[k] = v
        elif k.startswith("lin") and k.endswith(".model.1.weight"):
            mapped[f"lins.{int(k[3:k.index('.')])}.weight"] = v
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    bad = [k for k in expected if k in mapped and mapped[k].shape != expected[k].shape]
    if missing or bad:
        raise ValueError(f"{path}: not LPIPS-AlexNet weights (missing {missing[:4]}, shape mismatch {bad[:4]})")
    model.load_state_dict({k: mapped[k] for k in expected})
    return model


# ----------------------------------------------------------------------------------------------------
# AKD / AED with dlib (optional)


FACE_INSTALL = ("pip install dlib face-recognition-models (dlib compiles from source: cmake and a C++ compiler; "
                "or the prebuilt wheel: pip install dlib-bin face-recognition-models, which imports as dlib)")
_FACE_MODELS = {"predictor": "shape_predictor_68_face_landmarks.dat",
                "encoder": "dlib_face_recognition_resnet_model_v1.dat"}


def face_model_paths() -> dict[str, Path]:
    """Paths of dlib's 68-landmark predictor and face encoder inside the installed face-recognition-models,
    found without importing it: its __init__ imports pkg_resources, gone from current setuptools (84)."""
    import importlib.util
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"AKD/AED need the optional package face-recognition-models: {FACE_INSTALL}")
    root = Path(next(iter(spec.submodule_search_locations))) / "models"
    paths = {k: root / name for k, name in _FACE_MODELS.items()}
    missing = [str(v) for v in paths.values() if not v.is_file()]
    if missing:
        raise MissingDependencyError(f"face-recognition-models is installed but lacks {missing} (a partial "
                                     f"install?): {FACE_INSTALL}")
    return paths


class FaceMetrics:
    """68-point landmarks and 128-d embeddings with dlib's models from `face-recognition-models`."""

    def __init__(self):
        try:
            import dlib
        except ImportError as e:
            raise MissingDependencyError(f"AKD/AED need the optional packages dlib and face-recognition-models "
                                         f"({FACE_INSTALL}): {e}") from None
        paths = face_model_paths()
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(paths["predictor"]))
        self.encoder = dlib.face_recognition_model_v1(str(paths["encoder"]))

    def _face(self, image):
        import numpy as np
        arr = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        arr = np.ascontiguousarray(arr)  # (H, W, 3): dlib's bindings need C order; numpy kept the CHW strides
        faces, scores, _ = self.detector.run(arr, 1)  # upsampled once: faces down to ~40 px
        if not faces:
            return None
        # The most confident face, not the largest: HOG boxes come in a few fixed sizes, so the largest
        # is often a tie with a weak false positive (e.g. the bundled photo's suit patch, score 0.1 vs 1.2).
        rect = faces[int(np.argmax(scores))]
        shape = self.predictor(arr, rect)
        points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)  # (68, 2)
        embedding = np.array(self.encoder.compute_face_descriptor(arr, shape), dtype=np.float64)  # (128,)
        return points, embedding

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[float | None], list[float | None]]:
        """-> (AKD per image, AED per image), None where a face is missing in either image."""
        import numpy as np
        _check_pair(x, y)
        akd, aed = [], []
        for a, b in zip(x, y):
            fa, fb = self._face(a), self._face(b)
            if fa is None or fb is None:
                akd.append(None)
                aed.append(None)
                continue
            akd.append(float(np.linalg.norm(fa[0] - fb[0], axis=1).mean()))
            aed.append(float(np.linalg.norm(fa[1] - fb[1])))
        return akd, aed


def finite_or_none(v: float) -> float | None:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None
