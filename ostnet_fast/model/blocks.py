"""FOMM's building blocks, with FOMM's module and parameter names (so FOMM checkpoints load).

Every conv -> BN -> ReLU (-> pool / after upsample) block goes through `kernels.zconv_block`, which adds
an optional per-sample, per-channel vector `zb` (OSTNet's W_i z) without materialising f + zb, and takes
the fused kernel on CUDA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import conv2d, zconv_block
from ..kernels._dispatch import use_triton
from ..kernels.conv2d import blur_downsample, conv2d_module, from_block


def _epilogue_fits(conv: nn.Conv2d) -> bool:
    """The fused z-conv epilogue is derived for 3x3 convs with padding 1; other convs take the reference."""
    return conv.kernel_size == (3, 3) and conv.padding == (1, 1)


def merge_heads(impl: str, x: torch.Tensor) -> bool:
    """Whether conv_heads stacks the heads: on the fused path, decided as for the kernels (use_triton)."""
    return use_triton("conv_heads", impl, x)


def conv_heads(x: torch.Tensor, convs: tuple[nn.Conv2d, ...], merge: bool = True) -> list[torch.Tensor]:
    """conv(x) for each of `convs` (same kernel size, stride, padding, dilation; groups 1; all with bias
    or none), as ONE convolution with their weights stacked per call, split back by channel (views).
    Small-N convolutions leave cuDNN's tensor-core tiles mostly empty: the keypoint detector's two 7x7
    heads (15 and 60 channels from 35 at 64x64) take 58 us apart and 35 us stacked, the dense motion's
    mask and occlusion (16 and 1 from 128) 48 and 35 us (H200, batch 1 fp16 channels-last, CUDA graphs;
    bench/bench_conv_forms.py, bench/results/h200-2026-12-01-s10/conv_forms.json).
    merge=False runs them one by one (the reference path)."""
    if not merge:
        return [c(x) for c in convs]
    first = convs[0]
    for c in convs:
        if c.padding_mode != "zeros" or c.groups != 1 or (c.bias is None) != (first.bias is None) or any(
                getattr(c, a) != getattr(first, a) for a in ("kernel_size", "stride", "padding", "dilation")):
            raise ValueError(f"conv_heads: the convolutions must share their geometry, got {first} and {c}")
    weight = torch.cat([c.weight for c in convs])
    bias = torch.cat([c.bias for c in convs]) if first.bias is not None else None
    if first.stride == (1, 1) and first.dilation == (1, 1) and not isinstance(first.padding, str):
        # compiled: the split-K kernel where faster (the 7x7 mask heads), else cuDNN with the keypoint
        # heads' odd channel counts padded (kernels.conv2d.pads_for_cudnn)
        out = conv2d(x, weight, bias, first.padding)
    else:
        out = F.conv2d(x, weight, bias, first.stride, first.padding, first.dilation)
    return list(out.split([c.out_channels for c in convs], dim=1))


class ResBlock2d(nn.Module):
    """BN -> ReLU -> conv -> BN -> ReLU -> conv, plus the input (FOMM).

    Fused path (CUDA): conv1 -> norm2 -> ReLU is a z-conv block without z (BN and ReLU in its epilogue),
    and at inference norm1 runs as PyTorch's native elementwise batch norm: cuDNN's NHWC inference BN
    kernel takes ~35 us on one 256x64x64 sample on an H100, ten times the elementwise pass.
    """

    def __init__(self, in_features: int, kernel_size=3, padding=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_features, in_features, kernel_size=kernel_size, padding=padding)
        self.conv2 = nn.Conv2d(in_features, in_features, kernel_size=kernel_size, padding=padding)
        self.norm1 = nn.BatchNorm2d(in_features, affine=True)
        self.norm2 = nn.BatchNorm2d(in_features, affine=True)

    def forward(self, x, impl: str = "auto"):
        if not (_epilogue_fits(self.conv1) and use_triton("zconv_block", impl, x)):
            out = self.conv1(F.relu(self.norm1(x)))
            out = self.conv2(F.relu(self.norm2(out)))
            return out + x
        n = self.norm1
        if self.training:
            h = n(x)
        else:
            h = torch.native_batch_norm(x, n.weight, n.bias, n.running_mean, n.running_var, False, 0.0, n.eps)[0]
        out = zconv_block(F.relu(h), None, self.conv1, self.norm2, "same", impl=impl)
        return conv2d_module(self.conv2, out, impl) + x


class _ConvBlock(nn.Module):
    mode = "same"

    def __init__(self, in_features: int, out_features: int, kernel_size=3, padding=1):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(out_features, affine=True)

    def forward(self, x, zb: torch.Tensor | None = None, impl: str = "auto"):
        """x (B, C_in, H, W), zb (B, C_in) added to x before the block (OSTNet's W_i z)."""
        if not _epilogue_fits(self.conv):
            impl = "reference"
        return zconv_block(x, zb, self.conv, self.norm, self.mode, impl=impl)


class SameBlock2d(_ConvBlock):
    """conv -> BN -> ReLU."""
    mode = "same"


class DownBlock2d(_ConvBlock):
    """conv -> BN -> ReLU -> 2x2 average pool."""
    mode = "down"

    def __init__(self, in_features, out_features, kernel_size=3, padding=1):
        super().__init__(in_features, out_features, kernel_size, padding)
        self.pool = nn.AvgPool2d(kernel_size=(2, 2))  # kept for FOMM's module layout; no parameters


class UpBlock2d(_ConvBlock):
    """nearest 2x upsample -> conv -> BN -> ReLU."""
    mode = "up"


class Encoder(nn.Module):
    def __init__(self, block_expansion, in_features, num_blocks=3, max_features=256):
        super().__init__()
        self.down_blocks = nn.ModuleList([
            DownBlock2d(in_features if i == 0 else min(max_features, block_expansion * (2 ** i)),
                        min(max_features, block_expansion * (2 ** (i + 1))))
            for i in range(num_blocks)])

    def forward(self, x, impl="auto"):
        outs = [x]
        for block in self.down_blocks:
            outs.append(block(outs[-1], impl=impl))
        return outs


class Decoder(nn.Module):
    def __init__(self, block_expansion, in_features, num_blocks=3, max_features=256):
        super().__init__()
        up_blocks = []
        for i in reversed(range(num_blocks)):
            in_filters = (1 if i == num_blocks - 1 else 2) * min(max_features, block_expansion * (2 ** (i + 1)))
            out_filters = min(max_features, block_expansion * (2 ** i))
            up_blocks.append(UpBlock2d(in_filters, out_filters))
        self.up_blocks = nn.ModuleList(up_blocks)
        self.out_filters = block_expansion + in_features

    def forward(self, outs, impl="auto"):
        outs = list(outs)
        out = outs.pop()
        for block in self.up_blocks:
            out = torch.cat([block(out, impl=impl), outs.pop()], dim=1)
        return out


class Hourglass(nn.Module):
    def __init__(self, block_expansion, in_features, num_blocks=3, max_features=256):
        super().__init__()
        self.encoder = Encoder(block_expansion, in_features, num_blocks, max_features)
        self.decoder = Decoder(block_expansion, in_features, num_blocks, max_features)
        self.out_filters = self.decoder.out_filters

    def forward(self, x, impl="auto"):
        return self.decoder(self.encoder(x, impl=impl), impl=impl)


class AntiAliasInterpolation2d(nn.Module):
    """Gaussian blur then strided subsampling (FOMM): a fixed depthwise conv, buffer `weight`."""

    def __init__(self, channels: int, scale: float):
        super().__init__()
        sigma = (1 / scale - 1) / 2
        kernel_size = 2 * round(sigma * 4) + 1  # odd: the same padding on both sides
        self.ka = self.kb = kernel_size // 2
        coords = torch.arange(kernel_size, dtype=torch.float32)
        g = torch.exp(-((coords - (kernel_size - 1) / 2) ** 2) / (2 * sigma ** 2))
        kernel = g[:, None] * g[None, :]
        kernel = kernel / kernel.sum()
        self.register_buffer("weight", kernel.view(1, 1, kernel_size, kernel_size).repeat(channels, 1, 1, 1))
        # The kernel's 1-D profile, kernel = outer(factor, factor) (its row sums), for blur_downsample;
        # derived again from `weight` whenever a state dict is loaded.
        self.register_buffer("factor", kernel.sum(1), persistent=False)
        self.scale = scale
        self.step = int(round(1 / scale))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        with torch.no_grad():
            self.factor.copy_(self.weight[0, 0].sum(1))

    def forward(self, x, impl: str = "auto"):
        if self.scale == 1.0:
            return x
        # Strided: the same values as FOMM's full-resolution blur followed by out[:, :, ::step, ::step],
        # step**2 times less work. The kernel is odd: the conv's own zero padding, no padded copy as FOMM's
        # F.pad (H200, fp16 channels-last, batch 1 / 8: 18.7 / 19.2 us against 23.5 / 26.8). Compiled on the
        # fused path, two 1-D passes instead (kernels.conv2d.blur_downsample).
        return blur_downsample(x, self.weight, self.factor, self.step, impl=from_block(impl))
