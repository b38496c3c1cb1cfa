"""Model families. Importing a family module registers its variants."""

from .._lazy import lazy_exports
from . import levit  # noqa: I001  (registration order: LeViT, then CvT)
from . import cvt
from . import graft
from .base import HybridClassifier
from .cvt import CvT, CvTConfig
from .features import FeatureExtractor
from .graft import GraftConfig, GraftedResNetDeiT
from .levit import LeViT, LeViTConfig

# timm's FeatureInfo, imported when asked for (timm costs seconds to import)
__getattr__, __dir__ = lazy_exports(__name__, {"FeatureInfo": "features"})

__all__ = ["CvT", "CvTConfig", "FeatureExtractor", "FeatureInfo", "GraftConfig", "GraftedResNetDeiT", "HybridClassifier",
           "LeViT", "LeViTConfig", "cvt", "graft", "levit"]
