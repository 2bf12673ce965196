"""ostnet-fast: OSTNet one-shot talking-head reenactment with fused GPU kernels and TensorRT export."""
from ._version import __version__
from .checkpoint import load_checkpoint, load_fomm_checkpoint, save_checkpoint
from .config import Config, ModelConfig, load_config
from .model import OSTNet, SourceState

__all__ = ["__version__", "Config", "ModelConfig", "OSTNet", "SourceState", "load_checkpoint",
           "load_config", "load_fomm_checkpoint", "save_checkpoint"]
