"""The models one server serves, by name and version, loaded and unloaded while it runs.

Models come from sources named on the command line (``NAME=SOURCE``, version 1) or from a
repository folder in Triton's layout, ``DIR/NAME/VERSION/`` (VERSION a positive integer, its
folder a model folder). Each version has its own batcher; all share the server's cores,
decoding threads and metrics (``server.Shared``). Loading a model (again) builds and warms up
every version its folder holds before any request reaches them, then swaps them in; the versions
they replace take no new requests, answer those they hold, and stop. Requests never see a gap.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Callable

from ..inference.spec import InferenceSpec
from .batcher import Batcher
from .predict import Predictor
from .model_server import ModelServer, ServeConfig, Shared, UploadError


class ModelRepository:
    """Name -> version -> ``ModelServer``. ``template``: the inference options every model of
    ``root`` is run with (its ``source`` is each version's folder)."""

    def __init__(self, config: ServeConfig, shared: Shared | None = None, batching: type[Batcher] = Batcher,
                 root: str | Path | None = None, template: InferenceSpec | None = None) -> None:
        self.config, self.batching = config, batching
        self.shared = shared or Shared(template.decode_workers if template else None)
        self.root = Path(root) if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise FileNotFoundError(f"--model-repository {root} is not a folder")
        self.template = template or InferenceSpec(".")
        self.sources: dict[str, InferenceSpec] = {}  # models named on the command line (version 1)
        self._unnamed: list[InferenceSpec] = []  # named after their model once built
        self.models: dict[str, dict[str, ModelServer]] = {}
        self.reasons: dict[str, str] = {}  # why a model's last load failed
        self.order: list[str] = []  # names in the order first loaded: the first is /v1's model
        self.on_ready: Callable[[ModelRepository], None] | None = None
        self.grpc_port: int | None = None  # once the gRPC server is bound
        self._prebuilt: list[ModelServer] = []
        self._locks: dict[str, asyncio.Lock] = {}

    @classmethod
    def serving(cls, server: ModelServer) -> ModelRepository:
        """A repository of one model built already (``hybridvit serve SOURCE``; a Ray Serve replica)."""
        repository = cls(server.config, server.shared, server.batching)
        server.owns_shared = False  # the repository closes it, after every version it ever served
        repository._prebuilt.append(server)
        repository.sources[server.name] = server.predictor.spec  # loading it again rebuilds it
        return repository

    def add_source(self, spec: InferenceSpec, name: str | None = None) -> None:
        """Serve ``spec`` as ``name`` (default: its model's name, known once it is built)."""
        if name is None:
            self._unnamed.append(spec)
        elif name in self.sources:
            raise ValueError(f"two models named {name!r}: give each its own NAME=SOURCE")
        else:
            self.sources[name] = spec

    @property
    def metrics(self) -> Any:
        return self.shared.metrics

    @property
    def default(self) -> ModelServer:
        """The model ``/v1`` serves: the first loaded (or given ``?model=``)."""
        for name in self.order:
            if name in self.models:
                return self.get(name)
        raise UploadError(503, "no model is loaded")

    @property
    def ready(self) -> bool:
        return bool(self.models) and all(s.ready for versions in self.models.values() for s in versions.values())

    def all(self) -> list[ModelServer]:
        return [s for versions in self.models.values() for s in versions.values()]

    def get(self, name: str, version: str | None = None) -> ModelServer:
        """The version asked for, or the newest one loaded; ``UploadError`` 404 if there is none."""
        versions = self.models.get(name)
        if not versions:
            known = ", ".join(sorted(self.models)) or "none"
            raise UploadError(404, f"no model {name!r} is loaded (loaded: {known})")
        if version is None:
            return versions[max(versions, key=int)]
        if version not in versions:
            raise UploadError(404, f"model {name!r} has no version {version!r} loaded "
                              f"(loaded: {', '.join(sorted(versions, key=int))})")
        return versions[version]

    def index(self) -> list[dict[str, str]]:
        """Every model the repository has, loaded or not (the repository extension's index)."""
        rows = [{"name": s.name, "version": s.version, "state": "READY" if s.ready else "UNAVAILABLE", "reason": ""}
                for s in self.all()]
        for name in sorted(set(self._on_disk()) - set(self.models)):
            rows.append({"name": name, "version": "", "state": "UNAVAILABLE", "reason": self.reasons.get(name, "unloaded")})
        return rows

    def _on_disk(self) -> list[str]:
        if self.root is None:
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self._versions(p))

    @staticmethod
    def _versions(folder: Path) -> dict[str, Path]:
        return {p.name: p for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0}

    def _specs(self, name: str) -> dict[str, InferenceSpec]:
        """Version -> spec for ``name``, as the repository holds it now."""
        if name in self.sources:
            return {"1": self.sources[name]}
        folder = self.root / name if self.root is not None else None
        if folder is None or not folder.is_dir():
            raise UploadError(404, f"no model {name!r} in the repository")
        versions = self._versions(folder)
        if not versions:
            raise UploadError(404, f"{folder} has no version folder (NAME/1/, NAME/2/, ...)")
        # a version folder is a model folder: it gives embeddings too
        return {v: self.template.replace(source=str(path), embeddings=True) for v, path in versions.items()}

    async def _build(self, name: str | None, version: str, spec: InferenceSpec) -> ModelServer:
        """One version, built in a thread (the event loop keeps serving) and warmed up."""
        def build() -> ModelServer:
            return ModelServer(Predictor(spec), self.config, self.batching, name=name, version=version,
                               shared=self.shared)

        server = await asyncio.get_running_loop().run_in_executor(None, build)
        await server.start()
        return server

    def _put(self, server: ModelServer) -> None:
        if server.name not in self.order:
            self.order.append(server.name)
        self.models.setdefault(server.name, {})[server.version] = server

    async def start(self) -> None:
        """Warm up what was given and load everything the repository holds; a model that fails
        here fails the start (the message names it)."""
        for server in self._prebuilt:
            await server.start()
            self._put(server)
        for spec in self._unnamed:
            server = await self._build(None, "1", spec)
            if server.name in self.sources or server.name in self.models:
                await server.stop()
                raise ValueError(f"{spec.source}: another model is named {server.name!r} already; name them "
                                 "apart with NAME=SOURCE")
            self.sources[server.name] = spec
            self._put(server)
        for name in [n for n in self.sources if n not in self.models] + self._on_disk():
            await self.load(name)
        if self.on_ready is not None:
            self.on_ready(self)

    async def load(self, name: str) -> list[str]:
        """(Re)load every version of ``name``: the new ones are warmed up before they take
        requests, then the old ones retire. Returns the versions now served."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            specs = self._specs(name)
            built: list[ModelServer] = []
            try:
                for version, spec in sorted(specs.items(), key=lambda item: int(item[0])):
                    built.append(await self._build(name, version, spec))
            except Exception as e:  # noqa: BLE001 - a bad model folder fails its load, not the server
                for server in built:
                    await server.stop()
                self.reasons[name] = f"{type(e).__name__}: {e}"
                raise UploadError(400, f"cannot load {name!r}: {self.reasons[name]}") from e
            old = self.models.get(name, {})
            self.models[name] = {s.version: s for s in built}  # one step: a request sees old or new, never none
            if name not in self.order:
                self.order.append(name)
            self.reasons.pop(name, None)
            await asyncio.gather(*(server.retire() for server in old.values()))
            return [s.version for s in built]

    async def unload(self, name: str) -> None:
        """Stop serving ``name`` (requests it holds are answered first)."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            old = self.models.pop(name, None)
            if old is None:
                raise UploadError(404, f"no model {name!r} is loaded")
            self.reasons[name] = "unloaded"
            await asyncio.gather(*(server.retire() for server in old.values()))

    def drain(self) -> None:
        """Shutting down: every model's waiting batches run now (safe from a signal handler)."""
        for server in self.all():
            server.drain()

    async def stop(self) -> None:
        for server in self.all():
            await server.stop()
        self.models.clear()
        self.shared.close()
