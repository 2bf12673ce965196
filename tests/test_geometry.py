"""Shared geometry helpers: the package convention and the closed-form 2x2 inverse."""
import torch

from ostnet_fast.kernels.geometry import inverse_2x2, kp2gaussian, pixel_coordinates


def test_pixel_coordinates_convention():
    g = pixel_coordinates((3, 5), dtype=torch.float64)  # (H, W, 2), (x, y)
    assert g.shape == (3, 5, 2)
    assert g[0, 0].tolist() == [-1, -1] and g[-1, -1].tolist() == [1, 1]
    assert g[0, :, 0].tolist() == [-1, -0.5, 0, 0.5, 1]  # x runs along width
    assert g[:, 0, 1].tolist() == [-1, 0, 1]


def test_pixel_coordinates_align_with_grid_sample():
    # Sampling an image at its own pixel coordinates returns it exactly (align_corners=True).
    torch.manual_seed(0)
    img = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    grid = pixel_coordinates((7, 9), dtype=torch.float64).expand(2, 7, 9, 2)
    out = torch.nn.functional.grid_sample(img, grid, align_corners=True)
    torch.testing.assert_close(out, img)


def test_inverse_2x2_matches_linalg():
    torch.manual_seed(0)
    m = torch.randn(4, 5, 2, 2, dtype=torch.float64) + 2 * torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(inverse_2x2(m), torch.linalg.inv(m))


def test_kp2gaussian_peaks_at_keypoint():
    kp = torch.tensor([[[0.0, 0.0], [-1.0, 1.0]]])
    g = kp2gaussian(kp, (5, 5), 0.01)
    assert g.shape == (1, 2, 5, 5)
    assert g[0, 0, 2, 2] == 1 and g[0, 1, 4, 0] == 1
    assert g[0, 0].argmax() == 12
