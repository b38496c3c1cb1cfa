"""CvT (Wu et al., ICCV 2021): convolutions introduced into the vision transformer.

Three stages, each opening with a convolutional token embedding (overlapping strided conv +
LayerNorm). Inside a block, q, k and v come from a convolutional projection: a depth-wise
3x3 convolution + BatchNorm on the token map (stride 1 for q, 2 for k and v), then a linear
map. No positional embedding, so any input size works with the same weights. The class
token exists only in the last stage; it skips the convolutional projection.

The paper's ablations are config options: ``pos_embed`` per stage (Table 5), non-overlapping
patch embedding through ``patch_size``/``patch_padding`` (Table 6), ``stride_kv`` (Table 7) and
``conv_proj`` per stage (Table 8: False is ViT's position-wise linear projection).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..configs.cvt import CvTConfig
from ..layers import ConvBN, DropPath, QuickGELU, attention, trunc_normal_
from ..registry import to_hw
from .base import HybridClassifier
from .features import feature_take_indices, stage_output

_ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}  # by configs.cvt.MLP_ACTIVATIONS

__all__ = ["CvT", "CvTConfig"]


class ConvEmbed(nn.Module):
    """Convolutional token embedding: overlapping strided conv, then LayerNorm over channels."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride, padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(B, C, H, W)`` map -> ``(B, H'*W', dim)`` normalised tokens and the grid ``(H', W')``."""
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        # channels-last, then one reshape: the layout a CPU runtime's convolution writes (no reorder)
        return self.norm(x.permute(0, 2, 3, 1).reshape(x.shape[0], grid[0] * grid[1], x.shape[1])), grid


class ConvAttention(nn.Module):
    """Multi-head attention with convolutional projections of q, k, v."""

    def __init__(self, dim: int, num_heads: int, kernel: int, stride_q: int, stride_kv: int,
                 qkv_bias: bool, with_cls_token: bool, conv_proj: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.with_cls_token = with_cls_token
        self.conv_proj = conv_proj
        # As in the official code the logits are scaled by the full width, not the head width.
        self.scale = dim**-0.5
        pad = kernel // 2
        if conv_proj:
            self.conv_proj_q = ConvBN(dim, dim, kernel, stride_q, pad, groups=dim)
            self.conv_proj_k = ConvBN(dim, dim, kernel, stride_kv, pad, groups=dim)
            self.conv_proj_v = ConvBN(dim, dim, kernel, stride_kv, pad, groups=dim)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        return x.view(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        if not self.conv_proj:  # ViT's projection: every token, class token included, at full resolution
            q, k, v = self._heads(self.proj_q(x)), self._heads(self.proj_k(x)), self._heads(self.proj_v(x))
            x = attention(q, k, v, scale=self.scale, query_grid=grid, key_grid=grid)
            return self.proj(x.transpose(1, 2).reshape(B, N, C))
        cls = None
        if self.with_cls_token:
            cls, x = x[:, :1], x[:, 1:]
        x_map = x.transpose(1, 2).reshape(B, C, *grid)
        q, k, v = (conv(x_map) for conv in (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v))
        q_grid, kv_grid = (q.shape[-2], q.shape[-1]), (k.shape[-2], k.shape[-1])
        q, k, v = (t.flatten(2).transpose(1, 2) for t in (q, k, v))
        if cls is not None:  # the class token bypasses the convolution and rejoins here
            q, k, v = torch.cat((cls, q), 1), torch.cat((cls, k), 1), torch.cat((cls, v), 1)
        q, k, v = self._heads(self.proj_q(q)), self._heads(self.proj_k(k)), self._heads(self.proj_v(v))
        x = attention(q, k, v, scale=self.scale, query_grid=q_grid, key_grid=kv_grid)
        x = x.transpose(1, 2).reshape(B, q.shape[2], C)
        return self.proj(x)


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float, act: type[nn.Module]) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: LN -> conv attention -> residual, LN -> MLP -> residual."""

    def __init__(self, dim: int, num_heads: int, config: CvTConfig, with_cls_token: bool, drop_path: float,
                 conv_proj: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ConvAttention(dim, num_heads, config.kernel_qkv, config.stride_q, config.stride_kv,
                                  config.qkv_bias, with_cls_token, conv_proj)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, config.mlp_ratio, _ACTIVATIONS[config.mlp_act])
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stage(nn.Module):
    """Convolutional token embedding, optional class token, then the blocks."""

    def __init__(self, in_chans: int, index: int, config: CvTConfig, with_cls_token: bool, drop_path: float,
                 grid: tuple[int, int]) -> None:
        super().__init__()
        dim = config.embed_dim[index]
        self.embed = ConvEmbed(in_chans, dim, config.patch_size[index], config.patch_stride[index],
                               config.patch_padding[index])
        self.pos_grid = grid  # the embedding's grid at the configured img_size: pos_embed's
        self.pos_embed = None
        if config.pos_embed[index]:
            self.pos_embed = nn.Parameter(trunc_normal_(torch.zeros(1, grid[0] * grid[1], dim), std=0.02))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if with_cls_token else None
        depth = config.depth[index]
        rates = [drop_path * j / (depth - 1) if depth > 1 else 0.0 for j in range(depth)]  # linspace(0, rate)
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads[index], config, with_cls_token, rate, config.conv_proj[index]) for rate in rates)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(B, C, H, W)`` map -> ``(B, [1 +] H'*W', dim)`` tokens and the grid ``(H', W')``."""
        x, grid = self.embed(x)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if grid != self.pos_grid:  # another input size: the embedding is resampled to this grid
                from timm.layers import resample_abs_pos_embed  # timm costs seconds to import: when needed

                pos = resample_abs_pos_embed(pos, list(grid), list(self.pos_grid), num_prefix_tokens=0)
            x = x + pos
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for block in self.blocks:
            x = block(x, grid)
        return x, grid


class CvT(HybridClassifier):
    """CvT classifier: LayerNorm + Linear head on the last stage's class token."""

    family = "cvt"
    default_recipe = "cvt"
    config_class = CvTConfig

    def __init__(self, config: CvTConfig) -> None:
        super().__init__(config)
        c = config
        self.num_features = c.embed_dim[-1]
        stages, in_chans, grid = [], c.in_chans, to_hw(c.img_size)
        for i in range(3):
            last = i == 2
            grid = tuple((n + 2 * c.patch_padding[i] - c.patch_size[i]) // c.patch_stride[i] + 1 for n in grid)
            stages.append(Stage(in_chans, i, c, with_cls_token=last, drop_path=c.drop_path_rate if last else 0.0,
                                grid=grid))
            in_chans = c.embed_dim[i]
        self.stages = nn.ModuleList(stages)
        reductions = [math.prod(c.patch_stride[:i + 1]) for i in range(3)]
        self.feature_info = [dict(num_chs=dim, reduction=r, module=f"stages.{i}")
                             for i, (dim, r) in enumerate(zip(c.embed_dim, reductions))]
        self.norm = nn.LayerNorm(self.num_features)
        self.reset_classifier(c.num_classes)
        self.apply(self._init_weights)
        for stage in self.stages:
            if stage.cls_token is not None:
                nn.init.trunc_normal_(stage.cls_token, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh one for ``num_classes`` (0: features only)."""
        self.num_classes = self.config.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups in depth order, as timm's layer-wise learning-rate decay reads them:
        each stage's token embedding (and class token), then its blocks in order; the norm and head last."""
        return dict(blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.(?:embed|cls_token)", None), (r"^stages\.(\d+)\.blocks\.(\d+)", None)])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> normalised last-stage tokens ``(B, 1 + H'*W', C)``, class token first."""
        self.check_input(x)
        for stage in self.stages[:-1]:
            tokens, grid = stage(x)
            x = stage_output(tokens, grid, "NCHW")  # map for the next embedding
        tokens, _ = self.stages[-1](x)
        return self.norm(tokens)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (strides 4, 8, 16) as timm returns them, without the class token;
        ``norm`` applies the final LayerNorm to the last stage's map (it only fits that width)."""
        self.check_input(x)
        take, last = feature_take_indices(len(self.stages), indices)
        maps = []
        for i, stage in enumerate(self.stages[:last + 1] if stop_early else self.stages):
            tokens, grid = stage(x)
            final = i == len(self.stages) - 1
            normed = self.norm(tokens) if final else tokens
            if i in take:
                patches = (normed if norm else tokens)[:, tokens.shape[1] - grid[0] * grid[1]:]  # no class token
                maps.append(stage_output(patches, grid, output_fmt))
            x = normed if final else stage_output(tokens, grid, "NCHW")
        return maps if intermediates_only else (x, maps)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)
