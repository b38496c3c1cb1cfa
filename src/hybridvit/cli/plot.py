"""``plot``: the papers' figures for any model, and a run's or a benchmark's plots."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console


def plot_cmd(
    kind: str = typer.Argument(..., metavar="KIND",
                               help="attention-bias, attention, filters, block-timings, curves or speed-accuracy"),
    source: str = typer.Argument(..., metavar="MODEL_OR_RUN", help="model name (random weights), model/run folder or "
                                 "checkpoint.pt; curves: run folder or metrics.jsonl; speed-accuracy: benchmark JSON"),
    output: Path = typer.Option(..., help="PNG to write (block-timings also writes its table as .md beside it)"),
    image: Optional[Path] = typer.Option(None, help="attention: image file (default: a synthetic picture)"),
    query: Optional[tuple[int, int]] = typer.Option(None, help="attention: query pixel Y X (default: the centre)"),
    layer: Optional[list[int]] = typer.Option(None, help="attention: the attention call (default: the last; negative "
                                              "counts back); attention-bias: layers to show (repeatable; default all)"),
    batch_size: int = typer.Option(16, help="block-timings: images per forward"),
    iterations: int = typer.Option(10, help="block-timings: timed forwards (after 2 warm-up ones)"),
    threads: Optional[int] = typer.Option(None, help="block-timings: CPU threads (default: torch's)"),
) -> None:
    """The papers' figures for any model or checkpoint, and a run's or benchmark's plots."""
    from ..figures import BlockTimings, make_figure
    from ..inference.optimize import tune_cpu_allocator

    if kind == "block-timings":
        # glibc's page faults on fresh activations made the stem's time vary 2.2-3.5 ms/image between runs
        tune_cpu_allocator()
    result = make_figure(kind, source, output, image=image, query=query, layers=layer or None,
                         batch_size=batch_size, iterations=iterations, threads=threads)
    if isinstance(result, BlockTimings):
        console.print(result.markdown(), highlight=False)
        console.print(f"wrote {result.path} and {result.path.with_suffix('.md')}", highlight=False)
    else:
        console.print(f"wrote {result}", highlight=False)
