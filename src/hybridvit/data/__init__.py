"""Data: datasets (image folders, manifests, Hugging Face datasets, WebDataset shards, digits),
preprocessing transforms, training augmentation.

``train_transform`` is imported on first use: it needs timm, which inference does not.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from .datasets import DataError, Datasets, collate_skipping_bad
from .sources import DataSpec, build_datasets, is_digits
from .labels import imagenet_labels
from .transforms import eval_geometry, eval_transform, example_image, load_image, to_rgb

__all__ = ["DataError", "DataSpec", "Datasets", "build_datasets", "is_digits", "collate_skipping_bad", "eval_geometry", "eval_transform",
           "example_image", "imagenet_labels", "load_image", "to_rgb", "train_transform"]

__getattr__, __dir__ = lazy_exports(__name__, {"train_transform": "augment"})

if TYPE_CHECKING:
    from .augment import train_transform
