"""Where a training step spends its GPU time: torch.profiler over a few steps of bench_train's step
(OSTNet + VGG-19 losses + backward + Adam, AMP), top kernels by GPU time, reference vs fused.

    python bench/profile_train.py [--mode fused] [--batch-size 8] [--top 30]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import build, layout  # noqa: E402
from common import kernel_categories, kernel_events  # noqa: E402

from ostnet_fast import load_config  # noqa: E402
from ostnet_fast.train.losses import load_vgg19  # noqa: E402
from ostnet_fast.train.trainer import prepare_batch, resolve_amp  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="ostnet-vox-256")
    ap.add_argument("--mode", default="fused", help="a bench_train.py mode: reference, fused, fused+graphs, ...")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_train: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    config = load_config(args.config)
    size = config.model.image_size
    amp = resolve_amp(args.amp, device)
    step = build(args.mode, config, device, load_vgg19(random_weights=True).to(device), amp)
    g = torch.Generator().manual_seed(0)
    batch = {"source": torch.rand(args.batch_size, 3, size, size, generator=g),
             "driving": torch.rand(args.batch_size, 3, size, size, generator=g)}
    inputs = layout(prepare_batch(batch, g, config, device), args.mode)
    for _ in range(5):
        step(inputs)
    torch.cuda.synchronize()
    steps = 3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(inputs)
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = kernel_events(events)
    kernel_us = sum(e.self_device_time_total for e in kernels)
    print(f"{args.mode} ({amp}, batch {args.batch_size}): GPU kernel time {kernel_us / steps / 1000:.2f} ms/step, "
          f"CPU wall {prof.profiler.self_cpu_time_total / steps / 1000:.2f} ms/step (self CPU total)")
    print(f"{'kernel family':<28} {'ms/step':>8} {'share':>6} {'calls/step':>10}")
    for name, us, calls in kernel_categories(kernels):
        print(f"{name:<28} {us / steps / 1000:8.2f} {us / max(kernel_us, 1e-9):6.1%} {calls / steps:10.0f}")
    print(events.table(sort_by="self_device_time_total", row_limit=args.top, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
