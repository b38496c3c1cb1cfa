"""``serve``: a model behind an HTTP endpoint (FastAPI on uvicorn), with dynamic batching."""

from __future__ import annotations

import os
from typing import Optional

import typer

from .common import PRETRAINED, PRETRAINED_TAG, SOURCE_HELP


def serve_cmd(
    checkpoint: str = typer.Argument(..., help=SOURCE_HELP + ", or an .onnx file in a model or run folder"),
    host: str = typer.Option("127.0.0.1", help="interface to bind (another than loopback needs --api-key "
                             "or --insecure)"),
    port: int = typer.Option(8000, help="TCP port"),
    max_batch_size: int = typer.Option(16, help="images per model call at most"),
    max_wait_ms: float = typer.Option(5.0, help="how long a first waiting image waits for others to join its batch"),
    precision: str = typer.Option("auto", help="auto (the fastest path measured here), fp32, bf16 or int8"),
    backend: str = typer.Option("auto", help="auto, onnxruntime, openvino or torchscript"),
    workers: Optional[int] = typer.Option(None, help="decoding threads (default: one per core)"),
    api_key: Optional[str] = typer.Option(None, envvar="HYBRIDVIT_API_KEY", help="required in X-API-Key or "
                                          "Authorization: Bearer (env: HYBRIDVIT_API_KEY)"),
    insecure: bool = typer.Option(False, "--insecure", help="allow a non-local --host without an API key"),
    max_body_mb: float = typer.Option(20.0, help="largest request body, in MiB"),
    max_images: int = typer.Option(64, help="most images in one request"),
    max_pixels: int = typer.Option(40_000_000, help="most pixels in one decoded image"),
    exif: bool = typer.Option(True, "--exif/--no-exif", help="turn photos as their EXIF orientation says"),
    pretrained: bool = PRETRAINED,
    pretrained_tag: Optional[str] = PRETRAINED_TAG,
) -> None:
    """Serve a model over HTTP: POST /v1/predict (image bytes), GET /v1/model, /health, /ready,
    /metrics (Prometheus), /docs (OpenAPI). Concurrent requests share batches."""
    from ..checks import check_range
    from ..inference.runners import installed

    if not installed("fastapi", "uvicorn", "python_multipart", "prometheus_client"):
        raise ImportError('serving needs FastAPI, uvicorn, python-multipart and prometheus_client: '
                          'pip install "hybridvit[serve]"')
    from ..inference.predict import Predictor
    from ..inference.serving import ModelServer, ServeConfig, check_bind, run

    check_range("max batch size", max_batch_size, 1)
    check_range("max wait ms", max_wait_ms, 0)
    check_range("max images", max_images, 1)
    check_range("max pixels", max_pixels, 1)
    check_range("max body mb", max_body_mb, 0.001)
    check_range("workers", workers, 1)
    check_range("port", port, 0, 65535)
    check_bind(host, api_key, insecure)
    predictor = Predictor(checkpoint, precision, pretrained, pretrained_tag, backend=backend,
                          batch_size=max_batch_size, embeddings=not checkpoint.lower().endswith(".onnx"), exif=exif)
    config = ServeConfig(max_batch_size, max_wait_ms, workers, max_body_mb, max_images, max_pixels, api_key)
    server = ModelServer(predictor, config)

    def announce(server: ModelServer) -> None:
        typer.echo(f"serving {predictor.model_name} at http://{host}:{port} ({server.model.precision}/"
                   f"{server.model.backend}, {server.threads} thread(s), {server.rate:,.0f} images/s in batches "
                   f"of {max_batch_size}); docs at /docs", err=True)

    server.on_ready = announce
    run(server, host, port, os.environ.get("HYBRIDVIT_LOG_LEVEL", "warning"))
