"""Kernel benchmarks: each fused op vs its pure-PyTorch reference / PyTorch's own op, forward and
forward+backward, at the model's real shapes (batch 1 and 8, 256x256 images, 64x64 / 32x32 features).

    python bench/bench_kernels.py [--out DIR] [--quick] [--batches 1,8] [--ops grid_sample,...]

Rows: op | shape | dtype | mode | ours ms | baseline ms | speedup | GB/s (ours, bytes of inputs+outputs).
Two timings of each pair: eager (CUDA events around each call: includes the host's launch cost, which
dominates ops of a few microseconds) and GPU time (`*_gpu_ms`: the calls captured in a CUDA graph and
replayed, as the model's fused path and torch.compile reduce-overhead run them).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import out_dir, print_table, time_graph_ms, time_ms, write_json  # noqa: E402

# The kernels package re-exports each op under its module's name, so fetch the modules themselves.
dm, gs, kh, tg, tw, zc = (importlib.import_module(f"ostnet_fast.kernels.{m}")
                          for m in ("dense_motion", "grid_sample", "keypoint_head", "tps_grid", "tps_warp", "zconv"))
from ostnet_fast.kernels import cuda_ext  # noqa: E402
from ostnet_fast.model.scale_transform import fiducial_layout  # noqa: E402
from ostnet_fast.runtime.cuda_graph import root_cause  # noqa: E402

DEV = "cuda"


def rand(*shape, dtype=torch.float32, grad=False, channels_last=False):
    t = (torch.rand(*shape, device=DEV) * 2 - 1).to(dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts if torch.is_tensor(t))


def measure(fwd, inputs, mode, iters, graph=False):
    """fwd() -> tensor or tuple; mode 'fwd' or 'fwd+bwd' (one shared random upstream gradient).
    graph=True: GPU time from CUDA-graph replays (time_graph_ms), else eager per-call CUDA events."""
    timer = time_graph_ms if graph else time_ms
    if mode == "fwd":
        with torch.no_grad():
            return timer(fwd, iters=iters)
    out = fwd()
    outs = out if isinstance(out, tuple) else (out,)
    grads = [torch.randn_like(o) for o in outs]
    # Drop this eager graph before timing: alive, it keeps the leaves' AccumulateGrad nodes of the default
    # stream, and a CUDA-graph capture on a side stream then fails ("would make the legacy stream dependent").
    del out, outs

    def step():
        o = fwd()
        o = o if isinstance(o, tuple) else (o,)
        torch.autograd.backward(o, grads)
    return timer(step, iters=iters, grad_to_none=[t for t in inputs if torch.is_tensor(t) and t.requires_grad])


def smooth_grid(b, h, w):
    """Identity plus a displacement of about 3% of the image, varying over 8x8 cells."""
    identity = F.affine_grid(torch.eye(2, 3, device=DEV).expand(b, 2, 3), (b, 1, h, w), align_corners=True)
    bumps = F.interpolate(torch.randn(b, 2, 8, 8, device=DEV), size=(h, w), mode="bilinear", align_corners=True)
    return (identity + 0.03 * bumps.permute(0, 2, 3, 1)).contiguous()


def tps_case(b, size, dtype):
    target = fiducial_layout(20).float().to(DEV)
    coef = tg.tps_solve(target).float().to(DEV)
    ctrl = (target + 0.1 * torch.randn(b, 20, 2, device=DEV)).requires_grad_(True)
    return target, coef, ctrl


def cases(quick: bool, batches: tuple[int, ...] | None = None):
    """batches: None is (1, 8), or (8,) when quick."""
    if batches is None:
        batches = (8,) if quick else (1, 8)
    for b in batches:
        for dtype in (torch.float32, torch.float16):
            target, coef, ctrl = tps_case(b, 256, dtype)
            img = rand(b, 3, 256, 256, dtype=dtype, grad=True)
            A = tg.tps_grid_matrix(target, coef, (256, 256)).float()  # (HW, T): the best plain-PyTorch form
            yield dict(op="tps_grid", shape=f"B{b} 256x256 T20", dtype=dtype, inputs=[ctrl],
                       ours=lambda: tg.tps_grid(ctrl.to(dtype), target, coef, (256, 256), impl="triton"),
                       baseline=lambda: tg.tps_grid_reference(ctrl.to(dtype), target, coef, (256, 256)),
                       torch_best=lambda: (A.to(dtype) @ ctrl.to(dtype)).view(ctrl.shape[0], 256, 256, 2))
            # Both sides get the control points in the image's dtype, as the model's keypoints come.
            ctrl_d = ctrl.detach().to(dtype).requires_grad_(True)
            yield dict(op="tps_warp", shape=f"B{b} 3x256x256", dtype=dtype, inputs=[img, ctrl_d],
                       ours=lambda: tw.tps_warp(img, ctrl_d, target, coef, impl="triton"),
                       baseline=lambda: F.grid_sample(img, tg.tps_grid_reference(ctrl_d, target, coef, (256, 256)),
                                                      align_corners=True),
                       torch_best=lambda: F.grid_sample(img, (A.to(dtype) @ ctrl_d).view(ctrl.shape[0], 256, 256, 2),
                                                        align_corners=True))
            # grid_sample at the model's shapes: K+1 deformed sources, bottleneck features, channels-last.
            # Random grids (the worst case for gathers and atomics, kept so that sessions compare) and, last,
            # a smooth warp like the model's: identity plus a low-frequency displacement.
            for label, shape, cl in ((f"B{b}x16 3x64x64", (b * 16, 3, 64, 64), False),
                                     (f"B{b} 256x64x64", (b, 256, 64, 64), False),
                                     (f"B{b} 512x32x32 CL", (b, 512, 32, 32), True),
                                     (f"B{b} 3x256x256", (b, 3, 256, 256), False),
                                     (f"B{b} 3x256x256 smooth", (b, 3, 256, 256), False)):
                x = rand(*shape, dtype=dtype, grad=True, channels_last=cl)
                grid = smooth_grid(shape[0], *shape[2:]) if "smooth" in label else 1.1 * rand(shape[0], *shape[2:], 2)
                grid.requires_grad_(True)
                case = dict(op="grid_sample", shape=label, dtype=dtype, inputs=[x, grid],
                            ours=lambda x=x, grid=grid: gs.grid_sample(x, grid, impl="triton"),
                            baseline=lambda x=x, grid=grid: F.grid_sample(x, grid.to(x.dtype), align_corners=True))
                yield case
                if cuda_ext.grid_sample_applies(x, grid):  # ours ran the CUDA C++ extension: Triton alone too
                    yield dict(case, shape=f"{label} (Triton)", triton_only=True)
            # keypoint head: K = 15 heatmaps of 58x58 (the 7x7 valid conv on the 64x64 hourglass output).
            logits = rand(b, 15, 58, 58, dtype=dtype, grad=True)
            jmap = rand(b, 15, 4, 58, 58, dtype=dtype, grad=True)
            yield dict(op="keypoint_head", shape=f"B{b} K15 58x58", dtype=dtype, inputs=[logits, jmap],
                       ours=lambda logits=logits, jmap=jmap: kh.keypoint_head(logits, jmap, 0.1, impl="triton"),
                       baseline=lambda logits=logits, jmap=jmap: kh.keypoint_head_reference(logits, jmap, 0.1))
            # dense motion front end and combine, K = 15 at 64x64.
            k = 15
            src = rand(b, 3, 64, 64, dtype=dtype, grad=True)
            kps, kpd = (0.8 * rand(b, k, 2, dtype=dtype)).requires_grad_(True), (0.8 * rand(b, k, 2, dtype=dtype)).requires_grad_(True)
            jac = (torch.eye(2, device=DEV) + 0.1 * torch.randn(b, k, 2, 2, device=DEV)).to(dtype).requires_grad_(True)
            yield dict(op="dense_motion_front", shape=f"B{b} K15 3x64x64", dtype=dtype, inputs=[src, kps, kpd, jac],
                       ours=lambda: dm.dense_motion_front(src, kps, kpd, jac, 0.01, impl="triton"),
                       baseline=lambda: dm.dense_motion_front_reference(src, kps, kpd, jac, 0.01))
            for fshape in ((b, 256, 64, 64), (b, 512, 32, 32)):
                logits = rand(b, k + 1, 64, 64, dtype=dtype, grad=True)
                motions = (0.9 * rand(b, k + 1, 64, 64, 2, dtype=dtype)).requires_grad_(True)
                feat = rand(*fshape, dtype=dtype, grad=True)
                occ = torch.rand(b, 1, 64, 64, device=DEV, dtype=dtype).requires_grad_(True)
                yield dict(op="dense_motion_combine", shape=f"B{b} K15 feat {fshape[1]}x{fshape[2]}x{fshape[3]}",
                           dtype=dtype, inputs=[logits, motions, feat, occ],
                           ours=lambda logits=logits, motions=motions, feat=feat, occ=occ:
                               dm.dense_motion_combine(logits, motions, feat, occ, impl="triton"),
                           baseline=lambda logits=logits, motions=motions, feat=feat, occ=occ:
                               dm.dense_motion_combine_reference(logits, motions, feat, occ))
            # z-additive blocks of the generator (ostnet-vox-256): down 64->128 @256, 128->256 @128,
            # 256->512 @64; up 512->256 @32->64.
            for mode, cin, cout, hw in (("down", 64, 128, 256), ("down", 128, 256, 128), ("down", 256, 512, 64),
                                        ("up", 512, 256, 32), ("up", 128, 64, 128)):
                conv = torch.nn.Conv2d(cin, cout, 3, padding=1).to(DEV)
                norm = torch.nn.BatchNorm2d(cout).to(DEV)
                with torch.no_grad():
                    norm.running_mean.uniform_(-0.5, 0.5)
                    norm.running_var.uniform_(0.5, 2)
                x = rand(b, cin, hw, hw, dtype=dtype, grad=True)
                zb = rand(b, cin, dtype=dtype, grad=True)
                for training in (False, True):
                    def ours(x=x, zb=zb, conv=conv, norm=norm, mode=mode, training=training):
                        norm.train(training)
                        with torch.autocast("cuda", dtype=torch.float16, enabled=x.dtype == torch.float16):
                            return zc.zconv_block(x, zb, conv, norm, mode, impl="triton")

                    def base(x=x, zb=zb, conv=conv, norm=norm, mode=mode, training=training):
                        norm.train(training)
                        with torch.autocast("cuda", dtype=torch.float16, enabled=x.dtype == torch.float16):
                            return zc.zconv_block_reference(x, zb, conv, norm, mode)
                    yield dict(op="zconv_block", shape=f"B{b} {mode} {cin}->{cout} @{hw} {'train' if training else 'eval'}",
                               dtype=dtype, inputs=[x, zb], ours=ours, baseline=base,
                               modes=("fwd", "fwd+bwd") if training else ("fwd",))


OPS = ("dense_motion_front", "dense_motion_combine", "grid_sample", "keypoint_head", "tps_grid", "tps_warp",
       "zconv_block")  # the `op` names cases() yields


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for kernels.json (default: $OUT or bench/results)")
    ap.add_argument("--quick", action="store_true", help="fewer iterations, and batch 8 only unless --batches")
    ap.add_argument("--batches", default="", help="comma-separated batch sizes (default 1,8; 8 with --quick)")
    ap.add_argument("--ops", default="", help=f"comma-separated subset of {', '.join(OPS)}")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph (GPU-time) columns")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="let cuDNN time its algorithms for each shape (torch.backends.cudnn.benchmark), both sides; "
                         "bench_model.py always does")
    args = ap.parse_args(argv)
    unknown = set(filter(None, args.ops.split(","))) - set(OPS)
    if unknown:  # a misspelt name would otherwise measure nothing, silently
        ap.error(f"--ops: unknown {sorted(unknown)}; known: {', '.join(OPS)}")
    try:
        batches = tuple(int(b) for b in args.batches.split(",") if b) or None
    except ValueError:
        ap.error(f"--batches: comma-separated integers expected, got {args.batches!r}")
    if batches and min(batches) < 1:
        ap.error(f"--batches: sizes of 1 or more, got {args.batches!r}")
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(0)
    iters = 20 if args.quick else 50
    wanted = set(filter(None, args.ops.split(",")))
    rows = []
    for case in cases(args.quick, batches):
        if wanted and case["op"] not in wanted:
            continue
        for mode in case.get("modes", ("fwd", "fwd+bwd")):
            row = {"op": case["op"], "shape": case["shape"], "dtype": str(case["dtype"]).replace("torch.", ""), "mode": mode}
            # rows marked triton_only time our side with the CUDA C++ extension turned off (forward and backward)
            ext_off = cuda_ext.turned_off if case.get("triton_only") else contextlib.nullcontext
            try:
                with ext_off():
                    ours = measure(case["ours"], case["inputs"], mode, iters)
                base = measure(case["baseline"], case["inputs"], mode, iters)
                row.update(ours_ms=ours["median_ms"], baseline_ms=base["median_ms"],
                           speedup=base["median_ms"] / ours["median_ms"])
                if "torch_best" in case:
                    best = measure(case["torch_best"], case["inputs"], mode, iters)
                    row.update(torch_best_ms=best["median_ms"], speedup_vs_best=best["median_ms"] / ours["median_ms"])
                if not args.no_graph:  # the same pair as GPU time, the host's launch cost taken out
                    side = "ours"
                    try:
                        with ext_off():
                            ours_g = measure(case["ours"], case["inputs"], mode, iters, graph=True)
                        side = "baseline"
                        base_g = measure(case["baseline"], case["inputs"], mode, iters, graph=True)
                        row.update(ours_gpu_ms=ours_g["median_ms"], baseline_gpu_ms=base_g["median_ms"],
                                   speedup_gpu=base_g["median_ms"] / ours_g["median_ms"])
                    except Exception as e:  # which side could not be captured, and the op that broke it
                        row["graph_error"] = f"{side}: {root_cause(e)}"[:200]
                with torch.no_grad():
                    out = case["ours"]()
                moved = nbytes(*case["inputs"], *(out if isinstance(out, tuple) else (out,)))
                row["GB/s"] = moved / (ours["median_ms"] * 1e-3) / 1e9 if mode == "fwd" else None
            except Exception as e:  # a kernel that fails is a row with its error, not a crashed run
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    print_table(rows, ["op", "shape", "dtype", "mode", "ours_ms", "baseline_ms", "speedup", "torch_best_ms",
                       "ours_gpu_ms", "baseline_gpu_ms", "speedup_gpu", "GB/s", "error"])
    write_json(out_dir(args.out), "kernels", rows,
               cudnn_benchmark=args.cudnn_benchmark, baseline="pure-PyTorch reference (F.grid_sample / F.conv2d + add + BN + ReLU + pool); torch_best = constant-matrix TPS + F.grid_sample")
    return 0


if __name__ == "__main__":
    sys.exit(main())
