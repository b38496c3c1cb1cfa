"""Evaluation preprocessing as the papers specify it: resize, center crop, normalise."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError
from torchvision import transforms as T

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


def load_image(path: str | Path | BinaryIO, exif: bool = False, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open any image Pillow reads (a path or a binary file) as 8-bit RGB (grayscale, palette, CMYK
    and RGBA are converted).

    Pillow's own conversion clips wider pixels to 0-255, which turns a 16-bit image almost white
    and a float image almost black, so those are scaled to 8 bits first (``_to_8bit``). An
    animated image gives its first frame. ``exif``: turn the picture as its EXIF orientation
    says (as a viewer shows it); training reads pixels as stored, as timm and torchvision do.
    ``draft`` (width, height): let a JPEG decoder scale down by 1/2, 1/4 or 1/8 in the DCT
    domain while keeping at least this size (several times faster; not the same pixels).
    A path that is not a regular file (a named pipe, a device) is refused before it is opened:
    reading one may never end.
    """
    name = getattr(path, "name", path)
    try:
        if isinstance(path, (str, Path)):
            _check_regular(path)
        with Image.open(path) as img:
            if draft is not None and img.format == "JPEG":
                img.draft("RGB", draft if not exif else _stored_size(img, draft))
            rgb = to_rgb(img, name)
            return ImageOps.exif_transpose(rgb) if exif else rgb
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {name}: {e}") from e


SPECIAL_FILES = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                 (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def _check_regular(path: str | Path) -> None:
    """``OSError`` for a path (links followed) that is not a regular file, naming what it is."""
    mode = os.stat(path).st_mode
    for test, kind in SPECIAL_FILES:
        if test(mode):
            raise OSError(f"not a regular file ({kind})")


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
