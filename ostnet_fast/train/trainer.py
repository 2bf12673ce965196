"""Training: one process or DDP through torchrun, AMP, checkpoints, bit-for-bit resume on CPU.

    ostnet-fast train --config ostnet-vox-256 --data DATA --out RUN_DIR
    torchrun --nproc_per_node 8 -m ostnet_fast.train --config ostnet-vox-256 --data DATA --out RUN_DIR
    ostnet-fast train --resume RUN_DIR [--data DATA]

The step (nanoGPT's order): autocast forward + losses -> scaler.scale(loss).backward() -> unscale_ ->
clip -> scaler.step -> scaler.update -> zero_grad(set_to_none=True). One code path for bf16 and fp16:
`GradScaler(enabled=fp16)`. Adam with FOMM's schedule (MultiStepLR over epochs, gamma 0.1).

Randomness: the model is initialised from `seed` on every rank (identical init; DDP also broadcasts
rank 0's weights). The per-step draws (augmentation factors alpha/beta, the equivariance transform)
come from a CPU generator seeded by (seed, rank, step), so ranks augment differently and a resumed run
draws exactly what an uninterrupted run draws. Pairs of frames are a function of (seed, epoch, index)
(`FramePairs`) and the sampler's order of (seed, epoch), so resuming mid-epoch skips the batches
already seen without decoding them.

Run directory: RUN_DIR/checkpoints/step_XXXXXXXX.safetensors (model + config, `save_checkpoint`),
step_XXXXXXXX.state.safetensors (optimizer tensors, RNG states) + step_XXXXXXXX.state.json (the rest),
RUN_DIR/latest.json (written last: points at a complete checkpoint), RUN_DIR/log.csv, and
RUN_DIR/tensorboard/ when tensorboard is installed. Only rank 0 writes. A checkpoint's state is copied to
host memory at its step and written on a background thread while training goes on (the last one is
waited for).
"""
from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import faulthandler
import functools
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import checkpoint as ckpt
from .._errors import first_line
from ..config import Config, config_from_dict, load_config
from ..model import OSTNet
from .augment import draw_factors, scale_augment
from .losses import TrainingModel, Transform, load_vgg19

STATE_FORMAT = "ostnet-fast-train-state"
STOP_CHECK_EVERY = 10  # DDP: steps between checks whether a rank got SIGTERM


class UsageError(ValueError):
    """Bad command-line input (missing file, bad combination of options): one line, exit code 2."""


def _opt(default, help: str, metavar: str | None = None, choices: list[str] | None = None):
    """A TrainOptions field with its command-line help."""
    return field(default=default, metadata={"help": help, "metavar": metavar, "choices": choices})


@dataclass
class TrainOptions:
    """Run-time flags of `ostnet-fast train` (the architecture and schedule live in the YAML config)."""
    config: str | None = _opt(None, "shipped config name or YAML path (default ostnet-vox-256; on --resume, "
                                    "the run's)", "NAME_OR_YAML")
    data: str | None = _opt(None, "required for a new run: dataset root, a folder of videos / frame folders "
                                  "(FOMM layout root/train/...), or one video", "DATA")
    out: str | None = _opt(None, "required for a new run: a new run directory for checkpoints and logs (an "
                                 "existing run is refused: continue it with --resume)", "RUN_DIR")
    resume: str | None = _opt(None, "continue the run in RUN_DIR from its latest checkpoint, or from one of its "
                                    "RUN_DIR/checkpoints/step_XXXXXXXX.safetensors", "RUN_DIR")
    init_fomm: str | None = _opt(None, "fine-tune from a FOMM checkpoint (vox-cpk.pth.tar)", "PATH")
    fused: bool | None = _opt(None, "fused kernels (default: on with CUDA)")
    compile: bool = _opt(False, "torch.compile the model and losses (default mode), inside the CUDA graph, "
                                "our kernels as custom ops in it (the z-conv blocks left to inductor): the "
                                "fastest step measured (H200: 31 ms against 50 for the fused graph alone and 32 "
                                "for reduce-overhead compile of the reference), after a minute or two of compiling")
    channels_last: bool | None = _opt(None, "channels-last memory format for the model and images (default: on "
                                            "with CUDA, where cuDNN's bf16/fp16 convolutions run NHWC)")
    cuda_graphs: bool | None = _opt(None, "replay the training step from a CUDA graph (default: on where it can: "
                                          "CUDA, bf16 or no AMP)")
    max_steps: int | None = _opt(None, "stop after this many optimizer steps in total", "N")
    batch_size: int | None = _opt(None, "samples per process per step (default: the config's)", "N")
    vgg: str | None = _opt(None, "VGG-19 weights (torchvision's vgg19-dcbb9e9d.pth); default: "
                                 "$TORCH_HOME/hub/checkpoints", "PATH")
    random_vgg: bool = _opt(False, "random VGG-19 weights: smoke tests only, the perceptual loss is meaningless")
    amp: str = _opt("auto", "auto (bf16 on GPUs that have it, else fp16 + scaler; off on CPU), bf16, fp16, off",
                    choices=["auto", "bf16", "fp16", "off"])
    device: str | None = _opt(None, "cuda or cpu (default: cuda when available)", "DEVICE")
    num_workers: int = _opt(4, "DataLoader worker processes per rank", "N")
    save_every: int = _opt(1000, "checkpoint every N steps (and at the end)", "N")
    log_every: int = _opt(10, "log losses every N steps", "N")
    keep_checkpoints: int = _opt(3, "checkpoints kept in RUN_DIR/checkpoints", "N")
    seed: int | None = _opt(None, "seed of init, data order and augmentation (default 0; on --resume, the run's)",
                            "N")
    progress: bool = _opt(True, "tqdm progress bar on rank 0")


def add_train_arguments(parser) -> None:
    """One argparse option per TrainOptions field, help from the field's metadata."""
    import argparse
    for f in dataclasses.fields(TrainOptions):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        if f.default not in (None, False, True) and "default" not in help_:
            help_ += f" (default: {f.default})"
        if f.type in ("bool", "bool | None"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_)
        else:
            kind = int if f.type.startswith("int") else str
            parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=help_,
                                choices=f.metadata.get("choices"), metavar=f.metadata.get("metavar"))


def options_from_args(args) -> TrainOptions:
    return TrainOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)})


# ----------------------------------------------------------------------------------------------------
# distributed set-up


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_env_from_environ() -> DistEnv:
    """RANK / LOCAL_RANK / WORLD_SIZE as torchrun sets them (absent: one process)."""
    return DistEnv(rank=int(os.environ.get("RANK", 0)), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                   world_size=int(os.environ.get("WORLD_SIZE", 1)))


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """CPU generator for one step's draws, a function of (seed, rank, step) only."""
    s = int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(s)


class EpochSampler(torch.utils.data.Sampler):
    """The whole run's sample keys (epoch, index), epoch after epoch: DistributedSampler's order within an
    epoch (seed + epoch, this rank's share), each epoch cut to whole batches, the first `skip` samples of
    `start_epoch` left out (a resumed run). One DataLoader then serves the whole run: workers start once
    and keep prefetching across epoch ends."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, batch_size: int, num_epochs: int,
                 start_epoch: int = 0, skip: int = 0):
        self.order = torch.utils.data.distributed.DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.per_epoch = self.order.num_samples // batch_size * batch_size
        self.num_epochs, self.start_epoch, self.skip = num_epochs, start_epoch, skip

    def __iter__(self):
        for epoch in range(self.start_epoch, self.num_epochs):
            self.order.set_epoch(epoch)
            first = self.skip if epoch == self.start_epoch else 0
            yield from ((epoch, i) for i in list(self.order)[first:self.per_epoch])

    def __len__(self) -> int:
        return max(0, (self.num_epochs - self.start_epoch) * self.per_epoch - self.skip)


class EpochItems(torch.utils.data.Dataset):
    """dataset[(epoch, index)]: tells this process's copy of the dataset the epoch (its frame pairs depend
    on it), then reads the sample; so workers that live across epochs follow them."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


def _ignore_sigterm(_worker_id: int) -> None:
    # DataLoader workers leave SIGTERM to the main process, which saves a checkpoint and then exits.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------------------
# the step


def resolve_amp(amp: str, device: torch.device) -> str:
    """-> 'bf16', 'fp16' or 'off'."""
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise UsageError(f"--amp must be auto, bf16, fp16 or off, got {amp!r}")
    if amp == "auto":
        if device.type != "cuda":
            return "off"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device (use bf16 or off on the CPU)")
    return amp


def autocast_context(amp: str, device: torch.device, cache_enabled: bool = True):
    """cache_enabled=False under CUDA graph capture: autocast's cast cache must not outlive a replay."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16,
                          cache_enabled=cache_enabled)


def prepare_batch(batch: dict, step_gen: torch.Generator, config: Config, device: torch.device,
                  memory_format: torch.memory_format = torch.contiguous_format):
    """-> (source, driving, target, theta, tps_params) on device: driving = augmented target (sec. 3.4)."""
    source = batch["source"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
    target = batch["driving"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
    b = source.shape[0]
    alpha, beta = draw_factors(b, config.train.augmentation_delta, step_gen)
    driving = scale_augment(target, alpha, beta)
    tp = config.train.transform_params
    theta, tps_params = Transform.draw(b, tp.sigma_affine, tp.sigma_tps, tp.points_tps, step_gen)
    return source, driving, target, theta.to(device), tps_params.to(device)


def average_gradients(params: list[torch.Tensor], world_size: int) -> None:
    """Average .grad over the ranks, as DDP does (divide, then sum), with one all-reduce of one flat buffer.
    Plain tensor ops and one collective, so a CUDA graph can capture it: DDP's per-bucket hooks cannot be.
    A parameter without a gradient on this rank contributes zeros (DDP's find_unused_parameters), so every
    rank sends a buffer of the same size whatever its batch touched."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).div_(world_size)
    dist.all_reduce(flat)
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view(g.shape))  # copy_ keeps g's own layout (channels-last conv weights)


def optimizer_update(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     inputs: tuple, amp_ctx, grad_clip: float | None, params: list[torch.Tensor],
                     grad_sync: Callable[[], None] | None = None):
    """Forward, backward, [grad_sync], clipping, optimizer step (nanoGPT's order); the gradients stay in .grad.
    No host synchronisation unless the scaler is enabled: a CUDA graph can capture it.
    -> (total, {name: term}, grad_norm), detached tensors."""
    with amp_ctx:
        total, losses = model(*inputs)
    scaler.scale(total).backward()
    if grad_sync is not None:
        grad_sync()
    scaler.unscale_(optimizer)
    if grad_clip and grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    else:
        grad_norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]))
    scaler.step(optimizer)
    scaler.update()
    return total.detach(), {k: v.detach() for k, v in losses.items()}, grad_norm.detach()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               inputs: tuple, amp_ctx, grad_clip: float | None, params: list[torch.Tensor],
               grad_sync: Callable[[], None] | None = None):
    """One optimizer step, eagerly. -> (total, {name: term}, grad_norm), detached tensors."""
    out = optimizer_update(model, optimizer, scaler, inputs, amp_ctx, grad_clip, params, grad_sync)
    optimizer.zero_grad(set_to_none=True)
    return out


def build_optimizer(model: nn.Module, config: Config, capturable: bool = False):
    """Adam + FOMM's MultiStepLR; capturable=True keeps Adam's step count on the GPU (CUDA graphs)."""
    t = config.train
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr, betas=tuple(t.betas), capturable=capturable)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(t.epoch_milestones), gamma=0.1)
    return optimizer, scheduler


def cuda_graphs_unavailable(device: torch.device, amp: str) -> str | None:
    """None if the training step can be captured in a CUDA graph here, else why not."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if amp == "fp16":
        return "fp16 AMP's GradScaler reads the GPU every step (use --amp bf16 or off)"
    return None


# ----------------------------------------------------------------------------------------------------
# training state <-> files


def _to_json(obj):
    if isinstance(obj, collections.Counter):
        return {"__counter__": [[k, v] for k, v in obj.items()]}
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return obj


def _from_json(obj):
    if isinstance(obj, dict):
        if set(obj) == {"__counter__"}:
            return collections.Counter({k: v for k, v in obj["__counter__"]})
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


def training_state(optimizer, scheduler, scaler, step: int, epoch: int, batch_in_epoch: int,
                   extra: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (tensors for safetensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{name}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "format": STATE_FORMAT, "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
        "optimizer_param_groups": _to_json(opt["param_groups"]),
        "optimizer_non_tensor_state": {str(i): {k: _to_json(v) for k, v in st.items()
                                                if not isinstance(v, torch.Tensor)}
                                       for i, st in opt["state"].items()},
        "scheduler": _to_json(scheduler.state_dict()),
        "scaler": _to_json(scaler.state_dict()),
        "rng_numpy": [np_state[0], np_state[1].tolist(), *map(_to_json, np_state[2:])],
        "rng_python": _to_json(random.getstate()),
        **extra,
    }
    return tensors, meta


def restore_training_state(tensors: dict[str, torch.Tensor], meta: dict, optimizer, scheduler, scaler) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, rest in meta.get("optimizer_non_tensor_state", {}).items():
        state.setdefault(int(idx), {}).update(rest)
    missing = [k for k in ("optimizer_param_groups", "scheduler", "step", "epoch", "batch_in_epoch") if k not in meta]
    if missing:
        raise ckpt.CheckpointError(f"the training state is incomplete (no {', '.join(missing)}): not written by "
                                   "ostnet-fast train, or damaged")
    groups = _from_json(meta["optimizer_param_groups"])
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    for g, current in zip(groups, optimizer.param_groups):  # how this run steps, not how the saved one did
        if "capturable" in current:
            g["capturable"] = current["capturable"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(_from_json(meta["scheduler"]))
    if meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                               key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])
    n = meta["rng_numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    py = meta["rng_python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def latest_checkpoint(path: str | Path) -> dict:
    """RUN_DIR (its latest.json) or one of its RUN_DIR/checkpoints/step_XXXXXXXX.safetensors ->
    {'run_dir', 'step', 'model', 'state', 'state_json'}."""
    path = Path(path)
    if path.is_file() and path.parent.name == "checkpoints" and path.name.startswith("step_"):
        step = _checkpoint_step(path)
        if step is None:
            raise UsageError(f"--resume {path}: not a step_XXXXXXXX.safetensors checkpoint")
        return {"run_dir": path.parent.parent, "step": step, **_checkpoint_files(path)}
    pointer = path / "latest.json"
    if not pointer.is_file():
        raise UsageError(f"--resume {path}: no latest.json there (not a run directory, or no checkpoint yet)")
    try:
        latest = json.loads(pointer.read_text())
        return {"run_dir": path, "step": int(latest["step"]),
                **{k: path / latest[k] for k in ("model", "state", "state_json")}}
    except (ValueError, KeyError, TypeError) as e:
        raise ckpt.CheckpointError(f"{pointer} is corrupt ({type(e).__name__}: {e})"
                                   f"{_earlier_checkpoints_hint(path, None)}") from None


def _checkpoint_step(path: Path) -> int | None:
    """N of a model checkpoint step_N.safetensors (not of its .state files); None for any other name."""
    name = path.name
    if not name.startswith("step_") or not name.endswith(".safetensors") or name.endswith(".state.safetensors"):
        return None
    digits = name[len("step_"):-len(".safetensors")]
    return int(digits) if digits.isdigit() else None


def _checkpoint_files(model: Path) -> dict[str, Path]:
    """A model checkpoint step_N.safetensors -> {'model', 'state', 'state_json'}: the three files of that step."""
    stem = model.name[:-len(".safetensors")]
    return {"model": model, "state": model.with_name(f"{stem}.state.safetensors"),
            "state_json": model.with_name(f"{stem}.state.json")}


def _earlier_checkpoints_hint(run_dir: Path, before_step: int | None) -> str:
    """'; ... --resume RUN_DIR/checkpoints/step_N.safetensors' naming the newest whole checkpoint before
    `before_step` (all files present), or '' if there is none."""
    for model in sorted((Path(run_dir) / "checkpoints").glob("step_*.safetensors"), reverse=True):
        step, files = _checkpoint_step(model), _checkpoint_files(model)
        if step is not None and (before_step is None or step < before_step) and files["state"].is_file() \
                and files["state_json"].is_file():
            return f"; an earlier checkpoint may be whole: --resume {model}"
    return ""


# ----------------------------------------------------------------------------------------------------
# the run


class Trainer:
    """Everything a run needs, built from TrainOptions. `run()` trains and returns the exit code.

    `dataset` may be passed in (tests); otherwise FramePairs(opts.data)."""

    def __init__(self, opts: TrainOptions, dist_env: DistEnv | None = None, dataset=None):
        self.opts = opts
        self.env = dist_env or dist_env_from_environ()
        self.stop_requested = False
        self.stopped_by: str | None = None  # the signal that stopped the run early
        self.stopped = False  # the run ended early (a signal), its checkpoint saved
        self._resume = None
        self._save_pool: ThreadPoolExecutor | None = None  # writes checkpoint files (save)
        self._pending_save = None
        self._saved_step = -1  # the step of the last checkpoint handed to the writer
        if opts.resume:
            self._resume = latest_checkpoint(opts.resume)
            run_dir = self._resume["run_dir"]
            if opts.out and Path(opts.out).resolve() != run_dir.resolve():
                raise UsageError(f"--out {opts.out} differs from the resumed run's directory {run_dir}; a resumed "
                                 "run writes to its own directory")
            opts.out = str(run_dir)
        if not opts.out:
            raise UsageError("--out RUN_DIR is required")
        self.run_dir = Path(opts.out)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UsageError(f"--out {self.run_dir} is a file, not a run directory")
        if not opts.resume and (self.run_dir / "latest.json").exists():
            raise UsageError(f"{self.run_dir} already holds a run: continue it with --resume {self.run_dir}, "
                             "or give a new --out")
        for flag, value, least in (("--max-steps", opts.max_steps, 1), ("--num-workers", opts.num_workers, 0),
                                   ("--save-every", opts.save_every, 1), ("--log-every", opts.log_every, 1)):
            if value is not None and value < least:
                raise UsageError(f"{flag} must be >= {least}, got {value}")
        self.device = self._pick_device()
        try:
            self.config, state_meta = self._load_config()
        except ckpt.CheckpointError as e:
            if not self._resume:
                raise
            raise self._resume_error(e) from None
        if state_meta and opts.config and self.env.master:
            print(f"note: --resume uses the run's own config ({self.config.name}); --config {opts.config} is ignored",
                  file=sys.stderr)
        if state_meta:  # resumed: options the run was started with fill what was not given now
            stored = state_meta.get("options", {})
            for name in ("data", "batch_size", "seed"):
                if getattr(opts, name) is None and stored.get(name) is not None:
                    setattr(opts, name, stored[name])
        if opts.seed is None:
            opts.seed = 0
        if dataset is None and not opts.data:
            raise UsageError("--data is required (a folder of videos or frame folders, or one video)")
        if opts.batch_size is not None and opts.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {opts.batch_size}")
        self.batch_size = opts.batch_size if opts.batch_size is not None else self.config.train.batch_size
        if self.batch_size < 1:
            raise UsageError(f"the config's train.batch_size must be >= 1, got {self.batch_size}")
        if opts.data:
            opts.data = str(Path(opts.data).absolute())  # stored in checkpoints: --resume works from anywhere
        self.amp = resolve_amp(opts.amp, self.device)
        # With --compile too: our kernels as custom ops inside the compiled graph, the z-conv blocks as
        # inductor's code (H200, batch 8 bf16: 31.0 ms a step; reference compiled 32.2, reduce-overhead 32.1).
        self.fused = self.device.type == "cuda" if opts.fused is None else bool(opts.fused)
        self._dataset = dataset
        self._state_meta = state_meta

    # -- set-up -------------------------------------------------------------------------------------
    def _pick_device(self) -> torch.device:
        name = self.opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if name.startswith("cuda"):
            if not torch.cuda.is_available():
                raise UsageError("--device cuda but no CUDA device is available")
            return torch.device("cuda", self.env.local_rank if name == "cuda" else torch.device(name).index)
        if name != "cpu":
            raise UsageError(f"--device must be cuda or cpu, got {name!r}")
        return torch.device("cpu")

    def _load_config(self) -> tuple[Config, dict | None]:
        if self._resume:
            _, meta = ckpt.read_tensors(self._resume["model"])
            if "config" not in meta:
                raise ckpt.CheckpointError(f"{self._resume['model']} has no config in its metadata")
            config = config_from_dict(json.loads(meta["config"]), name=meta.get("config_name", "resumed"))
            try:
                state_meta = json.loads(Path(self._resume["state_json"]).read_text())
            except (OSError, ValueError) as e:
                raise ckpt.CheckpointError(f"{self._resume['state_json']} is unreadable ({e})") from None
            if state_meta.get("format") != STATE_FORMAT:
                raise ckpt.CheckpointError(f"{self._resume['state_json']} is not an ostnet-fast training state")
            return config, state_meta
        try:
            return load_config(self.opts.config), None
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(str(e)) from None

    force_manual_grad_sync = False  # tests: average gradients by hand (as the graphed step) without graphs

    def _resume_error(self, e: ckpt.CheckpointError) -> ckpt.CheckpointError:
        """The resumed checkpoint's error, naming the newest whole checkpoint before it."""
        return ckpt.CheckpointError(f"{e}{_earlier_checkpoints_hint(self.run_dir, self._resume['step'])}")

    def log(self, msg: str) -> None:
        if self.env.master:
            if getattr(self, "_pbar", None) is not None:
                self._pbar.write(msg)
            else:
                print(msg, flush=True)

    def setup(self) -> None:
        opts, env = self.opts, self.env
        if self.device.type == "cuda" and self.device.index is not None:
            # Streams, graph capture and synchronize act on the current device: make it ours (--device cuda:1).
            torch.cuda.set_device(self.device)
        if self.device.type == "cuda":  # fixed shapes: cuDNN times its algorithms once, as bench_train.py does
            torch.backends.cudnn.benchmark = True
        if env.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        # Data first: a broken dataset fails before the model is built.
        if self._dataset is None:
            from ..data.dataset import FramePairs
            self.dataset = FramePairs(opts.data, size=self.config.model.image_size,
                                      num_repeats=self.config.train.num_repeats, seed=opts.seed)
            if env.master:
                self.dataset.check()
        else:
            self.dataset = self._dataset
        self.steps_per_epoch = EpochSampler(self.dataset, env.world_size, env.rank, opts.seed, self.batch_size,
                                            num_epochs=1).per_epoch // self.batch_size
        if self.steps_per_epoch < 1:
            raise UsageError(f"dataset too small: {len(self.dataset)} samples over {env.world_size} process(es) "
                             f"give no full batch of {self.batch_size} (raise num_repeats or lower --batch-size)")

        # Model: identical init on every rank.
        torch.manual_seed(opts.seed)
        if opts.init_fomm and not self._resume:
            try:
                self.model, _ = ckpt.load_fomm_checkpoint(opts.init_fomm, self.config, fused=self.fused)
            except ckpt.CheckpointError as e:
                raise UsageError(str(e)) from None
            self.log(f"initialised from FOMM checkpoint {opts.init_fomm}")
        else:
            self.model = OSTNet(self.config.model, fused=self.fused)
        self.model.to(self.device).train()
        if opts.random_vgg:
            vgg = load_vgg19(random_weights=True)
            self.log("WARNING: --random-vgg: VGG-19 has RANDOM weights, the perceptual loss is meaningless "
                     "(smoke tests and benchmarks only)")
        else:
            try:
                vgg = load_vgg19(opts.vgg)
            except (FileNotFoundError, ValueError) as e:
                raise UsageError(str(e)) from None
        self.training_model = TrainingModel(self.model, self.config.train, vgg).to(self.device)
        self.channels_last = self.device.type == "cuda" if opts.channels_last is None else bool(opts.channels_last)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.training_model.to(memory_format=self.memory_format)  # the model's and VGG's conv weights
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        why_not = cuda_graphs_unavailable(self.device, self.amp)
        if opts.cuda_graphs and why_not:
            raise UsageError(f"--cuda-graphs: {why_not}")
        self.cuda_graphs = opts.cuda_graphs is not False and why_not is None
        self.step_mode = ", ".join([
            "fused kernels" if self.fused else "reference ops", *(["torch.compile"] if opts.compile else []),
            f"AMP {self.amp}",
            "channels-last" if self.channels_last else "NCHW",
            "replayed from a CUDA graph" if self.cuda_graphs else f"eager ({why_not or '--no-cuda-graphs'})"])
        self.optimizer, self.scheduler = build_optimizer(self.model, self.config, capturable=self.cuda_graphs)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        if self._resume:
            try:
                ckpt.load_weights_into(self.model, self._resume["model"])
                tensors, _ = ckpt.read_tensors(self._resume["state"])
                restore_training_state(tensors, self._state_meta, self.optimizer, self.scheduler, self.scaler)
            except ckpt.CheckpointError as e:
                raise self._resume_error(e) from None
            self.step = int(self._state_meta["step"])
            self.epoch = int(self._state_meta["epoch"])
            self.batch_in_epoch = int(self._state_meta["batch_in_epoch"])
            stored = self._state_meta.get("options", {})
            if stored.get("world_size", env.world_size) != env.world_size or \
                    stored.get("batch_size", self.batch_size) != self.batch_size:
                self.log(f"note: resuming with world size {env.world_size} / batch {self.batch_size} "
                         f"(run started with {stored.get('world_size')} / {stored.get('batch_size')}): "
                         "the data order differs from an uninterrupted run")
            if self.batch_in_epoch >= self.steps_per_epoch:  # larger batches now: that epoch is used up
                self.epoch += 1
                self.batch_in_epoch = 0
                with warnings.catch_warnings():  # torch warns "scheduler before optimizer": it stepped, in the saved run
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                    self.scheduler.step()
            self.log(f"resumed {self.run_dir} at step {self.step} (epoch {self.epoch})")
        module = self.training_model
        if opts.compile:
            module = torch.compile(module)
        self.grad_sync = None
        if env.enabled and (self.cuda_graphs or self.force_manual_grad_sync):
            # DDP's hooks run host code per gradient bucket, which a graph cannot replay: the graphed step
            # averages the gradients itself (one captured all-reduce). DDP's start, by hand: rank 0's state.
            with torch.no_grad():
                for t in [*self.training_model.parameters(), *self.training_model.buffers()]:
                    dist.broadcast(t, src=0)
            self.grad_sync = functools.partial(average_gradients, self.params, env.world_size)
        elif env.enabled:
            module = torch.nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step_model = module
        self.amp_ctx = autocast_context(self.amp, self.device)
        self._graphed = None
        if self.cuda_graphs:
            from .graphed import GraphedTrainStep
            update = functools.partial(optimizer_update, self.step_model, self.optimizer, self.scaler,
                                       amp_ctx=autocast_context(self.amp, self.device, cache_enabled=False),
                                       grad_clip=self.config.train.grad_clip, params=self.params,
                                       grad_sync=self.grad_sync)
            self._graphed = GraphedTrainStep(update, self.optimizer, say=self.log, warn=self._warn_every_rank,
                                             agree=self._ok_on_every_rank if env.enabled else None)

    # -- files --------------------------------------------------------------------------------------
    def save(self, wait: bool = True) -> Path | None:
        """Checkpoint the current step. The state is copied to host memory here; the files are written on
        a background thread, so with wait=False training goes on meanwhile (the periodic saves). One
        write at a time: a save first waits for the previous one, and raises its error if it failed."""
        if not self.env.master:
            return None
        cdir = self.run_dir / "checkpoints"
        name = f"step_{self.step:08d}"
        if self._saved_step == self.step:  # e.g. the last step was also a periodic save: written once
            if wait:
                self.wait_for_save()
            return cdir / f"{name}.safetensors"
        self.wait_for_save()
        # Copies, also on CPU: the next steps update parameters and optimizer state in place.
        snapshot = lambda d: {k: v.detach().to("cpu", copy=True) for k, v in d.items()}  # noqa: E731
        model_state = snapshot(self.model.state_dict())
        model_meta = ckpt.checkpoint_metadata(self.config, step=str(self.step), epoch=str(self.epoch))
        options = {**dataclasses.asdict(self.opts), "config": self.config.name, "batch_size": self.batch_size,
                   "world_size": self.env.world_size, "amp": self.amp, "fused": self.fused}
        tensors, meta = training_state(self.optimizer, self.scheduler, self.scaler, self.step, self.epoch,
                                       self.batch_in_epoch, {"options": options})
        tensors = snapshot(tensors)
        latest = {"step": self.step, "model": f"checkpoints/{name}.safetensors",
                  "state": f"checkpoints/{name}.state.safetensors", "state_json": f"checkpoints/{name}.state.json"}

        def write() -> None:  # latest.json last: it only ever points at a complete checkpoint
            ckpt.save_tensors(cdir / f"{name}.safetensors", model_state, model_meta)
            ckpt.save_tensors(cdir / f"{name}.state.safetensors", tensors, {"format": STATE_FORMAT})
            ckpt.atomic_write(cdir / f"{name}.state.json",
                              lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
            ckpt.atomic_write(self.run_dir / "latest.json", lambda tmp: Path(tmp).write_text(json.dumps(latest)))
            self._prune(cdir, keep_also=name)

        if self._save_pool is None:
            self._save_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ostnet-checkpoint")
        self._pending_save, self._saved_step = self._save_pool.submit(write), self.step
        if wait:
            self.wait_for_save()
        return cdir / f"{name}.safetensors"

    def wait_for_save(self) -> None:
        """Block until the checkpoint being written (if any) is on disk; raise its error if it failed."""
        pending, self._pending_save = self._pending_save, None
        if pending is not None:
            pending.result()

    def _raise_if_a_save_failed(self) -> None:
        """Called every step: a background write that failed ends the run now, not at the next save."""
        if self._pending_save is not None and self._pending_save.done():
            self.wait_for_save()

    def _prune(self, cdir: Path, keep_also: str) -> None:
        """Keep the newest keep_checkpoints step names, and always `keep_also` (the one latest.json names:
        after --resume from an older checkpoint, newer names can be left from the abandoned run)."""
        keep = max(1, self.opts.keep_checkpoints)
        steps = sorted({p.name.split(".")[0] for p in cdir.glob("step_*.safetensors")} - {keep_also})
        for old in steps[:len(steps) - (keep - 1)]:
            for suffix in (".safetensors", ".state.safetensors", ".state.json"):
                (cdir / f"{old}{suffix}").unlink(missing_ok=True)

    def _open_logs(self):
        self._csv = None
        self._tb = None
        if not self.env.master:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._csv_path = self.run_dir / "log.csv"
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        except Exception:  # tensorboard not installed: CSV + stdout only
            self._tb = None
            self.log(f"logging to stdout and {self._csv_path} (install tensorboard for TensorBoard logs)")

    def _write_log(self, row: dict) -> None:
        if not self.env.master:
            return
        new = not self._csv_path.exists()
        with open(self._csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, row["step"])
        terms = " ".join(f"{k}={v:.4f}" for k, v in row.items() if k not in ("step", "epoch", "lr", "samples_per_s"))
        self.log(f"step {row['step']} epoch {row['epoch']} lr {row['lr']:.2e} {terms} "
                 f"({row['samples_per_s']:.1f} samples/s)")

    # -- loop ---------------------------------------------------------------------------------------
    def _sync_stop(self, force: bool = False) -> bool:
        """Whether any rank got SIGTERM. Under DDP an all-reduce (a host sync), so it runs every
        STOP_CHECK_EVERY steps and at epoch ends only; every rank is at the same step when it does."""
        if not self.env.enabled:
            return self.stop_requested
        if not force and self.step % STOP_CHECK_EVERY:
            return False
        return self._reduce_flag(self.stop_requested, dist.ReduceOp.MAX)

    def _loader(self):
        """Batches from the next one to train (self.epoch, self.batch_in_epoch) to the end of the run."""
        self.sampler = EpochSampler(self.dataset, self.env.world_size, self.env.rank, self.opts.seed,
                                    self.batch_size, self.config.train.num_epochs, start_epoch=self.epoch,
                                    skip=self.batch_in_epoch * self.batch_size)
        # No more workers than cores: beyond that they only contend (and torch warns).
        workers = min(self.opts.num_workers, os.cpu_count() or 1)
        # Workers start by spawn, not fork: the parent holds CUDA, Triton and FFmpeg (PyAV) threads, and a
        # forked child can inherit one of their locks held (a hang, not an error).
        return torch.utils.data.DataLoader(
            EpochItems(self.dataset), batch_size=self.batch_size, sampler=self.sampler, num_workers=workers,
            drop_last=True, pin_memory=self.device.type == "cuda",
            worker_init_fn=_ignore_sigterm if workers > 0 else None,
            multiprocessing_context="spawn" if workers > 0 else None,
            prefetch_factor=4 if workers > 0 else None)

    def step_fn(self, inputs):
        if self._graphed is not None:
            return self._graphed(inputs)
        return train_step(self.step_model, self.optimizer, self.scaler, inputs, self.amp_ctx,
                          self.config.train.grad_clip, self.params, self.grad_sync)

    def _first_step(self, inputs):
        try:
            return self.step_fn(inputs)
        except Exception as e:
            if self.opts.compile:
                raise RuntimeError(f"torch.compile failed on the training step ({type(e).__name__}: {first_line(e)}); "
                                   "run without --compile") from e
            raise

    def run(self) -> int:
        self.setup()
        self._open_logs()
        self.log(f"training step: {self.step_mode}")
        max_steps = self.opts.max_steps
        total_steps = self.steps_per_epoch * self.config.train.num_epochs
        if max_steps is not None:
            total_steps = min(total_steps, max_steps)
        previous = {}
        if threading_main():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_stop_signal)
        self._pbar = None
        if self.env.master and self.opts.progress:
            from tqdm import tqdm
            self._pbar = tqdm(total=total_steps, initial=min(self.step, total_steps), unit="step", dynamic_ncols=True)
        stopped = False
        loader_iter = None
        try:
            t_last, steps_since = time.perf_counter(), 0
            first = True
            loader_iter = iter(self._loader())
            while self.epoch < self.config.train.num_epochs and (max_steps is None or self.step < max_steps):
                try:
                    batch = next(loader_iter)
                except StopIteration:
                    break
                except Exception:
                    if self.stop_requested:  # workers killed with us (e.g. a process-group SIGTERM)
                        stopped = True
                        break
                    if self.step > 0 and not self.env.enabled:  # e.g. a corrupt video: keep what was trained
                        try:
                            self.save()
                            self.log(f"saved a checkpoint at step {self.step} before stopping on the error "
                                     f"below; fix or remove that file, then --resume {self.run_dir} (a dataset "
                                     "of another length is drawn in another order)")
                        except Exception as save_error:  # the loader's error is the one to report
                            self.log(f"warning: could not save a checkpoint ({save_error})")
                    raise
                gen = step_generator(self.opts.seed, self.env.rank, self.step)
                inputs = prepare_batch(batch, gen, self.config, self.device, self.memory_format)
                if first:
                    # Both can take minutes (worker start-up; Triton and cuDNN compiling on a cold cache):
                    # say so, so that a slow start is not mistaken for a hang.
                    self.log(f"first batch after {time.perf_counter() - t_last:.1f} s")
                    t_first = time.perf_counter()
                    total, losses, grad_norm = self._first_step(inputs)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    self.log(f"first step took {time.perf_counter() - t_first:.1f} s (kernels compile on it)")
                    first = False
                else:
                    total, losses, grad_norm = self.step_fn(inputs)
                epoch, lr = self.epoch, float(self.optimizer.param_groups[0]["lr"])  # what this step ran with
                self.step += 1
                self.batch_in_epoch += 1
                if self.batch_in_epoch >= self.steps_per_epoch:  # the state always names the next batch
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    self.scheduler.step()
                steps_since += 1
                if self._pbar is not None:
                    self._pbar.update(1)
                log_now = self.step % max(1, self.opts.log_every) == 0 or self.step == 1
                # Before the log's .item() calls: under torchrun a rank that stalls leaves the others waiting
                # in this step's all-reduce. Inside a CUDA graph no watchdog times that out; the stop check's
                # own all-reduce is watched (NCCL timeout), so it comes first and a stall ends in an error.
                stop = self._sync_stop(force=self.batch_in_epoch == 0 or log_now)
                if log_now:
                    now = time.perf_counter()
                    rate = steps_since * self.batch_size * self.env.world_size / max(now - t_last, 1e-9)
                    row = {"step": self.step, "epoch": epoch, "lr": lr,
                           "loss": total.item(), **{k: v.item() for k, v in losses.items()},
                           "grad_norm": grad_norm.item(),
                           "samples_per_s": rate}
                    if not math.isfinite(row["loss"]):
                        self.log(f"warning: non-finite loss at step {self.step}")
                    self._write_log(row)
                    t_last, steps_since = now, 0
                self._raise_if_a_save_failed()
                if self.step % max(1, self.opts.save_every) == 0:
                    self.save(wait=False)
                if stop:
                    stopped = True
                    break
            self.save()
            self.stopped = stopped
            if self.env.enabled:
                self._check_ranks_agree()
            if stopped:
                self.log(f"{self.stopped_by or 'stopped'}: saved a checkpoint at step {self.step}; continue with "
                         f"--resume {self.run_dir}")
            else:
                limit = ("--max-steps" if self.opts.max_steps is not None and self.step >= self.opts.max_steps
                         else f"num_epochs = {self.config.train.num_epochs} of the config")
                self.log(f"done: {self.step} steps (stopped by {limit}); checkpoint in {self.run_dir / 'latest.json'}")
            return 0
        finally:
            if self._pbar is not None:
                self._pbar.close()
                self._pbar = None
            if self._tb is not None:
                self._tb.close()
            shutdown = getattr(loader_iter, "_shutdown_workers", None)
            if shutdown is not None:  # now, not at exit: workers ignore SIGTERM, so exit could wait on them forever
                shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            # Last, after the cleanup above (an interrupt while waiting must not skip it): a periodic
            # checkpoint still being written when an error ends the run is finished.
            try:
                self.wait_for_save()
            except Exception as e:
                self.log(f"warning: the checkpoint being written in the background failed ({first_line(e)})")
            finally:
                if self._save_pool is not None:
                    self._save_pool.shutdown(wait=False)  # its last job is done, or it is being interrupted
                    self._save_pool = None

    def _warn_every_rank(self, msg: str) -> None:
        """A message from any rank (log() prints rank 0's only): what went wrong on this one."""
        if self.env.master:
            self.log(msg)
        else:
            print(f"rank {self.env.rank}: {msg}", file=sys.stderr, flush=True)

    def _ok_on_every_rank(self, ok: bool) -> bool:
        """True on every rank if `ok` is True on every rank (an all-reduce: all ranks call it together)."""
        return self._reduce_flag(ok, dist.ReduceOp.MIN)

    def _reduce_flag(self, flag: bool, op) -> bool:
        """`flag` combined over the ranks by `op` (MAX: any rank; MIN: every rank), on every rank."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=op)
        return bool(t.item())

    def _check_ranks_agree(self) -> bool:
        """DDP keeps one model on every rank: compare per-parameter float64 sums across ranks, exactly."""
        sums = torch.stack([p.detach().double().sum() for p in self.model.parameters()])
        gathered = [torch.empty_like(sums) for _ in range(self.env.world_size)]
        dist.all_gather(gathered, sums)
        worst = max((g - gathered[0]).abs().max().item() for g in gathered)
        if worst == 0:
            self.log(f"DDP: the weights are identical on all {self.env.world_size} ranks")
        else:
            self.log(f"warning: DDP ranks hold different weights (largest per-parameter sum difference {worst:.3g})")
        return worst == 0

    def _on_stop_signal(self, signum, frame) -> None:
        """SIGTERM or Ctrl-C: finish the step, save, exit. A second Ctrl-C aborts at once (nothing saved)."""
        if signum == signal.SIGINT and self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        self.stopped_by = signal.Signals(signum).name
        if signum == signal.SIGINT:
            self.log("Ctrl-C: saving a checkpoint after this step (Ctrl-C again to abort without saving)")


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def run_training(opts: TrainOptions, dataset=None, dist_env: DistEnv | None = None) -> Trainer:
    """Train per opts; returns the Trainer (its model, step, ...) for callers that need them."""
    trainer = Trainer(opts, dist_env=dist_env, dataset=dataset)
    try:
        trainer.run()
    finally:
        if trainer.env.enabled and dist.is_initialized():
            if getattr(trainer, "_graphed", None) is not None:
                trainer._graphed.release()  # before the communicator goes, or the process hangs at exit
            dist.barrier()
            dist.destroy_process_group()
    return trainer


def main(argv=None) -> int:
    """Entry point of `python -m ostnet_fast.train` / torchrun."""
    import argparse
    parser = argparse.ArgumentParser(prog="ostnet_fast.train",
                                     description="Train OSTNet (one process or torchrun DDP).")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    return run_cli(options_from_args(args), prog="ostnet_fast.train")


def run_cli(opts: TrainOptions, prog: str = "ostnet-fast train") -> int:
    from ..data.dataset import DatasetError
    if hasattr(signal, "SIGUSR1") and threading_main():
        # `kill -USR1 PID` prints every thread's stack to stderr and training goes on: for a run that seems stuck.
        with contextlib.suppress(ValueError, OSError):  # stderr without a file descriptor (captured)
            faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        trainer = run_training(opts)
    except (UsageError, DatasetError, ckpt.CheckpointError) as e:
        message = str(e)
        if "Original Traceback" in message:  # raised in a DataLoader worker: its own message is the last line
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: aborted (Ctrl-C twice): nothing saved since the last checkpoint", file=sys.stderr)
        return 130
    # Stopped by a signal: the checkpoint is saved, but the run is not finished (for `train && eval`).
    return {"SIGINT": 130}.get(trainer.stopped_by, 143) if trainer.stopped else 0
