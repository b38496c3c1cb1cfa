"""``train`` and ``evaluate``: one code path from a laptop CPU to torchrun on many GPUs."""

from __future__ import annotations

import dataclasses
import signal
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import timm
import timm.optim
import timm.scheduler
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..api import create_model
from ..checkpoints import load_checkpoint, load_model, load_trained, read_checkpoint, save_model
from ..data import DataError, build_datasets, collate_skipping_bad, eval_transform, train_transform
from ..data.datasets import is_digits
from ..data.sampling import EpochSampler, SeededSamples, ShardSampler
from ..fusion import fuse
from ..registry import get_model_info
from .config import TrainConfig
from .distributed import DistInfo, all_reduce_sum, average_buffers, barrier, cleanup_distributed, init_distributed
from .losses import DistillationLoss
from .reporting import Reporter
from .state import atomic_save, capture_rng, load_state, restore_rng, seed_all


class TrainingError(RuntimeError):
    """A run that had to stop (diverged); the last good checkpoint is kept."""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _build_teacher(cfg: TrainConfig, num_classes: int) -> nn.Module | None:
    """A hybridvit folder or model name, or any timm model name, with weights from a checkpoint file."""
    if cfg.teacher is None:
        return None
    path = Path(cfg.teacher)
    if path.is_dir():
        return load_model(path)
    try:
        get_model_info(cfg.teacher)
    except ValueError:
        teacher = timm.create_model(cfg.teacher, num_classes=num_classes)
        if cfg.teacher_checkpoint:  # read safely (weights only), then load strictly
            teacher.load_state_dict(read_checkpoint(cfg.teacher_checkpoint).state_dict)
        return teacher
    return create_model(cfg.teacher, num_classes=num_classes, checkpoint_path=cfg.teacher_checkpoint)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


@torch.no_grad()
def run_evaluation(model: nn.Module, loader: DataLoader, device: torch.device, dist: DistInfo,
                   amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Top-1, top-5 and cross-entropy over the whole loader, summed over all processes."""
    model.eval()
    correct1 = correct5 = loss_sum = images = skipped = 0.0
    for x, y, bad in loader:
        skipped += len(bad)
        if not len(y):
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            out = model(x)
        out = out.float()
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        images += len(y)
    correct1, correct5, loss_sum, images, skipped = all_reduce_sum([correct1, correct5, loss_sum, images, skipped], dist, device)
    if images == 0:
        raise DataError("evaluation saw no readable images")
    return {"top1": 100 * correct1 / images, "top5": 100 * correct5 / images, "loss": loss_sum / images,
            "images": int(images), "skipped": int(skipped)}


def _loader(dataset, batch_size: int, sampler, workers: int, device: torch.device, drop_last: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      collate_fn=collate_skipping_bad, pin_memory=device.type == "cuda", persistent_workers=workers > 0)


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


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train (and evaluate every epoch) as ``cfg`` says; returns the final validation metrics.

    Writes ``OUTPUT/checkpoint.pt`` (resumable, every epoch and on Ctrl-C), ``OUTPUT/model``
    (final weights), ``OUTPUT/best`` (best top-1), ``OUTPUT/metrics.jsonl``, TensorBoard
    scalars and ``OUTPUT/training_curve.png``. Run under torchrun for DistributedDataParallel.
    """
    device = _device(cfg.device)
    dist = init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    try:
        return _train(cfg, device, dist, progress)
    finally:
        cleanup_distributed()


def _train(cfg: TrainConfig, device: torch.device, dist: DistInfo, progress: bool) -> dict[str, Any]:
    info = get_model_info(cfg.model)
    data_name = "digits" if is_digits(cfg.data) else Path(cfg.data).name
    output = Path(cfg.output or f"runs/{cfg.model}-{data_name}")
    datasets = build_datasets(cfg.data)  # the layout is checked (DataError) before anything else happens
    cfg = cfg.resolved(len(datasets.train), info.family)  # the dataset's size picks the recipe
    size = (cfg.input_size, cfg.input_size) if cfg.input_size else info.input_size[1:]
    datasets.prepare(
        size,
        train_transform(info, size, auto_augment=cfg.auto_augment, color_jitter=cfg.color_jitter, re_prob=cfg.reprob,
                        hflip=cfg.hflip, scale=cfg.scale),
        eval_transform(info, size, crop_pct=1.0 if is_digits(cfg.data) else None))
    classes = datasets.classes
    if len(datasets.train) < cfg.batch_size * dist.world_size:
        raise DataError(f"{len(datasets.train)} training images are fewer than one global batch "
                        f"({cfg.batch_size} x {dist.world_size}); lower --batch-size")

    seed_all(cfg.seed)
    model_kwargs: dict[str, Any] = {"num_classes": len(classes), "img_size": size}
    if cfg.drop_path is not None:
        model_kwargs["drop_path_rate"] = cfg.drop_path
    model = create_model(cfg.model, **model_kwargs)
    if cfg.finetune:
        load_checkpoint(model, cfg.finetune, exclude_head=True)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    amp_dtype = _amp_dtype(cfg.amp, device)
    global_batch = cfg.batch_size * dist.world_size
    lr = cfg.lr * global_batch / 512

    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=lr, weight_decay=cfg.weight_decay)
    if cfg.repeated_aug:
        base_sampler = RepeatAugSampler(datasets.train, num_replicas=dist.world_size, rank=dist.rank, shuffle=True)
    else:
        base_sampler = DistributedSampler(datasets.train, num_replicas=dist.world_size, rank=dist.rank,
                                          shuffle=True, seed=cfg.seed, drop_last=True)
    sampler = EpochSampler(base_sampler)
    train_loader = _loader(SeededSamples(datasets.train, cfg.seed), cfg.batch_size, sampler, cfg.workers, device, True)
    val_loader = _loader(datasets.val, cfg.batch_size, ShardSampler(len(datasets.val), dist.rank, dist.world_size),
                         cfg.workers, device, False)
    steps_per_epoch = len(train_loader)
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, "cosine", num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing, num_classes=len(classes))
        base_loss: nn.Module = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        base_loss = LabelSmoothingCrossEntropy(cfg.smoothing)
    else:
        base_loss = nn.CrossEntropyLoss()
    teacher = _build_teacher(cfg, len(classes))
    if teacher is not None:
        teacher.to(device)
    criterion = DistillationLoss(base_loss, teacher, cfg.distillation if teacher is not None else "none",
                                 tau=cfg.distillation_tau)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    train_model: nn.Module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.enabled else model

    start_epoch, start_step, best, resume_rng = 0, 0, -1.0, None
    ckpt_path = output / "checkpoint.pt"
    if cfg.resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        state = load_state(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        start_epoch, start_step, best = state["epoch"], state["step"], state["best_top1"]
        resume_rng = state["rng"] if start_step else None

    reporter = Reporter(output, dist.is_main, progress)
    if dist.is_main:
        reporter.start(dataclasses.asdict(cfg), len(datasets.train), len(datasets.val), len(classes), lr, dist.world_size,
                       start_epoch)
    crop_pct = 1.0 if is_digits(cfg.data) else info.crop_pct
    extra = {"classes": classes, "input_size": list(size), "crop_pct": crop_pct, "mean": list(info.mean), "std": list(info.std)}

    def checkpoint(epoch: int, step: int) -> None:
        if dist.is_main:
            atomic_save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "ema": ema.state_dict() if ema else None,
                "epoch": epoch, "step": step, "best_top1": best, "rng": capture_rng(),
                "model_family": model.family, "model_name": cfg.model, "model_config": model.config_dict(),
                "extra": extra,
            }, ckpt_path)
        barrier(dist)

    eval_model = lambda: ema.module if ema is not None else model  # noqa: E731
    metrics: dict[str, Any] = {}
    with _StopFlag() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            skip = start_step if epoch == start_epoch else 0
            sampler.set_epoch(epoch, skip=skip * cfg.batch_size)
            if skip and resume_rng is not None:
                restore_rng(resume_rng)
            else:
                seed_all(cfg.seed * 7919 + epoch * 104_729 + dist.rank)
            train_model.train()
            stats = reporter.epoch_bar(epoch, cfg.epochs, steps_per_epoch, skip)
            step = skip
            for x, y, bad in train_loader:
                stats.skipped += len(bad)
                stats.bad_files += [datasets.train.describe(i) for i in bad[:5]]
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                if mixup is not None and len(y) % 2 == 0 and len(y):
                    x, y = mixup(x, y)
                if len(y) < 2:  # BatchNorm cannot train on one image; nothing readable in this batch
                    step += 1
                    continue
                with _autocast(device, amp_dtype):
                    loss = criterion(x, train_model(x), y)
                flags = all_reduce_sum([float(not torch.isfinite(loss)), float(stop.requested)], dist, device)
                if flags[0]:
                    raise TrainingError(
                        f"loss is {loss.item()} at epoch {epoch} step {step}: training diverged and stopped. The last "
                        f"good checkpoint is kept at {ckpt_path}; lower --lr or enable --clip-grad, then --resume.")
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if cfg.clip_grad:
                    dispatch_clip_grad(model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                step += 1
                scheduler.step_update(epoch * steps_per_epoch + step)
                if ema is not None:
                    ema.update(model, step=epoch * steps_per_epoch + step)
                stats.update(loss.item(), len(y) * dist.world_size, optimizer.param_groups[0]["lr"])
                if flags[1]:
                    stats.close()
                    checkpoint(epoch, step)
                    reporter.interrupted(ckpt_path, epoch, step)
                    return {"interrupted": True, "epoch": epoch, "step": step}
            stats.close()
            average_buffers(model, dist)
            metrics = run_evaluation(eval_model(), val_loader, device, dist, amp_dtype)
            improved = metrics["top1"] > best
            best = max(best, metrics["top1"])
            reporter.end_epoch(epoch, stats, metrics, best)
            if dist.is_main and improved:
                save_model(eval_model(), output / "best", extra=extra)
            checkpoint(epoch + 1, 0)
    if dist.is_main:
        save_model(eval_model(), output / "model", extra=extra)
        reporter.finish()
    barrier(dist)
    return {**metrics, "best_top1": best, "output": str(output)}


def evaluate(checkpoint: str | Path, data: str | Path | None = None, batch_size: int = 64, workers: int = 2,
             device: str = "auto", amp: str = "auto", fused: bool = True) -> dict[str, Any]:
    """Top-1/top-5/loss of a saved model (folder, training run or ``checkpoint.pt``), fused, on a val split."""
    dev = _device(device)
    dist = init_distributed(dev.type)
    if dist.enabled and dev.type == "cuda":
        dev = torch.device("cuda", dist.local_rank)
    try:
        model, extra = load_trained(checkpoint)
        info = get_model_info(model.model_name) if model.model_name else None
        size = model.input_hw  # training builds the model at its training size
        if info is None:
            raise ValueError(f"{checkpoint}: unknown model variant, cannot pick its preprocessing")
        datasets = build_datasets(data, with_train=False)
        datasets.prepare(size, None, eval_transform(info, size, crop_pct=1.0 if is_digits(data) else None))
        if extra.get("classes") and extra["classes"] != datasets.classes:
            raise DataError(f"the model was trained on classes {extra['classes'][:10]}... but {data or 'digits'} "
                            f"has {datasets.classes[:10]}...")
        if model.num_classes != len(datasets.classes):
            raise DataError(f"the model predicts {model.num_classes} classes, the data has {len(datasets.classes)}")
        model = (fuse(model) if fused else model.eval()).to(dev)
        loader = _loader(datasets.val, batch_size, ShardSampler(len(datasets.val), dist.rank, dist.world_size),
                         workers, dev, False)
        return run_evaluation(model, loader, dev, dist, _amp_dtype(amp, dev))
    finally:
        cleanup_distributed()
