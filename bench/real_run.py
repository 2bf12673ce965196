"""Issue 7's real run: train the model on the bundled video for a fixed time, then evaluate the
checkpoint on held-out frames. A single 120-frame QCIF clip is a smoke test, not VoxCeleb: the point is
that the whole loop (data, AMP, fused kernels, checkpoints, eval) runs on a GPU and the loss falls.

    python bench/real_run.py --out DIR [--seconds 150] [--config ostnet-vox-256] [--batch-size 8]

The clip is split by time: the first 80% of the frames train, the last 20% evaluate (same person, so
same-identity reconstruction). Random VGG-19 weights unless --vgg is given (none can be downloaded here).
"""
from __future__ import annotations

import argparse
import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from ostnet_fast.data.bundled import driving_video_path
from ostnet_fast.pipeline.video import VideoWriter, read_video


def split_clip(out: Path, train_share: float = 0.8) -> tuple[Path, Path]:
    frames, info = read_video(driving_video_path())
    cut = int(len(frames) * train_share)
    paths = []
    for name, part in (("train", frames[:cut]), ("test", frames[cut:])):
        (out / "data" / name).mkdir(parents=True, exist_ok=True)
        path = out / "data" / name / "carphone.mp4"
        with VideoWriter(path, info.fps, info.width, info.height) as w:
            for f in part:
                w.write(f)
        paths.append(path)
    return paths[0], paths[1]


def dump_stacks(proc: subprocess.Popen) -> None:
    """Ask the trainer to print its threads' stacks (its SIGUSR1 handler) and give it a moment to do so."""
    if proc.poll() is None and hasattr(signal, "SIGUSR1"):
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=150, help="training time budget")
    ap.add_argument("--config", default="ostnet-vox-256")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--vgg", help="VGG-19 weights; default: random (says so)")
    ap.add_argument("--stop-timeout", type=float, default=120,
                    help="seconds the trainer gets to save and exit after SIGTERM before it is killed")
    ap.add_argument("--no-fused", action="store_true", help="train with the reference ops")
    ap.add_argument("--num-workers", type=int, default=4)
    args = ap.parse_args(argv)
    out = Path(args.out)
    run = out / "run"
    if run.exists():  # never evaluate a checkpoint of an earlier run as if this one made it
        print(f"real_run: {run} exists (an earlier run); pass a new --out", file=sys.stderr)
        return 2
    train_clip, test_clip = split_clip(out)
    cmd = [sys.executable, "-m", "ostnet_fast", "train", "--config", args.config, "--data", str(train_clip.parent),
           "--out", str(run), "--batch-size", str(args.batch_size), "--save-every", "100", "--log-every", "10",
           "--num-workers", str(args.num_workers), "--no-progress"]
    cmd += ["--vgg", args.vgg] if args.vgg else ["--random-vgg"]
    cmd += ["--no-fused"] if args.no_fused else []
    # SIGTERM (e.g. from `timeout`) unwinds through the finally below, which stops the trainer too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    train_log = out / "train.log"
    t0 = time.time()
    with open(train_log, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        stopped = False
        try:
            proc.wait(timeout=args.seconds)
        except subprocess.TimeoutExpired:
            stopped = True
            dump_stacks(proc)  # where the time limit found it, in train.log
            proc.terminate()  # SIGTERM: the trainer saves a checkpoint after the step it is in, and exits
            try:
                proc.wait(timeout=args.stop_timeout)
            except subprocess.TimeoutExpired:
                dump_stacks(proc)
                print(f"real_run: the trainer did not stop within {args.stop_timeout:.0f} s of SIGTERM; killed it "
                      f"(its stacks are in {train_log})", file=sys.stderr)
        finally:
            if proc.poll() is None:  # this script interrupted, or the trainer stuck: never leave it running
                proc.kill()
                proc.wait()
    train_s = time.time() - t0
    print(tail(train_log))
    if not stopped and proc.returncode != 0:
        print(f"real_run: training failed (exit code {proc.returncode}); log: {train_log}", file=sys.stderr)
        return 1
    if not (run / "latest.json").exists():
        print(f"real_run: training wrote no checkpoint (exit code {proc.returncode}); log: {train_log}",
              file=sys.stderr)
        return 1
    latest = json.loads((run / "latest.json").read_text())
    rows = list(csv.DictReader(open(run / "log.csv")))
    eval_json = out / "eval.json"
    subprocess.run([sys.executable, "-m", "ostnet_fast", "eval", "--checkpoint", str(run / latest["model"]), "--data",
                    str(test_clip.parent), "--split", ".", "--out", str(eval_json), "--no-progress"], check=True)
    summary = {"train_seconds": round(train_s, 1), "steps": latest["step"], "train_exit_code": proc.returncode,
               "vgg": args.vgg or "random (smoke test: perceptual features are random)", "config": args.config,
               "batch_size": args.batch_size, "fused": not args.no_fused, "loss_curve": rows, "eval": json.loads(eval_json.read_text())}
    (out / "real_run.json").write_text(json.dumps(summary, indent=2))
    first, last = rows[0], rows[-1]
    print(f"real run: {latest['step']} steps in {train_s:.0f} s; loss {first.get('loss')} -> {last.get('loss')}; "
          f"wrote {out / 'real_run.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
