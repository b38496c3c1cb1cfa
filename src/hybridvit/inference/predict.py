"""Top-k predictions (and embeddings) for images with a trained model and its own preprocessing,
from one image to whole collections (``Predictor.predict_images``; ``hybridvit predict``)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..api import load_source
from ..checks import check_range
from ..data import eval_geometry, imagenet_labels, load_image, to_rgb
from ..registry import get_model_info
from .machine import torch_threads
from .optimize import InferenceModel, optimize
from .pipeline import Pipeline, Prediction, default_splits

__all__ = ["Prediction", "Predictor"]


@dataclass(frozen=True)
class Preprocess:
    """A path or PIL image to the model's uint8 ``(3, H, W)`` input: the evaluation resize and
    crop, without the normalisation (the deployed model does it, inside its graph)."""

    geometry: object  # eval_geometry(...)
    size: tuple[int, int]
    exif: bool = True
    draft: int | None = None  # JPEG: decode at 1/2, 1/4 or 1/8 scale while the short side stays >= this

    def __call__(self, item: str | Path | Image.Image) -> np.ndarray:
        if isinstance(item, Image.Image):
            img = to_rgb(item)
        else:
            img = load_image(item, exif=self.exif, draft=None if self.draft is None else (self.draft, self.draft))
        return np.asarray(self.geometry(img)).transpose(2, 0, 1)


class Deployed(nn.Module):
    """The classifier as ``predict`` runs it: raw 0-255 pixels in, normalised inside the graph
    (where the runtime does it in one pass), logits out, with the pooled features before the
    classifier beside them when ``embeddings`` is set."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], input_hw: tuple[int, int],
                 embeddings: bool = False) -> None:
        super().__init__()
        self.net, self.embeddings, self._input_hw = net, embeddings, tuple(input_hw)
        self.register_buffer("scale", 1 / (255 * torch.tensor(std).view(1, -1, 1, 1)))
        self.register_buffer("shift", torch.tensor(mean).view(1, -1, 1, 1) / torch.tensor(std).view(1, -1, 1, 1))
        self.in_chans = net.in_chans
        self.model_name = net.model_name
        self.cpu_graph_rewrite = getattr(net, "cpu_graph_rewrite", False)

    @property
    def input_hw(self) -> tuple[int, int]:
        return self._input_hw

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.net.forward_features(pixels * self.scale - self.shift)
        logits = self.net.forward_head(features)
        if not self.embeddings:
            return logits
        return torch.cat([logits, self.net.forward_head(features, pre_logits=True)], dim=1)


class Predictor:
    """Loads a model once (anything ``load_source`` accepts) and predicts images with its own
    preprocessing on the fastest path here (``precision``/``backend`` as ``optimize`` takes them).

    ``exif``: turn photos as their EXIF orientation says, as a viewer shows them (training reads
    pixels as stored). ``fast_decode``: let JPEGs decode at a reduced scale in the DCT domain
    where the resize shrinks them anyway. ``decode_workers``/``model_threads`` fix how the cores
    are shared; by default both ways are timed on the first batches of each run.
    """

    def __init__(self, checkpoint: str | Path, precision: str = "auto", pretrained: bool = False,
                 pretrained_tag: str | None = None, *, backend: str = "auto", batch_size: int = 16,
                 embeddings: bool = False, exif: bool = True, fast_decode: bool = False,
                 decode_workers: int | None = None, model_threads: int | None = None) -> None:
        check_range("batch size", batch_size, 1)
        model, extra = load_source(checkpoint, pretrained, pretrained_tag)
        if model.model_name is None:
            raise ValueError(f"{checkpoint}: unknown model variant, cannot pick its preprocessing")
        info = get_model_info(model.model_name)
        size = model.input_hw  # training builds the model at its training size
        geometry = eval_geometry(info, size, crop_pct=extra.get("crop_pct"))
        self.preprocess = Preprocess(geometry, size, exif, geometry.transforms[0].size if fast_decode else None)
        imagenet = imagenet_labels(model.num_classes)
        self.classes: list[str] = (extra.get("class_names") or extra.get("classes")
                                   or (imagenet[1] if imagenet else None) or [str(i) for i in range(model.num_classes)])
        self.embedding_dim: int | None = None
        self._deployed = Deployed(model, info.mean, info.std, size, embeddings)
        if embeddings:
            with torch.inference_mode():
                probe = self._deployed(torch.zeros(1, model.in_chans, *size))
            self.embedding_dim = probe.shape[1] - model.num_classes
        self.precision, self.backend, self.batch_size = precision, backend, batch_size
        self.splits = default_splits(torch.get_num_threads(), decode_workers, model_threads)
        self._models: dict[int, InferenceModel] = {}
        self.build_seconds = 0.0  # spent building (and with "auto", measuring) models
        self.last_run: Pipeline | None = None

    def model_for(self, threads: int) -> InferenceModel:
        """The optimized model for calls on ``threads`` threads, built on first use."""
        if threads not in self._models:
            start = time.perf_counter()
            example = torch.zeros(self.batch_size, self._deployed.in_chans, *self.preprocess.size)
            with torch_threads(threads):
                self._models[threads] = optimize(self._deployed, self.precision, example, self.backend)
            self.build_seconds += time.perf_counter() - start
        return self._models[threads]

    @property
    def path_used(self) -> str:
        """``precision/backend`` of the model the last run used ('' before one is built)."""
        split = self.last_run.split if self.last_run else self.splits[0]
        model = self._models.get(split.model_threads)
        return f"{model.precision}/{model.backend}" if model is not None else ""

    def predict_images(self, images: Iterable[str | Path | Image.Image], k: int = 5) -> Iterator[Prediction]:
        """Rows for ``images`` (paths or PIL images) in their order, as they are ready. An image
        that cannot be read gives a row with ``error`` set; the run goes on."""
        check_range("top", k, 1)
        pipeline = Pipeline(self.preprocess, self.model_for, self.classes, k, self.batch_size, self.splits)
        self.last_run = pipeline
        with torch_threads(None):  # model lanes set their own thread count: give the caller's back
            yield from pipeline.run(str(i) if isinstance(i, Path) else i for i in images)

    def predict(self, paths: list[str | Path], k: int = 5) -> list[Prediction]:
        """Rows for a few images; raises ``ValueError`` naming the file for anything Pillow cannot read."""
        rows = list(self.predict_images(paths, k))
        for row in rows:
            if row.error is not None:
                raise ValueError(row.error)
        return rows
