"""dense_motion_front / dense_motion_combine: the fused kernels and their backward vs the reference.

CPU runs need TRITON_INTERPRET=1 before the package is imported; without it (and without CUDA) the
Triton-path tests are skipped. Exactness is checked in float64 (tolerance 1e-10, the kernels compute in
float64 for float64 inputs) and gradcheck runs in float64. One shared upstream gradient per test covers
both outputs and every input grad.
"""
import importlib

import pytest
import torch

from tests.conftest import requires_triton_run

# The package re-exports the functions under the module's name: fetch the module itself.
dm = importlib.import_module("ostnet_fast.kernels.dense_motion")

triton_run = requires_triton_run()
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 7.8e-3}

FRONT_SHAPES = [  # (B, K, C, h, w)
    (2, 3, 3, 7, 9),  # odd sizes, RGB
    (2, 3, 1, 5, 11),  # one channel
    (1, 2, 5, 1, 6),  # single row: y = -1 everywhere (max(h - 1, 1) normalisation)
    (2, 1, 2, 13, 10),  # several pixel tiles per motion
]

COMBINE_SHAPES = [  # (B, K+1, h, w, C_f, H_f, W_f)
    (2, 4, 7, 9, 5, 7, 9),  # same size: the fully fused path
    (2, 4, 7, 9, 5, 4, 5),  # feature smaller (bottleneck below the dense-motion size): resize path
    (2, 4, 5, 11, 3, 11, 13),  # feature larger, odd sizes
    (1, 16, 6, 5, 11, 6, 5),  # K+1 = 16 as in OSTNet, C_f not a multiple of the channel chunk
]


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernels must overwrite starts as NaN."""
    monkeypatch.setattr(dm, "POISON_OUTPUTS", True)


def _assert_close(got, want, tol, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    nan = got.isnan() | got.isinf()
    assert not nan.any(), f"{what}: {int(nan.sum())} NaN/inf, first at {nan.nonzero()[0].tolist()}"
    bad = ~torch.isclose(got, want.to(got.dtype), atol=tol, rtol=tol)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} mismatch, first at {bad.nonzero()[:4].tolist()}, "
                           f"max abs err {(got - want).abs().max().item():.3g}")


def _front_inputs(b, k, c, h, w, dtype, with_jac, seed=0, device=DEV):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    source = 0.6 + 0.4 * torch.randn(b, c, h, w, **f64)  # off-centre values
    kp_s = -0.9 + 1.8 * torch.rand(b, k, 2, **f64)
    kp_d = -0.9 + 1.8 * torch.rand(b, k, 2, **f64)
    jac = torch.eye(2, dtype=torch.float64) + 0.4 * torch.randn(b, k, 2, 2, **f64) if with_jac else None
    out = [t.to(device=device, dtype=dtype).requires_grad_(True) if t is not None else None
           for t in (source, kp_s, kp_d, jac)]
    return out


def _grads(outputs, inputs, upstream):
    leaves = [t for t in inputs if t is not None]
    return torch.autograd.grad(outputs, leaves, upstream, allow_unused=True)


# ---------------------------------------------------------------------------------------------------
# front
# ---------------------------------------------------------------------------------------------------

@triton_run
@pytest.mark.parametrize("shape", FRONT_SHAPES)
@pytest.mark.parametrize("with_jac", [True, False])
def test_front_matches_reference_float64(shape, with_jac, poisoned):
    torch.manual_seed(0)
    b, k, c, h, w = shape
    inputs = _front_inputs(b, k, c, h, w, torch.float64, with_jac)
    var = 0.05  # wider than FOMM's 0.01 so that the Gaussians span several pixels at these sizes
    hg, mot = dm.dense_motion_front(*inputs, var, impl="triton")
    hg_r, mot_r = dm.dense_motion_front_reference(*inputs, var)
    assert hg.dtype == inputs[0].dtype and mot.dtype == inputs[2].dtype
    _assert_close(hg, hg_r, 1e-10, "hourglass input")
    _assert_close(mot, mot_r, 1e-10, "motions")
    gen = torch.Generator().manual_seed(1)
    up = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (hg_r, mot_r)]
    got = _grads((hg, mot), inputs, up)
    want = _grads((hg_r, mot_r), inputs, up)
    for name, g, r in zip(["source", "kp_source", "kp_driving", "jacobian"], got, want):
        _assert_close(g, r, 1e-10, f"grad {name}")


@triton_run
@pytest.mark.parametrize("which", ["hourglass", "motions"])
def test_front_one_output_used(which):
    # backward with one of the two upstream grads absent (None, not materialised)
    torch.manual_seed(0)
    inputs = _front_inputs(2, 3, 3, 6, 7, torch.float64, True)
    hg, mot = dm.dense_motion_front(*inputs, 0.05, impl="triton")
    hg_r, mot_r = dm.dense_motion_front_reference(*inputs, 0.05)
    out, ref = (hg, hg_r) if which == "hourglass" else (mot, mot_r)
    up = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for name, g, r in zip(["source", "kp_source", "kp_driving", "jacobian"], _grads(out, inputs, up),
                          _grads(ref, inputs, up)):
        if r is None:
            assert g is None or not g.any(), f"grad {name} should be zero"
        else:
            _assert_close(g, r, 1e-10, f"grad {name}")


@triton_run
def test_front_channels_last_source():
    torch.manual_seed(0)
    source, kp_s, kp_d, jac = _front_inputs(2, 3, 4, 5, 6, torch.float64, True)
    source_cl = source.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    hg, _ = dm.dense_motion_front(source_cl, kp_s, kp_d, jac, 0.05, impl="triton")
    hg_r, _ = dm.dense_motion_front_reference(source, kp_s, kp_d, jac, 0.05)
    _assert_close(hg, hg_r, 1e-10, "hourglass input")
    up = torch.randn(hg.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (g,) = torch.autograd.grad(hg, source_cl, up)
    (r,) = torch.autograd.grad(hg_r, source, up)
    _assert_close(g, r, 1e-10, "grad source")


@triton_run
@pytest.mark.parametrize("with_jac", [True, False])
def test_front_gradcheck_float64(with_jac):
    torch.manual_seed(0)
    inputs = [t for t in _front_inputs(1, 2, 2, 4, 5, torch.float64, with_jac) if t is not None]

    def fn(*args):
        source, kp_s, kp_d = args[:3]
        jac = args[3] if with_jac else None
        return dm.dense_motion_front(source, kp_s, kp_d, jac, 0.1, impl="triton")

    assert torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=True)


@triton_run
def test_front_float32():
    torch.manual_seed(0)
    inputs = _front_inputs(2, 3, 3, 9, 7, torch.float32, True)
    hg, mot = dm.dense_motion_front(*inputs, 0.05, impl="triton")
    hg_r, mot_r = dm.dense_motion_front_reference(*inputs, 0.05)
    _assert_close(hg, hg_r, TOL[torch.float32], "hourglass input")
    _assert_close(mot, mot_r, TOL[torch.float32], "motions")


# ---------------------------------------------------------------------------------------------------
# combine
# ---------------------------------------------------------------------------------------------------

def _combine_inputs(b, kp1, h, w, cf, hf, wf, dtype, with_occ, seed=0, channels_last=False, device=DEV):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    logits = -1.5 + 2.0 * torch.randn(b, kp1, h, w, **f64)
    motions = -1.25 + 2.5 * torch.rand(b, kp1, h, w, 2, **f64)  # some of the warp falls outside
    feature = 0.8 + 0.5 * torch.randn(b, cf, hf, wf, **f64)
    occ = torch.rand(b, 1, h, w, **f64) if with_occ else None
    out = [t.to(device=device, dtype=dtype) if t is not None else None for t in (logits, motions, feature, occ)]
    if channels_last:
        out[2] = out[2].to(memory_format=torch.channels_last)
    return [t.requires_grad_(True) if t is not None else None for t in out]


@triton_run
@pytest.mark.parametrize("shape", COMBINE_SHAPES)
@pytest.mark.parametrize("with_occ", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_combine_matches_reference_float64(shape, with_occ, channels_last, poisoned):
    torch.manual_seed(0)
    inputs = _combine_inputs(*shape, torch.float64, with_occ, channels_last=channels_last)
    deformation, warped = dm.dense_motion_combine(*inputs, impl="triton")
    def_r, warped_r = dm.dense_motion_combine_reference(*inputs)
    assert warped.dtype == inputs[2].dtype
    if channels_last and shape[4] > 1:
        assert warped.is_contiguous(memory_format=torch.channels_last), "warped must keep channels-last"
    _assert_close(deformation, def_r, 1e-10, "deformation")
    _assert_close(warped, warped_r, 1e-10, "warped")
    gen = torch.Generator().manual_seed(1)
    up = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (def_r, warped_r)]
    got = _grads((deformation, warped), inputs, up)
    want = _grads((def_r, warped_r), inputs, up)
    for name, g, r in zip(["mask_logits", "motions", "feature", "occlusion"], got, want):
        _assert_close(g, r, 1e-10, f"grad {name}")


@triton_run
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("resize", [False, True])
def test_combine_reads_logits_sliced_from_stacked_heads(channels_last, resize):
    """The mask logits as the model's stacked heads give them: channels 0..K of a (B, K+2, h, w) conv output
    (NCHW or channels-last), read in place through their strides, forward and gradients."""
    inputs = _combine_inputs(2, 4, 5, 7, 3, *((4, 6) if resize else (5, 7)), torch.float64, True, seed=3)
    heads = torch.cat([inputs[0].detach(), torch.randn(2, 1, 5, 7, dtype=torch.float64)], dim=1)
    if channels_last:
        heads = heads.contiguous(memory_format=torch.channels_last)
    heads.requires_grad_(True)
    logits = heads[:, :4]
    assert dm._flat_plane(logits) is logits  # no copy
    outs = dm.dense_motion_combine(logits, *inputs[1:], impl="triton")
    refs = dm.dense_motion_combine_reference(logits, *inputs[1:])
    for o, r, name in zip(outs, refs, ("deformation", "warped")):
        _assert_close(o, r, 1e-10, name)
    up = [torch.randn(r.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) for r in refs]
    got = _grads(outs, [heads, *inputs[1:]], up)
    want = _grads(refs, [heads, *inputs[1:]], up)
    for name, g, r in zip(["heads", "motions", "feature", "occlusion"], got, want):
        _assert_close(g, r, 1e-10, f"grad {name}")


@triton_run
@pytest.mark.parametrize("shape", COMBINE_SHAPES[:2])
@pytest.mark.parametrize("which", ["deformation", "warped"])
def test_combine_one_output_used(shape, which):
    torch.manual_seed(0)
    inputs = _combine_inputs(*shape, torch.float64, True)
    outs = dm.dense_motion_combine(*inputs, impl="triton")
    refs = dm.dense_motion_combine_reference(*inputs)
    i = 0 if which == "deformation" else 1
    up = torch.randn(refs[i].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = _grads(outs[i], inputs, up)
    want = _grads(refs[i], inputs, up)
    for name, g, r in zip(["mask_logits", "motions", "feature", "occlusion"], got, want):
        if r is None:
            assert g is None or not g.any(), f"grad {name} should be zero"
        else:
            _assert_close(g, r, 1e-10, f"grad {name}")


@triton_run
@pytest.mark.parametrize("shape", [(1, 3, 4, 5, 2, 4, 5),  # same size
                                   (1, 3, 4, 5, 2, 3, 3)])  # resize path
def test_combine_gradcheck_float64(shape):
    torch.manual_seed(0)
    inputs = _combine_inputs(*shape, torch.float64, True)
    assert torch.autograd.gradcheck(lambda *a: dm.dense_motion_combine(*a, impl="triton"), tuple(inputs),
                                    fast_mode=True)


@triton_run
def test_combine_float32():
    torch.manual_seed(0)
    inputs = _combine_inputs(2, 4, 7, 9, 6, 7, 9, torch.float32, True)
    deformation, warped = dm.dense_motion_combine(*inputs, impl="triton")
    def_r, warped_r = dm.dense_motion_combine_reference(*inputs)
    _assert_close(deformation, def_r, TOL[torch.float32], "deformation")
    _assert_close(warped, warped_r, TOL[torch.float32], "warped")


# ---------------------------------------------------------------------------------------------------
# dispatch and argument checks
# ---------------------------------------------------------------------------------------------------

def test_auto_on_cpu_takes_the_reference(monkeypatch):
    torch.manual_seed(0)

    def boom(*args, **kwargs):
        raise AssertionError("the Triton path must not run for CPU tensors under impl='auto'")

    monkeypatch.setattr(dm.DenseMotionFrontFn, "apply", boom)
    monkeypatch.setattr(dm.DenseMotionCombineFn, "apply", boom)
    monkeypatch.setattr(dm.DeformationFn, "apply", boom)
    source, kp_s, kp_d, jac = _front_inputs(2, 3, 3, 6, 7, torch.float32, True, device="cpu")
    hg, mot = dm.dense_motion_front(source, kp_s, kp_d, jac, 0.01, impl="auto")
    assert hg.shape == (2, 16, 6, 7) and mot.shape == (2, 4, 6, 7, 2)
    inputs = _combine_inputs(2, 4, 6, 7, 5, 3, 4, torch.float32, True, device="cpu")
    deformation, warped = dm.dense_motion_combine(*inputs, impl="auto")
    assert deformation.shape == (2, 6, 7, 2) and warped.shape == (2, 5, 3, 4)


def test_bad_shapes_raise():
    source = torch.randn(2, 3, 5, 6)
    kp = torch.rand(2, 4, 2)
    with pytest.raises(ValueError, match=r"kp_source must match"):
        dm.dense_motion_front(source, kp[:, :3], kp, None, 0.01)
    with pytest.raises(ValueError, match=r"jacobian must be \(B, K, 2, 2\)"):
        dm.dense_motion_front(source, kp, kp, torch.randn(2, 4, 2), 0.01)
    logits = torch.randn(2, 5, 6, 7)
    with pytest.raises(ValueError, match=r"motions must be \(B, K\+1, h, w, 2\)"):
        dm.dense_motion_combine(logits, torch.randn(2, 4, 6, 7, 2), torch.randn(2, 8, 6, 7), None)
    with pytest.raises(ValueError, match=r"occlusion must be \(B, 1, h, w\)"):
        dm.dense_motion_combine(logits, torch.randn(2, 5, 6, 7, 2), torch.randn(2, 8, 6, 7),
                                torch.rand(2, 1, 3, 3))


# ---------------------------------------------------------------------------------------------------
# GPU: production shapes, low precision
# ---------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("with_jac", [True, False])
def test_gpu_front_production(with_jac):
    # K = 15, source downscaled to 64x64 RGB, FOMM's kp_variance
    inputs = _front_inputs(8, 15, 3, 64, 64, torch.float32, with_jac)
    hg, mot = dm.dense_motion_front(*inputs, 0.01, impl="triton")
    hg_r, mot_r = dm.dense_motion_front_reference(*inputs, 0.01)
    _assert_close(hg, hg_r, 1e-4, "hourglass input")
    _assert_close(mot, mot_r, 1e-5, "motions")
    up = [torch.randn_like(t) for t in (hg_r, mot_r)]
    for name, g, r in zip(["source", "kp_source", "kp_driving", "jacobian"], _grads((hg, mot), inputs, up),
                          _grads((hg_r, mot_r), inputs, up)):
        # keypoint grads are sums over 64x64 pixels: compare relative to their scale
        _assert_close(g, r, 2e-3 * max(1.0, r.abs().max().item()), f"grad {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("feat", [(256, 64, 64), (512, 32, 32)])  # same size; bottleneck at 32x32 (resize)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_combine_production(feat, channels_last):
    inputs = _combine_inputs(8, 16, 64, 64, *feat, torch.float32, True, channels_last=channels_last)
    deformation, warped = dm.dense_motion_combine(*inputs, impl="triton")
    def_r, warped_r = dm.dense_motion_combine_reference(*inputs)
    _assert_close(deformation, def_r, 1e-5, "deformation")
    _assert_close(warped, warped_r, 1e-4, "warped")
    up = [torch.randn_like(t) for t in (def_r, warped_r)]
    for name, g, r in zip(["mask_logits", "motions", "feature", "occlusion"],
                          _grads((deformation, warped), inputs, up), _grads((def_r, warped_r), inputs, up)):
        _assert_close(g, r, 1e-3 * max(1.0, r.abs().max().item()), f"grad {name}")


def _low_precision_grads_within(fn, inputs32, dtype, names, *args):
    """fn's grads in `dtype` against fp32 ones: at most twice PyTorch's own low-precision error (the
    reference run in `dtype`) plus atol, relative to each grad's scale (some are sums over pixels)."""
    leaves32 = [t.detach().requires_grad_(True) if t is not None else None for t in inputs32]
    leaves_lp = [t.detach().to(dtype).requires_grad_(True) if t is not None else None for t in inputs32]
    outs32 = fn(*leaves32, *args, impl="reference")
    gen = torch.Generator().manual_seed(7)
    up = [torch.randn(o.shape, generator=gen).to(o.device) for o in outs32]
    ref = _grads(outs32, leaves32, up)
    ours = _grads(fn(*leaves_lp, *args, impl="triton"), leaves_lp, [u.to(dtype) for u in up])
    torch_lp = _grads(fn(*leaves_lp, *args, impl="reference"), leaves_lp, [u.to(dtype) for u in up])
    for name, o, t, r in zip(names, ours, torch_lp, ref):
        assert o.dtype == dtype, name
        err_ours = (o.float() - r).abs().max().item()
        err_torch = (t.float() - r).abs().max().item()
        scale = max(1.0, r.abs().max().item())
        assert err_ours <= 2 * err_torch + TOL[dtype] * scale, f"grad {name}: ours {err_ours:.3g} vs PyTorch {err_torch:.3g}"


@triton_run
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_grads(dtype):
    front = _front_inputs(2, 3, 3, 9, 7, torch.float32, True)
    _low_precision_grads_within(dm.dense_motion_front, front, dtype, ["source", "kp_source", "kp_driving",
                                                                        "jacobian"], 0.05)
    combine = _combine_inputs(2, 4, 7, 9, 5, 4, 5, torch.float32, True)
    _low_precision_grads_within(dm.dense_motion_combine, combine, dtype, ["mask_logits", "motions", "feature",
                                                                            "occlusion"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("feat", [(256, 64, 64), (512, 32, 32)])
def test_gpu_low_precision(dtype, feat):
    # Our error against an fp32 reference is at most twice PyTorch's own low-precision error plus atol.
    inputs32 = [t.detach() if t is not None else None
                for t in _combine_inputs(8, 16, 64, 64, *feat, torch.float32, True)]
    inputs_lp = [t.to(dtype) for t in inputs32]
    ref = dm.dense_motion_combine_reference(*inputs32)
    ours = dm.dense_motion_combine(*inputs_lp, impl="triton")
    torch_lp = dm.dense_motion_combine_reference(*inputs_lp)
    for name, o, t, r in zip(["deformation", "warped"], ours, torch_lp, ref):
        assert o.dtype == dtype
        err_ours = (o.float() - r).abs().max().item()
        err_torch = (t.float() - r).abs().max().item()
        assert err_ours <= 2 * err_torch + TOL[dtype], f"{name}: ours {err_ours:.3g} vs PyTorch {err_torch:.3g}"
    src32 = [t.detach() if t is not None else None for t in _front_inputs(8, 15, 3, 64, 64, torch.float32, True)]
    src_lp = [t.to(dtype) for t in src32]
    ref = dm.dense_motion_front_reference(*src32, 0.01)
    ours = dm.dense_motion_front(*src_lp, 0.01, impl="triton")
    torch_lp = dm.dense_motion_front_reference(*src_lp, 0.01)
    for name, o, t, r in zip(["hourglass input", "motions"], ours, torch_lp, ref):
        err_ours = (o.float() - r).abs().max().item()
        err_torch = (t.float() - r).abs().max().item()
        assert err_ours <= 2 * err_torch + TOL[dtype], f"{name}: ours {err_ours:.3g} vs PyTorch {err_torch:.3g}"
