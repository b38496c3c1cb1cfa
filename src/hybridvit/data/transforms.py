"""Evaluation preprocessing as the papers specify it: resize, center crop, normalise."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T
from torchvision.transforms import functional as F

from ..registry import ModelInfo


def eval_transform(info: ModelInfo, input_size: tuple[int, int] | None = None,
                   crop_pct: float | None = None) -> T.Compose:
    """Resize the short side to ``size / crop_pct`` (bicubic), center-crop, normalise."""
    return T.Compose([*eval_geometry(info, input_size, crop_pct).transforms, T.ToTensor(),
                      T.Normalize(info.mean, info.std)])


def eval_geometry(info: ModelInfo, input_size: tuple[int, int] | None = None,
                  crop_pct: float | None = None) -> T.Compose:
    """The resize and center crop of ``eval_transform``: a PIL image in, a PIL image out."""
    h, w = input_size or info.input_size[1:]
    resize = math.floor(min(h, w) / (crop_pct or info.crop_pct))
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode(info.interpolation)),
                      T.CenterCrop((h, w))])


def train_transform(info: ModelInfo, input_size: tuple[int, int], *, auto_augment: str | None, color_jitter: float,
                    re_prob: float, hflip: float, scale: tuple[float, float], jpeg_draft: bool = True) -> "TrainTransform":
    """Training augmentation with timm: random resized crop, flip, RandAugment, jitter, random erasing."""
    from timm.data import create_transform

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

    def from_file(self, path: str | Path) -> Image.Image:
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

    def read(self, path: str | Path) -> Image.Image:
        return self.crop.from_file(path) if self.jpeg_draft else self.crop(load_image(path))

    def after_read(self, image: Image.Image) -> torch.Tensor:
        return self.rest(image)

    def __repr__(self) -> str:
        return f"TrainTransform(crop={self.crop}, rest={self.rest}, jpeg_draft={self.jpeg_draft})"


def load_image(path: str | Path | BinaryIO, exif: bool = False, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open any image Pillow reads (a path or a binary file) as 8-bit RGB (grayscale, palette, CMYK
    and RGBA are converted).

    Pillow's own conversion clips wider pixels to 0-255, which turns a 16-bit image almost white
    and a float image almost black, so those are scaled to 8 bits first (``_to_8bit``). An
    animated image gives its first frame. ``exif``: turn the picture as its EXIF orientation
    says (as a viewer shows it); training reads pixels as stored, as timm and torchvision do.
    ``draft`` (width, height): let a JPEG decoder scale down by 1/2, 1/4 or 1/8 in the DCT
    domain while keeping at least this size (several times faster; not the same pixels).
    """
    try:
        with Image.open(path) as img:
            if draft is not None and img.format == "JPEG":
                img.draft("RGB", draft if not exif else _stored_size(img, draft))
            rgb = to_rgb(img, path)
            return ImageOps.exif_transpose(rgb) if exif else rgb
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {getattr(path, 'name', path)}: {e}") from e


def to_rgb(img: Image.Image, path: str | Path = "<image>") -> Image.Image:
    """8-bit RGB from any mode (``load_image`` without the file)."""
    return _to_8bit(img, path).convert("RGB")


def _stored_size(img: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
    """``size`` as seen before the EXIF turn: orientations 5-8 swap width and height."""
    return size[::-1] if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else size


def _to_8bit(img: Image.Image, path: str | Path = "<image>") -> Image.Image:
    """Integer and float pixels scaled, not clipped, to 8 bits (other modes are returned as they are).

    - 16- and 32-bit integer modes (``I;16``, ``I;16B``, ``I``...) are read as 16-bit data: 65535 -> 255.
      (Pillow already decodes 16-bit RGB and RGBA PNGs to 8 bits per channel.)
    - Float (``F``): pixels within [0, 1] are multiplied by 255; within [0, 255] (what Pillow's
      ``convert("F")`` gives) kept; any other range is stretched min-max to 0-255.

    Pixels that fit no such range (32-bit integers beyond 65535, NaN, infinity) raise ``ValueError``.
    """
    if img.mode == "F":
        pixels = np.asarray(img, dtype=np.float64)
        if not np.isfinite(pixels).all():
            raise ValueError(f"cannot read image {path}: float pixels that are NaN or infinite")
        lo, hi = pixels.min(), pixels.max()
        if lo >= 0 and hi <= 1:
            pixels = pixels * 255
        elif lo < 0 or hi > 255:
            pixels = (pixels - lo) * (255 / (hi - lo) if hi > lo else 0)
    elif img.mode.startswith("I"):
        pixels = np.asarray(img, dtype=np.float64)
        lo, hi = pixels.min(), pixels.max()
        if lo < 0 or hi > 65535:
            raise ValueError(f"cannot read image {path}: {img.mode} pixels span {lo:.0f}..{hi:.0f}, beyond 16 bits "
                             f"(0..65535); save it with 8 or 16 bits per channel")
        pixels = pixels / 257
    else:
        return img
    return Image.fromarray(np.round(pixels).astype(np.uint8))  # 2-D uint8: mode "L"


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
