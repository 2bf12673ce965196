"""Whole-model benchmark: one reenactment frame with the source cached (OSTNet.animate), batch 1 and 8,
fp32 and fp16 (autocast; our fp16 variants keep fp16 conv weights, as the fused backend does): reference
eager vs torch.compile of the reference (default and reduce-overhead = CUDA graphs) vs fused kernels vs
fused + CUDA graphs (also inside torch.compile, the kernels as custom ops). ms/frame, FPS, peak memory,
ratios to reference eager and to the best torch.compile, and fused-vs-reference output difference.

    python bench/bench_model.py [--out DIR] [--config ostnet-vox-256] [--quick] [--no-compile]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import out_dir, peak_memory_mib, print_table, time_ms, write_json  # noqa: E402

from ostnet_fast import OSTNet  # noqa: E402
from ostnet_fast.runtime.cuda_graph import GraphedStep  # noqa: E402


def make_step(model, state, dtype):
    def step(driving):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=dtype == torch.float16):
            return model.animate(state, driving)["prediction"]
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--config", default="ostnet-vox-256")
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--compile-modes", default="default,reduce-overhead",
                    help="torch.compile modes timed as baselines (comma list)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtypes", default="float16,float32")
    ap.add_argument("--channels-last", action="store_true",
                    help="also time the fused model in channels-last memory format (weights, inputs, cached source)")
    ap.add_argument("--variants", default="", help="comma-separated subset, e.g. 'reference eager,fused + CUDA graphs'")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_model: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    iters = 20 if args.quick else 50
    torch.manual_seed(0)
    ref = OSTNet(args.config).cuda().eval()

    def fused_model():  # the reference's weights, fused kernels
        model = OSTNet(args.config, fused=True).cuda().eval()
        model.load_state_dict(ref.state_dict())
        return model
    fused = fused_model()
    fused_cl = fused_model().to(memory_format=torch.channels_last) if args.channels_last else None
    ref_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last) if args.channels_last else None
    size = ref.config.image_size
    source = torch.rand(1, 3, size, size, device="cuda")
    rows = []
    wanted = set(filter(None, args.variants.split(",")))
    run_fused = not wanted or any(w.startswith("fused") and "channels-last" not in w for w in wanted)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        # Our fp16 frame keeps its convolutions in fp16, as Reenactor's fused backend does
        # (OSTNet.cast_conv_weights); the plain reference baselines keep fp32 weights under autocast.
        for m in filter(None, (fused, fused_cl, ref_cl)):
            m.cast_conv_weights(torch.float32).load_state_dict(ref.state_dict())
            if dtype == torch.float16:
                m.cast_conv_weights(torch.float16)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=dtype == torch.float16):
            ref_state = ref.encode_source(source)
            fused_state = fused.encode_source(source) if run_fused else None
            cl_state = fused_cl.encode_source(cl(source)) if fused_cl is not None else None
            ref_cl_state = ref_cl.encode_source(cl(source)) if ref_cl is not None else None
        for b in map(int, args.batches.split(",")):
            driving = torch.rand(b, 3, size, size, device="cuda")
            variants = {"reference eager": make_step(ref, ref_state, dtype)}
            if not args.no_compile:
                for mode in filter(None, args.compile_modes.split(",")):
                    name = "reference compile" + ("" if mode == "default" else f" {mode}")
                    variants[name] = ("compile", mode)
            variants["fused eager"] = make_step(fused, fused_state, dtype)
            variants["fused + CUDA graphs"] = ("graph", fused, fused_state)
            # The fused kernels as custom ops inside torch.compile: inductor compiles the code between them.
            variants["fused compile + CUDA graphs"] = ("graph", fused, fused_state, "compile")
            if fused_cl is not None:
                variants["fused channels-last"] = make_step(fused_cl, cl_state, dtype)
                variants["fused channels-last + CUDA graphs"] = ("graph", fused_cl, cl_state)
                variants["fused channels-last compile + CUDA graphs"] = ("graph", fused_cl, cl_state, "compile")
                # The same without our kernels: inductor's code everywhere, in our CUDA graph (fp16 weights too).
                variants["reference channels-last compile + CUDA graphs"] = ("graph", ref_cl, ref_cl_state, "compile")
                # Inductor autotuning its own conv/matmul templates against cuDNN/cuBLAS (minutes of
                # compiling): only when named in --variants.
                variants["fused channels-last compile max-autotune + CUDA graphs"] = (
                    "graph", fused_cl, cl_state, "max-autotune-no-cudagraphs")
                # An A/B of kernels/conv2d.py in one run: every convolution on cuDNN as called (no split-K
                # kernel, no channel padding, the blur as a grouped conv); only when named in --variants.
                variants["fused channels-last compile + CUDA graphs (cuDNN convs)"] = (
                    "graph", fused_cl, cl_state, "compile", {"OSTNET_REFERENCE_OPS": "conv2d"})
            variants = {k: v for k, v in variants.items()
                        if (not wanted and "max-autotune" not in k and "cuDNN convs" not in k) or k in wanted
                        or k == "reference eager"}
            base_ms = None
            best_compile_ms = None
            ref_out = variants["reference eager"](driving).float().clone()
            for name, fn in variants.items():
                row = {"variant": name, "batch": b, "dtype": dtype_name}
                try:
                    t0 = time.perf_counter()
                    if isinstance(fn, tuple) and fn[0] == "graph":
                        x = cl(driving) if fn[1] in (fused_cl, ref_cl) else driving
                        step = make_step(fn[1], fn[2], dtype)
                        env = fn[4] if len(fn) > 4 else {}
                        saved = {k: os.environ.get(k) for k in env}
                        os.environ.update(env)  # read while tracing and capturing (the dispatch's env switches)
                        try:
                            if fn[3:]:  # "compile" (default mode) or a torch.compile mode
                                torch._dynamo.reset()
                                step = torch.compile(step, mode=None if fn[3] == "compile" else fn[3])
                                step(x)  # compiles before the capture
                            graphed = GraphedStep(step, (x,))
                        finally:
                            for k, v in saved.items():
                                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
                        fn = lambda d, g=graphed: g(d)  # copied into the graph's (channels-last) input buffer
                    elif isinstance(fn, tuple):
                        torch._dynamo.reset()
                        fn = torch.compile(make_step(ref, ref_state, dtype), mode=fn[1])
                        fn(driving)
                        fn(driving)
                    row["setup_s"] = time.perf_counter() - t0
                    out = fn(driving).float()
                    row["max_abs_vs_reference"] = (out - ref_out).abs().max().item()
                    t = time_ms(lambda: fn(driving), iters=iters)
                    row.update(ms_per_batch=t["median_ms"], ms_per_frame=t["median_ms"] / b,
                               fps=1000 * b / t["median_ms"], peak_mib=peak_memory_mib(lambda: fn(driving)))
                    if name == "reference eager":
                        base_ms = t["median_ms"]
                    if name.startswith("reference compile"):
                        best_compile_ms = min(best_compile_ms or t["median_ms"], t["median_ms"])
                    row["speedup_vs_eager"] = base_ms / t["median_ms"] if base_ms else None
                    row["speedup_vs_best_compile"] = best_compile_ms / t["median_ms"] if best_compile_ms else None
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:400]
                rows.append(row)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                # Written after every row: a run cut short by a time limit keeps what it measured.
                write_json(out_dir(args.out), "model", rows, config=args.config, partial=True)
    print_table(rows, ["variant", "batch", "dtype", "ms_per_frame", "fps", "peak_mib", "speedup_vs_eager",
                       "speedup_vs_best_compile", "max_abs_vs_reference", "error"])
    write_json(out_dir(args.out), "model", rows, config=args.config,
               note="one frame = OSTNet.animate with the source cached; random weights and inputs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
