"""Fused ops. Each module: a pure-PyTorch `<op>_reference`, the Triton kernel(s), an autograd Function
with a fused backward, and one public dispatch function, which is all the model calls."""
from .conv2d import conv2d
from .dense_motion import dense_motion_combine, dense_motion_front
from .geometry import inverse_2x2, kp2gaussian, pixel_coordinates
from .grid_sample import grid_sample
from .keypoint_head import keypoint_head
from .tps_grid import tps_grid, tps_grid_matrix, tps_solve
from .tps_warp import tps_warp
from .zconv import zconv_block

__all__ = ["conv2d", "dense_motion_combine", "dense_motion_front", "grid_sample", "inverse_2x2", "keypoint_head",
           "kp2gaussian", "pixel_coordinates", "tps_grid", "tps_grid_matrix", "tps_solve", "tps_warp", "zconv_block"]
