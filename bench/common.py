"""Shared benchmark plumbing: CUDA-event timing, environment record, JSON + printed table.

Every figure is a ratio to a baseline measured in the same run (DESIGN.md). Timing: CUDA events around
each call after warm-up, median of many runs, random inputs (never zeros).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def env_info() -> dict:
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, compute_capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version())
    else:
        info["gpu"] = None
    from ostnet_fast import __version__
    info["ostnet_fast"] = __version__
    return info


def time_ms(fn: Callable[[], object], warmup: int = 10, iters: int = 50, grad_to_none=(),
            cuda: bool | None = None) -> dict:
    """Median / p20 / p80 milliseconds of fn(): CUDA events per call on the current stream, or
    perf_counter when cuda=False (CPU runs; default: CUDA when available)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        for t in grad_to_none:
            t.grad = None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def time_graph_ms(fn: Callable[[], object], iters: int = 50, grad_to_none=(), reps: int = 10,
                  warmup: int = 3) -> dict:
    """GPU time of fn() without the host's launch cost: `reps` calls captured in one CUDA graph, CUDA
    events around each replay, median per call. Small kernels are launch-bound in eager timing (Python +
    driver ~10-40 us a launch), which hides what the GPU does; inside a CUDA graph (how the model's fused
    path and torch.compile's reduce-overhead run) only GPU time is left. Used for both sides of a ratio."""
    from ostnet_fast.runtime.cuda_graph import GraphedStep

    def body():
        for _ in range(reps):
            for t in grad_to_none:
                t.grad = None
            fn()
    graphed = GraphedStep(body, (), warmup=warmup)  # warm-up (Triton compile, cuDNN autotune), capture
    graphed.graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graphed.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return _summary(times)


def _summary(times: list[float]) -> dict:
    times = sorted(times)
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return {"median_ms": statistics.median(times), "p20_ms": q(0.2), "p80_ms": q(0.8), "iters": len(times)}


# record_function ranges (ours and torch's) also appear as GPU-side events spanning their kernels.
RANGE_PREFIXES = ("frame", "stage::", "Optimizer.", "ProfilerStep")


def kernel_events(events) -> list:
    """The GPU-side profiler events that are kernels and copies, not ranges that would count them twice."""
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not e.key.startswith(RANGE_PREFIXES)]


# Kernel families by name, first match wins: what a step's GPU time goes to.
KERNEL_CATEGORIES = (
    ("ours (triton)", r"^_\w+_kernel$"),  # our @triton.jit names (_zconv_..., _tps_..., _dm_...)
    ("conv/gemm (cuDNN, cuBLAS)", r"conv|cudnn|xmma|cutlass|gemm|sm\d\d_|wgrad|dgrad|implicit|nhwc|winograd|fft"),
    ("inductor triton", r"^triton_"),
    ("optimizer (foreach)", r"multi_tensor|foreach|adam"),
    ("batch norm", r"batch_norm|bn_"),
    ("pooling / upsample", r"pool|upsample|interp"),
    ("grid_sample (aten)", r"grid_sampler"),
    ("reductions (aten)", r"reduce|norm"),
    ("elementwise (aten)", r"elementwise|unrolled|vectorized"),
    ("copies / memset", r"memcpy|memset|copy"),
)


def kernel_categories(kernels) -> list[tuple[str, float, int]]:
    """(category, GPU us, kernel calls) per KERNEL_CATEGORIES family, largest first; the rest is "other"."""
    totals: dict[str, list] = {}
    for e in kernels:
        name = next((c for c, rx in KERNEL_CATEGORIES if re.search(rx, e.key, re.IGNORECASE)), "other")
        t = totals.setdefault(name, [0.0, 0])
        t[0] += e.self_device_time_total
        t[1] += e.count
    return sorted(((c, us, n) for c, (us, n) in totals.items()), key=lambda r: -r[1])


def peak_memory_mib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def out_dir(arg: str | None) -> Path:
    path = Path(arg or os.environ.get("OUT") or "bench/results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def print_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return "-" if v is None else str(v)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: Path, name: str, rows: list[dict], **extra) -> Path:
    doc = {"benchmark": name, "env": env_info(), **extra, "rows": rows}
    file = path / f"{name}.json"
    file.write_text(json.dumps(doc, indent=2))
    if not extra.get("partial"):
        print(f"wrote {file}", flush=True)
    return file
