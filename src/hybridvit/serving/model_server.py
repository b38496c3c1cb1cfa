"""One model version as a server runs it (``ModelServer``: its predictor, batcher and readiness)
and what every model of a server shares (``Shared``: the cores, the decoding, the metrics), with
the refusals (``UploadError``) and limits (``ServeConfig``) every protocol applies alike.
"""

from __future__ import annotations

import asyncio
import io
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import tracing
from .batcher import Batcher
from .cores import Cores
from .outputs import as_dict
from .pipeline import describe_error, rows_for
from .predict import Predictor


class UploadError(Exception):
    """A request the server refuses: HTTP ``status`` and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServeConfig:
    """What a server adds to the model's ``InferenceSpec`` (whose ``batch_size`` is the largest
    batch and ``decode_workers`` the decoding threads): waiting, limits and access."""

    max_wait_ms: float = 5.0
    max_body_mb: float = 20.0
    max_images: int = 64  # per request
    max_pixels: int = 40_000_000  # per decoded image (a 100,000 x 100,000 header is refused before decoding)
    api_key: str | None = None
    body_timeout_s: float = 30.0  # a body not received whole by then is refused (408): slow clients free their slot


def check_api_key(config: ServeConfig, api_key: str | None, authorization: str | None) -> None:
    """``UploadError`` 401 unless the request (its ``X-API-Key``, or ``Authorization: Bearer KEY``:
    HTTP headers or gRPC metadata) gives the server's API key, when it has one."""
    if config.api_key is None:
        return
    scheme, _, credentials = (authorization or "").strip().partition(" ")  # the scheme in any case (RFC 7235)
    given = api_key or (credentials.strip() if scheme.lower() == "bearer" else "")
    if not secrets.compare_digest(given.encode(), config.api_key.encode()):
        raise UploadError(401, "missing or wrong API key (X-API-Key: KEY or Authorization: Bearer KEY)")


def decode_upload(predictor: Predictor, data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Image bytes to the model's uint8 input, as ``predict`` decodes a file; ``UploadError`` if not."""
    if not data:
        raise UploadError(422, f"{name}: empty upload (zero bytes)")
    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            width, height = header.size
    except Image.DecompressionBombError as e:
        raise UploadError(413, f"{name}: too many pixels: {e}") from e
    except (UnidentifiedImageError, OSError) as e:
        raise UploadError(415, f"{name}: not an image Pillow can read") from e
    if width * height > max_pixels:
        raise UploadError(413, f"{name}: {width}x{height} is {width * height:,} pixels, over the server's "
                          f"limit of {max_pixels:,}")
    buffer = io.BytesIO(data)
    buffer.name = name  # named in decoding errors
    try:
        return predictor.preprocess(buffer)
    except ValueError as e:
        raise UploadError(422, describe_error(e)) from e


class ServerMetrics:
    """The server's Prometheus metrics, one registry for every model it serves (labelled by model
    and version where they are a model's)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("hybridvit_requests", "Requests by HTTP (or gRPC) status, model and protocol",
                                ["status", "model", "version", "protocol"], registry=registry)
        self.latency = Histogram("hybridvit_request_seconds", "Inference request latency", ["protocol"],
                                 registry=registry, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch_sizes = Histogram("hybridvit_batch_size", "Images per model call", ["model", "version"],
                                     registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.model_seconds = Counter("hybridvit_model_seconds", "Seconds the model ran on the server's cores "
                                     "(one model call at a time: each model's share of them)", ["model", "version"],
                                     registry=registry)
        self.queue_depth = Gauge("hybridvit_queue_depth", "Images waiting for a batch", ["model", "version"],
                                 registry=registry)
        self.in_flight = Gauge("hybridvit_requests_in_flight", "Inference requests being served", registry=registry)
        self.body_timeouts = Counter("hybridvit_body_timeouts", "Requests whose body was not received whole within "
                                     "--body-timeout-s (408)", registry=registry)


class Shared:
    """What every model of one server shares: the cores (``cores.Cores``: one model call at a
    time, fair in seconds between the models under load), the decoding threads and the metrics."""

    def __init__(self, decode_workers: int | None = None) -> None:
        self.threads = torch.get_num_threads()
        self.metrics = ServerMetrics()
        self.cores = Cores()
        self.decoders = ThreadPoolExecutor(decode_workers or self.threads, thread_name_prefix="decode")
        self.models = 0  # model versions batching now: with several, each hands the cores two batches

    def close(self) -> None:
        self.decoders.shutdown(wait=True)
        self.cores.shutdown()


class ModelServer:
    """One model version a server serves: the predictor, its batcher and readiness. ``shared``:
    the cores, decoding threads and metrics it shares with the server's other models (its own
    when served alone)."""

    def __init__(self, predictor: Predictor, config: ServeConfig, batching: type[Batcher] = Batcher, *,
                 name: str | None = None, version: str = "1", shared: Shared | None = None) -> None:
        self.predictor, self.config, self.batching = predictor, config, batching  # Batcher, or Ray Serve's (RayBatcher)
        self.name, self.version = name or predictor.model_name, version
        self.owns_shared = shared is None
        self.shared = shared or Shared(predictor.spec.decode_workers)
        self.metrics = self.shared.metrics
        self.threads = self.shared.threads
        self.max_batch_size = predictor.spec.batch_size
        self.lane = self.shared.cores.lane((self.name, self.version))  # its way onto the shared cores
        self.model = predictor.model_for(self.threads)
        self.ready = False
        self.rate = 0.0  # images/s at the largest batch, measured at warm-up
        self.batcher: Batcher | None = None
        self.on_ready: Callable[[ModelServer], None] | None = None  # told once warmed up
        self._loop: asyncio.AbstractEventLoop | None = None
        self.decoding = 0  # images of requests being decoded (on their way to a batch)
        self.active = 0  # requests using this version now: it is stopped only once they are answered
        self._idle: asyncio.Event | None = None

    def _run(self, images: np.ndarray) -> torch.Tensor:
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model(torch.from_numpy(images)).float()
        self.metrics.model_seconds.labels(self.name, self.version).inc(time.perf_counter() - start)
        return out

    async def start(self) -> None:
        """Warm up on a full batch (and time it), then start batching."""
        size = self.predictor.preprocess.size
        zeros = np.zeros((self.max_batch_size, 3, *size), dtype=np.uint8)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.lane, self._run, zeros)
        start = time.perf_counter()
        await loop.run_in_executor(self.lane, self._run, zeros)
        self.rate = len(zeros) / (time.perf_counter() - start)
        self.metrics.model_seconds.labels(self.name, self.version).reset()  # the warm-up is not the model's share
        self.batcher = self.batching(self._run, self.max_batch_size, self.config.max_wait_ms / 1e3,
                                     self.metrics.batch_sizes.labels(self.name, self.version).observe,
                                     incoming=lambda: self.decoding, executor=self.lane,
                                     in_flight=lambda: 2 if self.shared.models > 1 else 1)
        self.batcher.start()
        self.shared.models += 1
        self._loop = loop
        self.metrics.queue_depth.labels(self.name, self.version).set_function(
            lambda: self.batcher.depth if self.batcher else 0)
        self.ready = True
        if self.on_ready is not None:
            self.on_ready(self)

    def drain(self) -> None:
        """Shutting down: batches waiting for more images run now (safe from a signal handler)."""
        self.ready = False
        if self.batcher is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self.batcher.hurry)

    async def retire(self) -> None:
        """Take no new requests, answer those it has (their batches at once), then stop."""
        self.ready = False
        if self.batcher is not None:
            self.batcher.hurry()
        if self.active:
            self._idle = asyncio.Event()
            await self._idle.wait()
        await self.stop()

    async def stop(self) -> None:
        self.ready = False
        if self.batcher is not None:
            self.shared.models -= 1
            await self.batcher.stop()
            self.batcher = None
        for metric in (self.metrics.queue_depth, self.metrics.batch_sizes, self.metrics.model_seconds):
            try:
                metric.remove(self.name, self.version)
            except KeyError:
                pass
        if self.owns_shared:
            self.shared.close()

    @asynccontextmanager
    async def use(self) -> AsyncIterator[ModelServer]:
        """Hold this version for one request: ``retire`` waits for it."""
        self.active += 1
        try:
            yield self
        finally:
            self.active -= 1
            if not self.active and self._idle is not None:
                self._idle.set()

    async def decode(self, uploads: list[tuple[str, bytes]]) -> list[np.ndarray]:
        """The uploads decoded in the decoding threads, in their order (``UploadError`` for the first bad one)."""
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(*(loop.run_in_executor(
            self.shared.decoders, decode_upload, self.predictor, data, name, self.config.max_pixels)
            for name, data in uploads), return_exceptions=True)
        for result in decoded:
            if isinstance(result, BaseException):
                raise result
        return decoded

    async def infer(self, images: Callable[[], Awaitable[list[np.ndarray]]], count: int) -> torch.Tensor:
        """The model's output rows for ``count`` images that ``images()`` gives (decoded or taken
        from tensors): they join the batches of every other request to this model."""
        self.decoding += count
        try:
            with tracing.span("decode", attributes={"images": count}):
                decoded = await images()
            traces = [tracing.waiting() for _ in decoded]
            queued = [self.batcher.submit(image, trace) for image, trace in zip(decoded, traces)]
        finally:
            self.decoding -= count  # only once queued: a batch never misses an image on its way
        out = torch.stack(await asyncio.gather(*queued))
        tracing.queued_and_ran(traces)
        return out

    async def predict(self, uploads: list[tuple[str, bytes]], top_k: int, embeddings: bool,
                      threshold: float | None = None) -> list[dict[str, Any]]:
        """Rows for the uploads, in their order (all decoded before any reaches the model)."""
        if embeddings and self.predictor.embedding_dim is None:
            raise UploadError(400, "this model gives class scores only (an .onnx file): embeddings=true needs the "
                              "server started from the model folder")
        outputs = await self.infer(lambda: self.decode(uploads), len(uploads))
        if threshold is not None and not self.predictor.multi_label:
            raise UploadError(400, "threshold is for multi-label models; this one gives a softmax over its classes")
        rows = rows_for(outputs, self.predictor.classes, top_k, [name for name, _ in uploads],
                        threshold=threshold or self.predictor.threshold)
        answers = [as_dict(row) for row in rows]
        if not embeddings:
            for answer in answers:
                answer.pop("embedding", None)
        return answers

    async def attention(self, upload: tuple[str, bytes], query: tuple[float, float], layer: int) -> dict[str, Any]:
        """One query's attention maps for one image (``Predictor.attention``), run between batches."""
        image, = await self.decode([upload])
        try:
            view = await self.batcher.call(self.predictor.attention, image, query, layer)
        except ValueError as e:  # a query outside the input, a layer that does not exist
            raise UploadError(422, str(e)) from e
        return {"layer": view.layer, "layers": view.layers, "query": list(query), "query_cell": list(view.query_cell),
                "key_grid": list(view.maps.shape[1:]), "heads": view.maps.numpy().round(6).tolist()}

    def info(self) -> dict[str, Any]:
        p = self.predictor
        return {"model": p.model_name, "name": self.name, "version": self.version, "classes": p.classes,
                "input_size": list(p.preprocess.size), "preprocessing": p.preprocessing,
                "precision": self.model.precision, "backend": self.model.backend,
                "agreement": getattr(self.model, "agreement", {}), "threads": self.threads,
                "embedding_dim": p.embedding_dim, "multi_label": p.multi_label, "threshold": p.threshold,
                "max_batch_size": self.max_batch_size, "max_wait_ms": self.config.max_wait_ms,
                "images_per_second_at_warm_up": round(self.rate, 1)}
