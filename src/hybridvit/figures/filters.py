"""The first convolution's filters as images (LeViT figure 2)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .base import describe, panel_grid, save_figure, wrapped

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The patch embedding's first convolution (LeViT ``stem.conv1``, CvT ``stages.0.embed.proj``)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"{describe(model)} has no convolution")
    return conv


def filter_images(weight: torch.Tensor) -> np.ndarray:
    """``(out, C, k, k)`` filters as ``(out, k, k, C)`` images, each min-max scaled to [0, 1]."""
    w = weight.detach().float().cpu().flatten(1)
    lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
    w = (w - lo) / (hi - lo).clamp_min(1e-12)
    return w.view_as(weight).permute(0, 2, 3, 1).numpy()


def figure_filters(model: nn.Module) -> Figure:
    """The first convolution's filters as RGB images, one panel per output channel."""
    conv = first_conv(model)
    images = filter_images(conv.weight)
    n, k = images.shape[0], images.shape[1]
    fig, axes = panel_grid(wrapped(n, math.ceil(math.sqrt(n))), 0.8,
                           f"{describe(model)}: first-layer filters ({n} x {conv.in_channels}x{k}x{k})")
    for img, ax in zip(images, [ax for row in axes for ax in row]):
        ax.imshow(img if img.shape[-1] == 3 else img.mean(-1), cmap="gray", interpolation="nearest")
    return fig


def plot_filters(model: nn.Module, path: str | Path) -> Path:
    """Save ``figure_filters``."""
    return save_figure(figure_filters(model), path)
