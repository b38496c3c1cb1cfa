"""Model families. Importing a family module registers its variants."""

from . import levit
from .base import HybridClassifier
from .levit import LeViT, LeViTConfig

__all__ = ["HybridClassifier", "LeViT", "LeViTConfig", "levit"]
