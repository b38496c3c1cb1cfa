"""Everything a run needs, built from its config: data pipeline, model, optimisation, targets and loss.

``build_run`` is what ``train`` executes; tests build the same objects to check that each
part of a recipe acts (the sampler repeats, the transforms change pixels, the schedule
follows the official one) rather than merely being configured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import timm.optim
import timm.scheduler
import torch
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..api import create_model
from ..data import DataError, Datasets, build_datasets, eval_transform, is_digits, train_transform
from ..data.shards import ShardStream
from ..data.sources import SPLIT_RECORD
from ..data.sampling import BalancedSampler, EpochSampler, SeededSamples, ShardSampler
from ..registry import ModelInfo, get_model_info
from .config import TrainConfig
from .distributed import DistInfo
from .finetune import freeze, load_starting_weights
from .losses import DistillationLoss, SoftTargets, WeightedSoftTargetCrossEntropy, class_weights
from .precision import StepChoice, choose_step
from .runtime import PrestartedLoader, default_workers, make_loader
from .state import read_step_choice, seed_all
from .teacher import build_teacher


@dataclass
class DataPipeline:
    datasets: Datasets
    size: tuple[int, int]
    crop_pct: float  # of the evaluation transform (the digits are not cropped)
    sampler: EpochSampler | ShardStream  # set_epoch(epoch, skip): a stream orders itself
    train_loader: DataLoader
    val_loader: PrestartedLoader


@dataclass
class TrainingRun:
    cfg: TrainConfig  # resolved: no recipe option left at None
    output: Path
    device: torch.device
    data: DataPipeline
    model: nn.Module
    train_model: nn.Module  # the model, wrapped in DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: timm.scheduler.scheduler.Scheduler
    num_epochs: int  # the schedule's epochs plus cool-down
    steps_per_epoch: int  # full epoch (the loader is shorter while it skips to a resumed step)
    lr: float  # peak learning rate, scaled by the global batch
    targets: SoftTargets
    criterion: DistillationLoss
    step: StepChoice  # precision and memory layout
    scaler: torch.amp.GradScaler | None
    ema: ModelEmaV3 | None
    extra: dict[str, Any]  # stored with saved models: class names and preprocessing
    frozen: list[nn.Module]  # parts --freeze keeps as they are (BatchNorm statistics too: held in eval mode)
    started_from: str | None  # the weights the run started from (--pretrained, --finetune)

    @property
    def updates_per_epoch(self) -> int:
        """Optimizer steps per epoch: one per ``grad_accum_steps`` batches, and one for the rest."""
        return -(-self.steps_per_epoch // self.cfg.grad_accum_steps)

    def set_lr(self, epoch: int, step: int) -> None:
        """The learning rate of (epoch, batch ``step``): constant within an epoch (official) or per update."""
        if self.cfg.lr_step == "epoch":
            self.scheduler.step(epoch)
        else:
            self.scheduler.step_update(epoch * self.updates_per_epoch + step // self.cfg.grad_accum_steps)


def run_output(cfg: TrainConfig) -> Path:
    return Path(cfg.output or f"runs/{cfg.model}-{cfg.data_spec.name}")


def build_data(cfg: TrainConfig, info: ModelInfo, dist: DistInfo, device: torch.device) -> tuple[TrainConfig, DataPipeline]:
    """Resolve the recipe from the dataset's size, then the transforms, samplers and loaders."""
    # the layout is checked (DataError) before anything else; a validation split is written down
    record = run_output(cfg) / SPLIT_RECORD
    datasets = build_datasets(cfg.data_spec, follow=record if cfg.resume != "no" else None,
                              write=record if dist.is_main else None)
    cfg = cfg.resolved(len(datasets.train), info.model_class.default_recipe)
    if isinstance(datasets.train, ShardStream) and cfg.repeated_aug:  # needs random access: off for a stream
        cfg = replace(cfg, repeated_aug=False)
    if cfg.workers is None:
        cfg = replace(cfg, workers=default_workers(device))
    size = (cfg.input_size, cfg.input_width or cfg.input_size) if cfg.input_size else info.input_size[1:]
    crop_pct = 1.0 if is_digits(cfg.data) else info.crop_pct
    datasets.prepare(
        size,
        train_transform(info, size, auto_augment=cfg.auto_augment, color_jitter=cfg.color_jitter, re_prob=cfg.reprob,
                        hflip=cfg.hflip, scale=cfg.scale, jpeg_draft=cfg.jpeg_draft),
        eval_transform(info, size, crop_pct=crop_pct))
    if len(datasets.train) < cfg.batch_size * dist.world_size:
        raise DataError(f"{len(datasets.train)} training images are fewer than one global batch "
                        f"({cfg.batch_size} x {dist.world_size}); lower --batch-size")
    if isinstance(datasets.train, ShardStream):  # streamed: the stream orders (and seeds) itself
        if cfg.balanced_sampler:
            raise ValueError("--balanced-sampler draws images at random: not with streamed shards (--class-weights "
                             "weighs the classes instead)")
        for stream in (datasets.train, datasets.val):
            stream.configure(cfg.batch_size, dist.rank, dist.world_size)
        sampler: Any = datasets.train
        train_loader = make_loader(datasets.train, cfg.batch_size, None, cfg.workers, device, True)
        val_sampler = None
    else:
        if cfg.balanced_sampler:  # every class equally often, drawn with replacement
            base = BalancedSampler(datasets.train.targets, cfg.seed, dist.rank, dist.world_size)
        elif cfg.repeated_aug:  # each image 3 times per epoch, its repeats on different ranks (DeiT's RASampler)
            base = RepeatAugSampler(datasets.train, num_replicas=dist.world_size, rank=dist.rank, shuffle=True)
        else:
            base = DistributedSampler(datasets.train, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                      seed=cfg.seed, drop_last=True)
        sampler = EpochSampler(base, dist.rank, dist.world_size)
        train_loader = make_loader(SeededSamples(datasets.train, cfg.seed), cfg.batch_size, sampler, cfg.workers,
                                   device, True)
        val_sampler = ShardSampler(len(datasets.val), dist.rank, dist.world_size)
    if len(train_loader) == 0:
        raise DataError(f"{len(datasets.train)} training images make no full batch of {cfg.batch_size} per process; "
                        f"lower --batch-size")
    val_loader = PrestartedLoader(make_loader(datasets.val, cfg.batch_size, val_sampler, cfg.workers, device, False))
    return cfg, DataPipeline(datasets, size, crop_pct, sampler, train_loader, val_loader)


def build_model(cfg: TrainConfig, num_classes: int, size: tuple[int, int]) -> tuple[nn.Module, str | None]:
    """The run's model, and the weights it starts from (``--pretrained``, ``--finetune``) if any."""
    kwargs: dict[str, Any] = {**cfg.model_args, "num_classes": num_classes, "img_size": size}
    if cfg.drop_path is not None:
        kwargs["drop_path_rate"] = cfg.drop_path
    model = create_model(cfg.model, **kwargs)
    return model, load_starting_weights(cfg, model)


def build_run(cfg: TrainConfig, device: torch.device, dist: DistInfo) -> TrainingRun:
    """Data, model, optimiser, schedule, targets, loss and EMA exactly as ``cfg`` (and its recipe) say."""
    info = get_model_info(cfg.model)
    cfg, data = build_data(cfg, info, dist, device)
    classes, size = data.datasets.classes, data.size
    teacher = build_teacher(cfg, classes, size)
    distillation = cfg.distillation if teacher is not None else "none"
    seed_all(cfg.seed)  # the same initial weights on every process and in every run with this seed
    model, started_from = build_model(cfg, len(classes), size)
    frozen = freeze(model, cfg.freeze)
    if distillation != "none" and not getattr(model, "distillation", False):
        raise ValueError(f"--teacher needs a student with a distillation head; {cfg.model} has none "
                         f"(LeViT has one by default; CvT has none): drop --teacher or pass --distillation none")
    model.to(device)
    stored = read_step_choice(run_output(cfg) / "checkpoint.pt") if cfg.resume != "no" else None
    step = choose_step(cfg.amp, cfg.channels_last, model, (cfg.batch_size, 3, *size), device, dist, stored)
    if step.channels_last:
        model.to(memory_format=torch.channels_last)
    cfg = replace(cfg, amp=step.amp, channels_last=step.channels_last)  # train_config.json: as run
    lr = cfg.lr * cfg.batch_size * cfg.grad_accum_steps * dist.world_size / 512  # the effective batch's
    # fused: one kernel for every parameter (half the for-loop's time for LeViT-128S on a CPU); layer_decay:
    # timm's layer-wise rates, from each model's group_matcher (frozen parameters are left out)
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=lr, weight_decay=cfg.weight_decay, fused=True,
                                               layer_decay=cfg.layer_decay)
    scheduler, num_epochs = timm.scheduler.create_scheduler_v2(
        optimizer, "cosine", num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr, cooldown_epochs=cfg.cooldown_epochs, step_on_epochs=cfg.lr_step == "epoch",
        updates_per_epoch=-(-len(data.train_loader) // cfg.grad_accum_steps))
    weights = None if cfg.class_weights is None else class_weights(cfg.class_weights, data.datasets.train.targets,
                                                                    classes).to(device)
    if cfg.multi_label:  # one sigmoid per class; smoothing moves each target towards 0.5
        base_loss = BinaryCrossEntropy(smoothing=cfg.smoothing, weight=weights, smooth_dense=True)
    else:
        base_loss = SoftTargetCrossEntropy() if weights is None else WeightedSoftTargetCrossEntropy(weights)
    if teacher is not None:
        teacher.to(device)
    train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.enabled else model
    if cfg.compile:
        train_model = torch.compile(train_model)
    return TrainingRun(
        cfg=cfg, output=run_output(cfg), device=device, data=data, model=model, train_model=train_model,
        optimizer=optimizer, scheduler=scheduler, num_epochs=num_epochs, steps_per_epoch=len(data.train_loader), lr=lr,
        targets=SoftTargets(len(classes), cfg.smoothing, cfg.mixup, cfg.cutmix),
        criterion=DistillationLoss(base_loss, teacher, distillation, tau=cfg.distillation_tau),
        step=step, scaler=torch.amp.GradScaler(device.type) if step.dtype == torch.float16 else None,
        ema=ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None,
        extra={"classes": classes, "input_size": list(size), "crop_pct": data.crop_pct, "mean": list(info.mean),
               "std": list(info.std), **({"multi_label": True, "threshold": cfg.threshold} if cfg.multi_label else {})},
        frozen=frozen, started_from=started_from,
    )
