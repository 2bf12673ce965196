"""End-to-end pipeline benchmark: decode -> crop -> infer -> encode on the bundled driving video.

For each backend that can run here and each batch size (1, 8 by default): frames per second of the
whole job (reenact_video, output encoded with libx264 into a temp folder), the busy share of each stage
(decode / inference / encode, over the wall time: the stage near 100% is the bottleneck), the speedup
over the torch (reference) backend measured in the same run, and the inference-only FPS of the same
backend at the same batch (CUDA events around `Reenactor.infer` on random device tensors, after
warm-up). The issue's target: on an H100, end-to-end >= 80% of inference-only at batch 8, i.e. the
pipeline is not the bottleneck.

The bundled video has 120 frames at 176x144; it is looped into a longer H.264 clip (--frames, default
960) once before timing, so thread start-up and graph capture do not dominate. Each configuration runs a
short warm-up job first (Triton compile, cuDNN autotune, CUDA graph capture).

    python bench/bench_pipeline.py [--out DIR] [--config ostnet-vox-256] [--batches 1,8]
        [--precisions fp32,fp16] [--backends torch,fused,fused+compile,onnxruntime,tensorrt] [--frames 960]
        [--ort-engine DIR] [--trt-engine DIR] [--quick]
    # CPU smoke run:  python bench/bench_pipeline.py --device cpu --config tests/configs/tiny.yaml --quick

With pytest-benchmark installed, `pytest bench/bench_pipeline.py --benchmark-json=F` also times one
end-to-end job through its `benchmark` fixture; this script itself uses plain timing (perf_counter for
the job, CUDA events with synchronize for inference).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import out_dir, print_table, time_ms, write_json  # noqa: E402

from ostnet_fast.data.bundled import driving_video_path, source_image  # noqa: E402
from ostnet_fast.pipeline.crop import FaceCropper  # noqa: E402
from ostnet_fast.pipeline.reenactor import BackendUnavailable, Reenactor, build_model  # noqa: E402
from ostnet_fast.pipeline.run import reenact_video  # noqa: E402
from ostnet_fast.pipeline.video import VideoReader, VideoWriter  # noqa: E402


def looped_video(frames: int, folder: Path) -> Path:
    """The bundled clip looped (forward, backward, ...) to `frames` frames, H.264, same rate and size."""
    with VideoReader(driving_video_path()) as r:
        clip = list(r)
        fps = r.info.fps
    path = folder / f"driving_{frames}.mp4"
    with VideoWriter(path, fps, clip[0].shape[1], clip[0].shape[0], crf=18, preset="veryfast") as w:
        i, step = 0, 1
        for _ in range(frames):
            w.write(clip[i])
            if not 0 <= i + step < len(clip):
                step = -step
            i += step
    return path


def inference_only_fps(reenactor: Reenactor, batch: int, iters: int, cuda: bool) -> float:
    g = torch.Generator(device=reenactor.device).manual_seed(0)
    x = torch.rand(batch, 3, reenactor.size, reenactor.size, device=reenactor.device, generator=g)
    if cuda:
        t = time_ms(lambda: reenactor.infer(x), warmup=5, iters=iters)
        return 1000 * batch / t["median_ms"]
    reenactor.infer(x)
    times = []
    for _ in range(max(3, iters // 10)):
        t0 = time.perf_counter()
        reenactor.infer(x)
        times.append(time.perf_counter() - t0)
    times.sort()
    return batch / times[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for pipeline.json (default $OUT or bench/results)")
    ap.add_argument("--config", default="ostnet-vox-256")
    ap.add_argument("--checkpoint", help="weights (default: random, seeded)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--backends", default="torch,fused,onnxruntime,tensorrt",
                    help="comma list; fused+compile is the fused backend with compile=True")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--precisions", default=None, help="fp32,fp16 on CUDA (default), fp32 on CPU")
    ap.add_argument("--frames", type=int, default=960, help="frames of the looped driving clip")
    ap.add_argument("--preset", default="veryfast", help="x264 preset of the output (default veryfast)")
    ap.add_argument("--ort-engine", help="ONNX folder for the onnxruntime backend")
    ap.add_argument("--trt-engine", help="engine folder for the tensorrt backend")
    ap.add_argument("--quick", action="store_true", help="short clip, few iterations (smoke test)")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("bench_pipeline: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if cuda:
        torch.backends.cudnn.benchmark = True
    precisions = (args.precisions or ("fp32,fp16" if cuda else "fp32")).split(",")
    batches = [int(b) for b in args.batches.split(",")]
    frames = 48 if args.quick and args.frames == 960 else args.frames
    iters = 10 if args.quick else 50
    engines = {"onnxruntime": args.ort_engine, "tensorrt": args.trt_engine}

    model, config, _ = build_model(args.checkpoint, args.config, args.device)
    source = source_image()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ostnet-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        driving = looped_video(frames, tmp)
        print(f"driving clip: {frames} frames (176x144) made in {time.perf_counter() - t0:.1f} s", flush=True)
        for precision in precisions:
            base_fps: dict[int, float] = {}
            for backend in args.backends.split(","):
                for batch in batches:
                    row = {"backend": backend, "precision": precision, "batch": batch}
                    rows.append(row)
                    try:
                        name, *flags = backend.split("+")
                        r = Reenactor(model=model, backend=name, device=args.device, fp16=precision == "fp16",
                                      engine=engines.get(name), **({"compile": True} if flags == ["compile"] else {}))
                    except (BackendUnavailable, ValueError, ImportError) as e:
                        row["skipped"] = f"{type(e).__name__}: {e}"[:300]
                        print(f"{backend} {precision} b{batch}: skipped ({row['skipped']})", flush=True)
                        continue
                    try:
                        cropper = FaceCropper("center")
                        r.set_source(source)
                        # Warm-up job: compile, autotune, capture (not timed).
                        reenact_video(r, driving, tmp / "warm.mp4", batch_size=batch, cropper=cropper,
                                      max_frames=min(frames, 4 * batch + 8), progress=False, write=False,
                                      preset=args.preset)
                        s = reenact_video(r, driving, tmp / "out.mp4", batch_size=batch, cropper=cropper,
                                          progress=False, write=True, preset=args.preset)
                        (tmp / "out.mp4").unlink(missing_ok=True)
                        inf = inference_only_fps(r, batch, iters, cuda)
                        shares = s.shares
                        row.update(frames=s.frames, wall_s=s.wall_s, e2e_fps=s.fps,
                                   decode_share=shares["decode"], inference_share=shares["inference"],
                                   encode_share=shares["encode"], infer_only_fps=inf,
                                   e2e_over_infer_only=s.fps / inf,
                                   bottleneck=max(shares, key=shares.get))
                        if backend == "torch":
                            base_fps[batch] = s.fps
                        if batch in base_fps:
                            row["e2e_speedup_vs_torch"] = s.fps / base_fps[batch]
                    except Exception as e:  # one failing backend must not hide the others' numbers
                        row["error"] = f"{type(e).__name__}: {e}"[:400]
                    finally:
                        del r
                        if cuda:
                            torch.cuda.empty_cache()
                    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    print_table(rows, ["backend", "precision", "batch", "e2e_fps", "infer_only_fps", "e2e_over_infer_only",
                       "e2e_speedup_vs_torch", "decode_share", "inference_share", "encode_share", "bottleneck",
                       "skipped", "error"])
    target = [r for r in rows if r.get("batch") == 8 and "e2e_over_infer_only" in r]
    for r in target:
        ok = r["e2e_over_infer_only"] >= 0.8
        print(f"target e2e >= 0.8 x inference-only at batch 8: {r['backend']} {r['precision']} "
              f"{r['e2e_over_infer_only']:.2f} {'met' if ok else 'NOT met'}", flush=True)
    write_json(out_dir(args.out), "pipeline", rows, config=config.name, device=args.device, frames=frames,
               x264_preset=args.preset, output_size=f"{config.model.image_size}x{config.model.image_size}",
               driving="carphone_pristine.mp4 looped, 176x144 H.264",
               weights="checkpoint" if args.checkpoint else "random (seeded)",
               note="e2e = decode + crop + infer + libx264 encode (reenact_video); shares are busy time / wall "
                    "time per stage (overlapping threads); infer_only = Reenactor.infer on device tensors")
    return 0


if importlib.util.find_spec("pytest_benchmark") is not None:  # pragma: no cover
    def test_pipeline_e2e_benchmark(benchmark, tmp_path):
        """One end-to-end job (fused fp16 on CUDA, tiny config on CPU) timed by pytest-benchmark."""
        cuda = torch.cuda.is_available()
        config = "ostnet-vox-256" if cuda else str(Path(__file__).resolve().parent.parent / "tests" / "configs"
                                                    / "tiny.yaml")
        r = Reenactor(config=config, backend="fused" if cuda else "torch", device="cuda" if cuda else "cpu",
                      fp16=cuda)
        r.set_source(source_image())
        driving = looped_video(120, tmp_path)
        cropper = FaceCropper("center")
        result = benchmark.pedantic(lambda: reenact_video(r, driving, tmp_path / "o.mp4", batch_size=8,
                                                          cropper=cropper, progress=False, write=False),
                                    rounds=3, warmup_rounds=1)
        benchmark.extra_info.update(fps=result.fps, shares=result.shares, backend=result.backend)


if __name__ == "__main__":
    sys.exit(main())
