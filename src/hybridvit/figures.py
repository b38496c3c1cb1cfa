"""The papers' figures for any model or checkpoint, and the training and benchmark plots.

Each kind has a ``figure_*`` function returning the open matplotlib Figure (for notebooks and
tests: close it when done) and a ``plot_*`` wrapper that saves it and closes it. ``make_figure``
serves every kind from a model name, model/run folder, checkpoint or data file (the ``plot``
command). Dependencies flow one way: nothing here imports ``hybridvit.train`` or the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from .bench.throughput import BenchResult, machine_info
from .layers import AttentionBias, AttentionMap, FixedAttentionBias, capture_attention
from .registry import ModelInfo, get_model_info, list_models

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from PIL import Image

KINDS = ("attention-bias", "attention", "filters", "block-timings", "curves", "speed-accuracy")
DPI = 100

__all__ = [
    "DPI", "KINDS", "AttentionView", "BlockTiming", "BlockTimings", "attention_view", "benchmark_title", "bias_layers",
    "block_types", "capture_maps", "denormalise", "figure_attention", "figure_attention_bias", "figure_block_timings",
    "figure_curves", "figure_filters", "figure_speed_accuracy", "filter_images", "first_conv", "load_figure_model",
    "make_figure", "measure_block_timings", "model_input", "panel_grid", "panels", "plot_attention",
    "plot_attention_bias", "plot_block_timings", "plot_curves", "plot_experiment", "plot_filters", "plot_resolution",
    "plot_speed_accuracy", "preprocessing", "read_benchmark", "read_metrics", "save_figure", "wrapped",
]


# --- shared plumbing -------------------------------------------------------------------------

def _pyplot() -> Any:
    """pyplot on the file-only Agg backend, imported on first use (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def panel_grid(counts: Sequence[int], panel_inches: float = 1.4,
               title: str | None = None) -> tuple[Figure, list[list[Axes]]]:
    """A figure with ``counts[r]`` image panels in row ``r``, left-aligned, ticks off (no axes where no panel)."""
    cols = max(counts)
    fig = _pyplot().figure(figsize=(max(cols * panel_inches, 5.0), len(counts) * panel_inches + 0.4),
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
        _pyplot().close(fig)
    return path


def panels(fig: Figure) -> list[Axes]:
    """The axes of ``fig`` that show an image, in the order they were made (row by row)."""
    return [ax for ax in fig.axes if ax.images]


def _first_param(model: nn.Module) -> torch.Tensor:
    """Where the model lives (device), for the inputs made here."""
    return next(model.parameters())


def _select(items: list, indices: Sequence[int] | None, what: str) -> list:
    """``items`` picked by (possibly negative) ``indices``; all when None."""
    if indices is None:
        return items
    for i in indices:
        if not -len(items) <= i < len(items):
            raise ValueError(f"{what} {i} does not exist: there are {len(items)} (0..{len(items) - 1})")
    return [items[i] for i in indices]


def _describe(model: nn.Module) -> str:
    """The model's registered name, or its class, for titles and messages."""
    describe = getattr(model, "describe", None)
    return describe() if callable(describe) else type(model).__name__


# --- attention bias (LeViT appendix B) -------------------------------------------------------

def bias_layers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every attention-bias table as ``(layer name, (heads, H, W) bias over |dy|, |dx|)``."""
    layers = [(name.removesuffix(".attention_bias").removesuffix(".attn"),
               m.table.detach().float().cpu().reshape(m.table.shape[0], *m.key_grid))
              for name, m in model.named_modules() if isinstance(m, (AttentionBias, FixedAttentionBias))]
    if not layers:
        raise ValueError(f"{_describe(model)} has no attention bias (only LeViT learns one; CvT has no positional "
                         f"term): choose another figure kind")
    return layers


def figure_attention_bias(model: nn.Module, layers: Sequence[int] | None = None) -> Figure:
    """Each head's learnt bias as a function of the (|dy|, |dx|) offset: one row per layer, one panel per head."""
    tables = _select(bias_layers(model), layers, "attention-bias layer")
    fig, axes = panel_grid([t.shape[0] for _, t in tables], 1.1,
                           f"{_describe(model)}: attention bias per head (rows |dy|, columns |dx|; "
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
        name=name or type(model).__name__, model_class=type(model), config=getattr(model, "config", None))
    stored = {k: tuple(v) if isinstance(v, list) else v for k, v in (extra or {}).items()
              if k in ("mean", "std", "crop_pct") and v is not None}
    return dataclasses.replace(info, **stored)


def model_input(model: nn.Module, image: str | Path | Image.Image | None = None,
                extra: dict[str, Any] | None = None) -> torch.Tensor:
    """One preprocessed image ``(1, C, H, W)`` at the model's input size; a synthetic picture when None."""
    from .data.transforms import eval_transform, example_image, load_image

    if image is None:
        image = example_image()
    elif not hasattr(image, "convert"):
        if not Path(image).is_file():
            raise FileNotFoundError(f"no image file {image}")
        image = load_image(image)
    size = (extra or {}).get("input_size") or getattr(model, "input_hw", None)
    transform = eval_transform(preprocessing(model, extra), input_size=tuple(size) if size else None)
    return transform(image).unsqueeze(0).to(_first_param(model).device)


def denormalise(x: torch.Tensor, info: ModelInfo) -> np.ndarray:
    """A preprocessed ``(C, H, W)`` image back to an ``(H, W, 3)`` array in [0, 1] for display."""
    mean, std = torch.tensor(info.mean).view(-1, 1, 1), torch.tensor(info.std).view(-1, 1, 1)
    return (x.detach().cpu().float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


@dataclass
class AttentionView:
    """One attention call seen from one query: the per-head maps over the key grid."""

    layer: int  # index among the forward's attention calls (non-negative)
    layers: int  # attention calls in the forward
    query_cell: tuple[int, int]  # the query's (row, column) on the query grid
    maps: torch.Tensor  # (heads, key H, key W) probabilities


def capture_maps(model: nn.Module, x: torch.Tensor) -> list[AttentionMap]:
    """Every attention call's probabilities for input ``x``, with the grids its tokens lie on."""
    with torch.inference_mode(), capture_attention() as maps:
        model(x)
    return maps


def attention_view(maps: list[AttentionMap], layer: int, query: tuple[float, float],
                   image_hw: tuple[int, int]) -> AttentionView:
    """Each head's probabilities for the query at pixel ``query`` (y, x) of an ``image_hw`` input."""
    amap = _select(maps, [layer], "attention layer")[0]
    if not all(0 <= p < s for p, s in zip(query, image_hw)):
        raise ValueError(f"query (y, x) = {tuple(query)} lies outside the {image_hw[0]}x{image_hw[1]} input")
    (qh, qw), (kh, kw) = amap.query_grid, amap.key_grid
    cell = tuple(min(max(int(p * g / s), 0), g - 1) for p, g, s in zip(query, (qh, qw), image_hw))
    probs = amap.probs[0].float().cpu()  # (heads, Nq, Nk)
    q_index = probs.shape[1] - qh * qw + cell[0] * qw + cell[1]  # extra tokens (a class token) come first
    rows = probs[:, q_index, probs.shape[2] - kh * kw:]
    return AttentionView(layer % len(maps), len(maps), cell, rows.reshape(-1, kh, kw))


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
                           f"{_describe(model)}: attention call {view.layer} of {view.layers}, query (y, x) = "
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


# --- first-layer filters (LeViT figure 2) ----------------------------------------------------

def first_conv(model: nn.Module) -> nn.Conv2d:
    """The patch embedding's first convolution (LeViT ``stem.conv1``, CvT ``stages.0.embed.proj``)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"{_describe(model)} has no convolution")
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
                           f"{_describe(model)}: first-layer filters ({n} x {conv.in_channels}x{k}x{k})")
    for img, ax in zip(images, [ax for row in axes for ax in row]):
        ax.imshow(img if img.shape[-1] == 3 else img.mean(-1), cmap="gray", interpolation="nearest")
    return fig


def plot_filters(model: nn.Module, path: str | Path) -> Path:
    """Save ``figure_filters``."""
    return save_figure(figure_filters(model), path)


# --- time per block type (LeViT appendix A.1) ------------------------------------------------

def block_types(model: nn.Module) -> dict[str, str]:
    """Module name -> block type of the parts timed separately (none nested in another)."""
    from .models import cvt, levit

    by_class = {levit.PatchEmbed: "stem", levit.Attention: "attention", levit.MLP: "MLP",
                levit.ShrinkAttention: "shrinking attention", cvt.ConvEmbed: "token embedding",
                cvt.ConvAttention: "attention", cvt.MLP: "MLP"}
    heads = {"head", "head_dist", "norm"}  # the classifier (CvT: its final LayerNorm too)
    types = {name: by_class.get(type(m), "head" if name in heads else "") for name, m in model.named_modules()}
    return {name: kind for name, kind in types.items() if kind}


@dataclass
class BlockTiming:
    """One block type's time per image and share of the forward, unfused and fused."""

    block: str
    unfused_ms: float  # per image
    fused_ms: float
    unfused_share: float  # of the whole forward
    fused_share: float


@dataclass
class BlockTimings:
    """Milliseconds per image per block type, unfused and fused, and how they were measured."""

    model: str
    rows: list[BlockTiming]
    total_ms: dict[str, float]  # whole forward per image: {"unfused": ..., "fused": ...}
    input_hw: tuple[int, int]
    batch: int
    iterations: int
    threads: int
    cpu: str
    path: Path | None = None  # the PNG, once saved

    @property
    def setting(self) -> str:
        """What was measured, for titles."""
        return f"{self.model} at {self.input_hw[0]}x{self.input_hw[1]}, batch {self.batch}, {self.threads} thread(s)"

    def markdown(self) -> str:
        """The rows as a markdown table, with the rest of the forward and the total."""
        total_u, total_f = self.total_ms["unfused"], self.total_ms["fused"]
        other = ("other (residuals, reshapes, pooling)", total_u - sum(r.unfused_ms for r in self.rows),
                 total_f - sum(r.fused_ms for r in self.rows))
        lines = [f"{self.setting}, {self.iterations} timed iterations; {self.cpu}, torch {torch.__version__}", "",
                 "| block | unfused ms/img | share | fused ms/img | share |", "|---|---:|---:|---:|---:|"]
        rows = [(r.block, r.unfused_ms, r.fused_ms) for r in self.rows] + [other, ("total", total_u, total_f)]
        for name, u, f in rows:
            lines.append(f"| {name} | {u:.3f} | {u / total_u:.1%} | {f:.3f} | {f / total_f:.1%} |")
        return "\n".join(lines) + "\n"


class _BlockClock:
    """Forward pre/post hooks that add each block type's wall time while installed."""

    def __init__(self, model: nn.Module) -> None:
        self.seconds: dict[str, float] = {}
        self._start: dict[int, float] = {}
        self._hooks = []
        for name, kind in block_types(model).items():
            module = model.get_submodule(name)
            self.seconds[kind] = 0.0
            self._hooks.append(module.register_forward_pre_hook(self._enter))
            self._hooks.append(module.register_forward_hook(lambda m, i, o, kind=kind: self._leave(m, kind)))

    def _enter(self, module: nn.Module, inputs: Any) -> None:
        self._start[id(module)] = time.perf_counter()

    def _leave(self, module: nn.Module, kind: str) -> None:
        self.seconds[kind] += time.perf_counter() - self._start.pop(id(module))

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def measure_block_timings(model: nn.Module, batch_size: int = 16, iterations: int = 10, warmup: int = 2,
                          threads: int | None = None) -> BlockTimings:
    """Time per block type of the eval model and of ``hybridvit.fuse(model)``, interleaved per iteration (CPU)."""
    from .fusion import fuse

    if _first_param(model).device.type != "cpu":
        raise ValueError("block timings are measured on the CPU (hooks time without synchronising a GPU); "
                         "pass model.cpu()")
    model = model.eval()
    models = {"unfused": model, "fused": fuse(model)}
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    clocks = {k: _BlockClock(m) for k, m in models.items()}
    total = dict.fromkeys(models, 0.0)
    hw = tuple(getattr(model, "input_hw", (224, 224)))
    x = torch.randn(batch_size, getattr(model, "in_chans", 3), *hw)
    try:
        with torch.inference_mode():
            for step in range(warmup + iterations):
                if step == warmup:  # the timed iterations start here
                    total = dict.fromkeys(models, 0.0)
                    for clock in clocks.values():
                        clock.reset()
                for key, m in models.items():
                    start = time.perf_counter()
                    m(x)
                    total[key] += time.perf_counter() - start
    finally:
        for clock in clocks.values():
            clock.remove()
        torch.set_num_threads(previous)
    per_image = 1e3 / (iterations * batch_size)
    total_ms = {k: v * per_image for k, v in total.items()}
    ms = {k: {kind: v * per_image for kind, v in clock.seconds.items()} for k, clock in clocks.items()}
    rows = [BlockTiming(kind, ms["unfused"][kind], ms["fused"][kind], ms["unfused"][kind] / total_ms["unfused"],
                        ms["fused"][kind] / total_ms["fused"]) for kind in ms["unfused"]]
    return BlockTimings(_describe(model), rows, total_ms, hw, batch_size, iterations, threads or previous,
                        machine_info(torch.device("cpu"), threads or previous)["cpu"])


def figure_block_timings(timings: BlockTimings) -> Figure:
    """Milliseconds per image of each block type, unfused beside fused."""
    fig, ax = _pyplot().subplots(figsize=(7, 0.5 * len(timings.rows) + 1.8), layout="constrained")
    y = np.arange(len(timings.rows))
    for offset, key in ((-0.2, "unfused"), (0.2, "fused")):
        values = [getattr(r, f"{key}_ms") for r in timings.rows]
        bars = ax.barh(y + offset, values, height=0.4, label=f"{key} (total {timings.total_ms[key]:.2f} ms/img)")
        ax.bar_label(bars, [f"{getattr(r, f'{key}_share'):.0%}" for r in timings.rows], fontsize=7, padding=2)
    ax.set_yticks(y, [r.block for r in timings.rows])
    ax.invert_yaxis()
    ax.set(xlabel="ms per image (share of the forward)",
           title=timings.setting)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_block_timings(model: nn.Module, path: str | Path, batch_size: int = 16, iterations: int = 10,
                       threads: int | None = None) -> BlockTimings:
    """Measure, save the bar chart and the markdown table beside it (``.md``); returns the timings."""
    timings = measure_block_timings(model, batch_size, iterations, threads=threads)
    timings.path = save_figure(figure_block_timings(timings), path)
    timings.path.with_suffix(".md").write_text(timings.markdown())
    return timings


# --- training curves -------------------------------------------------------------------------

def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The epochs of a run's ``metrics.jsonl`` (a run folder or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file {path} (pass a training run folder or its metrics.jsonl)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def figure_curves(metrics_file: str | Path) -> Figure:
    """Loss and top-1/top-5 per epoch, to see whether a run converged."""
    rows = read_metrics(metrics_file)
    epochs = [r["epoch"] + 1 for r in rows]
    fig, (ax_loss, ax_acc) = _pyplot().subplots(1, 2, figsize=(10, 4), layout="constrained")
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [r["val_top1"] for r in rows], label="top-1")
    ax_acc.plot(epochs, [r["val_top5"] for r in rows], label="top-5")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    ax_acc.legend()
    return fig


def plot_curves(metrics_file: str | Path, png: str | Path) -> Path:
    """Save ``figure_curves`` (the training run writes one at its end)."""
    return save_figure(figure_curves(metrics_file), png)


# --- speed against accuracy (the papers' figure 1) -------------------------------------------

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
    fig, ax = _pyplot().subplots(figsize=(7, 5), layout="constrained")
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


def plot_resolution(rows: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Top-1 per input size of scripts/resolution_experiment.py: resampled, kept, fine-tuned, zeroed biases."""
    fig, ax = _pyplot().subplots(figsize=(8, 4), layout="constrained")
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
    fig, (speed, paper) = _pyplot().subplots(1, 2, figsize=(11, 4.5), layout="constrained")
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


# --- any kind from a name or a path (the plot command) ---------------------------------------

def load_figure_model(source: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A registered name (random weights, no extras) or a model folder, run folder or training
    checkpoint, with its stored extras (preprocessing, class names)."""
    from .api import create_model
    from .checkpoints import load_trained

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

