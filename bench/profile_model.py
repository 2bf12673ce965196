"""Where a reenactment frame spends its GPU time: torch.profiler over OSTNet.animate (source cached),
grouped by module stage and by kernel. Use it before optimising anything.

    python bench/profile_model.py [--fused] [--batch 1] [--fp16] [--top 25]
    python bench/profile_model.py --fused --fp16 --channels-last --graph --compile   # the fastest frame
    python bench/profile_model.py --fp16 --channels-last --graph --compile           # ~ reduce-overhead compile

The first line of the output is the GPU kernel time per frame batch; the kernel-family table follows (the
GPU-kernel sum excludes the gaps between kernels, which a CUDA-graph replay still has).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import kernel_categories, kernel_events  # noqa: E402

from ostnet_fast import OSTNet  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="ostnet-vox-256")
    ap.add_argument("--fused", action="store_true")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--channels-last", action="store_true", help="model, source and driving in channels-last")
    ap.add_argument("--graph", action="store_true", help="profile CUDA-graph replays of the step (GPU kernels only)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile (default mode) the step first, as Reenactor(compile=True) does")
    ap.add_argument("--timeline", action="store_true",
                    help="also list one step's GPU kernels in launch order, start (us) and time, full names")
    ap.add_argument("--shapes", action="store_true",
                    help="also list the convolutions by input shape (not with --graph: replays record no shapes)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_model: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    model = OSTNet(args.config, fused=args.fused).cuda().eval()
    if args.fused and args.fp16:  # as Reenactor's fused fp16 backend: no per-frame weight casts
        model.cast_conv_weights(torch.float16)
    size = model.config.image_size
    src = torch.rand(1, 3, size, size, device="cuda")
    drv = torch.rand(args.batch, 3, size, size, device="cuda")
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        src, drv = (t.contiguous(memory_format=torch.channels_last) for t in (src, drv))
    stages = {"kp_detector": model.kp_detector, "dense_motion": model.generator.dense_motion_network,
              "scale_transform": model.scale_transform}
    hooks = []
    for name, mod in ({} if args.compile else stages).items():  # ranges inside a compiled graph would break it
        hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: m.__dict__.setdefault("_rf", []).append(
            record_function(f"stage::{n}").__enter__())))
        hooks.append(mod.register_forward_hook(lambda m, a, o: m.__dict__["_rf"].pop().__exit__(None, None, None)))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=args.fp16):
        state = model.encode_source(src)
        frame = lambda d: model.animate(state, d)["prediction"]
        if args.compile:
            frame = torch.compile(frame)
            frame(drv)  # compiles before any capture
        step = lambda: frame(drv)
        if args.graph:
            from ostnet_fast.runtime.cuda_graph import GraphedStep
            graphed = GraphedStep(frame, (drv,))
            step = lambda: graphed(drv)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=args.shapes) as prof:
            for _ in range(10):
                with record_function("frame"):
                    step()
            torch.cuda.synchronize()
        if args.timeline:
            with profile(activities=[ProfilerActivity.CUDA]) as one:
                step()
                torch.cuda.synchronize()
    for h in hooks:
        h.remove()
    events = prof.key_averages()
    gpu = kernel_events(events)
    kernels = sum(e.device_time_total for e in gpu)
    launches = sum(e.count for e in gpu)
    print(f"GPU kernel time per frame-batch: {kernels / 10 / 1000:.3f} ms over {launches / 10:.0f} kernels")
    print(f"{'kernel family':<28} {'ms/frame':>8} {'share':>6} {'calls/frame':>11}")
    for name, us, calls in kernel_categories(gpu):
        print(f"{name:<28} {us / 10 / 1000:8.3f} {us / max(kernels, 1e-9):6.1%} {calls / 10:11.0f}")
    for e in events:
        if e.key.startswith("stage::"):
            print(f"{e.key:32s} {e.device_time_total / e.count / 1000:8.3f} ms GPU/call  x{e.count // 10}/frame")
    print(events.table(sort_by="device_time_total", row_limit=args.top, max_name_column_width=70))
    if args.timeline:
        gpu_events = sorted((e for e in one.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                            key=lambda e: e.time_range.start)
        t0 = gpu_events[0].time_range.start if gpu_events else 0
        print("one step's kernels in order: start us, GPU us, name")
        for e in gpu_events:
            print(f"{e.time_range.start - t0:9.1f} {e.time_range.elapsed_us():7.2f}  {e.name[:200]}")
    if args.shapes:
        convs = [e for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::cudnn_convolution"]
        print("convolutions by shape: GPU us a call, calls a frame, [input, weight] shapes")
        for e in sorted(convs, key=lambda e: -e.device_time_total):
            print(f"{e.device_time_total / e.count:8.1f} us x{e.count / 10:4.1f}  {e.input_shapes[:2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
