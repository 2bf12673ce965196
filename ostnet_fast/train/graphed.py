"""The training step as one CUDA graph.

Eager, a training step of OSTNet + its losses launches a few thousand small kernels, and the host cannot
launch them as fast as an H100 runs them: the GPU waits on Python for about half of every step (profile
with `bench/profile_train.py`). Captured once in a CUDA graph, the whole step -- forward, backward,
gradient clipping and Adam -- is replayed with one launch.

What capture needs, and how this module provides it:
- static shapes and addresses: the batch is copied into tensors the graph owns; a batch of another shape
  runs eagerly (the DataLoader drops incomplete batches, so that does not happen in training);
- no host synchronisation inside the step: no `.item()`, no GradScaler (fp16 AMP's inf checks read the
  GPU), so graphs run with bf16 AMP or none; Adam runs with `capturable=True` (its step count on the GPU);
- warm-up before capture: the first `warmup` steps run eagerly (real steps, not thrown away) on a side
  stream, so cuDNN and Triton pick and compile their kernels, and Adam creates its state;
- Python constants are frozen into the graph: the learning rate is one, so a new learning rate (the
  scheduler's milestones) captures the step again.
If capture fails, the step says why once and runs eagerly from then on: slower, never wrong.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import torch

from ..runtime.cuda_graph import root_cause

log = logging.getLogger(__name__)

Step = Callable[[tuple], tuple]  # inputs -> (total, {name: loss}, grad_norm)


class GraphedTrainStep:
    """`step(inputs)`: `update(inputs)` (forward + backward + optimizer step, gradients left in .grad) replayed
    from a CUDA graph. `update` must not synchronise with the host; `optimizer` must be capturable.
    Replays write the gradients into the graph's own buffers: after an eager step (a batch of another shape)
    `.grad` holds that step's gradients until the next capture, not the replays'. Read results from what
    the step returns.

    Under torchrun every rank has its own step: `agree(ok)` (an all-reduce of "my capture worked", True
    only if it worked everywhere) makes all ranks fall back together when one rank's capture fails, and
    `warn` says why on the rank where it happened."""

    def __init__(self, update: Step, optimizer: torch.optim.Optimizer, warmup: int = 3,
                 say: Callable[[str], None] | None = None, warn: Callable[[str], None] | None = None,
                 agree: Callable[[bool], bool] | None = None):
        if warmup < 1:
            raise ValueError(f"GraphedTrainStep: warmup must be >= 1 eager step (kernels must be chosen and "
                             f"compiled before capture), got {warmup}")
        for group in optimizer.param_groups:
            if not group.get("capturable", False):
                raise ValueError("GraphedTrainStep: the optimizer must be built with capturable=True "
                                 "(its step count must live on the GPU)")
        self.update, self.optimizer, self.warmup = update, optimizer, warmup
        self.say = say or log.warning  # capture messages
        self.warn = warn or self.say  # why capture failed
        self.agree = agree
        self.eager_steps = 0
        self.captures = 0
        self.replays = 0
        self.failed: str | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: tuple[torch.Tensor, ...] | None = None
        self._outputs: tuple | None = None
        self._lrs: list | None = None

    def _eager(self, inputs: tuple) -> tuple:
        self.optimizer.zero_grad(set_to_none=True)
        self.eager_steps += 1
        return self.update(inputs)

    def _shapes_match(self, inputs: tuple) -> bool:
        return self._inputs is not None and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device for a, b in zip(self._inputs, inputs))

    def _capture(self, inputs: tuple) -> None:
        self._graph, self._outputs = None, None  # the previous capture's memory goes with them
        self.optimizer.zero_grad(set_to_none=True)  # backward then allocates .grad inside the graph's pool
        if not self._shapes_match(inputs):
            self._inputs = tuple(t.detach().clone() for t in inputs)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        # thread_local: other threads (the DataLoader's pin-memory thread) may call CUDA meanwhile.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = self.update(self._inputs)
        self._graph, self._outputs = graph, outputs
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        why = "replayed from now on" if self._lrs is None else f"again: learning rate {self._lrs[0]:.3g} -> {lrs[0]:.3g}"
        self._lrs = lrs
        self.captures += 1
        self.say(f"training step captured in a CUDA graph in {time.perf_counter() - t0:.1f} s ({why})")

    def release(self) -> None:
        """Drop the captured graph (the next call captures again). Under torchrun this must happen before
        destroy_process_group(): a graph holding a captured all-reduce keeps the communicator from being
        destroyed, and the process never exits (pytorch/pytorch#115388)."""
        graph, self._graph, self._outputs = self._graph, None, None
        if graph is not None:
            # After a CUDA error this raises too: the graph is dropped already (CUDA frees an exec graph
            # still running when it completes), so the caller's clean-up goes on.
            with contextlib.suppress(RuntimeError):
                torch.cuda.synchronize()
        self._lrs = None

    def __call__(self, inputs: tuple) -> tuple:
        if self.failed is not None:
            return self._eager(inputs)
        if self.eager_steps < self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._eager(inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self._graph is not None and not self._shapes_match(inputs):
            return self._eager(inputs)  # another batch shape: not what was captured
        if self._graph is None or [group["lr"] for group in self.optimizer.param_groups] != self._lrs:
            error = None
            try:
                self._capture(inputs)
            except Exception as e:  # noqa: BLE001 -- any capture failure: say why, train on eagerly
                error = root_cause(e)
                torch.cuda.synchronize()
            if self.agree is not None and not self.agree(error is None) and error is None:
                error = "it failed on another rank"
            if error is not None:  # this rank's graph, if it captured one, is never replayed
                self._graph, self._outputs = None, None
                self.failed = error
                self.warn(f"CUDA graph capture of the training step failed ({error}); "
                          "training on without graphs (--no-cuda-graphs hides this message)")
                return self._eager(inputs)
        for static, new in zip(self._inputs, inputs):
            static.copy_(new, non_blocking=True)
        self._graph.replay()
        self.replays += 1
        return self._outputs
