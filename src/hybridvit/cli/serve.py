"""``serve``: a model behind an HTTP endpoint (FastAPI on uvicorn), with dynamic batching."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import typer

from .common import BACKEND, CALIBRATION, FAST_DECODE, PRECISION, PRETRAINED, PRETRAINED_TAG, SOURCE_HELP, VALIDATION

if TYPE_CHECKING:
    from ..inference.cluster import ModelSpec
    from ..inference.serving import ServeConfig
    from ..inference.serving_ray import Scaling


def serve_cmd(
    checkpoint: str = typer.Argument(..., help=SOURCE_HELP + ", or an .onnx, .pte or .tflite file in a model or run "
                                    "folder"),
    host: str = typer.Option("127.0.0.1", help="interface to bind (another than loopback needs --api-key "
                             "or --insecure)"),
    port: int = typer.Option(8000, help="TCP port"),
    max_batch_size: int = typer.Option(16, help="images per model call at most"),
    max_wait_ms: float = typer.Option(5.0, help="how long a first waiting image waits for others to join its batch"),
    precision: str = PRECISION,
    backend: str = BACKEND,
    calibration: Optional[str] = CALIBRATION,
    validation: Optional[str] = VALIDATION,
    workers: Optional[int] = typer.Option(None, help="decoding threads (default: one per core)"),
    api_key: Optional[str] = typer.Option(None, envvar="HYBRIDVIT_API_KEY", help="required in X-API-Key or "
                                          "Authorization: Bearer (env: HYBRIDVIT_API_KEY)"),
    insecure: bool = typer.Option(False, "--insecure", help="allow a non-local --host without an API key"),
    max_body_mb: float = typer.Option(20.0, help="largest request body, in MiB"),
    body_timeout_s: float = typer.Option(30.0, help="seconds a client has to send its whole body (then 408 and "
                                         "the connection is closed: slow clients cannot hold the server)"),
    max_images: int = typer.Option(64, help="most images in one request"),
    max_pixels: int = typer.Option(40_000_000, help="most pixels in one decoded image"),
    exif: bool = typer.Option(True, "--exif/--no-exif", help="turn photos as their EXIF orientation says"),
    fast_decode: bool = FAST_DECODE,
    pretrained: bool = PRETRAINED,
    pretrained_tag: Optional[str] = PRETRAINED_TAG,
    ray: Optional[str] = typer.Option(None, help="replicas on Ray Serve at ADDRESS (bare --ray: the running "
                                      "cluster, else a local one), batching with Ray Serve's batcher"),
    replicas: int = typer.Option(1, help="with --ray: model replicas (without --max-replicas)"),
    replica_cpus: int = typer.Option(1, help="with --ray: CPUs (and model threads) per replica"),
    min_replicas: Optional[int] = typer.Option(None, help="with --ray: autoscale from this many replicas"),
    max_replicas: Optional[int] = typer.Option(None, help="with --ray: autoscale up to this many replicas"),
    target_ongoing_requests: Optional[float] = typer.Option(None, help="with --ray: autoscaling's requests "
                                                            "per replica to aim for"),
    max_ongoing_requests: Optional[int] = typer.Option(None, help="with --ray: requests one replica takes at "
                                                       "once (default: 4 x --max-batch-size)"),
) -> None:
    """Serve a model over HTTP: POST /v1/predict (image bytes), POST /v1/attention, GET /v1/model,
    /health, /ready, /metrics (Prometheus), /docs (OpenAPI) and a demo page at /. Concurrent
    requests share batches. With --ray, the same app runs as replicas on Ray Serve."""
    from ..checks import check_range
    from ..inference.runners import installed

    if not installed("fastapi", "uvicorn", "python_multipart", "prometheus_client"):
        raise ImportError('serving needs FastAPI, uvicorn, python-multipart and prometheus_client: '
                          'pip install "hybridvit[serve]"')
    from ..inference.predict import Predictor
    from ..inference.serving import ModelServer, ServeConfig, bind, check_bind, run
    from ..inference.cluster import ModelSpec
    from ..inference.serving_ray import Scaling

    check_range("max batch size", max_batch_size, 1)
    check_range("max wait ms", max_wait_ms, 0)
    check_range("max images", max_images, 1)
    check_range("max pixels", max_pixels, 1)
    check_range("max body mb", max_body_mb, 0.001)
    check_range("body timeout s", body_timeout_s, 0, low_open=True)
    check_range("workers", workers, 1)
    check_range("port", port, 0, 65535)
    for name, value in (("replicas", replicas), ("replica cpus", replica_cpus), ("min replicas", min_replicas),
                        ("max replicas", max_replicas), ("max ongoing requests", max_ongoing_requests)):
        check_range(name, value, 1)
    check_bind(host, api_key, insecure)
    config = ServeConfig(max_batch_size, max_wait_ms, workers, max_body_mb, max_images, max_pixels, api_key,
                         body_timeout_s)
    from ..inference.predict import FILE_SUFFIXES

    embeddings = not checkpoint.lower().endswith(FILE_SUFFIXES)  # an exported file gives class scores only
    if ray is not None:
        scaling = Scaling(replicas, min_replicas, max_replicas, target_ongoing_requests, max_ongoing_requests)
        spec = ModelSpec(checkpoint, precision, backend, max_batch_size, embeddings, exif, fast_decode, replica_cpus,
                         5, pretrained, pretrained_tag, calibration, validation)
        _serve_on_ray(spec, config, host, port, scaling, ray)
        return
    sock = bind(host, port)  # before the model loads: a port in use fails at once (exit code 5)
    port = sock.getsockname()[1]
    predictor = Predictor(checkpoint, precision, pretrained, pretrained_tag, backend=backend,
                          batch_size=max_batch_size, embeddings=embeddings, exif=exif, fast_decode=fast_decode,
                          calibration=calibration, validation=validation)
    server = ModelServer(predictor, config)

    def announce(server: ModelServer) -> None:  # bound and listening: a client may connect at once
        typer.echo(f"serving {predictor.model_name} at http://{host}:{port} ({server.model.precision}/"
                   f"{server.model.backend}, {server.threads} thread(s), {server.rate:,.0f} images/s in batches "
                   f"of {max_batch_size}); docs at /docs", err=True)

    server.on_ready = announce
    run(server, sock, os.environ.get("HYBRIDVIT_LOG_LEVEL", "warning"))


def _serve_on_ray(spec: ModelSpec, config: ServeConfig, host: str, port: int, scaling: Scaling,
                  address: str) -> None:
    """Deploy on Ray Serve, then wait for SIGINT or SIGTERM and take the app down."""
    import signal
    import threading

    try:
        from ray import serve
    except ImportError as e:
        raise ImportError(f'--ray needs Ray Serve: pip install "hybridvit[ray]" ({e})') from e
    from ..inference.serving_ray import deploy_on_ray

    url = deploy_on_ray(spec, config, host, port, scaling, address)
    typer.echo(f"serving {spec.source} on Ray Serve at {url} ({scaling.describe()}, {spec.threads} CPU(s) each); "
               "docs at /docs", err=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
