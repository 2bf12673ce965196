"""Training-step benchmark: fused vs reference eager vs reference + torch.compile, with and without CUDA graphs.

One step = forward (OSTNet + VGG-19 perceptual loss at every pyramid scale on I_out and I_Dh +
equivariance + keypoint distance) + backward + Adam, under AMP (bf16 where the GPU has it, else fp16
with a GradScaler), batch 8 at 256x256 by default. VGG weights are random (same cost as ImageNet's).

    python bench/bench_train.py [--quick] [--out DIR]          # GPU; JSON in DIR (default $OUT or bench/results)
    python bench/bench_train.py --device cpu --config tests/configs/tiny.yaml --size 64 --batch-size 2 --quick

Modes: reference (eager), compile (torch.compile of the reference, default mode), compile-ro (the same with
mode="reduce-overhead": CUDA graphs of forward and backward, Adam eager), fused (our kernels,
eager), reference+graphs / fused+graphs (the whole step replayed from a CUDA graph), fused+graphs+cl (and
channels-last model, VGG and images: what `ostnet-fast train` runs on a GPU by default); compile-ro+cl
(the baseline in channels-last too), compile+graphs+cl (default-mode torch.compile of the reference, the whole
step, Adam included, in our CUDA graph); fused+compile+graphs+cl: the fused model compiled, the kernels that
have a custom-op form (torch.ops.ostnet.*) called from inductor's code, the others as the reference.

Timing: CUDA events around each step after warm-up, median of `--iters` steps (wall clock with a
synchronize on CPU). Random inputs. A mode that fails (e.g. torch.compile) records its error string
in the JSON instead of a number.
"""
from __future__ import annotations

import argparse
import functools
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import out_dir, peak_memory_mib, print_table, time_ms, write_json  # noqa: E402

from ostnet_fast import OSTNet, load_config  # noqa: E402
from ostnet_fast._errors import first_line  # noqa: E402
from ostnet_fast.train.losses import TrainingModel, load_vgg19  # noqa: E402
from ostnet_fast.train.graphed import GraphedTrainStep  # noqa: E402
from ostnet_fast.train.trainer import (autocast_context, build_optimizer, cuda_graphs_unavailable,  # noqa: E402
                                       optimizer_update, prepare_batch, resolve_amp, train_step)

MODES = ("reference", "compile", "compile-ro", "compile-ro+cl", "fused", "reference+graphs", "fused+graphs",
         "fused+graphs+cl", "compile+graphs+cl", "fused+compile+graphs+cl")


def build(mode: str, config, device, vgg, amp: str):
    """mode = base[+compile][+graphs][+cl]: base reference | compile (of the reference) | compile-ro | fused;
    +compile: the fused model inside default-mode torch.compile (our kernels as opaque custom ops); +graphs:
    the whole step replayed from a CUDA graph (what `ostnet-fast train` does on a GPU); +cl: model, VGG and
    images in channels-last."""
    base, *flags = mode.split("+")
    torch.manual_seed(0)
    model = OSTNet(config.model, fused=base == "fused").to(device).train()
    tm = TrainingModel(model, config.train, vgg).to(device)
    if "cl" in flags:
        tm = tm.to(memory_format=torch.channels_last)
    graphs = "graphs" in flags
    if base == "compile-ro" and graphs:
        raise ValueError("compile-ro replays its own CUDA graphs: no +graphs")
    if base.startswith("compile") or "compile" in flags:  # -ro: compile's own CUDA graphs (forward + backward)
        module = torch.compile(tm, mode="reduce-overhead" if base == "compile-ro" else "default")
    else:
        module = tm
    optimizer, _ = build_optimizer(model, config, capturable=graphs)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    params = list(model.parameters())
    if graphs:
        why = cuda_graphs_unavailable(device, amp)
        if why:
            raise RuntimeError(why)
        update = functools.partial(optimizer_update, module, optimizer, scaler,
                                   amp_ctx=autocast_context(amp, device, cache_enabled=False),
                                   grad_clip=config.train.grad_clip, params=params)
        return GraphedTrainStep(update, optimizer, say=lambda msg: print(f"  [{mode}] {msg}", flush=True))
    ctx = autocast_context(amp, device)
    return lambda inputs: train_step(module, optimizer, scaler, inputs, ctx, config.train.grad_clip, params)


def layout(inputs: tuple, mode: str) -> tuple:
    if "cl" not in mode.split("+")[1:]:
        return inputs
    return tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in inputs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output folder (default $OUT or bench/results)")
    ap.add_argument("--quick", action="store_true", help="few iterations (smoke run)")
    ap.add_argument("--config", default="ostnet-vox-256", help="model config name or YAML path")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--size", type=int, default=None, help="image size (default: the config's)")
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_train: no CUDA device (use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"bench_train: unknown mode(s) {bad}; known: {MODES}", file=sys.stderr)
        return 2
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 10)
    iters = args.iters if args.iters is not None else (5 if args.quick else 40)
    config = load_config(args.config)
    size = args.size or config.model.image_size
    config.model.image_size = size
    amp = resolve_amp(args.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    vgg = load_vgg19(random_weights=True).to(device)
    g = torch.Generator().manual_seed(0)
    batch = {"source": torch.rand(args.batch_size, 3, size, size, generator=g),
             "driving": torch.rand(args.batch_size, 3, size, size, generator=g)}
    inputs = prepare_batch(batch, g, config, device)

    rows = []
    for mode in modes:
        row = {"mode": mode, "batch": args.batch_size, "size": size, "amp": amp}
        try:
            torch._dynamo.reset()  # each compiled mode starts from a clean cache (and recompile budget)
            step = build(mode, config, device, vgg, amp)
            mode_inputs = layout(inputs, mode)
            step(mode_inputs)  # first call: compiles / autotunes; errors surface here
            fn = lambda: step(mode_inputs)  # noqa: E731
            t = time_ms(fn, warmup=max(warmup, 4), iters=iters, cuda=device.type == "cuda")
            if isinstance(step, GraphedTrainStep):
                row["graph_replays"] = step.replays
                if step.failed:
                    row["graph_error"] = step.failed
            row.update(ms_per_step=t["median_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"],
                       samples_per_s=args.batch_size / (t["median_ms"] / 1e3))
            if device.type == "cuda":
                row["peak_mib"] = peak_memory_mib(fn)
        except Exception as e:  # record, keep going: the JSON says why a mode has no number
            row["error"] = f"{type(e).__name__}: {first_line(e)}"
            row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-3:]
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        # Written after every mode: a run cut short by a time limit keeps what it measured.
        write_json(out_dir(args.out), "bench_train", rows, device=str(device), config=config.name, partial=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = next((r.get("ms_per_step") for r in rows if r["mode"] == "reference"), None)
    for r in rows:
        if base and r.get("ms_per_step"):
            r["speedup_vs_reference"] = base / r["ms_per_step"]
    for mode, key in (("compile", "speedup_vs_compile"), ("compile-ro", "speedup_vs_compile_ro")):
        comp = next((r.get("ms_per_step") for r in rows if r["mode"] == mode), None)
        for r in rows:
            if comp and r.get("ms_per_step"):
                r[key] = comp / r["ms_per_step"]
    print_table(rows, ["mode", "batch", "size", "amp", "ms_per_step", "samples_per_s", "peak_mib",
                       "speedup_vs_reference", "speedup_vs_compile", "speedup_vs_compile_ro", "error", "graph_error"])
    write_json(out_dir(args.out), "bench_train", rows, device=str(device), config=config.name, warmup=warmup,
               iters=iters, vgg="random weights (same cost as ImageNet's)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
