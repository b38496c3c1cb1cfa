"""Conv/Linear layers paired with BatchNorm, each able to fold itself into one layer.

LeViT follows every convolution and linear map with a BatchNorm (and its heads put a
BatchNorm before the linear). At inference a BatchNorm is an affine map per channel, so it
folds into the neighbouring weight and bias; ``fuse()`` returns that single plain layer.
"""

from __future__ import annotations

import torch
from torch import nn


def _bn_scale_shift(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel affine map ``y = scale * x + shift`` an eval-mode BatchNorm computes."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    return scale, shift


class ConvBN(nn.Sequential):
    """Bias-free convolution followed by BatchNorm2d."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        scale, shift = _bn_scale_shift(self.bn)
        c = self.conv
        fused = nn.Conv2d(
            c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
            dilation=c.dilation, groups=c.groups, bias=True,
            device=c.weight.device, dtype=c.weight.dtype,
        )
        fused.weight.copy_(c.weight * scale[:, None, None, None])
        fused.bias.copy_(shift)
        return fused


class LinearBN(nn.Module):
    """Bias-free linear map followed by BatchNorm1d over the channels of ``(..., C)`` tokens."""

    def __init__(self, in_features: int, out_features: int, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, -2)).reshape_as(x)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        scale, shift = _bn_scale_shift(self.bn)
        w = self.linear.weight
        fused = nn.Linear(w.shape[1], w.shape[0], bias=True, device=w.device, dtype=w.dtype)
        fused.weight.copy_(w * scale[:, None])
        fused.bias.copy_(shift)
        return fused


class BNLinear(nn.Sequential):
    """BatchNorm1d followed by a linear map: LeViT's classifier head."""

    def __init__(self, in_features: int, out_features: int, std: float = 0.02) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.linear = nn.Linear(in_features, out_features)
        nn.init.trunc_normal_(self.linear.weight, std=std)
        nn.init.zeros_(self.linear.bias)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        scale, shift = _bn_scale_shift(self.bn)
        w, b = self.linear.weight, self.linear.bias
        fused = nn.Linear(w.shape[1], w.shape[0], bias=True, device=w.device, dtype=w.dtype)
        fused.weight.copy_(w * scale[None, :])
        fused.bias.copy_(b + w @ shift)
        return fused
