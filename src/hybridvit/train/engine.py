"""``train``: one code path from a laptop CPU to torchrun on many GPUs, resumable at any step.

Every process takes the same collective steps in the same order: before each step all
processes agree whether to stop (Ctrl-C, SIGTERM) and whether to skip the step (a process
whose batch has fewer than two readable images); after the forward pass they agree whether
the loss is finite. So no process can wait forever on another.
"""

from __future__ import annotations

import dataclasses
import signal
from contextlib import nullcontext
from typing import Any

import torch
from timm.utils import dispatch_clip_grad

from ..checkpoints import CheckpointError, save_model
from .builder import TrainingRun, build_run, run_output
from .config import TrainConfig
from .distributed import DistInfo, all_reduce_sum, average_buffers, barrier, cleanup_distributed, gather_buffers
from .evaluation import run_evaluation
from .reporting import EpochStats, Reporter
from .runtime import autocast, setup_device
from .state import atomic_save, load_state, seed_step


class TrainingError(RuntimeError):
    """A run that had to stop (diverged); the last good checkpoint is kept."""


class _StopFlag:
    """Turns SIGINT/SIGTERM into a request to stop at the next step boundary (and save)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class _Position:
    epoch: int = 0
    step: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train (and evaluate every epoch) as ``cfg`` says; returns the final validation metrics.

    Writes ``OUTPUT/checkpoint.pt`` (resumable, every epoch and on Ctrl-C/SIGTERM), ``OUTPUT/model``
    (final weights), ``OUTPUT/best`` (best top-1), ``OUTPUT/ema`` (with ``model_ema``),
    ``OUTPUT/metrics.jsonl``, TensorBoard scalars and ``OUTPUT/training_curve.png``. Run under
    torchrun for DistributedDataParallel.
    """
    cfg.check_output(run_output(cfg))  # before any work: a finished run is not replaced by accident
    owns_group = not torch.distributed.is_initialized()  # an experiment keeps its group across runs
    device, dist = setup_device(cfg.device)
    try:
        run = build_run(cfg, device, dist)
        position = _restore(run, dist)
        with Reporter(run.output, dist.is_main, progress, run.num_epochs, run.steps_per_epoch,
                      run.cfg.progress_interval) as reporter, _StopFlag() as stop:
            return _fit(run, position, dist, reporter, stop)
    finally:
        if owns_group:
            cleanup_distributed()


def _fit(run: TrainingRun, position: _Position, dist: DistInfo, reporter: Reporter, stop: _StopFlag) -> dict[str, Any]:
    cfg = run.cfg
    if dist.is_main:
        reporter.start(dataclasses.asdict(cfg), len(run.data.datasets.train), len(run.data.datasets.val),
                       len(run.data.datasets.classes), run.lr, dist.world_size, position.epoch, run.step.reason,
                       getattr(run.data.datasets.train, "unlabelled", []), run.started_from)
        reporter.position(position.epoch, position.step)
    best, best_epoch, metrics = position.best_top1, position.best_epoch, {}
    for epoch in range(position.epoch, run.num_epochs):
        stats = _train_one_epoch(run, epoch, position.step if epoch == position.epoch else 0, dist, stop, reporter)
        if stats.interrupted_at is not None:
            _save_checkpoint(run, _Position(epoch, stats.interrupted_at, best, best_epoch), dist)
            reporter.interrupted(run.output / "checkpoint.pt", epoch, stats.interrupted_at)
            return {"interrupted": True, "epoch": epoch, "step": stats.interrupted_at}
        metrics, best, best_epoch = _end_epoch(run, epoch, stats, best, best_epoch, dist, reporter)
        if cfg.early_stop and epoch - best_epoch >= cfg.early_stop and epoch + 1 < run.num_epochs:
            if dist.is_main:
                reporter.stopped_early(epoch, best_epoch, best, cfg.early_stop)
            metrics["stopped_early"] = epoch + 1
            break
    if dist.is_main:
        save_model(run.model, run.output / "model", extra=run.extra)
        if run.ema is not None:
            save_model(run.ema.module, run.output / "ema", extra=run.extra)
        reporter.finish()
    barrier(dist)
    return {**metrics, "best_top1": best, "output": str(run.output)}


def _train_one_epoch(run: TrainingRun, epoch: int, skip: int, dist: DistInfo, stop: _StopFlag,
                     reporter: Reporter) -> EpochStats:
    """Steps ``skip``.. of one epoch; stops early (``interrupted_at``) when any process was asked to."""
    run.data.sampler.set_epoch(epoch, skip=skip * run.cfg.batch_size)
    run.train_model.train()
    for module in run.frozen:  # --freeze: the frozen parts' BatchNorm statistics stay as loaded
        module.eval()
    stats = reporter.epoch_bar(epoch, run.num_epochs, run.steps_per_epoch, skip)
    step = skip
    for x, y, bad in stats.timed(run.data.train_loader):
        stats.note_unreadable(bad, run.data.datasets.train)
        too_few, stop_now = all_reduce_sum([float(len(y) < 2), float(stop.requested)], dist, run.device)
        if stop_now and step % run.cfg.grad_accum_steps == 0:  # between optimizer steps: nothing half-accumulated
            stats.interrupted_at = step
            break
        if too_few:  # BatchNorm cannot train on one image: every process skips this step together
            stats.skipped_steps += 1
        else:
            loss = _train_step(run, x, y, epoch, step, dist)
            stats.update(loss, len(y) * dist.world_size, run.optimizer.param_groups[0]["lr"])
        step += 1
        reporter.position(epoch, step, stats=stats)
    stats.close()
    return stats


def _train_step(run: TrainingRun, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int, dist: DistInfo) -> float:
    """Forward and backward of batch ``step``; with ``grad_accum_steps``, the optimizer steps on the
    last batch of each group (the epoch's last group may be shorter), on the mean of its gradients."""
    cfg, device = run.cfg, run.device
    seed_step(cfg.seed, epoch, step, dist.rank)
    run.set_lr(epoch, step)
    start = step - step % cfg.grad_accum_steps
    group = max(1, min(cfg.grad_accum_steps, run.steps_per_epoch - start))  # batches in this step's group
    update = step - start == group - 1
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if run.step.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x, targets = run.targets(x, y)
    if step == start:
        run.optimizer.zero_grad(set_to_none=True)
    # DDP: gradients are averaged across processes once per group, on its last batch
    sync = nullcontext() if update or not hasattr(run.train_model, "no_sync") else run.train_model.no_sync()
    with sync:
        with autocast(device, run.step.dtype):
            loss = run.criterion(x, run.train_model(x), targets)
        if all_reduce_sum([float(not torch.isfinite(loss))], dist, device)[0]:
            raise TrainingError(
                f"loss is {loss.item()} at epoch {epoch} step {step}: training diverged and stopped. The last good "
                f"checkpoint is kept at {run.output / 'checkpoint.pt'}; lower --lr or enable --clip-grad, then --resume.")
        scaled = loss / group
        (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
    if not update:
        return loss.item()
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    if cfg.clip_grad:
        dispatch_clip_grad(run.model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    if run.ema is not None:
        run.ema.update(run.model, step=epoch * run.updates_per_epoch + step // cfg.grad_accum_steps + 1)
    return loss.item()


def _end_epoch(run: TrainingRun, epoch: int, stats: EpochStats, best: float, best_epoch: int, dist: DistInfo,
               reporter: Reporter) -> tuple[dict[str, Any], float, int]:
    """Make the replicas identical, evaluate (the EMA too), save ``best/`` and the checkpoint."""
    average_buffers(run.model, dist)
    threshold = run.cfg.threshold if run.cfg.multi_label else None
    metrics = run_evaluation(run.model, run.data.val_loader, run.device, dist, run.step.dtype, threshold)
    ema_metrics = None
    if run.ema is not None:
        average_buffers(run.ema.module, dist)
        ema_metrics = run_evaluation(run.ema.module, run.data.val_loader, run.device, dist, run.step.dtype, threshold)
    improved = metrics["score"] > best  # top-1, or mAP with several labels an image
    best, best_epoch = (metrics["score"], epoch) if improved else (best, best_epoch)
    reporter.end_epoch(epoch, stats, metrics, best, ema_metrics)
    if dist.is_main and improved:
        save_model(run.model, run.output / "best", extra=run.extra)
    _save_checkpoint(run, _Position(epoch + 1, 0, best, best_epoch), dist)
    reporter.position(epoch + 1, 0)
    return metrics, best, best_epoch


def _save_checkpoint(run: TrainingRun, position: _Position, dist: DistInfo) -> None:
    """Rank 0 writes ``checkpoint.pt`` atomically; mid-epoch it also keeps each rank's BatchNorm statistics."""
    rank_buffers = None
    if position.step and dist.enabled:  # collective: every process takes part
        rank_buffers = {"model": gather_buffers(run.model, dist),
                        "ema": gather_buffers(run.ema.module, dist) if run.ema is not None else None}
    if dist.is_main:
        atomic_save({
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict() if run.scaler else None,
            "ema": run.ema.state_dict() if run.ema is not None else None, "rank_buffers": rank_buffers,
            "epoch": position.epoch, "step": position.step, "best_top1": position.best_top1,
            "best_epoch": position.best_epoch,
            "amp": run.step.amp, "channels_last": run.step.channels_last,
            "world_size": dist.world_size, "model_family": run.model.family, "model_name": run.cfg.model,
            "model_config": run.model.config_dict(), "extra": run.extra,
        }, run.output / "checkpoint.pt")
    barrier(dist)


def _restore(run: TrainingRun, dist: DistInfo) -> _Position:
    """Where to start: the beginning, or ``checkpoint.pt``'s position (``resume``: yes, or auto if it exists)."""
    path = run.output / "checkpoint.pt"
    if run.cfg.resume == "no" or (run.cfg.resume == "auto" and not path.exists()):
        return _Position()
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path} (use --resume auto to start fresh when there is none)")
    state = load_state(path)
    if state.get("model_name") != run.cfg.model or state.get("model_config") != run.model.config_dict():
        raise CheckpointError(f"{path} holds a {state.get('model_name')} run with another configuration; "
                              f"resume with the same --model and options, or choose another --output")
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None and state.get("ema"):
        run.ema.load_state_dict(state["ema"])
    step = state["step"]
    saved_world = state.get("world_size", 1)
    rank_buffers = state.get("rank_buffers")
    if rank_buffers and saved_world == dist.world_size:
        _load_buffers(run.model, rank_buffers["model"][dist.rank])
        if run.ema is not None and rank_buffers.get("ema"):
            _load_buffers(run.ema.module, rank_buffers["ema"][dist.rank])
    if saved_world != dist.world_size:  # another number of processes: continue after as many images
        step = step * saved_world // dist.world_size
    return _Position(state["epoch"], step, state["best_top1"], state.get("best_epoch", -1))


@torch.no_grad()
def _load_buffers(module: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    for name, buf in module.named_buffers():
        if name in buffers:
            buf.copy_(buffers[name])

