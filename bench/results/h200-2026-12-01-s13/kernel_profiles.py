"""Where the time goes, kernel by kernel (torch.profiler, CUDA kernels of one call, mean of 10):
- grid_sample forward + backward on 3-channel fp32 images, batch 8 (CUDA extension, Triton, PyTorch), random
  and smooth grids;
- the z-conv blocks that miss 1.5x in training: one forward + backward, ours (eager fused) and the unfused
  eager block, batch 8; and the up block's convolution alone in its two forms (3x3 on the upsampled map,
  2x2 sub-pixel on the small one).

    PYTHONPATH=. python3 bench/results/h200-2026-12-01-s13/kernel_profiles.py [grid_sample] [zconv] > kernel_profiles.txt
"""
import importlib
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from ostnet_fast.kernels import cuda_ext  # noqa: E402

zc = importlib.import_module("ostnet_fast.kernels.zconv")
gs = importlib.import_module("ostnet_fast.kernels.grid_sample")
c2 = importlib.import_module("ostnet_fast.kernels.conv2d")
DEV = "cuda"
ITERS = 10


def kernels(fn, label):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(ITERS):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events) / ITERS
    print(f"\n== {label}: {total / 1000:.3f} ms GPU per call")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]:
        print(f"  {e.self_device_time_total / ITERS:8.1f} us  x{e.count // ITERS:<3d} {e.key[:110]}")


def block(mode, cin, cout, hw, dtype):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, 3, padding=1).to(DEV)
    norm = torch.nn.BatchNorm2d(cout).to(DEV).train()
    x = (torch.rand(8, cin, hw, hw, device=DEV) * 2 - 1).to(dtype).requires_grad_(True)
    zb = (torch.rand(8, cin, device=DEV) * 2 - 1).to(dtype).requires_grad_(True)
    out = torch.empty(0)

    def step(fn):
        def run():
            with torch.autocast("cuda", dtype=torch.float16, enabled=dtype == torch.float16):
                o = fn()
            g = torch.ones_like(o)
            torch.autograd.backward(o, g)
            x.grad = zb.grad = None
            conv.weight.grad = conv.bias.grad = norm.weight.grad = norm.bias.grad = None
        return run
    label = f"{mode} {cin}->{cout} @{hw} {str(dtype)[6:]} train fwd+bwd"
    kernels(step(lambda: zc.zconv_block(x, zb, conv, norm, mode, impl="triton")), f"ours  {label}")
    kernels(step(lambda: zc.zconv_block_reference(x, zb, conv, norm, mode)), f"base  {label}")
    del out
    if mode == "up":
        w = conv.weight.detach().to(dtype).requires_grad_(True)
        xs = x.detach().requires_grad_(True)
        kernels(step(lambda: F.conv2d(F.interpolate(xs, scale_factor=2), w, None, padding=1)),
                f"conv 3x3 on the upsampled map {label}")
        kernels(step(lambda: c2.subpixel_conv3x3(xs, w)), f"conv 2x2 sub-pixel on the small map {label}")


def grid_sample(shape, smooth):
    torch.manual_seed(0)
    b, _, h, w = shape
    x = (torch.rand(shape, device=DEV) * 2 - 1).requires_grad_(True)
    if smooth:
        eye = torch.eye(2, 3, device=DEV).expand(b, 2, 3)
        bumps = F.interpolate(torch.randn(b, 2, 8, 8, device=DEV), size=(h, w), mode="bilinear", align_corners=True)
        grid = F.affine_grid(eye, (b, 1, h, w), align_corners=True) + 0.03 * bumps.permute(0, 2, 3, 1)
    else:
        grid = 1.1 * (torch.rand(b, h, w, 2, device=DEV) * 2 - 1)
    grid = grid.contiguous().requires_grad_(True)
    g = torch.randn(shape, device=DEV)

    def run(fn):
        def step():
            torch.autograd.backward(fn(), g)
            x.grad = grid.grad = None
        return step
    label = f"grid_sample {tuple(shape)} {'smooth' if smooth else 'random'} fp32 fwd+bwd"
    kernels(run(lambda: gs.grid_sample(x, grid, impl="triton")), f"CUDA ext  {label}")
    with cuda_ext.turned_off():
        kernels(run(lambda: gs.grid_sample(x, grid, impl="triton")), f"Triton    {label}")
    kernels(run(lambda: F.grid_sample(x, grid, align_corners=True)), f"PyTorch   {label}")


sections = sys.argv[1:] or ["grid_sample", "zconv"]
if "grid_sample" in sections:
    for shape in ((8, 3, 256, 256), (128, 3, 64, 64)):
        for smooth in (False, True):
            grid_sample(shape, smooth)
if "zconv" in sections:
    for dtype in (torch.float32, torch.float16):
        block("up", 512, 256, 32, dtype)
        block("down", 256, 512, 64, dtype)
