"""The LeViT paper's grafting experiment (§3, Table 1): ResNet-50 stages under DeiT-S layers.

A ResNet-50 (torchvision's definition and key names) truncated after ``resnet_stages`` stages;
its map average-pooled to the transformer's grid (14x14 at 224, 1/16 of the input elsewhere),
projected to 384 channels by a 1x1 convolution, then the class token (and DeiT's distillation
token), a learnt position embedding and ``deit_layers`` DeiT-S layers (384 wide, 6 heads, MLP 4).
With 0 stages the ResNet is replaced by DeiT's 16x16 patch embedding; with 0 layers the model
is the truncated ResNet with a pooled linear classifier (4/0 is exactly ResNet-50).

Counting rule: Table 1's params for k = 1..3 exceed a graft without a distillation head by
0.34-0.38M, the size of a 384x1000 head; with DeiT's distillation token and head (our default)
all five rows are within 2% of the table (the 0/12 row, 22.44M against 22.0M, at +2.0%).

MACs: Table 1's transformer FLOPs are exactly n layers on the 196 grid tokens alone (no class
or distillation token) plus one per softmax score (12 layers: 4518.6M); we count the 198 tokens
the model runs, +1.0%. Its conv FLOPs include the 1x1 projection (without it rows 1-3 come out
3-4% low); the remaining 0.7-1.8% matches element-wise BatchNorm work, which we do not count.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..configs.graft import GraftConfig
from ..layers import trunc_normal_
from ..registry import to_hw
from .base import HybridClassifier

_RESNET_CHANNELS = (64, 256, 512, 1024, 2048)  # after the stem, then after each stage

__all__ = ["GraftConfig", "GraftedResNetDeiT"]


class ResNetTrunk(nn.Module):
    """ResNet-50's stem and first ``stages`` stages, with torchvision's module names."""

    def __init__(self, stages: int) -> None:
        super().__init__()
        import torchvision  # seconds to import (it loads torch._dynamo): only when a model is built

        resnet = torchvision.models.resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layers = [f"layer{i}" for i in range(1, stages + 1)]
        for name in self.layers:
            setattr(self, name, getattr(resnet, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.layers:
            x = getattr(self, name)(x)
        return x

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """A copy with every BatchNorm folded into the convolution before it (inference only)."""
        fused = copy.deepcopy(self).eval()
        pairs = [(fused, "conv1", "bn1")]
        for name in fused.layers:
            for block in getattr(fused, name):
                pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
                if block.downsample is not None:
                    pairs.append((block.downsample, "0", "1"))
        for owner, conv, bn in pairs:
            setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
            setattr(owner, bn, nn.Identity())
        return fused


class GraftedResNetDeiT(HybridClassifier):
    """Truncated ResNet-50 + DeiT-S layers; with distillation, training mode returns
    ``(class_logits, distillation_logits)`` and eval mode their mean, as LeViT does."""

    family = "graft"
    default_recipe = "deit"
    config_class = GraftConfig
    head_names = ("head", "head_dist")

    def __init__(self, config: GraftConfig) -> None:
        super().__init__(config)
        c = config
        self.distillation = c.distillation and c.deit_layers > 0  # no token to distil without layers
        if c.resnet_stages == 0:  # DeiT's own patch embedding
            self.patch_embed = nn.Conv2d(c.in_chans, c.embed_dim, 16, 16)
            channels = c.embed_dim
        else:
            self.trunk = ResNetTrunk(c.resnet_stages)
            channels = _RESNET_CHANNELS[c.resnet_stages]
        self.num_prefix_tokens = 0
        if c.deit_layers > 0:
            self.proj = nn.Conv2d(channels, c.embed_dim, 1) if channels != c.embed_dim else None
            self.pos_grid = tuple(math.ceil(n / 16) for n in to_hw(c.img_size))  # 14x14 at 224
            self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
            self.dist_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim)) if self.distillation else None
            self.num_prefix_tokens = 2 if self.distillation else 1
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.pos_grid[0] * self.pos_grid[1],
                                                      c.embed_dim))
            from timm.models.vision_transformer import Block  # DeiT's own block, as the paper grafts it

            rates = [c.drop_path_rate * i / max(c.deit_layers - 1, 1) for i in range(c.deit_layers)]
            self.blocks = nn.Sequential(*(Block(c.embed_dim, c.num_heads, c.mlp_ratio, qkv_bias=True, drop_path=r)
                                          for r in rates))
            self.norm = nn.LayerNorm(c.embed_dim)
            channels = c.embed_dim
        self.num_features = channels
        self.reset_classifier(c.num_classes)
        self._init_transformer()

    def _init_transformer(self) -> None:
        """DeiT's initialisation for everything but the ResNet (which keeps torchvision's)."""
        if self.config.deit_layers == 0:
            return
        for p in (self.cls_token, self.dist_token, self.pos_embed):
            if p is not None:
                trunc_normal_(p, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """Fresh head(s) for ``num_classes`` (0: features only)."""
        self.num_classes = self.config.num_classes = num_classes

        def make_head() -> nn.Module:
            if num_classes <= 0:
                return nn.Identity()
            head = nn.Linear(self.num_features, num_classes)
            trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
            return head

        self.head = make_head()
        self.head_dist = make_head() if self.distillation else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the ResNet map ``(B, C, h, w)`` (no DeiT layers) or normed tokens
        ``(B, prefix + grid cells, 384)``, class (and distillation) token first."""
        self.check_input(x)
        grid = (math.ceil(x.shape[-2] / 16), math.ceil(x.shape[-1] / 16))  # the transformer's: 14x14 at 224
        if self.config.resnet_stages == 0:  # pad to whole patches: the same ceil grid as the ResNet gives
            x = self.patch_embed(nn.functional.pad(x, (0, -x.shape[-1] % 16, 0, -x.shape[-2] % 16)))
        else:
            x = self.trunk(x)
        if self.config.deit_layers == 0:
            return x
        if x.shape[-2] > grid[0] or x.shape[-1] > grid[1]:  # the paper's average pooling to the grid
            x = nn.functional.adaptive_avg_pool2d(x, (min(grid[0], x.shape[-2]), min(grid[1], x.shape[-1])))
        if self.proj is not None:
            x = self.proj(x)
        map_grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        prefix = [self.cls_token] + ([self.dist_token] if self.dist_token is not None else [])
        x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1)
        pos = self.pos_embed
        if map_grid != self.pos_grid:
            from timm.layers import resample_abs_pos_embed

            pos = resample_abs_pos_embed(pos, list(map_grid), list(self.pos_grid), num_prefix_tokens=self.num_prefix_tokens)
        return self.norm(self.blocks(x + pos))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.config.deit_layers == 0:
            x = x.mean(dim=(2, 3))
            return x if pre_logits else self.head(x)
        if pre_logits:
            return x[:, 0]
        logits = self.head(x[:, 0])
        if self.head_dist is None:
            return logits
        logits_dist = self.head_dist(x[:, 1])
        if self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2
