"""Validation: top-1/top-5/loss over a sharded loader, and ``evaluate`` for saved models."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..api import load_source
from ..data import DataError, DataSpec, build_datasets, eval_transform, is_digits
from ..data.sources import SPLIT_RECORD
from ..data.sampling import ShardSampler
from ..data.shards import ShardStream
from ..fusion import fuse
from ..registry import get_model_info
from ..checks import check_range
from .config import check_choice
from .distributed import DistInfo, all_reduce_sum, cleanup_distributed
from .runtime import amp_dtype, autocast, make_loader, setup_device


@torch.no_grad()
def run_evaluation(model: nn.Module, loader: DataLoader, device: torch.device, dist: DistInfo,
                   dtype: torch.dtype | None = None, threshold: float | None = None) -> dict[str, float]:
    """Top-1, top-5 and cross-entropy over the whole loader, summed over all processes; with
    ``threshold`` (several labels an image, multi-hot targets) mAP, F1 at ``threshold`` and binary
    cross-entropy instead. ``score`` is what a run keeps its best weights by: top-1, or mAP."""
    model.eval()
    if threshold is not None:
        return _multi_label_metrics(model, loader, device, dist, dtype, threshold)
    correct1 = correct5 = loss_sum = images = skipped = 0.0
    for x, y, bad in loader:
        skipped += len(bad)
        if not len(y):
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, dtype):
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
    top1 = 100 * correct1 / images
    return {"top1": top1, "top5": 100 * correct5 / images, "loss": loss_sum / images, "images": int(images),
            "skipped": int(skipped), "score": top1}


def _multi_label_metrics(model: nn.Module, loader: DataLoader, device: torch.device, dist: DistInfo,
                         dtype: torch.dtype | None, threshold: float) -> dict[str, float]:
    """mAP (the mean over classes with a positive image of scikit-learn's average precision), micro
    F1 of the labels at ``threshold``, and binary cross-entropy; every process's scores are gathered."""
    from sklearn.metrics import average_precision_score

    scores, targets, skipped = [], [], 0
    for x, y, bad in loader:
        skipped += len(bad)
        if not len(y):
            continue
        with autocast(device, dtype):
            out = model(x.to(device, non_blocking=True))
        scores.append(out.float().sigmoid().cpu())
        targets.append(y.float())
    parts = [(torch.cat(scores) if scores else torch.empty(0), torch.cat(targets) if targets else torch.empty(0),
              skipped)]
    if dist.enabled:
        gathered: list = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, parts[0])
        parts = gathered
    probs = torch.cat([p for p, _, _ in parts if len(p)])
    truth = torch.cat([t for _, t, _ in parts if len(t)])
    if not len(probs):
        raise DataError("evaluation saw no readable images")
    present = truth.sum(0) > 0
    ap = average_precision_score(truth[:, present].numpy(), probs[:, present].numpy(), average=None)
    predicted = probs >= threshold
    tp = (predicted & (truth > 0)).sum().item()
    f1 = 2 * tp / max(predicted.sum().item() + truth.sum().item(), 1)
    loss = F.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7), truth).item()
    mean_ap = 100 * float(ap.mean())
    return {"map": mean_ap, "f1": 100 * f1, "loss": loss, "images": len(probs),
            "skipped": int(sum(s for _, _, s in parts)), "score": mean_ap}


def recorded_split(checkpoint: str | Path) -> Path | None:
    """The ``val_split.json`` of the run a checkpoint comes from (its folder, or the run above a
    saved model), if that run held out a validation split."""
    path = Path(checkpoint)
    for folder in (path, path.parent, path.parent.parent) if path.exists() else ():
        if (folder / SPLIT_RECORD).is_file():
            return folder / SPLIT_RECORD
    return None


def evaluate(checkpoint: str | Path, data: str | Path | DataSpec | None = None, batch_size: int = 64, workers: int = 2,
             device: str = "auto", amp: str = "auto", fused: bool = True, input_size: tuple[int, int] | None = None,
             bias_resampling: str | None = None, pretrained: bool = False, pretrained_tag: str | None = None
             ) -> dict[str, Any]:
    """Top-1/top-5/loss of a saved model (anything ``load_source`` accepts: a folder, training run,
    ``checkpoint.pt``, Hub repository or published weights), fused, on the validation images of
    ``data`` (any layout ``build_datasets`` reads; the held-out split its run recorded, if any).

    ``input_size``: evaluate at another size than the training one (LeViT then serves it with
    biases derived from its tables, by ``bias_resampling``).
    """
    check_choice("amp", amp)
    check_choice("device", device)
    check_range("batch_size", batch_size, 1)
    check_range("workers", workers, 0)
    if input_size is not None:
        check_range("input_size", input_size[0], 1)
        check_range("input_width", input_size[1], 1)
    dev, dist = setup_device(device)
    try:
        model, extra = load_source(checkpoint, pretrained, pretrained_tag)
        info = get_model_info(model.model_name) if model.model_name else None
        size = tuple(input_size) if input_size else model.input_hw  # the model's: its training size
        if hasattr(model.config, "dynamic_size") and (size != model.input_hw or bias_resampling):
            model = model.reconfigured(dynamic_size=True, bias_resampling=bias_resampling or "bilinear")
        if info is None:
            raise ValueError(f"{checkpoint}: unknown model variant, cannot pick its preprocessing")
        multi = bool(extra.get("multi_label"))
        spec = data if isinstance(data, DataSpec) else DataSpec(None if data is None else str(data))
        spec = dataclasses.replace(spec, multi_label=multi)
        datasets = build_datasets(spec, with_train=False, follow=recorded_split(checkpoint),
                                  classes=None if is_digits(spec.data) else extra.get("classes"))
        crop_pct = 1.0 if is_digits(spec.data) else extra.get("crop_pct")
        datasets.prepare(size, None, eval_transform(info, size, crop_pct=crop_pct))
        if extra.get("classes") and extra["classes"] != datasets.classes:
            raise DataError(f"the model was trained on classes {extra['classes'][:10]}... but {spec.data or 'digits'} "
                            f"has {datasets.classes[:10]}...")
        if model.num_classes != len(datasets.classes):
            raise DataError(f"the model predicts {model.num_classes} classes, the data has {len(datasets.classes)}")
        model = (fuse(model) if fused else model.eval()).to(dev)
        if isinstance(datasets.val, ShardStream):  # streamed: each process takes its share itself
            datasets.val.configure(batch_size, dist.rank, dist.world_size)
            sampler = None
        else:
            sampler = ShardSampler(len(datasets.val), dist.rank, dist.world_size)
        loader = make_loader(datasets.val, batch_size, sampler, workers, dev, False)
        return run_evaluation(model, loader, dev, dist, amp_dtype(amp, dev), extra.get("threshold", 0.5) if multi else None)
    finally:
        cleanup_distributed()
