"""Data: preprocessing transforms (datasets arrive with training)."""

from .transforms import eval_transform, example_image, load_image

__all__ = ["eval_transform", "example_image", "load_image"]
