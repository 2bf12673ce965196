"""Exported-graph runtimes vs the PyTorch reference, one frame with the source cached, batch 1 and 8:
ONNX Runtime (CPU; CUDA provider where installed), TensorRT (standard or TensorRT-RTX, where it can run
on the GPU at hand) and the reference model (eager fp32, same device) measured in the same run.
Rows: ms per batch (median), FPS, ratio to the reference. A runtime that cannot run here gets a row
with `status` and `reason` instead of numbers (e.g. TensorRT-RTX on an H100: compute capability 9.0
is not a TensorRT-RTX target).

    python bench/bench_engines.py [--out DIR] [--config ostnet-vox-256] [--checkpoint PATH]
                                  [--batches 1,8] [--iters 50] [--fp16] [--onnx DIR] [--engines DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import env_info, out_dir, print_table, time_ms, write_json  # noqa: E402

from ostnet_fast.export.onnx_export import export_graphs, load_model, setup_logging  # noqa: E402


def tensorrt_status(engines: Path | None, onnx_dir: Path, fp16: bool, work: Path, batch_max: int):
    """-> (TRTReenactor or None, reason). Builds engines into `work` when none are given."""
    from ostnet_fast.export.build_trt import RTX_DEFAULT_TARGETS, TensorRTNotInstalled, build_engines, import_tensorrt
    from ostnet_fast.runtime.trt import TRTReenactor, cc_in_targets
    try:
        trt, flavour = import_tensorrt()
    except TensorRTNotInstalled:
        return None, "no TensorRT installed (pip install tensorrt, or tensorrt-rtx-cu13-libs/-bindings)"
    if not torch.cuda.is_available():
        return None, f"{flavour} {trt.__version__} installed but no CUDA GPU: engines cannot run"
    cc = "%d.%d" % torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if flavour == "tensorrt-rtx" and not cc_in_targets(cc, RTX_DEFAULT_TARGETS):
        return None, (f"TensorRT-RTX {trt.__version__} cannot run engines on {name} (compute capability {cc}; "
                      f"it runs on 8.0/8.6/8.9/12.x only)")
    if engines is None:
        engines = work / "engines"
        build_engines(onnx_dir, engines, fp16=fp16, batch=(1, 1, batch_max), trt=trt, flavour=flavour)
    return TRTReenactor(engines), ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--config", default="ostnet-vox-256")
    ap.add_argument("--checkpoint")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--fp16", action="store_true", help="fp16 graphs/engines (the reference stays fp32)")
    ap.add_argument("--onnx", help="exported graphs to use (default: export the model now)")
    ap.add_argument("--engines", help="TensorRT engine directory to use (default: build from the graphs)")
    ap.add_argument("--skip", default="", help="comma-separated runtimes to skip: reference,ort-cpu,ort-cuda,tensorrt")
    args = ap.parse_args(argv)
    setup_logging()
    out = out_dir(args.out)
    skip = set(filter(None, args.skip.split(",")))
    batches = [int(b) for b in args.batches.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model, cfg, src = load_model(args.checkpoint, args.config)
    size = cfg.model.image_size
    work = Path(tempfile.mkdtemp(prefix="ostnet-bench-engines-"))
    onnx_dir = Path(args.onnx) if args.onnx else work / "onnx"
    if not args.onnx:
        export_graphs(model, cfg, onnx_dir, precisions=("fp16",) if args.fp16 else ("fp32",), source=src)
    g = torch.Generator().manual_seed(1)
    source = torch.rand(1, 3, size, size, generator=g)
    frames = {n: torch.rand(n, 3, size, size, generator=g) for n in batches}  # never time on zeros

    runtimes: dict[str, object] = {}
    unavailable: dict[str, str] = {}
    ref_model = model.to(device).eval()
    state = ref_model.encode_source(source.to(device))
    if "reference" not in skip:
        runtimes["reference"] = lambda x: ref_model.animate(state, x)["prediction"]
    try:
        import onnxruntime as ort
        from ostnet_fast.runtime import ORTReenactor
        for name, provider in (("ort-cpu", "CPUExecutionProvider"), ("ort-cuda", "CUDAExecutionProvider")):
            if name in skip:
                continue
            if provider not in ort.get_available_providers():
                unavailable[name] = f"{provider} not in this onnxruntime build ({ort.__version__})"
                continue
            r = ORTReenactor(onnx_dir, providers=[provider], fp16=args.fp16)
            r.set_source(source)
            runtimes[name] = r
    except ImportError as e:
        unavailable["ort-cpu"] = unavailable["ort-cuda"] = f"onnxruntime not installed ({e})"
    if "tensorrt" not in skip:
        try:
            trt_runtime, reason = tensorrt_status(Path(args.engines) if args.engines else None, onnx_dir,
                                                  args.fp16, work, max(batches))
        except Exception as e:  # a failed build is a result too, not a crash of the whole benchmark
            trt_runtime, reason = None, f"{type(e).__name__}: {e}"
        if trt_runtime is None:
            unavailable["tensorrt"] = reason
        else:
            trt_runtime.set_source(source.to(device))
            runtimes["tensorrt"] = trt_runtime

    rows = []
    with torch.no_grad():
        for n in batches:
            ref_ms = None
            for name, fn in runtimes.items():
                on = device if name in ("reference", "tensorrt") else torch.device("cpu")
                x = frames[n].to(device if name in ("reference", "tensorrt") else "cpu")
                t = time_ms(lambda: fn(x), warmup=args.warmup, iters=args.iters,
                            cuda=(on if name != "ort-cuda" else device).type == "cuda")
                if name == "reference":
                    ref_ms = t["median_ms"]
                rows.append({"runtime": name, "batch": n, "ms": t["median_ms"], "p20_ms": t["p20_ms"],
                             "p80_ms": t["p80_ms"], "fps": 1e3 * n / t["median_ms"],
                             "vs_reference": (ref_ms / t["median_ms"]) if ref_ms else None,
                             "device": str(on if name != "ort-cuda" else device), "status": "ok"})
            for name, reason in unavailable.items():
                rows.append({"runtime": name, "batch": n, "ms": None, "fps": None, "vs_reference": None,
                             "status": "unavailable", "reason": reason})
    print_table(rows, ["runtime", "batch", "ms", "fps", "vs_reference", "status"])
    for name, reason in unavailable.items():
        print(f"{name}: {reason}")
    versions = {"onnxruntime": None, "tensorrt": None}
    try:
        import onnxruntime as ort
        versions["onnxruntime"] = ort.__version__
    except ImportError:
        pass
    try:
        from ostnet_fast.export.build_trt import import_tensorrt
        trt, flavour = import_tensorrt()
        versions["tensorrt"] = f"{flavour} {trt.__version__}"
    except ImportError:
        pass
    write_json(out, "engines", rows, config=cfg.name, image_size=size, precision="fp16" if args.fp16 else "fp32",
               weights=src.kind, reference="OSTNet reference path, eager fp32, " + str(device),
               versions=versions, device=env_info().get("gpu") or "cpu")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
