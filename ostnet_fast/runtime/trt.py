"""`TRTReenactor`: the TensorRT (or TensorRT-RTX) engines from `build_trt.py`, buffers as torch tensors.

    r = TRTReenactor("engine_dir")        # source.engine + frame.engine (+ their .json sidecars)
    r.set_source(src)                     # (1, 3, S, S) float in [0, 1], on any device
    out = r(frames)                       # (N, 3, S, S) -> (N, 3, S, S) float32 on the engine's GPU

Memory: every I/O tensor is a torch CUDA tensor allocated once. The source engine's outputs are the
frame engine's source inputs (same tensors, no copy). Frame buffers are allocated once per batch size
N and keep their addresses, so after one call at a given N the call is CUDA-graph capturable (enqueue
on the current torch stream; `torch.cuda.graph` capture of `r(x)` works like any torch op). The result
is a view of the static output buffer, valid until the next call at that N (the `Reenactor` backend
protocol); `copy_outputs=True` returns clones.

Before loading, the engine sidecars are checked against this runtime (`check_engine_sidecar`): an engine
built with another TensorRT flavour or version, or for another GPU (compute capability; the GPU name for
standard TensorRT, `strict_gpu=False` to accept a same-capability GPU with a warning; TensorRT-RTX's
target set otherwise), is refused with a message saying how to rebuild. TensorRT-RTX engines do not
run on Hopper (CC 9.0): on an H100 build with standard TensorRT.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..export.common import GRAPHS, engine_name, sha256_file
from ._common import check_image, load_pair

log = logging.getLogger(__name__)


class EngineMismatch(RuntimeError):
    """The engine was built for another TensorRT or GPU than the one at hand."""


def cc_in_targets(cc: str, targets: list[str]) -> bool:
    """'8.6' in ['8.0', '8.6', '8.9', '12.x'] -> True; '9.0' -> False. 'M.x' matches any minor of M."""
    major = cc.split(".")[0]
    return any(t == cc or (t.endswith(".x") and t[:-2] == major) for t in targets)


def check_engine_sidecar(sidecar: dict[str, Any], flavour: str, version: str, gpu_name: str, gpu_cc: str,
                         strict_gpu: bool = True) -> list[str]:
    """Raise EngineMismatch if the engine described by `sidecar` cannot run on this runtime + GPU;
    -> warnings (e.g. a same-capability GPU of another name with strict_gpu=False). Pure: unit-testable."""
    what = sidecar.get("file", "engine")
    rebuild = "rebuild it here with python export/build_trt.py"
    built = sidecar.get("tensorrt") or {}
    if built.get("flavour") != flavour:
        raise EngineMismatch(f"{what} was built with {built.get('flavour')!r} but this runtime is {flavour!r}; "
                             f"install the matching package or {rebuild}")
    if built.get("version") != version:
        raise EngineMismatch(f"{what} was built with {flavour} {built.get('version')} but this runtime has "
                             f"{version} (engines are tied to the exact version); {rebuild}")
    target = sidecar.get("built_for") or {}
    warnings: list[str] = []
    if flavour == "tensorrt-rtx":
        targets = target.get("targets") or []
        if not cc_in_targets(gpu_cc, targets):
            raise EngineMismatch(f"{what} targets compute capability {targets} (TensorRT-RTX) but this GPU, "
                                 f"{gpu_name}, is {gpu_cc}; TensorRT-RTX runs on 8.0/8.6/8.9/12.x only: "
                                 f"use standard TensorRT on this GPU, or build with --compute-capability")
        return warnings
    if target.get("compute_capability") != gpu_cc:
        raise EngineMismatch(f"{what} was built for {target.get('gpu')} (compute capability "
                             f"{target.get('compute_capability')}) but this GPU is {gpu_name} ({gpu_cc}); {rebuild}")
    if target.get("gpu") != gpu_name:
        msg = (f"{what} was built on {target.get('gpu')} and this GPU is {gpu_name} (same compute capability "
               f"{gpu_cc}); TensorRT tunes per GPU model")
        if strict_gpu:
            raise EngineMismatch(msg + f": {rebuild}, or pass strict_gpu=False to run it anyway")
        warnings.append(msg)
    return warnings


def _torch_dtype(trt, dtype) -> torch.dtype:
    import numpy as np
    return torch.from_numpy(np.empty(0, dtype=trt.nptype(dtype))).dtype


class TRTReenactor:
    def __init__(self, engine_dir: str | Path, device: str | torch.device = "cuda", strict_gpu: bool = True,
                 copy_outputs: bool = False):
        from ..export.build_trt import import_tensorrt
        self.engine_dir = Path(engine_dir)
        paths = {g: self.engine_dir / engine_name(g) for g in GRAPHS}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"engine(s) not found: {', '.join(missing)} (build with export/build_trt.py)")
        self.sidecars = load_pair(paths)
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(f"TRTReenactor needs a CUDA device, got {device!r} "
                               f"(torch.cuda.is_available() = {torch.cuda.is_available()})")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        flavour = self.sidecars["frame"]["tensorrt"]["flavour"]
        self.trt, self.flavour = import_tensorrt(prefer=flavour)
        gpu_name = torch.cuda.get_device_name(self.device)
        gpu_cc = "%d.%d" % torch.cuda.get_device_capability(self.device)
        for g in GRAPHS:
            for w in check_engine_sidecar(self.sidecars[g], self.flavour, self.trt.__version__, gpu_name, gpu_cc,
                                          strict_gpu):
                log.warning("%s", w)
            expected = self.sidecars[g].get("engine_sha256")
            if expected and sha256_file(paths[g]) != expected:
                raise EngineMismatch(f"{paths[g]} does not match its sidecar's engine_sha256; rebuild")
        self.size = int(self.sidecars["frame"]["image_size"])
        self.channels = int(self.sidecars["frame"]["config"]["model"]["num_channels"])
        self.precision = self.sidecars["frame"]["precision"]
        self.copy_outputs = copy_outputs
        trt = self.trt
        from ..export.build_trt import trt_logger
        self._logger = trt_logger(trt)
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(self._logger)
            self.engines = {}
            for g, p in paths.items():
                engine = self.runtime.deserialize_cuda_engine(p.read_bytes())
                if engine is None:
                    raise EngineMismatch(f"TensorRT ({self.flavour} {trt.__version__}) could not deserialize "
                                         f"{p}; the reason is in the log above")
                self.engines[g] = engine
            self.contexts = {g: e.create_execution_context() for g, e in self.engines.items()}
        self.io = {g: self._io_names(g) for g in GRAPHS}
        # Source engine: static buffers; its outputs double as the frame engine's source inputs.
        self.buffers: dict[str, torch.Tensor] = {}
        src = self.engines["source"]
        for name in self.io["source"]["inputs"] + self.io["source"]["outputs"]:
            self.buffers[name] = self._empty(src, name, tuple(src.get_tensor_shape(name)))
        for name, t in self.buffers.items():
            self.contexts["source"].set_tensor_address(name, t.data_ptr())
        frame_inputs = self.io["frame"]["inputs"]
        for name in frame_inputs[:-1]:
            self.contexts["frame"].set_tensor_address(name, self.buffers[name].data_ptr())
        batch = self.sidecars["frame"].get("batch") or [1, 1, 1]
        self.batch_range = (int(batch[0]), int(batch[2]))
        self._frame_buffers: dict[int, dict[str, torch.Tensor]] = {}
        self._bound_batch: int | None = None
        self._has_source = False
        log.info("TRTReenactor: %s (%s %s, %s, %dx%d, batch %s) on %s", self.engine_dir, self.flavour,
                 trt.__version__, self.precision, self.size, self.size, self.batch_range, gpu_name)

    def _io_names(self, graph: str) -> dict[str, list[str]]:
        trt, engine = self.trt, self.engines[graph]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        io = {"inputs": [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT],
              "outputs": [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]}
        expect = {k: [t["name"] for t in self.sidecars[graph][k]] for k in ("inputs", "outputs")}
        if {k: sorted(v) for k, v in io.items()} != {k: sorted(v) for k, v in expect.items()}:
            raise EngineMismatch(f"{graph}.engine I/O {io} does not match its sidecar {expect}")
        return expect  # sidecar order (the export's order)

    def _empty(self, engine, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if any(d < 0 for d in shape):
            raise ValueError(f"{name}: unresolved dynamic shape {shape}")
        return torch.empty(shape, dtype=_torch_dtype(self.trt, engine.get_tensor_dtype(name)), device=self.device)

    def _frame(self, n: int) -> dict[str, torch.Tensor]:
        """Per-batch buffers (allocated once, fixed addresses) bound to the frame context."""
        ctx, engine = self.contexts["frame"], self.engines["frame"]
        bufs = self._frame_buffers.get(n)
        if bufs is None:
            shape = (n, self.channels, self.size, self.size)
            if not ctx.set_input_shape("driving", shape):
                raise ValueError(f"frame engine refused driving shape {shape} (profile {self.batch_range})")
            bufs = {"driving": self._empty(engine, "driving", shape)}
            for name in self.io["frame"]["outputs"]:
                bufs[name] = self._empty(engine, name, tuple(ctx.get_tensor_shape(name)))
            self._frame_buffers[n] = bufs
            self._bound_batch = None
        if self._bound_batch != n:
            ctx.set_input_shape("driving", tuple(bufs["driving"].shape))
            for name, t in bufs.items():
                ctx.set_tensor_address(name, t.data_ptr())
            self._bound_batch = n
        return bufs

    def _execute(self, graph: str) -> None:
        stream = torch.cuda.current_stream(self.device)
        if not self.contexts[graph].execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed on the {graph} engine (see the log)")

    def set_source(self, x: torch.Tensor) -> None:
        """x (1, C, S, S) float in [0, 1]: runs the source engine once into the static buffers."""
        check_image(x, "source", self.channels, self.size, batch=1)
        with torch.cuda.device(self.device):
            self.buffers["source"].copy_(x, non_blocking=True)
            self._execute("source")
        self._has_source = True

    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (N, C, S, S) -> every frame-engine output by name (static buffers unless copy_outputs)."""
        if not self._has_source:
            raise RuntimeError("call set_source(source) before animating frames")
        check_image(x, "driving", self.channels, self.size, batch_range=self.batch_range)
        with torch.cuda.device(self.device):
            bufs = self._frame(x.shape[0])
            bufs["driving"].copy_(x, non_blocking=True)
            self._execute("frame")
        outs = {n: bufs[n] for n in self.io["frame"]["outputs"]}
        return {n: t.clone() for n, t in outs.items()} if self.copy_outputs else outs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, S, S) float in [0, 1] -> prediction (N, C, S, S) float32 on the engine's GPU."""
        return self.run(x)["prediction"]
