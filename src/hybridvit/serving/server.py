"""``hybridvit serve``: a ``Predictor`` behind HTTP (FastAPI on uvicorn), with dynamic batching
and Prometheus metrics.

Clients send image bytes (a raw body, or multipart with several images), never paths on the
server. Bodies, the time to send one, and decoded pixel counts are capped; every bad upload or
query gets a 4xx JSON error naming the problem (a client that hangs up mid-body is counted as
499, as nginx does: 5xx are the server's own faults) and the server goes on. Decoding runs in a thread pool, off the event loop; the
model runs in batches (``batcher.Batcher``). The numbers are those ``hybridvit predict`` gives
for the same file: the same preprocessing, model path and row format.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.requests import ClientDisconnect
from PIL import Image, UnidentifiedImageError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..checks import BindError
from . import tracing
from .batcher import Batcher
from .cores import Cores
from .outputs import as_dict
from .pipeline import describe_error, rows_for
from .predict import Predictor

if TYPE_CHECKING:
    from .repository import ModelRepository

LOCAL_HOSTS = ("localhost",)
DEMO_PAGE = Path(__file__).with_name("demo.html")  # the page at /: drag an image, see its top 5 and attention


CLIENT_CLOSED = 499  # nginx's status for a request whose client went away before the answer


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


def is_local(host: str) -> bool:
    """``host`` binds the loopback interface only."""
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """A server other machines can reach needs an API key, unless ``insecure`` says otherwise."""
    if not is_local(host) and not api_key and not insecure:
        raise ValueError(f"--host {host} is reachable from other machines: give --api-key (or HYBRIDVIT_API_KEY), "
                         "or --insecure to serve without one")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), bound before the model loads so
    that a port in use fails at once, and connections made once the server says it is up queue
    until it accepts them; ``BindError`` names the address and why."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise BindError(f"cannot serve at {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may reuse a port in TIME_WAIT
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise BindError(f"cannot serve at {host}:{port}: {e.strerror or e}") from None
    return sock


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
                                     incoming=lambda: self.decoding, executor=self.lane)
        self.batcher.start()
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
            await self.batcher.stop()
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


def create_app(models: ModelRepository | ModelServer, grpc_port: int | None = None,
               grpc_host: str = "127.0.0.1") -> FastAPI:
    """The FastAPI app serving ``models`` (one ``ModelServer``, or a ``ModelRepository`` of
    several): this server's own API at ``/v1``, the Open Inference Protocol at ``/v2`` (and over
    gRPC on ``grpc_port``), OpenAPI documentation at ``/docs``."""
    from .repository import ModelRepository

    repository = models if isinstance(models, ModelRepository) else ModelRepository.serving(models)
    metrics = repository.metrics
    grpc_server: Any = None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal grpc_server
        if grpc_port is not None:
            from .grpc_v2 import start_grpc

            grpc_server = await start_grpc(repository, grpc_port, grpc_host)
        await repository.start()
        if grpc_server is not None:
            await grpc_server.serving()
        yield
        if grpc_server is not None:
            await grpc_server.stop(grace=5)
        await repository.stop()

    app = FastAPI(title="hybridvit", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Image classification: this server's API (/v1) and the Open Inference Protocol (/v2)")
    app.state.repository = repository
    config = repository.config

    @app.exception_handler(UploadError)
    async def refused(request: Request, e: UploadError) -> JSONResponse:
        return _refusal(e)

    @app.exception_handler(RequestValidationError)
    async def bad_query(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, error['loc'][1:])) or error['loc'][0]}: {error['msg']}"
                             + (f", got {error['input']!r}" if "input" in error else "") for error in e.errors())
        if request.url.path == "/v1/predict":  # refused before the handler runs: counted here
            metrics.requests.labels("422", "", "", "v1").inc()
        return JSONResponse({"error": problems}, status_code=422)

    def check_key(request: Request) -> None:
        check_api_key(config, request.headers.get("x-api-key") or _bearer(request.headers.get("authorization", "")))

    @app.post("/v1/predict", summary="Top classes (and embeddings) for one or more images",
              description="A raw image body (image/* or application/octet-stream), or multipart/form-data "
                          "with one or more image files.")
    async def predict(request: Request, top_k: int = Query(5, ge=1), embeddings: bool = Query(False),
                      threshold: float | None = Query(None, gt=0, lt=1, description="multi-label models: the "
                                                      "probability from which a label is returned"),
                      model: str | None = Query(None, description="the model's name (default: the first served)"),
                      ) -> Any:
        start = time.perf_counter()
        metrics.in_flight.inc()
        served = ("", "")
        try:
            with tracing.span("receive", tracing.extract(request.headers), {"model": model or ""}):
                check_key(request)
                server = repository.default if model is None else repository.get(model)
                served = (server.name, server.version)
                async with server.use():
                    uploads = await read_body(request, config, metrics)
                    answers = await server.predict(uploads, top_k, embeddings, threshold)
            response = JSONResponse({"predictions": answers})
        except UploadError as e:
            response = _refusal(e)
        except ClientDisconnect:  # no one to answer: counted apart from the server's faults
            response = Response(status_code=CLIENT_CLOSED)
        except Exception as e:  # noqa: BLE001 - a model failure fails this request, and the server goes on
            response = JSONResponse({"error": f"model failed: {describe_error(e)}"}, status_code=500)
        finally:  # a client that went away (cancelled) leaves the gauge too
            metrics.in_flight.dec()
        metrics.requests.labels(str(response.status_code), *served, "v1").inc()
        metrics.latency.labels("v1").observe(time.perf_counter() - start)
        return response

    @app.post("/v1/attention", summary="Where each head looks from one query point of an image",
              description="The image as for /v1/predict (one image); y and x in the model input's pixels "
                          "(input_size of /v1/model, after the resize and centre crop). The maps are those "
                          "`hybridvit plot attention` draws: one (key rows x key columns) grid per head.")
    async def attention(request: Request, y: float = Query(..., ge=0), x: float = Query(..., ge=0),
                        layer: int = Query(-1, description="attention call, in forward order (-1: the last)")) -> Any:
        check_key(request)  # refusals (UploadError) become JSON errors in the app's handler
        uploads = await read_body(request, config, metrics)
        if len(uploads) != 1:
            raise UploadError(400, f"send one image for attention maps, not {len(uploads)}")
        server = repository.default
        async with server.use():
            return await server.attention(uploads[0], (y, x), layer)

    page = DEMO_PAGE.read_text(encoding="utf-8")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def demo() -> HTMLResponse:
        return HTMLResponse(page)

    assets = _swagger_assets()
    if assets is not None:  # Swagger UI from the installed package: /docs works without the internet
        from fastapi.staticfiles import StaticFiles

        app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        local = {} if assets is None else {"swagger_js_url": "/docs-assets/swagger-ui-bundle.js",
                                           "swagger_css_url": "/docs-assets/swagger-ui.css",
                                           "swagger_favicon_url": "/docs-assets/favicon.png"}
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="hybridvit: API", **local)

    @app.get("/v1/model", summary="The model, its classes, preprocessing and the path it runs on")
    async def model(request: Request, model: str | None = Query(None, description="the model's name "
                                                                "(default: the first served)")) -> dict[str, Any]:
        check_key(request)
        return (repository.default if model is None else repository.get(model)).info()

    @app.get("/health", summary="Live")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Warmed up and batching")
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": repository.ready}, status_code=200 if repository.ready else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    from .v2 import add_v2_routes

    add_v2_routes(app, repository, check_key)
    return app


def check_api_key(config: ServeConfig, given: str | None) -> None:
    """``UploadError`` 401 unless ``given`` is the server's API key (when it has one)."""
    if config.api_key is not None and not secrets.compare_digest((given or "").encode(), config.api_key.encode()):
        raise UploadError(401, "missing or wrong API key (X-API-Key: KEY or Authorization: Bearer KEY)")


def _refusal(e: UploadError) -> JSONResponse:
    """The JSON answer to a refused request; a timed-out body also closes its connection (the
    rest of the body is never read)."""
    headers = {"connection": "close"} if e.status == 408 else None
    return JSONResponse({"error": str(e)}, status_code=e.status, headers=headers)


def _bearer(authorization: str) -> str:
    """The credentials of ``Authorization: Bearer KEY``; the scheme is case-insensitive (RFC 7235),
    and a header without one gives nothing."""
    scheme, _, credentials = authorization.strip().partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""


def _swagger_assets() -> Path | None:
    """The folder of Swagger UI's script and style in the ``fastapi-offline`` package, if installed."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).with_name("static")
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


async def read_body(request: Request, config: ServeConfig, metrics: ServerMetrics,
                    images: bool = True) -> Any:
    """The request's body within the server's limits of size and time; with ``images``, its
    images as (name, bytes): a raw body, or the files of a multipart form."""
    limit = int(config.max_body_mb * 2**20)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadError(413, f"body of {int(declared):,} bytes is over the server's limit of {limit:,} "
                          f"(--max-body-mb {config.max_body_mb:g})")
    body = bytearray()

    async def receive() -> None:
        async for chunk in request.stream():  # counted as it comes: a missing or false length cannot get past
            body.extend(chunk)
            if len(body) > limit:
                raise UploadError(413, f"body is over the server's limit of {limit:,} bytes "
                                  f"(--max-body-mb {config.max_body_mb:g})")

    try:
        await asyncio.wait_for(receive(), config.body_timeout_s)
    except asyncio.TimeoutError:
        metrics.body_timeouts.inc()
        raise UploadError(408, f"the body was not received whole within {config.body_timeout_s:g} s "
                          f"({len(body):,} bytes came; --body-timeout-s)") from None
    if not images:
        return bytes(body)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        uploads = await _multipart(request, bytes(body), config.max_images)
    elif kind.startswith("image/") or kind == "application/octet-stream":
        uploads = [("image", bytes(body))]
    else:
        raise UploadError(415, f"content type {kind or '(none)'!r}: send an image (image/*, "
                          "application/octet-stream) or multipart/form-data with image files")
    if not uploads:
        raise UploadError(400, "no image in the request")
    return uploads


async def _multipart(request: Request, body: bytes, max_images: int) -> list[tuple[str, bytes]]:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        # the body is capped already; the image count is checked below, with its own message
        form = await MultiPartParser(request.headers, stream(), max_files=len(body), max_fields=len(body)).parse()
    except MultiPartException as e:
        raise UploadError(400, f"multipart: {e}") from e
    files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    if len(files) > max_images:
        raise UploadError(400, f"{len(files)} images in one request, over the server's limit of {max_images}")
    return [(f.filename or f"image {i}", await f.read()) for i, f in enumerate(files)]


def run(repository: ModelRepository, sock: socket.socket, log_level: str = "warning",
        grpc_port: int | None = None, host: str = "127.0.0.1") -> None:
    """Serve on ``sock`` (``bind``), and gRPC on ``grpc_port``, until SIGINT or SIGTERM; then
    requests in flight finish (their batches at once), and the process exits."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            repository.drain()
            super().handle_exit(sig, frame)

    # gRPC's asyncio server shares the loop (and so the batchers): the standard loop, which it supports
    loop = "asyncio" if grpc_port is not None else "auto"
    Server(uvicorn.Config(create_app(repository, grpc_port, host), log_level=log_level, loop=loop)).run(sockets=[sock])
