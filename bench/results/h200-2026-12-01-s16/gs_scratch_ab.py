"""A/B of the packed grid_sample path's input-grad scratch on one GPU, in one run: zero-filled by its own
fill before the backward (`fill`, as in session 15) or zeroed by the forward kernel (`forward zeroes`),
each against F.grid_sample forward + backward, CUDA-graph GPU time (bench.common.time_graph_ms), three
interleaved rounds; then each variant's kernels (torch.profiler, mean us per call).

    PYTHONPATH=$PWD python3 bench/results/h200-2026-12-01-s16/gs_scratch_ab.py [B C H W] [--prev OLD.cu]

--prev: also an older grid_sample_small_c.cu (e.g. `git show REV:csrc/ext/grid_sample_small_c.cu`), built
here as a module of its own, its `forward zeroes` path timed beside the current one (`prev`).
"""
import json
import os
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from common import time_graph_ms  # noqa: E402

from ostnet_fast.kernels import cuda_ext  # noqa: E402

args = sys.argv[1:]
prev_source = None
if "--prev" in args:
    i = args.index("--prev")
    prev_source = args[i + 1]
    del args[i:i + 2]
B, C, H, W = (int(v) for v in args[:4]) if len(args) > 3 else (8, 3, 256, 256)
torch.manual_seed(0)
x = torch.randn(B, C, H, W, device="cuda", requires_grad=True)
grid = (1.1 * (2 * torch.rand(B, H, W, 2, device="cuda") - 1)).requires_grad_(True)  # as bench_kernels
upstream = torch.randn(B, C, H, W, device="cuda")
ext = cuda_ext.module()


def fill():
    packed = ext.grid_sample_pack(x.detach())
    ext.grid_sample_packed_forward(packed, grid.detach(), C)
    ext.grid_sample_packed_backward(upstream, packed, grid.detach(), True, True)


def forward_zeroes(ext=ext):
    packed = ext.grid_sample_pack(x.detach())
    scratch = torch.empty_like(packed)
    ext.grid_sample_packed_forward(packed, grid.detach(), C, scratch)
    ext.grid_sample_packed_backward(upstream, packed, grid.detach(), True, True, scratch)


def pytorch():
    out = F.grid_sample(x, grid, align_corners=True)
    torch.autograd.grad(out, (x, grid), upstream)


variants = {"fill": fill, "forward zeroes": forward_zeroes, "F.grid_sample": pytorch}
if prev_source:
    from torch.utils.cpp_extension import load
    prev = load("_C_prev", [prev_source], extra_cuda_cflags=["-O3", "-lineinfo"])
    variants = {"prev": lambda: forward_zeroes(prev), **variants}
results = defaultdict(list)
for _ in range(3):
    for name, fn in variants.items():
        results[name].append(time_graph_ms(fn, iters=100)["median_ms"] * 1e3)
print(f"B{B} {C}x{H}x{W} fp32, random grid, forward + backward, GPU us (3 rounds):")
base = results["F.grid_sample"]
for name, us in results.items():
    print(f"  {name:16s}" + "".join(f" {u:7.2f}" for u in us) + "   ratio to F.grid_sample:"
          + "".join(f" {b / u:5.3f}x" for b, u in zip(base, us)))

kernels = {}
for name in [n for n in variants if n != "F.grid_sample"]:
    for _ in range(3):
        variants[name]()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            variants[name]()
        torch.cuda.synchronize()
    per = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name[:60]] += e.device_time / 20
    kernels[name] = dict(per)
    print(f"{name}: kernels, us per call")
    for k, v in sorted(per.items(), key=lambda kv: -kv[1]):
        print(f"  {v:7.2f}  {k}")
print(json.dumps({"shape": [B, C, H, W], "rounds_us": results, "kernels_us": kernels,
                  "device": torch.cuda.get_device_name(), "torch": torch.__version__}))
