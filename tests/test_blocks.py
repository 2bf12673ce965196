"""Model blocks whose fused path differs from FOMM's formulation: the strided anti-alias blur, the stacked
convolution heads, and the residual block's fused route (z-conv epilogue for conv1 -> norm2 -> ReLU,
native BN at inference)."""
import pytest
import torch
import torch.nn.functional as F

from ostnet_fast.model.blocks import AntiAliasInterpolation2d, ResBlock2d, conv_heads
from tests.conftest import requires_triton_run

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("scale, size", [
    (0.25, (37, 53)),  # the keypoint detector's scale, odd sizes: ceil(37/4) x ceil(53/4)
    (0.5, (16, 16)),
    (0.25, (256, 256)),  # the model's real input
])
def test_antialias_strided_equals_full_blur_then_subsample(scale, size):
    torch.manual_seed(0)
    down = AntiAliasInterpolation2d(3, scale)
    x = torch.rand(2, 3, *size, dtype=torch.float64)
    # FOMM's formulation: blur at full resolution, then keep every step-th pixel.
    full = F.conv2d(F.pad(x, (down.ka, down.kb, down.ka, down.kb)), down.weight.double(), groups=3)
    expected = full[:, :, ::down.step, ::down.step]
    out = down(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("padding", [0, 3])
def test_conv_heads_stacked_equal_separate_with_gradients(channels_last, padding):
    """The keypoint detector's / dense motion's 7x7 heads as one stacked convolution: the same outputs
    and the same gradients (input, each head's weight and bias) as the convolutions one by one."""
    torch.manual_seed(0)
    heads = tuple(torch.nn.Conv2d(5, c, 7, padding=padding).double() for c in (3, 8))
    x = torch.randn(2, 5, 13, 11, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    params = [x] + [p for h in heads for p in h.parameters()]
    outs = {}
    for merge in (False, True):
        out = conv_heads(x, heads, merge=merge)
        assert [o.shape[1] for o in out] == [3, 8]
        up = [torch.randn(o.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
              for i, o in enumerate(out)]
        grads = torch.autograd.grad(out, params, up)
        outs[merge] = (out, grads)
    for a, b in zip(outs[True][0] + list(outs[True][1]), outs[False][0] + list(outs[False][1])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="share their geometry"):
        conv_heads(x, (heads[0], torch.nn.Conv2d(5, 2, 5, padding=padding).double()))


def _res_block(c, seed=0):
    torch.manual_seed(seed)
    block = ResBlock2d(c).double()
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for n in (block.norm1, block.norm2):
            n.running_mean.uniform_(-0.5, 0.5)
            n.running_var.uniform_(0.5, 2.0)
            n.weight.uniform_(0.5, 1.5)
            n.bias.uniform_(-0.2, 0.2)
    return block


@requires_triton_run()
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
@pytest.mark.parametrize("training", [False, True])
def test_resblock_fused_matches_reference_with_gradients(training):
    ref, fused = _res_block(5).to(DEV), _res_block(5).to(DEV)
    ref.train(training)
    fused.train(training)
    x = torch.randn(2, 5, 7, 9, dtype=torch.float64, device=DEV)  # odd sizes: every border class of the epilogue
    xr, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_r = ref(xr, impl="reference")
    out_f = fused(xf, impl="triton")
    torch.testing.assert_close(out_f, out_r, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(out_r)
    out_r.backward(g)
    out_f.backward(g)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-9, atol=1e-9)
    for (name, pr), pf in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-9, atol=1e-9, msg=name)
    if training:  # the running statistics move the same way
        torch.testing.assert_close(fused.norm2.running_var, ref.norm2.running_var)
