"""``serve``: a model behind an HTTP endpoint (FastAPI on uvicorn), with dynamic batching."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from ..inference.spec import FILE_SUFFIXES
from .common import BACKEND, CALIBRATION, FAST_DECODE, PRECISION, PRETRAINED, PRETRAINED_TAG, SOURCE_HELP, VALIDATION

if TYPE_CHECKING:
    from ..inference.spec import InferenceSpec
    from ..serving.model_server import ServeConfig
    from ..serving.ray_serve import Scaling


def serve_cmd(
    models: Optional[list[str]] = typer.Argument(None, metavar="[NAME=]SOURCE...", help=SOURCE_HELP + ", or an .onnx, "
                                                 ".pte or .tflite file in a model or run folder; several are served "
                                                 "side by side (NAME: its name in URLs, default the model's)"),
    model_repository: Optional[Path] = typer.Option(None, metavar="DIR", help="serve every model of DIR, laid out "
                                                    "as Triton's: DIR/NAME/VERSION/ (a model folder), loaded and "
                                                    "unloaded through /v2/repository"),
    host: str = typer.Option("127.0.0.1", help="interface to bind (another than loopback needs --api-key "
                             "or --insecure)"),
    port: int = typer.Option(8000, help="TCP port"),
    grpc_port: Optional[int] = typer.Option(None, help="also serve the Open Inference Protocol over gRPC on this "
                                            "port (0: a free one), with gRPC health checking"),
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
    """Serve models over HTTP: the Open Inference Protocol (KServe v2: /v2/models/NAME/infer,
    metadata, health, the model repository; over gRPC too with --grpc-port) and this server's own
    API (POST /v1/predict, /v1/attention, GET /v1/model), /metrics (Prometheus), /docs (OpenAPI)
    and a demo page at /. Concurrent requests to a model share batches, whatever their protocol.
    Tracing: set OTEL_TRACES_EXPORTER or OTEL_EXPORTER_OTLP_ENDPOINT. With --ray, the same app
    runs as replicas on Ray Serve."""
    from ..checks import check_range
    from ..inference.runners import installed

    if not installed("fastapi", "uvicorn", "python_multipart", "prometheus_client"):
        raise ImportError('serving needs FastAPI, uvicorn, python-multipart and prometheus_client: '
                          'pip install "hybridvit[serve]"')
    from ..inference.spec import InferenceSpec
    from ..serving import tracing
    from ..serving.repository import ModelRepository
    from ..serving.model_server import ServeConfig, Shared
    from ..serving.server import bind, check_bind, run
    from ..serving.ray_serve import Scaling

    models = models or []
    if not models and model_repository is None:
        raise ValueError("name a model to serve (SOURCE, or NAME=SOURCE), or --model-repository DIR")
    check_range("max wait ms", max_wait_ms, 0)
    check_range("max images", max_images, 1)
    check_range("max pixels", max_pixels, 1)
    check_range("max body mb", max_body_mb, 0.001)
    check_range("body timeout s", body_timeout_s, 0, low_open=True)
    check_range("port", port, 0, 65535)
    check_range("grpc port", grpc_port, 0, 65535)
    for name, value in (("replicas", replicas), ("replica cpus", replica_cpus), ("min replicas", min_replicas),
                        ("max replicas", max_replicas), ("max ongoing requests", max_ongoing_requests)):
        check_range(name, value, 1)
    check_bind(host, api_key, insecure)
    config = ServeConfig(max_wait_ms, max_body_mb, max_images, max_pixels, api_key, body_timeout_s)
    template = InferenceSpec(".", precision, backend=backend, batch_size=max_batch_size, embeddings=True,
                             exif=exif, fast_decode=fast_decode, decode_workers=workers, calibration=calibration,
                             validation=validation, pretrained=pretrained, pretrained_tag=pretrained_tag)
    named = [_named(item) for item in models]
    specs = [(name, template.replace(source=source, embeddings=not source.lower().endswith(FILE_SUFFIXES)))
             for name, source in named]
    if ray is not None:
        if len(specs) != 1 or model_repository is not None or grpc_port is not None:
            raise ValueError("--ray serves one model over HTTP: give one SOURCE, without --model-repository or "
                             "--grpc-port")
        scaling = Scaling(replicas, min_replicas, max_replicas, target_ongoing_requests, max_ongoing_requests)
        _serve_on_ray(specs[0][1].replace(model_threads=replica_cpus), config, host, port, scaling, ray)
        return
    sock = bind(host, port)  # before the models load: a port in use fails at once (exit code 5)
    port = sock.getsockname()[1]
    tracing.configure()
    repository = ModelRepository(config, Shared(workers), root=model_repository, template=template)
    for name, spec in specs:
        repository.add_source(spec, name)

    def announce(repository: ModelRepository) -> None:  # bound and listening: a client may connect at once
        for server in repository.all():
            typer.echo(f"serving {server.name} (version {server.version}, {server.predictor.model_name}) at "
                       f"http://{host}:{port}/v2/models/{server.name} ({server.model.precision}/"
                       f"{server.model.backend}, {server.threads} thread(s), {server.rate:,.0f} images/s in batches "
                       f"of {server.max_batch_size})", err=True)
        grpc = f"; gRPC on {host}:{repository.grpc_port}" if repository.grpc_port is not None else ""
        typer.echo(f"ready{grpc}; docs at http://{host}:{port}/docs" + (" (tracing on)" if tracing.on() else ""),
                   err=True)

    repository.on_ready = announce
    run(repository, sock, os.environ.get("HYBRIDVIT_LOG_LEVEL", "warning"), grpc_port, host)


def _named(item: str) -> tuple[str | None, str]:
    """``NAME=SOURCE`` as (NAME, SOURCE); a bare SOURCE is named after its model once loaded."""
    name, sep, source = item.partition("=")
    if not sep or "/" in name or not name or name.startswith("hf-hub:"):
        return None, item
    if not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"{item}: a model's name is letters, digits, '-', '_' and '.'")
    return name, source


def _serve_on_ray(spec: InferenceSpec, config: ServeConfig, host: str, port: int, scaling: Scaling,
                  address: str) -> None:
    """Deploy on Ray Serve, then wait for SIGINT or SIGTERM and take the app down."""
    import signal
    import threading

    try:
        from ray import serve
    except ImportError as e:
        raise ImportError(f'--ray needs Ray Serve: pip install "hybridvit[ray]" ({e})') from e
    from ..serving.ray_serve import deploy_on_ray

    url = deploy_on_ray(spec, config, host, port, scaling, address)
    typer.echo(f"serving {spec.source} on Ray Serve at {url} ({scaling.describe()}, {spec.model_threads} CPU(s) each); "
               "docs at /docs", err=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
