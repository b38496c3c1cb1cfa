"""Images to predictions in batches: decoding in a thread pool, overlapped with the model.

Decoding (Pillow's JPEG decoder and resize release the GIL) runs in ``decode_workers`` threads,
each turning a batch of paths into one uint8 array; up to ``lanes`` batches run through the
model at once, each call on ``model_threads`` threads. With as many lanes as cores and one
thread each, every core alternates between decoding a batch and running one, aiming at the
machine's ideal of ``cores / (decode time + model time)`` per image; one lane on every core is
the other choice, and ``Pipeline`` times both on the run's own first batches. Rows come out in input order; a bounded number of batches is in flight, so memory does
not grow with the collection.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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
    and the rest of each output row (if any) is the image's embedding.

    Given several candidate ``splits``, the first ``probe_batches`` batches of each run are
    shared out among them in turn, each timed; the rest of the run takes the fastest, kept in
    ``split`` (``measured``: images/s per candidate). Probe rows are real rows: nothing is
    predicted twice.
    """

    def __init__(self, decode: Decode, model_for: Callable[[int], Model], classes: list[str], k: int,
                 batch_size: int, splits: list[Split], probe_batches: int = 4) -> None:
        self.decode, self.model_for, self.classes, self.k = decode, model_for, classes, k
        self.batch_size, self.splits, self.probe_batches = batch_size, splits, probe_batches
        self.split = splits[0]
        self.measured: dict[str, float] = {}

    def run(self, items: Iterable[object]) -> Iterator[Prediction]:
        """Predictions for ``items`` (paths or PIL images), in their order, as they are ready."""
        chunks = _chunks(items, self.batch_size)
        if len(self.splits) > 1:
            timings = []
            for split in self.splits:
                segment = list(islice(chunks, self.probe_batches * split.lanes))
                if not segment:
                    break
                self._warm(split)
                start = time.perf_counter()
                yield from self._run(iter(segment), split)
                images = sum(len(c) for c in segment)
                timings.append((images / (time.perf_counter() - start), split))
                self.measured[str(split)] = timings[-1][0]
            self.split = max(timings)[1] if len(timings) == len(self.splits) else self.split
        yield from self._run(chunks, self.split)

    def _warm(self, split: Split) -> None:
        """One call before timing: a runtime's first run pays for allocations and kernel picks."""
        h, w = getattr(self.decode, "size", (224, 224))
        self.model_for(split.model_threads)(torch.zeros(1, 3, h, w, dtype=torch.uint8))

    def _run(self, chunks: Iterator[list[object]], split: Split) -> Iterator[Prediction]:
        model = self.model_for(split.model_threads)
        with ThreadPoolExecutor(split.decode_workers, thread_name_prefix="decode") as decoders, \
                ThreadPoolExecutor(split.lanes, thread_name_prefix="model",
                                   initializer=torch.set_num_threads, initargs=(split.model_threads,)) as lanes:
            def decode_then_run(chunk: list[object]) -> Future:
                decoded, errors = decode_batch(self.decode, chunk)
                return lanes.submit(predict_batch, model, self.classes, self.k, _names(chunk), decoded, errors)

            in_flight: collections.deque[Future] = collections.deque()
            window = split.decode_workers + split.lanes + 1
            try:
                for chunk in chunks:
                    in_flight.append(decoders.submit(decode_then_run, chunk))
                    if len(in_flight) >= window:
                        yield from in_flight.popleft().result().result()
                while in_flight:
                    yield from in_flight.popleft().result().result()
            finally:
                for future in in_flight:
                    future.cancel()


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
                  errors: dict[int, str]) -> list[Prediction]:
    """Rows for one batch: ``decoded`` holds the images of ``names`` not in ``errors``, in order."""
    if decoded is None:
        return [Prediction(name, error=errors[i]) for i, name in enumerate(names)]
    out = model(torch.from_numpy(decoded)).float()
    logits, features = out[:, :len(classes)], out[:, len(classes):]
    top = logits.softmax(dim=-1).topk(min(k, len(classes)), dim=-1)
    values, indices = iter(top.values.tolist()), iter(top.indices.tolist())
    embeddings = iter(features.numpy()) if features.shape[1] else None
    rows = []
    for i, name in enumerate(names):
        if i in errors:
            rows.append(Prediction(name, error=errors[i]))
        else:
            rows.append(Prediction(name, [(classes[c], p) for c, p in zip(next(indices), next(values))],
                                   None if embeddings is None else next(embeddings)))
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
