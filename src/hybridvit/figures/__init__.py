"""The papers' figures for any model or checkpoint, and the training and benchmark plots.

Each kind has a ``figure_*`` function returning the open matplotlib Figure (for notebooks and
tests: close it when done) and a ``plot_*`` wrapper that saves it and closes it. ``make_figure``
serves every kind from a model name, model/run folder, checkpoint or data file (the ``plot``
command). One module per family: ``attention`` (biases and maps), ``filters``, ``timings``
(block timings), ``curves``, ``speed`` (speed against accuracy) and ``results`` (experiments,
resolution), each on ``base`` (pyplot, panel grids, saving). Dependencies flow one way: this
package imports the families, they import only ``base`` and the rest of hybridvit, and nothing
here imports ``hybridvit.train`` or the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..checks import check_output_file
from ..layers import AttentionView, attention_view, capture_maps
from ..registry import list_models
from .attention import (bias_layers, denormalise, figure_attention, figure_attention_bias, model_input,
                        plot_attention, plot_attention_bias, preprocessing)
from .base import DPI, panel_grid, panels, save_figure, wrapped
from .curves import figure_curves, plot_curves, read_metrics
from .filters import figure_filters, filter_images, first_conv, plot_filters
from .results import plot_experiment, plot_resolution
from .speed import benchmark_title, figure_speed_accuracy, plot_speed_accuracy, read_benchmark
from .timings import (BlockTiming, BlockTimings, block_types, figure_block_timings, measure_block_timings,
                      plot_block_timings)

KINDS = ("attention-bias", "attention", "filters", "block-timings", "curves", "speed-accuracy")

__all__ = [
    "DPI", "KINDS", "AttentionView", "BlockTiming", "BlockTimings", "attention_view", "benchmark_title", "bias_layers",
    "block_types", "capture_maps", "denormalise", "figure_attention", "figure_attention_bias", "figure_block_timings",
    "figure_curves", "figure_filters", "figure_speed_accuracy", "filter_images", "first_conv", "load_figure_model",
    "make_figure", "measure_block_timings", "model_input", "panel_grid", "panels", "plot_attention",
    "plot_attention_bias", "plot_block_timings", "plot_curves", "plot_experiment", "plot_filters", "plot_resolution",
    "plot_speed_accuracy", "preprocessing", "read_benchmark", "read_metrics", "save_figure", "wrapped",
]


def load_figure_model(source: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A registered name (random weights, no extras) or a model folder, run folder or training
    checkpoint, with its stored extras (preprocessing, class names)."""
    from ..api import create_model
    from ..checkpoints import load_trained

    if str(source) in list_models():
        return create_model(str(source)).eval(), {}
    if not Path(source).exists():
        raise FileNotFoundError(f"{source} is neither a registered model ({', '.join(list_models())}) nor a "
                                f"model folder, training run folder or checkpoint.pt")
    model, extra = load_trained(source)
    return model.eval(), extra


def make_figure(kind: str, source: str | Path, output: str | Path, *, image: str | Path | None = None,
                query: tuple[float, float] | None = None, layers: Sequence[int] | None = None,
                batch_size: int = 16, iterations: int = 10, threads: int | None = None) -> Path | BlockTimings:
    """Figure ``kind`` of ``source``: a model name/folder/run/checkpoint, a run's metrics or a benchmark JSON.

    ``layers``: the bias layers to show, or (its one entry) the attention call to map.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown figure kind {kind!r}; choose one of {', '.join(KINDS)}")
    for path in (output, Path(output).with_suffix(".md")) if kind == "block-timings" else (output,):
        check_output_file(path)  # before the model loads or the timing starts
    if kind == "curves":
        return plot_curves(source, output)
    if kind == "speed-accuracy":
        rows, machine = read_benchmark(source)
        return plot_speed_accuracy(rows, output, benchmark_title(machine))
    if kind == "attention" and layers is not None and len(layers) != 1:
        raise ValueError(f"the attention figure maps one attention call; got layers {list(layers)}")
    model, extra = load_figure_model(source)
    if kind == "attention-bias":
        return plot_attention_bias(model, output, layers)
    if kind == "attention":
        return plot_attention(model, output, image, query, layers[0] if layers else -1, extra)
    if kind == "filters":
        return plot_filters(model, output)
    return plot_block_timings(model, output, batch_size, iterations, threads)
