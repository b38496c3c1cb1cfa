"""Checkpoint formats: safe reading, detection, per-format converters, hybridvit's own format."""

from . import cvt as _cvt  # noqa: F401  (registers the CvT formats)
from . import levit as _levit  # noqa: F401  (registers the LeViT formats)
from .errors import CheckpointError, HubUnreachableError
from .formats import detect_format, load_checkpoint, load_state_dict
from .hub import download_hub_folder, download_pretrained, download_weights
from .io import read_checkpoint
from .native import load_model, load_trained, read_extra, save_model

__all__ = [
    "CheckpointError",
    "HubUnreachableError",
    "detect_format",
    "download_hub_folder",
    "download_pretrained",
    "download_weights",
    "load_checkpoint",
    "load_model",
    "load_state_dict",
    "load_trained",
    "read_checkpoint",
    "read_extra",
    "save_model",
]
