"""LeViT's variants: the config of each, the paper's figures, its ablations and published weights.

Kept free of torch so that listing the models (``hybridvit models``) starts in a fraction of a second;
``hybridvit.models.levit`` builds the networks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..model_info import ModelInfo, PretrainedWeights, register_model

BIAS_RESAMPLING = ("bilinear", "keep")  # how attention-bias tables serve other key grids (layers.attention_bias)


@dataclass
class LeViTConfig:
    """Hyper-parameters of one LeViT variant (names follow the paper)."""

    embed_dim: tuple[int, ...]  # C per stage
    num_heads: tuple[int, ...]  # N per stage
    depth: tuple[int, ...]  # attention+MLP pairs per stage
    key_dim: int = 16  # D: per-head dimension of queries and keys
    attn_ratio: float = 2.0  # V has attn_ratio * D channels per head
    mlp_ratio: float = 2.0
    shrink_attn_ratio: float = 4.0  # V is 4D in shrinking attention
    shrink_mlp_ratio: float = 2.0
    shrink_num_heads: tuple[int, ...] | None = None  # per shrink; None: C/D of the stage before (official)
    # Ablation switches (paper Table 5); the defaults are LeViT.
    stem: str = "patchconv"  # "patchconv": 4 stride-2 3x3 convs; "patchify": one 16x16 stride-16 conv (A2)
    norm: str = "batch"  # "batch": BN after every linear map; "layer": pre-norm LayerNorm, as DeiT (A3)
    attention_bias: bool = True  # False: no attention bias (A5 adds pos_embed instead)
    pos_embed: bool = False  # a learnt position embedding added after the stem (A5)
    attn_activation: bool = True  # Hardswish on A·V before the projection (False: A7)
    ablation: str | None = None  # the paper's name of these settings ("A1".."A7"): a label, set by create_model
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
        if self.shrink_num_heads is not None:
            self.shrink_num_heads = tuple(self.shrink_num_heads)
        if self.bias_resampling not in BIAS_RESAMPLING:
            raise ValueError(f"bias_resampling must be one of {BIAS_RESAMPLING}, got {self.bias_resampling!r}")
        stages = len(self.embed_dim)
        if not stages or len(self.num_heads) != stages or len(self.depth) != stages:
            raise ValueError(f"embed_dim, num_heads and depth need one value per stage; got {self.embed_dim}, "
                             f"{self.num_heads}, {self.depth}")
        if self.shrink_num_heads is not None and len(self.shrink_num_heads) != stages - 1:
            raise ValueError(f"shrink_num_heads needs one value per shrink ({stages - 1}); got {self.shrink_num_heads}")
        for option, value, valid in (("stem", self.stem, _STEMS), ("norm", self.norm, _NORMS)):
            if value not in valid:
                raise ValueError(f"{option} must be one of {valid}, got {value!r}")
        if self.ablation is not None and self.ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {sorted(ABLATIONS)}, got {self.ablation!r}")


_STEMS = ("patchconv", "patchify")
_NORMS = ("batch", "layer")

# The paper's ablations of LeViT-128S (Table 5; widths of A1 and A6 from appendix A.2).
ABLATIONS: dict[str, dict[str, Any]] = {
    "A1": dict(embed_dim=(114,), num_heads=(3,), depth=(11,), key_dim=19),  # no pyramid: C = 2ND
    "A2": dict(stem="patchify"),
    "A3": dict(norm="layer"),
    "A4": dict(distillation=False),  # and trained without a teacher
    "A5": dict(attention_bias=False, pos_embed=True),
    "A6": dict(embed_dim=(120, 180, 240), key_dim=30, attn_ratio=1.0, mlp_ratio=4.0, shrink_attn_ratio=1.0,
               shrink_mlp_ratio=4.0, shrink_num_heads=(16, 24)),  # no wider blocks: Q, K, V all D = 30
    "A7": dict(attn_activation=False),
}
_WIDTH_ABLATIONS = ("A1", "A6")  # replace LeViT-128S's widths: defined for that variant only


def _paper(gpu: float, cpu: float, arm: float, top1: float, top5: float, release: str, hf_name: str, mb: float) -> dict:
    """The paper's figures and the published weights: the official file first, then its Hub copies."""
    timm_name = hf_name.lower().replace("-", "_")
    weights = PretrainedWeights("in1k", (_URL + release, f"hf-hub:facebook/{hf_name}", f"hf-hub:timm/{timm_name}.fb_dist_in1k"),
                                top1=top1, download_mb=mb)
    return dict(paper_top1=top1, paper_top5=top5, paper_gpu_throughput=gpu, paper_cpu_throughput=cpu,
                paper_arm_throughput=arm, pretrained=(weights,))


_URL = "https://dl.fbaipublicfiles.com/LeViT/"
_VARIANTS = {
    "levit_128s": (LeViTConfig((128, 256, 384), (4, 6, 8), (2, 3, 4), key_dim=16),
                   _paper(12880, 131.1, 39.1, 76.6, 92.9, "LeViT-128S-96703c44.pth", "levit-128S", 31)),
    "levit_128": (LeViTConfig((128, 256, 384), (4, 8, 12), (4, 4, 4), key_dim=16),
                  _paper(9266, 94.0, 30.8, 78.6, 94.0, "LeViT-128-b88c2750.pth", "levit-128", 37)),
    "levit_192": (LeViTConfig((192, 288, 384), (3, 5, 6), (4, 4, 4), key_dim=32),
                  _paper(8601, 65.0, 24.2, 80.0, 94.7, "LeViT-192-92712e41.pth", "levit-192", 44)),
    "levit_256": (LeViTConfig((256, 384, 512), (4, 6, 8), (4, 4, 4), key_dim=32),
                  _paper(6582, 42.5, 16.4, 81.6, 95.4, "LeViT-256-13b5763e.pth", "levit-256", 76)),
    "levit_384": (LeViTConfig((384, 512, 768), (6, 9, 12), (4, 4, 4), key_dim=32, drop_path_rate=0.1),
                  _paper(4165, 23.1, 9.4, 82.6, 96.0, "LeViT-384-9bdaf2e2.pth", "levit-384", 157)),
}

for _name, (_config, _meta) in _VARIANTS.items():
    _ablations = {k: v for k, v in ABLATIONS.items() if _name == "levit_128s" or k not in _WIDTH_ABLATIONS}
    register_model(ModelInfo(name=_name, builder="hybridvit.models.levit:LeViT", family="levit", config=_config,
                             crop_pct=224 / 256, ablations=_ablations, **_meta))

