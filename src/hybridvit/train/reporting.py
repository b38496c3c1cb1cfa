"""What a person sees of a run: a progress bar per epoch, one summary line per epoch,
metrics as JSON lines and TensorBoard scalars, ``progress.json`` (for monitors and scripts that
must know how far a run is), and a training-curve PNG at the end. Only the main process reports."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from rich.console import Console
from tqdm import tqdm

from ..figures import plot_curves, read_metrics
from .tracking import Tracker, open_tracker

console = Console(stderr=True, highlight=False, soft_wrap=True)


def write_json_atomic(path: Path, record: dict[str, Any]) -> None:
    """Write through a temporary file and ``os.replace``, so that a reader polling ``path`` sees
    the previous record or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EpochStats:
    """Running loss, throughput and skipped files of one epoch, shown on an optional bar."""

    def __init__(self, bar: tqdm | None) -> None:
        self.bar = bar
        self.loss_sum = 0.0
        self.steps = 0
        self.images = 0
        self.lr = 0.0
        self.skipped = 0  # unreadable images
        self.skipped_steps = 0  # steps every process skipped: some process had fewer than 2 readable images
        self.bad_files: list[str] = []
        self.interrupted_at: int | None = None  # the step at which a stop was requested
        self.data_seconds = 0.0  # spent waiting for the data loader
        self.start = time.perf_counter()

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)

    @property
    def images_per_second(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def timed(self, batches: Iterable) -> Iterator:
        """``batches``, adding the time spent waiting for each to ``data_seconds``."""
        batches = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.data_seconds += time.perf_counter() - start
            yield batch

    def note_unreadable(self, indices: list[int], dataset: Any) -> None:
        self.skipped += len(indices)
        self.bad_files += [dataset.describe(i) for i in indices[: max(0, 5 - len(self.bad_files))]]

    def update(self, loss: float, images: int, lr: float) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.images += images
        self.lr = lr
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{self.loss:.4f}", lr=f"{lr:.2e}", img_s=f"{self.images_per_second:.0f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        self.seconds = time.perf_counter() - self.start
        if self.bar is not None:
            self.bar.close()


class Reporter:
    """Used as a context manager, so the TensorBoard writer is closed however the run ends."""

    def __init__(self, output: Path, is_main: bool, progress: bool, epochs: int, steps_per_epoch: int,
                 progress_interval: float = 1.0) -> None:
        self.output = output
        self.is_main = is_main
        self.progress = progress and is_main
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.metrics_file = output / "metrics.jsonl"
        self.progress_file = output / "progress.json"
        self.progress_interval = progress_interval
        self._last_position = -math.inf
        self.writer = None
        self.tracker: Tracker | None = None  # --tracker mlflow / wandb, beside TensorBoard

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

    def start(self, config: dict[str, Any], n_train: int, n_val: int, n_classes: int, lr: float, world: int,
              start_epoch: int, step: str, unlabelled: list[str] = (), started_from: str | None = None) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / "train_config.json").write_text(json.dumps(config, indent=2))
        if self.metrics_file.exists():  # keep only epochs the checkpoint covers (a resumed run rewrites the rest)
            kept = [row for row in read_metrics(self.metrics_file) if row["epoch"] < start_epoch]
            self.metrics_file.write_text("".join(json.dumps(row) + "\n" for row in kept))
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run drops the scalars the checkpoint does not cover (a killed run may have logged more).
        self.writer = SummaryWriter(str(self.output / "tensorboard"), purge_step=start_epoch or None)
        self.tracker = open_tracker(config["tracker"], config["tracker_uri"], self.output, config,
                                   resuming=config["resume"] != "no")
        console.print(f"[bold]{config['model']}[/bold] on {config['data'] or 'digits'}: {n_train} train / {n_val} val "
                      f"images, {n_classes} classes; recipe {config['recipe']}, {config['epochs']} epochs, batch "
                      f"{config['batch_size']} x {world} process(es), lr {lr:.2e}, {config['workers']} data worker(s) "
                      f"per process; output {self.output}")
        console.print(f"training step: {step}")
        if started_from:
            console.print(f"starting from {started_from}", highlight=False)
        if unlabelled:
            console.print(f"[yellow]left out {len(unlabelled)} image(s) with no or an unknown label[/yellow]; e.g. "
                          f"{', '.join(unlabelled[:5])}", highlight=False)

    def position(self, epoch: int, step: int, state: str = "running", stats: EpochStats | None = None) -> None:
        """Write ``progress.json``: ``epoch`` epochs done and ``step`` steps into the next, the
        position a checkpoint taken now would resume from; ``state`` is running, interrupted or done.

        Within an epoch at most once per ``progress_interval`` seconds (a file written every step
        costs a fast GPU run its speed); epoch boundaries, interruptions and the end always.
        """
        if not self.is_main:
            return
        now = time.monotonic()
        if state == "running" and step and now - self._last_position < self.progress_interval:
            return
        self._last_position = now
        record = {"epoch": epoch, "step": step, "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs,
                  "state": state, "time": time.time()}
        if stats is not None and stats.steps:
            record |= {"train_loss": stats.loss, "lr": stats.lr, "images_per_second": stats.images_per_second}
        write_json_atomic(self.progress_file, record)

    def epoch_bar(self, epoch: int, epochs: int, steps: int, done: int) -> EpochStats:
        bar = None
        if self.progress:
            bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True,
                       mininterval=1.0)
        return EpochStats(bar)

    def end_epoch(self, epoch: int, stats: EpochStats, metrics: dict[str, Any], best: float,
                  ema_metrics: dict[str, Any] | None = None) -> None:
        if not self.is_main:
            return
        names = ("map", "f1") if "map" in metrics else ("top1", "top5")  # several labels an image: mAP and F1
        record = {"epoch": epoch, "train_loss": stats.loss, "lr": stats.lr, "images_per_second": stats.images_per_second,
                  "epoch_seconds": stats.seconds, "data_wait_fraction": stats.data_seconds / max(stats.seconds, 1e-9),
                  **{f"val_{k}": metrics[k] for k in names}, "val_loss": metrics["loss"], f"best_{names[0]}": best,
                  "skipped_train": stats.skipped, "skipped_val": metrics["skipped"], "skipped_steps": stats.skipped_steps}
        if ema_metrics is not None:
            record |= {f"ema_val_{k}": ema_metrics[k] for k in (*names, "loss")}
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key in ("train_loss", "lr", "images_per_second", *(f"val_{k}" for k in names), "val_loss",
                    f"ema_val_{names[0]}"):
            if key in record:
                self.writer.add_scalar(key, record[key], epoch)
        self.writer.flush()
        self.tracker.log_epoch(epoch, {k: v for k, v in record.items() if k != "epoch"})
        label = {"top1": "top-1", "top5": "top-5", "map": "mAP", "f1": "F1"}
        ema = f", EMA {label[names[0]]} {ema_metrics[names[0]]:.2f}%" if ema_metrics is not None else ""
        console.print(f"epoch {epoch + 1}: train loss {stats.loss:.4f}, val {label[names[0]]} {metrics[names[0]]:.2f}% "
                      f"{label[names[1]]} {metrics[names[1]]:.2f}% loss {metrics['loss']:.4f} (best {best:.2f}%){ema}, "
                      f"{stats.images_per_second:.0f} img/s, {stats.seconds:.1f}s")
        if stats.skipped or metrics["skipped"]:
            console.print(f"[yellow]skipped unreadable images[/yellow]: {stats.skipped} in training, "
                          f"{metrics['skipped']} in validation; e.g. {', '.join(stats.bad_files[:5])}")
        if stats.skipped_steps:
            console.print(f"[yellow]skipped {stats.skipped_steps} step(s)[/yellow]: a process had fewer than 2 readable "
                          f"images in its batch")

    def stopped_early(self, epoch: int, best_epoch: int, best: float, patience: int) -> None:
        console.print(f"[yellow]stopped early[/yellow] after epoch {epoch + 1}: no better validation score in "
                      f"{patience} epoch(s) since epoch {best_epoch + 1} ({best:.2f}%); its weights are in "
                      f"{self.output / 'best'}")

    def interrupted(self, path: Path, epoch: int, step: int) -> None:
        self.position(epoch, step, "interrupted")
        if self.is_main:
            console.print(f"[yellow]interrupted[/yellow] at epoch {epoch + 1} step {step}: resumable checkpoint saved "
                          f"to {path}; continue with the same command and --resume")

    def finish(self) -> None:
        self.position(self.epochs, 0, "done")
        plot_curves(self.metrics_file, self.output / "training_curve.png")
        if self.tracker is not None:
            self.tracker.finish(self.output)
            self.tracker = None
        self.close()
        console.print(f"done: final weights in {self.output / 'model'}, best in {self.output / 'best'}, "
                      f"curves in {self.output / 'training_curve.png'}")

