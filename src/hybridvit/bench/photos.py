"""ImageNet-like JPEGs for end-to-end benchmarks and decoding tests, made offline: random crops of
scikit-learn's two bundled photos at ImageNet's typical 500x375 and 375x500, quality 90."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def make_photos(folder: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` JPEGs at 500x375 or 375x500 (quality 90); reused when already there."""
    from sklearn.datasets import load_sample_images

    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"{i:06d}.jpg") for i in range(count)]
    if all(os.path.exists(p) for p in paths):
        return paths
    rng = np.random.default_rng(seed)
    sources = [Image.fromarray(img).resize((800, 534), Image.BICUBIC) for img in load_sample_images().images]
    for i, path in enumerate(paths):
        src = sources[i % len(sources)]
        w, h = (500, 375) if i % 2 else (375, 500)
        x, y = int(rng.integers(0, src.width - w + 1)), int(rng.integers(0, src.height - h + 1))
        crop = src.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        gain = rng.uniform(0.7, 1.3, 3)
        pixels = np.clip(np.asarray(crop, dtype=np.float32) * gain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    return paths
