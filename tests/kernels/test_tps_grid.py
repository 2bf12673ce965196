"""tps_grid: the Triton kernel (per-pixel radial basis, fused params backward) against the reference, and
TPS analytic truths.

CPU runs need TRITON_INTERPRET=1 in the environment before the package is imported (the Makefile and
.ci/run export it). The kernel supports float64, so exactness and gradcheck run in float64.
"""
import importlib

import pytest
import torch

from ostnet_fast.kernels import _triton_utils as tu
from ostnet_fast.kernels.geometry import pixel_coordinates
from tests.conftest import requires_triton_run

# The package re-exports the function `tps_grid` under the module's name: fetch the module itself.
tg = importlib.import_module("ostnet_fast.kernels.tps_grid")

triton_run = requires_triton_run()
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 7.8e-3}


def fiducials(rows: int, cols: int, dtype=torch.float64, device=DEV) -> torch.Tensor:
    """(rows * cols, 2) regular layout over [-1, 1]^2, as the model's fiducial_layout."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, rows, dtype=torch.float64),
                          torch.linspace(-1, 1, cols, dtype=torch.float64), indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=1).to(device=device, dtype=dtype)


def _case(b, rows, cols, dtype=torch.float64, seed=0, spread=0.15):
    gen = torch.Generator().manual_seed(seed)
    target = fiducials(rows, cols)
    coef = tg.tps_solve(target).to(DEV)  # (T+3, T) float64
    control = target + spread * torch.randn((b, *target.shape), generator=gen, dtype=torch.float64).to(DEV)
    return control.to(dtype), target.to(dtype), coef.to(dtype)


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(tu, "POISON_OUTPUTS", True)


CASES = [  # (B, rows x cols fiducials, output (H, W))
    (1, (2, 3), (8, 8)),  # minimal: T = 6
    (2, (4, 5), (37, 53)),  # the model's T = 20, odd H/W, several programs
    (3, (2, 2), (5, 1)),  # single column, T = 4
    (2, (3, 7), (6, 9)),  # T = 21 (not a power of two)
    (6, (2, 3), (5, 7)),  # backward: two groups of 4 samples, the second partial; forward: three pairs
    (8, (4, 5), (6, 7)),  # B % 4 == 0: the forward maps four samples a program
]


@triton_run
@pytest.mark.parametrize("b,layout,size", CASES)
def test_forward_matches_reference_float64(b, layout, size, poisoned):
    control, target, coef = _case(b, *layout)
    grid = tg.tps_grid(control, target, coef, size, impl="triton")
    assert not grid.isnan().any(), f"{int(grid.isnan().sum())} grid elements never written"
    assert grid.shape == (b, *size, 2) and grid.dtype == torch.float64
    torch.testing.assert_close(grid, tg.tps_grid_reference(control, target, coef, size), atol=1e-12, rtol=0)


@triton_run
def test_forward_float32_within_twice_reference_error():
    """fp32 kernel vs the fp64 reference: at most twice the fp32 reference's own error, + 1e-6."""
    control, target, coef = _case(2, 4, 5, seed=1)
    exact = tg.tps_grid_reference(control, target, coef, (21, 19))
    ours = tg.tps_grid(control.float(), target.float(), coef.float(), (21, 19), impl="triton")
    ref32 = tg.tps_grid_reference(control.float(), target.float(), coef.float(), (21, 19))
    ours_err = (ours.double() - exact).abs().max()
    ref_err = (ref32.double() - exact).abs().max()
    assert ours.dtype == torch.float32
    assert ours_err <= 2 * ref_err + 1e-6, f"ours {ours_err:.3g} vs reference fp32 {ref_err:.3g}"


@triton_run
@pytest.mark.parametrize("b,layout,size", CASES[:3] + CASES[4:])
def test_backward_matches_reference_float64(b, layout, size, poisoned):
    control, target, coef = _case(b, *layout, seed=2)
    control.requires_grad_(True)
    grid = tg.tps_grid(control, target, coef, size, impl="triton")
    upstream = torch.randn(grid.shape, dtype=torch.float64, device=grid.device)  # one shared upstream grad
    (ours,) = torch.autograd.grad(grid, control, upstream)
    ref = tg.tps_grid_reference(control, target, coef, size)
    (expected,) = torch.autograd.grad(ref, control, upstream)
    assert ours.dtype == control.dtype
    torch.testing.assert_close(ours, expected, atol=1e-9, rtol=1e-10)


@triton_run
def test_gradcheck_float64():
    control, target, coef = _case(2, 2, 3, seed=3)
    control.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: tg.tps_grid(c, target, coef, (4, 5), impl="triton"), (control,),
                                    fast_mode=True)


@triton_run
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_gives_pixel_coordinates(dtype):
    """control == target -> the identity map: grid == pixel coordinates (1e-5 in fp32)."""
    _, target, coef = _case(1, 4, 5)
    control = target.expand(2, *target.shape).to(dtype)
    grid = tg.tps_grid(control, target.to(dtype), coef.to(dtype), (9, 13), impl="triton")
    expected = pixel_coordinates((9, 13), device=grid.device, dtype=torch.float64).expand(2, 9, 13, 2)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(grid.double(), expected, atol=tol, rtol=0)


@triton_run
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_interpolation_at_control_points(dtype):
    """Targets on pixel centres: the grid at those pixels is the control points (f(t_i) = c_i)."""
    # 3 x 5 fiducials on a 5 x 9 output: x in {-1, -.5, 0, .5, 1} = columns 0, 2, 4, 6, 8; y rows 0, 2, 4.
    control, target, coef = _case(2, 3, 5, seed=4, spread=0.3)
    grid = tg.tps_grid(control.to(dtype), target.to(dtype), coef.to(dtype), (5, 9), impl="triton")
    rows = ((target[:, 1] + 1) * 2).round().long()
    cols = ((target[:, 0] + 1) * 4).round().long()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(grid[:, rows, cols].double(), control, atol=tol, rtol=0)


@triton_run
def test_pure_scale_has_zero_radial_weights():
    """An affine map of the targets (scale + shift) -> zero radial weights, and the grid is that map."""
    _, target, coef = _case(1, 4, 5)
    control = torch.stack([0.7 * target + 0.1, 1.3 * target - 0.05])  # (2, T, 2)
    params = tg.tps_params(control, coef)  # (B, T+3, 2)
    t = target.shape[0]
    assert params[:, :t].abs().max() < 1e-12, "radial weights must vanish for an affine map"
    grid = tg.tps_grid(control, target, coef, (7, 11), impl="triton")
    p = pixel_coordinates((7, 11), device=grid.device, dtype=torch.float64)
    expected = torch.stack([0.7 * p + 0.1, 1.3 * p - 0.05])
    torch.testing.assert_close(grid, expected, atol=1e-12, rtol=0)


def test_per_pixel_reference_matches_matrix_form():
    """tps_grid_reference (per pixel) == tps_grid_matrix A @ C (the ONNX form), in float64."""
    control, target, coef = _case(3, 4, 5, seed=5)
    control, target, coef = control.cpu(), target.cpu(), coef.cpu()
    a = tg.tps_grid_matrix(target, coef, (13, 17))  # (HW, T)
    by_matrix = (a @ control).view(3, 13, 17, 2)
    torch.testing.assert_close(tg.tps_grid_reference(control, target, coef, (13, 17)), by_matrix,
                               atol=1e-12, rtol=0)


@triton_run
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_control_points(dtype):
    control, target, coef = _case(2, 4, 5, seed=6)
    control = control.to(dtype).requires_grad_(True)
    grid = tg.tps_grid(control, target.float(), coef.float(), (11, 12), impl="triton")
    assert grid.dtype == dtype
    exact = tg.tps_grid_reference(control.detach().double(), target, coef, (11, 12))
    torch.testing.assert_close(grid.double(), exact, atol=TOL[dtype], rtol=TOL[dtype])
    upstream = torch.randn(grid.shape, device=grid.device).to(dtype)
    (ours,) = torch.autograd.grad(grid, control, upstream)
    assert ours.dtype == dtype
    c64 = control.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad(tg.tps_grid_reference(c64, target, coef, (11, 12)), c64, upstream.double())
    scale = expected.abs().max().item()
    torch.testing.assert_close(ours.double(), expected, atol=TOL[dtype] * scale, rtol=TOL[dtype])


@triton_run
def test_too_many_fiducials_raises():
    target = torch.rand(130, 2, dtype=torch.float64, device=DEV) * 2 - 1
    coef = torch.zeros(133, 130, dtype=torch.float64, device=DEV)
    with pytest.raises(ValueError, match="130"):
        tg.tps_grid(target[None], target, coef, (4, 4), impl="triton")


def test_auto_on_cpu_takes_reference(monkeypatch):
    def boom(*args):
        raise AssertionError("auto must not take the Triton path on CPU tensors")
    monkeypatch.setattr(tg.TpsGridFn, "apply", boom)
    control, target, coef = (t.cpu() for t in _case(1, 2, 3))
    torch.testing.assert_close(tg.tps_grid(control, target, coef, (4, 5)),
                               tg.tps_grid_reference(control, target, coef, (4, 5)), atol=0, rtol=0)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    control, target, coef = (t.cpu() for t in _case(1, 2, 3))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tg.tps_grid(control, target, coef, (4, 5), impl="triton")


def test_bad_arguments_raise():
    control, target, coef = (t.cpu() for t in _case(1, 2, 3))
    with pytest.raises(ValueError, match=r"\(1, 5, 2\)"):
        tg.tps_grid(control[:, :5], target, coef, (4, 5))
    with pytest.raises(ValueError, match=r"\(8, 6\)"):
        tg.tps_grid(control, target, coef[:8], (4, 5))


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("b,size", [(8, (64, 64)), (8, (256, 256)), (3, (97, 131))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_forward_backward(b, size, dtype):
    control, target, coef = _case(b, 4, 5, seed=7)
    c = control.to(dtype).requires_grad_(True)
    grid = tg.tps_grid(c, target.float(), coef.float(), size, impl="triton")
    assert grid.dtype == dtype and not grid.isnan().any()
    upstream = torch.randn(grid.shape, device="cuda").to(dtype)
    (ours,) = torch.autograd.grad(grid, c, upstream)
    c64 = c.detach().double().requires_grad_(True)
    ref = tg.tps_grid_reference(c64, target, coef, size)
    (expected,) = torch.autograd.grad(ref, c64, upstream.double())
    tol = max(TOL[dtype], 1e-5)
    torch.testing.assert_close(grid.double(), ref.detach(), atol=tol, rtol=tol)
    scale = expected.abs().max().item()
    torch.testing.assert_close(ours.double(), expected, atol=tol * scale, rtol=tol)
