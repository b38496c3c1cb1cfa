"""A whole collection through a ``Predictor``: listing, resuming, writing, progress and summary
(what ``hybridvit predict`` runs)."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .inputs import iter_inputs
from .outputs import PredictionWriter, image_key
from .pipeline import Prediction
from .predict import Predictor

ROWS_PER_WRITE = 16  # rows handed to the writer at once (an interrupted run keeps every row written)


@dataclass
class RunSummary:
    """What a run did: rows written (``images``), error rows in the whole output (``failed``,
    those an earlier run wrote included, so a resumed run reports what an uninterrupted one
    would), rows an earlier run had written (``resumed``), wall time less the time spent
    building models, the model path and how the cores were shared."""

    images: int = 0
    failed: int = 0
    resumed: int = 0
    seconds: float = 0.0
    path_used: str = ""
    reason: str = ""
    split: str = ""
    measured: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def _not_done(items: Iterable[str], done: Counter[str]) -> Iterator[str]:
    """``items`` less each image as many times as an earlier run wrote it (``done``: by ``image_key``)."""
    left = Counter(done)
    for path in items:
        key = image_key(path)
        if left[key] > 0:
            left[key] -= 1
            continue
        yield path


def predict_collection(predictor: Predictor, sources: Iterable[str | Path], k: int = 5,
                       output: str | Path | None = None, resume: bool = False,
                       on_row: Callable[[Prediction], None] | None = None, progress: bool | None = None,
                       stdin: TextIO | None = None) -> RunSummary:
    """Predict every image ``sources`` name (``inputs.iter_inputs``), writing ``output`` as the run
    goes (``.csv``, ``.jsonl`` or ``.parquet``; ``resume``: finish it) and passing each row to
    ``on_row``. ``k`` beyond the model's classes is clamped to them. ``progress``: a bar on
    standard error (None: when it is a terminal). An interrupted run keeps every row written;
    run it again with ``resume`` to finish."""
    from tqdm import tqdm

    sources = [str(s) for s in sources]
    k = min(k, len(predictor.classes))
    writer = (PredictionWriter(output, k, predictor.embedding_dim, resume, sources, predictor.threshold)
              if output is not None else None)
    summary = RunSummary(resumed=sum(writer.done.values()) if writer else 0, failed=writer.failed if writer else 0)
    items: Iterable[str] = iter_inputs(sources, stdin)
    if writer is not None and writer.done:
        items = _not_done(items, writer.done)
    bar = tqdm(total=None, initial=summary.resumed, unit="img", dynamic_ncols=True, file=sys.stderr,
               disable=not sys.stderr.isatty() if progress is None else not progress)
    if "-" not in sources and not bar.disable:  # standard input cannot be listed twice: no total, no ETA
        threading.Thread(target=_count_into, args=(bar, sources), daemon=True).start()
    start = time.perf_counter()
    run = predictor.predict_images(items, k)
    batch: list[Prediction] = []
    try:
        for row in run:
            summary.images += 1
            summary.failed += row.error is not None
            batch.append(row)
            if on_row is not None:
                on_row(row)
            if len(batch) >= ROWS_PER_WRITE:
                _write(writer, batch, bar)
                batch = []
        _write(writer, batch, bar)
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.write(batch)
            writer.flush()  # every finished row stays for --resume
        raise
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start - run.build_seconds
        summary.split, summary.measured, summary.path_used = str(run.split), run.measured, run.path_used
        summary.reason = run.reason
    return summary


def _write(writer: PredictionWriter | None, rows: list[Prediction], bar: Any) -> None:
    if writer is not None and rows:
        writer.write(rows)
    bar.update(len(rows))


def _count_into(bar: Any, sources: list[str]) -> None:
    """Count the listing beside the run, then give the bar its total (and so an ETA)."""
    total = sum(1 for _ in iter_inputs(sources))
    bar.total = total
    bar.refresh()
