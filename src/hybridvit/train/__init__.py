"""Training and evaluation (the papers' recipes, distillation, DDP, resumable runs)."""

from .config import RECIPES, TrainConfig
from .engine import TrainingError, train
from .evaluation import evaluate
from .losses import DistillationLoss

__all__ = ["RECIPES", "DistillationLoss", "TrainConfig", "TrainingError", "evaluate", "train"]
