"""grid_sample's CUDA C++ extension (csrc/ext/grid_sample_small_c.cu, ostnet_fast.kernels.cuda_ext).

On the GPU (marked gpu; skipped where the extension is not built): the extension against a float64 PyTorch
reference, forward and both gradients, at odd sizes and 1-4 channels. On the CPU: the switches, and the
wiring through grid_sample's autograd Function with a stand-in for the compiled module.
"""
import contextlib
import importlib
import math
import types

import pytest
import torch
import torch.nn.functional as F

from ostnet_fast.kernels import cuda_ext
from tests.conftest import requires_triton_run

gs = importlib.import_module("ostnet_fast.kernels.grid_sample")
triton_run = requires_triton_run()


@pytest.fixture(autouse=True)
def _same_draws():
    """The upstream grads are random too: the same ones on every run, so that a failure reproduces."""
    torch.manual_seed(0)


def _inputs(in_shape, out_hw, device, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = -2.3 + 0.5 * torch.randn(in_shape, generator=gen, dtype=torch.float64)
    grid = -1.3 + 2.6 * torch.rand((in_shape[0], *out_hw, 2), generator=gen, dtype=torch.float64)  # 41% outside
    return x.to(device=device, dtype=dtype), grid.to(device=device, dtype=dtype)


def _reference(x, grid, upstream):
    with torch.enable_grad():  # also when called from inside a backward
        xr = x.detach().double().requires_grad_(True)
        gr = grid.detach().double().requires_grad_(True)
        out = gs.grid_sample_reference(xr, gr)
        gx, gg = torch.autograd.grad(out, (xr, gr), upstream.double())
    return out.detach(), gx, gg


# ---------------------------------------------------------------------------------------------- CPU
def test_switches(monkeypatch):
    monkeypatch.delenv("OSTNET_CUDA_EXT", raising=False)
    monkeypatch.setattr(cuda_ext, "module", lambda: types.SimpleNamespace())
    assert cuda_ext.enabled()
    with cuda_ext.turned_off():
        assert not cuda_ext.enabled()
    assert cuda_ext.enabled()
    monkeypatch.setenv("OSTNET_CUDA_EXT", "0")
    assert not cuda_ext.enabled()


def test_a_build_without_code_for_the_gpu_falls_back(monkeypatch, caplog):
    """A launch that fails (a build for other GPUs) turns the extension off for that GPU only, once, saying so."""
    def probe(index):
        probes.append(index)
        if index == 1:
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
    probes = []
    monkeypatch.setattr(cuda_ext, "_probe", probe)
    monkeypatch.setattr(cuda_ext, "_runs_on", {})
    with caplog.at_level("WARNING", logger="ostnet_fast.kernels"):
        assert cuda_ext.runs_on(torch.device("cuda", 0))
        assert not cuda_ext.runs_on(torch.device("cuda", 1))
        assert not cuda_ext.runs_on(torch.device("cuda", 1))
    assert probes == [0, 1]
    assert "no code for GPU 1" in caplog.text and "no kernel image" in caplog.text


def test_not_built_is_not_an_error():
    # this machine has no build of it (CI builds none): the module is None, and nothing applies
    if cuda_ext.module() is not None:
        pytest.skip("the extension is built here")
    x, grid = _inputs((1, 3, 4, 4), (3, 3), "cpu")
    assert not cuda_ext.enabled() and not cuda_ext.grid_sample_applies(x, grid)


def test_applies_only_to_cuda_tensors(monkeypatch):
    monkeypatch.setattr(cuda_ext, "module", lambda: types.SimpleNamespace())
    x, grid = _inputs((1, 3, 4, 4), (3, 3), "cpu")
    assert not cuda_ext.grid_sample_applies(x, grid)


def _fake_module(calls, shared=None):
    """The compiled module's functions, written with the reference (float64 inside), on any device; with
    `shared` (a bool: what grid_sample_shared_fits answers) also the shared-memory ones."""
    def pack(input):
        calls.append("pack")
        return F.pad(input.permute(0, 2, 3, 1), (0, 4 - input.shape[1])).contiguous()

    def unpacked(packed, channels):
        return packed[..., :channels].permute(0, 3, 1, 2)

    def forward_of(name, image=lambda x, *_: x):  # a forward called `name`, reading the image as image(...)
        def forward(x, grid, *channels):
            calls.append(name)
            return gs.grid_sample_reference(image(x, *channels).double(), grid.double()).float()
        return forward

    def backward_of(name, image):
        def backward(grad_out, x, grid, need_input, need_grid):
            calls.append((name, need_input, need_grid))
            assert grad_out.is_contiguous() and grad_out.dtype == torch.float32
            _, gx, gg = _reference(image(x, grad_out.shape[1]), grid, grad_out)
            return (gx.float() if need_input else x.new_empty(0)), (gg.float() if need_grid else grid.new_empty(0))
        return backward

    def packed_forward(packed, grid, channels, grad_scratch=None):
        if grad_scratch is not None:  # the kernel zeroes the backward's scratch (.data: as a kernel writes,
            assert grad_scratch.shape == packed.shape  # without autograd's version counter)
            grad_scratch.data.zero_()
        return forward_of("packed_forward", unpacked)(packed, grid, channels)

    def backward(grad_out, packed, grid, need_input, need_grid, grad_scratch=None):
        result = backward_of("backward", unpacked)(grad_out, packed, grid, need_input, need_grid)
        calls[-1] += (grad_scratch is not None,)
        if grad_scratch is not None:  # a zeroed scratch, which the kernel's sums then spend
            assert need_input and not grad_scratch.any()
            grad_scratch.data.fill_(float("nan"))
        return result

    forward = forward_of("forward")
    shared_forward = forward_of("shared_forward")
    shared_backward = backward_of("shared_backward", lambda x, *_: x)

    ext = types.SimpleNamespace(grid_sample_forward=forward, grid_sample_pack=pack,
                                grid_sample_packed_forward=packed_forward, grid_sample_packed_backward=backward)
    if shared is not None:
        ext.grid_sample_shared_fits = lambda input: shared
        ext.grid_sample_shared_forward = shared_forward
        ext.grid_sample_shared_backward = shared_backward
    return ext


def _take_fake_module(monkeypatch, shared=None):
    """The stand-in module in place of the extension, taking every input -> the list its calls go to."""
    calls = []
    monkeypatch.setattr(cuda_ext, "module", lambda: _fake_module(calls, shared))
    monkeypatch.setattr(cuda_ext, "grid_sample_applies", lambda input, grid: True)
    return calls


@triton_run
@pytest.mark.parametrize("need", ["both", "input", "grid"])
def test_grid_sample_routes_through_the_extension(monkeypatch, need):
    """A stand-in module behind grid_sample_applies: grid_sample packs once, and its forward and backward call
    the module with the right arguments and hand back its results in the right places."""
    calls = _take_fake_module(monkeypatch)
    x, grid = _inputs((2, 3, 7, 9), (5, 6), "cpu")
    x.requires_grad_(need in ("both", "input"))
    grid.requires_grad_(need in ("both", "grid"))
    out = gs.grid_sample(x, grid, impl="triton")
    upstream = torch.randn(out.shape).to(memory_format=torch.channels_last)  # made contiguous on the way
    leaves = [t for t in (x, grid) if t.requires_grad]
    grads = torch.autograd.grad(out, leaves, upstream)
    ref_out, ref_gx, ref_gg = _reference(x, grid, upstream)
    # one pack; the forward zeroes a scratch for the input grad, when there is one to come
    assert calls == ["pack", "packed_forward", ("backward", x.requires_grad, grid.requires_grad, x.requires_grad)]
    torch.testing.assert_close(out, ref_out.float())
    for leaf, g in zip(leaves, grads):
        torch.testing.assert_close(g, (ref_gx if leaf is x else ref_gg).float())


@triton_run
def test_a_second_backward_takes_a_fresh_scratch(monkeypatch):
    """retain_graph: the forward's zeroed scratch holds the first backward's sums, so the second must not
    sum into it again (the stand-in fills a spent scratch with NaN)."""
    calls = _take_fake_module(monkeypatch)
    x, grid = _inputs((2, 3, 7, 9), (5, 6), "cpu")
    x.requires_grad_(True)
    out = gs.grid_sample(x, grid, impl="triton")
    upstream = torch.randn(out.shape)
    (first,) = torch.autograd.grad(out, x, upstream, retain_graph=True)
    (second,) = torch.autograd.grad(out, x, upstream)
    assert calls[2:] == [("backward", True, False, True), ("backward", True, False, False)]
    torch.testing.assert_close(second, first)


@triton_run
def test_no_grad_forward_does_not_pack(monkeypatch):
    calls = _take_fake_module(monkeypatch)
    x, grid = _inputs((2, 3, 7, 9), (5, 6), "cpu")
    out = gs.grid_sample(x, grid, impl="triton")
    assert calls == ["forward"]
    torch.testing.assert_close(out, gs.grid_sample_reference(x.double(), grid.double()).float())


@triton_run
def test_custom_op_backward_routes_through_the_extension(monkeypatch):
    """torch.compile's path: the forward op gathers from the planes; the backward op gets the input, not a
    packed copy, and packs it itself."""
    calls = _take_fake_module(monkeypatch)
    x, grid = _inputs((2, 3, 7, 9), (5, 6), "cpu")
    upstream = torch.randn(2, 3, 5, 6)
    kernels = cuda_ext.grid_sample_kernels(x, grid)
    out = gs._grid_sample_fwd(x, grid, kernels)
    gx, gg = gs._grid_sample_bwd(upstream, x, grid, True, True, kernels)
    ref_out, ref_gx, ref_gg = _reference(x, grid, upstream)
    assert calls == ["forward", "pack", ("backward", True, True, False)]
    torch.testing.assert_close(out, ref_out.float())
    torch.testing.assert_close(gx, ref_gx.float())
    torch.testing.assert_close(gg, ref_gg.float())


@triton_run
@pytest.mark.parametrize("need", ["both", "input", "grid"])
def test_images_in_shared_memory_take_the_shared_kernels(monkeypatch, need):
    """An image that fits, in a batch of SHARED_MIN_SAMPLES or more: no pack, the input itself saved, the
    shared-memory forward and backward called with the right arguments, their results handed back."""
    calls = _take_fake_module(monkeypatch, shared=True)
    monkeypatch.setattr(cuda_ext, "SHARED_MIN_SAMPLES", 2)
    x, grid = _inputs((2, 3, 7, 9), (5, 6), "cpu")
    x.requires_grad_(need in ("both", "input"))
    grid.requires_grad_(need in ("both", "grid"))
    out = gs.grid_sample(x, grid, impl="triton")
    upstream = torch.randn(out.shape)
    leaves = [t for t in (x, grid) if t.requires_grad]
    grads = torch.autograd.grad(out, leaves, upstream)
    ref_out, ref_gx, ref_gg = _reference(x, grid, upstream)
    assert calls == ["shared_forward", ("shared_backward", x.requires_grad, grid.requires_grad)]
    torch.testing.assert_close(out, ref_out.float())
    for leaf, g in zip(leaves, grads):
        torch.testing.assert_close(g, (ref_gx if leaf is x else ref_gg).float())
    calls.clear()  # the custom ops' path (torch.compile) and a forward with no backward to come
    gs._grid_sample_bwd(upstream, x.detach(), grid.detach(), True, True, cuda_ext.grid_sample_kernels(x, grid))
    with torch.no_grad():
        gs.grid_sample(x, grid, impl="triton")
    assert calls == [("shared_backward", True, True), "shared_forward"]


@triton_run
@pytest.mark.parametrize("fits, min_samples", [(False, 1), (True, 3)])
def test_shared_kernels_need_a_fit_and_enough_samples(monkeypatch, fits, min_samples):
    calls = _take_fake_module(monkeypatch, shared=fits)
    monkeypatch.setattr(cuda_ext, "SHARED_MIN_SAMPLES", min_samples)
    x, grid = _inputs((2, 3, 7, 9), (5, 6), "cpu")
    x.requires_grad_(True)
    out = gs.grid_sample(x, grid, impl="triton")
    torch.autograd.grad(out, x, torch.ones_like(out))
    assert calls == ["pack", "packed_forward", ("backward", True, False, True)]


def test_a_build_without_the_shared_kernels_takes_the_packed_ones(monkeypatch):
    monkeypatch.setattr(cuda_ext, "module", lambda: _fake_module([]))
    monkeypatch.setattr(cuda_ext, "SHARED_MIN_SAMPLES", 1)
    assert not cuda_ext.grid_sample_shared(torch.zeros(2, 3, 4, 4))


# ---------------------------------------------------------------------------------------------- GPU
needs_ext = pytest.mark.skipif(not torch.cuda.is_available() or cuda_ext.module() is None,
                               reason="needs CUDA and the built extension (OSTNET_BUILD_CUDA=1)")

# (input (B, C, H_in, W_in), output (H, W), exact): exact shapes are held to 1e-5 against float64. On larger
# images the fp32 pixel coordinate itself is off by up to ~1e-7 * W pixels (in PyTorch's fp32 kernel too),
# so those are held to the fp32 reference with test_grid_sample.py's GPU tolerances.
GPU_SHAPES = [
    ((3, 1, 37, 53), (29, 41), True),  # one channel, odd sizes
    ((2, 2, 7, 9), (5, 6), True),
    ((5, 3, 33, 47), (40, 31), True),  # upsampling: several outputs per input pixel
    ((4, 4, 1, 6), (2, 3), True),  # one row: the taps above and below read zeros
    ((3, 2, 9, 1), (4, 5), True),  # one column
    ((3, 2, 12, 20), (9, 11), True),  # planes of a multiple of 4 pixels: the 4-pixel unpack
    ((2, 1, 16, 4), (5, 7), True),
    ((2, 4, 8, 6), (7, 5), True),
    ((8, 3, 256, 256), (256, 256), False),  # the image warp
    ((128, 3, 64, 64), (64, 64), False),  # K+1 deformed sources, batch 8
]


def _poison_allocator():
    """Fill free memory of the caching allocator with NaN, in both of its pools (blocks under 1 MB come from
    the small one): outputs the kernels fail to write show up."""
    torch.empty(1 << 27, device="cuda").fill_(float("nan"))
    small = [torch.full((1 << 16,), float("nan"), device="cuda") for _ in range(64)]
    del small
    torch.cuda.synchronize()


def _take(shared, x, monkeypatch):
    """Send x's grid_sample to the shared-memory kernels (from one sample on) or to the packed ones (skip
    where the image does not fit in shared memory)."""
    monkeypatch.setattr(cuda_ext, "SHARED_MIN_SAMPLES", 1 if shared else 1 << 30)
    if shared and not cuda_ext.module().grid_sample_shared_fits(x):
        pytest.skip("the image does not fit in shared memory")
    assert cuda_ext.grid_sample_shared(x) == shared


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("in_shape,out_hw,exact", GPU_SHAPES)
def test_gpu_matches_reference(in_shape, out_hw, exact, shared, monkeypatch):
    x, grid, out, upstream = _sampled(in_shape, out_hw, in_shape[1], shared, monkeypatch)
    gx, gg = torch.autograd.grad(out, (x, grid), upstream)
    _assert_matches(x, grid, upstream, out, gx, gg, exact)


def _sampled(in_shape, out_hw, seed, shared, monkeypatch):
    """Inputs wanting grads, sampled by the extension's shared-memory or packed kernels on a poisoned
    allocator -> (x, grid, out, a random upstream grad)."""
    x, grid = _inputs(in_shape, out_hw, "cuda", seed=seed)
    assert cuda_ext.grid_sample_applies(x, grid)  # else this would test the Triton kernel
    _take(shared, x, monkeypatch)
    x.requires_grad_(True)
    grid.requires_grad_(True)
    _poison_allocator()
    out = gs.grid_sample(x, grid, impl="triton")
    return x, grid, out, torch.randn_like(out)


def _assert_matches(x, grid, upstream, out, gx, gg, exact):
    if exact:
        ref, ref_gx, ref_gg = _reference(x, grid, upstream)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        # 1e-5 of the largest input grad: an fp32 pixel coordinate is off by up to ~1e-7 W pixels, so a
        # tap weight by as much, times the upstream grads that meet in one input pixel
        torch.testing.assert_close(gx.double(), ref_gx, atol=1e-5 * max(1.0, ref_gx.abs().max().item()), rtol=1e-5)
        scale = ref_gg.abs().max().item()  # the grid grad of a tap on a cell edge can cancel to near 0
        torch.testing.assert_close(gg.double(), ref_gg, atol=1e-5 * scale, rtol=1e-4)
    else:
        xr = x.detach().requires_grad_(True)
        gr = grid.detach().requires_grad_(True)
        ref = gs.grid_sample_reference(xr, gr)
        ref_gx, ref_gg = torch.autograd.grad(ref, (xr, gr), upstream)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(gx, ref_gx, atol=8e-5, rtol=2e-5)
        torch.testing.assert_close(gg, ref_gg, atol=1e-4 * ref_gg.abs().max().item(), rtol=1e-3)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("in_shape,out_hw,exact", GPU_SHAPES)
def test_gpu_forward_without_grad_and_custom_op_backward(in_shape, out_hw, exact, shared, monkeypatch):
    """The other two entries: a forward with no backward to come (the NCHW-plane kernel, no pack), and the
    backward that torch.compile's custom op calls (it packs the input itself)."""
    x, grid = _inputs(in_shape, out_hw, "cuda", seed=in_shape[1] + 1)
    _take(shared, x, monkeypatch)
    _poison_allocator()
    with torch.no_grad():
        out = gs.grid_sample(x, grid, impl="triton")
    upstream = torch.randn_like(out)
    gx, gg = gs._grid_sample_bwd(upstream, x, grid, True, True, cuda_ext.grid_sample_kernels(x, grid))
    _assert_matches(x, grid, upstream, out, gx, gg, exact)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("need_input,need_grid", [(True, False), (False, True)])
def test_gpu_only_the_needed_grads(need_input, need_grid, shared):
    x, grid = _inputs((3, 3, 21, 17), (19, 23), "cuda", seed=5)
    upstream = torch.randn(3, 3, 19, 23, device="cuda")
    _poison_allocator()
    if shared:
        gx, gg = cuda_ext.grid_sample_shared_backward(upstream, x, grid, need_input, need_grid)
    else:
        gx, gg = cuda_ext.grid_sample_backward(upstream, cuda_ext.grid_sample_pack(x), grid, need_input, need_grid)
    _, ref_gx, ref_gg = _reference(x, grid, upstream)
    assert (gx is not None) == need_input and (gg is not None) == need_grid
    if need_input:
        torch.testing.assert_close(gx.double(), ref_gx, atol=1e-5, rtol=1e-5)
    if need_grid:
        torch.testing.assert_close(gg.double(), ref_gg, atol=1e-5 * ref_gg.abs().max().item(), rtol=1e-4)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("in_shape", [(3, 3, 33, 47), (3, 3, 32, 48)])  # the second: the 4-pixel unpack
@pytest.mark.parametrize("out_hw", [(3, 4), (40, 50)])
def test_gpu_backward_twice(in_shape, out_hw, monkeypatch):
    """retain_graph on the packed path: the forward zeroed the input grad's scratch (over every input pixel,
    also when the output has fewer pixels), the first backward spends it, the second takes a fresh one."""
    x, grid, out, upstream = _sampled(in_shape, out_hw, 11, False, monkeypatch)
    first = torch.autograd.grad(out, (x, grid), upstream, retain_graph=True)
    second = torch.autograd.grad(out, (x, grid), upstream)
    _assert_matches(x, grid, upstream, out, *first, exact=True)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("out_hw", [(2, 3), (60, 70), (0, 5)])  # fewer, more and no output pixels
def test_gpu_packed_forward_zeroes_the_scratch(out_hw):
    x, grid = _inputs((3, 2, 37, 53), out_hw, "cuda")
    ext = cuda_ext.module()
    packed = ext.grid_sample_pack(x)
    scratch = torch.full_like(packed, float("nan"))
    out = ext.grid_sample_packed_forward(packed, grid, 2, scratch)
    assert not scratch.any() and not scratch.isnan().any()
    torch.testing.assert_close(out, ext.grid_sample_packed_forward(packed, grid, 2))  # the same output


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (2, 3, 4, 6), (3, 1, 8, 8), (1, 4, 2, 2)])
@pytest.mark.parametrize("offset", [0, 1])
def test_gpu_pack_layout(shape, offset):
    """pack: channels-last, zeros past C, also from a view that starts one float into its storage."""
    n = math.prod(shape)
    x = torch.randn(n + 1, device="cuda")[offset:][:n].view(shape)
    packed = cuda_ext.module().grid_sample_pack(x)
    torch.testing.assert_close(packed, F.pad(x.permute(0, 2, 3, 1), (0, 4 - shape[1])), atol=0, rtol=0)


@pytest.mark.gpu
@needs_ext
def test_gpu_grid_far_outside_and_non_finite():
    x, grid = _inputs((2, 3, 8, 8), (4, 4), "cuda")
    grid[0, 0, 0] = torch.tensor([1e30, -1e30])
    grid[0, 0, 1] = torch.tensor([float("inf"), 0.0])
    grid[1, 2, 3] = torch.tensor([-3.0, 5.0])
    x.requires_grad_(True)
    out = gs.grid_sample(x, grid, impl="triton")
    assert not out[0, :, 0, :2].any() and not out[1, :, 2, 3].any()
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert gx.isfinite().all()


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("in_shape,out_hw", [((0, 3, 4, 4), (3, 3)), ((2, 3, 4, 4), (0, 3)), ((2, 3, 0, 4), (3, 3))])
def test_gpu_empty(in_shape, out_hw, shared, monkeypatch):
    x = torch.randn(in_shape, device="cuda", requires_grad=True)
    if shared and in_shape[0] == 0:
        pytest.skip("no samples: no block to run (the packed kernels take it)")
    _take(shared, x, monkeypatch)
    grid = torch.rand(in_shape[0], *out_hw, 2, device="cuda", requires_grad=True)
    out = gs.grid_sample(x, grid, impl="triton")
    assert out.shape == (in_shape[0], 3, *out_hw) and not out.any()
    gx, gg = torch.autograd.grad(out, (x, grid), torch.ones_like(out))
    assert gx.shape == x.shape and not gx.any() and gg.shape == grid.shape and not gg.any()


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("shared", [False, True])
def test_gpu_agrees_with_the_triton_kernel(shared, monkeypatch):
    x, grid = _inputs((4, 3, 45, 39), (41, 37), "cuda", seed=7)
    _take(shared, x, monkeypatch)
    x.requires_grad_(True)
    grid.requires_grad_(True)
    upstream = torch.randn(4, 3, 41, 37, device="cuda")
    results = []
    for off in (False, True):
        with cuda_ext.turned_off() if off else contextlib.nullcontext():
            out = gs.grid_sample(x, grid, impl="triton")
            results.append((out, *torch.autograd.grad(out, (x, grid), upstream)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5 * max(b.abs().max().item(), 1.0), rtol=1e-4)


@pytest.mark.gpu
@needs_ext
def test_gpu_bad_arguments_raise():
    ext = cuda_ext.module()
    x, grid = _inputs((1, 3, 4, 4), (3, 3), "cuda")
    packed = ext.grid_sample_pack(x)
    with pytest.raises(RuntimeError, match="fp32"):
        ext.grid_sample_pack(x.half())
    with pytest.raises(RuntimeError, match="1 to 4 channels"):
        ext.grid_sample_pack(torch.zeros(1, 5, 4, 4, device="cuda"))
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.grid_sample_pack(x.transpose(2, 3))
    with pytest.raises(RuntimeError, match="1 to 4 channels"):
        ext.grid_sample_forward(torch.zeros(1, 5, 4, 4, device="cuda"), grid)
    with pytest.raises(RuntimeError, match="grid must be"):
        ext.grid_sample_forward(x, grid[:, :, :, :1].contiguous())
    with pytest.raises(RuntimeError, match="packed must be"):
        ext.grid_sample_packed_forward(torch.zeros(1, 4, 4, 3, device="cuda"), grid, 3)
    with pytest.raises(RuntimeError, match="1 to 4 channels"):
        ext.grid_sample_packed_forward(packed, grid, 5)
    with pytest.raises(RuntimeError, match="grid must be"):
        ext.grid_sample_packed_forward(packed, grid[..., :1], 3)
    with pytest.raises(RuntimeError, match="grad_out"):
        ext.grid_sample_packed_backward(torch.zeros(1, 3, 2, 2, device="cuda"), packed, grid, True, True)
    with pytest.raises(RuntimeError, match="aligned"):
        ext.grid_sample_packed_forward(packed, torch.zeros(19, device="cuda")[1:].view(1, 3, 3, 2), 3)
    misaligned = torch.zeros(packed.numel() + 1, device="cuda")[1:].view(packed.shape)
    for scratch in (packed[:, :3].contiguous(), packed.double(), packed.transpose(1, 2), misaligned, packed):
        with pytest.raises(RuntimeError, match="grad_scratch must be"):
            ext.grid_sample_packed_forward(packed, grid, 3, scratch)
        with pytest.raises(RuntimeError, match="grad_scratch must be"):
            ext.grid_sample_packed_backward(torch.zeros(1, 3, 3, 3, device="cuda"), packed, grid, True, True, scratch)


@pytest.mark.gpu
@needs_ext
def test_gpu_which_images_take_the_shared_kernels():
    """By default: an image whose backward fits in a block's shared memory, in a batch of half the SMs or
    more (the benchmark's 16 x 3x64x64 at batch 8), not a 3x256x256 one (768 KB)."""
    small = torch.zeros(128, 3, 64, 64, device="cuda")
    large = torch.zeros(8, 3, 256, 256, device="cuda")
    assert cuda_ext.module().grid_sample_shared_fits(small) and not cuda_ext.module().grid_sample_shared_fits(large)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert cuda_ext.grid_sample_shared(small) == (128 >= sms // 2)
    assert not cuda_ext.grid_sample_shared(small[:sms // 2 - 1]) and not cuda_ext.grid_sample_shared(large)
    grid = torch.zeros(8, 4, 4, 2, device="cuda")
    with pytest.raises(RuntimeError, match="does not fit in shared memory"):
        cuda_ext.module().grid_sample_shared_forward(large, grid)
    with pytest.raises(RuntimeError, match="grad_out"):
        cuda_ext.module().grid_sample_shared_backward(torch.zeros(8, 2, 4, 4, device="cuda"), large[:, :, :8, :8]
                                                      .contiguous(), grid, True, True)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("shared,hw", [(False, (33, 35)), (True, (33, 35)), (True, (64, 64))])
def test_gpu_cuda_graph_replay(shared, hw, monkeypatch):
    """Forward + backward captured in a CUDA graph (as the fused path runs its frames), replayed on new data:
    the extension allocates through torch and launches on the current stream. 64x64: the shared-memory
    backward's 96 KB, over the default 48 KB, so its launch opts in (cudaFuncSetAttribute) under capture."""
    x, grid = _inputs((2, 3, *hw), (31, 29), "cuda", seed=9)
    _take(shared, x, monkeypatch)
    x.requires_grad_(True)
    grid.requires_grad_(True)
    upstream = torch.randn(2, 3, 31, 29, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture
        out = gs.grid_sample(x, grid, impl="triton")
        torch.autograd.grad(out, (x, grid), upstream)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gs.grid_sample(x, grid, impl="triton")
        gx, gg = torch.autograd.grad(out, (x, grid), upstream)
    x2, grid2 = _inputs((2, 3, *hw), (31, 29), "cuda", seed=10)
    with torch.no_grad():
        x.copy_(x2)
        grid.copy_(grid2)
    graph.replay()
    torch.cuda.synchronize()
    _assert_matches(x, grid, upstream, out, gx, gg, exact=hw[1] < 64)
