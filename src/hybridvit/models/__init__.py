"""Model families: the networks (their variants are registered by ``hybridvit.configs``)."""

from .._lazy import lazy_exports
from . import cvt, graft, levit
from .base import HybridClassifier
from .cvt import CvT, CvTConfig
from .features import FeatureExtractor
from .graft import GraftConfig, GraftedResNetDeiT
from .levit import LeViT, LeViTConfig

# timm's FeatureInfo, imported when asked for (timm costs seconds to import)
__getattr__, __dir__ = lazy_exports(__name__, {"FeatureInfo": "features"})

__all__ = ["CvT", "CvTConfig", "FeatureExtractor", "FeatureInfo", "GraftConfig", "GraftedResNetDeiT", "HybridClassifier",
           "LeViT", "LeViTConfig", "cvt", "graft", "levit"]
