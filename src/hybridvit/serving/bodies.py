"""HTTP requests within a server's limits: bodies (their size, counted as they come, and the time
to send them; a raw image body or a multipart form's image files for ``/v1``, the bytes for
``/v2``), and each inference request answered and counted the same way whatever its protocol."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from .model_server import ServeConfig, ServerMetrics, UploadError
from .pipeline import describe_error

CLIENT_CLOSED = 499  # nginx's status for a request whose client went away before the answer


@dataclass
class Served:
    """The model version a request reached (none yet: refused before), for its metrics."""

    name: str = ""
    version: str = ""


async def answer(metrics: ServerMetrics, protocol: str, handle: Callable[[Served], Awaitable[Response]]) -> Response:
    """``handle``'s response, or what it raised as one (a refusal, 499 for a client gone, 500 for a
    model failure: the server goes on), counted once by status, model and protocol, and timed."""
    start, served = time.perf_counter(), Served()
    metrics.in_flight.inc()
    try:
        response = await handle(served)
    except UploadError as e:
        response = refusal(e)
    except ClientDisconnect:  # no one to answer: counted apart from the server's faults
        response = Response(status_code=CLIENT_CLOSED)
    except Exception as e:  # noqa: BLE001 - a model failure fails this request, and the server goes on
        response = JSONResponse({"error": f"model failed: {describe_error(e)}"}, status_code=500)
    finally:  # a client that went away (cancelled) leaves the gauge too
        metrics.in_flight.dec()
    metrics.requests.labels(str(response.status_code), served.name, served.version, protocol).inc()
    metrics.latency.labels(protocol).observe(time.perf_counter() - start)
    return response


def refusal(e: UploadError) -> JSONResponse:
    """The JSON answer to a refused request; a timed-out body also closes its connection (the
    rest of the body is never read)."""
    headers = {"connection": "close"} if e.status == 408 else None
    return JSONResponse({"error": str(e)}, status_code=e.status, headers=headers)


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
