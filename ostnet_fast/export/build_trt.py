"""TensorRT engines from the exported ONNX graphs: standard TensorRT or TensorRT for RTX.

    python export/build_trt.py --onnx DIR --out DIR [--fp16] [--batch MIN:OPT:MAX] [--workspace GB]
                               [--timing-cache FILE] [--compute-capability 86,89]
    python export/build_trt.py --checkpoint PATH [--config NAME] --out DIR ...   (exports first)

Flavours: `import tensorrt` (builds for the GPU it runs on) or `import tensorrt_rtx_bindings` (pip
`tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings`: builds on a CPU-only machine, ahead of time, for
compute capability 8.0/8.6/8.9/12.x by default; runs on those GPUs only, not on Hopper). Same builder
and parser API; `OSTNET_TENSORRT=tensorrt|tensorrt-rtx` picks one when both are installed.

Precision: every network is created STRONGLY_TYPED (TensorRT-RTX has no other kind, and its builder has
no FP16 flag), so the ONNX graph's types are the engine's types. `--fp16` therefore builds from the
`*_fp16.onnx` graphs that `export_onnx.py --fp16` writes (float16 convolutions, float32 where the model
keeps float32, float32 I/O), with either flavour. fp32 engines clear TF32 where the flag exists, so an
fp32 engine is an fp32 reference.

Parity evidence where the engine cannot run (TensorRT-RTX on CPU or on an H100): every parsed
IGridSampleLayer must be LINEAR interpolation, align_corners, FILL (zeros) sampling, or no engine is
written (NVIDIA/TensorRT #4646: opset-20 'linear' has been parsed as nearest).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import logging
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from .. import __version__
from ..checkpoint import CheckpointError
from .common import (GRAPHS, ExportError, engine_name, onnx_name, read_sidecar, sha256_file, sidecar_path,
                     staged, write_bytes, write_json)

log = logging.getLogger("ostnet_fast.export.trt")
FLAVOURS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}  # flavour -> module
INSTALL_HINT = ("neither TensorRT nor TensorRT for RTX is installed: pip install tensorrt (builds on and "
                "for the NVIDIA GPU at hand), or pip install tensorrt-rtx-cu13-libs "
                "tensorrt-rtx-cu13-bindings (builds on CPU; engines run on RTX-class GPUs, CC 8.0/8.6/8.9/12.x)")
RTX_DEFAULT_TARGETS = ["8.0", "8.6", "8.9", "12.x"]
DEFAULT_BATCH = (1, 1, 8)
_TRT_LOGGERS: dict[str, Any] = {}


class TensorRTNotInstalled(ImportError):
    pass


def import_tensorrt(prefer: str | None = None) -> tuple[ModuleType, str]:
    """-> (module, flavour). Standard TensorRT first, then TensorRT for RTX; OSTNET_TENSORRT picks."""
    prefer = prefer or os.environ.get("OSTNET_TENSORRT") or None
    if prefer is not None and prefer not in FLAVOURS:
        raise ValueError(f"OSTNET_TENSORRT must be one of {sorted(FLAVOURS)}, got {prefer!r}")
    order = [prefer] if prefer else list(FLAVOURS)
    errors = []
    for flavour in order:
        try:
            return importlib.import_module(FLAVOURS[flavour]), flavour
        except (ImportError, OSError) as e:  # OSError: the wheel is there but a shared library is not
            errors.append(f"{FLAVOURS[flavour]}: {type(e).__name__}: {e}")
    raise TensorRTNotInstalled(INSTALL_HINT + " (tried " + "; ".join(errors) + ")")


def parse_batch(text: str) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"--batch must be MIN:OPT:MAX integers, got {text!r}") from None
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"--batch needs 1 <= MIN <= OPT <= MAX, got {text!r}")
    return lo, opt, hi


def gpu_description(flavour: str) -> dict[str, Any]:
    """The GPU an engine is built for: the current CUDA device, or TensorRT-RTX's CPU AOT build."""
    try:
        import torch
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    except Exception:  # pragma: no cover - no torch CUDA
        pass
    if flavour == "tensorrt-rtx":
        return {"gpu": "cpu-build (TensorRT-RTX, no GPU)", "compute_capability": None}
    return {"gpu": "unknown (no CUDA device visible to torch)", "compute_capability": None}


def trt_logger(trt: ModuleType, verbose: bool = False):
    """One ILogger per TensorRT module for the process (TensorRT keeps the first one it is given),
    routed to Python logging; `verbose` switches TensorRT's VERBOSE/INFO messages on (at DEBUG)."""
    logger = _TRT_LOGGERS.get(trt.__name__)
    if logger is None:
        sev = trt.ILogger.Severity
        levels = {sev.INTERNAL_ERROR: logging.CRITICAL, sev.ERROR: logging.ERROR, sev.WARNING: logging.WARNING,
                  sev.INFO: logging.DEBUG, sev.VERBOSE: logging.DEBUG}

        class _Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.min_severity = sev.WARNING

            def log(self, severity, msg):
                if int(severity) <= int(self.min_severity):
                    log.log(levels.get(severity, logging.INFO), "[TRT] %s", msg)

        logger = _TRT_LOGGERS[trt.__name__] = _Logger()
    logger.min_severity = trt.ILogger.Severity.VERBOSE if verbose else trt.ILogger.Severity.WARNING
    return logger


class EngineBuilder:
    """ONNX -> serialized engine, in NVIDIA's build_engine.py shape: create_network, then create_engine.

    One builder per graph: `EngineBuilder(...).create_network(path, batch)` then `.create_engine(out)`.
    Raises ExportError (never exits) on parser errors, a bad grid-sample layer or a failed build."""

    def __init__(self, trt: ModuleType | None = None, flavour: str | None = None, workspace_gb: float | None = None,
                 timing_cache: str | Path | None = None, compute_capabilities: Sequence[str] | None = None,
                 verbose: bool = False):
        if trt is None:
            trt, flavour = import_tensorrt()
        self.trt, self.flavour = trt, flavour or ("tensorrt-rtx" if "rtx" in trt.__name__ else "tensorrt")
        self.logger = trt_logger(trt, verbose)
        self.builder = trt.Builder(self.logger)
        self.config = self.builder.create_builder_config()
        self.workspace_bytes = None
        if workspace_gb is not None:
            self.workspace_bytes = int(workspace_gb * (1 << 30))
            self.config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        self.timing_cache_path = Path(timing_cache) if timing_cache else None
        self._load_timing_cache()
        self.targets = self._set_compute_capabilities(compute_capabilities)
        self._set_progress_monitor()
        self.network = self.parser = None
        self.onnx_path: Path | None = None
        self.batch: tuple[int, int, int] | None = None
        self.profile: dict[str, dict[str, list[int]]] = {}
        self.grid_samples: list[dict[str, Any]] = []

    # -- setup ---------------------------------------------------------------------------------------

    def _load_timing_cache(self) -> None:
        if self.timing_cache_path and gpu_description(self.flavour)["compute_capability"] is None:
            # TensorRT-RTX's CPU (AOT) build times nothing, and deserializing a cache needs CUDA.
            log.warning("timing cache %s not used: no GPU, so nothing is timed (TensorRT-RTX CPU build)",
                        self.timing_cache_path)
            self.timing_cache_path = None
        if not self.timing_cache_path:
            return
        data = b""
        if self.timing_cache_path.is_file():
            data = self.timing_cache_path.read_bytes()
            log.info("timing cache: loaded %s (%d bytes)", self.timing_cache_path, len(data))
        cache = self.config.create_timing_cache(data)
        if not self.config.set_timing_cache(cache, ignore_mismatch=False):
            raise ExportError(f"timing cache {self.timing_cache_path} does not match this TensorRT/GPU; "
                              "delete it or pass another --timing-cache")

    def save_timing_cache(self) -> None:
        if not self.timing_cache_path:
            return
        cache = self.config.get_timing_cache()
        if cache is None:
            return
        data = bytes(memoryview(cache.serialize()))
        write_bytes(self.timing_cache_path, data)
        log.info("timing cache: saved %s (%d bytes)", self.timing_cache_path, len(data))

    def _set_compute_capabilities(self, ccs: Sequence[str] | None) -> list[str]:
        """TensorRT-RTX only: which GPUs the AOT engine targets (default: its portable set)."""
        if not ccs:
            if self.flavour == "tensorrt-rtx":
                return list(RTX_DEFAULT_TARGETS)
            cc = gpu_description(self.flavour)["compute_capability"]
            return [cc] if cc else []
        if self.flavour != "tensorrt-rtx":
            raise ValueError("--compute-capability is a TensorRT-RTX option (standard TensorRT builds for "
                             "the GPU it runs on)")
        enum = self.trt.ComputeCapability
        sm = [m for m in enum.__members__ if m.startswith("SM")]
        expanded = []
        for cc in ccs:  # "12.x": every minor version of that major (the default targets' notation)
            matches = [f"{m[2:-1]}.{m[-1]}" for m in sm if cc.endswith(".x") and m[2:-1] == cc[:-2]]
            expanded += matches or [cc]
        members = []
        for cc in expanded:
            name = "SM" + cc.replace(".", "")
            if not hasattr(enum, name):
                known = [m[2:-1] + "." + m[-1] for m in sm] + ["N.x"]
                raise ValueError(f"compute capability {cc!r} is not a TensorRT-RTX target; known: {known}")
            members.append((cc if "." in cc else f"{cc[:-1]}.{cc[-1]}", getattr(enum, name)))
        self.config.num_compute_capabilities = len(members)
        for i, (_, m) in enumerate(members):
            self.config.set_compute_capability(m, i)
        return [cc for cc, _ in members]

    def _set_progress_monitor(self) -> None:
        trt = self.trt
        if not hasattr(trt, "IProgressMonitor") or not hasattr(self.config, "progress_monitor"):
            self._monitor = None
            return

        class _Progress(trt.IProgressMonitor):
            """One line per top-level build phase (TensorRT nests phases; steps are logged at DEBUG)."""

            def __init__(self):
                trt.IProgressMonitor.__init__(self)
                self.started: dict[str, float] = {}
                self.depth: dict[str, int] = {}

            def phase_start(self, phase_name, parent_phase, num_steps):
                self.depth[phase_name] = 0 if parent_phase is None else self.depth.get(parent_phase, 0) + 1
                self.started[phase_name] = time.perf_counter()
                level = logging.INFO if self.depth[phase_name] == 0 else logging.DEBUG
                log.log(level, "build: %s%s (%d steps)", "  " * self.depth[phase_name], phase_name, num_steps)

            def step_complete(self, phase_name, step):
                log.debug("build: %s step %d", phase_name, step)
                return True  # keep building

            def phase_finish(self, phase_name):
                dt = time.perf_counter() - self.started.pop(phase_name, time.perf_counter())
                if self.depth.pop(phase_name, 1) == 0:
                    log.info("build: %s done in %.1f s", phase_name, dt)

        self._monitor = _Progress()  # keep a reference: TensorRT does not own it
        self.config.progress_monitor = self._monitor

    # -- network -------------------------------------------------------------------------------------

    def _tensor_info(self, t) -> dict[str, Any]:
        return {"name": t.name, "shape": [int(d) for d in t.shape], "dtype": str(t.dtype).split(".")[-1].lower()}

    def create_network(self, onnx_path: str | Path, batch: tuple[int, int, int] | None = None) -> None:
        """Parse the ONNX graph (every parser error logged with its node), log I/O, add the batch profile,
        check the grid-sample layers."""
        trt = self.trt
        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise FileNotFoundError(f"ONNX graph not found: {self.onnx_path}")
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT < 10 (default after)
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        self.network = self.builder.create_network(flags)
        self.parser = trt.OnnxParser(self.network, self.logger)
        if not self.parser.parse_from_file(str(self.onnx_path)):
            lines = []
            for i in range(self.parser.num_errors):
                e = self.parser.get_error(i)
                lines.append(f"node {e.node()} {e.node_name()!r} ({e.node_operator()}): {e.desc()} "
                             f"[{e.code()}, {e.file()}:{e.line()} {e.func()}]")
                log.error("ONNX parser: %s", lines[-1])
            raise ExportError(f"TensorRT ({self.flavour}) could not parse {self.onnx_path}: "
                              f"{len(lines)} error(s); first: {lines[0] if lines else '?'}")
        self.inputs = [self._tensor_info(self.network.get_input(i)) for i in range(self.network.num_inputs)]
        self.outputs = [self._tensor_info(self.network.get_output(i)) for i in range(self.network.num_outputs)]
        log.info("network %s: %d layers", self.onnx_path.name, self.network.num_layers)
        for kind, infos in (("input", self.inputs), ("output", self.outputs)):
            for t in infos:
                log.info("  %-6s %-14s %-22s %s", kind, t["name"], str(tuple(t["shape"])), t["dtype"])
        self._add_profile(batch)
        self.grid_samples = self.check_grid_samples()

    def _add_profile(self, batch: tuple[int, int, int] | None) -> None:
        dynamic = [t for t in self.inputs if -1 in t["shape"]]
        self.profile, self.batch = {}, None
        if not dynamic:  # the source graph: fixed batch 1, no profile needed
            return
        lo, opt, hi = batch or DEFAULT_BATCH
        profile = self.builder.create_optimization_profile()
        for t in dynamic:
            if t["shape"][0] != -1 or -1 in t["shape"][1:]:
                raise ExportError(f"input {t['name']} {t['shape']}: only the batch axis may be dynamic")
            shapes = [[n] + t["shape"][1:] for n in (lo, opt, hi)]
            profile.set_shape(t["name"], *shapes)
            self.profile[t["name"]] = dict(zip(("min", "opt", "max"), shapes))
            log.info("  profile %s: min %s opt %s max %s", t["name"], *shapes)
        self.config.add_optimization_profile(profile)
        self.batch = (lo, opt, hi)

    def check_grid_samples(self) -> list[dict[str, Any]]:
        """Every IGridSampleLayer must be LINEAR / align_corners / FILL; else raise (no engine written)."""
        trt = self.trt
        found, bad = [], []
        for i in range(self.network.num_layers):
            layer = self.network.get_layer(i)
            if layer.type != trt.LayerType.GRID_SAMPLE:
                continue
            layer.__class__ = trt.IGridSampleLayer  # NVIDIA samples' downcast idiom
            info = {"name": layer.name, "interpolation": layer.interpolation_mode.name,
                    "align_corners": bool(layer.align_corners), "sample_mode": layer.sample_mode.name}
            found.append(info)
            if (info["interpolation"], info["align_corners"], info["sample_mode"]) != ("LINEAR", True, "FILL"):
                bad.append(info)
        for info in found:
            log.info("  grid sample %s: %s, align_corners=%s, %s", info["name"], info["interpolation"],
                     info["align_corners"], info["sample_mode"])
        if bad:
            raise ExportError(f"{len(bad)} grid-sample layer(s) parsed as something other than LINEAR/"
                              f"align_corners/FILL, refusing to build (the engine would not match the model): "
                              f"{bad}. Export at opset 16..19 (see NVIDIA/TensorRT #4646)")
        return found

    # -- engine --------------------------------------------------------------------------------------

    def create_engine(self, engine_path: str | Path, precision: str = "fp32",
                      extra: dict[str, Any] | None = None) -> Path:
        """Build, write the engine atomically, save the timing cache, write the sidecar; -> engine path."""
        if self.network is None:
            raise RuntimeError("call create_network first")
        trt = self.trt
        if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
            self.config.clear_flag(trt.BuilderFlag.TF32)
        engine_path = Path(engine_path)
        log.info("building %s (%s, %s %s) ...", engine_path.name, precision, self.flavour, trt.__version__)
        t0 = time.perf_counter()
        serialized = self.builder.build_serialized_network(self.network, self.config)
        if serialized is None:
            raise ExportError(f"TensorRT ({self.flavour} {trt.__version__}) failed to build {self.onnx_path}; "
                              "the errors are in the log above")
        seconds = time.perf_counter() - t0
        data = bytes(memoryview(serialized))
        write_bytes(engine_path, data)
        log.info("built %s in %.1f s (%.1f MB)", engine_path, seconds, len(data) / 1e6)
        self.save_timing_cache()
        built_for = gpu_description(self.flavour)
        built_for["targets"] = self.targets
        write_json(sidecar_path(engine_path), {
            "format": "ostnet-fast-engine", "file": engine_path.name, **(extra or {}),
            "tensorrt": {"flavour": self.flavour, "module": trt.__name__, "version": trt.__version__},
            "built_for": built_for, "precision": precision, "strongly_typed": True,
            "inputs": self.inputs, "outputs": self.outputs, "batch": list(self.batch) if self.batch else None,
            "profile": self.profile, "grid_sample_layers": self.grid_samples,
            "onnx": self.onnx_path.name, "onnx_sha256": sha256_file(self.onnx_path),
            "workspace_bytes": self.workspace_bytes,
            "timing_cache": str(self.timing_cache_path) if self.timing_cache_path else None,
            "build_seconds": round(seconds, 2), "engine_sha256": sha256_file(engine_path),
            "package_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        })
        return engine_path


def build_engines(onnx_dir: str | Path, out_dir: str | Path, fp16: bool = False,
                  batch: tuple[int, int, int] = DEFAULT_BATCH, workspace_gb: float | None = None,
                  timing_cache: str | Path | None = None, compute_capabilities: Sequence[str] | None = None,
                  trt: ModuleType | None = None, flavour: str | None = None, verbose: bool = False) -> dict[str, Path]:
    """source + frame engines from an export directory -> {'source': path, 'frame': path}."""
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    precision = "fp16" if fp16 else "fp32"
    paths = {g: onnx_dir / onnx_name(g, precision) for g in GRAPHS}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        hint = " (export them with export_onnx.py --fp16)" if fp16 else ""
        raise FileNotFoundError(f"ONNX graph(s) not found: {', '.join(missing)}{hint}")
    if trt is None:
        trt, flavour = import_tensorrt()
    out: dict[str, Path] = {}
    with staged(out_dir) as stage:  # a failed frame engine leaves the folder as it was
        for graph, path in paths.items():
            onnx_side = read_sidecar(path)
            if onnx_side.get("onnx_sha256") not in (None, sha256_file(path)):
                raise ExportError(f"{path} does not match its sidecar's onnx_sha256 (edited after export?); "
                                  "re-export")
            builder = EngineBuilder(trt, flavour, workspace_gb=workspace_gb, timing_cache=timing_cache,
                                    compute_capabilities=compute_capabilities, verbose=verbose)
            builder.create_network(path, batch if graph == "frame" else None)
            keep = ("graph", "image_size", "opset", "config_name", "config", "checkpoint", "checkpoint_sha256",
                    "weights", "grid_sample")
            builder.create_engine(stage / engine_name(graph), precision, extra={k: onnx_side.get(k) for k in keep})
            out[graph] = out_dir / engine_name(graph)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="build_trt.py", description=(
        "Build TensorRT (or TensorRT-RTX) engines for source.onnx + frame.onnx, with JSON sidecars."))
    p.add_argument("--onnx", help="export directory (export_onnx.py --out); omit to export first")
    p.add_argument("--out", required=True, help="engine directory")
    p.add_argument("--fp16", action="store_true", help="FP16 engines (from the *_fp16.onnx graphs)")
    p.add_argument("--batch", default="1:1:8", help="frame-graph batch profile MIN:OPT:MAX (default 1:1:8)")
    p.add_argument("--workspace", type=float, help="workspace memory pool limit in GB")
    p.add_argument("--timing-cache", help="timing cache file, loaded if present and saved after the build")
    p.add_argument("--compute-capability", help="TensorRT-RTX targets, comma separated (e.g. 86,89,120); "
                   "default: its portable set (8.0/8.6/8.9/12.x)")
    p.add_argument("--checkpoint", help="with no --onnx: checkpoint to export from (omit: random weights)")
    p.add_argument("--config", help="with no --onnx: config name or YAML path")
    p.add_argument("--size", type=int, help="with no --onnx: image size")
    p.add_argument("--opset", type=int, default=17, help="with no --onnx: ONNX opset (16..19)")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .onnx_export import setup_logging
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        batch = parse_batch(args.batch)
        if args.workspace is not None and not args.workspace > 0:
            raise ValueError(f"--workspace must be a positive number of GB, got {args.workspace}")
        ccs = [c.strip() for c in args.compute_capability.split(",")] if args.compute_capability else None
        trt, flavour = import_tensorrt()  # before exporting: fail fast when neither is installed
        log.info("TensorRT flavour: %s %s", flavour, trt.__version__)
        onnx_dir = args.onnx
        if onnx_dir is None:
            from .onnx_export import export_graphs, load_model
            onnx_dir = Path(args.out) / "onnx"
            model, cfg, src = load_model(args.checkpoint, args.config)
            export_graphs(model, cfg, onnx_dir, opset=args.opset, size=args.size,
                          precisions=("fp16",) if args.fp16 else ("fp32",), source=src)
        elif args.checkpoint or args.config:
            raise ValueError("--checkpoint/--config are for exporting first; with --onnx the graphs are used as is")
        engines = build_engines(onnx_dir, args.out, fp16=args.fp16, batch=batch, workspace_gb=args.workspace,
                                timing_cache=args.timing_cache, compute_capabilities=ccs, trt=trt,
                                flavour=flavour, verbose=args.verbose)
    except (TensorRTNotInstalled, CheckpointError, OSError, ValueError, ExportError) as e:
        print(f"build_trt: error: {e}", file=sys.stderr)
        return 2
    for graph, path in engines.items():
        log.info("wrote %s (+ %s)", path, sidecar_path(path).name)
    return 0
