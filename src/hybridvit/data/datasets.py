"""Datasets: images with class indices (folders, manifests, tables) and the built-in digits;
``sources.build_datasets`` reads each layout into them.

Unreadable images never stop a run: the dataset yields a marker instead of a sample, the
collate function drops it and reports which indices were skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from .transforms import load_image

SPLITS = ("train", "val")


class DataError(ValueError):
    """A dataset that cannot be trained or evaluated on, found before any work starts."""


def image_extensions() -> set[str]:
    """Every file extension Pillow can open."""
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def image_files(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively), in a fixed order."""
    extensions = image_extensions()
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions)


def scan_split(root: Path, split: str) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted folder names) and ``(path, class index)`` samples of one split."""
    folder = root / split
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        raise DataError(f"missing split folder {folder} (expected {root}/train/<class>/* and {root}/val/<class>/*; "
                        f"found {found if root.is_dir() else 'no such directory'})")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{folder} has no class folders (expected {folder}/<class>/<image files>)")
    samples, empty = [], []
    for index, name in enumerate(classes):
        files = image_files(folder / name)
        if not files:
            empty.append(name)
        samples += [(p, index) for p in files]
    if empty:
        raise DataError(f"{folder}: class folder(s) with no images: {', '.join(empty[:20])}")
    return classes, samples


class ImageFolderDataset(Dataset):
    """Images and their class indices (``samples``: path, index; with ``multi_hot``, a tuple of
    indices given as a multi-hot vector); a sample that cannot be decoded yields ``(None, index)``. ``unlabelled``: the listed images left out for a missing or unknown
    label, named."""

    def __init__(self, samples: list[tuple[Any, int]]) -> None:
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.transform: Callable[[Image.Image], torch.Tensor] | None = None  # set by Datasets.prepare
        self.unlabelled: list[str] = []
        self.multi_hot: int | None = None  # several labels an image (targets: tuples): multi-hot of this many classes

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, index: int) -> str:
        return str(self.samples[index][0])

    def open(self, index: int) -> Any:
        """What to read sample ``index`` from: a path here, bytes in a table (``sources.TableImages``)."""
        return self.samples[index][0]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        target = self.samples[index][1]
        if self.multi_hot is not None:
            target = torch.zeros(self.multi_hot).index_fill_(0, torch.tensor(target), 1.0)
        path = self.open(index)
        read = getattr(self.transform, "read", None)  # a transform that reads (and crops) the file itself
        try:
            image = read(path) if read else load_image(path)
        except ValueError:  # unreadable file; a failing transform is a bug and is raised, not skipped
            return None, index
        return (self.transform.after_read(image) if read else self.transform(image)), target


class DigitsDataset(Dataset):
    """scikit-learn's 1,797 8x8 handwritten digits, upscaled (bicubic) to ``size`` with 3 channels."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, indices: np.ndarray) -> None:
        self.indices = indices
        self.targets = [int(targets[i]) for i in indices]
        self.images = (images[indices] * (255.0 / 16.0)).astype(np.uint8)
        self.size: tuple[int, int] = (64, 64)  # set by Datasets.prepare
        self.transform: Callable[[Image.Image], torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, index: int) -> str:
        return f"digits[{int(self.indices[index])}]"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[index], mode="L").resize(self.size[::-1], Image.BICUBIC).convert("RGB")
        return self.transform(image), self.targets[index]


def digits_split(val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed, seeded, stratified train/val split of the digits: ``images, targets, train_idx, val_idx``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_idx, val_idx = train_test_split(np.arange(len(digits.target)), test_size=val_fraction,
                                          stratify=digits.target, random_state=seed)
    return digits.images, digits.target, np.sort(train_idx), np.sort(val_idx)


@dataclass
class Datasets:
    train: ImageFolderDataset | DigitsDataset | None
    val: ImageFolderDataset | DigitsDataset
    classes: list[str]

    def prepare(self, input_size: tuple[int, int], train_transform: Callable | None, val_transform: Callable) -> None:
        """Attach the transforms (and, for the digits, the size they are upscaled to)."""
        for dataset, transform in ((self.train, train_transform), (self.val, val_transform)):
            if dataset is not None:
                dataset.transform = transform
                if isinstance(dataset, DigitsDataset):
                    dataset.size = input_size


def collate_skipping_bad(batch: list[tuple[Any, int]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Stack good samples; return the dataset indices of unreadable ones as the third element.

    ``default_collate`` stacks a worker's batch straight into shared memory (a plain stack
    would be copied there again on its way to the training process).
    """
    good = [(x, t) for x, t in batch if x is not None]
    bad = [t for x, t in batch if x is None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    images, targets = default_collate(good)
    return images, targets, bad
