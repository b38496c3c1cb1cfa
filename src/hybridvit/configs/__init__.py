"""The registered variants of each family: configs, paper figures and published weights, without torch.

Importing this package registers them, LeViT first, then CvT, then the grafting experiment's model.
"""

from . import levit  # noqa: I001  (registration order)
from . import cvt
from . import graft
from .cvt import CvTConfig
from .graft import GraftConfig
from .levit import LeViTConfig

__all__ = ["CvTConfig", "GraftConfig", "LeViTConfig", "cvt", "graft", "levit"]
