"""Validation: top-1/top-5/loss over a sharded loader, and ``evaluate`` for saved models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..api import load_source
from ..data import DataError, build_datasets, eval_transform
from ..data.datasets import is_digits
from ..data.sampling import ShardSampler
from ..fusion import fuse
from ..registry import get_model_info
from ..checks import check_range
from .config import check_choice
from .distributed import DistInfo, all_reduce_sum, cleanup_distributed
from .runtime import amp_dtype, autocast, make_loader, setup_device


@torch.no_grad()
def run_evaluation(model: nn.Module, loader: DataLoader, device: torch.device, dist: DistInfo,
                   dtype: torch.dtype | None = None) -> dict[str, float]:
    """Top-1, top-5 and cross-entropy over the whole loader, summed over all processes."""
    model.eval()
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
    return {"top1": 100 * correct1 / images, "top5": 100 * correct5 / images, "loss": loss_sum / images,
            "images": int(images), "skipped": int(skipped)}


def evaluate(checkpoint: str | Path, data: str | Path | None = None, batch_size: int = 64, workers: int = 2,
             device: str = "auto", amp: str = "auto", fused: bool = True, input_size: tuple[int, int] | None = None,
             bias_resampling: str | None = None, pretrained: bool = False, pretrained_tag: str | None = None
             ) -> dict[str, Any]:
    """Top-1/top-5/loss of a saved model (anything ``load_source`` accepts: a folder, training run,
    ``checkpoint.pt``, Hub repository or published weights), fused, on a val split.

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
        datasets = build_datasets(data, with_train=False)
        datasets.prepare(size, None, eval_transform(info, size, crop_pct=1.0 if is_digits(data) else extra.get("crop_pct")))
        if extra.get("classes") and extra["classes"] != datasets.classes:
            raise DataError(f"the model was trained on classes {extra['classes'][:10]}... but {data or 'digits'} "
                            f"has {datasets.classes[:10]}...")
        if model.num_classes != len(datasets.classes):
            raise DataError(f"the model predicts {model.num_classes} classes, the data has {len(datasets.classes)}")
        model = (fuse(model) if fused else model.eval()).to(dev)
        loader = make_loader(datasets.val, batch_size, ShardSampler(len(datasets.val), dist.rank, dist.world_size),
                             workers, dev, False)
        return run_evaluation(model, loader, dev, dist, amp_dtype(amp, dev))
    finally:
        cleanup_distributed()
