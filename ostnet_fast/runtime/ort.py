"""`ORTReenactor`: the exported graphs on ONNX Runtime (CPU; CUDA provider where installed).

    r = ORTReenactor("export_dir")        # source.onnx + frame.onnx (fp16=True: *_fp16.onnx)
    r.set_source(src)                     # (1, 3, S, S) float in [0, 1]
    out = r(frames)                       # (N, 3, S, S) -> (N, 3, S, S) float32 on frames' device

The source tensors stay in ONNX Runtime's host memory between calls; frames travel as numpy (a copy
each way on CUDA; IO binding would avoid it, not done: ONNX Runtime is the portable path, TensorRT
the fast one). fp16 graphs keep float32 I/O, so the protocol is the same.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..export.common import GRAPHS, onnx_name
from ._common import check_image, load_pair

log = logging.getLogger(__name__)


def default_providers() -> list[str]:
    import onnxruntime as ort
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class ORTReenactor:
    def __init__(self, onnx_dir: str | Path, providers: Sequence[str] | None = None, fp16: bool = False,
                 device: str | torch.device | None = None, threads: int | None = None):
        import onnxruntime as ort
        self.onnx_dir = Path(onnx_dir)
        precision = "fp16" if fp16 else "fp32"
        paths = {g: self.onnx_dir / onnx_name(g, precision) for g in GRAPHS}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            hint = " (export with export_onnx.py --fp16)" if fp16 else " (export with export_onnx.py)"
            raise FileNotFoundError(f"ONNX graph(s) not found: {', '.join(missing)}{hint}")
        self.sidecars = load_pair(paths)
        self.precision = precision
        self.size = int(self.sidecars["frame"]["image_size"])
        self.channels = int(self.sidecars["frame"]["config"]["model"]["num_channels"])
        self.device = torch.device(device) if device is not None else None
        self.providers = list(providers) if providers is not None else default_providers()
        unknown = [p for p in self.providers if p not in ort.get_available_providers()]
        if unknown:
            raise ValueError(f"ONNX Runtime providers {unknown} are not available; available: "
                             f"{ort.get_available_providers()}")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.sessions = {g: ort.InferenceSession(str(p), sess_options=opts, providers=self.providers)
                         for g, p in paths.items()}
        for g, sess in self.sessions.items():  # the graph on disk must be the one the sidecar describes
            names = ([i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
            expect = ([t["name"] for t in self.sidecars[g]["inputs"]], [t["name"] for t in self.sidecars[g]["outputs"]])
            if names != expect:
                raise ValueError(f"{paths[g]}: graph I/O {names} does not match its sidecar {expect}")
        self.source_names = [t["name"] for t in self.sidecars["source"]["outputs"]]
        self.output_names = [t["name"] for t in self.sidecars["frame"]["outputs"]]
        self._source: dict[str, np.ndarray] | None = None
        log.info("ORTReenactor: %s (%s, %dx%d) on %s", self.onnx_dir, precision, self.size, self.size,
                 self.sessions["frame"].get_providers())

    @classmethod
    def from_model(cls, model, out_dir: str | Path | None = None, fp16: bool = False, **kwargs) -> "ORTReenactor":
        """Export `model` (to out_dir, or a temporary folder kept for the object's life) and load it."""
        from ..config import Config
        from ..export.onnx_export import export_graphs
        tmp = None
        if out_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="ostnet-onnx-")
            out_dir = tmp.name
        cfg = Config(model=model.config, name="from_model")
        export_graphs(model, cfg, out_dir, precisions=("fp16",) if fp16 else ("fp32",))
        obj = cls(out_dir, fp16=fp16, **kwargs)
        obj._tmp = tmp
        return obj

    def set_source(self, x: torch.Tensor) -> None:
        """x (1, C, S, S) float in [0, 1]: runs source.onnx once, keeps its outputs."""
        check_image(x, "source", self.channels, self.size, batch=1)
        feed = {"source": x.detach().float().cpu().contiguous().numpy()}
        self._source = dict(zip(self.source_names, self.sessions["source"].run(self.source_names, feed)))

    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (N, C, S, S) -> every frame-graph output by name ('prediction' [, 'rectified'])."""
        if self._source is None:
            raise RuntimeError("call set_source(source) before animating frames")
        check_image(x, "driving", self.channels, self.size)
        feed = dict(self._source, driving=x.detach().float().cpu().contiguous().numpy())
        outs = self.sessions["frame"].run(self.output_names, feed)
        device = self.device or x.device
        return {n: torch.from_numpy(o).to(device) for n, o in zip(self.output_names, outs)}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, S, S) float in [0, 1] -> prediction (N, C, S, S) float32."""
        return self.run(x)["prediction"]
