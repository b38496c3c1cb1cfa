"""``hybridvit serve``: models behind HTTP (FastAPI on uvicorn): this server's own API (``/v1``),
the Open Inference Protocol (``/v2``, in ``v2``; gRPC beside it, ``grpc_v2``), Prometheus metrics
and a demo page, over a ``ModelRepository`` of one or more models.

Clients send image bytes (a raw body, or multipart with several images), never paths on the
server. Bodies, the time to send one, and decoded pixel counts are capped; every bad upload or
query gets a 4xx JSON error naming the problem (a client that hangs up mid-body is counted as
499, as nginx does: 5xx are the server's own faults) and the server goes on. Decoding runs in
threads, off the event loop; each model runs in batches (``batcher.Batcher``). The numbers are
those ``hybridvit predict`` gives for the same file: the same preprocessing, model path and row
format.
"""

from __future__ import annotations

import ipaddress
import socket
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..checks import BindError
from . import tracing
from .bodies import Served, answer, read_body, refusal
from .model_server import ModelServer, UploadError, check_api_key
from .repository import ModelRepository
from .v2 import add_v2_routes

LOCAL_HOSTS = ("localhost",)
DEMO_PAGE = Path(__file__).with_name("demo.html")  # the page at /: drag an image, see its top 5 and attention


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


def create_app(models: ModelRepository | ModelServer, grpc_port: int | None = None,
               grpc_host: str = "127.0.0.1") -> FastAPI:
    """The FastAPI app serving ``models`` (one ``ModelServer``, or a ``ModelRepository`` of
    several): this server's own API at ``/v1``, the Open Inference Protocol at ``/v2`` (and over
    gRPC on ``grpc_port``), OpenAPI documentation at ``/docs``."""
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
        return refusal(e)

    @app.exception_handler(RequestValidationError)
    async def bad_query(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, error['loc'][1:])) or error['loc'][0]}: {error['msg']}"
                             + (f", got {error['input']!r}" if "input" in error else "") for error in e.errors())
        if request.url.path == "/v1/predict":  # refused before the handler runs: counted here
            metrics.requests.labels("422", "", "", "v1").inc()
        return JSONResponse({"error": problems}, status_code=422)

    def check_key(request: Request) -> None:
        check_api_key(config, request.headers.get("x-api-key"), request.headers.get("authorization"))

    @app.post("/v1/predict", summary="Top classes (and embeddings) for one or more images",
              description="A raw image body (image/* or application/octet-stream), or multipart/form-data "
                          "with one or more image files.")
    async def predict(request: Request, top_k: int = Query(5, ge=1), embeddings: bool = Query(False),
                      threshold: float | None = Query(None, gt=0, lt=1, description="multi-label models: the "
                                                      "probability from which a label is returned"),
                      model: str | None = Query(None, description="the model's name (default: the first served)"),
                      ) -> Any:
        async def handle(served: Served) -> Response:
            with tracing.span("receive", tracing.extract(request.headers), {"model": model or ""}):
                check_key(request)
                server = repository.default if model is None else repository.get(model)
                served.name, served.version = server.name, server.version
                async with server.use():
                    uploads = await read_body(request, config, metrics)
                    return JSONResponse({"predictions": await server.predict(uploads, top_k, embeddings,
                                                                             threshold)})

        return await answer(metrics, "v1", handle)

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

    add_v2_routes(app, repository, check_key)
    return app


def _swagger_assets() -> Path | None:
    """The folder of Swagger UI's script and style in the ``fastapi-offline`` package, if installed."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).with_name("static")
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


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
