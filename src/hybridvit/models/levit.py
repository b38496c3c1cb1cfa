"""LeViT (Graham et al., ICCV 2021): a vision transformer in ConvNet's clothing.

Layout of the paper's Table 2: a 4-convolution patch embedding (stride 16), then three
stages of attention + MLP residual pairs on a token grid, joined by shrinking attention
(queries on the 2x subsampled grid, keys/values on the full grid, no residual). Tokens
travel token-major ``(B, N, C)``; every linear map carries a BatchNorm that ``fuse`` folds.

The paper's ablations (Table 5, appendix A.2) are config options, so they combine freely;
``ablation="A1"``..``"A7"`` names the paper's settings (``configs.levit.ABLATIONS``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..configs.levit import LeViTConfig
from ..layers import AttentionBias, BNLinear, ConvBN, DropPath, LayerNorm2d, LinearBN, attention, trunc_normal_
from ..registry import to_hw
from .base import HybridClassifier
from .features import feature_take_indices, stage_output

__all__ = ["LeViT", "LeViTConfig"]


def _half(grid: tuple[int, int]) -> tuple[int, int]:
    """Grid size after a stride-2 step (3x3 conv with padding 1, or subsampling): ceil."""
    return (grid[0] + 1) // 2, (grid[1] + 1) // 2


def _conv(in_chs: int, out_chs: int, kernel: int, stride: int, padding: int, norm: str) -> nn.Module:
    """Convolution + BatchNorm (foldable), or convolution with bias + channel LayerNorm (A3)."""
    if norm == "batch":
        return ConvBN(in_chs, out_chs, kernel, stride, padding)
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(in_chs, out_chs, kernel, stride, padding), norm=LayerNorm2d(out_chs)))


def _linear(in_features: int, out_features: int, norm: str, zero_init: bool = False) -> nn.Module:
    """Linear + BatchNorm (foldable), or, with pre-norm LayerNorm blocks (A3), a plain linear map with
    bias. ``zero_init``: the residual branch starts at zero either way."""
    if norm == "batch":
        return LinearBN(in_features, out_features, bn_weight_init=0.0 if zero_init else 1.0)
    linear = nn.Linear(in_features, out_features)
    if zero_init:
        nn.init.zeros_(linear.weight)
    else:
        trunc_normal_(linear.weight, std=0.02)
    nn.init.zeros_(linear.bias)
    return linear


def _pre_norm(dim: int, norm: str) -> nn.Module:
    """The LayerNorm in front of a residual branch (A3); nothing with BatchNorm."""
    return nn.LayerNorm(dim) if norm == "layer" else nn.Identity()


class PatchEmbed(nn.Sequential):
    """Four 3x3 stride-2 convolutions, C/8 -> C/4 -> C/2 -> C, Hardswish between them."""

    def __init__(self, in_chans: int, dim: int, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = _conv(in_chans, dim // 8, 3, 2, 1, norm)
        self.act1 = nn.Hardswish()
        self.conv2 = _conv(dim // 8, dim // 4, 3, 2, 1, norm)
        self.act2 = nn.Hardswish()
        self.conv3 = _conv(dim // 4, dim // 2, 3, 2, 1, norm)
        self.act3 = nn.Hardswish()
        self.conv4 = _conv(dim // 2, dim, 3, 2, 1, norm)


class Patchify(nn.Sequential):
    """A2: ViT's patch projection, one 16x16 stride-16 convolution (padded to round odd sizes up)."""

    def __init__(self, in_chans: int, dim: int, norm: str = "batch") -> None:
        super().__init__()
        self.conv = _conv(in_chans, dim, 16, 16, 0, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = -x.shape[-2] % 16, -x.shape[-1] % 16
        if pad_h or pad_w:  # the same grid as the 4-conv stem gives: ceil(size / 16)
            x = nn.functional.pad(x, (0, pad_w, 0, pad_h))
        return super().forward(x)


class Attention(nn.Module):
    """Multi-head attention with small keys, attention bias and Hardswish on A·V."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], c: LeViTConfig) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = c.key_dim
        self.val_dim = int(c.attn_ratio * c.key_dim)
        # Output channels are grouped per head as [q | k | v], the official layout.
        self.qkv = _linear(dim, num_heads * (2 * c.key_dim + self.val_dim), c.norm)
        self.attention_bias = AttentionBias(num_heads, grid, resampling=c.bias_resampling) if c.attention_bias else None
        self.act = nn.Hardswish() if c.attn_activation else nn.Identity()
        self.proj = _linear(num_heads * self.val_dim, dim, c.norm, zero_init=True)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, N, d)
        bias = self.attention_bias(grid) if self.attention_bias is not None else None
        x = attention(q, k, v, bias, query_grid=grid, key_grid=grid)
        return self.proj(self.act(x.transpose(1, 2).reshape(B, N, -1)))


class ShrinkAttention(nn.Module):
    """Attention between stages: queries on the subsampled grid, keys/values on the full one."""

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, grid: tuple[int, int], c: LeViTConfig) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = c.key_dim
        self.val_dim = int(c.shrink_attn_ratio * c.key_dim)
        self.kv = _linear(in_dim, num_heads * (c.key_dim + self.val_dim), c.norm)  # per head [k | v]
        self.q = _linear(in_dim, num_heads * c.key_dim, c.norm)
        self.attention_bias = (AttentionBias(num_heads, grid, stride=2, resampling=c.bias_resampling)
                               if c.attention_bias else None)
        self.act = nn.Hardswish() if c.attn_activation else nn.Identity()
        self.proj = _linear(num_heads * self.val_dim, out_dim, c.norm)  # no residual: BN starts at 1

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens on ``grid`` -> tokens on the subsampled grid (odd sizes round up, as the stem does)."""
        B, N, C = x.shape
        k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        x_sub = x.view(B, grid[0], grid[1], C)[:, ::2, ::2]
        sub_grid = (x_sub.shape[1], x_sub.shape[2])
        x_sub = x_sub.reshape(B, -1, C)
        q = self.q(x_sub).view(B, x_sub.shape[1], self.num_heads, self.key_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        bias = self.attention_bias(grid) if self.attention_bias is not None else None
        x = attention(q, k, v, bias, query_grid=sub_grid, key_grid=grid)
        return self.proj(self.act(x.transpose(1, 2).reshape(B, x_sub.shape[1], -1))), sub_grid


class MLP(nn.Module):
    """Linear expansion + BN, Hardswish, linear reduction + BN (zero-initialised: residual)."""

    def __init__(self, dim: int, ratio: float, norm: str = "batch") -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.up = _linear(dim, hidden, norm)
        self.act = nn.Hardswish()
        self.down = _linear(hidden, dim, norm, zero_init=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    """One attention + MLP pair, each a residual branch with drop path."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], c: LeViTConfig) -> None:
        super().__init__()
        self.norm1 = _pre_norm(dim, c.norm)
        self.attn = Attention(dim, num_heads, grid, c)
        self.norm2 = _pre_norm(dim, c.norm)
        self.mlp = MLP(dim, c.mlp_ratio, c.norm)
        self.drop_path = DropPath(c.drop_path_rate) if c.drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Shrink(nn.Module):
    """Shrinking attention (C -> C', grid halved) followed by a residual MLP block."""

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, grid: tuple[int, int], c: LeViTConfig) -> None:
        super().__init__()
        self.norm1 = _pre_norm(in_dim, c.norm)
        self.attn = ShrinkAttention(in_dim, out_dim, num_heads, grid, c)
        self.norm2 = _pre_norm(out_dim, c.norm)
        self.mlp = MLP(out_dim, c.shrink_mlp_ratio, c.norm)
        self.drop_path = DropPath(c.drop_path_rate) if c.drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        x, grid = self.attn(self.norm1(x), grid)
        return x + self.drop_path(self.mlp(self.norm2(x))), grid


class Stage(nn.Module):
    """An optional shrink from the previous stage, then ``depth`` blocks at one resolution."""

    def __init__(self, downsample: Shrink | None, blocks: list[Block]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens ``(B, H*W, C)`` on ``grid`` -> this stage's tokens and grid."""
        if self.downsample is not None:
            x, grid = self.downsample(x, grid)
        for block in self.blocks:
            x = block(x, grid)
        return x, grid


class LeViT(HybridClassifier):
    """LeViT classifier; ``distillation=True`` adds the distillation head of the paper.

    With distillation, training mode returns ``(class_logits, distillation_logits)`` and eval
    mode their mean.
    """

    family = "levit"
    default_recipe = "levit"
    config_class = LeViTConfig
    head_names = ("head", "head_dist")
    cpu_graph_rewrite = True  # fp32: +14% single-thread CPU throughput (docs/benchmarks.md)

    def __init__(self, config: LeViTConfig) -> None:
        super().__init__(config)
        c = config
        self.img_size = to_hw(c.img_size)
        self.distillation = c.distillation
        self.num_features = c.embed_dim[-1]
        self.stem = (PatchEmbed if c.stem == "patchconv" else Patchify)(c.in_chans, c.embed_dim[0], c.norm)
        grid = self.img_size
        for _ in range(4):
            grid = _half(grid)
        self.pos_embed = None
        if c.pos_embed:  # A5: DeiT's learnt position embedding, on the stem's grid
            self.pos_embed = nn.Parameter(trunc_normal_(torch.zeros(1, grid[0] * grid[1], c.embed_dim[0]), std=0.02))
        self.grids: list[tuple[int, int]] = []
        stages = []
        for i, (dim, heads, depth) in enumerate(zip(c.embed_dim, c.num_heads, c.depth)):
            shrink = None
            if i > 0:
                shrink_heads = (c.shrink_num_heads[i - 1] if c.shrink_num_heads is not None
                                else c.embed_dim[i - 1] // c.key_dim)
                shrink = Shrink(c.embed_dim[i - 1], dim, shrink_heads, grid, c)
                grid = _half(grid)
            stages.append(Stage(shrink, [Block(dim, heads, grid, c) for _ in range(depth)]))
            self.grids.append(grid)
        self.stages = nn.ModuleList(stages)
        self.feature_info = [dict(num_chs=dim, reduction=16 * 2**i, module=f"stages.{i}")
                             for i, dim in enumerate(c.embed_dim)]
        self.reset_classifier(c.num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head(s) with freshly initialised ones for ``num_classes`` (0: features only)."""
        self.num_classes = self.config.num_classes = num_classes

        def make_head() -> nn.Module:
            if num_classes <= 0:
                return nn.Identity()
            if self.config.norm == "batch":
                return BNLinear(self.num_features, num_classes)
            linear = nn.Linear(self.num_features, num_classes)
            trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
            return nn.Sequential(OrderedDict(norm=nn.LayerNorm(self.num_features), linear=linear))

        self.head = make_head()
        self.head_dist = make_head() if self.distillation else None

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        if not self.config.dynamic_size and tuple(x.shape[-2:]) != self.img_size:
            h, w = self.img_size
            raise ValueError(
                f"{self.describe()} was built for {h}x{w} inputs (its attention biases are tied to that "
                f"grid); got {x.shape[-2]}x{x.shape[-1]}. Resize the images, create the model with "
                f"img_size=({x.shape[-2]}, {x.shape[-1]}) (tables resampled on load), or with dynamic_size=True "
                f"to serve any size."
            )

    @property
    def pos_grid(self) -> tuple[int, int]:
        """The grid ``pos_embed`` (A5) is learnt on: the stem's at the configured img_size."""
        return self.grids[0]

    def _stem(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        self.check_input(x)
        x = self.stem(x)
        grid = (x.shape[-2], x.shape[-1])
        # Contiguous tokens: a strided view would turn every linear map of stage 1 into a slower
        # batched product (the residual adds keep the input's layout). Channels-last first, then
        # one reshape: OpenVINO's convolution already writes that layout, where flatten-then-
        # transpose made it reorder to planar and transpose back (2% of LeViT-128S in bf16).
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], grid[0] * grid[1], x.shape[1])
        if self.pos_embed is not None:
            pos = self.pos_embed
            if grid != self.pos_grid:
                from timm.layers import resample_abs_pos_embed  # timm costs seconds to import: when needed

                pos = resample_abs_pos_embed(pos, list(grid), list(self.pos_grid), num_prefix_tokens=0)
            x = x + pos
        return x, grid

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups in depth order, as timm's layer-wise learning-rate decay reads them:
        the stem, then each stage's shrinking attention and blocks in order; the heads last."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", None), (r"^stages\.(\d+)\.blocks\.(\d+)", None)])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> final tokens ``(B, N, C_last)``, N in row-major grid order."""
        x, grid = self._stem(x)
        for stage in self.stages:
            x, grid = stage(x, grid)
        return x

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (strides 16, 32, 64) as timm returns them; ``indices``: which stages
        (``None`` all, ``n`` the last n). LeViT has no final norm, so ``norm`` changes nothing."""
        take, last = feature_take_indices(len(self.stages), indices)
        x, grid = self._stem(x)
        maps = []
        for i, stage in enumerate(self.stages[:last + 1] if stop_early else self.stages):
            x, grid = stage(x, grid)
            if i in take:
                maps.append(stage_output(x, grid, output_fmt))
        return maps if intermediates_only else (x, maps)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = x.mean(dim=1)
        if pre_logits:
            return x
        if self.head_dist is None:
            return self.head(x)
        logits, logits_dist = self.head(x), self.head_dist(x)
        if self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2
