"""LeViT (Graham et al., ICCV 2021): a vision transformer in ConvNet's clothing.

Layout of the paper's Table 2: a 4-convolution patch embedding (stride 16), then three
stages of attention + MLP residual pairs on a token grid, joined by shrinking attention
(queries on the 2x subsampled grid, keys/values on the full grid, no residual). Tokens
travel token-major ``(B, N, C)``; every linear map carries a BatchNorm that ``fuse`` folds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import DropPath
from torch import nn

from ..layers import BIAS_RESAMPLING, AttentionBias, BNLinear, ConvBN, LinearBN, attention
from ..registry import ModelInfo, register_model, to_hw
from .base import HybridClassifier
from .features import feature_take_indices, stage_output


@dataclass
class LeViTConfig:
    """Hyper-parameters of one LeViT variant (names follow the paper)."""

    embed_dim: tuple[int, int, int]  # C per stage
    num_heads: tuple[int, int, int]  # N per stage
    depth: tuple[int, int, int]  # attention+MLP pairs per stage
    key_dim: int = 16  # D: per-head dimension of queries and keys
    attn_ratio: float = 2.0  # V has attn_ratio * D channels per head
    mlp_ratio: float = 2.0
    shrink_attn_ratio: float = 4.0  # V is 4D in shrinking attention
    shrink_mlp_ratio: float = 2.0
    drop_path_rate: float = 0.0  # same rate on every residual branch, as in the official code
    img_size: int | tuple[int, int] = 224  # the size the attention-bias tables are learnt for
    in_chans: int = 3
    num_classes: int = 1000
    distillation: bool = True
    # Serve any input size: biases for other key grids come from the learnt tables (cached per size).
    dynamic_size: bool = False
    bias_resampling: str = "bilinear"  # how: "bilinear" over the offsets, or "keep" them (smaller grids)

    def __post_init__(self) -> None:
        # JSON round-trips turn tuples into lists; keep one canonical form.
        self.embed_dim, self.num_heads, self.depth = (
            tuple(self.embed_dim), tuple(self.num_heads), tuple(self.depth)
        )
        if isinstance(self.img_size, (list, tuple)):
            self.img_size = tuple(self.img_size)
        if self.bias_resampling not in BIAS_RESAMPLING:
            raise ValueError(f"bias_resampling must be one of {BIAS_RESAMPLING}, got {self.bias_resampling!r}")


def _half(grid: tuple[int, int]) -> tuple[int, int]:
    """Grid size after a stride-2 step (3x3 conv with padding 1, or subsampling): ceil."""
    return (grid[0] + 1) // 2, (grid[1] + 1) // 2


class PatchEmbed(nn.Sequential):
    """Four 3x3 stride-2 convolutions, C/8 -> C/4 -> C/2 -> C, Hardswish between them."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(in_chans, dim // 8, 3, 2, 1)
        self.act1 = nn.Hardswish()
        self.conv2 = ConvBN(dim // 8, dim // 4, 3, 2, 1)
        self.act2 = nn.Hardswish()
        self.conv3 = ConvBN(dim // 4, dim // 2, 3, 2, 1)
        self.act3 = nn.Hardswish()
        self.conv4 = ConvBN(dim // 2, dim, 3, 2, 1)


class Attention(nn.Module):
    """Multi-head attention with small keys, attention bias and Hardswish on A·V."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, grid: tuple[int, int],
                 bias_resampling: str = "bilinear") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        # Output channels are grouped per head as [q | k | v], the official layout.
        self.qkv = LinearBN(dim, num_heads * (2 * key_dim + self.val_dim))
        self.attention_bias = AttentionBias(num_heads, grid, resampling=bias_resampling)
        self.act = nn.Hardswish()
        self.proj = LinearBN(num_heads * self.val_dim, dim, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, N, d)
        x = attention(q, k, v, self.attention_bias(grid), query_grid=grid, key_grid=grid)
        return self.proj(self.act(x.transpose(1, 2).reshape(B, N, -1)))


class ShrinkAttention(nn.Module):
    """Attention between stages: queries on the subsampled grid, keys/values on the full one."""

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, num_heads: int, attn_ratio: float,
                 grid: tuple[int, int], bias_resampling: str = "bilinear") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.kv = LinearBN(in_dim, num_heads * (key_dim + self.val_dim))  # per head [k | v]
        self.q = LinearBN(in_dim, num_heads * key_dim)
        self.attention_bias = AttentionBias(num_heads, grid, stride=2, resampling=bias_resampling)
        self.act = nn.Hardswish()
        self.proj = LinearBN(num_heads * self.val_dim, out_dim)  # no residual: BN starts at 1

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens on ``grid`` -> tokens on the subsampled grid (odd sizes round up, as the stem does)."""
        B, N, C = x.shape
        k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        x_sub = x.view(B, grid[0], grid[1], C)[:, ::2, ::2]
        sub_grid = (x_sub.shape[1], x_sub.shape[2])
        x_sub = x_sub.reshape(B, -1, C)
        q = self.q(x_sub).view(B, x_sub.shape[1], self.num_heads, self.key_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        x = attention(q, k, v, self.attention_bias(grid), query_grid=sub_grid, key_grid=grid)
        return self.proj(self.act(x.transpose(1, 2).reshape(B, x_sub.shape[1], -1))), sub_grid


class MLP(nn.Module):
    """Linear expansion + BN, Hardswish, linear reduction + BN (zero-initialised: residual)."""

    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.up = LinearBN(dim, hidden)
        self.act = nn.Hardswish()
        self.down = LinearBN(hidden, dim, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    """One attention + MLP pair, each a residual branch with drop path."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, mlp_ratio: float,
                 grid: tuple[int, int], drop_path: float, bias_resampling: str = "bilinear") -> None:
        super().__init__()
        self.attn = Attention(dim, key_dim, num_heads, attn_ratio, grid, bias_resampling)
        self.mlp = MLP(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(x, grid))
        return x + self.drop_path(self.mlp(x))


class Shrink(nn.Module):
    """Shrinking attention (C -> C', grid halved) followed by a residual MLP block."""

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, attn_ratio: float, mlp_ratio: float,
                 grid: tuple[int, int], drop_path: float, bias_resampling: str = "bilinear") -> None:
        super().__init__()
        self.attn = ShrinkAttention(in_dim, out_dim, key_dim, in_dim // key_dim, attn_ratio, grid, bias_resampling)
        self.mlp = MLP(out_dim, mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        x, grid = self.attn(x, grid)
        return x + self.drop_path(self.mlp(x)), grid


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
        self.stem = PatchEmbed(c.in_chans, c.embed_dim[0])
        grid = self.img_size
        for _ in range(4):
            grid = _half(grid)
        self.grids: list[tuple[int, int]] = []
        stages = []
        for i, (dim, heads, depth) in enumerate(zip(c.embed_dim, c.num_heads, c.depth)):
            shrink = None
            if i > 0:
                shrink = Shrink(c.embed_dim[i - 1], dim, c.key_dim, c.shrink_attn_ratio, c.shrink_mlp_ratio,
                                grid, c.drop_path_rate, c.bias_resampling)
                grid = _half(grid)
            blocks = [Block(dim, c.key_dim, heads, c.attn_ratio, c.mlp_ratio, grid, c.drop_path_rate, c.bias_resampling)
                      for _ in range(depth)]
            stages.append(Stage(shrink, blocks))
            self.grids.append(grid)
        self.stages = nn.ModuleList(stages)
        self.feature_info = [dict(num_chs=dim, reduction=16 * 2**i, module=f"stages.{i}")
                             for i, dim in enumerate(c.embed_dim)]
        self.reset_classifier(c.num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head(s) with freshly initialised ones for ``num_classes`` (0: features only)."""
        self.num_classes = self.config.num_classes = num_classes

        def make_head() -> nn.Module:
            return BNLinear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

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

    def _stem(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        self.check_input(x)
        x = self.stem(x)
        # Contiguous tokens: a strided view would turn every linear map of stage 1 into a slower
        # batched product (the residual adds keep the input's layout).
        return x.flatten(2).transpose(1, 2).contiguous(), (x.shape[-2], x.shape[-1])

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


def _paper(gpu: float, cpu: float, arm: float, top1: float, top5: float, url: str) -> dict:
    return dict(paper_top1=top1, paper_top5=top5, paper_gpu_throughput=gpu, paper_cpu_throughput=cpu,
                paper_arm_throughput=arm, weights_url=url)


_URL = "https://dl.fbaipublicfiles.com/LeViT/"
_VARIANTS = {
    "levit_128s": (LeViTConfig((128, 256, 384), (4, 6, 8), (2, 3, 4), key_dim=16),
                   _paper(12880, 131.1, 39.1, 76.6, 92.9, _URL + "LeViT-128S-96703c44.pth")),
    "levit_128": (LeViTConfig((128, 256, 384), (4, 8, 12), (4, 4, 4), key_dim=16),
                  _paper(9266, 94.0, 30.8, 78.6, 94.0, _URL + "LeViT-128-b88c2750.pth")),
    "levit_192": (LeViTConfig((192, 288, 384), (3, 5, 6), (4, 4, 4), key_dim=32),
                  _paper(8601, 65.0, 24.2, 80.0, 94.7, _URL + "LeViT-192-92712e41.pth")),
    "levit_256": (LeViTConfig((256, 384, 512), (4, 6, 8), (4, 4, 4), key_dim=32),
                  _paper(6582, 42.5, 16.4, 81.6, 95.4, _URL + "LeViT-256-13b5763e.pth")),
    "levit_384": (LeViTConfig((384, 512, 768), (6, 9, 12), (4, 4, 4), key_dim=32, drop_path_rate=0.1),
                  _paper(4165, 23.1, 9.4, 82.6, 96.0, _URL + "LeViT-384-9bdaf2e2.pth")),
}

for _name, (_config, _meta) in _VARIANTS.items():
    register_model(ModelInfo(name=_name, model_class=LeViT, config=_config, crop_pct=224 / 256, **_meta))

