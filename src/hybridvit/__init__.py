"""hybridvit: hybrid convolution/transformer image classifiers (LeViT, CvT)."""

from .api import create_model
from .checkpoints import load_checkpoint, load_model, save_model
from .flops import count_macs, count_params
from .fusion import fuse
from .optimize import optimize, tune_cpu_allocator
from .publish import push_to_hub, save_for_hub
from .models import HybridClassifier
from .quantize import quantize_static
from .registry import get_model_info, list_models

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
