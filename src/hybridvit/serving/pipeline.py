"""Images to predictions in batches: decoding in a thread pool, overlapped with the model.

Decoding (Pillow's JPEG decoder and resize release the GIL) runs in ``decode_workers`` threads,
each turning a batch of paths into one uint8 array; up to ``lanes`` batches run through the
model at once, each call on ``model_threads`` threads. With as many lanes as cores and one
thread each, every core alternates between decoding a batch and running one, aiming at the
machine's ideal of ``cores / (decode time + model time)`` per image; one lane on every core is
the other choice, and ``Pipeline`` times both on the run's own first batches. Rows come out
in input order; a bounded number of batches is in flight, so memory does not grow with the
collection.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import torch

Decode = Callable[[object], np.ndarray]  # a path or PIL image -> uint8 (3, H, W)
Model = Callable[[torch.Tensor], torch.Tensor]  # uint8 batch -> logits (and pooled features)


@dataclass
class Prediction:
    """One image's result: the top classes (name, probability; best first), or why it failed."""

    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    embedding: np.ndarray | None = None  # pooled features before the classifier (``embeddings=True``)
    error: str | None = None


@dataclass(frozen=True)
class Split:
    """How the cores are shared: decoding threads, model calls at once, threads per call."""

    decode_workers: int
    lanes: int
    model_threads: int

    def __str__(self) -> str:
        return (f"{self.decode_workers} decoding thread(s), {self.lanes} model lane(s) x "
                f"{self.model_threads} thread(s)")


def describe_error(e: BaseException) -> str:
    """One line: a row's reason must not break a line-based output file."""
    return " ".join(str(e).split()) or type(e).__name__


class Pipeline:
    """Runs the model over decoded batches; ``classes`` names its first ``len(classes)`` outputs,
    and the rest of each output row (if any) is the image's embedding. ``model_for(threads,
    lane)`` gives each lane its model.

    Given several candidate ``splits``, the run's first batches are shared out among them
    (``_Probe``) without pausing the decoding, each candidate timed on ``probe_batches`` batches;
    the rest of the run takes the fastest, kept in ``split`` (``measured``: images/s per
    candidate). Probe rows are real rows: nothing is predicted twice.
    """

    def __init__(self, decode: Decode, model_for: Callable[[int, int], Model], classes: list[str], k: int,
                 batch_size: int, splits: list[Split], probe_batches: int = 8, threshold: float | None = None) -> None:
        self.decode, self.model_for, self.classes, self.k, self.threshold = decode, model_for, classes, k, threshold
        self.batch_size, self.splits, self.probe_batches = batch_size, splits, probe_batches
        self.split = splits[0]
        self.measured: dict[str, float] = {}

    def run(self, items: Iterable[object]) -> Iterator[Prediction]:
        """Predictions for ``items`` (paths or PIL images), in their order, as they are ready."""
        # a model per lane (a runtime may run one call at a time per model), built before any timing
        models = {split: [self.model_for(split.model_threads, lane) for lane in range(split.lanes)]
                  for split in self.splits}
        probe = _Probe(self.splits, self.probe_batches, self._decide) if len(self.splits) > 1 else None
        if probe is not None:
            for lane_models in models.values():
                for model in lane_models:
                    self._warm(model)
        lane = threading.local()

        def start_lane(free: queue.SimpleQueue, threads: int) -> None:
            torch.set_num_threads(threads)
            lane.model = free.get()

        def run_batch(*args: object) -> list[Prediction]:
            return predict_batch(lane.model, *args)

        decode_workers = max(s.decode_workers for s in self.splits)
        window = decode_workers + max(s.lanes for s in self.splits) + 1
        with ExitStack() as stack:
            lanes = {split: stack.enter_context(ThreadPoolExecutor(
                split.lanes, thread_name_prefix="model", initializer=start_lane,
                initargs=(_queue_of(models[split]), split.model_threads))) for split in self.splits}
            # entered last, so shut down first: a batch still decoding can hand over to its lane
            decoders = stack.enter_context(ThreadPoolExecutor(decode_workers, thread_name_prefix="decode"))

            def decode_then_run(index: int, chunk: list[object]) -> Future:
                decoded, errors = decode_batch(self.decode, chunk)
                split = probe.split_for(index) if probe is not None else self.split
                args = (self.classes, self.k, _names(chunk), decoded, errors, self.threshold)
                if probe is None or not probe.covers(index):
                    return lanes[split].submit(run_batch, *args)
                return lanes[split].submit(probe.record, index, len(chunk), run_batch, *args)

            in_flight: collections.deque[Future] = collections.deque()
            try:
                for index, chunk in enumerate(_chunks(items, self.batch_size)):
                    in_flight.append(decoders.submit(decode_then_run, index, chunk))
                    if len(in_flight) >= window:
                        yield from in_flight.popleft().result().result()
                while in_flight:
                    yield from in_flight.popleft().result().result()
            finally:
                for future in in_flight:
                    future.cancel()
                if probe is not None:
                    probe.abandon()  # decoding threads waiting on a segment that will not finish go on

    def _decide(self, rates: dict[Split, float]) -> None:
        self.measured = {str(split): rate for split, rate in rates.items()}
        self.split = max(rates, key=rates.get)

    def _warm(self, model: Model) -> None:
        """One call before timing: a runtime's first run pays for allocations and kernel picks."""
        h, w = getattr(self.decode, "size", (224, 224))
        model(torch.zeros(1, 3, h, w, dtype=torch.uint8))


class _Probe:
    """Which candidate split runs each of a run's first batches, and their timings.

    The batches go in segments: one batch per lane on each candidate (untimed: each lane's
    first call pays for its runtime's set-up), then ``batches`` on each candidate, ending with
    ``splits[0]``. A segment's batches reach the model only once the previous segment's have
    finished, so no two candidates share the cores, while decoding goes on ahead; a timed
    segment runs from the end of the one before to the end of its own last batch. Once the last
    segment ends, ``decide`` gets images/s per candidate and later batches go to the split it
    picks (until then, to ``splits[0]``, the last segment's).
    """

    def __init__(self, splits: list[Split], batches: int, decide: Callable[[dict[Split, float]], None]) -> None:
        plan = [(split, split.lanes, False) for split in splits]
        plan += [(split, batches, True) for split in splits[:0:-1] + splits[:1]]
        starts = [sum(size for _, size, _ in plan[:i]) for i in range(len(plan) + 1)]
        self.segments = [(split, starts[i], starts[i + 1]) for i, (split, _, _) in enumerate(plan)]
        self.is_timed = [is_timed for _, _, is_timed in plan]
        self.decide, self.chosen = decide, splits[0]
        self.finished = [threading.Event() for _ in self.segments]
        self.left = [end - start for _, start, end in self.segments]
        self.images = [0] * len(self.segments)
        self.ended: list[float] = [0.0] * len(self.segments)
        self.lock = threading.Lock()

    def _segment(self, index: int) -> int | None:
        return next((i for i, (_, start, end) in enumerate(self.segments) if start <= index < end), None)

    def covers(self, index: int) -> bool:
        return self._segment(index) is not None

    def split_for(self, index: int) -> Split:
        """The split for batch ``index``; in a segment after the first, once the previous has ended."""
        segment = self._segment(index)
        if segment is None:
            return self.chosen
        if segment > 0:
            self.finished[segment - 1].wait()
        return self.segments[segment][0]

    def record(self, index: int, images: int, run: Callable[..., list[Prediction]], *args: object) -> list[Prediction]:
        segment = self._segment(index)
        try:
            return run(*args)
        finally:
            with self.lock:
                self.images[segment] += images
                self.left[segment] -= 1
                if self.left[segment] == 0:
                    self.ended[segment] = time.perf_counter()
                    self.finished[segment].set()
                    if segment == len(self.segments) - 1:
                        self._decide()

    def _decide(self) -> None:
        images: dict[Split, float] = collections.defaultdict(float)
        seconds: dict[Split, float] = collections.defaultdict(float)
        for i in range(1, len(self.segments)):
            if not self.is_timed[i]:
                continue
            split = self.segments[i][0]
            images[split] += self.images[i]
            seconds[split] += self.ended[i] - self.ended[i - 1]
        rates = {split: images[split] / max(seconds[split], 1e-9) for split in images}
        self.chosen = max(rates, key=rates.get)
        self.decide(rates)

    def abandon(self) -> None:
        for event in self.finished:
            event.set()


def _queue_of(items: list[object]) -> queue.SimpleQueue:
    free: queue.SimpleQueue = queue.SimpleQueue()
    for item in items:
        free.put(item)
    return free


def _names(chunk: list[object]) -> list[str]:
    return [item if isinstance(item, str) else f"<image {n}>" for n, item in enumerate(chunk)]


def decode_batch(decode: Decode, items: list[object]) -> tuple[np.ndarray | None, dict[int, str]]:
    """The decoded images of ``items`` stacked (None if none could be read) and, by position,
    why the others could not."""
    arrays, errors = [], {}
    for i, item in enumerate(items):
        try:
            arrays.append(decode(item))
        except Exception as e:  # noqa: BLE001 - any unreadable file becomes an error row
            errors[i] = describe_error(e)
    return (np.stack(arrays) if arrays else None), errors


def predict_batch(model: Model, classes: list[str], k: int, names: list[str], decoded: np.ndarray | None,
                  errors: dict[int, str], threshold: float | None = None) -> list[Prediction]:
    """Rows for one batch: ``decoded`` holds the images of ``names`` not in ``errors``, in order."""
    if decoded is None:
        return [Prediction(name, error=errors[i]) for i, name in enumerate(names)]
    return rows_for(model(torch.from_numpy(decoded)).float(), classes, k, names, errors, threshold)


def probabilities(out: torch.Tensor, classes: int, multi_label: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's output rows as class probabilities (a softmax, or one sigmoid per class for a
    multi-label model), and the embedding columns after the logits (none if it gives none)."""
    logits, features = out[:, :classes], out[:, classes:]
    return (logits.sigmoid() if multi_label else logits.softmax(dim=-1)), features


def rows_for(out: torch.Tensor, classes: list[str], k: int, names: list[str],
             errors: dict[int, str] | None = None, threshold: float | None = None) -> list[Prediction]:
    """Rows from the model's outputs (logits, then any embedding) for the ``names`` not in ``errors``:
    the ``k`` most probable classes (softmax), or with ``threshold`` (a multi-label model, one
    sigmoid per class) those of the ``k`` most probable that reach it."""
    errors = errors or {}
    probs, features = probabilities(out, len(classes), threshold is not None)
    top = probs.topk(min(k, len(classes)), dim=-1)
    values, indices = iter(top.values.tolist()), iter(top.indices.tolist())
    embeddings = iter(features.numpy()) if features.shape[1] else None
    rows = []
    for i, name in enumerate(names):
        if i in errors:
            rows.append(Prediction(name, error=errors[i]))
        else:
            labels = [(classes[c], p) for c, p in zip(next(indices), next(values)) if threshold is None or p >= threshold]
            rows.append(Prediction(name, labels, None if embeddings is None else next(embeddings)))
    return rows


def default_splits(cores: int, decode_workers: int | None = None, model_threads: int | None = None) -> list[Split]:
    """The candidates worth timing on ``cores`` cores: a one-thread model lane per core (each
    core alternates decoding and the model), and one model on every core beside decoding
    threads. Given ``decode_workers`` or ``model_threads``, only the split they fix."""
    if model_threads is not None:
        lanes = max(1, cores // model_threads)
        return [Split(decode_workers or cores, lanes, model_threads)]
    if decode_workers is not None:
        return [Split(decode_workers, 1, cores)]
    return [Split(cores, cores, 1), Split(cores, 1, cores)] if cores > 1 else [Split(1, 1, 1)]


def _chunks(items: Iterable[object], size: int) -> Iterator[list[object]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk
