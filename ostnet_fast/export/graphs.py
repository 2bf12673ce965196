"""The two exported graphs as nn.Modules: `SourceGraph` (once per source) and `FrameGraph` (per frame).

source.onnx:  source (1, C, S, S) -> kp_value (1, K, 2), [kp_jacobian (1, K, 2, 2)], source_small
              (1, C, s, s), source_f1 (1, F, S, S)   -- every source tensor `OSTNet.animate` reads
frame.onnx:   those source tensors (batch 1) + driving (N, C, S, S) -> prediction (N, C, S, S)
              [, rectified (N, C, S, S)]             -- N dynamic; the batch-1 source tensors are
              broadcast inside the graph by `SourceState.expand` (an ONNX Expand on the traced batch)

Both wrappers call the model's own `encode_source` / `animate`, so the exported graph is the model, not
a copy of it. One substitution: the TPS warp. The reference computes the grid per pixel from the radial
basis (an Einsum over a folded constant); for export the grid is one MatMul with the constant
A (H*W, T) from `tps_grid_matrix` (grid = A @ C, A solved in float64 at export time), then a 2-D
GridSample. No Inverse, no 5-D sampling, no custom op.

Precision: I/O is always float32. `half=True` runs the convolutional parts in float16 and keeps what
the model computes in float32 in float32 (keypoint softmax and Jacobians, the scale-transform MLP,
the W_i z projections, the TPS grid): a graph with explicit Casts, which is what a strongly typed
TensorRT network (TensorRT-RTX, or `--fp16` with standard TensorRT) builds as written.

Convention: grids are (x, y) in [-1, 1], align_corners=True (-1/+1 = centres of the corner pixels),
bilinear, zeros padding: ONNX GridSample(mode="bilinear", padding_mode="zeros", align_corners=1).
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ..kernels.grid_sample import grid_sample_reference
from ..kernels.tps_grid import tps_grid_matrix
from ..model import OSTNet
from ..model.ostnet import SourceState

SOURCE_INPUTS = ("source",)
SOURCE_TENSORS = ("kp_value", "kp_jacobian", "source_small", "source_f1")  # source.onnx outputs
FRAME_OUTPUTS = ("prediction", "rectified")


def source_tensor_names(model: OSTNet) -> tuple[str, ...]:
    """The source tensors the frame graph takes, in order (no Jacobian when the model has none)."""
    return tuple(n for n in SOURCE_TENSORS if n != "kp_jacobian" or model.config.estimate_jacobian)


def export_model(model: OSTNet, half: bool) -> OSTNet:
    """An eval-mode copy on CPU in the export precision (the caller's model is left untouched)."""
    m = copy.deepcopy(model).cpu().eval()
    m.fused = False  # reference path (dispatch also takes it under torch.onnx.is_in_onnx_export())
    if half:
        m.half()
        # What the model computes in float32 under autocast stays float32 (its explicit .float() casts
        # and the small MLPs fed by float32 keypoints).
        m.scale_transform.float()
        m.generator.W_down.float()
        m.generator.W_up.float()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


class SourceGraph(nn.Module):
    """source (1, C, S, S) float32 in [0, 1] -> the source tensors (float32)."""

    def __init__(self, model: OSTNet, half: bool = False):
        super().__init__()
        self.model = export_model(model, half)
        self.dtype = torch.float16 if half else torch.float32
        self.output_names = source_tensor_names(model)

    def forward(self, source: torch.Tensor):
        state = self.model.encode_source(source.to(self.dtype))
        outs = [state.kp_value, state.kp_jacobian, state.small, state.f1]
        return tuple(t.float() for t, n in zip(outs, SOURCE_TENSORS) if n in self.output_names)


class FrameGraph(nn.Module):
    """(source tensors, driving (N, C, S, S) float32) -> prediction (N, C, S, S) [, rectified]."""

    def __init__(self, model: OSTNet, size: int, half: bool = False, rectified: bool = True):
        super().__init__()
        self.model = export_model(model, half)
        self.dtype = torch.float16 if half else torch.float32
        self.size = size
        self.input_names = source_tensor_names(model) + ("driving",)
        self.output_names = FRAME_OUTPUTS if rectified else FRAME_OUTPUTS[:1]
        st = self.model.scale_transform
        # (S*S, T) float32, solved in float64: grid (N, S*S, 2) = A @ C (N, T, 2).
        self.register_buffer("tps_A", tps_grid_matrix(st.target_points, st.tps_coef, (size, size)).float())

    def _warp(self, image: torch.Tensor, fiducials: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        """ScaleTransformation.warp as one MatMul with a constant + GridSample (same maths)."""
        if tuple(image.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"FrameGraph was built for {self.size}x{self.size}, got {tuple(image.shape)}")
        grid = torch.matmul(self.tps_A, fiducials.float())  # (N, S*S, 2), float32 like the reference
        grid = grid.reshape(-1, self.size, self.size, 2).to(image.dtype)  # (N, S, S, 2)
        return grid_sample_reference(image, grid)

    @contextlib.contextmanager
    def _matmul_tps(self):
        st = self.model.scale_transform
        st.warp = self._warp  # instance attribute shadows the method on our private copy only
        try:
            yield
        finally:
            del st.warp

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.input_names):
            raise ValueError(f"FrameGraph takes {self.input_names}, got {len(inputs)} tensors")
        named = dict(zip(self.input_names, inputs))
        small = named["source_small"].to(self.dtype)
        # image= is only read for its batch size by SourceState.expand (animate never reads the source
        # pixels: f1 and the downscaled source carry them); expand broadcasts batch 1 -> N.
        state = SourceState(image=small, kp_value=named["kp_value"], kp_jacobian=named.get("kp_jacobian"),
                            small=small, f1=named["source_f1"].to(self.dtype))
        with self._matmul_tps():
            out = self.model.animate(state, named["driving"].to(self.dtype))
        return tuple(out[n].float() for n in self.output_names)
