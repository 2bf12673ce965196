"""`Reenactor`: one API over the inference backends.

    r = Reenactor(checkpoint="ostnet.safetensors", backend="fused", device="cuda", fp16=True)
                                        # (fused=True is the same as backend="fused", fused=False as "torch")
    r.set_source(photo)                 # (H, W, 3) uint8 RGB, any size; processed once (encode_source)
    out = r(frame)                      # (H, W, 3) uint8 -> (S, S, 3) uint8; (N, H, W, 3) -> (N, S, S, 3)
    out = r(batch)                      # float tensors (N, 3, H, W) in [0, 1] -> (N, 3, S, S) float
    for face in r.stream(frames, batch_size=8): ...

A backend is any object with `set_source(x)` ((1, 3, S, S) float tensor on the device) and
`__call__(x)` ((N, 3, S, S) -> (N, 3, S, S) prediction in [0, 1]; the result may be a view of a static
buffer, valid until the next call). Backends:
  torch        TorchBackend: the reference model (OSTNet(fused=False)), eager.
  fused        FusedBackend: OSTNet(fused=True) (Triton kernels on CUDA) and, with cuda_graphs=True on
               CUDA, `animate` captured in a CUDA graph per batch shape (smaller batches are padded);
               compile=True puts the step through torch.compile first (our kernels stay, as custom
               ops; inductor fuses the code between them): the fastest frame measured, for ~30 s of
               compiling at the first frame of each batch shape (bench/results/h200-2026-11-30-s6).
  onnxruntime  ostnet_fast.runtime.ORTReenactor   (exported ONNX graphs; written by the export issue)
  tensorrt     ostnet_fast.runtime.TRTReenactor   (TensorRT engines)
fp16 runs the torch/fused backends under torch.autocast(float16) (CUDA only); the fused backend's own copy
of the model keeps its convolutions' weights in fp16 (OSTNet.cast_conv_weights: no casts in every frame).

Relative motion (FOMM's `normalize_kp`, `relative=True`): the keypoints OSTNet feeds the dense motion
network (those of the scale-rectified driving frame) become
    kp = kp_S + s * (kp_D - kp_D0),     J = J_D @ inv(J_D0) @ J_S,
with kp_D0 the keypoints of the first frame after `set_source`, and s = sqrt(area(hull(kp_S)) /
area(hull(kp_D0))) when adapt_movement_scale, else 1. Absolute mode (default) uses kp_D as is.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .._errors import first_line
from ..config import Config, load_config
from ..kernels import inverse_2x2
from ..model import OSTNet, SourceState

log = logging.getLogger(__name__)

BACKENDS = ("torch", "fused", "onnxruntime", "tensorrt")


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run here (missing package, module or device)."""


# --------------------------------------------------------------------------------------------------
# Relative motion


def hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (K, 2) points (Andrew's monotone chain + shoelace; 0 if degenerate)."""
    pts = sorted(map(tuple, np.asarray(points, dtype=np.float64).reshape(-1, 2)))
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
    lower: list = []
    upper: list = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.array(lower[:-1] + upper[:-1])  # counter-clockwise
    x, y = hull[:, 0], hull[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


class RelativeMotion:
    """FOMM's relative keypoint transfer as an `OSTNet.animate(kp_transform=...)` callback.

    `reset(kp_source)` on every new source; the first call after it takes frame 0 of its batch as the
    initial driving pose (kp_D0) and fixes the movement scale. Later calls are pure tensor code on
    persistent buffers (updated in place), so they can be captured in a CUDA graph."""

    def __init__(self, adapt_movement_scale: bool = True, relative_jacobian: bool = True):
        self.adapt_movement_scale = adapt_movement_scale
        self.relative_jacobian = relative_jacobian
        self.kp_source: dict[str, torch.Tensor] | None = None
        self.initialized = False
        self._init_value: torch.Tensor | None = None    # (1, K, 2) kp_D0
        self._init_jac_inv: torch.Tensor | None = None  # (1, K, 2, 2) inv(J_D0)
        self._scale: torch.Tensor | None = None         # () movement scale s

    def reset(self, kp_source: dict[str, torch.Tensor]) -> None:
        self.kp_source = kp_source
        self.initialized = False

    @staticmethod
    def _store(buf: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
        if buf is not None and buf.shape == value.shape and buf.dtype == value.dtype and buf.device == value.device:
            return buf.copy_(value)  # in place: graphs captured on the buffer stay valid
        return value.clone()

    def _initialize(self, kp: dict[str, torch.Tensor]) -> None:
        value = kp["value"][:1].detach()  # (1, K, 2)
        self._init_value = self._store(self._init_value, value)
        scale = 1.0
        if self.adapt_movement_scale:
            src = hull_area(self.kp_source["value"][0].detach().float().cpu().numpy())
            drv = hull_area(value[0].float().cpu().numpy())
            scale = float(np.sqrt(src) / np.sqrt(drv)) if drv > 0 else 1.0
        self._scale = self._store(self._scale, torch.tensor(scale, dtype=value.dtype, device=value.device))
        if self.relative_jacobian and "jacobian" in kp:
            inv = inverse_2x2(kp["jacobian"][:1].detach().float()).to(kp["jacobian"].dtype)  # (1, K, 2, 2)
            self._init_jac_inv = self._store(self._init_jac_inv, inv)
        self.initialized = True

    @property
    def movement_scale(self) -> float | None:
        return None if self._scale is None or not self.initialized else float(self._scale)

    def __call__(self, kp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.kp_source is None:
            raise RuntimeError("RelativeMotion.reset(kp_source) must be called before use")
        if not self.initialized:
            self._initialize(kp)
        src = self.kp_source
        out = dict(kp)
        out["value"] = src["value"] + self._scale * (kp["value"] - self._init_value)  # (N, K, 2)
        if self.relative_jacobian and "jacobian" in kp and "jacobian" in src:
            jac = kp["jacobian"] @ self._init_jac_inv.to(kp["jacobian"].dtype)  # (N, K, 2, 2)
            out["jacobian"] = jac @ src["jacobian"].to(jac.dtype)
        return out


# --------------------------------------------------------------------------------------------------
# Backends


class TorchBackend:
    """The reference model, eager (`OSTNet(fused=False)`)."""
    name = "torch"
    fused = False

    def __init__(self, model: OSTNet, fp16: bool = False, relative: RelativeMotion | None = None):
        if model.fused != self.fused:
            model = _model_copy(model, fused=self.fused)
        self.model = model.eval()
        self.device = next(model.parameters()).device
        if fp16 and self.device.type != "cuda":
            raise ValueError(f"fp16 needs a CUDA device, the model is on {self.device}")
        self.fp16 = fp16
        self.relative = relative
        self.state: SourceState | None = None

    def _autocast(self):
        if not self.fp16:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.float16, cache_enabled=False)

    @torch.no_grad()
    def set_source(self, x: torch.Tensor) -> None:
        with self._autocast():
            self.state = self.model.encode_source(x)
        if self.relative is not None:
            self.relative.reset(self.state.kp)

    def _animate(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            return self.model.animate(self.state, x, kp_transform=self.relative)["prediction"]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.state is None:
            raise RuntimeError("call set_source(image) before animating frames")
        return self._animate(x)


def _model_copy(model: OSTNet, fused: bool) -> OSTNet:
    copy = OSTNet(model.config, fused=fused)
    copy.load_state_dict(model.state_dict())
    return copy.to(next(model.parameters()).device).eval()


class FusedBackend(TorchBackend):
    """OSTNet(fused=True), and on CUDA with cuda_graphs=True the per-frame step replayed from a CUDA
    graph: captured (after warm-up on a side stream, by GraphedStep) for the largest batch shape seen,
    smaller batches copied into the front of the static input (the rest is padding), re-captured when a
    larger batch or another frame size comes. A new source is copied into the captured source tensors
    in place, so the graph survives `set_source`. The output is a view of the graph's static buffer.
    compile=True: the step goes through `torch.compile` (default mode, static shapes) before capture."""
    name = "fused"
    fused = True

    def __init__(self, model: OSTNet, fp16: bool = False, relative: RelativeMotion | None = None,
                 cuda_graphs: bool = True, channels_last: bool = True, compile: bool = False):
        super().__init__(model, fp16=fp16, relative=relative)
        self.compiled = compile
        if compile:  # the instance attribute shadows the method: every caller gets the compiled step
            self._animate = torch.compile(self._animate, dynamic=False)
        # Channels-last on CUDA: cuDNN's tensor-core convs want NHWC; in NCHW every conv pays two layout
        # transposes (H100, bench/results: 2.13 vs 2.88 ms a frame at batch 1 fp16). fp16 (CUDA only, as
        # TorchBackend checks): the convs' weights stored in fp16, no weight casts in every frame
        # (OSTNet.cast_conv_weights). Both on a copy, so the caller's model (and its checkpoint saving, which
        # needs contiguous fp32 tensors) is untouched.
        self.channels_last = channels_last and self.device.type == "cuda"
        if (self.channels_last or fp16) and self.model is model:  # not already a copy made by TorchBackend
            self.model = _model_copy(model, fused=True)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if fp16:
            self.model.cast_conv_weights(torch.float16)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graph = None
        self._pool = None
        self.captures = 0  # how many times a graph was captured (tests, diagnostics)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.no_grad()
    def set_source(self, x: torch.Tensor) -> None:
        with self._autocast():
            new = self.model.encode_source(self._layout(x))
        old = self.state
        same = old is not None and all(
            (getattr(old, f) is None) == (getattr(new, f) is None) and
            (getattr(new, f) is None or (getattr(old, f).shape == getattr(new, f).shape and
                                         getattr(old, f).dtype == getattr(new, f).dtype))
            for f in ("image", "kp_value", "kp_jacobian", "small", "f1"))
        if same and self._graph is not None:
            for f in ("image", "kp_value", "kp_jacobian", "small", "f1"):
                if getattr(old, f) is not None:
                    getattr(old, f).copy_(getattr(new, f))
        else:
            self.state = new
            self._graph = None
        if self.relative is not None:
            self.relative.reset(self.state.kp)

    def _capture(self, x: torch.Tensor) -> None:
        from ..runtime.cuda_graph import GraphedStep
        self._graph = None
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        if self.compiled:  # compile before the capture: compiling runs host code and synchronizes
            self._animate(self._layout(x))
        self._graph = GraphedStep(self._animate, (self._layout(x),), pool=self._pool)
        self.captures += 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.state is None:
            raise RuntimeError("call set_source(image) before animating frames")
        if not self.cuda_graphs or (self.relative is not None and not self.relative.initialized):
            return self._animate(self._layout(x))  # eager: CPU, or relative mode's first frame (sets kp_D0)
        n = x.shape[0]
        g = self._graph
        if g is None or g.shapes[0][1:] != tuple(x.shape[1:]) or g.shapes[0][0] < n:
            self._capture(x)
            g = self._graph
        static_in = g.static_inputs[0]
        if n == static_in.shape[0]:
            static_in.copy_(x, non_blocking=True)
        else:  # last partial batch: pad (stale frames in the tail are computed and dropped)
            static_in[:n].copy_(x, non_blocking=True)
        g.graph.replay()
        return g.static_outputs[:n]


def _external_backend(name: str, model: OSTNet, device: torch.device, fp16: bool, engine, kwargs):
    cls_name = {"onnxruntime": "ORTReenactor", "tensorrt": "TRTReenactor"}[name]
    try:
        from .. import runtime
        cls = getattr(runtime, cls_name)
    except (ImportError, AttributeError) as e:
        raise BackendUnavailable(f"backend {name!r} needs ostnet_fast.runtime.{cls_name}, which is not "
                                 f"available ({type(e).__name__}: {e})") from None
    params = inspect.signature(cls).parameters
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    extra = {k: v for k, v in (("device", str(device)), ("fp16", fp16)) if accepts_any or k in params}
    extra.update(kwargs)
    try:
        if engine is not None:
            return cls(engine, **extra)
        if hasattr(cls, "from_model"):
            return cls.from_model(model, **extra)
    except (FileNotFoundError, ImportError, RuntimeError, ValueError) as e:  # missing files/packages/GPU
        raise BackendUnavailable(f"backend {name!r} could not start: {type(e).__name__}: {first_line(e)}") from e
    what = "ONNX folder (python export/export_onnx.py)" if name == "onnxruntime" else \
        "TensorRT engine folder (python export/build_trt.py)"
    raise BackendUnavailable(f"backend {name!r} needs its model files: pass engine=PATH (CLI: --engine PATH), "
                             f"the {what}")


# --------------------------------------------------------------------------------------------------
# The user-facing API


def resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("device 'cuda' asked for, but CUDA is not available to this torch build "
                                 f"(torch {torch.__version__}); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device}")
    return device


def build_model(checkpoint: str | Path | None = None, config: str | Path | Config | None = None,
                device: str | torch.device = "cpu", seed: int = 0) -> tuple[OSTNet, Config, bool]:
    """-> (model, config, has_weights). `.safetensors` -> ostnet-fast checkpoint (its stored config);
    any other file -> FOMM `vox-cpk.pth.tar` layout (config default fomm-vox-256); None -> random weights
    (seeded, so runs are repeatable)."""
    from ..checkpoint import load_checkpoint, load_fomm_checkpoint
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.suffix == ".safetensors":
            model, cfg = load_checkpoint(path, device=device)
            if config is not None and load_config(config).model != cfg.model:
                log.warning("--config %s ignored: the checkpoint carries its own config (%s)", config, cfg.name)
        else:
            model, cfg = load_fomm_checkpoint(path, config or "fomm-vox-256", device=device)
        return model.eval(), cfg, True
    cfg = load_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OSTNet(cfg.model)
    return model.to(device).eval(), cfg, False


RANDOM_WEIGHTS_WARNING = ("NO CHECKPOINT: the model has RANDOM weights, so the output is not a reenactment. "
                          "Pass --checkpoint PATH (an ostnet-fast .safetensors or a FOMM vox-cpk.pth.tar).")


def _backend_name(backend: str | None, fused: bool | None) -> str:
    """backend= names one; fused=True / False is OSTNet's spelling of "fused" / "torch"; neither: "torch"."""
    if fused is None:
        return "torch" if backend is None else backend
    implied = "fused" if fused else "torch"
    if backend is not None and backend != implied:
        raise ValueError(f"fused={fused} means backend={implied!r}, but backend={backend!r} was given")
    return implied


class Reenactor:
    """One API over the backends; see the module docstring."""

    def __init__(self, checkpoint: str | Path | None = None, config: str | Path | Config | None = None,
                 backend: str | None = None, device: str | torch.device = "cpu", fp16: bool = False,
                 relative: bool = False, adapt_movement_scale: bool = True, size: int | None = None,
                 cuda_graphs: bool = True, model: OSTNet | None = None, engine: str | Path | None = None,
                 seed: int = 0, fused: bool | None = None, **backend_kwargs):
        backend = _backend_name(backend, fused)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.device = resolve_device(device)
        if fp16 and self.device.type != "cuda":
            raise ValueError("fp16 needs device='cuda' (CPU autocast would be bfloat16, and slower)")
        if model is not None:
            self.model, self.config, has_weights = model.to(self.device).eval(), None, True
        else:
            self.model, self.config, has_weights = build_model(checkpoint, config, self.device, seed)
        self.random_weights = not has_weights
        self.size = int(size or self.model.config.image_size)
        if self.size < 16:
            raise ValueError(f"size must be >= 16, got {self.size}")
        if engine is None or backend not in ("onnxruntime", "tensorrt"):  # else: the graphs' size rules, below
            self.model.check_size(self.size, self.size)
        if engine is not None and backend in ("onnxruntime", "tensorrt"):
            # The graphs carry their own weights: judge those (after the backend loads its sidecars), not
            # the PyTorch model built here only for its config.
            self.random_weights = None
        if self.random_weights:
            # The stderr line is the loud one; the record is for applications' logging (the CLI drops it).
            log.warning(RANDOM_WEIGHTS_WARNING, extra={"shown_on_stderr": True})
            print(f"WARNING: {RANDOM_WEIGHTS_WARNING}", file=sys.stderr, flush=True)
        self.backend_name = backend
        self.fp16 = fp16
        self.relative = RelativeMotion(adapt_movement_scale) if relative else None
        if backend == "torch":
            self.backend = TorchBackend(self.model, fp16=fp16, relative=self.relative, **backend_kwargs)
        elif backend == "fused":
            self.backend = FusedBackend(self.model, fp16=fp16, relative=self.relative, cuda_graphs=cuda_graphs,
                                        **backend_kwargs)
        else:
            if relative:
                raise BackendUnavailable(f"relative motion needs the torch or fused backend (the {backend} "
                                         "graphs take no keypoint transform)")
            self.backend = _external_backend(backend, self.model, self.device, fp16, engine, backend_kwargs)
        if self.random_weights is None:
            sidecars = getattr(self.backend, "sidecars", None) or {}
            if checkpoint is not None:  # the graphs carry their own weights: they must be this checkpoint's
                from ..export.common import sha256_file
                if (sidecars.get("frame") or {}).get("checkpoint_sha256") != sha256_file(checkpoint):
                    raise BackendUnavailable(
                        f"the {backend} model files in {engine} were not exported from {checkpoint} (they carry "
                        "their own weights): re-export from it, or leave out the checkpoint")
            weights = (sidecars.get("frame") or {}).get("weights")
            self.random_weights = weights == "random"
            if self.random_weights:
                warning = f"the {backend} model files in {engine} were exported from RANDOM weights"
                log.warning(warning, extra={"shown_on_stderr": True})
                print(f"WARNING: {warning}", file=sys.stderr, flush=True)
        backend_size = getattr(self.backend, "size", None)  # exported graphs have a fixed resolution
        if backend_size is not None and int(backend_size) != self.size:
            if size is not None:
                raise BackendUnavailable(f"size={size} but the {backend} graphs were built for {backend_size}")
            self.size = int(backend_size)
        self.has_source = False

    def __repr__(self) -> str:
        mode = "relative" if self.relative is not None else "absolute"
        return (f"Reenactor(backend={self.backend_name}, device={self.device}, size={self.size}, "
                f"fp16={self.fp16}, {mode})")

    # ----- conversions (all on the device, batched)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                             antialias=True)

    def to_device_uint8(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 numpy/tensor -> (N, H, W, 3) uint8 tensor on the device (pinned on CUDA)."""
        t = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
        if self.device.type == "cuda" and t.device.type == "cpu":
            if not t.is_pinned():
                t = t.pin_memory()
            return t.to(self.device, non_blocking=True)
        return t.to(self.device)

    def preprocess(self, frames_u8: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 on the device -> (N, 3, S, S) float in [0, 1]."""
        x = frames_u8.permute(0, 3, 1, 2).float().div_(255)  # (N, 3, H, W)
        return self._resize(x)

    @staticmethod
    def postprocess(x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) float in [0, 1] -> (N, S, S, 3) uint8 (on the same device)."""
        return (x.float().clamp(0, 1) * 255).round_().to(torch.uint8).permute(0, 2, 3, 1)

    def _as_float_batch(self, image, what: str) -> tuple[torch.Tensor, str]:
        """-> ((N, 3, H, W) float on the device, kind) where kind says how to give the result back."""
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (3, 4) or image.shape[-1] != 3:
                raise ValueError(f"{what} must be uint8 RGB (H, W, 3) or (N, H, W, 3), got {image.dtype} "
                                 f"{image.shape}")
            batch = image[None] if image.ndim == 3 else image
            return self.preprocess(self.to_device_uint8(batch)), "np1" if image.ndim == 3 else "np"
        if torch.is_tensor(image):
            if image.dtype == torch.uint8:  # HWC like numpy
                if image.dim() not in (3, 4) or image.shape[-1] != 3:
                    raise ValueError(f"uint8 {what} tensor must be (H, W, 3) or (N, H, W, 3), got "
                                     f"{tuple(image.shape)}")
                batch = image[None] if image.dim() == 3 else image
                return self.preprocess(self.to_device_uint8(batch)), "u8t1" if image.dim() == 3 else "u8t"
            if not image.is_floating_point() or image.dim() not in (3, 4) or image.shape[-3] != 3:
                raise ValueError(f"float {what} tensor must be (3, H, W) or (N, 3, H, W) in [0, 1], got "
                                 f"{image.dtype} {tuple(image.shape)}")
            batch = image[None] if image.dim() == 3 else image
            return self._resize(batch.to(self.device, torch.float32)), "t1" if image.dim() == 3 else "t"
        raise TypeError(f"{what} must be a numpy array or a torch tensor, got {type(image).__name__}")

    # ----- the API

    def set_source(self, image: np.ndarray | torch.Tensor) -> None:
        """The source photo: (H, W, 3) uint8 RGB numpy, or a (3, H, W) / (1, 3, H, W) float tensor in
        [0, 1]; resized to S x S. Computed once; also resets the relative-motion initial frame."""
        x, _ = self._as_float_batch(image, "source")
        if x.shape[0] != 1:
            raise ValueError(f"one source image at a time, got a batch of {x.shape[0]}")
        self.backend.set_source(x)
        self.has_source = True

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) float on the device -> (N, 3, S, S) prediction (may be a static buffer view)."""
        if not self.has_source:
            raise RuntimeError("call set_source(image) before animating frames")
        return self.backend(x)

    def __call__(self, frames: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        x, kind = self._as_float_batch(frames, "frames")
        y = self.infer(x)
        if kind.startswith("np") or kind.startswith("u8t"):
            out = self.postprocess(y)
            out = out.cpu().numpy() if kind.startswith("np") else out.to(frames.device)
            return out[0] if kind in ("np1", "u8t1") else out
        out = y.to(device=frames.device, dtype=frames.dtype, copy=True)
        return out[0] if kind == "t1" else out

    def stream(self, frames: Iterable[np.ndarray], batch_size: int = 8) -> Iterator[np.ndarray]:
        """Frames ((H, W, 3) uint8, same size) -> generated frames (S, S, 3) uint8, in order, batched."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pending: list[np.ndarray] = []
        for frame in frames:
            pending.append(frame)
            if len(pending) == batch_size:
                yield from self(np.stack(pending))
                pending.clear()
        if pending:
            yield from self(np.stack(pending))
