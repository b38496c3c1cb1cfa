"""Model families. Importing a family module registers its variants."""

from . import levit  # noqa: I001  (registration order: LeViT, then CvT)
from . import cvt
from . import graft
from .base import HybridClassifier
from .cvt import CvT, CvTConfig
from .features import FeatureExtractor, FeatureInfo
from .graft import GraftConfig, GraftedResNetDeiT
from .levit import LeViT, LeViTConfig

__all__ = ["CvT", "CvTConfig", "FeatureExtractor", "FeatureInfo", "GraftConfig", "GraftedResNetDeiT", "HybridClassifier",
           "LeViT", "LeViTConfig", "cvt", "graft", "levit"]
