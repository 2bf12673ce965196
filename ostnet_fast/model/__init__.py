from .ostnet import OSTNet, SourceState

__all__ = ["OSTNet", "SourceState"]
