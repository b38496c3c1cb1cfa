"""Model name -> builder, default config and metadata (paper figures, weights, preprocessing)."""

from __future__ import annotations

import dataclasses
from fnmatch import fnmatch
from typing import TYPE_CHECKING, Any

from . import model_info

# the variant's description and registration, re-exported: where users have always imported them
from .model_info import (  # noqa: F401
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelInfo,
    PretrainedWeights,
    register_model,
    to_hw,
)

if TYPE_CHECKING:
    from torch import nn


def _registry() -> dict[str, ModelInfo]:
    """Every registered variant, the built-in families' included (``hybridvit.configs`` registers them
    when first asked, so ``import hybridvit`` does not pay for it)."""
    from . import configs  # noqa: F401

    return model_info._REGISTRY


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (e.g. ``"levit_*"``), smallest first."""
    return [n for n in _registry() if fnmatch(n, pattern)]


def get_model_info(name: str) -> ModelInfo:
    try:
        return _registry()[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None


def find_variant(model_class: type[nn.Module], config: Any) -> str | None:
    """The registered name whose architecture equals ``config`` (see ``architecture``)."""
    for info in _registry().values():
        if info.model_class is model_class and architecture(info.config) == architecture(config):
            return info.name
    return None


# Config fields that change neither the variant's identity nor which weights fit it
# (bias tables are resampled for another input size; CvT's activation has no weights).
FREE_FIELDS = frozenset({"num_classes", "distillation", "drop_path_rate", "img_size", "mlp_act", "dynamic_size",
                         "bias_resampling", "ablation"})


def architecture(config: Any) -> dict[str, Any]:
    """The fields of a config that identify a variant."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in FREE_FIELDS}


def family_model_class(family: str) -> type[nn.Module]:
    """The model class of a family name such as ``"levit"``."""
    for info in _registry().values():
        if info.family == family:
            return info.model_class
    raise ValueError(f"unknown model family {family!r}; known families: "
                     f"{', '.join(dict.fromkeys(info.family for info in _registry().values()))}")
