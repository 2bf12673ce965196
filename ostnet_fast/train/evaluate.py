"""Evaluation: `ostnet-fast eval --checkpoint CKPT --data DATA [--out metrics.json]`.

Reconstruction (same identity) as in FOMM and the paper: for every test video, the first frame is the
source and every `stride`-th frame (up to `max_frames`) the driving frame and the ground truth.

- same_scale: the driving frame as it is.
- different_scale (paper, Table 2): the driving frame rescaled by the expression-preserving augmentation
  with alpha, beta ~ U[1 - delta, 1 + delta], delta = 0.3, drawn per pair from a generator seeded by
  (seed, video, frame), so the test set is the same on every run; the ground truth is the frame before
  rescaling.

Metrics (definitions in metrics.py): L1, PSNR, SSIM always; LPIPS with `--lpips PATH`; AKD / AED with
`--face-metrics` (needs dlib + face-recognition-models). Output: a printed table and a JSON file.
"""
from __future__ import annotations

import datetime as _dt
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint as ckpt
from .augment import draw_factors, scale_augment
from .metrics import FaceMetrics, MissingDependencyError, l1, load_lpips, psnr, ssim

PROTOCOLS = ("same_scale", "different_scale")


@dataclass
class EvalOptions:
    checkpoint: str
    data: str
    out: str | None = None
    split: str = "test"
    protocols: tuple[str, ...] = PROTOCOLS
    device: str | None = None
    batch_size: int = 16
    stride: int = 1
    max_frames: int | None = None
    max_videos: int | None = None
    delta: float = 0.3
    seed: int = 0
    lpips: str | None = None
    lpips_backbone: str | None = None
    face_metrics: bool = False


def pair_generator(seed: int, video: int, frame: int) -> torch.Generator:
    s = int(np.random.SeedSequence([seed, video, frame]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(s)


@torch.no_grad()
def evaluate(opts: EvalOptions, model=None, config=None, progress: bool = True) -> dict:
    """Run the protocols; returns the result dict (also written to opts.out when given)."""
    from ..data.dataset import VideoSource, find_videos
    for p in opts.protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"unknown protocol {p!r}; known: {PROTOCOLS}")
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model is None:
        model, config = ckpt.load_checkpoint(opts.checkpoint, device=device, fused=device.type == "cuda")
    model = model.to(device).eval()
    videos = find_videos(opts.data, opts.split)
    if opts.max_videos:
        videos = videos[:opts.max_videos]
    lpips_model = load_lpips(opts.lpips, opts.lpips_backbone).to(device) if opts.lpips else None
    face = FaceMetrics() if opts.face_metrics else None
    size = model.config.image_size
    per = {p: {"l1": [], "psnr": [], "ssim": [], "lpips": [], "akd": [], "aed": [], "face_missing": 0}
           for p in opts.protocols}
    iterator = videos
    if progress:
        from tqdm import tqdm
        iterator = tqdm(videos, unit="video", dynamic_ncols=True)
    for v, path in enumerate(iterator):
        frames = VideoSource(path, size).frames()  # (N, C, H, W) uint8
        idx = list(range(0, frames.shape[0], max(1, opts.stride)))[:opts.max_frames]
        source = frames[:1].float().div(255).to(device)
        state = model.encode_source(source)
        for start in range(0, len(idx), opts.batch_size):
            chunk = idx[start:start + opts.batch_size]
            target = frames[chunk].float().div(255).to(device)  # ground truth (B, C, H, W)
            for p in opts.protocols:
                driving = target
                if p == "different_scale":
                    ab = [draw_factors(1, opts.delta, pair_generator(opts.seed, v, f)) for f in chunk]
                    alpha = torch.cat([a for a, _ in ab])
                    beta = torch.cat([b for _, b in ab])
                    driving = scale_augment(target, alpha, beta)
                pred = model.animate(state, driving)["prediction"].float().clamp(0, 1)
                r = per[p]
                r["l1"] += l1(pred, target).tolist()
                r["psnr"] += psnr(pred, target).tolist()
                r["ssim"] += ssim(pred, target).tolist()
                if lpips_model is not None:
                    r["lpips"] += lpips_model(pred, target).tolist()
                if face is not None:
                    akd, aed = face(pred, target)
                    r["akd"] += [a for a in akd if a is not None]
                    r["aed"] += [a for a in aed if a is not None]
                    r["face_missing"] += sum(a is None for a in akd)
    results = {}
    for p, r in per.items():
        mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
        results[p] = {"pairs": len(r["l1"]), "l1": mean(r["l1"]), "psnr": mean(r["psnr"]), "ssim": mean(r["ssim"]),
                      "lpips": mean(r["lpips"]) if lpips_model is not None else None,
                      "akd": mean(r["akd"]) if face is not None else None,
                      "aed": mean(r["aed"]) if face is not None else None}
        if face is not None:
            results[p]["face_missing"] = r["face_missing"]
    doc = {"checkpoint": str(opts.checkpoint), "data": str(opts.data), "split": opts.split,
           "videos": len(videos), "stride": opts.stride, "max_frames": opts.max_frames, "delta": opts.delta,
           "seed": opts.seed, "device": str(device),
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "definitions": {"psnr": "10 log10(1/MSE), data range 1, capped at 100 dB",
                           "ssim": "Gaussian window 11 (sigma 1.5), K1 0.01, K2 0.03, data range 1, sample "
                                   "covariance, mean over channels = skimage gaussian_weights=True",
                           "lpips": "v0.1 AlexNet" if lpips_model is not None else "not computed (no --lpips)",
                           "akd_aed": "dlib 68 landmarks (px) / 128-d embedding" if face is not None
                           else "not computed (no --face-metrics)"},
           "results": results}
    if opts.out:
        ckpt.atomic_write(opts.out, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2)))
    return doc


def format_table(doc: dict) -> str:
    cols = ["protocol", "pairs", "L1", "PSNR", "SSIM", "LPIPS", "AKD", "AED"]
    keys = ["pairs", "l1", "psnr", "ssim", "lpips", "akd", "aed"]
    rows = []
    for p, r in doc["results"].items():
        cells = [p]
        for k in keys:
            v = r.get(k)
            cells.append("-" if v is None else (str(v) if isinstance(v, int) else f"{v:.4f}"))
        rows.append(cells)
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths)), "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def add_eval_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="ostnet-fast checkpoint (.safetensors)")
    parser.add_argument("--data", required=True, metavar="DATA",
                        help="dataset root (uses root/test when it exists) or one video")
    parser.add_argument("--out", default=None, metavar="JSON", help="write the metrics as JSON here")
    parser.add_argument("--split", default=None, metavar="NAME",
                        help="sub-folder of --data to evaluate (default: test when --data has one, else --data)")
    parser.add_argument("--protocol", dest="protocols", action="append", choices=PROTOCOLS,
                        help="same_scale and/or different_scale (default both)")
    parser.add_argument("--device", default=None, metavar="DEVICE", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N",
                        help="driving frames per forward (default 16)")
    parser.add_argument("--stride", type=int, default=1, metavar="N",
                        help="use every N-th frame as a driving frame (default 1)")
    parser.add_argument("--max-frames", type=int, default=None, metavar="N", help="driving frames per video at most")
    parser.add_argument("--max-videos", type=int, default=None, metavar="N", help="videos at most")
    parser.add_argument("--delta", type=float, default=0.3, metavar="D",
                        help="different-scale protocol: alpha, beta in [1-D, 1+D] (default 0.3)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed of the different-scale factors (default 0)")
    parser.add_argument("--lpips", default=None, metavar="PATH",
                        help="LPIPS v0.1 AlexNet weights (lpips' alex.pth or a full state dict)")
    parser.add_argument("--lpips-backbone", default=None, metavar="PATH",
                        help="torchvision alexnet-owt-7be5be79.pth for --lpips")
    parser.add_argument("--face-metrics", action="store_true", help="AKD/AED (needs dlib + face-recognition-models)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")


def usage_problem(opts: EvalOptions) -> str | None:
    """What is wrong with the command line, found before any model or data work; None if nothing."""
    if not Path(opts.checkpoint).is_file():
        return f"checkpoint not found: {opts.checkpoint}"
    for flag, value in (("--batch-size", opts.batch_size), ("--stride", opts.stride),
                        ("--max-frames", opts.max_frames), ("--max-videos", opts.max_videos)):
        if value is not None and value < 1:
            return f"{flag} must be >= 1, got {value}"
    if opts.device is not None:
        try:
            device = torch.device(opts.device)
        except RuntimeError:
            return f"--device {opts.device}: not a device (cuda, cuda:N or cpu)"
        if device.type == "cuda" and not torch.cuda.is_available():
            return f"--device {opts.device}: CUDA is not available to this torch build ({torch.__version__})"
        if device.type not in ("cuda", "cpu"):
            return f"--device {opts.device}: only cuda and cpu are supported"
    if opts.out:
        out = Path(opts.out)
        if out.is_dir():
            return f"--out {out} is a directory; give a file name (e.g. {out / 'eval.json'})"
        parent = next((p for p in out.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            return f"--out {out}: {parent} is not a directory"
    return None


def run_eval_cli(args, prog: str = "ostnet-fast eval") -> int:
    from ..data.dataset import DatasetError
    if args.split is not None and Path(args.data).is_dir() and not (Path(args.data) / args.split).is_dir():
        print(f"{prog}: error: --split {args.split}: there is no folder {Path(args.data) / args.split}",
              file=sys.stderr)
        return 2
    opts = EvalOptions(checkpoint=args.checkpoint, data=args.data, out=args.out, split=args.split or "test",
                       protocols=tuple(args.protocols or PROTOCOLS), device=args.device, batch_size=args.batch_size,
                       stride=args.stride, max_frames=args.max_frames, max_videos=args.max_videos,
                       delta=args.delta, seed=args.seed, lpips=args.lpips, lpips_backbone=args.lpips_backbone,
                       face_metrics=args.face_metrics)
    problem = usage_problem(opts)
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    try:
        doc = evaluate(opts, progress=args.progress)
    except (DatasetError, ckpt.CheckpointError, FileNotFoundError, MissingDependencyError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(format_table(doc))
    if opts.out:
        print(f"wrote {opts.out}")
    return 0
