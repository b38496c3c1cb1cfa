"""The distillation teacher: built from a folder, a hybridvit name or a timm name, never random.

A teacher without trained weights would silently distil noise into the student, so a named
teacher needs ``--teacher-checkpoint`` or ``--teacher-pretrained``. Before training starts the
teacher runs once on an input of the training size, so a teacher that cannot take that size,
or that predicts another number of classes than the data has, is refused with a clear error.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from ..api import create_model
from ..checkpoints import CheckpointError, load_trained, read_checkpoint
from ..checkpoints.hub import HUB_PREFIX
from ..registry import get_model_info
from .config import TrainConfig


def _is_hybridvit_name(name: str) -> bool:
    try:
        get_model_info(name)
    except ValueError:
        return False
    return True


def _is_model_name(name: str) -> bool:
    """A hybridvit or timm model name (with or without a pretrained tag), or a timm ``hf-hub:`` name."""
    return _is_hybridvit_name(name) or timm.is_model(name) or name.startswith(HUB_PREFIX)


def _named_teacher(cfg: TrainConfig, num_classes: int, size: tuple[int, int]) -> nn.Module:
    name = cfg.teacher
    if not cfg.teacher_checkpoint and not cfg.teacher_pretrained:
        raise ValueError(f"--teacher {name} has no weights: a randomly initialised teacher would teach noise. Give "
                         f"--teacher-checkpoint FILE, --teacher-pretrained (the published weights), or a trained "
                         f"model folder as --teacher")
    if cfg.teacher_checkpoint and cfg.teacher_pretrained:
        raise ValueError("give either --teacher-checkpoint or --teacher-pretrained, not both")
    try:
        if _is_hybridvit_name(name):
            if cfg.teacher_pretrained:
                return create_model(name, pretrained=True, img_size=size)
            return create_model(name, num_classes=num_classes, img_size=size, checkpoint_path=cfg.teacher_checkpoint)
        if cfg.teacher_pretrained:
            return timm.create_model(name, pretrained=True)
        teacher = timm.create_model(name, num_classes=num_classes)
        state = read_checkpoint(cfg.teacher_checkpoint).state_dict  # read safely (weights only)
        result = teacher.load_state_dict(state, strict=False)
    except RuntimeError as e:  # timm/torch: unknown name, or tensors of the wrong shape
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "size mismatch" in line), lines[0] if lines else "")
        raise ValueError(f"teacher {name} (for {num_classes} classes): {detail}") from e
    except CheckpointError as e:
        raise ValueError(f"teacher {name}: {e}") from e
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"teacher {name}: {cfg.teacher_checkpoint} does not fit timm's {name} (missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})")
    return teacher


def build_teacher(cfg: TrainConfig, classes: list[str], size: tuple[int, int]) -> nn.Module | None:
    """The teacher ``cfg`` names, in eval mode, checked against the data's classes and input size."""
    if cfg.teacher is None:
        if cfg.teacher_checkpoint or cfg.teacher_pretrained:
            raise ValueError("--teacher-checkpoint / --teacher-pretrained need --teacher NAME")
        return None
    if not Path(cfg.teacher).exists() and not _is_model_name(cfg.teacher):
        raise FileNotFoundError(f"--teacher {cfg.teacher} not found: no such file or folder, and no hybridvit or "
                                f"timm model of that name")
    if Path(cfg.teacher).exists():  # a model folder, run folder or checkpoint.pt: weights included
        if cfg.teacher_checkpoint or cfg.teacher_pretrained:
            raise ValueError(f"--teacher {cfg.teacher} is a trained model already; drop --teacher-checkpoint/--teacher-pretrained")
        teacher, extra = load_trained(cfg.teacher)
        if extra.get("classes") and extra["classes"] != classes:
            raise ValueError(f"teacher {cfg.teacher} was trained on classes {extra['classes'][:10]}, the data has "
                             f"{classes[:10]}")
    else:
        teacher = _named_teacher(cfg, len(classes), size)
    check_teacher(teacher.eval(), cfg.teacher, len(classes), size)
    return teacher


@torch.no_grad()
def check_teacher(teacher: nn.Module, name: str, num_classes: int, size: tuple[int, int]) -> None:
    """One forward pass at the training size: the teacher must accept it and predict ``num_classes``."""
    in_chans = getattr(teacher, "in_chans", 3)
    try:
        out = teacher(torch.zeros(1, in_chans, *size))
    except Exception as e:  # noqa: BLE001 - any failure here means the teacher cannot see these images
        raise ValueError(f"teacher {name} cannot take the training images ({size[0]}x{size[1]}): "
                         f"{str(e).strip().splitlines()[0]}") from e
    if out.shape[-1] != num_classes:
        raise ValueError(f"teacher {name} predicts {out.shape[-1]} classes, the data has {num_classes}")
