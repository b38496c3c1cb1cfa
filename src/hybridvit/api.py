"""``create_model``: the one way to get a model, from a registered name."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from . import models as _models  # noqa: F401  (registers the model families)
from .checkpoints import download_weights, load_checkpoint
from .models import FeatureExtractor
from .registry import get_model_info


def create_model(
    name: str,
    pretrained: bool = False,
    num_classes: int = 1000,
    distillation: bool | None = None,
    checkpoint_path: str | Path | None = None,
    drop_path_rate: float | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2),
    **overrides: Any,
) -> nn.Module:
    """Build a registered model, optionally with published or local weights.

    ``distillation=None`` keeps the family default (LeViT: ``True``, two heads).
    ``pretrained=True`` downloads the official weights (cached, hash-checked); with another
    ``num_classes`` every weight but the classifier is loaded. ``checkpoint_path`` accepts
    any supported format (official release, timm, Hugging Face folder, hybridvit folder).
    Other keyword arguments override config fields, e.g. ``img_size=(256, 256)``.

    ``features_only=True`` returns a backbone (``FeatureExtractor``): the ``out_indices``
    stages' maps, in timm's conventions, with any checkpoint's classifier left out; LeViT
    backbones serve any input size (``dynamic_size=True``) unless told otherwise.
    """
    info = get_model_info(name)
    if features_only and hasattr(info.config, "dynamic_size"):
        overrides.setdefault("dynamic_size", True)
    changes: dict[str, Any] = dict(overrides, num_classes=num_classes)
    if distillation is not None:
        changes["distillation"] = distillation
    if drop_path_rate is not None:
        changes["drop_path_rate"] = drop_path_rate
    model = info.model_class(info.build_config(**changes))
    model.model_name = name
    if pretrained:
        if info.weights_url is None:
            raise ValueError(f"{name} has no published weights")
        load_checkpoint(model, download_weights(info.weights_url),
                        exclude_head=features_only or num_classes != info.config.num_classes)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path, exclude_head=features_only)
    return FeatureExtractor(model, out_indices) if features_only else model
