"""Evaluation preprocessing as the papers specify it: resize, center crop, normalise."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw, UnidentifiedImageError
from torchvision import transforms as T

from ..registry import ModelInfo


def eval_transform(info: ModelInfo, input_size: tuple[int, int] | None = None,
                   crop_pct: float | None = None) -> T.Compose:
    """Resize the short side to ``size / crop_pct`` (bicubic), center-crop, normalise."""
    h, w = input_size or info.input_size[1:]
    resize = math.floor(min(h, w) / (crop_pct or info.crop_pct))
    interpolation = T.InterpolationMode(info.interpolation)
    return T.Compose([
        T.Resize(resize, interpolation=interpolation),
        T.CenterCrop((h, w)),
        T.ToTensor(),
        T.Normalize(info.mean, info.std),
    ])


def train_transform(info: ModelInfo, input_size: tuple[int, int], *, auto_augment: str | None, color_jitter: float,
                    re_prob: float, hflip: float, scale: tuple[float, float]) -> Callable:
    """Training augmentation with timm: random resized crop, flip, RandAugment, jitter, random erasing."""
    from timm.data import create_transform

    return create_transform(input_size, is_training=True, auto_augment=auto_augment, color_jitter=color_jitter,
                            re_prob=re_prob, re_mode="pixel", hflip=hflip, scale=scale,
                            interpolation=info.interpolation, mean=info.mean, std=info.std)


def load_image(path: str | Path) -> Image.Image:
    """Open any image Pillow reads as RGB (grayscale, palette and RGBA are converted)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def example_image(size: int = 320) -> Image.Image:
    """A deterministic synthetic picture (gradient, disc, bars) for demos without data."""
    img = Image.new("RGB", (size, size))
    px = img.load()
    for y in range(size):
        for x in range(size):
            px[x, y] = (x * 255 // size, y * 255 // size, 128)
    draw = ImageDraw.Draw(img)
    draw.ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 40, 40))
    for i in range(0, size, size // 8):
        draw.rectangle((i, size - size // 10, i + size // 16, size), fill=(20, 20, 20))
    return img
