"""Multi-GPU training run: the same training on 1 and on N processes (torchrun, NCCL on GPUs, gloo on CPU).

    python bench/ddp_scaling.py --out DIR [--nproc 2] [--steps 200] [--batch-size 8]
    python bench/ddp_scaling.py --out DIR --device cpu --config tests/configs/tiny.yaml --steps 4 --batch-size 2

On 80% of the bundled clip (as bench/real_run.py): trains `--steps` steps on one process and on `--nproc`
(batch per process fixed, so N processes see N times the samples per step), reads samples/s from each run's
log (the median after the first logged rows, which hold start-up), checks that the trainer reported
identical weights on all ranks, and resumes the N-process run's checkpoint on one process for a few steps.
Writes DIR/ddp_scaling.json: samples/s for 1 and N, scaling efficiency = sps_N / (N x sps_1).

Both runs step as `ostnet-fast train` does by default on GPUs: replayed from a CUDA graph (under torchrun the
graph holds one all-reduce of the gradients); `--no-cuda-graphs` measures both eagerly (N processes then
run under DDP, which overlaps its all-reduces with the backward).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_run import split_clip, tail  # noqa: E402


def train(run: Path, nproc: int, args, steps: int, extra: list[str], resume: bool = False) -> tuple[int, float]:
    """One trainer run, its output in run.log beside the run folder. -> (exit code, seconds)."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "ostnet_fast.train"]
    else:
        cmd = [sys.executable, "-m", "ostnet_fast.train"]
    if resume:
        cmd += ["--resume", str(run)]
    else:
        cmd += ["--config", args.config, "--data", str(args.train_data), "--out", str(run),
                "--batch-size", str(args.batch_size)]
    cmd += ["--max-steps", str(steps), "--log-every", str(args.log_every), "--save-every", str(steps),
            "--num-workers", str(args.num_workers), "--device", args.device, "--no-progress", *extra]
    cmd += ["--vgg", args.vgg] if args.vgg else ["--random-vgg"]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONUNBUFFERED="1")  # never NVLink multicast on shared hosts
    log_path = run.parent / f"{run.name}{'_resume' if resume else ''}.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    print(f"$ {' '.join(cmd)}\n{tail(log_path, 8)}\n", flush=True)
    return code, time.time() - t0


def throughput(run: Path) -> float | None:
    """Median samples/s over the logged rows after the first two (start-up, compilation)."""
    rows = list(csv.DictReader(open(run / "log.csv"))) if (run / "log.csv").exists() else []
    rates = [float(r["samples_per_s"]) for r in rows[2:]] or [float(r["samples_per_s"]) for r in rows[-1:]]
    return statistics.median(rates) if rates else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="a new folder for data, runs, logs and ddp_scaling.json")
    ap.add_argument("--nproc", type=int, default=2, help="processes of the multi-process run (one per GPU)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--config", default="ostnet-vox-256")
    ap.add_argument("--batch-size", type=int, default=8, help="per process")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--vgg", help="VGG-19 weights; default: random (same cost)")
    ap.add_argument("--num-workers", type=int, default=4)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per trainer run")
    ap.add_argument("--no-fused", action="store_true", help="train with the reference ops")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="both runs eager (N processes under DDP)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if (out / "runs").exists():
        print(f"ddp_scaling: {out} holds an earlier run; pass a new --out", file=sys.stderr)
        return 2
    if args.nproc < 2:
        ap.error("--nproc must be >= 2")
    if args.device == "cuda":
        import torch
        if torch.cuda.device_count() < args.nproc:
            print(f"ddp_scaling: {args.nproc} processes need {args.nproc} GPUs, this machine has "
                  f"{torch.cuda.device_count()}", file=sys.stderr)
            return 2
    train_clip, _ = split_clip(out)
    args.train_data = train_clip.parent
    extra = ["--no-fused"] * args.no_fused + ["--no-cuda-graphs"] * args.no_cuda_graphs
    single, multi = out / "runs" / "gpus1", out / "runs" / f"gpus{args.nproc}"
    single.parent.mkdir(parents=True)
    code1, s1 = train(single, 1, args, args.steps, extra)
    code_n, sn = train(multi, args.nproc, args, args.steps, extra)
    log_n = (multi.parent / f"{multi.name}.log").read_text(errors="replace")
    identical = f"identical on all {args.nproc} ranks" in log_n
    # Rank 0's checkpoint goes on in one process.
    code_r, _ = train(multi, 1, args, args.steps + 2 * args.log_every, extra, resume=True)
    resumed = json.loads((multi / "latest.json").read_text())["step"] if (multi / "latest.json").exists() else None
    sps1, spsn = throughput(single), throughput(multi)
    result = {
        "device": args.device, "nproc": args.nproc, "steps": args.steps, "batch_per_process": args.batch_size,
        "config": args.config, "fused": args.device == "cuda" and not args.no_fused,
        # What the multi-process run did, from its log (graphs can be unavailable, or fail to capture).
        "cuda_graphs": "replayed from a CUDA graph" in log_n and "capture of the training step failed" not in log_n,
        "exit_codes": {"1": code1, str(args.nproc): code_n, "resume_on_1": code_r},
        "seconds": {"1": round(s1, 1), str(args.nproc): round(sn, 1)},
        "samples_per_s": {"1": sps1, str(args.nproc): spsn},
        "scaling_efficiency": spsn / (args.nproc * sps1) if sps1 and spsn else None,
        "ranks_identical": identical,
        "resumed_on_1_to_step": resumed,
    }
    if args.device == "cuda":
        import torch
        result["gpu"] = torch.cuda.get_device_name(0)
        result["torch"] = torch.__version__
    (out / "ddp_scaling.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    ok = (code1 == code_n == code_r == 0 and identical and resumed == args.steps + 2 * args.log_every)
    if not ok:
        print("ddp_scaling: a run failed, the ranks disagreed or the resume did not reach its step; "
              f"logs in {out / 'runs'}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
