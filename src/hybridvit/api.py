"""``create_model``: the one way to get a model, from a registered name; ``load_source``: any model a
command line names (folders, runs, Hub repositories, published weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from . import models as _models  # noqa: F401  (registers the model families)
from .models import FeatureExtractor
from .registry import get_model_info, list_models, to_hw


def create_model(
    name: str,
    pretrained: bool = False,
    num_classes: int = 1000,
    pretrained_tag: str | None = None,
    distillation: bool | None = None,
    checkpoint_path: str | Path | None = None,
    drop_path_rate: float | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2),
    **overrides: Any,
) -> nn.Module:
    """Build a registered model, optionally with published or local weights.

    ``distillation=None`` keeps the family default (LeViT: ``True``, two heads).
    ``pretrained=True`` downloads the published weights (``pretrained_tag`` picks one of a
    variant's sets, e.g. CvT's ``"in22k-384"``; the model is then built at their input size
    unless ``img_size`` is given): LeViT from the official release (hash-checked, torch.hub
    cache), falling back to its Hugging Face Hub copies; CvT from the Hub (its cache,
    ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``). With another ``num_classes`` every weight but the
    classifier is loaded. ``checkpoint_path`` accepts
    any supported format (official release, timm, Hugging Face folder, hybridvit folder).
    Other keyword arguments override config fields, e.g. ``img_size=(256, 256)``.

    ``features_only=True`` returns a backbone (``FeatureExtractor``): the ``out_indices``
    stages' maps, in timm's conventions, with any checkpoint's classifier left out; LeViT
    backbones serve any input size (``dynamic_size=True``) unless told otherwise.
    """
    info = get_model_info(name)
    if pretrained_tag is not None and not pretrained:
        raise ValueError("pretrained_tag needs pretrained=True")
    weights = info.pretrained_weights(pretrained_tag) if pretrained else None
    if weights is not None and weights.img_size is not None:
        overrides.setdefault("img_size", weights.img_size)
    if features_only and hasattr(info.config, "dynamic_size"):
        overrides.setdefault("dynamic_size", True)
    changes: dict[str, Any] = dict(overrides, num_classes=num_classes)
    if distillation is not None:
        changes["distillation"] = distillation
    if drop_path_rate is not None:
        changes["drop_path_rate"] = drop_path_rate
    model = info.model_class(info.build_config(**changes))
    model.model_name = name
    if weights is not None or checkpoint_path is not None:  # reading weights imports timm: seconds
        from .checkpoints import download_pretrained, load_checkpoint
    if weights is not None:
        load_checkpoint(model, download_pretrained(weights.sources),
                        exclude_head=features_only or num_classes != weights.num_classes)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path, exclude_head=features_only)
    return FeatureExtractor(model, out_indices) if features_only else model


def pretrained_extra(name: str, tag: str | None = None) -> dict[str, Any]:
    """Class names and preprocessing of a variant's published weights, in the form trained models
    store them (``classes``: ImageNet synsets, as a val folder names them; ``class_names``: descriptions)."""
    info = get_model_info(name)
    weights = info.pretrained_weights(tag)
    extra: dict[str, Any] = {"input_size": list(to_hw(weights.img_size or info.config.img_size)),
                             "crop_pct": weights.crop_pct or info.crop_pct, "mean": list(info.mean), "std": list(info.std)}
    from .data import imagenet_labels  # torchvision's transforms: seconds to import

    labels = imagenet_labels(weights.num_classes)
    if labels:
        extra["classes"], extra["class_names"] = labels
    return extra


def load_source(source: str | Path, pretrained: bool = False, pretrained_tag: str | None = None
                ) -> tuple[nn.Module, dict[str, Any]]:
    """A model in eval mode and its class names and preprocessing, from what a command line names:
    a model folder, a training run, a ``checkpoint.pt``, ``hf-hub:ORG/NAME[@REVISION]``, or with
    ``pretrained=True`` a registered name (its published weights, ``pretrained_tag`` picking a set)."""
    name = str(source)
    if name in list_models() and not Path(name).exists():
        if not pretrained:
            raise ValueError(f"{name} is a model name: add --pretrained to use its published weights "
                             f"(or pass a model folder, run folder or checkpoint.pt)")
        return create_model(name, pretrained=True, pretrained_tag=pretrained_tag).eval(), pretrained_extra(name, pretrained_tag)
    if pretrained or pretrained_tag:
        raise ValueError(f"--pretrained/--pretrained-tag go with a registered model name, not {name}")
    from .checkpoints import load_trained

    return load_trained(source)
