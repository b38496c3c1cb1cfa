"""Data: datasets (image folders, digits), preprocessing transforms, training augmentation.

``train_transform`` is imported on first use: it needs timm, which inference does not.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from .datasets import DataError, Datasets, build_datasets, collate_skipping_bad
from .labels import imagenet_labels
from .transforms import eval_geometry, eval_transform, example_image, load_image, to_rgb

__all__ = ["DataError", "Datasets", "build_datasets", "collate_skipping_bad", "eval_geometry", "eval_transform",
           "example_image", "imagenet_labels", "load_image", "to_rgb", "train_transform"]

__getattr__, __dir__ = lazy_exports(__name__, {"train_transform": "augment"})

if TYPE_CHECKING:
    from .augment import train_transform
