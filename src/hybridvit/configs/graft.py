"""The grafting experiment's model (LeViT paper, Table 1): its config and the paper's figures (torch-free,
as ``configs.levit``); ``hybridvit.models.graft`` builds the network."""

from __future__ import annotations

from dataclasses import dataclass

from ..model_info import ModelInfo, register_model


@dataclass
class GraftConfig:
    """How much of each network is kept, and DeiT-S's widths."""

    resnet_stages: int = 2  # k: ResNet-50 stages kept (0-4)
    deit_layers: int = 6  # n: DeiT-S layers on top
    embed_dim: int = 384
    num_heads: int = 6
    mlp_ratio: float = 4.0
    distillation: bool = True  # DeiT's distillation token and head (needs deit_layers > 0)
    drop_path_rate: float = 0.1  # DeiT-S's, rising linearly over the layers
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if isinstance(self.img_size, (list, tuple)):
            self.img_size = tuple(self.img_size)
        if not 0 <= self.resnet_stages <= 4:
            raise ValueError(f"resnet_stages must be 0-4 (ResNet-50 has 4 stages); got {self.resnet_stages}")
        if self.deit_layers < 0:
            raise ValueError(f"deit_layers must be 0 or more; got {self.deit_layers}")


register_model(ModelInfo(name="graft_resnet50_deit_s", builder="hybridvit.models.graft:GraftedResNetDeiT", family="graft",
                         config=GraftConfig(), paper_top1=80.9, paper_gpu_throughput=1048))
