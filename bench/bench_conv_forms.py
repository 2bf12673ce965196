"""Other ways to compute the frame's slow convolutions, timed against cuDNN at the model's shapes.

`profile_model.py --shapes` lists where a frame's convolution time goes; this times candidate rewrites of
those convolutions, fp16 autocast, channels-last, GPU time of CUDA-graph replays (`time_graph_ms`):
- the anti-alias blur (13x13 depthwise, stride 4, 3x256x256): F.pad + conv (FOMM), the conv's own padding,
  two matmuls with the separable 1-D Gaussian, a dense block-diagonal conv;
- the 7x7 heads (keypoints + Jacobians from 35 channels, mask + occlusion from 128): apart, stacked per
  call (`model.blocks.conv_heads`), stacked once;
- 3x3 convolutions on small maps: cuDNN against im2col + one matmul (eager, and compiled at batch 1).
Inputs are random; only the times mean something.

    python bench/bench_conv_forms.py [--out DIR] [--batches 1,8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import out_dir, print_table, time_graph_ms, write_json  # noqa: E402

DEV = "cuda"


def cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def rand(*shape) -> torch.Tensor:
    return cl(torch.rand(*shape, device=DEV)).half() if len(shape) == 4 else torch.rand(*shape, device=DEV).half()


def cases(b: int):
    """(group, form, fn) at batch b."""
    x = rand(b, 3, 256, 256)
    w = rand(3, 1, 13, 13)
    yield "anti-alias 3x256x256", "F.pad + conv (FOMM)", lambda: F.conv2d(F.pad(x, (6, 6, 6, 6)), w, groups=3, stride=4)
    yield "anti-alias 3x256x256", "conv, its own padding", lambda: F.conv2d(x, w, groups=3, stride=4, padding=6)
    g = rand(64, 256)

    def separable():  # contract H, then W, on the (B, H, W, C) view of channels-last memory
        y = torch.matmul(g, x.permute(0, 2, 3, 1))  # (B, H, 64, C)
        return torch.matmul(g, y.reshape(b, 256, 64 * 3)).view(b, 64, 64, 3).permute(0, 3, 1, 2)
    yield "anti-alias 3x256x256", "two matmuls (separable)", separable
    dense = rand(3, 3, 13, 13)
    yield "anti-alias 3x256x256", "dense block-diagonal conv", lambda: F.conv2d(x, dense, stride=4, padding=6)

    f = rand(b, 35, 64, 64)
    wk, wj, bk, bj = rand(15, 35, 7, 7), rand(60, 35, 7, 7), rand(15), rand(60)
    yield "kp + Jacobian heads 35->15+60 @64", "apart", lambda: (F.conv2d(f, wk, bk), F.conv2d(f, wj, bj))
    yield "kp + Jacobian heads 35->15+60 @64", "stacked per call", \
        lambda: F.conv2d(f, torch.cat([wk, wj]), torch.cat([bk, bj]))
    wkj, bkj = cl(torch.cat([wk, wj])), torch.cat([bk, bj])
    yield "kp + Jacobian heads 35->15+60 @64", "stacked once", lambda: F.conv2d(f, wkj, bkj)
    m = rand(b, 128, 64, 64)
    wm, wo = rand(16, 128, 7, 7), rand(1, 128, 7, 7)
    yield "mask + occlusion heads 128->16+1 @64", "apart", \
        lambda: (F.conv2d(m, wm, padding=3), F.conv2d(m, wo, padding=3))
    yield "mask + occlusion heads 128->16+1 @64", "stacked per call", \
        lambda: F.conv2d(m, torch.cat([wm, wo]), padding=3)

    for cin, cout, s in ((1024, 1024, 4), (1024, 512, 4), (1024, 256, 8), (2048, 512, 8), (512, 512, 32)):
        xs, ws = rand(b, cin, s, s), rand(cout, cin, 3, 3)
        group = f"3x3 conv {cin}->{cout} @{s}"
        yield group, "cuDNN", lambda xs=xs, ws=ws: F.conv2d(xs, ws, padding=1)
        w2 = ws.permute(0, 2, 3, 1).reshape(cout, 9 * cin)  # (C_out, ky kx C_in)

        def im2col(xs=xs, w2=w2, s=s, cin=cin, cout=cout):
            xp = F.pad(xs.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (B, s+2, s+2, C_in)
            cols = torch.stack([xp[:, ky:ky + s, kx:kx + s] for ky in range(3) for kx in range(3)], dim=3)
            return (cols.reshape(b * s * s, 9 * cin) @ w2.t()).view(b, s, s, cout).permute(0, 3, 1, 2)
        yield group, "im2col + matmul", im2col
        if b == 1 and s == 4:
            yield group, "im2col + matmul, compiled", torch.compile(im2col)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for conv_forms.json (default bench/results/)")
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_conv_forms: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    rows = []
    for b in map(int, args.batches.split(",")):
        for group, form, fn in cases(b):
            with torch.no_grad():
                fn()  # compiles / autotunes before the capture
                t = time_graph_ms(fn, iters=30)
            rows.append(dict(batch=b, convolution=group, form=form, gpu_us=t["median_ms"] * 1000))
            print(rows[-1], flush=True)
    print_table(rows, ["batch", "convolution", "form", "gpu_us"])
    write_json(out_dir(args.out), "conv_forms", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
