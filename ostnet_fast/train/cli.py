"""`ostnet-fast train` and `ostnet-fast eval`: registered by ostnet_fast/cli.py via `register(subparsers)`.

Each subcommand's `func(args)` returns an exit code: 0 on success, 2 on bad input (one clear line on
stderr)."""
from __future__ import annotations


def _train(args) -> int:
    from .trainer import options_from_args, run_cli
    return run_cli(options_from_args(args), prog="ostnet-fast train")


def _eval(args) -> int:
    from .evaluate import run_eval_cli
    return run_eval_cli(args, prog="ostnet-fast eval")


def register(subparsers) -> None:
    from .evaluate import add_eval_arguments
    from .trainer import add_train_arguments
    train = subparsers.add_parser(
        "train", help="train OSTNet (also: torchrun --nproc_per_node N -m ostnet_fast.train ...)",
        description="Train OSTNet on a folder of videos or frame folders; checkpoints and logs go to --out.")
    add_train_arguments(train)
    train.set_defaults(func=_train)
    ev = subparsers.add_parser("eval", help="reconstruction metrics of a checkpoint (same/different scale)",
                               description="L1, PSNR, SSIM (+ LPIPS, AKD/AED when available) on test videos.")
    add_eval_arguments(ev)
    ev.set_defaults(func=_eval)
