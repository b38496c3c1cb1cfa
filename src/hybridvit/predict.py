"""Top-k predictions for image files with a trained model and its own preprocessing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .api import load_source
from .checks import check_range
from .data import eval_transform, imagenet_labels, load_image
from .optimize import optimize
from .registry import get_model_info


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class name, probability), best first


class Predictor:
    """Loads a model once (anything ``load_source`` accepts); ``predict`` accepts any image files."""

    def __init__(self, checkpoint: str | Path, precision: str = "fp32", pretrained: bool = False,
                 pretrained_tag: str | None = None) -> None:
        model, extra = load_source(checkpoint, pretrained, pretrained_tag)
        if model.model_name is None:
            raise ValueError(f"{checkpoint}: unknown model variant, cannot pick its preprocessing")
        info = get_model_info(model.model_name)
        size = model.input_hw  # training builds the model at its training size
        self.transform = eval_transform(info, size, crop_pct=extra.get("crop_pct"))
        imagenet = imagenet_labels(model.num_classes)
        self.classes = (extra.get("class_names") or extra.get("classes") or (imagenet[1] if imagenet else None)
                        or [str(i) for i in range(model.num_classes)])
        self.model = optimize(model, precision, torch.zeros(1, model.in_chans, *size))

    def predict(self, paths: list[str | Path], k: int = 5) -> list[Prediction]:
        """Raises ``ValueError`` naming the file for anything Pillow cannot read."""
        check_range("top", k, 1)
        batch = torch.stack([self.transform(load_image(p)) for p in paths])
        probs = self.model(batch).softmax(dim=-1)
        top = probs.topk(min(k, probs.shape[1]), dim=-1)
        return [Prediction(str(p), [(self.classes[i], v) for v, i in zip(vals.tolist(), idx.tolist())])
                for p, vals, idx in zip(paths, top.values, top.indices)]
