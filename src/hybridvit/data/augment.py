"""Training augmentation: timm's, with a random resized crop that can read a JPEG at reduced scale.

Kept apart from the evaluation transforms so that reading and preprocessing images for
inference does not import timm.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T
from torchvision.transforms import functional as F

from ..registry import ModelInfo
from .transforms import load_image


def train_transform(info: ModelInfo, input_size: tuple[int, int], *, auto_augment: str | None, color_jitter: float,
                    re_prob: float, hflip: float, scale: tuple[float, float], jpeg_draft: bool = True) -> "TrainTransform":
    """Training augmentation with timm: random resized crop, flip, RandAugment, jitter, random erasing."""
    steps = create_transform(input_size, is_training=True, auto_augment=auto_augment, color_jitter=color_jitter,
                             re_prob=re_prob, re_mode="pixel", hflip=hflip, scale=scale,
                             interpolation=info.interpolation, mean=info.mean, std=info.std).transforms
    crop = steps[0]
    if not isinstance(crop, RandomResizedCropAndInterpolation):
        raise TypeError(f"timm's training transform starts with {type(crop).__name__}, not its random resized crop")
    return TrainTransform(DraftResizedCrop(crop.size, crop.scale, crop.ratio, info.interpolation), T.Compose(steps[1:]),
                          jpeg_draft)


class DraftResizedCrop(RandomResizedCropAndInterpolation):
    """timm's random resized crop, which can also read a JPEG file at 1/2, 1/4 or 1/8 scale.

    ``from_file`` draws the crop from the stored size before any pixel is decoded (the same
    draws as timm's crop), then lets the JPEG decoder scale down in the DCT domain by the largest
    factor that leaves the crop at least as large as the output in both directions, so the crop
    is still shrunk, never enlarged. A large photo cropped to 224x224 decodes several times
    faster (docs/benchmarks.md). Not the same pixels as a full decode, but the same in every run:
    a resumed run sees what the uninterrupted one saw.
    """

    def from_file(self, path: str | Path | BinaryIO) -> Image.Image:
        try:
            with Image.open(path) as header:  # the size only: nothing is decoded yet
                full = header.size
                i, j, h, w = self.get_params(header, self.scale, self.ratio)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image {path}: {e}") from e
        interpolation = random.choice(self.interpolation) if isinstance(self.interpolation, (tuple, list)) \
            else self.interpolation
        out_h, out_w = self.size
        factor = next((f for f in (8, 4, 2) if h >= f * out_h and w >= f * out_w), 1)
        if hasattr(path, "seek"):  # bytes from a table: read again from the start
            path.seek(0)
        image = load_image(path, draft=(math.ceil(full[0] / factor), math.ceil(full[1] / factor)) if factor > 1 else None)
        if image.size == full:  # not a JPEG, or no room to scale: timm's own crop
            return F.resized_crop(image, i, j, h, w, list(self.size), interpolation)
        sx, sy = image.width / full[0], image.height / full[1]
        return image.resize((out_w, out_h), F.pil_modes_mapping[interpolation],
                            box=(j * sx, i * sy, (j + w) * sx, (i + h) * sy))


class TrainTransform:
    """The training transform: ``crop`` then ``rest`` (flip, RandAugment, jitter, tensor, erasing).

    ``read`` opens and crops a file in one go (a JPEG decoded at reduced scale where the crop
    allows, with ``jpeg_draft``); ``after_read`` finishes such an image.
    """

    def __init__(self, crop: DraftResizedCrop, rest: T.Compose, jpeg_draft: bool = True) -> None:
        self.crop, self.rest, self.jpeg_draft = crop, rest, jpeg_draft

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.rest(self.crop(image))

    def read(self, path: str | Path | BinaryIO) -> Image.Image:
        return self.crop.from_file(path) if self.jpeg_draft else self.crop(load_image(path))

    def after_read(self, image: Image.Image) -> torch.Tensor:
        return self.rest(image)

    def __repr__(self) -> str:
        return f"TrainTransform(crop={self.crop}, rest={self.rest}, jpeg_draft={self.jpeg_draft})"
