"""Expression-preserving augmentation (sec. 3.4): invariants of stretch -> pad to square -> resize back."""
import pytest
import torch

from ostnet_fast.train.augment import draw_factors, expression_preserving_augment, scale_augment


@pytest.mark.parametrize("shape", [
    (1, 3, 16, 16),  # minimal
    (2, 3, 37, 53),  # odd, non-square H/W
    (3, 1, 64, 64),  # model-like square frame, one channel
])
def test_unit_factors_are_identity(shape):
    torch.manual_seed(0)
    x = -2.3 + 0.5 * torch.randn(shape)  # off-centre values: the map must not depend on the range
    one = torch.ones(shape[0])
    out = scale_augment(x, one, one)
    assert out.shape == x.shape and out.dtype == x.dtype
    # fp32 grid arithmetic puts sample points ~1e-6 px off the pixel centres: errors ~1e-5 * |grad x|.
    torch.testing.assert_close(out, x, atol=1e-4, rtol=0)


def _content_extent(out, thresh=0.5):
    """Rows and columns of the all-ones content that stay above thresh in an augmented all-ones frame."""
    rows = (out[0, 0].max(dim=1).values > thresh).sum().item()
    cols = (out[0, 0].max(dim=0).values > thresh).sum().item()
    return rows, cols


@pytest.mark.parametrize("alpha,beta", [(1.2, 0.8), (0.75, 1.3), (1.0, 0.7), (1.3, 1.3)])
def test_content_aspect_ratio_changes_by_alpha_over_beta(alpha, beta):
    h = w = 96
    out = scale_augment(torch.ones(1, 1, h, w), torch.tensor([alpha]), torch.tensor([beta]))
    rows, cols = _content_extent(out)
    side = max(alpha * h, beta * w)
    # The longer side fills the frame; the content keeps the stretched aspect ratio alpha H : beta W.
    assert abs(rows - h * alpha * h / side) <= 1.0
    assert abs(cols - w * beta * w / side) <= 1.0
    assert abs((rows / cols) - (alpha / beta)) <= 0.05


def test_padding_appears_on_the_right_sides():
    x = torch.ones(2, 3, 64, 64)
    out = scale_augment(x, torch.tensor([1.3, 0.8]), torch.tensor([0.8, 1.3]))
    # Sample 0: taller than wide -> zero columns left and right, full rows top and bottom.
    assert out[0, :, :, :5].abs().max() == 0 and out[0, :, :, -5:].abs().max() == 0
    assert out[0, :, :2, 28:36].min() > 0.99 and out[0, :, -2:, 28:36].min() > 0.99
    # Sample 1: wider than tall -> zero rows top and bottom, full columns left and right.
    assert out[1, :, :5].abs().max() == 0 and out[1, :, -5:].abs().max() == 0
    assert out[1, :, 28:36, :2].min() > 0.99 and out[1, :, 28:36, -2:].min() > 0.99
    # Padding is centred: the frame stays symmetric.
    torch.testing.assert_close(out, out.flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, out.flip(-2), atol=1e-5, rtol=0)


def test_factors_are_in_range_and_seeded():
    a1, b1 = draw_factors(1000, 0.3, torch.Generator().manual_seed(3))
    a2, b2 = draw_factors(1000, 0.3, torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    for f in (a1, b1):
        assert f.min() >= 0.7 and f.max() <= 1.3 and f.std() > 0.1  # spread over the whole range
    assert not torch.equal(a1, b1)  # independent per axis


def test_random_augment_keeps_shape_and_range():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 40, 40)
    out, alpha, beta = expression_preserving_augment(x, 0.3, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and alpha.shape == (4,) and beta.shape == (4,)
    assert out.min() >= 0 and out.max() <= 1 + 1e-6


def test_bad_arguments_name_the_value():
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"\(2,\)"):
        scale_augment(x, torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match="delta"):
        draw_factors(2, 1.5)
    with pytest.raises(ValueError, match="positive"):
        scale_augment(x, torch.tensor([1.0, -1.0]), torch.ones(2))
