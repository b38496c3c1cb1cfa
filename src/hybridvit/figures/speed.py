"""Measured images/s against the papers' top-1 (the papers' figure 1), from ``hybridvit benchmark --json``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..bench.throughput import BenchResult
from .base import pyplot, save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def read_benchmark(path: str | Path) -> tuple[list[BenchResult], dict[str, Any]]:
    """The rows and machine of a ``hybridvit benchmark --json`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark file {path} (write one with: hybridvit benchmark --json > FILE.json)")
    try:
        data = json.loads(path.read_text())
        fields = {f.name for f in dataclasses.fields(BenchResult)}
        rows = [BenchResult(**{k: v for k, v in r.items() if k in fields}) for r in data["results"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not the JSON of hybridvit benchmark --json: {e}") from e
    return rows, data.get("machine", {})


def benchmark_title(machine: dict[str, Any]) -> str:
    """Where a benchmark ran, as a figure title."""
    return machine.get("gpu") or f"{machine.get('cpu', 'cpu')}, {machine.get('threads', '?')} thread(s)"


def figure_speed_accuracy(rows: list[BenchResult], title: str) -> Figure:
    """Measured images/s against the papers' ImageNet top-1, one curve per family and implementation."""
    fig, ax = pyplot().subplots(figsize=(7, 5), layout="constrained")
    series: dict[str, list[BenchResult]] = {}  # one curve per family and implementation (backend, precision)
    for r in rows:
        if r.paper_top1 is not None:
            variant = r.name.split("(")[-1].rstrip(")") if "(" in r.name else ""
            family = r.model.split("_")[0]
            series.setdefault(f"{r.source} {variant} [{family}]".replace("  ", " "), []).append(r)
    annotated = next((label for label in series if label.startswith("hybridvit")), None)  # names on one curve
    for label, members in series.items():
        members.sort(key=lambda r: r.paper_top1)
        ours = label.startswith("hybridvit")
        ax.plot([r.images_per_second for r in members], [r.paper_top1 for r in members],
                "o-" if ours else "s--", label=label, linewidth=2 if ours else 1)
        if label == annotated:
            for r in members:
                ax.annotate(r.name, (r.images_per_second, r.paper_top1), fontsize=7, xytext=(4, -10),
                            textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel="images / second (measured)", ylabel="ImageNet top-1 (%, from the papers)", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def plot_speed_accuracy(rows: list[BenchResult], path: str | Path, title: str) -> Path:
    """Save ``figure_speed_accuracy`` (``hybridvit benchmark --plot`` writes one)."""
    return save_figure(figure_speed_accuracy(rows, title), path)
