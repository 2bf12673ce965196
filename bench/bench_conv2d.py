"""The split-K implicit-GEMM convolution (ostnet_fast/kernels/conv2d.py) against cuDNN at the frame's shapes.

For each convolution of one OSTNet frame with maps up to 64x64 (batch 1 and 8, fp16, channels-last, with
bias), times cuDNN (F.conv2d) and the kernel over a sweep of tile shapes and split counts, and reports the
best. GPU time of CUDA-graph replays; every replay cycles through `--copies` weight tensors (more bytes than
the L2 cache holds), since in a frame each convolution's weights come from HBM, not from the previous call.
`kernel` is the kernel alone (with splits > 1 it leaves fp32 partials, whose sum inductor can fuse into the
batch norm that follows); `eager` is the kernel as it runs outside torch.compile when forced (impl="triton"):
kernel + a separate sum launch (+ bias, cast); "auto" takes cuDNN there. `plan` is what the compiled model
would take for that shape (conv2d.plan), timed the same way as `eager`.

    python bench/bench_conv2d.py [--out DIR] [--batches 1,8] [--quick | --plan-only]
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import out_dir, print_table, time_graph_ms, write_json  # noqa: E402

kc = importlib.import_module("ostnet_fast.kernels.conv2d")  # the module (the package exports the function)

# (C_in, map size, C_out, kernel, padding) of every convolution in a batch-1 frame with maps <= 64x64
# (bench/profile_model.py --shapes), and how many times a frame runs it.
SHAPES = [
    (512, 32, 512, 3, 1, 12), (1024, 4, 1024, 3, 1, 2), (1024, 8, 256, 3, 1, 2), (1024, 4, 512, 3, 1, 2),
    (2048, 8, 512, 3, 1, 1), (512, 32, 128, 3, 1, 1), (512, 4, 1024, 3, 1, 2), (512, 16, 128, 3, 1, 2),
    (512, 64, 256, 3, 1, 1), (256, 64, 512, 3, 1, 1), (1024, 16, 256, 3, 1, 1), (256, 8, 512, 3, 1, 2),
    (256, 32, 64, 3, 1, 2), (64, 32, 128, 3, 1, 2), (128, 16, 256, 3, 1, 2), (128, 64, 32, 3, 1, 2),
    (512, 8, 1024, 3, 1, 1), (256, 64, 64, 3, 1, 1), (3, 64, 64, 3, 1, 2), (256, 16, 512, 3, 1, 1),
    (128, 32, 256, 3, 1, 1), (64, 64, 128, 3, 1, 1),
    (35, 64, 75, 7, 0, 1),  # keypoint + Jacobian heads, stacked (model.blocks.conv_heads)
    (128, 64, 17, 7, 3, 1),  # mask + occlusion heads, stacked
]
TILES = [(16, 64, 64, 4), (16, 128, 64, 4), (16, 64, 128, 4), (32, 64, 64, 4), (32, 128, 64, 4), (64, 64, 64, 4),
         (64, 128, 64, 4), (64, 128, 32, 4), (128, 64, 64, 4), (128, 128, 64, 8), (64, 256, 64, 8),
         (128, 128, 32, 8)]
SPLITS = (1, 2, 4, 8, 16, 32)
SMS = 132


def candidates(m: int, cout: int, cin: int, k: int, quick: bool):
    steps_per_tap = {bk: -(-cin // bk) for bk in (32, 64, 128)}
    for bm, bn, bk, warps in TILES:
        if bm > max(16, kc.tu.next_pow2(m)) or bn > max(32, 2 * kc.tu.next_pow2(cout)):
            continue
        base = -(-m // bm) * -(-cout // bn)
        for splits in SPLITS:
            if splits > 1 and (k * k * steps_per_tap[bk] < 2 * splits or base >= 2 * SMS):
                continue
            for stages in ((3,) if quick else (3, 4)):
                yield kc.Tiles(bm, bn, bk, splits, warps, stages)


def run(batches, copies: int, quick: bool, plan_only: bool):
    rows = []
    for (cin, size, cout, k, pad, per_frame), b in itertools.product(SHAPES, batches):
        x = torch.randn(b, cin, size, size, device="cuda").half().contiguous(memory_format=torch.channels_last)
        weights = [torch.randn(cout, cin, k, k, device="cuda").half().contiguous(memory_format=torch.channels_last)
                   for _ in range(copies)]
        bias = torch.randn(cout, device="cuda").half()
        ws = itertools.cycle(weights)
        ref = F.conv2d(x, weights[0], bias, padding=pad).float()
        cudnn = time_graph_ms(lambda: F.conv2d(x, next(ws), bias, padding=pad), reps=copies, iters=20)["median_ms"]
        m = b * (size + 2 * pad - k + 1) ** 2
        planned = kc.plan(x, weights[0], (pad, pad))
        timed = []
        sweep = ([planned] if planned else []) if plan_only else candidates(m, cout, cin, k, quick)
        for tiles in sweep:
            try:
                out = kc.conv2d(x, weights[0], bias, (pad, pad), impl="triton", tiles=tiles)
                err = (out.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
                if err > 1e-2:
                    raise AssertionError(f"{tiles}: relative error {err:.2e}")
                t = time_graph_ms(lambda: kc.conv2d_partials(x, next(ws), None, (pad, pad), tiles), reps=copies,
                                  iters=20)["median_ms"]
            except Exception as e:  # noqa: BLE001 - a tile shape that does not fit (shared memory) is skipped
                if isinstance(e, AssertionError):
                    raise
                print(f"  skip {tiles}: {type(e).__name__}: {str(e)[:80]}", flush=True)
                continue
            timed.append((t, tiles))
        timed.sort()
        if not timed:
            rows.append(dict(shape=f"{cin}->{cout} k{k}p{pad} @{size}", batch=b, per_frame=per_frame,
                             cudnn_us=round(cudnn * 1e3, 2), plan="cuDNN"))
            continue
        best_t, best = timed[0]
        eager = time_graph_ms(lambda: kc.conv2d(x, next(ws), bias, (pad, pad), impl="triton", tiles=best),
                              reps=copies, iters=20)["median_ms"]
        plan_t = (time_graph_ms(lambda: kc.conv2d(x, next(ws), bias, (pad, pad), impl="triton", tiles=planned),
                                reps=copies, iters=20)["median_ms"] if planned is not None else None)
        row = dict(shape=f"{cin}->{cout} k{k}p{pad} @{size}", batch=b, per_frame=per_frame,
                   cudnn_us=round(cudnn * 1e3, 2), kernel_us=round(best_t * 1e3, 2),
                   kernel_ratio=round(cudnn / best_t, 2), eager_us=round(eager * 1e3, 2),
                   tiles="/".join(map(str, best)), plan=("/".join(map(str, planned)) if planned else "cuDNN"),
                   plan_us=(round(plan_t * 1e3, 2) if plan_t is not None else None),
                   top=[("/".join(map(str, tl_)), round(t * 1e3, 2)) for t, tl_ in timed[:5]])
        print(row, flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="folder for conv2d.json (default bench/results/)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--copies", type=int, default=10, help="weight tensors cycled through (defeat the L2 cache)")
    p.add_argument("--quick", action="store_true", help="pipeline depth 3 only (half the sweep)")
    p.add_argument("--plan-only", action="store_true", help="no sweep: cuDNN against the tiles conv2d.plan picks")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_conv2d: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    rows = run([int(b) for b in args.batches.split(",")], args.copies, args.quick, args.plan_only)
    cols = ["shape", "batch", "per_frame", "cudnn_us", "kernel_us", "kernel_ratio", "eager_us", "tiles", "plan",
            "plan_us"]
    print_table(rows, cols)
    for b in sorted({r["batch"] for r in rows}):
        sel = [r for r in rows if r["batch"] == b]
        gain = sum(r["per_frame"] * max(r["cudnn_us"] - r["kernel_us"], 0) for r in sel if "kernel_us" in r)
        planned = sum(r["per_frame"] * (r["cudnn_us"] - r["plan_us"]) for r in sel if r.get("plan_us") is not None)
        print(f"batch {b}: against cuDNN, the best tiles save up to {gain:.1f} us a frame, plan's tiles "
              f"{planned:.1f} us (kernel + a separate sum launch, as eagerly; compiled, inductor can fuse the "
              "sum into the next kernel)")
    write_json(out_dir(args.out), "conv2d", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
