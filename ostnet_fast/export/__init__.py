"""Export: ONNX graphs (`onnx_export`), TensorRT engines (`build_trt`).

Importing this package imports neither onnx nor TensorRT; the submodules do, when used:
    from ostnet_fast.export.onnx_export import export_graphs, main      # python export/export_onnx.py
    from ostnet_fast.export.build_trt import EngineBuilder, main        # python export/build_trt.py
"""
from .common import ExportError, engine_name, onnx_name, read_sidecar, sidecar_path

__all__ = ["ExportError", "engine_name", "onnx_name", "read_sidecar", "sidecar_path"]
