"""Data: datasets (image folders, digits), preprocessing transforms."""

from .datasets import DataError, Datasets, build_datasets, collate_skipping_bad
from .labels import imagenet_labels
from .transforms import eval_geometry, eval_transform, example_image, load_image, to_rgb, train_transform

__all__ = ["DataError", "Datasets", "build_datasets", "collate_skipping_bad", "eval_geometry", "eval_transform",
           "example_image", "imagenet_labels", "load_image", "to_rgb", "train_transform"]
