"""Shared by the ONNX exporter, the TensorRT builder and the runtimes: file names, hashes, sidecars.

Layout of an export directory (`export_onnx.py --out DIR`):
    DIR/source.onnx  DIR/source.json        float32 graphs, the default
    DIR/frame.onnx   DIR/frame.json
    DIR/source_fp16.onnx ... (with --fp16)  float16 compute, float32 I/O (strongly typed friendly)
and of an engine directory (`build_trt.py --out DIR`): DIR/source.engine + DIR/source.engine.json, the
same for frame; one precision per engine directory (the sidecar says which).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write

GRAPHS = ("source", "frame")
PRECISIONS = ("fp32", "fp16")
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 16, 19, 17
OPSET_20_REASON = ("opset 20 renames GridSample's modes to 'linear'/'cubic' and TensorRT's ONNX parser has "
                   "been seen to fall back to nearest for them (NVIDIA/TensorRT #4646); export at 16..19")
GRID_SAMPLE_NOTE = ("GridSample mode=bilinear, padding_mode=zeros, align_corners=1: grids hold (x, y) in "
                    "[-1, 1], x along width, -1/+1 = centres of the corner pixels (FOMM's convention)")


class ExportError(RuntimeError):
    """Export, graph check or engine build failed; the message says which step and why."""


def onnx_name(graph: str, precision: str = "fp32") -> str:
    if graph not in GRAPHS or precision not in PRECISIONS:
        raise ValueError(f"graph must be one of {GRAPHS} and precision one of {PRECISIONS}, "
                         f"got {graph!r}, {precision!r}")
    return f"{graph}.onnx" if precision == "fp32" else f"{graph}_{precision}.onnx"


def engine_name(graph: str) -> str:
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    return f"{graph}.engine"


def sidecar_path(path: str | Path) -> Path:
    """source.onnx -> source.json; source.engine -> source.engine.json."""
    path = Path(path)
    return path.with_suffix(".json") if path.suffix == ".onnx" else path.with_name(path.name + ".json")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def publish(path: str | Path) -> Path:
    """atomic_write's temp files are 0600; give written artefacts the usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    return publish(atomic_write(path, lambda tmp: Path(tmp).write_bytes(data)))


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    return publish(atomic_write(path, lambda tmp: Path(tmp).write_text(text)))


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of an .onnx or .engine file (or the .json itself), with a clear error."""
    path = Path(path)
    side = path if path.suffix == ".json" else sidecar_path(path)
    if not side.is_file():
        raise FileNotFoundError(f"sidecar not found: {side} (written by export_onnx.py / build_trt.py "
                                f"beside {path.name}; re-export rather than writing it by hand)")
    try:
        data = json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{side} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or "inputs" not in data or "outputs" not in data:
        raise ValueError(f"{side} is not an ostnet-fast sidecar (no 'inputs'/'outputs')")
    return data


def check_opset(opset: int) -> int:
    if opset >= 20:
        raise ValueError(f"opset {opset} refused: {OPSET_20_REASON}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} refused: GridSample needs opset {MIN_OPSET} or newer; use "
                         f"{MIN_OPSET}..{MAX_OPSET}")
    return opset


@contextlib.contextmanager
def staged(out_dir: str | Path):
    """Yields a hidden folder inside out_dir to write an export's files into. When the block succeeds they
    replace their namesakes in out_dir; when it fails or is interrupted the folder is removed. So out_dir
    holds a whole set, the previous one or the new one, never a source graph of one with the frame of another."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        yield stage
        for path in sorted(stage.iterdir()):
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
