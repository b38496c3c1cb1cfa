"""Experiment trackers beside TensorBoard: MLflow (by default a local store beside the run
folders, as MLflow recommends it: ``mlflow.db`` with artifacts in ``mlartifacts/``; ``mlflow ui
--backend-store-uri sqlite:///runs/mlflow.db`` shows the runs) and Weights & Biases (offline). Each logs the run's options, its metrics per epoch, the training curve and the
model folder; a resumed run continues the same tracked run (its id is kept in
``OUTPUT/tracker.json``)."""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "mlflow", "wandb")


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """Options as tracker parameters: scalars as they are, the rest as JSON text."""
    return {k: v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v) for k, v in config.items()}


def _library(module: str, kind: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f'--tracker {kind} needs {module.split(".")[0]}: pip install "hybridvit[track]" ({e})') from e


class Tracker:
    """What the reporter calls; ``kind`` names the library."""

    kind = "tensorboard"

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Metrics of one epoch, at step ``epoch``."""

    def finish(self, output: Path) -> None:
        """The run is done: its curve and model folder go to the tracker."""

    def close(self) -> None:
        """The process ends (also when interrupted: the tracked run can be continued)."""


class MlflowTracker(Tracker):
    """Through ``MlflowClient``: nothing process-wide is set (the fluent API sets environment
    variables and an active run)."""

    kind = "mlflow"

    def __init__(self, output: Path, config: dict[str, Any], uri: str | None, run_id: str | None) -> None:
        entities = _library("mlflow.entities", "mlflow")
        Metric, Param = entities.Metric, entities.Param
        self.Metric = Metric
        home = output.absolute().parent  # by default one local store for the runs beside each other
        self.client = _library("mlflow", "mlflow").MlflowClient(uri or f"sqlite:///{home / 'mlflow.db'}")
        experiment = self.client.get_experiment_by_name("hybridvit")
        experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(
            "hybridvit", artifact_location=None if uri else (home / "mlartifacts").as_uri())
        if run_id is None:
            run_id = self.client.create_run(experiment_id, run_name=output.name).info.run_id
            params = [Param(k, str(v)) for k, v in _flat(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
                self.client.log_batch(run_id, params=params[i:i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id, self.open = run_id, True

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, float(v), now, epoch) for k, v in metrics.items()])

    def finish(self, output: Path) -> None:
        if (output / "training_curve.png").exists():
            self.client.log_artifact(self.run_id, str(output / "training_curve.png"))
        self.client.log_artifacts(self.run_id, str(output / "model"), artifact_path="model")
        self.client.set_terminated(self.run_id, "FINISHED")
        self.open = False

    def close(self) -> None:
        if self.open:
            self.client.set_terminated(self.run_id, "KILLED")
            self.open = False


class WandbTracker(Tracker):
    kind = "wandb"

    def __init__(self, output: Path, config: dict[str, Any], uri: str | None, run_id: str | None) -> None:
        self.wandb = wandb = _library("wandb", "wandb")
        folder = Path(uri) if uri else output
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project="hybridvit", name=output.name, config=_flat(config), dir=str(folder),
                              mode="offline", id=run_id, resume="allow" if run_id else None)
        self.run_id = self.run.id

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.run.log({**metrics, "epoch": epoch}, step=epoch)

    def finish(self, output: Path) -> None:
        if (output / "training_curve.png").exists():
            self.run.log({"training_curve": self.wandb.Image(str(output / "training_curve.png"))})
        artifact = self.wandb.Artifact(f"{output.name}-model", type="model")
        artifact.add_dir(str(output / "model"))
        self.run.log_artifact(artifact)
        self.run.finish()
        self.run = None

    def close(self) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1)


def open_tracker(kind: str, uri: str | None, output: Path, config: dict[str, Any], resuming: bool) -> Tracker:
    """The tracker ``kind`` for the run in ``output``; a resumed run continues its tracked run."""
    if kind == "tensorboard":
        return Tracker()
    record = output / "tracker.json"
    previous = json.loads(record.read_text()) if resuming and record.exists() else {}
    run_id = previous.get("run_id") if previous.get("kind") == kind else None
    tracker = (MlflowTracker if kind == "mlflow" else WandbTracker)(output, config, uri, run_id)
    output.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps({"kind": kind, "run_id": tracker.run_id}))
    os.replace(tmp, record)
    return tracker
