"""``hybridvit serve --ray``: the same app (``serving.create_app``) as replicas on Ray Serve.

Each replica is a Ray actor that loads the model itself (the source must be readable on every
node: a shared folder or a Hub name), warms up in the app's start-up, and batches with Ray
Serve's own batcher (``@serve.batch``) in place of ``batcher.Batcher``. Ray Serve's proxy spreads
requests over the replicas, its autoscaler adds and removes them, and its controller replaces a
replica that dies. ``pip install "hybridvit[ray]"``.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .batcher import Batcher, RunBatch
from ..inference.spec import InferenceSpec
from .ray_data import actor_predictor, actor_spec, connect

if TYPE_CHECKING:
    from .model_server import ServeConfig

APP_NAME = "hybridvit"


class RayBatcher(Batcher):
    """``Batcher`` with ``ray.serve.batch`` gathering the batches: one batch at a time, of at most
    ``max_batch_size`` images, each waiting at most ``max_wait_s`` for others to join it."""

    def __init__(self, run: RunBatch, max_batch_size: int, max_wait_s: float,
                 on_batch: Callable[[int], None] = lambda size: None, incoming: Callable[[], int] = lambda: 1,
                 executor: Executor | None = None, in_flight: Callable[[], int] = lambda: 1) -> None:
        from ray import serve

        super().__init__(run, max_batch_size, max_wait_s, on_batch, incoming, executor, in_flight)

        async def batch(images: list[np.ndarray]) -> list[torch.Tensor]:
            self._waiting -= len(images)
            self.on_batch(len(images))
            out = await asyncio.get_running_loop().run_in_executor(self._executor, self.run, np.stack(images))
            return list(out)

        self._batched = serve.batch(batch, max_batch_size=max_batch_size, batch_wait_timeout_s=max_wait_s)

    def start(self) -> None:
        pass  # Ray Serve's batcher starts with the first call

    def hurry(self) -> None:
        pass  # Ray Serve drains a replica itself (graceful_shutdown_timeout_s)

    def submit(self, image: np.ndarray, trace: Any = None) -> asyncio.Future:
        self._waiting += 1
        return asyncio.ensure_future(self._batched(image))


class Replica:
    """One Ray Serve replica: the app around a model it loads itself (``__serve_build_asgi_app__``
    is Ray Serve's hook for an app built on the replica)."""

    def __init__(self, spec: InferenceSpec, config: ServeConfig) -> None:
        self.spec, self.config = spec, config

    def __serve_build_asgi_app__(self) -> Any:
        from .model_server import ModelServer
        from .server import create_app

        return create_app(ModelServer(actor_predictor(self.spec), self.config, batching=RayBatcher))


@dataclass(frozen=True)
class Scaling:
    """Ray Serve's replica settings: a fixed ``replicas`` count, or autoscaling between
    ``min_replicas`` and ``max_replicas`` on ``target_ongoing_requests`` per replica."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    max_ongoing_requests: int | None = None  # per replica; default: 4 batches' worth, so batches can fill

    def __post_init__(self) -> None:
        if self.max_replicas is None and (self.min_replicas is not None or self.target_ongoing_requests is not None):
            raise ValueError("--min-replicas and --target-ongoing-requests autoscale: give --max-replicas too")

    def describe(self) -> str:
        if self.max_replicas is None:
            return f"{self.replicas} replica(s)"
        return f"{self.min_replicas or 1} to {self.max_replicas} replicas, autoscaled"

    def options(self, max_batch_size: int, cpus: int) -> dict[str, Any]:
        options: dict[str, Any] = {"ray_actor_options": {"num_cpus": cpus},
                                   "max_ongoing_requests": self.max_ongoing_requests or 4 * max_batch_size}
        if self.max_replicas is None:
            options["num_replicas"] = self.replicas
        else:
            autoscaling = {"min_replicas": self.min_replicas or 1, "max_replicas": self.max_replicas}
            if self.target_ongoing_requests is not None:
                autoscaling["target_ongoing_requests"] = self.target_ongoing_requests
            options["autoscaling_config"] = autoscaling
        return options


def deploy_on_ray(spec: InferenceSpec, config: ServeConfig, host: str, port: int, scaling: Scaling,
                  address: str | None = None) -> str:
    """Start the app on the Ray cluster at ``address`` (None or ``auto``: the running one, else a
    local instance) behind Ray Serve's proxy on ``host:port``; returns once every replica is
    warmed up, with the URL."""
    from ray import serve

    connect(address)
    serve.start(http_options={"host": host, "port": port})
    spec = actor_spec(spec)
    deployment = serve.deployment(serve.ingress()(Replica), name=APP_NAME,
                                  **scaling.options(spec.batch_size, spec.model_threads))
    serve.run(deployment.bind(spec, config), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"
