"""Samplers and a dataset wrapper that make every epoch reproducible, with or without workers.

The augmentation of a sample depends only on ``(seed, epoch, draw, index)``: the sampler sends
the epoch and the draw's position in the epoch along with each index, and the wrapper seeds
the generators before that one sample. So a run resumed mid-way (or with another number of
data workers) sees the same batches, and the repeats of one image under repeated
augmentation (the same index drawn several times per epoch) are augmented differently.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def derived_seed(*parts: int) -> int:
    """One well-mixed seed from several integers (no collisions between nearby tuples)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def seed_generators(seed: int) -> None:
    """Seed Python's, NumPy's and torch's CPU generators, and CUDA's once CUDA is in use.

    The per-sample and per-step seeding: ``torch.manual_seed`` would also record a stack trace
    per call in a CUDA build before CUDA starts (a tenth of a data worker's time). The state is
    not restored afterwards; every consumer in a training process seeds before it draws.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


class SeededSamples(Dataset):
    """Wraps a dataset so that item ``(epoch, draw, index)`` is augmented with its own fixed seed."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        epoch, draw, index = key
        seed_generators(derived_seed(self.seed, epoch, draw, index))
        return self.dataset[index]


class EpochSampler(Sampler):
    """Yields ``(epoch, draw, index)`` from a base sampler, optionally skipping the first ``skip`` samples.

    ``draw`` numbers the samples of an epoch across all processes (``position * world_size + rank``).
    """

    def __init__(self, base: Sampler, rank: int = 0, world_size: int = 1) -> None:
        self.base = base
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for n, index in enumerate(self.base):
            if n >= self.skip:
                yield self.epoch, n * self.world_size + self.rank, index

    def __len__(self) -> int:
        return len(self.base) - self.skip  # type: ignore[arg-type]


class ShardSampler(Sampler):
    """Every ``world``-th index from ``rank``, no padding: distributed evaluation counts each image once."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class BalancedSampler(Sampler):
    """Draws ``len(targets)`` images per epoch with replacement, each class equally often in
    expectation (weight ``1 / n_class`` per image), from a generator seeded by ``(seed, epoch)``;
    each of ``world_size`` processes takes every ``world_size``-th draw. Deterministic per epoch,
    so a resumed run (``EpochSampler`` skipping) draws the same images."""

    def __init__(self, targets: list[int], seed: int, rank: int = 0, world_size: int = 1) -> None:
        counts = np.bincount(targets)
        self.weights = torch.tensor([1.0 / counts[t] for t in targets], dtype=torch.float64)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.per_rank = len(targets) // world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        draws = torch.multinomial(self.weights, self.per_rank * self.world_size, replacement=True, generator=generator)
        return iter(draws[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.per_rank
