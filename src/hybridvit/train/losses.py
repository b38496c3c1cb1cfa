"""Training targets and losses: soft targets for every batch, and the LeViT/DeiT distillation
loss (½ base loss on the class head + ½ teacher loss on the distillation head)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target
from torch import nn


class SoftTargets:
    """Turns ``(images, labels)`` into ``(images, soft targets)`` for every batch.

    Mixup/CutMix (timm's, with label smoothing folded in) where the batch allows it; timm
    mixes a batch with its reverse and needs an even length, so an odd batch (an odd
    ``--batch-size``, or one with an unreadable image) gets the smoothed one-hot targets
    instead. Either way the loss is the same soft-target cross-entropy.
    """

    def __init__(self, num_classes: int, smoothing: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0) -> None:
        self.num_classes, self.smoothing = num_classes, smoothing
        self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing,
                           num_classes=num_classes) if mixup > 0 or cutmix > 0 else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if y.ndim == 2:  # multi-hot (several labels an image): the loss smooths them itself
            return x, y.float()
        if self.mixup is not None and len(y) % 2 == 0:
            return self.mixup(x, y)
        return x, mixup_target(y, self.num_classes, smoothing=self.smoothing)


class DistillationLoss(nn.Module):
    """``kind``: ``"hard"`` (CE to the teacher's argmax), ``"soft"`` (KL at temperature ``tau``) or ``"none"``.

    The teacher sees the same (augmented, mixed) batch as the student, in eval mode and without
    gradients. With ``"none"`` (or a single-head output) only the base loss is used; a
    two-head output then trains both heads on the labels.
    """

    def __init__(self, base: nn.Module, teacher: nn.Module | None = None, kind: str = "none",
                 alpha: float = 0.5, tau: float = 1.0) -> None:
        super().__init__()
        if kind not in ("hard", "soft", "none"):
            raise ValueError(f"distillation must be hard, soft or none, got {kind!r}")
        if kind != "none" and teacher is None:
            raise ValueError(f"{kind} distillation needs a teacher model")
        self.base, self.kind, self.alpha, self.tau = base, kind, alpha, tau
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None and kind != "none" else None

    def forward(self, inputs: torch.Tensor, outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                targets: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, tuple):
            if self.teacher is not None:
                raise ValueError("distillation needs a student with a distillation head (e.g. LeViT with distillation=True)")
            return self.base(outputs, targets)
        cls_out, dist_out = outputs
        if self.teacher is None:
            return (self.base(cls_out, targets) + self.base(dist_out, targets)) / 2
        with torch.no_grad():
            teacher_out = self.teacher(inputs)
        if self.kind == "hard":
            dist_loss = F.cross_entropy(dist_out, teacher_out.argmax(dim=1))
        else:
            t = self.tau
            dist_loss = F.kl_div(F.log_softmax(dist_out / t, dim=1), F.log_softmax(teacher_out / t, dim=1),
                                 reduction="sum", log_target=True) * (t * t) / dist_out.numel()
        return (1 - self.alpha) * self.base(cls_out, targets) + self.alpha * dist_loss


class WeightedSoftTargetCrossEntropy(nn.Module):
    """Soft-target cross-entropy with a weight per class, ``-sum_c w_c t_c log p_c`` averaged over
    the batch: with one-hot targets, each image's loss times its class's weight (imbalanced data)."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", weights.float())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.sum(-targets * self.weights * F.log_softmax(logits, dim=-1), dim=-1).mean()


def class_weights(spec: str, targets: list[Any], classes: list[str]) -> torch.Tensor:
    """``auto``: inverse class frequency, ``N / (C * n_c)`` (1 for every class of balanced data;
    with several labels an image, ``n_c`` counts the images that have the class); otherwise a file
    of one weight per class, in class order (a JSON list, or one per line)."""
    import json
    from pathlib import Path

    if spec == "auto":
        flat = [c for t in targets for c in (t if isinstance(t, tuple) else (t,))]
        counts = torch.bincount(torch.tensor(flat), minlength=len(classes)).float()
        return len(targets) / (len(classes) * counts.clamp(min=1))
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--class-weights {spec}: not 'auto' and not a file of weights")
    text = path.read_text(encoding="utf-8")
    try:
        values = json.loads(text) if text.lstrip().startswith("[") else [float(v) for v in text.split()]
    except ValueError as e:
        raise ValueError(f"--class-weights {spec}: not a JSON list or one number per line ({e})") from None
    if len(values) != len(classes) or any(not isinstance(v, (int, float)) or v < 0 for v in values):
        raise ValueError(f"--class-weights {spec}: {len(values)} value(s); the data has {len(classes)} classes "
                         "(one non-negative weight each, in class order)")
    return torch.tensor(values, dtype=torch.float32)
