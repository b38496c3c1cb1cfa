"""Stage outputs as feature maps, in timm's conventions, for detection and segmentation heads.

Every family implements ``forward_intermediates`` (timm's signature) and describes its stages
in ``feature_info``; ``FeatureExtractor`` is what ``create_model(..., features_only=True)``
returns: a list of ``(B, C, H, W)`` maps, one per requested stage.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

OUTPUT_FORMATS = ("NCHW", "NLC")

__all__ = ["FeatureExtractor", "FeatureInfo", "OUTPUT_FORMATS", "feature_take_indices", "stage_output"]


def __getattr__(name: str) -> type:
    """timm's ``FeatureInfo``, imported when asked for (timm costs seconds to import)."""
    if name == "FeatureInfo":
        from timm.models import FeatureInfo

        return FeatureInfo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def feature_take_indices(num_features: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
    """timm's rule for which stages ``indices`` names (``None``: all, ``n``: the last n) and the last one."""
    from timm.models._features import feature_take_indices as take

    return take(num_features, indices)


def stage_output(tokens: torch.Tensor, grid: tuple[int, int], output_fmt: str) -> torch.Tensor:
    """Row-major tokens ``(B, H*W, C)`` as an ``NCHW`` map, or as they are for ``NLC``."""
    if output_fmt == "NLC":
        return tokens
    if output_fmt != "NCHW":
        raise ValueError(f"output_fmt must be one of {OUTPUT_FORMATS}, got {output_fmt!r}")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid[0], grid[1])


class FeatureExtractor(nn.Module):
    """A classifier's stages as a backbone: ``forward`` returns the maps of ``out_indices``.

    ``feature_info`` is timm's ``FeatureInfo``: ``channels()``, ``reduction()`` and
    ``module_name()`` list the returned maps in order.
    """

    def __init__(self, model: nn.Module, out_indices: Sequence[int] = (0, 1, 2)) -> None:
        super().__init__()
        model.reset_classifier(0)  # type: ignore[operator]
        self.model = model
        self.out_indices, _ = feature_take_indices(len(model.feature_info), list(out_indices))  # type: ignore[arg-type]
        from timm.models import FeatureInfo

        self.feature_info = FeatureInfo([dict(info) for info in model.feature_info], self.out_indices)  # type: ignore[attr-defined]
        self.model_name = getattr(model, "model_name", None)
        self.in_chans: int = model.in_chans  # type: ignore[assignment]

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.model.input_hw  # type: ignore[return-value]

    def check_input(self, x: torch.Tensor) -> None:
        self.model.check_input(x)  # type: ignore[operator]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(  # type: ignore[operator]
            x, indices=self.out_indices, stop_early=True, intermediates_only=True)
