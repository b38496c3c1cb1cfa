"""Resumable training state: atomic checkpoint files and reproducible random numbers.

Checkpoints hold only tensors and plain containers, so resuming reads them with
``torch.load(weights_only=True)`` like any other file. No generator state is saved: every
training step reseeds the generators from (seed, epoch, step, rank), so a run resumed at
any step, on any rank, draws the same numbers as the uninterrupted run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import CheckpointError
from ..data.sampling import derived_seed, seed_generators


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_step_choice(path: Path) -> dict[str, Any] | None:
    """The precision and layout a run's checkpoint records (None: no readable checkpoint there);
    memory-mapped, so a large checkpoint is not read whole twice."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # resuming reports an unreadable checkpoint with its reason
        return None
    return {"amp": state.get("amp"), "channels_last": state.get("channels_last")}


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot resume from {path}: {type(e).__name__}: {e}") from e


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch generators, CUDA's even before CUDA starts (a run's initial weights)."""
    seed_generators(seed)
    torch.manual_seed(seed)


def seed_step(seed: int, epoch: int, step: int, rank: int) -> None:
    """Seed every generator for one training step (Mixup/CutMix draws, drop-path masks)."""
    seed_generators(derived_seed(seed, epoch, step, rank))
