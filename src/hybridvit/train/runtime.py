"""Where and how a process computes: its device (a rank's GPU under torchrun), mixed precision,
and data loaders that skip unreadable images."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data import collate_skipping_bad
from ..data.shards import ShardStream, StreamLoader
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


def default_workers(device: torch.device) -> int:
    """Data-loading processes per training process, from its share of this machine's cores
    (torchrun's local processes split them), at most 8.

    On a GPU, the share less one core for the process itself. On a CPU the training step's
    threads already use every core, and the workers run at idle priority (``make_loader``): one
    per core fills every moment the step leaves a core idle; with a single core there is no
    such moment, and the process loads its own batches. Measured on a 2-core EPYC, LeViT-128S in
    bf16: 2 idle-priority workers 1.2x one worker at normal priority and 1.1x none; on one of its
    cores, no worker 1.05x an idle one and 1.2x a normal one.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = max(cores // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1), 1)
    if device.type == "cpu":
        return min(8, share) if share > 1 else 0
    return min(8, max(1, share - 1))


def idle_priority(worker_id: int) -> None:
    """A data worker of CPU training runs only when a core is idle (Linux's SCHED_IDLE).

    At normal priority a worker takes turns with the step's threads, and the rest of a
    parallel region waits for the thread it displaced: a LeViT-128S step in bf16 on 2 cores
    took 330 ms beside one normal worker and 250 ms beside two idle ones. When the workers fall
    behind, the step waits for data, its cores go idle and the workers get them.
    """
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def make_loader(dataset: Dataset, batch_size: int, sampler: Sampler | None, workers: int, device: torch.device,
                drop_last: bool) -> DataLoader:
    """Workers kept for the whole run (``persistent_workers``), not started again every epoch; on a
    CPU at idle priority. A streamed dataset (``ShardStream``) orders itself: no sampler."""
    loader = StreamLoader if isinstance(dataset, ShardStream) else DataLoader
    return loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      collate_fn=collate_skipping_bad, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      worker_init_fn=idle_priority if device.type == "cpu" else None)


class PrestartedLoader:
    """A loader whose worker processes start now, while this process is small.

    Started at the first evaluation, the workers are forked from a process holding the training
    step's memory, and every page of it that the next steps write is then copied once: 1.8 s
    and 5 s of system time in the first step after it (LeViT-128S, batch 32, 2 cores). The
    first pass takes the iterator started here, so the sampler must give the same order every
    pass (the evaluation's does).
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self._started: Iterator | None = iter(loader) if loader.num_workers else None

    def __iter__(self) -> Iterator:
        started, self._started = self._started, None
        return started if started is not None else iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)
