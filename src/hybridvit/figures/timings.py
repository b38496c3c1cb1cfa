"""Time per block type, unfused and fused (LeViT appendix A.1), measured with forward hooks on the CPU."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..bench.throughput import machine_info
from ..inference.machine import torch_threads
from .base import describe, first_param, pyplot, save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def block_types(model: nn.Module) -> dict[str, str]:
    """Module name -> block type of the parts timed separately (none nested in another)."""
    from ..models import cvt, levit

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
    from ..fusion import fuse

    for name, value, least in (("batch size", batch_size, 1), ("iterations", iterations, 1), ("warmup", warmup, 0),
                               ("threads", 1 if threads is None else threads, 1)):
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")
    if first_param(model).device.type != "cpu":
        raise ValueError("block timings are measured on the CPU (hooks time without synchronising a GPU); "
                         "pass model.cpu()")
    model = model.eval()
    models = {"unfused": model, "fused": fuse(model)}
    threads = threads or torch.get_num_threads()
    clocks = {k: _BlockClock(m) for k, m in models.items()}
    total = dict.fromkeys(models, 0.0)
    hw = tuple(getattr(model, "input_hw", (224, 224)))
    x = torch.randn(batch_size, getattr(model, "in_chans", 3), *hw)
    try:
        with torch_threads(threads), torch.inference_mode():
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
    per_image = 1e3 / (iterations * batch_size)
    total_ms = {k: v * per_image for k, v in total.items()}
    ms = {k: {kind: v * per_image for kind, v in clock.seconds.items()} for k, clock in clocks.items()}
    rows = [BlockTiming(kind, ms["unfused"][kind], ms["fused"][kind], ms["unfused"][kind] / total_ms["unfused"],
                        ms["fused"][kind] / total_ms["fused"]) for kind in ms["unfused"]]
    return BlockTimings(describe(model), rows, total_ms, hw, batch_size, iterations, threads,
                        machine_info(torch.device("cpu"), threads)["cpu"])


def figure_block_timings(timings: BlockTimings) -> Figure:
    """Milliseconds per image of each block type, unfused beside fused."""
    fig, ax = pyplot().subplots(figsize=(7, 0.5 * len(timings.rows) + 1.8), layout="constrained")
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
