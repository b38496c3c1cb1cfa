"""LeViT's learnt attention biases (its appendix B) and where each head looks from one query,
for any model with attention (CvT too)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from ..layers import AttentionBias, FixedAttentionBias, attention_view, capture_maps
from ..registry import ModelInfo, get_model_info, list_models
from .base import describe, first_param, panel_grid, save_figure, select, wrapped

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image


# --- attention bias (LeViT appendix B) -------------------------------------------------------

def bias_layers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every attention-bias table as ``(layer name, (heads, H, W) bias over |dy|, |dx|)``."""
    layers = [(name.removesuffix(".attention_bias").removesuffix(".attn"),
               m.table.detach().float().cpu().reshape(m.table.shape[0], *m.key_grid))
              for name, m in model.named_modules() if isinstance(m, (AttentionBias, FixedAttentionBias))]
    if not layers:
        raise ValueError(f"{describe(model)} has no attention bias (only LeViT learns one; CvT has no positional "
                         f"term): choose another figure kind")
    return layers


def figure_attention_bias(model: nn.Module, layers: Sequence[int] | None = None) -> Figure:
    """Each head's learnt bias as a function of the (|dy|, |dx|) offset: one row per layer, one panel per head."""
    tables = select(bias_layers(model), layers, "attention-bias layer")
    fig, axes = panel_grid([t.shape[0] for _, t in tables], 1.1,
                           f"{describe(model)}: attention bias per head (rows |dy|, columns |dx|; "
                           f"one colour scale per layer, its range on the left)")
    for row, (name, table) in zip(axes, tables):
        lo, hi = table.min().item(), table.max().item()  # one colour scale per layer: heads compare
        for h, ax in enumerate(row):
            ax.imshow(table[h].numpy(), cmap="viridis", vmin=lo, vmax=hi)
            ax.set_title(f"head {h}", fontsize=7)
        row[0].set_ylabel(f"{name}\n{table.shape[1]}x{table.shape[2]}, {lo:+.2f}..{hi:+.2f}", fontsize=7)
    return fig


def plot_attention_bias(model: nn.Module, path: str | Path, layers: Sequence[int] | None = None) -> Path:
    """Save ``figure_attention_bias``."""
    return save_figure(figure_attention_bias(model, layers), path)


# --- attention maps --------------------------------------------------------------------------

def preprocessing(model: nn.Module, extra: dict[str, Any] | None = None) -> ModelInfo:
    """How ``model`` expects images: its registered variant's settings (ImageNet's for an unregistered
    model), overridden by a trained model's stored ``extra`` (mean, std, crop_pct; see ``load_trained``)."""
    name = getattr(model, "model_name", None)
    info = get_model_info(name) if name in list_models() else ModelInfo(
        name=name or type(model).__name__, builder=type(model), config=getattr(model, "config", None))
    stored = {k: tuple(v) if isinstance(v, list) else v for k, v in (extra or {}).items()
              if k in ("mean", "std", "crop_pct") and v is not None}
    return dataclasses.replace(info, **stored)


def model_input(model: nn.Module, image: str | Path | Image.Image | None = None,
                extra: dict[str, Any] | None = None) -> torch.Tensor:
    """One preprocessed image ``(1, C, H, W)`` at the model's input size; a synthetic picture when None."""
    from ..data.transforms import eval_transform, example_image, load_image

    if image is None:
        image = example_image()
    elif not hasattr(image, "convert"):
        if not Path(image).is_file():
            raise FileNotFoundError(f"no image file {image}")
        image = load_image(image)
    size = (extra or {}).get("input_size") or getattr(model, "input_hw", None)
    transform = eval_transform(preprocessing(model, extra), input_size=tuple(size) if size else None)
    return transform(image).unsqueeze(0).to(first_param(model).device)


def denormalise(x: torch.Tensor, info: ModelInfo) -> np.ndarray:
    """A preprocessed ``(C, H, W)`` image back to an ``(H, W, 3)`` array in [0, 1] for display."""
    mean, std = torch.tensor(info.mean).view(-1, 1, 1), torch.tensor(info.std).view(-1, 1, 1)
    return (x.detach().cpu().float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def figure_attention(model: nn.Module, image: str | Path | Image.Image | None = None,
                     query: tuple[float, float] | None = None, layer: int = -1,
                     extra: dict[str, Any] | None = None) -> Figure:
    """Where each head of one attention call looks from one query position, over the image.

    ``query`` is (y, x) in input pixels (default: the centre); ``layer`` indexes the forward's
    attention calls (default: the last); ``extra``: a trained model's stored preprocessing. Each
    overlay is the raw key-grid map, drawn bilinearly over the image's extent (its AxesImage
    array is the map itself).
    """
    model = model.eval()
    x = model_input(model, image, extra)
    hw = tuple(x.shape[-2:])
    query = query or (hw[0] / 2, hw[1] / 2)
    view = attention_view(capture_maps(model, x), layer, query, hw)
    picture = denormalise(x[0], preprocessing(model, extra))
    heads = view.maps.shape[0]
    fig, axes = panel_grid(wrapped(heads + 1, 5), 1.8,
                           f"{describe(model)}: attention call {view.layer} of {view.layers}, query (y, x) = "
                           f"({query[0]:.0f}, {query[1]:.0f}) on cell {view.query_cell} of the query grid")
    extent = (0, hw[1], hw[0], 0)
    first, *others = [ax for row in axes for ax in row]
    first.imshow(picture, extent=extent)
    first.plot(query[1], query[0], "r+", markersize=12, markeredgewidth=2)
    first.set_title("image and query", fontsize=8)
    for h, ax in enumerate(others):
        ax.imshow(picture, extent=extent)
        ax.imshow(view.maps[h].numpy(), extent=extent, interpolation="bilinear", cmap="inferno", alpha=0.6)
        ax.set_title(f"head {h}", fontsize=8)
    return fig


def plot_attention(model: nn.Module, path: str | Path, image: str | Path | Image.Image | None = None,
                   query: tuple[float, float] | None = None, layer: int = -1,
                   extra: dict[str, Any] | None = None) -> Path:
    """Save ``figure_attention``."""
    return save_figure(figure_attention(model, image, query, layer, extra), path)
