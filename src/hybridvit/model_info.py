"""What the registry knows of a variant (builder, default config, paper figures, weights,
preprocessing: ``ModelInfo``) and the store variants are registered in. A leaf module: the family
configs register into it and ``registry`` looks variants up in it (loading the built-in families
on first use), so the dependencies run one way."""

from __future__ import annotations

import dataclasses
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``img_size`` as ``(height, width)``."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@dataclass(frozen=True)
class PretrainedWeights:
    """One published set of weights of a variant, where to get it and the input it expects."""

    tag: str  # e.g. "in1k", "in1k-384", "in22k-384"
    # Tried in order: https URLs (the official release, hash-checked by torch.hub) and
    # "hf-hub:ORG/NAME[@REVISION]" repositories (a transformers or timm model folder).
    sources: tuple[str, ...]
    img_size: int | None = None  # None: the variant's default
    crop_pct: float | None = None  # None: the variant's default
    num_classes: int = 1000
    pretrain: str = "ImageNet-1k"  # the data before the ImageNet-1k fine-tuning, when there was one
    top1: float | None = None  # ImageNet-1k val top-1 the authors report for these weights
    download_mb: float | None = None  # size of the file a first use downloads


@dataclass(frozen=True)
class ModelInfo:
    """Everything hybridvit knows about a registered variant.

    ``builder`` is the model class, or its ``"module:QualName"`` path, imported on first use: the
    built-in variants name theirs, so listing them imports no torch (``family`` is then required).
    """

    name: str
    builder: type[nn.Module] | str
    config: Any  # the family's config dataclass with this variant's values
    pretrained: tuple[PretrainedWeights, ...] = ()  # the first is the default
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    paper_top1: float | None = None
    paper_top5: float | None = None
    paper_gpu_throughput: float | None = None  # images/s, V100, from the paper
    paper_cpu_throughput: float | None = None  # images/s, one Xeon 6138 thread, from the paper
    paper_arm_throughput: float | None = None  # images/s, one Graviton2 thread, from the paper
    # The paper's named ablations of this variant: ``ablation="A3"`` applies those config changes.
    ablations: dict[str, dict[str, Any]] = field(default_factory=dict)
    family: str = ""  # e.g. "levit"; default: the builder class's ``family``

    def __post_init__(self) -> None:
        if isinstance(self.builder, str):
            if ":" not in self.builder or not self.family:
                raise ValueError(f"{self.name}: a builder given by name needs the form 'module:QualName' and a family; "
                                 f"got {self.builder!r}, family {self.family!r}")
        elif not self.family:
            object.__setattr__(self, "family", getattr(self.builder, "family", ""))

    @property
    def model_class(self) -> type[nn.Module]:
        """The builder class, imported now if it was registered by name."""
        if not isinstance(self.builder, str):
            return self.builder
        return pkgutil.resolve_name(self.builder)

    @property
    def class_path(self) -> str:
        """``module.QualName`` of the builder class, without importing it."""
        if isinstance(self.builder, str):
            return self.builder.replace(":", ".")
        return f"{self.builder.__module__}.{self.builder.__qualname__}"

    def pretrained_weights(self, tag: str | None = None) -> PretrainedWeights:
        """The published weights named ``tag`` (default: the first); ``ValueError`` if there are none."""
        if not self.pretrained:
            raise ValueError(f"{self.name} has no published weights")
        if tag is None:
            return self.pretrained[0]
        for weights in self.pretrained:
            if weights.tag == tag:
                return weights
        raise ValueError(f"{self.name} has no pretrained tag {tag!r}; available: {', '.join(w.tag for w in self.pretrained)}")

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.config.in_chans, *to_hw(self.config.img_size))

    def build_config(self, **changes: Any) -> Any:
        """This variant's config with ``changes`` applied; unknown names raise ``TypeError``.

        ``ablation=NAME`` applies the named ablation's changes first, so explicit options still win.
        """
        name = changes.get("ablation")
        if name is not None:
            if name not in self.ablations:
                raise ValueError(f"{self.name} has no ablation {name!r}; available: {', '.join(self.ablations) or 'none'}")
            changes = {**self.ablations[name], **changes}
        valid = {f.name for f in dataclasses.fields(self.config)}
        unknown = sorted(set(changes) - valid)
        if unknown:
            raise TypeError(f"{self.name} has no option(s) {unknown}; valid options: {sorted(valid)}")
        return dataclasses.replace(self.config, **changes)


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(info: ModelInfo) -> ModelInfo:
    if info.name in _REGISTRY:
        raise ValueError(f"model {info.name!r} is already registered")
    _REGISTRY[info.name] = info
    return info
