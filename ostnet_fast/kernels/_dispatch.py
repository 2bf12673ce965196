"""One switch for the implementation of every fused op.

`impl="auto"` takes the Triton kernel on CUDA tensors and the pure-PyTorch reference otherwise:
off CUDA, under `torch.onnx.is_in_onnx_export()` or `torch.export`, or with `OSTNET_IMPL=reference` in the
environment; `OSTNET_REFERENCE_OPS=zconv_block,tps_warp` sends only the listed ops (names as in OPS) to the
reference, to time or debug one kernel at a time. Under torch.compile every kernel enters the graph as its
custom op (`torch.ops.ostnet.*`, opaque to dynamo; each op's file registers it; `ops_in_graph` counts them
in a compiled graph), eagerly as its autograd Function. `impl="triton"` forces the kernel (on CPU only under
`TRITON_INTERPRET=1`, which the tests use); a forced kernel that cannot run raises, it never falls back
silently.
"""
from __future__ import annotations

import collections
import functools
import logging
import os

import torch

from . import _triton_utils

log = logging.getLogger("ostnet_fast.kernels")
IMPLS = ("auto", "reference", "triton")
OPS = ("conv2d", "dense_motion_combine", "dense_motion_front", "grid_sample", "keypoint_head", "tps_grid", "tps_warp",
       "zconv_block")


def triton_available() -> bool:
    return _triton_utils.HAS_TRITON  # a plain attribute: dynamo traces it without a cache wrapper


def exporting() -> bool:
    """torch.export (and the exporters built on it) is tracing. Reads the flag behind
    torch.compiler.is_exporting(): dynamo in torch 2.11 folds that call to True under plain torch.compile
    too (pytorch/pytorch#176347, fixed by #176499), which sent every compiled fused model to the reference;
    dynamo traces a read of the module attribute as the value it has."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def ops_in_graph(gm: torch.fx.GraphModule) -> collections.Counter:
    """How many times each torch.ops.ostnet.* op (by name, forward and backward ops apart) is called in an FX
    graph, e.g. one torch.compile hands its backend: what a compiled model really runs of ours."""
    names = (str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    return collections.Counter(name.split(".")[1] for name in names if name.startswith("ostnet."))


def recording_backend(graphs: list):
    """A torch.compile backend that appends (kind, graph module), kind "forward" or "backward", for each graph
    AOTAutograd hands it and runs the graph eagerly (no inductor): with ops_in_graph, what a compiled model
    really runs of ours (bench/compiled_ops.py, the compiled-step tests)."""
    from torch._dynamo.backends.common import aot_autograd

    def recorder(kind):
        def compiler(gm, example_inputs):
            graphs.append((kind, gm))
            return gm.forward
        return compiler
    return aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))


def reference_ops() -> set[str]:
    """The ops OSTNET_REFERENCE_OPS sends to the reference (comma list); an unknown name is an error."""
    names = {n.strip() for n in os.environ.get("OSTNET_REFERENCE_OPS", "").split(",") if n.strip()}
    unknown = names - set(OPS)
    if unknown:
        raise ValueError(f"OSTNET_REFERENCE_OPS: unknown op(s) {sorted(unknown)}; known: {OPS}")
    return names


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _log_fallback_once(op: str, why: str) -> None:
    log.info("%s: using the PyTorch reference (%s)", op, why)


def forced(impl: str) -> bool:
    """The kernel was asked for by name (impl="triton", or "auto" with OSTNET_IMPL=triton): no heuristic may
    send the op to the reference."""
    return impl == "triton" or (impl == "auto" and os.environ.get("OSTNET_IMPL") == "triton")


def use_triton(op: str, impl: str, *tensors: torch.Tensor | None) -> bool:
    """Decide whether `op` runs its Triton kernel for these tensors."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if op in reference_ops():
            return False
        impl = os.environ.get("OSTNET_IMPL", "auto")
        if impl not in IMPLS:
            raise ValueError(f"OSTNET_IMPL must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return False
    present = [t for t in tensors if t is not None]
    on_cuda = all(t.is_cuda for t in present)
    if impl == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: impl='triton' but triton is not installed (pip install triton)")
        if not on_cuda and not interpreting():
            raise RuntimeError(f"{op}: impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 on CPU")
        return True
    # auto
    if torch.onnx.is_in_onnx_export() or exporting():
        return False  # exported graphs run without Python: no torch.ops.ostnet.* in them
    if not on_cuda:
        return False
    if not triton_available():
        if not torch.compiler.is_compiling():  # a logger call would break dynamo's graph
            _log_fallback_once(op, "triton is not installed")
        return False
    return True
