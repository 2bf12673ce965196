"""OSTNet reference model: shapes, ranges, gradients, caching, and the identity start of its OSTNet parts."""
import re
from pathlib import Path

import pytest
import torch

from ostnet_fast import OSTNet, load_config
from ostnet_fast.config import size_multiple
from ostnet_fast.model.scale_transform import fiducial_layout

TINY = "tests/configs/tiny.yaml"


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return OSTNet(TINY, **kw)


def images(b, size=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g), torch.rand(b, 3, size, size, generator=g)


def test_forward_shapes_and_ranges():
    model = make_model().eval()
    src, drv = images(2)
    with torch.no_grad():
        out = model(src, drv)
    k, t, zd = 5, 20, 8
    assert out["prediction"].shape == (2, 3, 64, 64)
    assert out["rectified"].shape == (2, 3, 64, 64)
    assert out["kp_source"]["value"].shape == (2, k, 2)
    assert out["kp_source"]["jacobian"].shape == (2, k, 2, 2)
    assert out["z"].shape == (2, zd) and out["fiducials"].shape == (2, t, 2)
    assert out["occlusion_map"].shape == (2, 1, 16, 16)
    p = out["prediction"]
    assert torch.isfinite(p).all() and p.min() >= 0 and p.max() <= 1
    assert out["kp_driving"]["value"].abs().max() <= 1  # expected coordinates stay inside the frame


def test_every_parameter_gets_a_gradient():
    model = make_model().train()
    src, drv = images(2)
    out = model(src, drv)
    (out["prediction"].mean() + out["rectified"].mean() + out["kp_source"]["value"].sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    nonzero = [n for n, p in model.named_parameters() if p.grad.abs().sum() > 0]
    assert len(nonzero) > 0.8 * len(list(model.parameters()))


def test_identity_start_rectified_equals_driving():
    # F_fc starts at zero: the fiducials are the fixed targets, the TPS is the identity, I_Dh = I_D.
    model = make_model().eval()
    src, drv = images(2)
    with torch.no_grad():
        out = model(src, drv)
    torch.testing.assert_close(out["fiducials"], model.scale_transform.target_points.expand(2, -1, -1))
    # fp32 TPS arithmetic: sample positions are off by ~1e-6 of the frame, so values by ~1e-5.
    torch.testing.assert_close(out["rectified"], drv, atol=1e-4, rtol=0)


def test_zero_W_makes_generator_independent_of_z():
    model = make_model().eval()
    model.reset_scale_embedding()
    src, drv = images(1)
    with torch.no_grad():
        state = model.encode_source(src)
        motion = model.generator.dense_motion_network(state.small, model.kp_detector(drv), state.kp)
        a = model.generator(state.f1, motion, torch.randn(1, 8))["prediction"]
        b = model.generator(state.f1, motion, 100 * torch.randn(1, 8))["prediction"]
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_nonzero_W_makes_generator_depend_on_z():
    model = make_model().eval()  # default init: W random
    src, drv = images(1)
    with torch.no_grad():
        state = model.encode_source(src)
        motion = model.generator.dense_motion_network(state.small, model.kp_detector(drv), state.kp)
        a = model.generator(state.f1, motion, torch.zeros(1, 8))["prediction"]
        b = model.generator(state.f1, motion, torch.ones(1, 8))["prediction"]
    assert (a - b).abs().max() > 1e-4


def test_cached_source_equals_full_forward_and_broadcasts():
    model = make_model().eval()
    src, _ = images(1)
    _, drv = images(3, seed=5)
    with torch.no_grad():
        state = model.encode_source(src)
        batched = model.animate(state, drv)["prediction"]
        single = torch.cat([model(src, drv[i:i + 1])["prediction"] for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_channels_last_source_runs_the_dense_motion_hourglass_channels_last():
    """The dense-motion front writes NCHW; with a channels-last source the hourglass input is made
    channels-last, so its output (the 7x7 heads' input) is too, and the frame is unchanged."""
    model = make_model().eval()
    cl_model = make_model().eval().to(memory_format=torch.channels_last)
    seen = []
    cl_model.generator.dense_motion_network.hourglass.register_forward_hook(
        lambda m, i, o: seen.append((i[0].is_contiguous(memory_format=torch.channels_last),
                                     o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous())))
    src, drv = images(2)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model.animate(model.encode_source(src[:1]), drv)["prediction"]
        got = cl_model.animate(cl_model.encode_source(cl(src[:1])), cl(drv))["prediction"]
    assert seen == [(True, True)]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_conv_weights_cast_to_the_autocast_dtype_give_the_same_frame():
    """cast_conv_weights(d) only removes autocast's per-call weight casts: under autocast(d) the frame is
    the same, bit for bit (CPU autocast is bfloat16; the fused backend does this in fp16 on CUDA)."""
    model = make_model().eval()
    cast = make_model().eval().cast_conv_weights(torch.bfloat16)
    convs = [m for m in cast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(p.dtype == torch.bfloat16 for m in convs for p in m.parameters())
    assert cast.scale_transform.F_fc.weight.dtype == torch.float32  # linears and norms keep fp32
    src, drv = images(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model.animate(model.encode_source(src[:1]), drv)["prediction"]
        got = cast.animate(cast.encode_source(src[:1]), drv)["prediction"]
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_relative_kp_transform_is_applied():
    model = make_model().eval()
    src, drv = images(1)
    seen = {}

    def shift(kp):
        seen["called"] = True
        return {**kp, "value": kp["value"] + 0.1}

    with torch.no_grad():
        state = model.encode_source(src)
        a = model.animate(state, drv)["prediction"]
        b = model.animate(state, drv, kp_transform=shift)["prediction"]
    assert seen["called"] and (a - b).abs().max() > 1e-5


@pytest.mark.parametrize("bad", [(1, 1, 64, 64), (3, 64, 64), (1, 3, 8, 8)])
def test_bad_image_shapes_raise_with_the_shape(bad):
    model = make_model().eval()
    with pytest.raises(ValueError, match=str(tuple(bad)).replace("(", r"\(").replace(")", r"\)")):
        model.encode_source(torch.rand(*bad))


def test_fiducial_layout():
    p = fiducial_layout(20)
    assert p.shape == (20, 2)
    assert p.min() == -1 and p.max() == 1
    assert len(set(p[:, 0].tolist())) == 5 and len(set(p[:, 1].tolist())) == 4
    with pytest.raises(ValueError, match="7"):
        fiducial_layout(7)


def test_shipped_configs_build_and_match_the_paper():
    cfg = load_config("ostnet-vox-256").model
    assert (cfg.num_kp, cfg.scale_transform.num_fiducials, cfg.generator.num_down_blocks + 1) == (15, 20, 4)
    assert cfg.kp_detector.temperature == 0.1 and cfg.generator.final_kernel_size == 1
    fomm = load_config("fomm-vox-256").model
    assert (fomm.num_kp, fomm.generator.num_down_blocks, fomm.generator.num_bottleneck_blocks) == (10, 2, 6)


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown config"):
        load_config("no-such-config")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_kpp: 3\n")
    with pytest.raises(ValueError, match="num_kpp"):
        load_config(bad)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    tiny = Path("tests/configs/tiny.yaml").read_text()
    for change, message in ((("image_size: 64", "image_size: 100"), "image_size 100 is not a multiple of 32"),
                            (("num_kp: 5", "num_kp: -3"), "num_kp must be a positive integer"),
                            (("scale_factor: 0.25", "scale_factor: 2"), "scale_factor must be in (0, 1]")):
        bad.write_text(tiny.replace(*change, 1))
        with pytest.raises(ValueError, match=re.escape(message)):
            load_config(bad)


def test_the_size_multiple_follows_the_architecture():
    assert size_multiple(load_config("ostnet-vox-256").model) == 128  # 5 halvings at a quarter of the image
    assert size_multiple(load_config("tests/configs/tiny.yaml").model) == 32  # 3 halvings at a quarter
    model = make_model()
    with pytest.raises(ValueError, match="multiples of 32"):
        model.encode_source(torch.rand(1, 3, 64, 50))


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
def test_whole_model_every_kernel_forced_matches_reference(monkeypatch):
    # Every fused op forced (Triton interpreter on CPU) through the whole model, in float64: the
    # integration of the kernels (layouts, dtypes, which tensors each gets) against the reference,
    # forward at inference and one training step's gradients.
    from ostnet_fast.kernels._dispatch import interpreting, triton_available
    if not (triton_available() and interpreting()):
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    monkeypatch.setattr(OSTNet, "impl", property(lambda self: "triton" if self.fused else "reference"))
    ref = make_model().double()
    fused = make_model(fused=True).double()
    fused.load_state_dict(ref.state_dict())
    src, drv = (t.double() for t in images(2))
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(src, drv)["prediction"], ref.eval()(src, drv)["prediction"],
                                   rtol=1e-10, atol=1e-10)
    grads = []
    for model in (ref.train(), fused.train()):
        model.zero_grad()
        out = model(src, drv)
        (out["prediction"].square().mean() + out["rectified"].mean()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
def test_whole_fused_model_compiles_with_every_kernel_as_a_custom_op(monkeypatch):
    # torch.compile(fullgraph=True) of the fused model with every kernel forced: each one enters the
    # graph as its torch.ops.ostnet.* op (no graph break), and the compiled model trains as the eager one.
    from ostnet_fast.kernels._dispatch import interpreting, triton_available
    if not (triton_available() and interpreting()):
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    monkeypatch.setattr(OSTNet, "impl", property(lambda self: "triton" if self.fused else "reference"))
    eager = make_model(fused=True).double().train()
    compiled = make_model(fused=True).double().train()
    compiled.load_state_dict(eager.state_dict())
    src, drv = (t.double() for t in images(1))  # one sample: the interpreter's time is per pixel
    torch._dynamo.reset()
    step = torch.compile(lambda s, d: compiled(s, d), backend="aot_eager", fullgraph=True)
    results = []
    for model, fn in ((eager, eager), (compiled, step)):
        out = fn(src, drv)
        (out["prediction"].square().mean() + out["rectified"].mean()).backward()
        results.append((out["prediction"].detach(), {n: p.grad for n, p in model.named_parameters()
                                                     if p.grad is not None}))
    torch._dynamo.reset()
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-10, atol=1e-10)
    assert results[0][1].keys() == results[1][1].keys() and len(results[0][1]) > 0
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=1e-8, atol=1e-10, msg=name)
