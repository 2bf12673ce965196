"""tps_warp: the fused Triton kernel (TPS map in registers + bilinear sampling, fused backward to the image
and the control points) against the reference (tps_grid_reference + grid_sample_reference).

CPU runs need TRITON_INTERPRET=1 in the environment before the package is imported (the Makefile and
.ci/run export it). The kernel supports float64, so exactness and gradcheck run in float64.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from ostnet_fast.kernels import _triton_utils as tu
from tests.conftest import requires_triton_run

# The package re-exports the functions under the modules' names: fetch the modules themselves.
tw = importlib.import_module("ostnet_fast.kernels.tps_warp")
tg = importlib.import_module("ostnet_fast.kernels.tps_grid")
gs = importlib.import_module("ostnet_fast.kernels.grid_sample")

triton_run = requires_triton_run()
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 7.8e-3}


def fiducials(rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, 2) regular layout over [-1, 1]^2 in float64, as the model's fiducial_layout."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, rows, dtype=torch.float64),
                          torch.linspace(-1, 1, cols, dtype=torch.float64), indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=1).to(DEV)


def _case(image_shape, layout, dtype=torch.float64, channels_last=False, seed=0, spread=0.2, device=DEV):
    """-> image, control (B, T, 2), target (T, 2), coef (T+3, T). Spread 0.2 pushes some samples outside."""
    gen = torch.Generator().manual_seed(seed)
    target = fiducials(*layout).to(device)
    coef = tg.tps_solve(target).to(device)
    control = target + spread * torch.randn((image_shape[0], *target.shape), generator=gen, dtype=torch.float64
                                            ).to(device)
    image = (-2.3 + 0.5 * torch.randn(image_shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)
    if channels_last:
        image = image.to(memory_format=torch.channels_last)
    work = dtype if dtype == torch.float64 else torch.float32
    return image, control.to(work), target.to(work), coef.to(work)


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(tu, "POISON_OUTPUTS", True)


CASES = [  # (image (B, C, H_in, W_in), fiducials rows x cols, output size or None = the input's)
    ((1, 1, 8, 8), (2, 3), None),  # minimal
    ((2, 3, 7, 9), (4, 5), (5, 6)),  # odd sizes, the model's T = 20, output smaller than input
    ((2, 4, 37, 53), (4, 5), None),  # odd H/W, several programs per sample
    ((3, 11, 6, 5), (2, 2), (9, 4)),  # C not a multiple of the channel chunk, upsampling, T = 4
    ((6, 2, 5, 7), (2, 3), None),  # backward: two groups of 4 samples, the second partial; forward: three pairs
    ((8, 3, 6, 9), (4, 5), (5, 7)),  # B % 4 == 0: the forward maps four samples a program
]


@triton_run
@pytest.mark.parametrize("image_shape,layout,size", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_matches_reference_float64(image_shape, layout, size, channels_last, poisoned):
    image, control, target, coef = _case(image_shape, layout, channels_last=channels_last)
    out = tw.tps_warp(image, control, target, coef, size, impl="triton")
    out_hw = tuple(image_shape[2:]) if size is None else size
    assert not out.isnan().any(), f"{int(out.isnan().sum())} output elements never written"
    assert out.shape == (*image_shape[:2], *out_hw) and out.dtype == image.dtype
    if channels_last and image_shape[1] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last), "output must keep the image's format"
    torch.testing.assert_close(out, tw.tps_warp_reference(image, control, target, coef, size), atol=1e-10, rtol=0)


def _ref_grads(image, control, target, coef, size, upstream):
    img = image.detach().double().requires_grad_(True)
    c = control.detach().double().requires_grad_(True)
    out = tw.tps_warp_reference(img, c, target.double(), coef.double(), size)
    return torch.autograd.grad(out, (img, c), upstream.double())


@triton_run
@pytest.mark.parametrize("image_shape,layout,size", CASES[1:])
@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_matches_reference_float64(image_shape, layout, size, channels_last, poisoned):
    image, control, target, coef = _case(image_shape, layout, channels_last=channels_last, seed=1)
    image.requires_grad_(True)
    control.requires_grad_(True)
    out = tw.tps_warp(image, control, target, coef, size, impl="triton")
    upstream = torch.randn(out.shape, dtype=torch.float64, device=out.device)  # one shared upstream grad
    g_image, g_control = torch.autograd.grad(out, (image, control), upstream)
    ref_image, ref_control = _ref_grads(image, control, target, coef, size, upstream)
    assert g_image.dtype == image.dtype and g_control.dtype == control.dtype
    torch.testing.assert_close(g_image, ref_image, atol=1e-10, rtol=0)
    torch.testing.assert_close(g_control, ref_control, atol=1e-8, rtol=1e-9)


@triton_run
@pytest.mark.parametrize("need", ["image", "control"])
def test_backward_only_needed_grads(need):
    image, control, target, coef = _case((2, 3, 7, 9), (4, 5), seed=2)
    leaf = image if need == "image" else control
    leaf.requires_grad_(True)
    out = tw.tps_warp(image, control, target, coef, (6, 8), impl="triton")
    upstream = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, leaf, upstream)
    ref_image, ref_control = _ref_grads(image, control, target, coef, (6, 8), upstream)
    torch.testing.assert_close(g, ref_image if need == "image" else ref_control, atol=1e-8, rtol=1e-9)


@triton_run
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_float64(channels_last):
    image, control, target, coef = _case((2, 2, 5, 6), (2, 3), channels_last=channels_last, seed=3)
    image.requires_grad_(True)
    control.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda i, c: tw.tps_warp(i, c, target, coef, (4, 5), impl="triton"),
                                    (image, control), fast_mode=True)


@triton_run
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_returns_the_input(dtype):
    image, _, target, coef = _case((2, 3, 9, 13), (4, 5), dtype=dtype)
    control = target.expand(2, *target.shape)
    out = tw.tps_warp(image, control, target, coef, impl="triton")
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, image, atol=tol, rtol=tol)


@triton_run
def test_fused_equals_grid_then_sample():
    """The fused kernel == the two Triton kernels in sequence (grid written to memory)."""
    image, control, target, coef = _case((2, 3, 10, 12), (4, 5), seed=4)
    grid = tg.tps_grid(control, target, coef, (7, 9), impl="triton")
    two_step = gs.grid_sample(image, grid, impl="triton")
    torch.testing.assert_close(tw.tps_warp(image, control, target, coef, (7, 9), impl="triton"), two_step,
                               atol=1e-12, rtol=0)


@triton_run
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_precision(dtype, channels_last):
    """Image in fp16/bf16, control points fp32: our error against the fp64 reference of the same (rounded)
    image is at most twice PyTorch's own (grid_sample at this precision) plus atol."""
    image, control, target, coef = _case((2, 5, 9, 11), (4, 5), dtype=dtype, channels_last=channels_last, seed=5)
    image.requires_grad_(True)
    control.requires_grad_(True)
    out = tw.tps_warp(image, control, target, coef, (7, 8), impl="triton")
    assert out.dtype == dtype
    exact = tw.tps_warp_reference(image.detach().double(), control.detach().double(), target.double(),
                                  coef.double(), (7, 8))
    grid = tg.tps_grid_reference(control.detach(), target, coef, (7, 8))
    torch_out = F.grid_sample(image.detach(), grid.to(dtype), align_corners=True)
    torch_err = (torch_out.double() - exact).abs().max()
    ours_err = (out.detach().double() - exact).abs().max()
    assert ours_err <= 2 * torch_err + TOL[dtype], f"ours {ours_err:.3g} vs PyTorch {torch_err:.3g} ({dtype})"
    upstream = torch.randn(out.shape, device=out.device).to(dtype)
    g_image, g_control = torch.autograd.grad(out, (image, control), upstream)
    assert g_image.dtype == dtype and g_control.dtype == control.dtype
    ref_image, ref_control = _ref_grads(image, control, target, coef, (7, 8), upstream)
    torch.testing.assert_close(g_image.double(), ref_image, atol=TOL[dtype], rtol=TOL[dtype])
    scale = ref_control.abs().max().item()
    torch.testing.assert_close(g_control.double(), ref_control, atol=1e-4 * scale, rtol=1e-4)


def test_auto_on_cpu_takes_reference(monkeypatch):
    def boom(*args):
        raise AssertionError("auto must not take the Triton path on CPU tensors")
    monkeypatch.setattr(tw.TpsWarpFn, "apply", boom)
    image, control, target, coef = _case((1, 2, 5, 6), (2, 3), dtype=torch.float32, device="cpu")
    torch.testing.assert_close(tw.tps_warp(image, control, target, coef),
                               tw.tps_warp_reference(image, control, target, coef), atol=0, rtol=0)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    image, control, target, coef = _case((1, 2, 5, 6), (2, 3), dtype=torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tw.tps_warp(image, control, target, coef, impl="triton")


def test_bad_arguments_raise():
    image, control, target, coef = _case((2, 2, 5, 6), (2, 3), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"\(1, 2, 5, 6\)"):
        tw.tps_warp(image[:1], control, target, coef)
    with pytest.raises(ValueError, match=r"\(2, 5, 2\)"):
        tw.tps_warp(image, control[:, :5], target, coef)


# ---------------------------------------------------------------------------------------------- GPU
GPU_CASES = [  # image (B, C, H_in, W_in), output size
    ((8, 3, 256, 256), None),  # the model's driving-frame warp
    ((8, 3, 64, 64), None),  # small frames
    ((8, 64, 64, 64), (64, 64)),  # feature maps
    ((8, 256, 64, 64), (48, 80)),  # wide features, resized output
    ((5, 7, 97, 131), (61, 77)),  # odd everything
]


@pytest.mark.gpu
@pytest.mark.parametrize("image_shape,size", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_forward_backward(image_shape, size, dtype, channels_last):
    # Truth: the reference in float64. fp32 TPS arithmetic moves sample points by ~1e-6 of the frame, which
    # on a 256-px random-noise image is ~1e-3 in value, for the reference as much as for us. So, as
    # flash-attention does: our error vs the float64 truth <= 2x PyTorch's own error at this precision + atol.
    image, control, target, coef = _case(image_shape, (4, 5), dtype=dtype, channels_last=channels_last, seed=6,
                                         device="cuda")
    image.requires_grad_(True)
    control.requires_grad_(True)
    out = tw.tps_warp(image, control, target, coef, size, impl="triton")
    assert out.dtype == dtype and not out.isnan().any()
    upstream = torch.randn(out.shape, device="cuda").to(dtype)
    ours = (out, *torch.autograd.grad(out, (image, control), upstream))

    def reference(dt):
        img = image.detach().to(dt).requires_grad_(True)
        c = control.detach().to(dt).requires_grad_(True)
        ref = tw.tps_warp_reference(img, c, target.to(dt), coef.to(dt), size)
        return (ref, *torch.autograd.grad(ref, (img, c), upstream.to(dt)))

    truth, theirs = reference(torch.float64), reference(dtype)
    atol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 7.8e-3}[dtype]
    for name, o, t, r in zip(("output", "grad image", "grad control"), ours, theirs, truth):
        scale = max(1.0, r.abs().max().item())
        err_ours = (o.double() - r).abs().max().item()
        err_torch = (t.double() - r).abs().max().item()
        assert err_ours <= 2 * err_torch + atol * scale, f"{name}: ours {err_ours:.3g} vs PyTorch {err_torch:.3g}"
