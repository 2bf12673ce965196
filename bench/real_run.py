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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=150, help="training time budget")
    ap.add_argument("--config", default="ostnet-vox-256")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--vgg", help="VGG-19 weights; default: random (says so)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    run = out / "run"
    if run.exists():  # never evaluate a checkpoint of an earlier run as if this one made it
        print(f"real_run: {run} exists (an earlier run); pass a new --out", file=sys.stderr)
        return 2
    train_clip, test_clip = split_clip(out)
    cmd = [sys.executable, "-m", "ostnet_fast", "train", "--config", args.config, "--data", str(train_clip.parent),
           "--out", str(run), "--batch-size", str(args.batch_size), "--save-every", "100", "--log-every", "10",
           "--num-workers", "4", "--no-progress"] + (["--vgg", args.vgg] if args.vgg else ["--random-vgg"])
    # SIGTERM (e.g. from `timeout`) unwinds through the finally below, which stops the trainer too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    stopped = False
    try:
        proc.wait(timeout=args.seconds)
    except subprocess.TimeoutExpired:
        stopped = True
        proc.terminate()  # SIGTERM: the trainer saves a checkpoint after the step it is in, and exits
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:  # this script interrupted, or the trainer stuck: never leave it running
            proc.kill()
    train_s = time.time() - t0
    if not stopped and proc.returncode != 0:
        print(f"real_run: training failed (exit code {proc.returncode})", file=sys.stderr)
        return 1
    if not (run / "latest.json").exists():
        print(f"real_run: training wrote no checkpoint (exit code {proc.returncode})", file=sys.stderr)
        return 1
    latest = json.loads((run / "latest.json").read_text())
    rows = list(csv.DictReader(open(run / "log.csv")))
    eval_json = out / "eval.json"
    subprocess.run([sys.executable, "-m", "ostnet_fast", "eval", "--checkpoint", str(run / latest["model"]), "--data",
                    str(test_clip.parent), "--split", ".", "--out", str(eval_json), "--no-progress"], check=True)
    summary = {"train_seconds": round(train_s, 1), "steps": latest["step"], "train_exit_code": proc.returncode,
               "vgg": args.vgg or "random (smoke test: perceptual features are random)", "config": args.config,
               "batch_size": args.batch_size, "loss_curve": rows, "eval": json.loads(eval_json.read_text())}
    (out / "real_run.json").write_text(json.dumps(summary, indent=2))
    first, last = rows[0], rows[-1]
    print(f"real run: {latest['step']} steps in {train_s:.0f} s; loss {first.get('loss')} -> {last.get('loss')}; "
          f"wrote {out / 'real_run.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
