"""The device pass: a fused model rewritten into the operators that on-device runtimes delegate
whole to XNNPACK (ExecuTorch, LiteRT), computing the same function.

What it changes, each measured as an operator left outside the delegate before (issue 33):

- attention as 3-D batched matrix products over ``batch x heads`` (4-D products became
  ``expand_copy`` operators), with the attention bias a constant of the graph;
- the packed ``qkv`` (and shrinking attention's ``kv``) projection as separate ``q``, ``k`` and
  ``v`` linear maps (the split became ``split_with_sizes_copy``);
- shrinking attention's 2x subsample of the token grid as a 1x1 average pooling with stride 2
  (a strided slice was left out);
- the final mean over the tokens as a matrix product with a constant row (``mean.dim`` was
  left out), and the class and distillation heads folded into one linear map (their mean).

The result runs at the model's own input size only.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..models.levit import LeViT, ShrinkAttention
from ..models.levit import Attention as LeViTAttention


def _rows(linear: nn.Linear, heads: int, widths: list[int]) -> list[nn.Linear]:
    """A linear map whose output rows are grouped per head as ``widths`` (e.g. [q | k | v]), as one
    linear map per group, each with its heads in order."""
    out = []
    weight = linear.weight.detach().view(heads, sum(widths), -1)
    bias = linear.bias.detach().view(heads, sum(widths))
    start = 0
    for width in widths:
        part = nn.Linear(linear.in_features, heads * width)
        part.weight.data.copy_(weight[:, start:start + width].reshape(heads * width, -1))
        part.bias.data.copy_(bias[:, start:start + width].reshape(-1))
        out.append(part)
        start += width
    return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, heads: int) -> torch.Tensor:
    """softmax(q·kᵀ + bias)·v for ``(B*heads, N, d)`` tensors, in 3-D products; ``(B, Nq, heads*dv)`` out."""
    scores = torch.bmm(q, k.transpose(1, 2))
    batch, nq, nk = scores.shape[0] // heads, scores.shape[1], scores.shape[2]
    if bias is not None:
        scores = (scores.view(batch, heads, nq, nk) + bias).view(batch * heads, nq, nk)
    out = torch.bmm(scores.softmax(dim=-1), v)
    return out.view(batch, heads, nq, -1).transpose(1, 2).reshape(batch, nq, -1)


def _baked(attn: nn.Module) -> torch.Tensor | None:
    """The attention bias of the native grid, a constant (None in the ablation without one)."""
    bias = attn.attention_bias
    return None if bias is None else bias(bias.key_grid).detach().clone()


def _per_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, heads*d)`` -> ``(B*heads, N, d)``."""
    batch, n, _ = x.shape
    return x.view(batch, n, heads, -1).transpose(1, 2).reshape(batch * heads, n, -1)


class DeviceAttention(nn.Module):
    """LeViT's attention block, for the device (see the module docstring)."""

    def __init__(self, attn: LeViTAttention) -> None:
        super().__init__()
        self.heads, self.scale = attn.num_heads, attn.key_dim ** -0.5
        self.q, self.k, self.v = _rows(attn.qkv, attn.num_heads, [attn.key_dim, attn.key_dim, attn.val_dim])
        self.register_buffer("bias", _baked(attn))
        self.act, self.proj = attn.act, attn.proj

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        q = _per_head(self.q(x) * self.scale, self.heads)
        return self.proj(self.act(_attend(q, _per_head(self.k(x), self.heads), _per_head(self.v(x), self.heads),
                                          self.bias, self.heads)))


class DeviceShrinkAttention(nn.Module):
    """LeViT's shrinking attention, for the device (see the module docstring)."""

    def __init__(self, attn: ShrinkAttention) -> None:
        super().__init__()
        self.heads, self.scale = attn.num_heads, attn.key_dim ** -0.5
        self.k, self.v = _rows(attn.kv, attn.num_heads, [attn.key_dim, attn.val_dim])
        self.q = attn.q
        self.register_buffer("bias", _baked(attn))
        self.act, self.proj = attn.act, attn.proj

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        batch, _, channels = x.shape
        image = x.transpose(1, 2).reshape(batch, channels, *grid)
        sub = F.avg_pool2d(image, kernel_size=1, stride=2)  # every other row and column, as x[::2, ::2]
        sub_grid = (sub.shape[2], sub.shape[3])
        x_sub = sub.flatten(2).transpose(1, 2)
        q = _per_head(self.q(x_sub) * self.scale, self.heads)
        out = _attend(q, _per_head(self.k(x), self.heads), _per_head(self.v(x), self.heads), self.bias, self.heads)
        return self.proj(self.act(out)), sub_grid


def _one_head(head: nn.Linear, head_dist: nn.Linear | None) -> nn.Linear:
    """The class and distillation heads (fused: linear maps) as one: their mean, folded."""
    if head_dist is None:
        return head
    one = nn.Linear(head.in_features, head.out_features)
    one.weight.data.copy_((head.weight.detach() + head_dist.weight.detach()) / 2)
    one.bias.data.copy_((head.bias.detach() + head_dist.bias.detach()) / 2)
    return one


class DeviceLeViT(nn.Module):
    """A fused LeViT for the device: its blocks rewritten, the token mean a matrix product."""

    def __init__(self, model: LeViT) -> None:
        super().__init__()
        self.model = model = copy.deepcopy(model)  # the caller's model stays as it was
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, LeViTAttention):
                    setattr(module, name, DeviceAttention(child))
                elif isinstance(child, ShrinkAttention):
                    setattr(module, name, DeviceShrinkAttention(child))
        with torch.no_grad():
            tokens = model.forward_features(torch.zeros(1, model.in_chans, *model.input_hw)).shape[1]
        self.register_buffer("mean_row", torch.full((1, 1, tokens), 1.0 / tokens))
        self.head = _one_head(model.head, model.head_dist)
        self.model_name, self.num_classes, self.in_chans = model.model_name, model.num_classes, model.in_chans

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.model.input_hw

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        row = self.mean_row if x.shape[0] == 1 else self.mean_row.expand(x.shape[0], -1, -1)
        pooled = torch.bmm(row, x).reshape(x.shape[0], -1)  # the mean over the tokens
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def for_device(fused: nn.Module) -> nn.Module:
    """``fused`` (``fusion.fuse``) rewritten for on-device runtimes: a LeViT as ``DeviceLeViT``;
    other families as they are (CvT's graph needs no rewrite to be traced)."""
    if isinstance(fused, LeViT):
        if getattr(fused.config, "dynamic_size", False):
            raise ValueError("the device pass bakes each attention bias for the model's own input size: export a "
                             "model without dynamic_size")
        return DeviceLeViT(fused).eval()
    return fused
