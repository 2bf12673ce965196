"""zconv_block: the fused epilogue (border bias E(zb), BN, ReLU, pool) and its backward vs the reference.

CPU runs need TRITON_INTERPRET=1 before the package is imported; without it (and without CUDA) the
Triton-path tests are skipped. The kernels accept float64, so exactness is checked in float64 (tolerance
1e-10) and gradcheck runs in float64. One shared upstream gradient per test covers the output, every input
grad (x, zb) and every parameter grad (conv weight/bias, BN weight/bias), plus the running statistics.
"""
import importlib

import pytest
import torch
from torch import nn

from ostnet_fast.kernels import _triton_utils as tu
from tests.conftest import requires_triton_run

# The package re-exports the function `zconv_block` under the module's name: fetch the module itself.
zc = importlib.import_module("ostnet_fast.kernels.zconv")

triton_run = requires_triton_run()
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 7.8e-3}

SHAPES = [  # (B, C_in, C_out, H, W)
    (2, 3, 5, 7, 9),  # odd H/W: the pool drops a row and a column; all 9 border classes
    (2, 4, 3, 5, 11),  # odd, W > H
    (2, 2, 3, 1, 6),  # single row: the row is first and last at once (degenerate class)
    (1, 3, 2, 2, 2),  # tiny even image, batch 1: no interior class
    (2, 2, 3, 5, 1),  # single column: first and last at once, its pixels between the rows on one border line
]


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernels must overwrite starts as NaN."""
    monkeypatch.setattr(zc, "POISON_OUTPUTS", True)


def _block(cin, cout, dtype, seed, bias=True, affine=True, momentum=0.1, device=DEV):
    """Two identical (conv, BN) pairs with off-centre parameters and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
    norm = nn.BatchNorm2d(cout, affine=affine, momentum=momentum)
    with torch.no_grad():
        conv.weight.copy_(0.4 * torch.randn(conv.weight.shape, generator=gen))
        if bias:
            conv.bias.copy_(0.3 + 0.2 * torch.randn(cout, generator=gen))
        if affine:
            norm.weight.copy_(0.5 + torch.rand(cout, generator=gen))
            norm.bias.copy_(-0.2 + 0.4 * torch.rand(cout, generator=gen))
        norm.running_mean.copy_(0.3 * torch.randn(cout, generator=gen))
        norm.running_var.copy_(0.5 + torch.rand(cout, generator=gen))
    conv, norm = conv.to(device=device, dtype=dtype), norm.to(device=device, dtype=dtype)
    conv2, norm2 = nn.Conv2d(cin, cout, 3, padding=1, bias=bias), nn.BatchNorm2d(cout, affine=affine,
                                                                                 momentum=momentum)
    conv2, norm2 = conv2.to(device=device, dtype=dtype), norm2.to(device=device, dtype=dtype)
    conv2.load_state_dict(conv.state_dict())
    norm2.load_state_dict(norm.state_dict())
    return (conv, norm), (conv2, norm2)


def _inputs(b, cin, h, w, dtype, seed, with_zb=True, device=DEV):
    gen = torch.Generator().manual_seed(seed + 1)
    x = -0.7 + 0.8 * torch.randn(b, cin, h, w, generator=gen, dtype=torch.float64)  # off-centre values
    zb = 0.5 - torch.rand(b, cin, generator=gen, dtype=torch.float64) if with_zb else None
    x = x.to(device=device, dtype=dtype).requires_grad_(True)
    if zb is not None:
        zb = zb.to(device=device, dtype=dtype).requires_grad_(True)
    return x, zb


def _leaves(x, zb, conv, norm):
    return [t for t in (x, zb, conv.weight, conv.bias, norm.weight, norm.bias) if t is not None]


def _run(fn, x, zb, conv, norm, mode, upstream=None):
    out = fn(x, zb, conv, norm, mode)
    if upstream is None:
        gen = torch.Generator().manual_seed(123)
        upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, _leaves(x, zb, conv, norm), upstream)
    return out, grads, upstream


def _assert_close(got, want, tol, what):
    bad = ~torch.isclose(got, want, atol=tol, rtol=tol)
    nan = got.isnan() | got.isinf()
    assert not nan.any(), f"{what}: {int(nan.sum())} NaN/inf, first at {nan.nonzero()[0].tolist()}"
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} mismatch, first at {bad.nonzero()[:4].tolist()}, "
                           f"max abs err {(got - want).abs().max().item():.3g}")


def _triton(x, zb, conv, norm, mode):
    return zc.zconv_block(x, zb, conv, norm, mode, impl="triton")


def _check_against_reference(shape, mode, with_zb, training, dtype=torch.float64, seed=0, channels_last=False,
                             **block_kw):
    b, cin, cout, h, w = shape
    (conv, norm), (conv2, norm2) = _block(cin, cout, dtype, seed, **block_kw)
    norm.train(training)
    norm2.train(training)
    x, zb = _inputs(b, cin, h, w, dtype, seed, with_zb)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    out, grads, up = _run(_triton, x, zb, conv, norm, mode)
    ref, ref_grads, _ = _run(zc.zconv_block_reference, x, zb, conv2, norm2, mode, up)
    tol = TOL[dtype]
    assert out.dtype == x.dtype and out.shape == ref.shape
    if out.shape[1] > 1 and out.shape[2] * out.shape[3] > 1 and not tu.is_channels_last(x):
        # NCHW stays NCHW, also where the block convolves channels-last inside: its output and dL/dx
        assert not tu.is_channels_last(out) and not tu.is_channels_last(grads[0])
    _assert_close(out, ref, tol, "output")
    names = ["x", "zb", "conv.weight", "conv.bias", "norm.weight", "norm.bias"]
    names = [n for n, t in zip(names, (x, zb, conv.weight, conv.bias, norm.weight, norm.bias)) if t is not None]
    for name, g, r in zip(names, grads, ref_grads):
        # below float64, parameter grads are sums over B*H*W pixels: tolerance relative to their scale
        scale = 1.0 if dtype == torch.float64 else max(1.0, r.abs().max().item())
        _assert_close(g, r, tol * scale, f"grad {name}")
    # On the GPU, BN's momentum reaches the kernel as an fp32 scalar (0.1 -> 0.100000001), so the running
    # stats carry a ~1e-8 relative difference even in float64; the interpreter keeps it float64.
    stat_tol = max(tol, 1e-7) if x.is_cuda else tol
    _assert_close(norm.running_mean, norm2.running_mean, stat_tol, "running_mean")
    _assert_close(norm.running_var, norm2.running_var, stat_tol, "running_var")
    assert int(norm.num_batches_tracked) == int(norm2.num_batches_tracked)
    return out


# Every shape in every mode, except the single row pooled 2x2: no such block exists (avg_pool2d(2) needs
# H, W >= 2, in the reference too).
SHAPE_MODES = [(shape, mode) for shape in SHAPES for mode in ("same", "down", "up")
               if not (mode == "down" and min(shape[3:]) < 2)]


@triton_run
@pytest.mark.parametrize("shape, mode", SHAPE_MODES)
@pytest.mark.parametrize("with_zb", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_matches_reference_float64(shape, mode, with_zb, training, poisoned):
    torch.manual_seed(0)
    _check_against_reference(shape, mode, with_zb, training)


@pytest.fixture
def low_res_up(monkeypatch):
    """conv2d's dispatch as on CUDA ("auto" takes the fused forms) with every up block's output counted as
    large, so up blocks convolve at low resolution (conv2d.upsampled_conv3x3); counts those calls."""
    kc = importlib.import_module("ostnet_fast.kernels.conv2d")
    monkeypatch.setattr(kc, "use_triton", lambda op, impl, *t: impl != "reference")
    monkeypatch.setattr(kc, "SUBPIXEL_FROM", 0)
    calls = []
    real = kc.subpixel_conv3x3
    monkeypatch.setattr(kc, "subpixel_conv3x3", lambda *a: calls.append(1) or real(*a))
    return calls


@triton_run
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_zb", [True, False])
@pytest.mark.parametrize("training, channels_last", [(True, False), (False, True)])
def test_up_block_at_low_resolution_matches_reference(shape, with_zb, training, channels_last, low_res_up,
                                                      poisoned):
    """The fused up block with its convolution on the low-resolution map: output, every gradient and the
    running statistics as the reference's (which upsamples first), float64."""
    _check_against_reference(shape, "up", with_zb, training, channels_last=channels_last)
    assert low_res_up


@triton_run
@pytest.mark.parametrize("mode", ["same", "down", "up"])
def test_channels_last_input_keeps_its_format(mode, poisoned):
    torch.manual_seed(0)
    out = _check_against_reference((2, 3, 4, 5, 7), mode, True, True, channels_last=True)
    assert out.is_contiguous(memory_format=torch.channels_last), "output must keep channels-last"


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 16 pixels (by 4 channels NCHW, by all of the test's channels-last), 3 of them a reduction
    program (the last group partly past the plane), finalize steps of 1 row x 2 channels: several partial
    rows a plane, merged in several steps across several finalize programs, 2 of them a channel block for
    the 3 samples' sums of x^; border lines 2 pixels a step (a row's first and last class in different
    steps); 4 x 4 tiles for the layout copy."""
    for name, value in (("TILE", 16), ("RED_TILE", 16), ("RED_LOOP", 3), ("FIN_ROWS", 1), ("FIN_CHANNELS", 2),
                        ("FIN_SAMPLE_PROGRAMS", 2), ("BORDER_PIXELS", 2)):
        monkeypatch.setattr(zc, name, value)
    monkeypatch.setattr(importlib.import_module("ostnet_fast.kernels.conv2d"), "RELAYOUT_BLOCK", 4)


@triton_run
@pytest.mark.parametrize("mode", ["same", "down"])
@pytest.mark.parametrize("conv_channels_last", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_small_tiles_and_convolution_layouts(mode, conv_channels_last, channels_last, small_tiles, poisoned,
                                             monkeypatch):
    """Many tiles a plane; the convolution channels-last inside an NCHW block or in the input's layout."""
    monkeypatch.setattr(zc, "CONV_CHANNELS_LAST", conv_channels_last)
    layouts = []
    real = zc.conv2d
    monkeypatch.setattr(zc, "conv2d", lambda x, *a: layouts.append(tu.is_channels_last(x)) or real(x, *a))
    for training in (True, False):
        _check_against_reference((3, 3, 5, 7, 9), mode, True, training, channels_last=channels_last)
    assert layouts == [conv_channels_last or channels_last] * 2


@triton_run
@pytest.mark.parametrize("block_kw", [
    dict(bias=False),  # conv without bias
    dict(affine=False),  # BN without weight / bias
    dict(momentum=None),  # cumulative moving average of the running stats
])
def test_block_variants(block_kw):
    torch.manual_seed(0)
    _check_against_reference((2, 3, 4, 5, 6), "down", True, True, **block_kw)


@triton_run
def test_running_stats_over_several_steps():
    torch.manual_seed(0)
    (conv, norm), (conv2, norm2) = _block(3, 4, torch.float64, 0, momentum=None)
    for step in range(3):
        x, zb = _inputs(2, 3, 5, 6, torch.float64, step)
        with torch.no_grad():
            zc.zconv_block(x, zb, conv, norm, "same", impl="triton")
            zc.zconv_block_reference(x, zb, conv2, norm2, "same")
    _assert_close(norm.running_mean, norm2.running_mean, 1e-10, "running_mean")
    _assert_close(norm.running_var, norm2.running_var, 1e-10, "running_var")
    assert int(norm.num_batches_tracked) == 3


@triton_run
@pytest.mark.parametrize("mode", ["same", "down"])
@pytest.mark.parametrize("with_zb", [True, False])
def test_empty_batch_in_eval(mode, with_zb, poisoned):
    """No samples: an empty output, and parameter grads of exactly 0 (the finalize launches still run)."""
    _check_against_reference((0, 3, 4, 5, 6), mode, with_zb, training=False)


@triton_run
def test_batch_stats_without_running_stats():
    # track_running_stats=False: batch statistics in eval too, nothing to update
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    norm = nn.BatchNorm2d(4, track_running_stats=False).double().eval()
    x, zb = _inputs(2, 3, 5, 6, torch.float64, 0)
    out = zc.zconv_block(x, zb, conv, norm, "same", impl="triton")
    _assert_close(out, zc.zconv_block_reference(x, zb, conv, norm, "same"), 1e-10, "output")


@triton_run
@pytest.mark.parametrize("mode,training", [("down", True), ("up", False), ("same", True)])
def test_gradcheck_float64(mode, training):
    torch.manual_seed(0)
    (conv, norm), _ = _block(2, 3, torch.float64, 0)
    norm.train(training)
    x, zb = _inputs(2, 2, 4, 5 if mode != "up" else 3, torch.float64, 0)
    weight = conv.weight.detach().clone().requires_grad_(True)
    bias = conv.bias.detach().clone().requires_grad_(True)
    gamma = norm.weight.detach().clone().requires_grad_(True)
    beta = norm.bias.detach().clone().requires_grad_(True)

    def fn(x, zb, weight, bias, gamma, beta):
        conv.weight, conv.bias, norm.weight, norm.bias = weight, bias, gamma, beta
        return zc.zconv_block(x, zb, conv, norm, mode, impl="triton")

    del conv.weight, conv.bias, norm.weight, norm.bias  # plain attributes, so fn can swap them
    assert torch.autograd.gradcheck(fn, (x, zb, weight, bias, gamma, beta), fast_mode=True)


@triton_run
def test_float32_matches_reference():
    torch.manual_seed(0)
    _check_against_reference((2, 5, 6, 9, 7), "down", True, True, dtype=torch.float32)


@pytest.mark.parametrize("weight_channels_last", [False, True])  # the masked form, the per-tap form
def test_border_bias_equals_conv_of_broadcast(weight_channels_last):
    # E(b)[n, q, o] is conv(b broadcast over the image) at the pixels of class q (no conv bias)
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    zb = torch.randn(2, 3, dtype=torch.float64)
    if weight_channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
    assert tu.is_channels_last(weight) == weight_channels_last
    zbg, wg = zb.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z, w: zc.border_bias(z, w, 5, 7, torch.float64), (zbg, wg))
    for h, w in [(5, 7), (1, 4), (2, 1), (1, 1)]:
        e = zc.border_bias(zb, weight, h, w, torch.float64)  # (2, 9, 4)
        assert e.shape == (2, 9, 4) and e.is_contiguous()
        full = torch.nn.functional.conv2d(zb[:, :, None, None].expand(2, 3, h, w), weight, padding=1)
        rows = [0 if y == 0 else 2 if y == h - 1 else 1 for y in range(h)]
        cols = [0 if x == 0 else 2 if x == w - 1 else 1 for x in range(w)]
        for y in range(h):
            for x in range(w):
                torch.testing.assert_close(full[:, :, y, x], e[:, 3 * rows[y] + cols[x]], atol=1e-12, rtol=0)


def test_auto_on_cpu_takes_the_reference(monkeypatch):
    torch.manual_seed(0)

    def boom(*args, **kwargs):
        raise AssertionError("the Triton path must not run for CPU tensors under impl='auto'")

    monkeypatch.setattr(zc, "_zconv_block_triton", boom)
    (conv, norm), _ = _block(3, 4, torch.float32, 0, device="cpu")
    x, zb = _inputs(2, 3, 5, 6, torch.float32, 0, device="cpu")
    out = zc.zconv_block(x, zb, conv, norm, "down", impl="auto")
    assert out.shape == (2, 4, 2, 3)


@triton_run
def test_unsupported_conv_raises_under_triton_and_falls_back_under_auto():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 5, padding=2).to(DEV)
    norm = nn.BatchNorm2d(4).to(DEV)
    x = torch.randn(2, 3, 6, 6, device=DEV)
    with pytest.raises(ValueError, match="kernel_size"):
        zc.zconv_block(x, None, conv, norm, "same", impl="triton")
    if DEV == "cuda":
        out = zc.zconv_block(x, None, conv, norm, "same", impl="auto")
        torch.testing.assert_close(out, zc.zconv_block_reference(x, None, conv, norm, "same"))


def test_bad_arguments_raise():
    conv, norm = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="mode"):
        zc.zconv_block(x, None, conv, norm, "sideways")
    with pytest.raises(ValueError, match=r"zb must be \(B, C_in\)"):
        zc.zconv_block(x, torch.randn(2, 4), conv, norm, "same")


# ---------------------------------------------------------------------------------------------------
# GPU: production shapes, low precision
# ---------------------------------------------------------------------------------------------------

GPU_SHAPES = [  # (B, C_in, C_out, H, W, mode)
    (8, 64, 128, 128, 128, "down"),  # generator down block 1 (F_down^1)
    (8, 256, 512, 32, 32, "down"),  # deepest down block
    (8, 512, 256, 32, 32, "up"),  # up block at the bottleneck
    (8, 64, 128, 128, 128, "same"),  # same-size block
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_production_float64(shape, training, channels_last):
    # float64, not float32: at production sizes a few pre-activations sit within fp32 rounding of 0, and
    # the ReLU mask of conv(x) + E(b) vs conv(x + b) then legitimately differs there (one flipped unit
    # moves 9 x C_in input grads). In float64 the two orders agree to ~1e-12, so any mismatch is a bug.
    # fp16/bf16 against PyTorch's own error: test_gpu_low_precision.
    b, cin, cout, h, w, mode = shape
    _check_against_reference((b, cin, cout, h, w), mode, True, training, dtype=torch.float64,
                             channels_last=channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES[:3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [False, True])
def test_gpu_low_precision(shape, dtype, training, monkeypatch):
    # Our error against an fp32 reference is at most twice PyTorch's own low-precision error plus atol.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    b, cin, cout, h, w, mode = shape
    (conv, norm), (conv32, norm32) = _block(cin, cout, torch.float32, 0)
    (conv_lp, norm_lp), _ = _block(cin, cout, torch.float32, 0)
    for n in (norm, norm32, norm_lp):
        n.train(training)
    x, zb = _inputs(b, cin, h, w, torch.float32, 0)
    ref = zc.zconv_block_reference(x, zb, conv32, norm32, mode)
    with torch.autocast("cuda", dtype=dtype):
        ours = zc.zconv_block(x, zb.to(dtype), conv, norm, mode, impl="triton")
        torch_lp = zc.zconv_block_reference(x, zb.to(dtype), conv_lp, norm_lp, mode)
    assert ours.dtype == dtype
    err_ours = (ours.float() - ref).abs().max().item()
    err_torch = (torch_lp.float() - ref).abs().max().item()
    assert err_ours <= 2 * err_torch + TOL[dtype], f"ours {err_ours:.3g} vs PyTorch {err_torch:.3g}"
