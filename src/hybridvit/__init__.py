"""hybridvit: hybrid convolution/transformer image classifiers (LeViT, CvT).

The public names are imported on first use: ``import hybridvit`` stays cheap, so the command
line starts without first paying seconds for torch, timm and torchvision.
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

__all__ = [
    "HybridClassifier",
    "count_macs",
    "count_params",
    "create_model",
    "fuse",
    "get_model_info",
    "list_models",
    "load_checkpoint",
    "load_model",
    "optimize",
    "push_to_hub",
    "quantize_static",
    "tune_cpu_allocator",
    "save_for_hub",
    "save_model",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    "HybridClassifier": "models", "count_macs": "flops", "count_params": "flops", "create_model": "api",
    "fuse": "fusion", "get_model_info": "registry", "list_models": "registry", "load_checkpoint": "checkpoints",
    "load_model": "checkpoints", "optimize": "inference.optimize", "push_to_hub": "publish",
    "quantize_static": "inference.quantize", "save_for_hub": "publish", "save_model": "checkpoints",
    "tune_cpu_allocator": "allocator"})

if TYPE_CHECKING:  # what static checkers and IDEs see
    from .api import create_model
    from .checkpoints import load_checkpoint, load_model, save_model
    from .flops import count_macs, count_params
    from .fusion import fuse
    from .models import HybridClassifier
    from .allocator import tune_cpu_allocator
    from .inference.optimize import optimize
    from .publish import push_to_hub, save_for_hub
    from .inference.quantize import quantize_static
    from .registry import get_model_info, list_models
