"""Reenactor API (kinds in = kinds out, source once, batching, backends), relative motion, and the
video pipeline (frame count / rate / audio kept, atomic output, live loop) on CPU at 64x64."""
from __future__ import annotations

import importlib.util
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from ostnet_fast import OSTNet, save_checkpoint
from ostnet_fast.config import load_config
from ostnet_fast.pipeline.crop import FaceCropper
from ostnet_fast.pipeline.reenactor import (BackendUnavailable, FusedBackend, Reenactor, RelativeMotion,
                                            TorchBackend, hull_area)
from ostnet_fast.pipeline.run import live, live_frames, reenact_video
from ostnet_fast.pipeline.video import InputError, probe, read_video

from .test_video import make_video, synthetic_frames

TINY = str(Path(__file__).parent / "configs" / "tiny.yaml")


def tiny_model(seed: int = 0, off_identity: bool = True) -> OSTNet:
    torch.manual_seed(seed)
    model = OSTNet(load_config(TINY).model).eval()
    if off_identity:  # a non-identity scale transformation, so the rectification path is exercised
        with torch.no_grad():
            model.scale_transform.F_fc.weight.normal_(0, 0.05)
    return model


@pytest.fixture
def source():
    return synthetic_frames(1, 80, 96, seed=3)[0]  # not square, not 64: resized


@pytest.fixture
def center():
    return FaceCropper("center")


# --------------------------------------------------------------------------------------------------
# API


def test_kinds_in_are_kinds_out(source):
    torch.manual_seed(0)
    r = Reenactor(model=tiny_model())
    r.set_source(source)
    frames = synthetic_frames(3, 48, 64, seed=1)
    one = r(frames[0])
    assert one.shape == (64, 64, 3) and one.dtype == np.uint8
    batch = r(frames)
    assert batch.shape == (3, 64, 64, 3) and batch.dtype == np.uint8
    assert np.abs(batch[0].astype(int) - one.astype(int)).max() <= 1  # batching changes nothing visible
    t = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    out = r(t)
    assert out.shape == (3, 3, 64, 64) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    assert r(t[0]).shape == (3, 64, 64)
    assert r(torch.from_numpy(frames)).dtype == torch.uint8  # uint8 HWC tensors like numpy


def test_float_and_uint8_sources_agree(source):
    a = Reenactor(model=tiny_model())
    b = Reenactor(model=tiny_model())
    a.set_source(source)
    b.set_source(torch.from_numpy(source).permute(2, 0, 1).float() / 255)
    frame = synthetic_frames(1, 64, 64, seed=2)[0]
    assert np.abs(a(frame).astype(int) - b(frame).astype(int)).max() <= 1


def test_source_is_encoded_once(source, monkeypatch):
    model = tiny_model()
    r = Reenactor(model=model)
    calls = []
    orig = model.encode_source
    monkeypatch.setattr(model, "encode_source", lambda x: calls.append(1) or orig(x))
    r.set_source(source)
    r(synthetic_frames(2, 64, 64))
    list(r.stream(iter(synthetic_frames(5, 64, 64)), batch_size=2))
    assert calls == [1]


def test_stream_matches_batched_calls(source):
    r = Reenactor(model=tiny_model())
    r.set_source(source)
    frames = synthetic_frames(5, 48, 64, seed=4)
    streamed = list(r.stream(iter(frames), batch_size=2))  # 2 + 2 + 1: a partial last batch
    assert len(streamed) == 5
    batched = r(frames)
    assert max(np.abs(s.astype(int) - b.astype(int)).max() for s, b in zip(streamed, batched)) <= 1


def test_errors_are_clear(source):
    r = Reenactor(model=tiny_model())
    with pytest.raises(RuntimeError, match="set_source"):
        r(synthetic_frames(1, 64, 64)[0])
    with pytest.raises(ValueError, match="uint8 RGB"):
        r.set_source(source.astype(np.float32))
    with pytest.raises(ValueError, match="one source"):
        r.set_source(synthetic_frames(2, 64, 64))
    with pytest.raises(ValueError, match="backend must be"):
        Reenactor(model=tiny_model(), backend="tvm")
    with pytest.raises(ValueError, match="fp16 needs"):
        Reenactor(model=tiny_model(), fp16=True)
    with pytest.raises(ValueError, match="batch_size"):
        list(r.stream([], batch_size=0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda():
    with pytest.raises(BackendUnavailable, match="CUDA is not available"):
        Reenactor(model=tiny_model(), device="cuda")


def test_random_weights_warn_loudly(capsys, caplog):
    Reenactor(config=TINY)
    assert "RANDOM weights" in capsys.readouterr().err
    assert any("RANDOM weights" in rec.getMessage() for rec in caplog.records)


def test_checkpoint_loads_without_warning(tmp_path, capsys, source):
    model = tiny_model()
    path = save_checkpoint(tmp_path / "tiny.safetensors", model, load_config(TINY))
    r = Reenactor(checkpoint=path)
    assert not r.random_weights and "RANDOM" not in capsys.readouterr().err
    ref = Reenactor(model=tiny_model())
    r.set_source(source)
    ref.set_source(source)
    frame = synthetic_frames(1, 64, 64)[0]
    np.testing.assert_array_equal(r(frame), ref(frame))


def test_random_weights_are_repeatable():
    a = Reenactor(config=TINY).model.state_dict()
    b = Reenactor(config=TINY).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fused_backend_on_cpu_equals_torch(source):
    # Off CUDA the fused model dispatches to the references and takes no graphs: the same numbers.
    model = tiny_model()
    t = Reenactor(model=model, backend="torch")
    f = Reenactor(model=model, backend="fused")
    assert isinstance(f.backend, FusedBackend) and f.backend.model.fused and not f.backend.cuda_graphs
    assert isinstance(t.backend, TorchBackend) and not t.backend.model.fused
    t.set_source(source)
    f.set_source(source)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(f(x), t(x), atol=1e-6, rtol=0)


def test_fused_flag_names_the_backend():
    """Reenactor(fused=True), like OSTNet(fused=True), is the fused backend; fused=False the torch one."""
    model = tiny_model()
    assert Reenactor(model=model, fused=True).backend_name == "fused"
    assert Reenactor(model=model, fused=False).backend_name == "torch"
    assert Reenactor(model=model, fused=True, backend="fused").backend_name == "fused"
    assert Reenactor(model=model).backend_name == "torch"
    with pytest.raises(ValueError, match="fused=True means backend='fused'"):
        Reenactor(model=model, fused=True, backend="onnxruntime")
    with pytest.raises(ValueError, match="fused=False means backend='torch'"):
        Reenactor(model=model, fused=False, backend="fused")


class FakeGraphedStep:
    """Stands in for runtime.cuda_graph.GraphedStep on CPU: static buffers, replay recomputes in place."""

    def __init__(self, fn, example_inputs, warmup=3, pool=None):
        self.fn = fn
        self.static_inputs = tuple(t.detach().clone() for t in example_inputs)
        self.static_outputs = fn(*self.static_inputs).clone()
        self.graph = self

    @property
    def shapes(self):
        return tuple(tuple(t.shape) for t in self.static_inputs)

    def replay(self):
        self.static_outputs.copy_(self.fn(*self.static_inputs))


@pytest.mark.parametrize("relative", [False, True])
def test_graph_bookkeeping_pads_recaptures_and_keeps_the_source(monkeypatch, source, relative):
    # The CUDA-graph logic of FusedBackend (capture per largest batch, pad partial batches, re-capture on
    # a larger one, copy a new source into the captured tensors) checked on CPU with a fake graph.
    import ostnet_fast.runtime.cuda_graph as cg
    monkeypatch.setattr(cg, "GraphedStep", FakeGraphedStep)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    model = tiny_model()
    graphed = Reenactor(model=model, backend="fused", relative=relative)
    graphed.backend.cuda_graphs = True
    eager = Reenactor(model=model, backend="fused", relative=relative)
    g = torch.Generator().manual_seed(0)
    for r in (graphed, eager):
        r.set_source(source)
    for n in (3, 3, 2, 5, 1):  # (eager first in relative mode), capture, pad, re-capture, pad
        x = torch.rand(n, 3, 64, 64, generator=g)
        out = graphed(x)
        assert out.shape == (n, 3, 64, 64)
        torch.testing.assert_close(out, eager(x), atol=1e-6, rtol=0)
    assert graphed.backend.captures == 2
    state = graphed.backend.state
    other = synthetic_frames(1, 64, 64, seed=9)[0]
    for r in (graphed, eager):
        r.set_source(other)
    assert graphed.backend.state is state  # copied in place: a captured graph would see the new source
    x = torch.rand(4, 3, 64, 64, generator=g)
    torch.testing.assert_close(graphed(x), eager(x), atol=1e-6, rtol=0)
    assert graphed.backend.captures == 2


@pytest.mark.parametrize("relative", [False, True])
def test_compiled_fused_backend_equals_eager(monkeypatch, source, relative):
    # compile=True compiles the per-frame step (before each capture); here with a cheap backend and fake
    # graphs on CPU. Absolute mode compiles as one graph (fullgraph: a graph break fails the test).
    import ostnet_fast.runtime.cuda_graph as cg
    monkeypatch.setattr(cg, "GraphedStep", FakeGraphedStep)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    compiled_fns = []
    real_compile = torch.compile

    def cheap_compile(fn, **kwargs):
        compiled_fns.append(fn)
        return real_compile(fn, backend="aot_eager", fullgraph=not relative, **kwargs)
    monkeypatch.setattr(torch, "compile", cheap_compile)
    torch._dynamo.reset()
    model = tiny_model()
    compiled = Reenactor(model=model, backend="fused", relative=relative, compile=True)
    compiled.backend.cuda_graphs = True
    eager = Reenactor(model=model, backend="fused", relative=relative)
    assert compiled.backend.compiled and len(compiled_fns) == 1
    g = torch.Generator().manual_seed(4)
    for r in (compiled, eager):
        r.set_source(source)
    for n in (2, 2, 3):
        x = torch.rand(n, 3, 64, 64, generator=g)
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=0)
    assert compiled.backend.captures == 2
    torch._dynamo.reset()


def test_compile_is_refused_by_the_torch_backend():
    with pytest.raises(TypeError, match="compile"):
        Reenactor(model=tiny_model(), backend="torch", compile=True)


def test_size_override_runs_the_model_at_another_resolution(source):
    r = Reenactor(model=tiny_model(), size=32)
    r.set_source(source)
    assert r(synthetic_frames(1, 48, 64)[0]).shape == (32, 32, 3)


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_external_backends_fail_clearly(tmp_path, backend):
    with pytest.raises(BackendUnavailable, match="relative motion needs"):
        Reenactor(model=tiny_model(), backend=backend, relative=True)
    with pytest.raises(BackendUnavailable, match=f"backend '{backend}' could not start.*not found"):
        Reenactor(model=tiny_model(), backend=backend, engine=tmp_path / "no-engines")


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
def test_onnxruntime_backend_matches_torch(source):
    model = tiny_model()
    ref = Reenactor(model=model)
    ort = Reenactor(model=model, backend="onnxruntime")  # exports the tiny model to a temp folder
    ref.set_source(source)
    ort.set_source(source)
    frames = synthetic_frames(3, 48, 64, seed=7)
    assert np.abs(ort(frames).astype(int) - ref(frames).astype(int)).max() <= 1
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert (ort(x) - ref(x)).abs().max() <= 1e-4


# --------------------------------------------------------------------------------------------------
# Relative motion


def test_hull_area_matches_scipy():
    spatial = pytest.importorskip("scipy.spatial")
    rng = np.random.default_rng(0)
    for k in (3, 5, 10, 15):
        pts = -0.3 + 0.5 * rng.standard_normal((k, 2))
        assert hull_area(pts) == pytest.approx(spatial.ConvexHull(pts).volume, rel=1e-12)
    assert hull_area(np.array([[0, 0], [1, 1], [2, 2]])) == 0.0  # collinear: degenerate
    assert hull_area(np.array([[0, 0], [2, 0], [2, 2], [0, 2], [1, 1]])) == pytest.approx(4.0)


def _kp(value, jac=None):
    kp = {"value": torch.as_tensor(value, dtype=torch.float32)}
    if jac is not None:
        kp["jacobian"] = torch.as_tensor(jac, dtype=torch.float32)
    return kp


def test_relative_motion_follows_fomm():
    g = torch.Generator().manual_seed(0)
    src = _kp(-0.2 + 0.3 * torch.randn(1, 5, 2, generator=g), torch.eye(2) + 0.1 * torch.randn(1, 5, 2, 2, generator=g))
    drv = _kp(0.1 + 0.3 * torch.randn(3, 5, 2, generator=g), torch.eye(2) + 0.1 * torch.randn(3, 5, 2, 2, generator=g))
    rel = RelativeMotion(adapt_movement_scale=True)
    rel.reset(src)
    out = rel(drv)
    s = np.sqrt(hull_area(src["value"][0].numpy()) / hull_area(drv["value"][0].numpy()))
    assert rel.movement_scale == pytest.approx(s, rel=1e-5)
    # Frame 0 is the initial pose: it maps exactly onto the source.
    torch.testing.assert_close(out["value"][0], src["value"][0])
    torch.testing.assert_close(out["jacobian"][0], src["jacobian"][0], atol=1e-5, rtol=1e-5)
    want = src["value"] + s * (drv["value"] - drv["value"][:1])
    torch.testing.assert_close(out["value"], want)
    want_j = drv["jacobian"] @ torch.linalg.inv(drv["jacobian"][:1]) @ src["jacobian"]
    torch.testing.assert_close(out["jacobian"], want_j, atol=1e-5, rtol=1e-5)
    # Later calls keep the first pose; a reset forgets it.
    later = rel(_kp(drv["value"][1:], drv["jacobian"][1:]))
    torch.testing.assert_close(later["value"], want[1:])
    rel.reset(src)
    assert not rel.initialized


def test_adapt_movement_scale_is_the_size_ratio():
    square = torch.tensor([[[-1.0, -1], [1, -1], [1, 1], [-1, 1]]])
    rel = RelativeMotion(adapt_movement_scale=True, relative_jacobian=False)
    rel.reset(_kp(0.25 * square))  # source face half the size of the driving face
    rel(_kp(0.5 * square))
    assert rel.movement_scale == pytest.approx(0.5)
    moved = rel(_kp(0.5 * square + 0.2))
    torch.testing.assert_close(moved["value"], 0.25 * square + 0.1)  # the motion is halved too


def test_relative_equals_absolute_on_the_first_frame():
    # With the identity scale transformation, driving with the source image itself first: frame 0's
    # keypoints are the source's, so relative (kp_S + 0) and absolute (kp_D = kp_S) give the same picture.
    model = tiny_model(off_identity=False)
    model.reset_scale_embedding()
    src = synthetic_frames(1, 64, 64, seed=5)[0]
    other = synthetic_frames(1, 64, 64, seed=6)[0]
    absolute = Reenactor(model=model)
    relative = Reenactor(model=model, relative=True, adapt_movement_scale=False)
    for r in (absolute, relative):
        r.set_source(src)
    x = torch.from_numpy(np.stack([src, other])).permute(0, 3, 1, 2).float() / 255
    a, b = absolute(x), relative(x)
    torch.testing.assert_close(b[0], a[0], atol=1e-4, rtol=0)
    # A new source resets the initial driving frame.
    relative.set_source(src)
    assert not relative.relative.initialized
    torch.testing.assert_close(relative(x[:1]), a[:1], atol=1e-4, rtol=0)
    # Relative mode is really on: driving from another first frame, frame 0's transformed keypoints are
    # the source's, not the absolute ones (random tiny weights make pictures nearly flat: compare kp).
    y = x.flip(0)  # [other, src]
    with torch.no_grad():
        state = model.encode_source(x[:1])
        rel = RelativeMotion(adapt_movement_scale=False)
        rel.reset(state.kp)
        kp_rel = model.animate(state, y, kp_transform=rel)["kp_rectified"]
        kp_abs = model.animate(state, y)["kp_rectified"]
    torch.testing.assert_close(kp_rel["value"][0], state.kp_value[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(kp_rel["jacobian"][0], state.kp_jacobian[0], atol=1e-4, rtol=1e-4)
    assert (kp_rel["value"][0] - kp_abs["value"][0]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# The video pipeline


def test_pipeline_keeps_frame_count_rate_and_audio(tmp_path, source, center):
    driving = make_video(tmp_path / "drive.mp4", n=7, size=(48, 64), fps=Fraction(30000, 1001), audio="aac")
    r = Reenactor(model=tiny_model())
    out = tmp_path / "out" / "result.mp4"
    summary = reenact_video(r, driving, out, source=source, batch_size=3, cropper=center, progress=False)
    assert summary.frames == 7 and summary.output == str(out) and summary.audio == "copy"
    assert summary.fps > 0 and set(summary.shares) == {"decode", "inference", "encode"}
    assert "7 frames" in summary.line() and "backend torch" in summary.line()
    info = probe(out)
    assert (info.frame_count, info.fps, info.width, info.height) == (7, Fraction(30000, 1001), 64, 64)
    assert info.has_audio and info.audio_codec == "aac"
    assert [p.name for p in out.parent.iterdir()] == ["result.mp4"]


def test_pipeline_output_matches_the_reenactor(tmp_path, source, center):
    driving = make_video(tmp_path / "drive.mp4", n=4, size=(64, 64))
    r = Reenactor(model=tiny_model())
    out = tmp_path / "o.mp4"
    reenact_video(r, driving, out, source=source, batch_size=4, cropper=center, progress=False)
    frames, _ = read_video(driving)
    want = r(frames)  # same source (crop of a non-square source = its centre square), same frames
    got, _ = read_video(out)
    assert np.abs(got.astype(float) - want.astype(float)).mean() < 6  # H.264 crf 18


def test_pipeline_paste_back_keeps_the_driving_size(tmp_path, source, center):
    driving = make_video(tmp_path / "drive.mp4", n=3, size=(48, 64))
    r = Reenactor(model=tiny_model())
    out = tmp_path / "pasted.mp4"
    reenact_video(r, driving, out, source=source, batch_size=2, paste_back=True, cropper=center, progress=False)
    frames, info = read_video(out)
    assert (info.width, info.height, len(frames)) == (64, 48, 3)
    drv, _ = read_video(driving)
    # The centre square (x 8..56) is generated; the side bands are the driving video.
    assert np.abs(frames[:, :, :6].astype(int) - drv[:, :, :6].astype(int)).mean() < 6


def test_pipeline_max_frames(tmp_path, source, center):
    driving = make_video(tmp_path / "drive.mp4", n=9, audio="aac")
    out = tmp_path / "short.mp4"
    s = reenact_video(Reenactor(model=tiny_model()), driving, out, source=source, max_frames=4, batch_size=3,
                      cropper=center, progress=False)
    assert s.frames == 4 and probe(out).frame_count == 4


@pytest.mark.parametrize("where", ["backend", "interrupt"])
def test_pipeline_failure_leaves_no_output(tmp_path, source, center, where):
    driving = make_video(tmp_path / "drive.mp4", n=8)
    r = Reenactor(model=tiny_model())
    out = tmp_path / "out" / "never.mp4"
    calls = []
    if where == "backend":
        inner = r.backend

        class Failing:  # a backend that dies on its second batch
            def set_source(self, x):
                inner.set_source(x)

            def __call__(self, x):
                calls.append(1)
                if len(calls) == 2:
                    raise RuntimeError("GPU fell over")
                return inner(x)
        r.backend = Failing()
        r.set_source(source)
        with pytest.raises(RuntimeError, match="fell over"):
            reenact_video(r, driving, out, batch_size=2, cropper=center, progress=False)
    else:
        def interrupt(n):
            calls.append(n)
            if len(calls) == 2:
                raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            reenact_video(r, driving, out, source=source, batch_size=2, cropper=center, progress=False,
                          on_batch=interrupt)
    assert len(calls) == 2
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_pipeline_corrupt_driving_is_an_input_error(tmp_path, source, center):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="not a readable video"):
        reenact_video(Reenactor(model=tiny_model()), bad, tmp_path / "o.mp4", source=source, cropper=center,
                      progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.mp4"]


def test_pipeline_warns_when_falling_back_to_the_centre_crop(tmp_path, source):
    driving = make_video(tmp_path / "drive.mp4", n=2)
    from ostnet_fast.pipeline.crop import FaceCropWarning
    no_face = FaceCropper(lambda frames: [None] * len(frames))
    with pytest.warns(FaceCropWarning, match="no face found"):
        s = reenact_video(Reenactor(model=tiny_model()), driving, tmp_path / "o.mp4", source=source,
                          cropper=no_face, progress=False)
    assert s.frames == 2


# --------------------------------------------------------------------------------------------------
# Live loop


def test_live_frames_from_any_iterator(source, center):
    r = Reenactor(model=tiny_model())
    r.set_source(source)

    def camera():  # an endless generator, bounded by max_frames
        i = 0
        while True:
            yield synthetic_frames(1, 48, 64, seed=i)[0]
            i += 1
    outs = list(live_frames(r, camera(), cropper=center, max_frames=4))
    assert len(outs) == 4 and all(o.shape == (64, 64, 3) and o.dtype == np.uint8 for o in outs)
    pasted = next(live_frames(r, camera(), cropper=center, paste_back=True))
    assert pasted.shape == (48, 64, 3)


def test_live_writes_and_sinks(tmp_path, source, center):
    r = Reenactor(model=tiny_model())
    got = []
    out = tmp_path / "live.mp4"
    s = live(r, source=source, frames=list(synthetic_frames(5, 48, 64)), out=out, sink=got.append,
             max_frames=3, cropper=center, fps=10)
    assert s.frames == 3 and len(got) == 3
    info = probe(out)
    assert info.frame_count == 3 and info.fps == 10
    with pytest.raises(ValueError, match="exactly one"):
        live(r, frames=[], camera=0, sink=got.append)


# --------------------------------------------------------------------------------------------------
# GPU


def _gpu_pair(config="ostnet-vox-256"):
    torch.manual_seed(0)
    model = OSTNet(config).cuda().eval()
    with torch.no_grad():
        model.scale_transform.F_fc.weight.normal_(0, 0.05)
    return model


@pytest.fixture
def no_tf32(monkeypatch):
    # Graph and eager runs may pick different conv algorithms (padded batches): with TF32 they would
    # differ by ~1e-3 for that reason alone. Plain fp32 isolates what the graph machinery does.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.gpu
def test_gpu_cuda_graphs_equal_eager_fused(no_tf32):
    model = _gpu_pair()
    graphed = Reenactor(model=model, backend="fused", device="cuda", cuda_graphs=True)
    eager = Reenactor(model=model, backend="fused", device="cuda", cuda_graphs=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    src = torch.rand(1, 3, 256, 256, device="cuda", generator=g)
    graphed.set_source(src)
    eager.set_source(src)
    for n in (4, 4, 3, 6, 2):  # capture, replay, padded partial batch, re-capture larger, padded again
        x = torch.rand(n, 3, 256, 256, device="cuda", generator=g)
        torch.testing.assert_close(graphed(x), eager(x), atol=1e-5, rtol=0)
    assert graphed.backend.captures == 2
    # A new source is copied into the captured tensors: no re-capture, still equal.
    src2 = torch.rand(1, 3, 256, 256, device="cuda", generator=g)
    graphed.set_source(src2)
    eager.set_source(src2)
    x = torch.rand(2, 3, 256, 256, device="cuda", generator=g)
    torch.testing.assert_close(graphed(x), eager(x), atol=1e-5, rtol=0)
    assert graphed.backend.captures == 2


@pytest.mark.gpu
def test_gpu_compiled_cuda_graphs_equal_eager_fused(no_tf32):
    model = _gpu_pair()
    compiled = Reenactor(model=model, backend="fused", device="cuda", compile=True)
    eager = Reenactor(model=model, backend="fused", device="cuda", cuda_graphs=False)
    g = torch.Generator(device="cuda").manual_seed(5)
    src = torch.rand(1, 3, 256, 256, device="cuda", generator=g)
    for r in (compiled, eager):
        r.set_source(src)
    for n in (2, 2, 1):
        x = torch.rand(n, 3, 256, 256, device="cuda", generator=g)
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-4, rtol=0)
    assert compiled.backend.captures == 1


@pytest.mark.gpu
def test_gpu_cuda_graphs_relative_mode(no_tf32):
    model = _gpu_pair()
    graphed = Reenactor(model=model, backend="fused", device="cuda", relative=True)
    eager = Reenactor(model=model, backend="fused", device="cuda", relative=True, cuda_graphs=False)
    g = torch.Generator(device="cuda").manual_seed(1)
    src = torch.rand(1, 3, 256, 256, device="cuda", generator=g)
    for r in (graphed, eager):
        r.set_source(src)
    for n in (2, 2, 1):  # the first call is eager (fixes kp_D0), then graphs
        x = torch.rand(n, 3, 256, 256, device="cuda", generator=g)
        torch.testing.assert_close(graphed(x), eager(x), atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_gpu_fused_matches_torch_fp32(batch):
    model = _gpu_pair()
    fused = Reenactor(model=model, backend="fused", device="cuda")
    ref = Reenactor(model=model, backend="torch", device="cuda")
    g = torch.Generator(device="cuda").manual_seed(2)
    src = torch.rand(1, 3, 256, 256, device="cuda", generator=g)
    fused.set_source(src)
    ref.set_source(src)
    x = torch.rand(batch, 3, 256, 256, device="cuda", generator=g)
    assert (fused(x) - ref(x)).abs().max().item() <= 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [True, False])
def test_gpu_fused_fp16_keeps_fp16_conv_weights(channels_last):
    # The fused fp16 backend stores its convolutions in fp16 (no per-frame weight casts), on its own copy;
    # its frames stay within the fp16 bound of the torch backend's (autocast, fp32 weights).
    model = _gpu_pair()
    fused = Reenactor(model=model, backend="fused", device="cuda", fp16=True, channels_last=channels_last)
    ref = Reenactor(model=model, backend="torch", device="cuda", fp16=True)
    conv_dtypes = lambda m: {p.dtype for c in m.modules() if isinstance(c, torch.nn.Conv2d) for p in c.parameters()}
    assert conv_dtypes(fused.backend.model) == {torch.float16}
    assert conv_dtypes(model) == conv_dtypes(ref.backend.model) == {torch.float32}
    g = torch.Generator(device="cuda").manual_seed(3)
    src = torch.rand(1, 3, 256, 256, device="cuda", generator=g)
    fused.set_source(src)
    ref.set_source(src)
    x = torch.rand(2, 3, 256, 256, device="cuda", generator=g)
    assert (fused(x).float() - ref(x).float()).abs().max().item() <= 2e-2


@pytest.mark.gpu
def test_gpu_pipeline_fp16_fused(tmp_path):
    # A made video (PyAV only: the GPU machine need not have the bundled data's packages), with sound.
    driving = make_video(tmp_path / "d.mp4", n=20, size=(144, 176), audio="aac")
    r = Reenactor(config=TINY, backend="fused", device="cuda", fp16=True)
    s = reenact_video(r, driving, tmp_path / "o.mp4", source=synthetic_frames(1, 128, 96)[0], batch_size=8,
                      max_frames=20, cropper=FaceCropper("center"), progress=False)
    assert s.frames == 20 and probe(tmp_path / "o.mp4").frame_count == 20


def test_engine_weights_warning_follows_the_exported_graphs(tmp_path, capsys):
    # With --engine, the weights are the graphs': no RANDOM warning for graphs exported from a
    # checkpoint, a warning naming the files for graphs exported from random weights.
    from ostnet_fast import save_checkpoint
    from ostnet_fast.config import load_config
    from ostnet_fast.export.onnx_export import export_graphs, load_model
    cfg = load_config(TINY)
    ckpt = save_checkpoint(tmp_path / "w.safetensors", tiny_model(), cfg)
    for name, checkpoint in (("real", ckpt), ("random", None)):
        model, config, src = load_model(checkpoint, TINY)
        export_graphs(model, config, tmp_path / name, source=src)
        capsys.readouterr()
        r = Reenactor(config=TINY, backend="onnxruntime", engine=tmp_path / name)
        err = capsys.readouterr().err
        assert r.random_weights == (checkpoint is None)
        assert ("RANDOM" in err) == (checkpoint is None), err
    # The graphs' size rules, not the default config's model (a multiple of 128) built beside them.
    assert Reenactor(backend="onnxruntime", engine=tmp_path / "real", size=64).size == 64
    # A checkpoint given with the graphs must be the one they were exported from: it is not used otherwise.
    Reenactor(checkpoint=ckpt, backend="onnxruntime", engine=tmp_path / "real")
    other = save_checkpoint(tmp_path / "other.safetensors", tiny_model(seed=1), cfg)
    for checkpoint, graphs in ((other, "real"), (ckpt, "random")):
        with pytest.raises(BackendUnavailable, match="were not exported from"):
            Reenactor(checkpoint=checkpoint, backend="onnxruntime", engine=tmp_path / graphs)
