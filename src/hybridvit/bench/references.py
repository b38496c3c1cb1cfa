"""Reference rows for ``--compare``: the same architectures as other libraries ship them, and
the other rows of the LeViT paper's Table 3 (timm models, jit-traced as in the paper)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

from ..registry import get_model_info
from .throughput import Candidate, eager, traced

# timm name: (input resolution, top-1 printed in the LeViT paper's Table 3)
PAPER_ROWS = {
    "efficientnet_b0": (224, 77.1), "efficientnet_b1": (240, 79.1), "efficientnet_b2": (260, 80.1),
    "efficientnet_b3": (300, 81.6), "efficientnet_b4": (380, 82.9),
    "deit_tiny_distilled_patch16_224": (224, 76.6), "deit_small_distilled_patch16_224": (224, 82.6),
    "resnet50": (224, None),
}
_OFFICIAL_NAMES = {"levit_128s": "LeViT_128S", "levit_128": "LeViT_128", "levit_192": "LeViT_192",
                   "levit_256": "LeViT_256", "levit_384": "LeViT_384"}


def _hf_model(name: str) -> torch.nn.Module:
    import transformers

    cfg = get_model_info(name).config
    if name.startswith("levit"):
        config = transformers.LevitConfig(hidden_sizes=list(cfg.embed_dim), num_attention_heads=list(cfg.num_heads),
                                          depths=list(cfg.depth), key_dim=[cfg.key_dim] * 3, drop_path_rate=0,
                                          num_labels=1000)
        return transformers.LevitForImageClassificationWithTeacher(config)
    config = transformers.CvtConfig(embed_dim=list(cfg.embed_dim), num_heads=list(cfg.num_heads), depth=list(cfg.depth),
                                    num_labels=1000)
    return transformers.CvtForImageClassification(config)


def _official_levit(repo: Path, name: str):
    """The official repository's model, BatchNorm-fused with its own utility (its speed test's recipe)."""
    sys.path.insert(0, str(repo))
    try:
        levit, utils = importlib.import_module("levit"), importlib.import_module("utils")
    finally:
        sys.path.remove(str(repo))

    def make():
        model = getattr(levit, _OFFICIAL_NAMES[name])(num_classes=1000)
        utils.replace_batchnorm(model)
        return model
    return make


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def reference_candidates(name: str, device: str, official_repo: Path | None = None) -> list[Candidate]:
    """Installed implementations of the same architecture as ``name``."""
    info = get_model_info(name)
    hw, top1 = info.input_size[1:], info.paper_top1
    rows = []
    if name.startswith("levit"):
        import timm

        rows.append(Candidate(f"timm {name}", eager(lambda: timm.create_model(name), device), hw, "timm", name, top1))
        if official_repo is not None:
            rows.append(Candidate(f"official {name} (fused, traced)", traced(_official_levit(official_repo, name), hw, device),
                                  hw, "official", name, top1))
    if _installed("transformers"):
        rows.append(Candidate(f"transformers {name}", eager(lambda: _hf_model(name), device, lambda o: o.logits), hw,
                              "transformers", name, top1))
    return rows


def paper_candidates(device: str) -> list[Candidate]:
    """The non-LeViT rows of the paper's Table 3, from timm, traced."""
    import timm

    return [Candidate(n, traced(lambda n=n: timm.create_model(n), (r, r), device), (r, r), "timm", n, top1)
            for n, (r, top1) in PAPER_ROWS.items()]
