"""Where and how a process computes: its device (a rank's GPU under torchrun), mixed precision,
and data loaders that skip unreadable images."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data import collate_skipping_bad
from .distributed import DistInfo, init_distributed


def setup_device(name: str) -> tuple[torch.device, DistInfo]:
    """The device ``name`` asks for (``auto``: CUDA if available) and the torchrun process group, if any."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
    dist = init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    return device, dist


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` (``auto``: bf16 on GPUs that have it, full precision otherwise)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def make_loader(dataset: Dataset, batch_size: int, sampler: Sampler, workers: int, device: torch.device,
                drop_last: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      collate_fn=collate_skipping_bad, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
