"""CUDA-graph capture of a fixed-shape step (the per-frame `animate` with the source cached).

Replaying a graph removes the per-kernel launch cost, which dominates OSTNet at batch 1 (hundreds of
small kernels). Inputs are copied into static buffers; the returned tensors are the graph's static
outputs, overwritten by the next replay (clone them if you keep them).
"""
from __future__ import annotations

from typing import Callable

import torch

from .._errors import first_line


class GraphedStep:
    def __init__(self, fn: Callable[..., object], example_inputs: tuple[torch.Tensor, ...], warmup: int = 3,
                 pool=None):
        if not all(t.is_cuda for t in example_inputs):
            raise ValueError("GraphedStep needs CUDA tensors")
        self.fn = fn
        self.static_inputs = tuple(t.detach().clone() for t in example_inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (cuDNN autotune, Triton compile) outside the capture
            for _ in range(warmup):
                fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.static_outputs = fn(*self.static_inputs)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(t.shape) for t in self.static_inputs)

    def __call__(self, *inputs: torch.Tensor):
        if tuple(tuple(t.shape) for t in inputs) != self.shapes:
            raise ValueError(f"GraphedStep was captured for shapes {self.shapes}, got "
                             f"{tuple(tuple(t.shape) for t in inputs)}")
        for static, new in zip(self.static_inputs, inputs):
            static.copy_(new, non_blocking=True)
        self.graph.replay()
        return self.static_outputs


def root_cause(e: BaseException) -> str:
    """The first error of a failed capture, in one line. The op that cannot be captured raises; leaving
    the capture then raises 'operation failed due to a previous error during capture', which hides it."""
    while e.__context__ is not None and "previous error during capture" in str(e):
        e = e.__context__
    return f"{type(e).__name__}: {first_line(e)}"
