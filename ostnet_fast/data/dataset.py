"""Training / evaluation data: videos (mp4, mov, avi, mkv, webm via PyAV) or folders of frames.

Layouts (FOMM / VoxCeleb):
    root/train/<video>.mp4   root/train/<video>/<frame>.png   (and root/test/... for evaluation)
    root/<video>.mp4 ...     a flat folder of videos and/or frame folders (no train/test split)
    root.mp4                 a single video file

`FramePairs` yields pairs of frames of one video, (source, driving), each (C, H, W) float32 in [0, 1]
at the model size; FOMM's `num_repeats` repeats the video list per epoch. Frame choice is a function of
(seed, epoch, index) only, so it does not depend on DataLoader workers, and a resumed run sees the same
pairs. Videos are opened lazily (in the worker that needs them, never in __init__); a decoded video is
kept in a small per-process LRU cache of uint8 frames already resized to the model size. Frames that
are not square are centre-cropped to a square before resizing (`crop="center"`), or squashed
(`crop="none"`).
"""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


class DatasetError(ValueError):
    """An empty, missing or unreadable dataset."""


def _is_video(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS


def _frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def find_videos(root: str | Path, split: str | None = "train") -> list[Path]:
    """Video files and frame folders under root (root/<split>/ when that exists), sorted by name."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset not found: {root}")
    if root.is_file():
        if not _is_video(root):
            raise DatasetError(f"{root} is not a video ({', '.join(VIDEO_EXTENSIONS)}) nor a folder")
        return [root]
    folder = root / split if split and (root / split).is_dir() else root
    items = [p for p in sorted(folder.iterdir()) if _is_video(p) or (p.is_dir() and _frame_files(p))]
    if not items:
        raise DatasetError(f"no videos under {folder}: expected {'/'.join(VIDEO_EXTENSIONS)} files or "
                           f"folders of {'/'.join(IMAGE_EXTENSIONS)} frames (FOMM layout: "
                           f"{root}/train/<video>.mp4 or {root}/train/<video>/<frame>.png)")
    return items


def to_model_size(frames: np.ndarray | torch.Tensor, size: int, crop: str = "center") -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, size, size) uint8: centre square crop (crop='center'), then an
    antialiased bilinear resize."""
    x = torch.as_tensor(frames)
    if x.dim() != 4 or x.shape[-1] not in (1, 3, 4):
        raise DatasetError(f"frames must be (N, H, W, C), got {tuple(x.shape)}")
    x = x[..., :3] if x.shape[-1] == 4 else x
    x = x.permute(0, 3, 1, 2)  # (N, C, H, W)
    h, w = x.shape[-2:]
    if crop == "center" and h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        x = x[..., top:top + s, left:left + s]
    elif crop not in ("center", "none"):
        raise ValueError(f"crop must be 'center' or 'none', got {crop!r}")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True).round_().clamp_(0, 255).to(torch.uint8)
    return x.contiguous()


def read_video(path: str | Path, max_frames: int | None = None) -> np.ndarray:
    """All frames (or the first max_frames) of a video file as (N, H, W, 3) uint8 RGB, via PyAV."""
    import av
    path = Path(path)
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DatasetError(f"{path} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except DatasetError:
        raise
    except Exception as e:  # av.error.* (InvalidDataError, ...), OSError
        raise DatasetError(f"cannot decode video {path} ({type(e).__name__}: {e})") from None
    if not frames:
        raise DatasetError(f"{path} has no decodable frames")
    return np.stack(frames)


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise DatasetError(f"cannot read image {path} ({type(e).__name__}: {e})") from None


class VideoSource:
    """One video (file or frame folder) with its frames at the model size, decoded on first use."""

    def __init__(self, path: Path, size: int, crop: str = "center"):
        self.path, self.size, self.crop = Path(path), size, crop
        self._files = _frame_files(self.path) if self.path.is_dir() else None

    def num_frames_hint(self) -> int | None:
        return len(self._files) if self._files is not None else None

    def frames(self, indices=None) -> torch.Tensor:
        """(N, C, size, size) uint8; frame folders read only the frames asked for."""
        if self._files is not None:
            files = self._files if indices is None else [self._files[i] for i in indices]
            if not files:
                raise DatasetError(f"{self.path} has no frames")
            return to_model_size(np.stack([read_image(f) for f in files]), self.size, self.crop)
        frames = to_model_size(read_video(self.path), self.size, self.crop)
        return frames if indices is None else frames[list(indices)]


class FramePairs(Dataset):
    """Pairs (source, driving) of frames of one video per sample.

    Item i: video i % num_videos; two distinct frames (one frame videos give the same frame twice),
    chosen by np.random.default_rng((seed, epoch, i)). Returns {'source', 'driving': (C, H, W) float32
    in [0, 1], 'video': int, 'frames': (2,) int64}. Call `set_epoch(e)` before each epoch (the trainer
    does; DataLoader workers pick it up because they are created per epoch)."""

    def __init__(self, root: str | Path, size: int, num_repeats: int = 1, split: str | None = "train",
                 seed: int = 0, cache_videos: int = 4, crop: str = "center"):
        self.videos = find_videos(root, split)
        if num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
        self.root, self.size, self.num_repeats, self.seed, self.crop = Path(root), size, num_repeats, seed, crop
        self.epoch = 0
        self.cache_videos = cache_videos
        self._cache: collections.OrderedDict[int, torch.Tensor] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.videos) * self.num_repeats

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getstate__(self):  # workers start with an empty cache
        state = dict(self.__dict__)
        state["_cache"] = collections.OrderedDict()
        return state

    def _video_frames(self, v: int) -> torch.Tensor:
        if v in self._cache:
            self._cache.move_to_end(v)
            return self._cache[v]
        frames = VideoSource(self.videos[v], self.size, self.crop).frames()
        if self.cache_videos > 0:
            self._cache[v] = frames
            while len(self._cache) > self.cache_videos:
                self._cache.popitem(last=False)
        return frames

    def _pick(self, n: int, index: int) -> tuple[int, int]:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        if n < 2:
            return 0, 0
        a, b = rng.choice(n, size=2, replace=False)
        return int(a), int(b)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        v = index % len(self.videos)
        source = VideoSource(self.videos[v], self.size, self.crop)
        n = source.num_frames_hint()
        if n is not None:  # frame folder: read just the two frames
            i, j = self._pick(n, index)
            pair = source.frames([i, j])
        else:
            frames = self._video_frames(v)
            i, j = self._pick(frames.shape[0], index)
            pair = frames[[i, j]]
        pair = pair.float() / 255.0  # (2, C, H, W)
        return {"source": pair[0], "driving": pair[1], "video": v,
                "frames": torch.tensor([i, j], dtype=torch.int64)}

    def check(self) -> None:
        """Decode the first video now (in the calling process) so a broken dataset fails before training."""
        self[0]
        self._cache.clear()
