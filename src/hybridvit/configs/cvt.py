"""CvT's variants: the config of each, the paper's figures and the published weights (torch-free, as
``configs.levit``); ``hybridvit.models.cvt`` builds the networks."""

from __future__ import annotations

from dataclasses import dataclass

from ..model_info import ModelInfo, PretrainedWeights, register_model

MLP_ACTIVATIONS = ("gelu", "quick_gelu")


@dataclass
class CvTConfig:
    """Hyper-parameters of one CvT variant (names follow the official configs)."""

    embed_dim: tuple[int, int, int]
    num_heads: tuple[int, int, int]
    depth: tuple[int, int, int]
    patch_size: tuple[int, int, int] = (7, 3, 3)
    patch_stride: tuple[int, int, int] = (4, 2, 2)
    patch_padding: tuple[int, int, int] = (2, 1, 1)
    mlp_ratio: float = 4.0
    kernel_qkv: int = 3
    stride_kv: int = 2
    stride_q: int = 1
    qkv_bias: bool = True
    # The official code trains with QuickGELU; Hugging Face's port (and the paper) say GELU.
    mlp_act: str = "gelu"
    drop_path_rate: float = 0.1  # last stage, rising linearly over its blocks; earlier stages 0
    img_size: int | tuple[int, int] = 224  # default input size (preprocessing, MACs); any size runs
    in_chans: int = 3
    num_classes: int = 1000
    # Ablations (defaults: CvT). A learnt position embedding per stage, sized for img_size (Table 5).
    pos_embed: tuple[bool, bool, bool] = (False, False, False)
    conv_proj: tuple[bool, bool, bool] = (True, True, True)  # False: linear q/k/v projection (Table 8)

    def __post_init__(self) -> None:
        for name in ("embed_dim", "num_heads", "depth", "patch_size", "patch_stride", "patch_padding", "pos_embed",
                     "conv_proj"):
            value = getattr(self, name)  # JSON gives lists; a scalar or a string is not one value per stage
            if not isinstance(value, (list, tuple)) or len(value) != 3:
                raise ValueError(f"{name} needs one value per stage (3); got {value!r}")
            setattr(self, name, tuple(value))
        for name in ("pos_embed", "conv_proj"):
            flags = getattr(self, name)
            if not all(isinstance(f, bool) or f in (0, 1) for f in flags):
                raise ValueError(f"{name} needs one True/False per stage; got {flags!r}")
            setattr(self, name, tuple(bool(f) for f in flags))
        if isinstance(self.img_size, (list, tuple)):
            self.img_size = tuple(self.img_size)
        if self.mlp_act not in MLP_ACTIVATIONS:
            raise ValueError(f"mlp_act must be one of {MLP_ACTIVATIONS}, got {self.mlp_act!r}")



def _hub(tag: str, repo: str, top1: float, mb: float) -> PretrainedWeights:
    """Weights on the Hugging Face Hub (the official release sits behind a file-sharing link)."""
    big = tag.endswith("384")
    return PretrainedWeights(tag, (f"hf-hub:microsoft/{repo}",), img_size=384 if big else 224, crop_pct=1.0 if big else 0.875,
                             pretrain="ImageNet-22k, then 1k" if tag.startswith("in22k") else "ImageNet-1k", top1=top1, download_mb=mb)


_VARIANTS = {
    "cvt_13": (CvTConfig((64, 192, 384), (1, 3, 6), (1, 2, 10)),
               dict(paper_top1=81.6, pretrained=(_hub("in1k", "cvt-13", 81.6, 80), _hub("in1k-384", "cvt-13-384", 83.0, 80),
                                                 _hub("in22k-384", "cvt-13-384-22k", 83.3, 80)))),
    "cvt_21": (CvTConfig((64, 192, 384), (1, 3, 6), (1, 4, 16)),
               dict(paper_top1=82.5, pretrained=(_hub("in1k", "cvt-21", 82.5, 127), _hub("in1k-384", "cvt-21-384", 83.3, 127),
                                                 _hub("in22k-384", "cvt-21-384-22k", 84.9, 127)))),
    "cvt_w24": (CvTConfig((192, 768, 1024), (3, 12, 16), (2, 2, 20), drop_path_rate=0.3, img_size=384),
                dict(paper_top1=87.7, crop_pct=1.0, pretrained=(_hub("in22k-384", "cvt-w24-384-22k", 87.7, 1109),))),
}

for _name, (_config, _meta) in _VARIANTS.items():
    register_model(ModelInfo(name=_name, builder="hybridvit.models.cvt:CvT", family="cvt", config=_config, **_meta))
