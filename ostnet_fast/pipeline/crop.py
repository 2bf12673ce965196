"""Face crop and paste-back.

Boxes are square, integer pixel-edge boxes (x0, y0, x1, y1): columns x0 .. x1-1 and rows y0 .. y1-1,
side = x1 - x0 = y1 - y0, always inside the frame. Detection: facenet-pytorch's MTCNN when it imports
(optional; its P/R/O-Net weights ship in its wheel, nothing is downloaded), else a fixed centre square
(a warning, once per cropper). facenet-pytorch 2.6.0 pins torch<2.3 and torchvision<0.18 in its
metadata but runs on current ones: install it with --no-deps beside a torchvision built for the
installed torch (MTCNN_INSTALL); PyPI's torchvision wheels are CUDA builds whose ops do not load beside
a +cpu torch, which needs torchvision from the same index as torch.
A frame where the detector finds no face keeps the previous box (or the centre square at the start),
with a warning once. Boxes are smoothed over time by an exponential moving average of (centre, side).

Crop and paste-back run batched on the device through grid_sample (bilinear), so a batch of frames
costs two kernel launches, not a Python loop:
  crop:  face pixel (i, j) of an S x S face samples frame point x = x0 + (j + 0.5) * side / S - 0.5
         (pixel-centre mapping, as a resize with align_corners=False);
  paste: frame pixel x in [x0, x1) samples face point u = (x + 0.5 - x0) * S / side - 0.5, and pixels
         outside the box keep the frame (a hard edge, or a feathered one with `feather` > 0).
Downscaling a large face box by more than ~2x with bilinear sampling aliases a little; fine for
FOMM-style models, which see heavily smoothed inputs anyway.
"""
from __future__ import annotations

import importlib.util
import logging
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]


class FaceCropWarning(UserWarning):
    """Face detection is unavailable or found no face: a fixed or previous crop is used instead."""


def center_box(height: int, width: int) -> Box:
    """The largest centred square of a (height, width) frame."""
    side = min(height, width)
    x0, y0 = (width - side) // 2, (height - side) // 2
    return (x0, y0, x0 + side, y0 + side)


def square_box(face: Sequence[float], height: int, width: int, margin: float = 0.4) -> Box:
    """Face box (x0, y0, x1, y1) in pixels -> a square box around its centre with `margin` of the face
    size added on each side (side = max(w, h) * (1 + 2 margin)), shrunk and shifted to fit the frame."""
    fx0, fy0, fx1, fy1 = (float(v) for v in face)
    if not (fx1 > fx0 and fy1 > fy0):
        raise ValueError(f"face box must have x1 > x0 and y1 > y0, got {tuple(face)}")
    cx, cy = (fx0 + fx1) / 2, (fy0 + fy1) / 2
    side = max(fx1 - fx0, fy1 - fy0) * (1 + 2 * margin)
    return fit_box(cx, cy, side, height, width)


def fit_box(cx: float, cy: float, side: float, height: int, width: int) -> Box:
    """A square of `side` centred at (cx, cy), rounded to pixels, at most the frame's short side and
    shifted (not cut) to lie inside the frame."""
    s = int(round(min(max(side, 2.0), height, width)))
    x0 = int(round(cx - s / 2))
    y0 = int(round(cy - s / 2))
    x0 = min(max(x0, 0), width - s)
    y0 = min(max(y0, 0), height - s)
    return (x0, y0, x0 + s, y0 + s)


MTCNN_INSTALL = ("pip install --no-deps facenet-pytorch requests, plus torchvision built for your torch "
                 "(e.g. torch 2.13 -> torchvision 0.28; for a +cpu torch: pip install --no-deps "
                 "torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cpu)")


def mtcnn_available() -> bool:
    return importlib.util.find_spec("facenet_pytorch") is not None


Detector = Callable[[list[np.ndarray]], list[np.ndarray | None]]


def _load_mtcnn(device: str | torch.device) -> tuple[Detector | None, str]:
    """-> (MTCNN detector or None, why None). The detector maps a list of (H, W, 3) uint8 RGB frames of
    one size to, per frame, the most confident face box (x0, y0, x1, y1) as (4,) float64 pixels, or None."""
    if not mtcnn_available():
        return None, "facenet-pytorch is not installed"
    try:
        from facenet_pytorch import MTCNN
        mtcnn = MTCNN(keep_all=False, device=torch.device(device))
    except Exception as e:  # no torchvision, or one built for another torch ("torchvision::nms does not exist")
        reason = f"facenet-pytorch is installed but MTCNN could not start ({type(e).__name__}: {e})"
        log.warning("%s", reason)
        return None, reason

    def detect(frames: list[np.ndarray]) -> list[np.ndarray | None]:
        # A batch comes back as object arrays (ragged face counts); None / [None] where no face is found.
        boxes, probs = mtcnn.detect(np.stack(frames))  # (N, H, W, 3) -> N x (K, 4), N x (K,)
        out = []
        for b, p in zip(boxes, probs):
            if b is None or len(b) == 0:
                out.append(None)
            else:
                out.append(np.asarray(b[int(np.argmax(np.asarray(p, dtype=np.float64)))], dtype=np.float64))
        return out
    return detect, ""


def _make_mtcnn(device: str | torch.device) -> Detector | None:
    """MTCNN face detector (see _load_mtcnn), or None when facenet-pytorch (or a torchvision that loads
    beside this torch) is missing."""
    return _load_mtcnn(device)[0]


class FaceCropper:
    """Square face boxes for a sequence of frames, smoothed over time.

    detector: "auto" (MTCNN if importable, else centre), "mtcnn", "center", or a callable
    fn(list of (H, W, 3) uint8 frames) -> list of (x0, y0, x1, y1) face boxes or None per frame.
    smoothing: EMA weight of the previous box in [0, 1) (0 = no smoothing).
    detect_every: run the detector on every n-th frame of `boxes()` and hold the box between.
    """

    def __init__(self, detector: str | Callable = "auto", margin: float = 0.4, smoothing: float = 0.8,
                 detect_every: int = 1, device: str | torch.device = "cpu"):
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        if detect_every < 1:
            raise ValueError(f"detect_every must be >= 1, got {detect_every}")
        self.margin = margin
        self.smoothing = smoothing
        self.detect_every = detect_every
        self._warned: set[str] = set()
        if callable(detector):
            self._detect, self.method = detector, "custom"
        elif detector in ("auto", "mtcnn"):
            self._detect, why = _load_mtcnn(device)
            self.method = "mtcnn" if self._detect is not None else "center"
            if self._detect is None:
                if detector == "mtcnn":
                    raise ImportError(f"detector='mtcnn' needs facenet-pytorch (and torchvision): {why}; "
                                      f"{MTCNN_INSTALL}")
                self._warn("no-detector", f"face detection needs facenet-pytorch ({why}; {MTCNN_INSTALL}); "
                           "using a fixed centre square crop")
        elif detector == "center":
            self._detect, self.method = None, "center"
        else:
            raise ValueError(f"detector must be 'auto', 'mtcnn', 'center' or a callable, got {detector!r}")
        self.reset()

    def _warn(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(message, FaceCropWarning, stacklevel=3)

    def reset(self) -> None:
        """Forget the smoothed box (call between videos)."""
        self._state: tuple[float, float, float] | None = None  # smoothed (cx, cy, side)
        self._count = 0
        self._last_face: Sequence[float] | None = None

    def box(self, frame: np.ndarray) -> Box:
        """One still image (e.g. the source photo): its face box, no smoothing, no state."""
        h, w = frame.shape[:2]
        if self._detect is None:
            return center_box(h, w)
        face = self._detect([frame])[0]
        if face is None:
            self._warn("no-face-still", "no face found in the source image; using the centre square crop")
            return center_box(h, w)
        return square_box(face, h, w, self.margin)

    def boxes(self, frames: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Next frames of a video -> (N, 4) int64 smoothed square boxes."""
        n = len(frames)
        h, w = frames[0].shape[:2]
        out = np.empty((n, 4), dtype=np.int64)
        if self._detect is None:  # constant: no per-frame work
            out[:] = center_box(h, w)
            self._count += n
            return out
        index = [i for i in range(n) if (self._count + i) % self.detect_every == 0]
        found = dict(zip(index, self._detect([frames[i] for i in index]))) if index else {}
        for i in range(n):
            face = self._last_face  # held between detections
            if i in found:
                if found[i] is None:
                    self._warn("no-face", f"no face found in frame {self._count + i}; keeping the previous "
                               "crop (the centre square until a face is found)")
                else:
                    face = self._last_face = found[i]
            if face is None:
                cx, cy, side = w / 2, h / 2, float(min(h, w))
            else:
                x0, y0, x1, y1 = square_box(face, h, w, self.margin)
                cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, float(x1 - x0)
            if self._state is not None and self.smoothing > 0:
                a = self.smoothing
                pcx, pcy, ps = self._state
                cx, cy, side = a * pcx + (1 - a) * cx, a * pcy + (1 - a) * cy, a * ps + (1 - a) * side
            self._state = (cx, cy, side)
            out[i] = fit_box(cx, cy, side, h, w)
        self._count += n
        return out


# --------------------------------------------------------------------------------------------------
# Batched crop / paste-back on the device


def _check_boxes(boxes: torch.Tensor, n: int, height: int, width: int) -> torch.Tensor:
    if boxes.shape != (n, 4):
        raise ValueError(f"boxes must be ({n}, 4) (x0, y0, x1, y1), got {tuple(boxes.shape)}")
    return boxes


def crop_resize(frames: torch.Tensor, boxes: torch.Tensor | np.ndarray, size: int) -> torch.Tensor:
    """(N, C, H, W) float frames + (N, 4) square boxes -> (N, C, size, size) crops (bilinear)."""
    n, _, h, w = frames.shape
    boxes = torch.as_tensor(np.asarray(boxes) if not torch.is_tensor(boxes) else boxes)
    b = _check_boxes(boxes, n, h, w).to(device=frames.device, dtype=torch.float32)
    x0, y0, x1, y1 = b.unbind(1)  # (N,) each
    t = (torch.arange(size, device=frames.device, dtype=torch.float32) + 0.5) / size  # (S,) in (0, 1)
    px = x0[:, None] + t[None] * (x1 - x0)[:, None] - 0.5  # (N, S) frame pixel coordinates
    py = y0[:, None] + t[None] * (y1 - y0)[:, None] - 0.5  # (N, S)
    gx = 2 * px / max(w - 1, 1) - 1  # align_corners=True normalisation
    gy = 2 * py / max(h - 1, 1) - 1
    grid = torch.stack([gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], -1)
    return F.grid_sample(frames, grid.to(frames.dtype), mode="bilinear", padding_mode="border",
                         align_corners=True)  # (N, C, S, S)


def paste_back_batch(frames: torch.Tensor, faces: torch.Tensor, boxes: torch.Tensor | np.ndarray,
                     feather: float = 0.0) -> torch.Tensor:
    """(N, C, H, W) frames, (N, C, S, S) faces, (N, 4) boxes -> frames with each face resized into its
    box. feather: width of a linear blend at the box edge, as a fraction of the box side (0 = hard)."""
    n, c, h, w = frames.shape
    s = faces.shape[-1]
    if faces.shape[:2] != (n, c) or faces.shape[-2] != s:
        raise ValueError(f"faces must be ({n}, {c}, S, S) for frames {tuple(frames.shape)}, "
                         f"got {tuple(faces.shape)}")
    boxes = torch.as_tensor(np.asarray(boxes) if not torch.is_tensor(boxes) else boxes)
    b = _check_boxes(boxes, n, h, w).to(device=frames.device, dtype=torch.float32)
    x0, y0, x1, y1 = (v[:, None] for v in b.unbind(1))  # (N, 1) each
    xs = torch.arange(w, device=frames.device, dtype=torch.float32)[None]  # (1, W)
    ys = torch.arange(h, device=frames.device, dtype=torch.float32)[None]  # (1, H)
    u = (xs + 0.5 - x0) * s / (x1 - x0) - 0.5  # (N, W) face pixel coordinates
    v = (ys + 0.5 - y0) * s / (y1 - y0) - 0.5  # (N, H)
    gu = 2 * u / max(s - 1, 1) - 1
    gv = 2 * v / max(s - 1, 1) - 1
    grid = torch.stack([gu[:, None, :].expand(n, h, w), gv[:, :, None].expand(n, h, w)], -1)  # (N, H, W, 2)
    warped = F.grid_sample(faces.to(frames.dtype), grid.to(frames.dtype), mode="bilinear",
                           padding_mode="border", align_corners=True)  # (N, C, H, W)
    if feather > 0:
        ramp = feather * (x1 - x0)  # (N, 1) pixels
        mx = ((xs + 0.5 - x0).clamp(min=0) / ramp).clamp(max=1) * ((x1 - xs - 0.5).clamp(min=0) / ramp).clamp(max=1)
        my = ((ys + 0.5 - y0).clamp(min=0) / ramp).clamp(max=1) * ((y1 - ys - 0.5).clamp(min=0) / ramp).clamp(max=1)
    else:
        mx = ((xs >= x0) & (xs < x1)).float()  # (N, W)
        my = ((ys >= y0) & (ys < y1)).float()  # (N, H)
    mask = (my[:, :, None] * mx[:, None, :])[:, None].to(frames.dtype)  # (N, 1, H, W)
    return frames * (1 - mask) + warped * mask


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}")
    image = np.ascontiguousarray(image)
    # A read-only array (load_image's are) is copied: torch.from_numpy would warn that it cannot be written.
    x = torch.from_numpy(image) if image.flags.writeable else torch.tensor(image)
    return x.permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def crop(frame: np.ndarray, box: Sequence[int], size: int) -> np.ndarray:
    """(H, W, 3) uint8 frame, square box -> (size, size, 3) uint8 crop."""
    return _to_uint8(crop_resize(_to_tensor(frame), torch.tensor([list(box)]), size))


def paste_back(frame: np.ndarray, face: np.ndarray, box: Sequence[int], feather: float = 0.0) -> np.ndarray:
    """(H, W, 3) uint8 frame, (S, S, 3) uint8 generated face, square box -> the frame with the face
    resized into the box (a new array; the input is not modified)."""
    return _to_uint8(paste_back_batch(_to_tensor(frame), _to_tensor(face), torch.tensor([list(box)]), feather))
