"""Data: datasets (image folders, digits), preprocessing transforms."""

from .datasets import DataError, Datasets, build_datasets, collate_skipping_bad
from .transforms import eval_transform, example_image, load_image, train_transform

__all__ = ["DataError", "Datasets", "build_datasets", "collate_skipping_bad", "eval_transform", "example_image",
           "load_image", "train_transform"]
