"""The result figures of scripts/resolution_experiment.py and ``hybridvit experiment``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .base import pyplot, save_figure


def plot_resolution(rows: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Top-1 per input size of scripts/resolution_experiment.py: resampled, kept, fine-tuned, zeroed biases."""
    fig, ax = pyplot().subplots(figsize=(8, 4), layout="constrained")
    labels = [f"{r['size'][0]}x{r['size'][1]}" + (" (trained)" if r["trained"] else "") for r in rows]
    x = np.arange(len(rows))
    series = {"bilinear": "biases resampled", "keep": "offsets kept", "finetuned": "fine-tuned at the size",
              "no_bias": "control: biases zeroed"}
    width = 0.8 / len(series)
    for i, (key, label) in enumerate(series.items()):
        values = [math.nan if r.get(key) is None else r[key] for r in rows]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width=width, label=label)
    ax.set_xticks(x, labels)
    ax.set(ylabel="top-1 (%)", title=title, ylim=(0, 100))
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def plot_experiment(rows: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """An experiment's variants: our top-1 against measured images/s, and against the paper's top-1."""
    fig, (speed, paper) = pyplot().subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    for r in rows:
        top1 = math.nan if r["top1"] is None else r["top1"]
        speed.scatter(r["images_per_second"], top1)
        speed.annotate(r["variant"], (r["images_per_second"], top1), fontsize=7, xytext=(4, 2), textcoords="offset points")
        if r["paper_top1"] is not None:
            paper.scatter(r["paper_top1"], top1)
            paper.annotate(r["variant"], (r["paper_top1"], top1), fontsize=7, xytext=(4, 2), textcoords="offset points")
    speed.set(xlabel="images / second (1 CPU thread, measured)", ylabel="top-1 (%, ours)")
    paper.set(xlabel="ImageNet top-1 (%, paper)", ylabel="top-1 (%, ours)")
    for ax in (speed, paper):
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path)
