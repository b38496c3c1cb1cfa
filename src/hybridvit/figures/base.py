"""What every figure shares: pyplot on the file-only backend, panel grids, saving, and the
helpers for models (their device, names, picking layers by index)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100


def pyplot() -> Any:
    """pyplot on the file-only Agg backend, imported on first use (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def panel_grid(counts: Sequence[int], panel_inches: float = 1.4,
               title: str | None = None) -> tuple[Figure, list[list[Axes]]]:
    """A figure with ``counts[r]`` image panels in row ``r``, left-aligned, ticks off (no axes where no panel)."""
    cols = max(counts)
    fig = pyplot().figure(figsize=(max(cols * panel_inches, 5.0), len(counts) * panel_inches + 0.4),
                          layout="constrained")
    grid = fig.add_gridspec(len(counts), cols)
    axes = [[fig.add_subplot(grid[r, c], xticks=[], yticks=[]) for c in range(n)] for r, n in enumerate(counts)]
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig, axes


def wrapped(n: int, cols: int) -> list[int]:
    """Panels per row for ``n`` panels in rows of ``cols``."""
    return [min(cols, n - start) for start in range(0, n, cols)]


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write ``fig`` (PNG at ``dpi``, pixel size = figure inches x dpi) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=dpi)
    finally:
        pyplot().close(fig)
    return path


def panels(fig: Figure) -> list[Axes]:
    """The axes of ``fig`` that show an image, in the order they were made (row by row)."""
    return [ax for ax in fig.axes if ax.images]


def first_param(model: nn.Module) -> torch.Tensor:
    """Where the model lives (device), for the inputs made here."""
    return next(model.parameters())


def select(items: list, indices: Sequence[int] | None, what: str) -> list:
    """``items`` picked by (possibly negative) ``indices``; all when None."""
    if indices is None:
        return items
    for i in indices:
        if not -len(items) <= i < len(items):
            raise ValueError(f"{what} {i} does not exist: there are {len(items)} (0..{len(items) - 1})")
    return [items[i] for i in indices]


def describe(model: nn.Module) -> str:
    """The model's registered name, or its class, for titles and messages."""
    method = getattr(model, "describe", None)
    return method() if callable(method) else type(model).__name__
