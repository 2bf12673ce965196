"""conv2d: the split-K implicit-GEMM convolution against F.conv2d, its plan, and where the model calls it.

CPU runs need TRITON_INTERPRET=1 (see test_grid_sample.py). Exactness in float64 (odd sizes, odd channel
counts, every kernel geometry the kernel takes, one and several K-splits, poisoned outputs), fp32 within
1e-5 relative, fp16/bf16 against the fp64 reference with a stated tolerance, gradients (cuDNN's backward,
reached through the kernel's autograd) and gradcheck; the custom op through opcheck and torch.compile.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ostnet_fast.kernels import _triton_utils as tu
from tests.conftest import requires_triton_run

kc = importlib.import_module("ostnet_fast.kernels.conv2d")
triton_run = requires_triton_run()
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (B, C_in, H, W, C_out, kernel (kh, kw), padding (ph, pw)), small for the interpreter.
GEOMETRIES = [
    (2, 5, 7, 9, 7, (3, 3), (1, 1)),  # odd sizes, batch > 1, the model's 3x3
    (1, 19, 5, 3, 9, (3, 3), (1, 1)),  # C_in over one 16-channel K block, a 3-wide map
    (2, 6, 9, 8, 5, (7, 7), (0, 0)),  # 7x7 without padding (the keypoint heads): output 3x2
    (1, 4, 6, 5, 3, (7, 7), (3, 3)),  # 7x7, padding 3 (the mask head): taps past every border
    (3, 4, 4, 5, 3, (1, 1), (0, 0)),  # 1x1
    (1, 3, 5, 6, 4, (3, 5), (1, 2)),  # a rectangular kernel
    (1, 2, 1, 1, 3, (3, 3), (1, 1)),  # one pixel: only the centre tap reads inside
]
SMALL = kc.Tiles(block_m=16, block_n=16, block_k=16, splits=1, warps=4, stages=2)


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(tu, "POISON_OUTPUTS", True)


def _inputs(geometry, dtype=torch.float64, channels_last=True, seed=0):
    b, cin, h, w, cout, k, _ = geometry
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, h, w, generator=g, dtype=torch.float64).to(DEV, dtype)
    weight = torch.randn(cout, cin, *k, generator=g, dtype=torch.float64).to(DEV, dtype)
    bias = torch.randn(cout, generator=g, dtype=torch.float64).to(DEV, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last)
    return x, weight, bias


def _compare(geometry, tiles, dtype, channels_last, with_bias=True, rtol=1e-10, atol=1e-10):
    x, weight, bias = _inputs(geometry, dtype, channels_last)
    bias = bias if with_bias else None
    pad = geometry[-1]
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    unpack = lambda ls: (ls[0], ls[1], ls[2] if with_bias else None)
    out = kc.conv2d(*unpack(leaves), pad, impl="triton", tiles=tiles)
    ref = kc.conv2d_reference(*unpack(ref_leaves), pad)
    assert out.shape == ref.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)  # what the model's channels-last path keeps
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEV)
    grads = torch.autograd.grad(out, leaves, up.to(dtype))
    rgrads = torch.autograd.grad(ref, ref_leaves, up)
    for g, rg in zip(grads, rgrads):
        assert g.shape == rg.shape
        torch.testing.assert_close(g.double(), rg, rtol=max(rtol, 1e-9), atol=max(atol, 1e-9) * rg.abs().max().item())


@triton_run
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("splits", [1, 3])
def test_matches_reference_float64(geometry, splits, poisoned):
    _compare(geometry, SMALL._replace(splits=splits), torch.float64, channels_last=True)


@triton_run
@pytest.mark.parametrize("tiles", [SMALL, kc.Tiles(32, 32, 32, 2, 4, 2), kc.Tiles(16, 16, 16, 64, 4, 1)],
                         ids=["16x16x16", "32x32x32-split2", "more-splits-than-steps"])
@pytest.mark.parametrize("channels_last, with_bias", [(False, True), (True, False)])
def test_tiles_layouts_and_no_bias(tiles, channels_last, with_bias, poisoned):
    """Tiles wider than the map or the channels, NCHW input (any strides are read), no bias; more splits than
    K steps leave some programs an empty range, whose zero partials must still be written."""
    _compare(GEOMETRIES[1], tiles, torch.float64, channels_last, with_bias)


@triton_run
def test_float32_is_exact_products_not_tf32(poisoned):
    """fp32 dot products in full precision (Triton's default would be TF32, ~1e-3 relative). Only a GPU run
    can fail this: the interpreter's dot is numpy's, exact either way; on CPU it checks the fp32 plumbing."""
    geometry = (1, 40, 6, 7, 24, (3, 3), (1, 1))
    x, weight, bias = _inputs(geometry, torch.float32)
    out = kc.conv2d(x, weight, bias, (1, 1), impl="triton", tiles=SMALL._replace(splits=2))
    ref = kc.conv2d_reference(x.double(), weight.double(), bias.double(), (1, 1))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@triton_run
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 2])
def test_half_precision_against_float64(dtype, splits):
    """fp16/bf16 in, fp32 accumulation, output rounded once to the input's dtype: within 2 ulp of the
    output's scale (fp16 2**-10, bf16 2**-7 relative) of the fp64 convolution of the same rounded inputs."""
    if dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter's dot has no bf16 (numpy has none); the GPU tests cover bf16")
    geometry = (2, 32, 5, 6, 16, (3, 3), (1, 1))
    x, weight, bias = _inputs(geometry, dtype)
    out = kc.conv2d(x, weight, bias, (1, 1), impl="triton", tiles=SMALL._replace(splits=splits))
    ref = kc.conv2d_reference(x.double(), weight.double(), bias.double(), (1, 1))
    eps = 2 ** -10 if dtype == torch.float16 else 2 ** -7
    assert (out.double() - ref).abs().max().item() <= 2 * eps * ref.abs().max().item()


@triton_run
@pytest.mark.parametrize("splits", [1, 2])
def test_gradcheck_float64(splits):
    x, weight, bias = _inputs((1, 3, 4, 3, 2, (3, 3), (1, 1)))
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    tiles = SMALL._replace(splits=splits)
    assert torch.autograd.gradcheck(lambda a, b, c: kc.conv2d(a, b, c, (1, 1), impl="triton", tiles=tiles), leaves)


@triton_run
@pytest.mark.parametrize("splits", [1, 2])
def test_custom_op_opcheck_and_compiled(splits):
    """The op torch.compile calls: opcheck (schema, fake shapes/strides, autograd), and a compiled graph
    (the partials' sum traced as torch ops) equals the eager kernel, gradients included."""
    x, weight, bias = _inputs((2, 5, 5, 4, 3, (3, 3), (1, 1)))
    tiles = SMALL._replace(splits=splits)
    torch.library.opcheck(kc._conv2d_partials_op, (x.requires_grad_(), weight.requires_grad_(),
                                                   bias.requires_grad_() if splits == 1 else None, [1, 1], list(tiles)))
    torch._dynamo.reset()
    fn = lambda a, b, c: kc.conv2d(a, b, c, (1, 1), impl="triton", tiles=tiles) * 2
    outs = []
    for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
        out = f(*leaves)
        (out * (1 + torch.arange(out.numel(), device=DEV, dtype=out.dtype).view(out.shape) % 5)).sum().backward()
        outs.append([out] + [t.grad for t in leaves])
    torch._dynamo.reset()
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@triton_run
def test_compiled_half_precision_backward():
    """Compiled with split partials (fp32) in fp16: the backward hands cuDNN an fp16 gradient, and the
    gradients match F.conv2d's within fp16 rounding."""
    x, weight, bias = _inputs((1, 16, 4, 5, 8, (3, 3), (1, 1)), torch.float16)
    fn = lambda a, b, c: kc.conv2d(a, b, c, (1, 1), impl="triton", tiles=SMALL._replace(splits=2))
    grads = []
    torch._dynamo.reset()
    for f in (torch.compile(fn, backend="aot_eager", fullgraph=True), lambda a, b, c: F.conv2d(a, b, c, padding=1)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
        out = f(*leaves)
        assert out.dtype == torch.float16
        out.float().square().sum().backward()
        grads.append([t.grad for t in leaves])
    torch._dynamo.reset()
    for got, want in zip(*grads):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("cin, cout, with_bias", [(35, 75, True), (40, 17, True), (19, 9, False)])
def test_channel_padded_is_the_same_convolution(cin, cout, with_bias):
    """conv2d_channel_padded: zero channels in, dropped channels out, the same sums (fp64, exact)."""
    x, w, b = _inputs((2, cin, 9, 7, cout, (7, 7), (3, 3)))
    b = b if with_bias else None
    out = kc.conv2d_channel_padded(x, w, b, (3, 3))
    assert out.shape == (2, cout, 9, 7)
    torch.testing.assert_close(out, F.conv2d(x, w, b, padding=3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["35 -> 75", "128 -> 17", "3 channels", "multiples of 8", "eager", "fp32",
                                  "NCHW", "training"])
def test_pads_for_cudnn(case, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: case != "eager")
    args = dict(b=1, cin=35, size=8, cout=75, k=7)
    if case == "128 -> 17":
        args.update(cin=128, cout=17)
    if case == "3 channels":
        args.update(cin=3, cout=64, k=3)
    if case == "multiples of 8":
        args.update(cin=32, cout=80)
    if case == "fp32":
        args["dtype"] = torch.float32
    if case == "NCHW":
        args["channels_last"] = False
    x, w = _meta(**args)
    if case == "training":
        w.requires_grad_()
        assert not kc.pads_for_cudnn(x, w)
        return
    with torch.no_grad():
        assert kc.pads_for_cudnn(x, w) == (case in ("35 -> 75", "128 -> 17"))


def test_compiled_auto_pads_odd_channels_for_cudnn(monkeypatch):
    """Under torch.compile, where plan declines, "auto" pads 35 -> 40 input and 75 -> 80 output channels
    (bf16 channels-last, as the keypoint heads), with the same result as the unpadded convolution."""
    monkeypatch.setattr(kc, "use_triton", lambda *a: True)  # as on CUDA
    padded = []
    real = kc.conv2d_channel_padded
    monkeypatch.setattr(kc, "conv2d_channel_padded", lambda *a: padded.append(1) or real(*a))
    x, w, b = _inputs((1, 35, 6, 5, 75, (7, 7), (3, 3)), torch.bfloat16)
    with torch.no_grad():
        eager = kc.conv2d(x, w, b, (3, 3))
        assert not padded
        torch._dynamo.reset()
        compiled = torch.compile(lambda x, w, b: kc.conv2d(x, w, b, (3, 3)), backend="aot_eager", fullgraph=True)
        out = compiled(x, w, b)
        torch._dynamo.reset()
    assert padded and out.shape == eager.shape
    torch.testing.assert_close(out.float(), eager.float(), rtol=2e-2, atol=2e-2 * eager.abs().max().item())


@triton_run
@pytest.mark.parametrize("scale, size", [(0.25, (37, 53)), (0.5, (9, 12))])
def test_blur_downsample_separable_matches_the_conv(scale, size, monkeypatch):
    """The compiled fused path's two 1-D passes against the strided depthwise conv (float64, odd sizes,
    batch 2, 3 channels, both layouts); with gradients, eagerly and with "reference" the conv itself; the
    module's 1-D profile is its kernel's, also after loading a state dict."""
    from ostnet_fast.model.blocks import AntiAliasInterpolation2d
    down = AntiAliasInterpolation2d(3, scale).double()
    torch.testing.assert_close(torch.outer(down.factor, down.factor), down.weight[0, 0], rtol=1e-6, atol=1e-9)
    other = torch.linspace(1, 2, down.factor.numel(), dtype=torch.float64)  # a loaded `weight` brings its own
    other = other / other.sum()
    down.load_state_dict({"weight": torch.outer(other, other).expand_as(down.weight).clone()})
    torch.testing.assert_close(down.factor, other, rtol=1e-12, atol=1e-15)
    down = AntiAliasInterpolation2d(3, scale).double().to(DEV)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, *size, generator=g, dtype=torch.float64).to(DEV)
    # the reference: the same factor's kernel, so that only the two formulations differ
    kernel = torch.outer(down.factor, down.factor).expand(3, 1, -1, -1)
    ref = F.conv2d(x, kernel, groups=3, stride=down.step, padding=down.ka)
    passes = []
    real = kc.blur_two_passes
    monkeypatch.setattr(kc, "blur_two_passes", lambda *a: passes.append(1) or real(*a))
    torch._dynamo.reset()
    fn = torch.compile(lambda t: kc.blur_downsample(t, kernel, down.factor, down.step, impl="triton"),
                       backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        out = fn(x)
        cl_out = fn(x.contiguous(memory_format=torch.channels_last))
    assert len(passes) == 2 and out.shape == ref.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert tu.is_channels_last(cl_out)  # a channels-last image gives a channels-last output, as cuDNN's
    torch.testing.assert_close(cl_out, ref, rtol=1e-12, atol=1e-12)
    # with gradients: the conv (its backward measured and deterministic)
    grad_x = x.clone().requires_grad_()
    out = fn(grad_x)
    torch._dynamo.reset()
    assert len(passes) == 2
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # eagerly, and with "reference", the conv itself
    torch.testing.assert_close(kc.blur_downsample(x, kernel, down.factor, down.step, impl="reference"), ref,
                               rtol=0, atol=0)
    torch.testing.assert_close(kc.blur_downsample(x, kernel, down.factor, down.step, impl="triton"), ref,
                               rtol=0, atol=0)
    assert len(passes) == 2
    with pytest.raises(ValueError, match="filters"):
        kc.blur_downsample(x[:, :2], kernel, down.factor, down.step)


@requires_triton_run()
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 9, 1, 6), (3, 4, 5, 1)])
@pytest.mark.parametrize("to_cl", [True, False])
def test_relayout_kernel_copies_values(shape, to_cl, monkeypatch, poisoned):
    """relayout (the Triton copy) both ways at odd sizes, several 4 x 4 tiles, into a poisoned output."""
    monkeypatch.setattr(kc, "RELAYOUT_BLOCK", 4)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(DEV)
    src = x if to_cl else x.contiguous(memory_format=torch.channels_last)
    out = kc.relayout(src, to_cl)
    assert tu.is_channels_last(out) == to_cl and torch.equal(out, x)
    assert kc.relayout(out, to_cl) is out


@requires_triton_run()
@pytest.mark.parametrize("to_cl", [True, False])
def test_relayout_of_small_planes_takes_narrow_tiles(to_cl, monkeypatch, poisoned):
    """Planes of a few pixels (a 3x3 weight's 9) get tiles no wider than the plane along the pixels and
    wider along the channels: 8 pixels x 32 channels here, three channel tiles."""
    monkeypatch.setattr(kc, "RELAYOUT_BLOCK", 16)
    launches = []
    real = kc._relayout_kernel

    class Spy:  # records each launch's grid and tile, then launches
        def __getitem__(self, grid):
            def run(*args, **kw):
                launches.append((tuple(grid), kw["BLOCK_P"], kw["BLOCK_C"]))
                return real[grid](*args, **kw)
            return run

    monkeypatch.setattr(kc, "_relayout_kernel", Spy())
    x = torch.randn(3, 70, 2, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(DEV)
    src = x if to_cl else x.contiguous(memory_format=torch.channels_last)
    out = kc.relayout(src, to_cl)
    assert tu.is_channels_last(out) == to_cl and torch.equal(out, x)
    assert launches == [((1, 3, 3), 8, 32)]  # 6 pixels -> tiles 8 wide; 16 * 16 / 8 = 32 channels, 3 tiles


@requires_triton_run()
@pytest.mark.parametrize("x_channels_last", [False, True])
def test_to_channels_last_grad_keeps_the_input_layout(x_channels_last, monkeypatch):
    monkeypatch.setattr(kc, "RELAYOUT_BLOCK", 4)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 7, 9, generator=g, dtype=torch.float64).to(DEV)
    if x_channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = kc.to_channels_last(x)
    assert tu.is_channels_last(y) and torch.equal(y, x)
    upstream = torch.randn(x.shape, generator=g, dtype=torch.float64).to(DEV)
    (grad,) = torch.autograd.grad(y, x, upstream.contiguous(memory_format=torch.channels_last))
    assert tu.is_channels_last(grad) == x_channels_last and torch.equal(grad, upstream)


@pytest.mark.parametrize("shape", [(2, 5, 7, 9, 3), (1, 3, 1, 1, 4), (1, 2, 1, 5, 2), (3, 4, 4, 3, 6)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_subpixel_conv3x3_is_the_upsampled_convolution(shape, channels_last):
    """conv3x3(nearest 2x upsample(x)) computed on x itself: the same values and gradients (fp64), in x's
    memory format; odd sizes, one-pixel maps, batch > 1."""
    b, cin, h, w, cout = shape
    g = torch.Generator().manual_seed(2)
    x = torch.randn(b, cin, h, w, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64)
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    ref_leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    out = kc.subpixel_conv3x3(*leaves)
    ref = F.conv2d(F.interpolate(ref_leaves[0], scale_factor=2), ref_leaves[1], padding=1)
    assert out.shape == ref.shape
    if h * w > 1:
        assert tu.is_channels_last(out) == channels_last  # x's layout (the conv itself runs channels-last)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for a, b_ in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b_.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 8, 3, 5), (1, 8, 1, 1), (3, 12, 4, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_subpixel_interleave_gradcheck(shape, channels_last, monkeypatch):
    """The interleave's hand-written backward (four copies into a zeroed grad) against finite differences,
    into either layout; the grad comes back in q's memory format, whatever the upstream grad's. (The Triton
    form moves the same elements: test_subpixel_interleave_kernel_is_the_copies; interpreted, gradcheck's
    hundreds of calls would take minutes.)"""
    monkeypatch.setattr(kc, "_interleave_kernel_applies", lambda q, out: False)
    b, c4, h, w = shape
    q = torch.randn(b, c4, h + 1, w + 1, dtype=torch.float64)
    if channels_last:
        q = q.contiguous(memory_format=torch.channels_last)
    q.requires_grad_(True)
    for out_cl in (False, True):
        assert torch.autograd.gradcheck(lambda t: kc.SubpixelInterleaveFn.apply(t, h, w, out_cl), (q,))
        out = kc.SubpixelInterleaveFn.apply(q, h, w, out_cl)
        assert out.shape == (b, c4 // 4, 2 * h, 2 * w) and tu.is_channels_last(out) == out_cl
        (g,) = torch.autograd.grad(out, q, torch.randn(out.shape, dtype=torch.float64))  # NCHW upstream
        assert tu.is_channels_last(g) == tu.is_channels_last(q)


@triton_run
@pytest.mark.parametrize("shape", [(2, 8, 3, 5), (1, 12, 1, 1), (3, 136, 2, 37)])  # more than one tile
def test_subpixel_interleave_kernel_is_the_copies(shape, monkeypatch, poisoned):
    """The Triton interleave (channels-last q to NCHW out, forward and backward) moves exactly what the four
    strided copies move, every element of the grad written (its buffer starts as NaN)."""
    b, c4, h, w = shape
    q = torch.randn(b, c4, h + 1, w + 1, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(b, c4 // 4, 2 * h, 2 * w, dtype=torch.float64)
    results = []
    for kernel in (True, False):
        monkeypatch.setattr(kc, "_interleave_kernel_applies", lambda q, out, kernel=kernel: kernel)
        leaf = q.clone().requires_grad_(True)
        out = kc.SubpixelInterleaveFn.apply(leaf, h, w, False)
        (g,) = torch.autograd.grad(out, leaf, upstream)
        assert not tu.is_channels_last(out) and tu.is_channels_last(g)
        results.append((out, g))
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)


def test_upsampled_conv3x3_dispatch(monkeypatch):
    """Low resolution only eagerly on the fused path and above SUBPIXEL_FROM; else upsample + conv2d."""
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    w = torch.randn(2, 4, 3, 3, dtype=torch.float64)  # output 16x16 x 2 channels = 512 values
    calls = []
    real = kc.subpixel_conv3x3
    monkeypatch.setattr(kc, "subpixel_conv3x3", lambda *a: calls.append(1) or real(*a))
    ref = F.conv2d(F.interpolate(x, scale_factor=2), w, padding=1)
    torch.testing.assert_close(kc.upsampled_conv3x3(x, w), ref, rtol=0, atol=0)  # CPU: no fused path
    monkeypatch.setattr(kc, "use_triton", lambda op, impl, *t: impl != "reference")  # as on CUDA
    kc.upsampled_conv3x3(x, w)
    assert not calls  # 512 <= SUBPIXEL_FROM
    monkeypatch.setattr(kc, "SUBPIXEL_FROM", 511)
    torch.testing.assert_close(kc.upsampled_conv3x3(x, w), ref, rtol=1e-12, atol=1e-12)
    assert calls == [1]
    kc.upsampled_conv3x3(x, w, impl="reference")
    assert calls == [1]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    kc.upsampled_conv3x3(x, w)  # not measured compiled: the upsampled convolution
    assert calls == [1]


def _meta(b, cin, size, cout, k, dtype=torch.float16, channels_last=True):
    x = torch.empty(b, cin, size, size, device="meta", dtype=dtype)
    w = torch.empty(cout, cin, k, k, device="meta", dtype=dtype)
    if channels_last:
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    return x, w


@pytest.mark.parametrize("b, cin, size, cout, k, pad, want", [
    (1, 1024, 4, 1024, 3, 1, kc.Tiles(16, 64, 64, 16, 4, 4)),  # the hourglass bottleneck: 16 tiles x 16 splits
    (1, 2048, 8, 512, 3, 1, kc.Tiles(64, 128, 64, 32, 4, 4)),  # 4 tiles, up to 32 splits
    (1, 64, 32, 128, 3, 1, kc.Tiles(64, 128, 64, 3, 4, 3)),  # 9 K steps: 4 splits of 3 would leave one empty
    (1, 128, 64, 17, 7, 3, kc.Tiles(64, 64, 64, 4, 4, 3)),  # the 7x7 mask head: 4096 x 17 outputs
    (8, 1024, 4, 1024, 3, 1, kc.Tiles(64, 128, 64, 16, 4, 4)),
])
def test_plan_takes_the_small_maps(b, cin, size, cout, k, pad, want):
    x, w = _meta(b, cin, size, cout, k)
    with torch.no_grad():
        got = kc.plan(x, w, (pad, pad))
    assert got == want
    m = b * kc.out_size(x, w, (pad, pad))[0] ** 2
    programs = -(-m // got.block_m) * -(-cout // got.block_n) * got.splits
    steps = k * k * -(-cin // got.block_k)
    assert programs <= kc.TARGET_PROGRAMS and (got.splits == 1 or steps >= 2 * got.splits)
    per_split = -(-steps // got.splits)
    assert (got.splits - 1) * per_split < steps  # the last split has steps too: none writes only zeros


@pytest.mark.parametrize("case", ["big map", "512 channels on 32x32", "35 channels", "fp32", "NCHW",
                                  "NCHW weight", "5x5", "training"])
def test_plan_leaves_the_rest_to_cudnn(case):
    args = dict(b=1, cin=256, size=16, cout=256, k=3)
    if case == "big map":
        args.update(size=64, cout=64, b=2)  # 8192 x 64 outputs, over 2**18
    if case == "512 channels on 32x32":
        args.update(cin=512, size=32, cout=512)  # the generator's residual blocks: slower in the frame
    if case == "35 channels":
        args.update(cin=35)
    if case == "fp32":
        args["dtype"] = torch.float32
    if case == "NCHW":
        args["channels_last"] = False
    if case == "5x5":
        args["k"] = 5
    x, w = _meta(**args)
    if case == "NCHW weight":
        w = w.contiguous()
    if case == "training":
        w.requires_grad_()
        assert kc.plan(x, w, (1, 1)) is None
        return
    with torch.no_grad():
        assert kc.plan(x, w, (args["k"] // 2,) * 2) is None
    # the same convolution with gradients off and a supported form is planned (so each case tests its cause)
    if case in ("NCHW", "NCHW weight", "fp32"):
        x2, w2 = _meta(1, 256, 16, 256, 3)
        with torch.no_grad():
            assert kc.plan(x2, w2, (1, 1)) is not None


def test_validation():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="must agree"):
        kc.conv2d(x, torch.randn(3, 5, 3, 3), None, (1, 1))
    with pytest.raises(ValueError, match="must agree"):
        kc.conv2d(x[0], torch.randn(3, 4, 3, 3), None, (1, 1))
    with pytest.raises(ValueError, match="padding"):
        kc.conv2d(x, torch.randn(3, 4, 3, 3), None, "same")
    # an int padding is (p, p), as F.conv2d's
    torch.testing.assert_close(kc.conv2d(x, torch.ones(3, 4, 3, 3), None, 1),
                               F.conv2d(x, torch.ones(3, 4, 3, 3), padding=1), rtol=0, atol=0)


@triton_run
def test_forced_kernel_validation():
    x, w, b = _inputs(GEOMETRIES[0])
    with pytest.raises(ValueError, match="one dtype"):
        kc.conv2d(x, w.float(), b, (1, 1), impl="triton", tiles=SMALL)
    with pytest.raises(ValueError, match="no output"):
        kc.conv2d(x[:, :, :2, :2], w, b, (0, 0), impl="triton", tiles=SMALL)  # 3x3 on 2x2, unpadded
    with pytest.raises(ValueError, match="partials' sum"):
        kc.conv2d_partials(x, w, b, (1, 1), SMALL._replace(splits=2))


def test_off_cuda_auto_is_the_reference():
    x, w, b = (t.float() for t in _inputs(GEOMETRIES[0]))
    out = kc.conv2d(x, w, b, (1, 1))
    assert torch.equal(out, F.conv2d(x, w, b, padding=1))


def test_conv2d_module_keeps_unsupported_geometry_on_the_module():
    conv = nn.Conv2d(4, 3, 3, stride=2, padding=1).double()
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(kc.conv2d_module(conv, x, "triton"), conv(x), rtol=0, atol=0)


def test_forcing_a_block_does_not_force_conv2d(monkeypatch):
    """A block called with impl="triton" (or OSTNET_IMPL=triton) lets plan choose; "reference" stays."""
    assert kc.from_block("triton") == "auto" and kc.from_block("auto") == "auto"
    assert kc.from_block("reference") == "reference"
    monkeypatch.setenv("OSTNET_IMPL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w, b = (t.float() for t in _inputs(GEOMETRIES[0]))
    calls = []
    monkeypatch.setattr(kc, "conv2d_partials", lambda *a: calls.append(a))
    out = kc.conv2d(x, w, b, (1, 1))  # "auto" from a block: cuDNN (here the CPU conv) despite the env
    assert not calls and torch.equal(out, F.conv2d(x, w, b, padding=1))


@triton_run
def test_auto_takes_the_kernel_only_under_compile(monkeypatch):
    """Where plan has tiles, "auto" runs the kernel inside torch.compile and cuDNN eagerly."""
    monkeypatch.setattr(kc, "use_triton", lambda *a: True)  # as on CUDA
    monkeypatch.setattr(kc, "plan", lambda *a: SMALL._replace(splits=2))
    x, w, b = _inputs(GEOMETRIES[0])
    launched = []
    real = kc.conv2d_partials
    monkeypatch.setattr(kc, "conv2d_partials", lambda *a: launched.append(1) or real(*a))
    eager = kc.conv2d(x, w, b, (1, 1))
    assert not launched
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w, b: kc.conv2d(x, w, b, (1, 1)), backend="aot_eager", fullgraph=True)(x, w, b)
    torch._dynamo.reset()
    assert launched
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("b, cin, size, cout, k, pad", [
    (1, 1024, 4, 1024, 3, 1), (1, 2048, 8, 512, 3, 1), (1, 512, 32, 128, 3, 1), (8, 512, 4, 1024, 3, 1),
    (1, 128, 64, 17, 7, 3), (1, 256, 16, 512, 3, 1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_planned_kernel_matches_cudnn(b, cin, size, cout, k, pad, dtype, monkeypatch):
    """At the frame's shapes, with the tiles plan picks: against cuDNN in fp32 (TF32 off), within the
    half-precision rounding of inputs and output. Also: plan does take these shapes."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, cin, size, size, device="cuda", generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, k, k, device="cuda", generator=g) / (cin * k * k) ** 0.5).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(cout, device="cuda", generator=g).to(dtype)
    with torch.inference_mode():
        tiles = kc.plan(x, w, (pad, pad))
        assert tiles is not None
        out = kc.conv2d(x, w, bias, (pad, pad), impl="triton", tiles=tiles)
        ref = F.conv2d(x.float(), w.float(), bias.float(), padding=pad)
    eps = 2 ** -10 if dtype == torch.float16 else 2 ** -7
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert (out.float() - ref).abs().max().item() <= 4 * eps * ref.abs().max().item()


@pytest.mark.gpu
def test_gpu_compiled_auto_paths_match_cudnn(monkeypatch):
    """Inductor-compiled "auto" (as the compiled frame runs it), fp16 channels-last, batch 1: the keypoint
    heads' 35 -> 75 7x7 with padded channels, the mask heads' 128 -> 17 7x7 through the split-K kernel, and
    the 3x256x256 anti-alias blur as two 1-D passes, each against cuDNN in fp32 (TF32 off), and each taking
    the path named (counted while tracing)."""
    from ostnet_fast.model.blocks import AntiAliasInterpolation2d
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    taken = []
    for name in ("conv2d_channel_padded", "_conv2d_partials_op", "blur_two_passes"):
        real = getattr(kc, name)
        monkeypatch.setattr(kc, name, lambda *a, _r=real, _n=name: taken.append(_n) or _r(*a))
    g = torch.Generator(device="cuda").manual_seed(0)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)
    eps = 2 ** -10
    for cin, cout, want in ((35, 75, "conv2d_channel_padded"), (128, 17, "_conv2d_partials_op")):
        x = cl(torch.randn(1, cin, 64, 64, device="cuda", generator=g).half())
        w = cl((torch.randn(cout, cin, 7, 7, device="cuda", generator=g) / (cin * 49) ** 0.5).half())
        b = torch.randn(cout, device="cuda", generator=g).half()
        taken.clear()
        torch._dynamo.reset()
        with torch.inference_mode():
            out = torch.compile(lambda x, w, b: kc.conv2d(x, w, b, (3, 3)))(x, w, b)
            ref = F.conv2d(x.float(), w.float(), b.float(), padding=3)
        assert taken == [want] and out.shape == ref.shape
        assert (out.float() - ref).abs().max().item() <= 4 * eps * ref.abs().max().item()
    down = AntiAliasInterpolation2d(3, 0.25).cuda()
    x = cl(torch.rand(1, 3, 256, 256, device="cuda", generator=g).half())
    taken.clear()
    torch._dynamo.reset()
    with torch.inference_mode():
        out = torch.compile(lambda t: down(t))(x)
        ref = F.conv2d(x.float(), down.weight, groups=3, stride=4, padding=6)
    torch._dynamo.reset()
    assert taken == ["blur_two_passes"] and out.dtype == torch.float16 and out.shape == ref.shape
    assert (out.float() - ref).abs().max().item() <= 2 * eps * ref.abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_subpixel_interleave_kernel_is_the_copies(dtype, monkeypatch, poisoned):
    """The Triton interleave at the up block's size (512 -> 256 on 32x32, batch 8): the same elements as the
    strided copies, both ways."""
    q = torch.randn(8, 1024, 33, 33, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(8, 256, 64, 64, device="cuda", dtype=dtype)
    results = []
    for kernel in (True, False):
        monkeypatch.setattr(kc, "_interleave_kernel_applies", lambda q, out, kernel=kernel: kernel)
        leaf = q.clone().requires_grad_(True)
        out = kc.SubpixelInterleaveFn.apply(leaf, 32, 32, False)
        (g,) = torch.autograd.grad(out, leaf, upstream)
        results.append((out, g))
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)
