"""What every hybridvit classifier shares: its config, input checks and the decay split."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from ..registry import to_hw


class HybridClassifier(nn.Module):
    """Base class: a model built from one config dataclass, so it can be saved and rebuilt.

    Subclasses set ``family`` and ``config_class``, build themselves from ``config`` and
    implement ``forward_features`` / ``forward_head``.
    """

    family: ClassVar[str]
    config_class: ClassVar[type]
    head_names: ClassVar[tuple[str, ...]] = ("head",)
    # The paper recipe ``train`` uses for large datasets (see ``train.config.RECIPES``).
    default_recipe: ClassVar[str]
    # Whether ``optimize`` should apply TorchScript's oneDNN rewrite on CPU (measured per family).
    cpu_graph_rewrite: ClassVar[bool] = False
    # Smallest input side: below it the image is smaller than one patch of the embedding.
    min_input_size: ClassVar[int] = 16

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.model_name: str | None = None  # set by create_model for registered variants
        self.num_classes: int = config.num_classes
        self.in_chans: int = config.in_chans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def config_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able values (what ``save_model`` writes)."""
        return dataclasses.asdict(self.config)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the expected layout when ``x`` is not ``(B, C, H, W)``."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"{self.describe()} expects images shaped (batch, {self.in_chans}, height, width); "
                f"got a tensor of shape {tuple(x.shape)}"
            )
        if min(x.shape[-2:]) < self.min_input_size:
            m = self.min_input_size
            raise ValueError(f"{self.describe()} needs inputs of at least {m}x{m} (one patch of its stride-{m} "
                             f"embedding); got {x.shape[-2]}x{x.shape[-1]}")

    @property
    def input_hw(self) -> tuple[int, int]:
        """The configured input ``(height, width)``: preprocessing, tracing and MAC counts use it."""
        return to_hw(self.config.img_size)

    def reconfigured(self, **changes: Any) -> "HybridClassifier":
        """A copy built with config ``changes`` that keep every weight (e.g. ``dynamic_size=True``)."""
        model = type(self)(dataclasses.replace(self.config, **changes))
        model.load_state_dict(self.state_dict())
        model.model_name = self.model_name
        return model.to(next(self.parameters()).device).train(self.training)

    def describe(self) -> str:
        return self.model_name or type(self).__name__

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters trained without weight decay: attention biases, position embeddings, tokens,
        norm weights and all biases."""
        return {
            name
            for name, p in self.named_parameters()
            if p.ndim <= 1 or "attention_bias" in name or name.endswith(("cls_token", "dist_token", "pos_embed"))
        }
