"""Model families. Importing a family module registers its variants."""

from . import levit  # noqa: I001  (registration order: LeViT, then CvT)
from . import cvt
from .base import HybridClassifier
from .cvt import CvT, CvTConfig
from .levit import LeViT, LeViTConfig

__all__ = ["CvT", "CvTConfig", "HybridClassifier", "LeViT", "LeViTConfig", "cvt", "levit"]
