"""Every CUDA kernel of one z-conv block forward + backward in launch order (torch.profiler, mean of 10 calls
by position), so launches of one kernel with different arguments (the main and border backward sums) show
apart. Batch 8, training, ours (eager fused) and the unfused eager block.

    PYTHONPATH=. python3 bench/results/h200-2026-12-01-s15/timeline.py [--cudnn-benchmark] [BLOCK ...]

BLOCK: mode,cin,cout,hw,dtype (default down,256,512,64,float32).
"""
import argparse
import importlib
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

zc = importlib.import_module("ostnet_fast.kernels.zconv")
DEV = "cuda"
ITERS = 10


def timeline(fn, label):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(ITERS):
            fn()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    per = len(ev) // ITERS
    if per * ITERS != len(ev):
        print(f"  ({len(ev)} kernels for {ITERS} calls: not the same every call)")
    dur = defaultdict(float)
    for i, e in enumerate(ev[:per * ITERS]):
        dur[i % per] += e.time_range.elapsed_us() / ITERS
    total = sum(dur.values())
    print(f"\n== {label}: {per} kernels, {total / 1000:.3f} ms summed kernel time per call")
    for i in range(per):
        print(f"  {i:3d} {dur[i]:8.1f} us  {ev[i].name[:110]}")


def block(mode, cin, cout, hw, dtype):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, 3, padding=1).to(DEV)
    norm = torch.nn.BatchNorm2d(cout).to(DEV).train()
    x = (torch.rand(8, cin, hw, hw, device=DEV) * 2 - 1).to(dtype).requires_grad_(True)
    zb = (torch.rand(8, cin, device=DEV) * 2 - 1).to(dtype).requires_grad_(True)

    def step(fn):
        def run():
            with torch.autocast("cuda", dtype=torch.float16, enabled=dtype == torch.float16):
                o = fn()
            torch.autograd.backward(o, torch.ones_like(o))
            x.grad = zb.grad = None
            conv.weight.grad = conv.bias.grad = norm.weight.grad = norm.bias.grad = None
        return run
    label = f"{mode} {cin}->{cout} @{hw} {str(dtype)[6:]} train fwd+bwd"
    timeline(step(lambda: zc.zconv_block(x, zb, conv, norm, mode, impl="triton")), f"ours {label}")
    timeline(step(lambda: zc.zconv_block_reference(x, zb, conv, norm, mode)), f"base {label}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--cudnn-benchmark", action="store_true")
    ap.add_argument("blocks", nargs="*", default=["down,256,512,64,float32"])
    a = ap.parse_args()
    torch.backends.cudnn.benchmark = a.cudnn_benchmark
    print(f"cudnn.benchmark = {a.cudnn_benchmark}")
    for spec in a.blocks:
        mode, cin, cout, hw, dt = spec.split(",")
        block(mode, int(cin), int(cout), int(hw), getattr(torch, dt))
