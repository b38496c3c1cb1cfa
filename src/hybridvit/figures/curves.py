"""A training run's loss and accuracy per epoch, from its ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import pyplot, save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The epochs of a run's ``metrics.jsonl`` (a run folder or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file {path} (pass a training run folder or its metrics.jsonl)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise ValueError(f"{path}, line {number}: expected one epoch's record, an object with \"epoch\"; got {line[:60]}")
        rows.append(row)
    return rows


def figure_curves(metrics_file: str | Path) -> Figure:
    """Loss and top-1/top-5 (multi-label: mAP/F1) per epoch, to see whether a run converged."""
    rows = read_metrics(metrics_file)
    epochs = [r["epoch"] + 1 for r in rows]
    fig, (ax_loss, ax_acc) = pyplot().subplots(1, 2, figsize=(10, 4), layout="constrained")
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    multi = "val_map" in rows[0] if rows else False  # several labels an image: mAP and F1
    for key, label in ((("val_map", "mAP"), ("val_f1", "F1")) if multi else (("val_top1", "top-1"), ("val_top5", "top-5"))):
        ax_acc.plot(epochs, [r[key] for r in rows], label=label)
    ax_acc.set(xlabel="epoch", ylabel="%", title="validation mAP and F1" if multi else "validation accuracy")
    ax_acc.legend()
    return fig


def plot_curves(metrics_file: str | Path, png: str | Path) -> Path:
    """Save ``figure_curves`` (the training run writes one at its end)."""
    return save_figure(figure_curves(metrics_file), png)
