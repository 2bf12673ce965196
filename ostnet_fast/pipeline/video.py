"""Video in and out with PyAV: any container/codec FFmpeg reads; H.264 (or the codec asked for) out.

Reading: `probe(path)` -> `VideoInfo` (size, frame rate, frame count if the container knows it, audio);
`VideoReader(path)` iterates frames as (H, W, 3) uint8 RGB numpy arrays. Every failure to open or decode
is an `InputError` (a ValueError) with one line that names the file: missing, unreadable/corrupt, no
video stream, or a still image given where a video is expected.

Writing: `VideoWriter(path, fps, width, height)` encodes yuv420p at a constant frame rate (one output
frame per frame written, so the driving video's frame count and rate are kept) and copies the audio of
`audio_from` (remuxed when the output container takes its codec, re-encoded to AAC otherwise), cut at
the end of the video. It is atomic: frames go to a hidden temp file in the output's folder that is
renamed onto the output by `close()`; `abort()`, any exception inside `with`, or KeyboardInterrupt
removes the temp file, so no partial output is ever left behind.

Frame sizes: yuv420p needs even width and height; an odd size is cropped by one pixel (right/bottom).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from .._files import give_default_mode

try:
    import av
except ModuleNotFoundError:  # pragma: no cover - PyAV is a core dependency of the pipeline
    av = None


class InputError(ValueError):
    """A bad input or output path: missing, unreadable, not a video, ... (one line, names the file)."""


def _require_av():
    if av is None:
        raise InputError("video I/O needs PyAV: pip install av")
    return av


# Containers FFmpeg opens as a single still image: refused where a video is expected.
_IMAGE_FORMATS = {"image2", "image2pipe", "apng"}

# Output container by file suffix -> (FFmpeg muxer, audio codecs it takes as-is (None: any)).
# Audio the muxer does not take is re-encoded: AAC, or Opus for WebM.
OUTPUT_FORMATS: dict[str, tuple[str, frozenset | None]] = {
    ".mp4": ("mp4", frozenset({"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"})),
    ".m4v": ("mp4", frozenset({"aac", "mp3", "alac", "ac3", "eac3"})),
    ".mov": ("mov", frozenset({"aac", "mp3", "alac", "ac3", "eac3", "pcm_s16le", "pcm_s24le", "pcm_f32le"})),
    ".mkv": ("matroska", None),
    ".webm": ("webm", frozenset({"opus", "vorbis"})),
    ".avi": ("avi", frozenset({"mp3", "ac3", "pcm_s16le", "aac"})),
}


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int
    height: int
    fps: Fraction                 # frames per second (the stream's average rate, else its guess, else 25)
    frame_count: int | None       # from the container header; None when unknown (e.g. some .mkv / .webm)
    codec: str
    has_audio: bool
    audio_codec: str | None
    duration_s: float | None

    def describe(self) -> str:
        n = "?" if self.frame_count is None else str(self.frame_count)
        audio = f", audio {self.audio_codec}" if self.has_audio else ", no audio"
        return f"{self.width}x{self.height} {self.codec} {float(self.fps):.3f} fps, {n} frames{audio}"


def _open_input(path: str | Path, what: str = "video"):
    _require_av()
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if path.is_dir():
        raise InputError(f"{what} is a directory, not a file: {path}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} is not readable (permission denied): {path}")
    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError, OSError) as e:
        raise InputError(f"{what} {path} is not a readable video file ({_short(e)})") from None
    try:
        fmt = container.format.name
        if fmt in _IMAGE_FORMATS or fmt.endswith("_pipe"):
            raise InputError(f"{what} {path} is a still image ({fmt}), not a video")
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]
            raise InputError(f"{what} {path} has no video stream (found: {', '.join(kinds)})")
    except BaseException:
        container.close()
        raise
    return container


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _info(path: Path, container) -> VideoInfo:
    vs = container.streams.video[0]
    cc = vs.codec_context
    fps = vs.average_rate or vs.guessed_rate or vs.base_rate or Fraction(25)
    fps = Fraction(fps)
    if fps <= 0:
        fps = Fraction(25)
    frames = int(vs.frames) if vs.frames else None
    duration = None
    if vs.duration is not None and vs.time_base is not None:
        duration = float(vs.duration * vs.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000
    audio = container.streams.audio[0] if container.streams.audio else None
    return VideoInfo(path=path, width=cc.width, height=cc.height, fps=fps, frame_count=frames,
                     codec=cc.name, has_audio=audio is not None,
                     audio_codec=audio.codec_context.name if audio is not None else None, duration_s=duration)


def probe(path: str | Path, what: str = "video") -> VideoInfo:
    """Open `path`, check it has a decodable video stream (the first frame is decoded), return its info."""
    path = Path(path)
    with _open_input(path, what) as container:
        info = _info(path, container)
        try:
            next(container.decode(video=0))
        except StopIteration:
            raise InputError(f"{what} {path} has a video stream but no decodable frame") from None
        except (av.error.FFmpegError, ValueError) as e:
            raise InputError(f"{what} {path} could not be decoded ({_short(e)})") from None
        if info.width <= 0 or info.height <= 0:
            raise InputError(f"{what} {path} reports a bad frame size {info.width}x{info.height}")
    return info


class VideoReader:
    """Iterate the frames of a video as (H, W, 3) uint8 RGB arrays. Use as a context manager."""

    def __init__(self, path: str | Path, max_frames: int | None = None, threads: bool = True,
                 what: str = "video"):
        self.path = Path(path)
        self.what = what
        self.max_frames = max_frames
        self._container = _open_input(self.path, what)
        self.info = _info(self.path, self._container)
        if threads:  # frame + slice threading inside FFmpeg: decode is then rarely the bottleneck
            self._container.streams.video[0].thread_type = "AUTO"

    def __len__(self) -> int:
        n = self.info.frame_count
        if n is None:
            raise TypeError("frame count unknown for this container")
        return n if self.max_frames is None else min(n, self.max_frames)

    @property
    def expected_frames(self) -> int | None:
        n = self.info.frame_count
        if self.max_frames is None:
            return n
        return self.max_frames if n is None else min(n, self.max_frames)

    def av_frames(self) -> Iterator["av.VideoFrame"]:
        """The decoded av.VideoFrame objects (no conversion), at most max_frames."""
        count = 0
        try:
            for frame in self._container.decode(video=0):
                if self.max_frames is not None and count >= self.max_frames:
                    return
                yield frame
                count += 1
        except av.error.FFmpegError as e:
            raise InputError(f"{self.what} {self.path}: decoding failed after {count} frames ({_short(e)})") \
                from None

    def __iter__(self) -> Iterator[np.ndarray]:
        for frame in self.av_frames():
            yield frame.to_ndarray(format="rgb24")

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_video(path: str | Path, max_frames: int | None = None) -> tuple[np.ndarray, VideoInfo]:
    """Whole video in memory: (N, H, W, 3) uint8 and its info (small videos, tests)."""
    with VideoReader(path, max_frames=max_frames) as r:
        frames = list(r)
        info = r.info
    if not frames:
        raise InputError(f"video {path} has no frames")
    return np.stack(frames), info


def output_format(path: str | Path) -> tuple[str, frozenset | None]:
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise InputError(f"output {path}: unknown video container {suffix or '(no suffix)'!r}; use one of "
                         f"{', '.join(sorted(OUTPUT_FORMATS))}")
    return OUTPUT_FORMATS[suffix]


def check_output_path(path: str | Path, create: bool = False) -> Path:
    """Validate an output video path before any work: known container, not a directory, and a folder
    that exists and is writable or can be created (by a writable existing ancestor). Creates the folder
    only with create=True (the writer, when it starts), so a refused run leaves nothing behind.
    Raises InputError."""
    path = Path(path)
    output_format(path)
    if path.is_dir():
        raise InputError(f"output {path} is a directory; give a file name such as {path / 'out.mp4'}")
    parent = path.parent if str(path.parent) else Path(".")
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"output folder {parent} is not a directory ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"output folder {existing} is not writable")
    if create:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"output folder {parent} cannot be created ({e.strerror})") from None
    return path


class _AudioCopy:
    """Audio of `source` into `out`: packets remuxed, or decoded and re-encoded to AAC; fed lazily so
    audio and video packets interleave, and cut where the video ends."""

    def __init__(self, source: Path, out, allowed: frozenset | None):
        self.input = av.open(str(source), mode="r")
        self.in_stream = self.input.streams.audio[0]
        codec = self.in_stream.codec_context.name
        self.remux = allowed is None or codec in allowed
        if self.remux:
            self.out_stream = out.add_stream_from_template(self.in_stream)
            self.mode = "copy"
        else:
            self.mode = "libopus" if out.format.name == "webm" else "aac"
            rate = 48000 if self.mode == "libopus" else (self.in_stream.codec_context.sample_rate or 48000)
            self.out_stream = out.add_stream(self.mode, rate=rate)
            self.out_stream.codec_context.layout = "stereo" if self.in_stream.codec_context.channels >= 2 \
                else "mono"
            self.out_stream.codec_context.bit_rate = 160_000
        self.out = out
        self._packets = self.input.demux(self.in_stream)
        self._pending = None  # a packet (remux) or a frame (re-encode) read but past the last limit
        self._done = False

    def _items(self):
        for packet in self._packets:
            if packet.dts is None:  # demuxer flush packet
                continue
            if self.remux:
                yield packet
            else:
                yield from packet.decode()

    def feed_until(self, t: float) -> None:
        """Mux audio up to time t (seconds); remember the first item past it."""
        if self._done:
            return
        if not hasattr(self, "_it"):
            self._it = self._items()
        while True:
            item = self._pending
            self._pending = None
            if item is None:
                item = next(self._it, None)
                if item is None:
                    self._done = True
                    return
            start = float(item.pts * item.time_base) if item.pts is not None else 0.0
            if start >= t:
                self._pending = item
                return
            if self.remux:
                item.stream = self.out_stream
                self.out.mux(item)
            else:
                item.pts = None  # the encoder restamps from its sample count
                self.out.mux(self.out_stream.encode(item))

    def finish(self, t_end: float) -> None:
        self.feed_until(t_end)
        if not self.remux:
            self.out.mux(self.out_stream.encode(None))

    def close(self) -> None:
        self.input.close()


class VideoWriter:
    """Atomic video writer: `write(frame)` / `write_batch(frames)` of (H, W, 3) uint8 RGB; `close()`
    renames the finished file onto `path`; `abort()` (or an exception inside `with`) removes it."""

    def __init__(self, path: str | Path, fps: Fraction | float | int, width: int, height: int,
                 codec: str = "libx264", audio_from: str | Path | None = None, crf: int | None = 18,
                 preset: str | None = "veryfast", options: dict[str, str] | None = None):
        _require_av()
        self.path = check_output_path(path, create=True)
        fmt, allowed_audio = output_format(self.path)
        self.fps = Fraction(fps).limit_denominator(1_000_000)
        if self.fps <= 0:
            raise InputError(f"frame rate must be positive, got {fps}")
        self.width, self.height = int(width) - int(width) % 2, int(height) - int(height) % 2
        if self.width < 2 or self.height < 2:
            raise InputError(f"output frame size too small: {width}x{height}")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".partial{self.path.suffix}",
                                       dir=self.path.parent)
        except OSError as e:  # e.g. /proc or /sys, which no access() check predicts
            raise InputError(f"cannot create files in the output folder {self.path.parent} ({e.strerror})") from None
        os.close(fd)
        self.tmp_path = Path(tmp)
        self.frames_written = 0
        self._closed = False
        self._audio = None
        self.audio_mode: str | None = None  # 'copy' (remuxed), 'aac' / 'libopus' (re-encoded), None
        try:
            # faststart: the index goes to the front, so players and browsers can start before the end.
            container_options = {"movflags": "+faststart"} if fmt in ("mp4", "mov") else {}
            self._container = av.open(str(self.tmp_path), mode="w", format=fmt, options=container_options)
            try:
                self._stream = self._container.add_stream(codec, rate=self.fps)
            except (av.error.FFmpegError, ValueError) as e:
                raise InputError(f"video codec {codec!r} is not available in this FFmpeg build "
                                 f"({_short(e)})") from None
            cc = self._stream.codec_context
            cc.width, cc.height = self.width, self.height
            cc.pix_fmt = "yuv420p"
            cc.time_base = 1 / self.fps
            opts = {}
            if codec in ("libx264", "libx265"):
                if crf is not None:
                    opts["crf"] = str(crf)
                if preset:
                    opts["preset"] = preset
            opts.update(options or {})
            cc.options = opts
            if audio_from is not None:
                with av.open(str(audio_from), mode="r") as probe_container:
                    has_audio = bool(probe_container.streams.audio)
                if has_audio:
                    self._audio = _AudioCopy(Path(audio_from), self._container, allowed_audio)
                    self.audio_mode = self._audio.mode
        except BaseException:
            self._discard()
            raise


    def _mux(self, packets) -> None:
        for packet in packets:
            if self._audio is not None and packet.pts is not None:
                self._audio.feed_until(float(packet.pts * packet.time_base))
            self._container.mux(packet)

    def write(self, frame: np.ndarray) -> None:
        """One (H, W, 3) uint8 RGB frame (cropped to the even size the stream was opened with)."""
        if self._closed:
            raise RuntimeError("VideoWriter is closed")
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frame must be (H, W, 3) uint8 RGB, got {frame.dtype} {frame.shape}")
        if frame.shape[0] < self.height or frame.shape[1] < self.width:
            raise ValueError(f"frame {frame.shape[1]}x{frame.shape[0]} is smaller than the stream "
                             f"{self.width}x{self.height}")
        if frame.shape[0] != self.height or frame.shape[1] != self.width:
            frame = frame[:self.height, :self.width]
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        vf.pts = self.frames_written
        vf.time_base = self._stream.codec_context.time_base
        self._mux(self._stream.encode(vf))
        self.frames_written += 1

    def write_batch(self, frames: np.ndarray) -> None:
        for frame in frames:
            self.write(frame)

    def close(self) -> Path:
        """Flush the encoder, copy the rest of the audio, and rename the temp file onto the output."""
        if self._closed:
            return self.path
        try:
            if self.frames_written == 0:
                raise ValueError(f"no frames were written to {self.path}")
            self._mux(self._stream.encode(None))
            if self._audio is not None:
                self._audio.finish(float(self.frames_written / self.fps))
            self._container.close()
            self._close_audio()
            give_default_mode(self.tmp_path)
            os.replace(self.tmp_path, self.path)
            self._closed = True
        except BaseException:
            self.abort()
            raise
        return self.path

    def _close_audio(self) -> None:
        if self._audio is not None:
            self._audio.close()
            self._audio = None

    def _discard(self) -> None:
        self._closed = True
        try:
            if getattr(self, "_container", None) is not None:
                try:
                    self._container.close()
                except Exception:  # closing a half-written container may fail; the file goes anyway
                    pass
            self._close_audio()
        finally:
            self.tmp_path.unlink(missing_ok=True)

    def abort(self) -> None:
        """Drop everything written so far: the temp file is removed, the output is not touched."""
        if not self._closed or self.tmp_path.exists():
            self._discard()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
