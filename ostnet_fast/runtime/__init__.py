"""Inference runtimes over exported graphs, all with the `Reenactor` backend protocol:
`set_source(x)` with x (1, 3, S, S) float in [0, 1], then `r(x)` with x (N, 3, S, S) -> (N, 3, S, S).

    ORTReenactor(onnx_dir)      ONNX Runtime (CPU; CUDA provider where present)     runtime/ort.py
    TRTReenactor(engine_dir)    TensorRT / TensorRT-RTX engines, torch CUDA buffers runtime/trt.py

Lazy: importing `ostnet_fast.runtime` imports neither onnxruntime nor TensorRT.
"""
from __future__ import annotations

import importlib

_LAZY = {"ORTReenactor": ".ort", "TRTReenactor": ".trt", "EngineMismatch": ".trt",
         "check_engine_sidecar": ".trt"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
