"""The device pass: a fused model rewritten into the operators that on-device runtimes delegate
whole to XNNPACK (ExecuTorch, LiteRT), computing the same function.

What it changes, each measured as an operator left outside the delegate before (issue 33):

- attention as 3-D batched matrix products over ``batch x heads`` (4-D products became
  ``expand_copy`` operators), with the attention bias a constant of the graph;
- the packed ``qkv`` (and shrinking attention's ``kv``) projection as separate ``q``, ``k`` and
  ``v`` linear maps (the split became ``split_with_sizes_copy``);
- shrinking attention's 2x subsample of the token grid as a product with a constant 0/1
  selection matrix (a strided slice was left out of ExecuTorch's XNNPACK, a 1x1 pooling with
  stride 2 out of LiteRT's);
- the final mean over the tokens as a matrix product with a constant row (``mean.dim`` was
  left out), and the class and distillation heads folded into one linear map (their mean).

For CvT it rewrites, for the same reasons:

- attention as 3-D batched matrix products (scaled dot-product attention was decomposed into
  ``eq``/``where``/``any``/``logical_not`` and 4-D products into ``expand_copy``);
- LayerNorm written out, with the means over the channels as matrix products with a constant
  column (``native_layer_norm`` has no XNNPACK kernel, and XNNPACK's mean only averages 4-D maps);
- the last stage's class token carried beside the patch tokens rather than concatenated to
  them and sliced off again: the class query attends in its own product, and the head reads it
  without a ``select``.

The result runs at the model's own input size only.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..models.cvt import Block as CvTBlock
from ..models.cvt import ConvAttention, CvT
from ..models.features import stage_output
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

    def __init__(self, attn: ShrinkAttention, grid: tuple[int, int]) -> None:
        super().__init__()
        self.heads, self.scale = attn.num_heads, attn.key_dim ** -0.5
        self.k, self.v = _rows(attn.kv, attn.num_heads, [attn.key_dim, attn.val_dim])
        self.q = attn.q
        self.register_buffer("bias", _baked(attn))
        self.sub_grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
        self.register_buffer("select", _subsample(grid)[None])
        self.act, self.proj = attn.act, attn.proj

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.select.shape[-1] != x.shape[1]:
            raise ValueError(f"the device model runs at its own input size: {self.select.shape[-1]} tokens here, "
                             f"not {x.shape[1]}")
        select = self.select if x.shape[0] == 1 else self.select.expand(x.shape[0], -1, -1)
        q = _per_head(self.q(torch.bmm(select, x)) * self.scale, self.heads)
        out = _attend(q, _per_head(self.k(x), self.heads), _per_head(self.v(x), self.heads), self.bias, self.heads)
        return self.proj(self.act(out)), self.sub_grid


def _subsample(grid: tuple[int, int]) -> torch.Tensor:
    """The 0/1 matrix that picks every other row and column of a row-major token grid, as x[::2, ::2]."""
    rows = torch.arange(grid[0] * grid[1]).view(grid)[::2, ::2].reshape(-1)
    return F.one_hot(rows, grid[0] * grid[1]).float()


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
        grids: dict[nn.Module, tuple[int, int]] = {}  # each shrinking attention's input grid, at the model's size
        hooks = [m.register_forward_pre_hook(lambda m, args: grids.update({m: args[1]}))  # None: inputs kept
                 for m in model.modules() if isinstance(m, ShrinkAttention)]
        with torch.no_grad():
            model.forward_features(torch.zeros(1, model.in_chans, *model.input_hw))
        for hook in hooks:
            hook.remove()
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, LeViTAttention):
                    setattr(module, name, DeviceAttention(child))
                elif isinstance(child, ShrinkAttention):
                    setattr(module, name, DeviceShrinkAttention(child, grids[child]))
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


class DeviceLayerNorm(nn.Module):
    """LayerNorm over the last dimension in delegable operators: the two means over the channels
    are products with a constant ``1/C`` column."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        channels = norm.normalized_shape[-1]
        self.register_buffer("column", torch.full((1, channels), 1.0 / channels))
        self.weight, self.bias, self.eps = norm.weight.detach().clone(), norm.bias.detach().clone(), norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - F.linear(x, self.column)
        variance = F.linear(centred * centred, self.column)
        return centred * torch.rsqrt(variance + self.eps) * self.weight + self.bias


class DeviceConvAttention(nn.Module):
    """CvT's convolutional attention, for the device; ``cls`` is the class token ``(B, 1, C)`` or
    None, kept apart from the patch tokens (see the module docstring)."""

    def __init__(self, attn: ConvAttention) -> None:
        super().__init__()
        if not attn.conv_proj:
            raise ValueError("the device pass takes CvT's convolutional projection (conv_proj=True in every stage)")
        self.heads, self.scale = attn.num_heads, attn.scale
        self.conv_q, self.conv_k, self.conv_v = attn.conv_proj_q, attn.conv_proj_k, attn.conv_proj_v
        self.proj_q, self.proj_k, self.proj_v, self.proj = attn.proj_q, attn.proj_k, attn.proj_v, attn.proj

    def forward(self, x: torch.Tensor, cls: torch.Tensor | None, grid: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, _, channels = x.shape
        x_map = x.transpose(1, 2).reshape(batch, channels, *grid)
        q, k, v = (conv(x_map).flatten(2).transpose(1, 2) for conv in (self.conv_q, self.conv_k, self.conv_v))
        if cls is not None:
            k, v = torch.cat((cls, k), 1), torch.cat((cls, v), 1)
        k, v = _per_head(self.proj_k(k), self.heads), _per_head(self.proj_v(v), self.heads)
        out = self.proj(_attend(_per_head(self.proj_q(q) * self.scale, self.heads), k, v, None, self.heads))
        if cls is None:
            return out, None
        cls_q = _per_head(self.proj_q(cls) * self.scale, self.heads)
        return out, self.proj(_attend(cls_q, k, v, None, self.heads))


class DeviceCvTBlock(nn.Module):
    """A CvT block over patch tokens and, in the last stage, the class token beside them."""

    def __init__(self, block: CvTBlock) -> None:
        super().__init__()
        self.norm1, self.norm2 = DeviceLayerNorm(block.norm1), DeviceLayerNorm(block.norm2)
        self.attn, self.mlp = DeviceConvAttention(block.attn), block.mlp

    def forward(self, x: torch.Tensor, cls: torch.Tensor | None, grid: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, cls_out = self.attn(self.norm1(x), None if cls is None else self.norm1(cls), grid)
        x = x + out
        x = x + self.mlp(self.norm2(x))
        if cls is not None:
            cls = cls + cls_out
            cls = cls + self.mlp(self.norm2(cls))
        return x, cls


class DeviceCvT(nn.Module):
    """A fused CvT for the device: its LayerNorms and attention rewritten, the class token apart."""

    def __init__(self, model: CvT) -> None:
        super().__init__()
        model = copy.deepcopy(model)
        if any(stage.pos_embed is not None for stage in model.stages):
            raise ValueError("the device pass takes CvT without a positional embedding (the paper's models)")
        self.embeds = nn.ModuleList(stage.embed.proj for stage in model.stages)
        self.embed_norms = nn.ModuleList(DeviceLayerNorm(stage.embed.norm) for stage in model.stages)
        self.blocks = nn.ModuleList(nn.ModuleList(DeviceCvTBlock(b) for b in stage.blocks) for stage in model.stages)
        if [stage.cls_token is not None for stage in model.stages] != [False, False, True]:
            raise ValueError("the device pass takes CvT with its class token in the last stage only")
        self.register_buffer("cls_token", model.stages[-1].cls_token.detach().clone())
        self.norm, self.head = DeviceLayerNorm(model.norm), model.head
        self.model_name, self.num_classes, self.in_chans = model.model_name, model.num_classes, model.in_chans
        self.input_hw = model.input_hw

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the normalised class token ``(B, 1, C)``."""
        cls = None
        for index, (embed, norm, blocks) in enumerate(zip(self.embeds, self.embed_norms, self.blocks)):
            x = embed(x)
            grid = (x.shape[-2], x.shape[-1])
            tokens = norm(x.flatten(2).transpose(1, 2))
            if index == len(self.blocks) - 1:
                cls = self.cls_token if x.shape[0] == 1 else self.cls_token.expand(x.shape[0], -1, -1)
            for block in blocks:
                tokens, cls = block(tokens, cls, grid)
            x = stage_output(tokens, grid, "NCHW")
        return self.norm(cls)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def for_device(fused: nn.Module) -> nn.Module:
    """``fused`` (``fusion.fuse``) rewritten for on-device runtimes: a LeViT as ``DeviceLeViT``,
    a CvT as ``DeviceCvT``, other families as they are."""
    if isinstance(fused, LeViT):
        if getattr(fused.config, "dynamic_size", False):
            raise ValueError("the device pass bakes each attention bias for the model's own input size: export a "
                             "model without dynamic_size")
        return DeviceLeViT(fused).eval()
    if isinstance(fused, CvT):
        return DeviceCvT(fused).eval()
    return fused  # other families (the grafts) as they are


class DecomposedHardswish(nn.Module):
    """``x * relu6(x + 3) / 6`` as its parts: LiteRT's XNNPACK delegate has no int8 HARD_SWISH (14
    were left out of LeViT-128S's int8 program), but takes the additions, clamps and products."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0) * (1.0 / 6.0)


class DecomposedGELU(nn.Module):
    """GELU in its tanh form, as its parts: LiteRT's XNNPACK delegate has no int8 GELU (22 were left
    out of CvT-13's int8 program). The tanh form differs from the exact one by under 1e-3, far
    below int8's rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def decompose_activations(model: nn.Module) -> nn.Module:
    """``model`` (changed in place) with each ``nn.Hardswish`` and ``nn.GELU`` written out, for
    LiteRT's int8 programs."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Hardswish):
                setattr(module, name, DecomposedHardswish())
            elif isinstance(child, nn.GELU):
                setattr(module, name, DecomposedGELU())
    return model
