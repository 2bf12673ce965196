"""grid_sample: the Triton kernel (forward + fused backward) against the PyTorch reference.

CPU runs need TRITON_INTERPRET=1 in the environment before the package is imported (the Makefile and
.ci/run export it); without it, and without CUDA, the Triton-path tests are skipped. The kernel supports
float64, so exactness is checked in float64 and gradcheck runs in float64.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from ostnet_fast.kernels import _triton_utils as tu
from ostnet_fast.kernels import cuda_ext
from tests.conftest import requires_triton_run

# The package re-exports the function `grid_sample` under the module's name: fetch the module itself.
gs = importlib.import_module("ostnet_fast.kernels.grid_sample")

triton_run = requires_triton_run()
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

# Per-dtype tolerances (atol = rtol) for comparisons against an fp32/fp64 reference.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 7.8e-3}

SHAPES = [  # (input (B, C, H_in, W_in), output (H, W))
    ((1, 1, 8, 8), (8, 8)),  # minimal
    ((2, 3, 7, 9), (5, 6)),  # odd sizes, batch > 1
    ((2, 5, 37, 53), (37, 53)),  # odd H/W, several programs per sample
    ((3, 4, 1, 6), (2, 3)),  # single-row input: taps above/below read zeros
    ((2, 11, 6, 5), (4, 7)),  # C not a multiple of the channel chunk
]


@pytest.fixture(autouse=True)
def _triton_only():
    """This file tests the Triton kernels: where the CUDA extension is built it would take the NCHW fp32
    inputs of 1-4 channels (test_grid_sample_cuda_ext.py tests it)."""
    with cuda_ext.turned_off():
        yield


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernels must overwrite starts as NaN."""
    monkeypatch.setattr(tu, "POISON_OUTPUTS", True)


def _inputs(in_shape, out_hw, dtype, channels_last=False, seed=0, device=DEV):
    gen = torch.Generator().manual_seed(seed)
    b = in_shape[0]
    x = -2.3 + 0.5 * torch.randn(in_shape, generator=gen, dtype=torch.float64)  # off-centre values
    grid = -1.3 + 2.6 * torch.rand((b, *out_hw, 2), generator=gen, dtype=torch.float64)  # 15% outside [-1, 1]
    x = x.to(device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, grid.to(device=device, dtype=dtype if dtype == torch.float64 else torch.float32)


def _ref_grads(x, grid, upstream):
    xr = x.detach().double().requires_grad_(True)
    gr = grid.detach().double().requires_grad_(True)
    out = gs.grid_sample_reference(xr, gr)
    gx, gg = torch.autograd.grad(out, (xr, gr), upstream.double())
    return out.detach(), gx, gg


@triton_run
@pytest.mark.parametrize("in_shape,out_hw", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_matches_reference_float64(in_shape, out_hw, channels_last, poisoned):
    torch.manual_seed(0)
    x, grid = _inputs(in_shape, out_hw, torch.float64, channels_last)
    out = gs.grid_sample(x, grid, impl="triton")
    assert not out.isnan().any(), f"{int(out.isnan().sum())} output elements never written"
    assert out.dtype == x.dtype and out.shape == (in_shape[0], in_shape[1], *out_hw)
    if channels_last and in_shape[1] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last), "output must keep the input's format"
    else:
        assert out.is_contiguous()
    torch.testing.assert_close(out, gs.grid_sample_reference(x, grid), atol=TOL[torch.float64], rtol=0)


@triton_run
def test_non_dense_input_is_copied():
    x, grid = _inputs((2, 6, 9, 7), (4, 5), torch.float64)
    x = x[:, ::2]  # strided channels: neither NCHW- nor channels-last-dense
    torch.testing.assert_close(gs.grid_sample(x, grid, impl="triton"), gs.grid_sample_reference(x, grid),
                               atol=TOL[torch.float64], rtol=0)


@triton_run
def test_grid_far_outside_reads_zeros():
    x, grid = _inputs((1, 2, 5, 6), (3, 4), torch.float64)
    grid = grid.sign() * (3.0 + grid.abs() * 1e6)  # far outside, huge coordinates
    grid[0, 0, 0] = torch.tensor([float("inf"), -float("inf")])
    out = gs.grid_sample(x, grid, impl="triton")
    assert torch.equal(out, torch.zeros_like(out))


@triton_run
@pytest.mark.parametrize("in_shape,out_hw", SHAPES[1:4] + [
    ((2, 32, 5, 6), (4, 7)),  # NCHW from CHANNELS_LAST_BWD_FROM channels: the backward on a channels-last copy
    ((1, 16, 3, 4), (5, 2)),
    ((2, 17, 5, 6), (4, 7)),  # not a multiple of 16: the channels-last scratch
    ((2, 16, 1, 1), (3, 2)),  # a 1x1 map is both layouts at once: no copy (and no endless recursion)
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_matches_reference_float64(in_shape, out_hw, channels_last, poisoned):
    torch.manual_seed(1)
    x, grid = _inputs(in_shape, out_hw, torch.float64, channels_last, seed=1)
    x.requires_grad_(True)
    grid.requires_grad_(True)
    out = gs.grid_sample(x, grid, impl="triton")
    upstream = torch.randn(out.shape, dtype=torch.float64, device=out.device)  # one shared upstream grad
    gx, gg = torch.autograd.grad(out, (x, grid), upstream)
    ref_out, ref_gx, ref_gg = _ref_grads(x, grid, upstream)
    torch.testing.assert_close(out.detach(), ref_out, atol=TOL[torch.float64], rtol=0)
    torch.testing.assert_close(gx, ref_gx, atol=TOL[torch.float64], rtol=0)
    torch.testing.assert_close(gg, ref_gg, atol=1e-9, rtol=1e-10)
    assert gx.dtype == x.dtype and gg.dtype == grid.dtype
    assert gx.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@triton_run
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("channels", [5, 17])
def test_backward_reads_the_upstream_grad_in_its_own_layout(channels_last, channels, poisoned):
    """The upstream grad in the other memory format than the input's (autograd may hand either)."""
    x, grid = _inputs((2, channels, 6, 7), (5, 4), torch.float64, channels_last, seed=3)
    x.requires_grad_(True)
    grid.requires_grad_(True)
    out = gs.grid_sample(x, grid, impl="triton")
    upstream = torch.randn(out.shape, dtype=torch.float64, device=out.device)
    upstream = upstream.contiguous() if channels_last else upstream.contiguous(memory_format=torch.channels_last)
    gx, gg = torch.autograd.grad(out, (x, grid), upstream)
    _, ref_gx, ref_gg = _ref_grads(x, grid, upstream)
    torch.testing.assert_close(gx, ref_gx, atol=TOL[torch.float64], rtol=0)
    torch.testing.assert_close(gg, ref_gg, atol=1e-9, rtol=1e-10)


@triton_run
@pytest.mark.parametrize("in_shape, out_hw", [((0, 16, 4, 4), (3, 3)), ((2, 16, 0, 4), (3, 3)), ((2, 16, 4, 4), (0, 3))])
def test_backward_of_empty_tensors(in_shape, out_hw):
    x = torch.randn(in_shape, dtype=torch.float64, device=DEV, requires_grad=True)
    grid = torch.rand(in_shape[0], *out_hw, 2, dtype=torch.float64, device=DEV, requires_grad=True)
    out = gs.grid_sample(x, grid, impl="triton")
    gx, gg = torch.autograd.grad(out, (x, grid), torch.ones_like(out), allow_unused=True)
    assert gx.shape == x.shape and not gx.any() and gg.shape == grid.shape and not gg.any()


@triton_run
@pytest.mark.parametrize("need", ["input", "grid"])
def test_backward_only_needed_grads(need):
    x, grid = _inputs((2, 3, 7, 9), (5, 6), torch.float64)
    leaf = x if need == "input" else grid
    leaf.requires_grad_(True)
    out = gs.grid_sample(x, grid, impl="triton")
    upstream = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, leaf, upstream)
    _, ref_gx, ref_gg = _ref_grads(x, grid, upstream)
    torch.testing.assert_close(g, ref_gx if need == "input" else ref_gg, atol=1e-9, rtol=1e-10)


@triton_run
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_float64(channels_last):
    x, grid = _inputs((2, 3, 4, 5), (3, 3), torch.float64, channels_last, seed=3)
    x.requires_grad_(True)
    grid.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, g: gs.grid_sample(a, g, impl="triton"), (x, grid),
                                    fast_mode=True)


@triton_run
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_precision(dtype, channels_last):
    """Our error against an fp32 reference is at most twice PyTorch's own at this precision, + atol."""
    torch.manual_seed(2)
    x, grid = _inputs((2, 5, 9, 11), (7, 6), dtype, channels_last, seed=2)
    x.requires_grad_(True)
    grid.requires_grad_(True)
    out = gs.grid_sample(x, grid, impl="triton")
    assert out.dtype == dtype
    ref = gs.grid_sample_reference(x.detach().float(), grid.detach())
    torch_err = (F.grid_sample(x.detach(), grid.detach().to(dtype), align_corners=True).float() - ref).abs().max()
    ours_err = (out.detach().float() - ref).abs().max()
    assert ours_err <= 2 * torch_err + TOL[dtype], f"ours {ours_err:.3g} vs PyTorch {torch_err:.3g} ({dtype})"
    upstream = torch.randn(out.shape, dtype=torch.float32, device=out.device).to(dtype)
    gx, gg = torch.autograd.grad(out, (x, grid), upstream)
    assert gx.dtype == dtype and gg.dtype == grid.dtype
    _, ref_gx, ref_gg = _ref_grads(x, grid, upstream)
    torch.testing.assert_close(gx.double(), ref_gx, atol=TOL[dtype], rtol=TOL[dtype])
    scale = ref_gg.abs().max().item()
    torch.testing.assert_close(gg.double(), ref_gg, atol=TOL[torch.float32] * scale, rtol=TOL[torch.float32])


@triton_run
def test_identity_grid_backward_is_upstream():
    """An identity grid samples pixel centres exactly: out = input and d input = upstream."""
    from ostnet_fast.kernels.geometry import pixel_coordinates
    x, _ = _inputs((2, 3, 5, 7), (5, 7), torch.float64)
    grid = pixel_coordinates((5, 7), device=x.device, dtype=torch.float64).expand(2, 5, 7, 2).contiguous()
    x.requires_grad_(True)
    out = gs.grid_sample(x, grid, impl="triton")
    upstream = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, upstream)
    torch.testing.assert_close(out.detach(), x.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(gx, upstream, atol=1e-12, rtol=0)


def test_auto_on_cpu_takes_reference(monkeypatch):
    def boom(*args):
        raise AssertionError("auto must not take the Triton path on CPU tensors")
    monkeypatch.setattr(gs.GridSampleFn, "apply", boom)
    x, grid = _inputs((1, 2, 4, 4), (3, 3), torch.float32, device="cpu")
    torch.testing.assert_close(gs.grid_sample(x, grid), gs.grid_sample_reference(x, grid), atol=0, rtol=0)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, grid = _inputs((1, 2, 4, 4), (3, 3), torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        gs.grid_sample(x, grid, impl="triton")


def test_bad_arguments_raise():
    x, grid = _inputs((2, 2, 4, 4), (3, 3), torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"\(2, 3, 3, 2\)"):
        gs.grid_sample(x[:, 0], grid)
    with pytest.raises(ValueError, match="impl"):
        gs.grid_sample(x, grid, impl="cuda")


@triton_run
def test_integer_input_raises():
    x, grid = _inputs((1, 2, 4, 4), (3, 3), torch.float32)
    with pytest.raises(TypeError, match="int64"):
        gs.grid_sample(x.long(), grid, impl="triton")


# ---------------------------------------------------------------------------------------------- GPU
GPU_SHAPES = [  # input (B, C, H_in, W_in), output (H, W)
    ((8, 3, 256, 256), (256, 256)),  # image warp
    ((128, 3, 64, 64), (64, 64)),  # K+1 deformed sources, batch 8
    ((8, 64, 64, 64), (64, 64)),  # feature map
    ((8, 256, 64, 64), (64, 64)),  # bottleneck features
    ((8, 97, 33, 47), (29, 51)),  # odd everything
]


@pytest.mark.gpu
@pytest.mark.parametrize("in_shape,out_hw", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_forward_backward(in_shape, out_hw, dtype, channels_last):
    torch.manual_seed(4)
    x, grid = _inputs(in_shape, out_hw, dtype, channels_last, seed=4, device="cuda")
    x.requires_grad_(True)
    grid.requires_grad_(True)
    out = gs.grid_sample(x, grid, impl="triton")
    assert out.dtype == dtype and not out.isnan().any()
    upstream = torch.randn(out.shape, device="cuda").to(dtype)
    gx, gg = torch.autograd.grad(out, (x, grid), upstream)
    xr = x.detach().float().requires_grad_(True)
    gr = grid.detach().float().requires_grad_(True)
    ref = gs.grid_sample_reference(xr, gr)
    ref_gx, ref_gg = torch.autograd.grad(ref, (xr, gr), upstream.float())
    tol = max(TOL[dtype], 2e-5)
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(gx.float(), ref_gx, atol=tol * 4, rtol=tol)
    scale = ref_gg.abs().max().item()
    torch.testing.assert_close(gg.float(), ref_gg, atol=1e-4 * scale, rtol=1e-3)
