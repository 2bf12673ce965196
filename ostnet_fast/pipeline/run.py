"""The video job and the live loop.

    decode (reader thread) -> [bounded queue] -> H2D, crop, infer, paste-back, to uint8, D2H (main
    thread, batched on the device) -> [bounded queue] -> encode + mux (writer thread)

The reader decodes straight into a ring of pinned host buffers (one (B, H, W, 3) uint8 array per
batch); face boxes are computed there too (constant for the centre crop). The main thread only
enqueues device work: H2D from pinned memory, crop and paste-back as one grid_sample each for the
whole batch, the backend, and an async D2H into a pinned output buffer, then records a CUDA event.
The writer waits on that event, hands the input buffer back to the reader, and encodes. Buffers are
recycled through free-lists, so memory is bounded and nothing is allocated per frame on the host.

Time shares in the summary are the busy time of each stage over the wall time (they overlap, so they
do not add up to 1; the stage near 1.0 is the bottleneck). Inference time on CUDA is GPU time from
CUDA events around each batch (H2D + crop + model + paste-back + D2H).
"""
from __future__ import annotations

import queue
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .crop import FaceCropper, crop, crop_resize, paste_back_batch
from .reenactor import Reenactor
from .video import InputError, VideoReader, VideoWriter

_POLL_S = 0.1


@dataclass
class RunSummary:
    frames: int
    wall_s: float
    fps: float
    backend: str
    device: str
    batch: int
    decode_s: float
    inference_s: float
    encode_s: float
    output: str | None = None
    audio: str | None = None

    @property
    def shares(self) -> dict[str, float]:
        w = max(self.wall_s, 1e-9)
        return {"decode": self.decode_s / w, "inference": self.inference_s / w, "encode": self.encode_s / w}

    def to_dict(self) -> dict:
        return {**asdict(self), "shares": self.shares}

    def line(self) -> str:
        s = self.shares
        where = f" -> {self.output}" if self.output else ""
        return (f"{self.frames} frames in {self.wall_s:.2f} s ({self.fps:.1f} FPS), backend {self.backend}, "
                f"device {self.device}, batch {self.batch}; busy: decode {s['decode']:.0%}, "
                f"inference {s['inference']:.0%}, encode {s['encode']:.0%}{where}")


class _Stop(Exception):
    """Another stage failed or the job was interrupted."""


class _Job:
    """Stop flag + first error, shared by the three stages."""

    def __init__(self):
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e
        self.stop.set()

    def get(self, q: queue.Queue):
        while True:
            if self.stop.is_set():
                raise _Stop()
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue

    def put(self, q: queue.Queue, item) -> None:
        while True:
            if self.stop.is_set():
                raise _Stop()
            try:
                return q.put(item, timeout=_POLL_S)
            except queue.Full:
                continue


def _source_to_reenactor(reenactor: Reenactor, source: np.ndarray, cropper: FaceCropper | None) -> None:
    if cropper is not None:
        source = crop(source, cropper.box(source), max(reenactor.size, 16))
    reenactor.set_source(source)


def process_batch(reenactor: Reenactor, frames_u8: torch.Tensor, boxes: np.ndarray | torch.Tensor,
                  paste_back: bool = False, feather: float = 0.0) -> torch.Tensor:
    """(N, H, W, 3) uint8 full frames on the device + (N, 4) boxes -> (N, S, S, 3) uint8 faces, or
    (N, H, W, 3) with the faces pasted back. All on the device, batched."""
    frames = frames_u8.permute(0, 3, 1, 2).float().div_(255)  # (N, 3, H, W)
    faces = crop_resize(frames, boxes, reenactor.size)  # (N, 3, S, S)
    y = reenactor.infer(faces)  # (N, 3, S, S), maybe a static graph buffer
    if paste_back:
        y = paste_back_batch(frames, y.float(), boxes, feather=feather)  # (N, 3, H, W)
    return reenactor.postprocess(y)  # (N, S|H, S|W, 3) uint8


def reenact_video(reenactor: Reenactor, driving: str | Path, out: str | Path,
                  source: np.ndarray | None = None, batch_size: int = 8, paste_back: bool = False,
                  max_frames: int | None = None, cropper: FaceCropper | None = None, codec: str = "libx264",
                  progress: bool = True, queue_size: int = 3, feather: float = 0.0,
                  write: bool = True, on_batch: Callable[[int], None] | None = None,
                  preset: str | None = "veryfast") -> RunSummary:
    """Reenact `source` (or the reenactor's current source) with the driving video into `out`.

    Atomic output: on any error or KeyboardInterrupt nothing is left at `out`. `write=False` decodes,
    infers and encodes but keeps no file (benchmarks). Returns a RunSummary."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    cropper = cropper if cropper is not None else FaceCropper("auto", device=reenactor.device)
    cropper.reset()
    if source is not None:
        _source_to_reenactor(reenactor, source, cropper)
    if not reenactor.has_source:
        raise RuntimeError("no source image: pass source= or call reenactor.set_source first")
    cuda = reenactor.device.type == "cuda"
    reader = VideoReader(driving, max_frames=max_frames, what="driving video")
    info = reader.info
    h, w = info.height, info.width
    oh, ow = (h, w) if paste_back else (reenactor.size, reenactor.size)
    oh, ow = oh - oh % 2, ow - ow % 2  # yuv420p
    writer = None
    try:
        if write:
            writer = VideoWriter(out, info.fps, ow, oh, codec=codec, audio_from=driving, preset=preset)
        else:  # everything is encoded, then dropped (benchmarks)
            writer = VideoWriter(Path(tempfile.gettempdir()) / "ostnet-discard.mp4", info.fps, ow, oh,
                                 codec=codec, audio_from=driving, preset=preset)
        summary = _run(reenactor, reader, writer, cropper, batch_size, paste_back, feather, (oh, ow),
                       queue_size, progress, cuda, on_batch)
        writer.close() if write else writer.abort()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        reader.close()
    summary.output = str(writer.path) if write else None
    summary.audio = writer.audio_mode
    return summary


def _run(reenactor, reader, writer, cropper, batch_size, paste_back, feather, out_hw, queue_size, progress,
         cuda, on_batch) -> RunSummary:
    from tqdm import tqdm

    h, w = reader.info.height, reader.info.width
    oh, ow = out_hw
    # Input buffers travel reader -> in_q -> main -> out_q -> writer (freed once the batch's D2H is done);
    # output buffers main -> out_q -> writer. Enough of each that no stage waits on a buffer before the
    # queues are full; bounded, so memory is too.
    pin = cuda
    free_in: queue.Queue = queue.Queue()
    free_out: queue.Queue = queue.Queue()
    for _ in range(2 * queue_size + 3):
        free_in.put(torch.empty((batch_size, h, w, 3), dtype=torch.uint8, pin_memory=pin))
    for _ in range(queue_size + 2):
        free_out.put(torch.empty((batch_size, oh, ow, 3), dtype=torch.uint8, pin_memory=pin))
    in_q: queue.Queue = queue.Queue(maxsize=queue_size)
    out_q: queue.Queue = queue.Queue(maxsize=queue_size)
    job = _Job()
    times = {"decode": 0.0, "encode": 0.0}

    def read_loop():
        try:
            frames = reader.av_frames()
            done = False
            while not done:
                buf = job.get(free_in)
                arr = buf.numpy()  # (B, H, W, 3) view of the (pinned) buffer
                t0 = time.perf_counter()
                n = 0
                for frame in frames:
                    if frame.width != w or frame.height != h:
                        raise InputError(f"driving video {reader.path}: the frame size changes mid-stream "
                                         f"({w}x{h} -> {frame.width}x{frame.height})")
                    arr[n] = frame.to_ndarray(format="rgb24")
                    n += 1
                    if n == batch_size:
                        break
                else:
                    done = True
                boxes = cropper.boxes(arr[:n]) if n else None
                times["decode"] += time.perf_counter() - t0
                if n:
                    job.put(in_q, (buf, n, boxes))
            job.put(in_q, None)
        except _Stop:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, re-raised there
            job.fail(e)

    def write_loop():
        try:
            while True:
                item = job.get(out_q)
                if item is None:
                    return
                obuf, n, in_buf, event = item
                if event is not None:
                    event.synchronize()
                free_in.put(in_buf)
                t0 = time.perf_counter()
                arr = obuf.numpy()
                for i in range(n):
                    writer.write(arr[i])
                times["encode"] += time.perf_counter() - t0
                free_out.put(obuf)
        except _Stop:
            pass
        except BaseException as e:  # noqa: BLE001
            job.fail(e)

    threads = [threading.Thread(target=read_loop, name="ostnet-decode", daemon=True),
               threading.Thread(target=write_loop, name="ostnet-encode", daemon=True)]
    total = reader.expected_frames
    bar = tqdm(total=total, unit="frame", disable=not progress, file=sys.stderr, dynamic_ncols=True,
               desc=f"reenact [{reenactor.backend_name}]")
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    infer_cpu_s = 0.0
    frames_done = 0
    start = time.perf_counter()
    for t in threads:
        t.start()
    try:
        while True:
            item = job.get(in_q)
            if item is None:
                break
            buf, n, boxes = item
            obuf = job.get(free_out)  # (B, oh, ow, 3) pinned; taken first so no wait sits inside the timing
            t0 = time.perf_counter()
            if cuda:
                ev0 = torch.cuda.Event(enable_timing=True)
                ev0.record()
            x = buf[:n].to(reenactor.device, non_blocking=True)  # (n, H, W, 3) uint8, H2D from pinned
            y = process_batch(reenactor, x, boxes, paste_back=paste_back, feather=feather)  # (n, oh', ow', 3)
            obuf[:n].copy_(y[:, :oh, :ow], non_blocking=True)  # async D2H; the writer waits on `event`
            event = None
            if cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                events.append((ev0, event))
            infer_cpu_s += time.perf_counter() - t0
            job.put(out_q, (obuf, n, buf, event))
            frames_done += n
            bar.update(n)
            if on_batch is not None:
                on_batch(n)
        job.put(out_q, None)
        threads[1].join()
    except _Stop:
        pass  # a thread failed: its error is raised below
    except BaseException as e:
        job.fail(e)
        raise
    finally:
        job.stop.set()  # normal end: both threads are done already; otherwise this stops them
        for t in threads:
            t.join(timeout=30)
        bar.close()
    if job.error is not None:
        raise job.error
    if cuda:
        torch.cuda.synchronize()
        infer_s = sum(a.elapsed_time(b) for a, b in events) / 1000
    else:
        infer_s = infer_cpu_s
    wall = time.perf_counter() - start
    if frames_done == 0:
        raise InputError(f"driving video {reader.path} has no frames")
    return RunSummary(frames=frames_done, wall_s=wall, fps=frames_done / wall, backend=reenactor.backend_name,
                      device=str(reenactor.device), batch=batch_size, decode_s=times["decode"],
                      inference_s=infer_s, encode_s=times["encode"])


# --------------------------------------------------------------------------------------------------
# Live


def camera_frames(camera: int | str = 0, width: int | None = None, height: int | None = None,
                  fps: int | None = None) -> Iterator[np.ndarray]:
    """Frames from a camera: /dev/video{N} through PyAV's v4l2 input, else OpenCV when it imports."""
    import importlib.util
    device = f"/dev/video{camera}" if isinstance(camera, int) or str(camera).isdigit() else str(camera)
    if Path(device).exists():
        import av
        options = {}
        if width and height:
            options["video_size"] = f"{width}x{height}"
        if fps:
            options["framerate"] = str(fps)
        try:
            container = av.open(device, format="v4l2", options=options)
        except av.error.FFmpegError as e:
            raise InputError(f"camera {device} could not be opened ({e})") from None
        try:
            for frame in container.decode(video=0):
                yield frame.to_ndarray(format="rgb24")
        finally:
            container.close()
        return
    if importlib.util.find_spec("cv2") is not None:
        import cv2
        cap = cv2.VideoCapture(int(camera) if str(camera).isdigit() else str(camera))
        if not cap.isOpened():
            raise InputError(f"camera {camera} could not be opened with OpenCV")
        try:
            while True:
                ok, bgr = cap.read()
                if not ok:
                    return
                yield bgr[:, :, ::-1].copy()
        finally:
            cap.release()
        return
    raise InputError(f"camera {camera}: {device} does not exist and OpenCV is not installed")


def live_frames(reenactor: Reenactor, frames: Iterable[np.ndarray], cropper: FaceCropper | None = None,
                paste_back: bool = False, max_frames: int | None = None,
                feather: float = 0.0) -> Iterator[np.ndarray]:
    """The live loop's core: any iterator of (H, W, 3) uint8 RGB frames -> generated frames, one by one
    (batch 1, lowest latency): (S, S, 3), or (H, W, 3) with paste_back."""
    if not reenactor.has_source:
        raise RuntimeError("call reenactor.set_source(image) before the live loop")
    cropper = cropper if cropper is not None else FaceCropper("auto", device=reenactor.device)
    for i, frame in enumerate(frames):
        if max_frames is not None and i >= max_frames:
            return
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise InputError(f"live frame {i} must be (H, W, 3) uint8 RGB, got {frame.dtype} {frame.shape}")
        boxes = cropper.boxes(frame[None])
        x = reenactor.to_device_uint8(frame[None])
        yield process_batch(reenactor, x, boxes, paste_back=paste_back, feather=feather)[0].cpu().numpy()


def live(reenactor: Reenactor, source: np.ndarray | None = None, frames: Iterable[np.ndarray] | None = None,
         camera: int | str | None = None, out: str | Path | None = None, show: bool = False,
         sink: Callable[[np.ndarray], None] | None = None, max_frames: int | None = None,
         paste_back: bool = False, fps: float = 25, cropper: FaceCropper | None = None) -> RunSummary:
    """Reenact frames from `frames` (any iterator) or a camera; each result goes to `sink`, the video
    file `out` (atomic, at `fps`), and/or a window (`show`, needs OpenCV). Stops at max_frames, at the
    end of the iterator, on 'q' in the window, or on Ctrl-C (the file written so far is kept)."""
    if (frames is None) == (camera is None):
        raise ValueError("give exactly one of frames= or camera=")
    if not (out or show or sink):
        raise ValueError("nothing to do with the results: give out=, show=True or sink=")
    cv2 = None
    if show:
        try:
            import cv2
        except ModuleNotFoundError:
            raise InputError("showing a window needs OpenCV (pip install opencv-python); use --out FILE") from None
    cropper = cropper if cropper is not None else FaceCropper("auto", device=reenactor.device)
    if source is not None:
        _source_to_reenactor(reenactor, source, cropper)
    frames = frames if frames is not None else camera_frames(camera)
    writer = None
    n = 0
    start = time.perf_counter()
    infer_s = encode_s = 0.0
    try:
        it = live_frames(reenactor, frames, cropper=cropper, paste_back=paste_back, max_frames=max_frames)
        while True:
            t0 = time.perf_counter()
            try:
                result = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            infer_s += t1 - t0
            if sink is not None:
                sink(result)
            if out is not None:
                if writer is None:
                    writer = VideoWriter(out, fps, result.shape[1], result.shape[0], codec="libx264")
                writer.write(result)
            if cv2 is not None:
                cv2.imshow("ostnet-fast live", result[:, :, ::-1])
                if cv2.waitKey(1) & 0xFF == ord("q"):
                    break
            encode_s += time.perf_counter() - t1
            n += 1
    except KeyboardInterrupt:
        pass  # live use ends with Ctrl-C: keep what was written
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if cv2 is not None:
            cv2.destroyAllWindows()
    if writer is not None:
        writer.close()
    wall = time.perf_counter() - start
    return RunSummary(frames=n, wall_s=wall, fps=n / max(wall, 1e-9), backend=reenactor.backend_name,
                      device=str(reenactor.device), batch=1, decode_s=0.0, inference_s=infer_s,
                      encode_s=encode_s, output=str(writer.path) if writer is not None else None)
