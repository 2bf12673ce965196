"""keypoint_head: the fused softmax + expected-coordinates + Jacobian kernel against its reference.

CPU runs need TRITON_INTERPRET=1 (see test_grid_sample.py). Exactness in float64, gradcheck in float64,
fp16 logits against the fp64 reference with a stated tolerance.
"""
import importlib

import pytest
import torch

from ostnet_fast.kernels import _triton_utils as tu
from tests.conftest import requires_triton_run

kh = importlib.import_module("ostnet_fast.kernels.keypoint_head")
triton_run = requires_triton_run()
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

SHAPES = [  # (B, K, h, w)
    (1, 1, 1, 1),  # one pixel: heatmap 1, keypoint at (-1, -1)
    (2, 3, 7, 9),  # odd sizes, batch > 1
    (2, 5, 37, 53),  # 1961 pixels: two steps of a program's loop, the last one partial
    (1, 15, 58, 58),  # the model's real heatmap (ostnet-vox-256, K = 15)
]


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(tu, "POISON_OUTPUTS", True)


def _inputs(shape, dtype=torch.float64, jac=True, channels_last=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, k, h, w = shape
    logits = (3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(DEV, dtype)
    jmap = (torch.randn(b, k * 4, h, w, generator=gen, dtype=torch.float64)).to(DEV, dtype)
    if channels_last:  # as the conv heads return them in a channels-last model
        logits = logits.contiguous(memory_format=torch.channels_last)
        jmap = jmap.contiguous(memory_format=torch.channels_last)
    return logits, (jmap.view(b, k, 4, h, w) if jac else None)


@triton_run
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("jac", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_and_backward_match_reference_float64(shape, jac, channels_last, poisoned):
    logits, jmap = _inputs(shape, jac=jac, channels_last=channels_last)
    leaves = [t.detach().clone().requires_grad_(True) for t in (logits, jmap) if t is not None]
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    unpack = lambda ls: (ls[0], ls[1] if jac else None)
    value, jacobian = kh.keypoint_head(*unpack(leaves), 0.1, impl="triton")
    rvalue, rjacobian = kh.keypoint_head_reference(*unpack(ref_leaves), 0.1)
    torch.testing.assert_close(value, rvalue, rtol=1e-10, atol=1e-10)
    assert (jacobian is None) == (not jac)
    outs, routs = [value], [rvalue]
    if jac:
        torch.testing.assert_close(jacobian, rjacobian, rtol=1e-10, atol=1e-10)
        outs.append(jacobian)
        routs.append(rjacobian)
    gen = torch.Generator().manual_seed(1)
    ups = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(DEV) for o in outs]
    grads = torch.autograd.grad(outs, leaves, ups)
    rgrads = torch.autograd.grad(routs, ref_leaves, ups)
    for g, rg in zip(grads, rgrads):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-10)


@triton_run
def test_one_pixel_is_the_corner():
    value, jac = kh.keypoint_head(torch.randn(1, 2, 1, 1, dtype=torch.float64, device=DEV), None, 0.1, impl="triton")
    torch.testing.assert_close(value, torch.full((1, 2, 2), -1.0, dtype=torch.float64, device=DEV))


@triton_run
def test_gradcheck_float64():
    logits, jmap = _inputs((2, 2, 3, 4))
    logits.requires_grad_(True)
    jmap = jmap.detach().requires_grad_(True)
    fn = lambda lg, jm: kh.keypoint_head(lg, jm, 0.7, impl="triton")
    assert torch.autograd.gradcheck(fn, (logits, jmap), eps=1e-6, atol=1e-7)


@triton_run
def test_only_value_used_in_loss():
    # The Jacobian output unused: its gradient arrives as None and must count as zero.
    logits, jmap = _inputs((2, 3, 5, 6))
    lg = logits.clone().requires_grad_(True)
    value, _ = kh.keypoint_head(lg, jmap, 0.1, impl="triton")
    (g,) = torch.autograd.grad(value.sum(), lg)
    lr = logits.clone().requires_grad_(True)
    (rg,) = torch.autograd.grad(kh.keypoint_head_reference(lr, jmap, 0.1)[0].sum(), lr)
    torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-10)


@triton_run
def test_half_logits_within_tolerance():
    # fp16 logits from an autocast conv; maths in fp32. Tolerance: fp32 exp/sum over 3364 pixels.
    logits, jmap = _inputs((2, 15, 58, 58), dtype=torch.float16)
    value, jac = kh.keypoint_head(logits, jmap, 0.1, impl="triton")
    assert value.dtype == torch.float32 and jac.dtype == torch.float32
    rvalue, rjac = kh.keypoint_head_reference(logits.double(), jmap.double(), 0.1)
    torch.testing.assert_close(value.double(), rvalue, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(jac.double(), rjac, rtol=1e-5, atol=1e-5)


def test_single_jacobian_map_takes_the_reference():
    logits, jmap = _inputs((2, 3, 5, 6))
    single = jmap[:, :1].contiguous()
    value, jac = kh.keypoint_head(logits, single, 0.1, impl="auto")
    rvalue, rjac = kh.keypoint_head_reference(logits, single, 0.1)
    torch.testing.assert_close(jac, rjac)
    assert jac.shape == (2, 3, 2, 2)


@pytest.mark.parametrize("logits_shape, jmap_shape, match", [
    ((2, 3, 5), None, "logits must be"),
    ((2, 3, 5, 6), (2, 3, 4, 5, 7), "jacobian_map must be"),
    ((2, 3, 5, 6), (2, 2, 4, 5, 6), "jacobian_map must be"),
])
def test_bad_shapes_raise(logits_shape, jmap_shape, match):
    jm = torch.zeros(jmap_shape) if jmap_shape else None
    with pytest.raises(ValueError, match=match):
        kh.keypoint_head(torch.zeros(logits_shape), jm, 0.1)
