"""Video pipeline: PyAV I/O, face crop and paste-back, the `Reenactor` API over backends, the threaded
video job and the live loop."""
from .crop import FaceCropper, paste_back
from .reenactor import Reenactor
from .run import live, reenact_video
from .video import InputError, VideoReader, VideoWriter, probe

__all__ = ["FaceCropper", "InputError", "Reenactor", "VideoReader", "VideoWriter", "live", "paste_back", "probe",
           "reenact_video"]
