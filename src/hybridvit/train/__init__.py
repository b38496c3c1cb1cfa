"""Training and evaluation (the papers' recipes, distillation, DDP, resumable runs)."""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

# imported on first use: the CLI reads TrainConfig's options without loading torch and timm
__getattr__, __dir__ = lazy_exports(__name__, {
    "RECIPES": "config", "TrainConfig": "config", "TrainingError": "engine", "train": "engine",
    "evaluate": "evaluation", "DistillationLoss": "losses"})

if TYPE_CHECKING:
    from .config import RECIPES, TrainConfig
    from .engine import TrainingError, train
    from .evaluation import evaluate
    from .losses import DistillationLoss

__all__ = ["RECIPES", "DistillationLoss", "TrainConfig", "TrainingError", "evaluate", "train"]
