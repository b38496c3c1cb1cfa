"""The predict pipeline on a Ray cluster (``pip install "hybridvit[ray]"``; ``hybridvit predict --ray``).

Ray Data runs the same three stages as ``pipeline`` does on one machine: the listing (or a
Parquet/CSV manifest, read by Ray itself) as a dataset of paths; decoding as a ``map_batches``
stage of plain tasks on any node; and an actor pool, each actor holding one optimized model,
for the forward pass. Each block is written as a Parquet file of ``outputs.parquet_schema`` into
the output folder. Ray retries a task whose worker died and restarts a dead actor, so a lost node
or process costs time, not rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..data.manifests import path_column, relative_to
from ..inference.spec import InferenceSpec
from .inputs import iter_inputs
from .outputs import parquet_table
from .pipeline import Prediction, decode_batch, predict_batch


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.data") is not None


def _decode(batch: dict[str, np.ndarray], preprocess: Any) -> dict[str, np.ndarray]:
    """The decoding stage: a batch of paths to uint8 pixels (zeros where unreadable) and errors."""
    paths = [str(p) for p in batch["path"]]
    decoded, errors = decode_batch(preprocess, paths)
    pixels = np.zeros((len(paths), 3, *preprocess.size), dtype=np.uint8)
    if decoded is not None:
        pixels[[i for i in range(len(paths)) if i not in errors]] = decoded
    return {"path": np.array(paths, dtype=object), "pixels": pixels,
            "error": np.array([errors.get(i, "") for i in range(len(paths))], dtype=object)}


def actor_spec(spec: InferenceSpec) -> InferenceSpec:
    """The spec as one Ray actor or replica runs it: its model on ``model_threads`` (default 1)
    threads, decoding apart (a Ray Data stage, or the server's threads)."""
    return spec.replace(model_threads=spec.model_threads or 1, decode_workers=1)


def actor_predictor(spec: InferenceSpec) -> Any:
    """The ``Predictor`` one actor or replica builds for itself (the model is never shipped)."""
    import torch

    from .predict import Predictor

    torch.set_num_threads(spec.model_threads)
    return Predictor(spec)


class _Model:
    """One actor: one optimized model, for batches the decoding stage made."""

    def __init__(self, spec: InferenceSpec, k: int) -> None:
        self.k = k
        self.predictor = actor_predictor(spec)
        self.model = self.predictor.model_for(spec.model_threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        errors = {i: str(e) for i, e in enumerate(batch["error"]) if e}
        good = [i for i in range(len(batch["path"])) if i not in errors]
        decoded = batch["pixels"][good] if good else None
        rows: list[Prediction] = predict_batch(self.model, self.predictor.classes, self.k,
                                               [str(p) for p in batch["path"]], decoded, errors)
        return parquet_table(rows, self.predictor.embedding_dim)


def _listing(sources: list[str]) -> Any:
    """The paths as a Ray dataset: a lone Parquet/CSV manifest is read by Ray, anything else listed here."""
    import ray.data

    if len(sources) == 1 and sources[0].lower().endswith((".csv", ".parquet")) and os.path.isfile(sources[0]):
        manifest = sources[0]
        ds = ray.data.read_parquet(manifest) if manifest.lower().endswith(".parquet") else ray.data.read_csv(manifest)
        column, folder = path_column(ds.columns(), manifest), os.path.dirname(manifest)
        return ds.map_batches(lambda b: {"path": np.array([relative_to(folder, p) for p in b[column]], dtype=object)},
                              batch_format="numpy")
    return ray.data.from_items([{"path": p} for p in iter_inputs(sources)])


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (None or ``auto``: the running one, else a local instance)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=None if address in (None, "auto") else address, log_to_driver=False)


def predict_on_ray(spec: InferenceSpec, sources: Iterable[str | Path], output: str | Path, k: int = 5,
                   address: str | None = None, actors: int | None = None) -> tuple[int, int]:
    """Predict every image ``sources`` name on the Ray cluster at ``address`` (None or ``auto``:
    the running one, else a local instance), ``actors`` model actors of ``spec.model_threads``
    threads (default: 1; as many actors as take half the cluster's CPUs), writing the top ``k``
    of each into Parquet files in the folder ``output``.
    Returns the number of rows written and how many of them are errors."""
    if not ray_available():
        raise ImportError('--ray needs Ray Data: pip install "hybridvit[ray]"')
    import ray
    import ray.data

    from .predict import Predictor

    connect(address)
    spec = actor_spec(spec)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = actors or max(1, cpus // (2 * spec.model_threads))  # the rest of the CPUs decode
    ds = _listing([str(s) for s in sources])
    ds = ds.map_batches(_decode, fn_kwargs={"preprocess": Predictor(spec).preprocess}, batch_size=spec.batch_size,
                        batch_format="numpy", num_cpus=1)
    ds = ds.map_batches(_Model, fn_constructor_kwargs={"spec": spec, "k": k}, batch_size=spec.batch_size,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=spec.model_threads,
                        max_restarts=-1, max_task_retries=-1)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    ds.write_parquet(str(output))
    import pyarrow.parquet as pq

    errors = [pq.read_table(p, columns=["error"]).column(0).to_pylist() for p in output.glob("*.parquet")]
    return sum(len(e) for e in errors), sum(1 for part in errors for e in part if e)
