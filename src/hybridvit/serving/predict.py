"""Top-k predictions (and embeddings) for images with a trained model and its own preprocessing,
from one image to whole collections (``Predictor.predict_images``; ``hybridvit predict``)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..api import load_source
from ..checks import check_range
from ..data import eval_geometry, imagenet_labels, load_image, to_rgb
from ..inference.deployed import Deployed, FileModel
from ..inference.machine import torch_threads
from ..inference.optimize import InferenceModel, optimize
from ..inference.quantize import CalibrationSet, calibration_set
from ..inference.spec import InferenceSpec
from ..layers import AttentionView, attention_view, capture_maps
from ..registry import get_model_info
from .pipeline import Pipeline, Prediction, Split, default_splits

__all__ = ["InferenceSpec", "Prediction", "PredictionRun", "Predictor"]


@dataclass(frozen=True)
class Preprocess:
    """A path or PIL image to the model's uint8 ``(3, H, W)`` input: the evaluation resize and
    crop, without the normalisation (the deployed model does it, inside its graph)."""

    geometry: object  # eval_geometry(...)
    size: tuple[int, int]
    exif: bool = True
    draft: int | None = None  # JPEG: decode at 1/2, 1/4 or 1/8 scale while both sides stay >= this

    def __call__(self, item: str | Path | Image.Image) -> np.ndarray:
        if isinstance(item, Image.Image):  # an opened file keeps its EXIF: turned as a path would be
            img = to_rgb(ImageOps.exif_transpose(item) if self.exif else item)
        else:
            img = load_image(item, exif=self.exif, draft=None if self.draft is None else (self.draft, self.draft))
        return np.asarray(self.geometry(img)).transpose(2, 0, 1)


class PredictionRun:
    """One run of a ``Predictor`` over images: iterate it for the rows, in the images' order, as
    they are ready; once iterated, it holds what the run measured."""

    def __init__(self, predictor: Predictor, images: Iterable[str | Path | Image.Image], k: int) -> None:
        self._predictor, self._images = predictor, images
        self._pipeline = Pipeline(predictor.preprocess, predictor.model_for, predictor.classes, k,
                                  predictor.spec.batch_size, predictor.splits, threshold=predictor.threshold)
        self.images = 0
        self.build_seconds = 0.0  # spent building (and with "auto", measuring) models during the run
        self.path_used = ""  # precision/backend of the model the run used
        self.reason = ""  # with precision auto: why that path (``InferenceModel.reason``)

    @property
    def split(self) -> Split:
        """How the cores were shared: the one given, or the fastest measured on the first batches."""
        return self._pipeline.split

    @property
    def measured(self) -> dict[str, float]:
        """images/s of each way of sharing the cores that was timed (empty if none was)."""
        return self._pipeline.measured

    def __iter__(self) -> Iterator[Prediction]:
        predictor, built = self._predictor, self._predictor.build_seconds
        try:
            with torch_threads(None):  # model lanes set their own thread count: give the caller's back
                for row in self._pipeline.run(str(i) if isinstance(i, Path) else i for i in self._images):
                    self.images += 1
                    yield row
        finally:
            self.build_seconds = predictor.build_seconds - built
            model = predictor.built(self.split.model_threads)
            self.path_used = f"{model.precision}/{model.backend}" if model is not None else ""
            self.reason = getattr(model, "reason", "")
        if self._pipeline.measured:  # measured once: later runs of this predictor take that split at once
            predictor.splits = [self._pipeline.split]


class Predictor:
    """Loads a model once, as ``spec`` says (an ``InferenceSpec``, or just its source), and
    predicts images with its own preprocessing on the fastest path here (``optimize``).

    A multi-label model (trained with ``--multi-label``) gives each class a sigmoid; a row lists
    the most probable classes that reach the threshold (default: the one it was trained with).
    The int8 image folders are read with the first model built. Cores: by default both ways of
    sharing them between decoding and the model are timed on the first batches of the first run
    long enough to tell, and later runs keep the faster.
    """

    def __init__(self, spec: InferenceSpec | str | Path) -> None:
        self.spec = spec if isinstance(spec, InferenceSpec) else InferenceSpec(str(spec))
        spec = self.spec
        source: str | Path = spec.source
        if spec.model_file is not None:  # e.g. MODEL/levit_128s_int8.onnx: the folder holds the preprocessing
            if not spec.model_file.is_file():
                raise FileNotFoundError(f"no such file: {spec.source}")
            source = spec.model_file.parent
        self._int8_images: dict[str, CalibrationSet | None] | None = None  # read with the first model built
        model, extra = load_source(source, spec.pretrained, spec.pretrained_tag)
        if model.model_name is None:
            raise ValueError(f"{spec.source}: unknown model variant, cannot pick its preprocessing")
        info = get_model_info(model.model_name)
        size = model.input_hw  # training builds the model at its training size
        geometry = eval_geometry(info, size, crop_pct=extra.get("crop_pct"))
        # fast_decode: the decoder keeps at least twice the resize target, so the resize still filters
        self.preprocess = Preprocess(geometry, size, spec.exif,
                                     2 * geometry.transforms[0].size if spec.fast_decode else None)
        imagenet = imagenet_labels(model.num_classes)
        self.classes: list[str] = (extra.get("class_names") or extra.get("classes")
                                   or (imagenet[1] if imagenet else None) or [str(i) for i in range(model.num_classes)])
        self.multi_label = bool(extra.get("multi_label"))
        if spec.threshold is not None and not self.multi_label:
            raise ValueError(f"{spec.source} is a single-label model (softmax over its classes): --threshold is for "
                             "models trained with --multi-label")
        self.threshold: float | None = (spec.threshold or extra.get("threshold", 0.5)) if self.multi_label else None
        self.embedding_dim: int | None = None
        self.model_name: str = model.model_name
        resize = geometry.transforms[0]
        self.preprocessing = {"resize_short_side": resize.size, "interpolation": resize.interpolation.value,
                              "center_crop": list(size), "mean": list(info.mean), "std": list(info.std),
                              "exif_orientation": spec.exif}
        self._deployed = Deployed(model, info.mean, info.std, size, spec.embeddings)
        if spec.embeddings:
            with torch.inference_mode():
                probe = self._deployed(torch.zeros(1, model.in_chans, *size))
            self.embedding_dim = probe.shape[1] - model.num_classes
        self.splits = default_splits(torch.get_num_threads(), spec.decode_workers, spec.model_threads)
        self._models: dict[tuple[int, int], InferenceModel | FileModel] = {}  # (threads, lane)
        self.build_seconds = 0.0  # spent building (and with "auto", measuring) models, all runs together

    def model_for(self, threads: int, lane: int = 0) -> InferenceModel | FileModel:
        """The optimized model for calls on ``threads`` threads, built on first use. ``auto``
        measures at each thread count (the fastest path depends on it); other precisions build
        their path once, and later models capture it again for their thread count (``rebuilt``:
        static int8 is not calibrated again). Lanes after the first get their own copy of a model
        in OpenVINO (NNCF's int8 runs there too), on the path the first one took: one compiled
        model runs one call at a time (its one stream), so lanes sharing one did not overlap (656
        against 1,112 images/s for two one-thread lanes, docs/benchmarks.md)."""
        if lane > 0 and self.model_for(threads).backend not in ("openvino", "nncf"):
            return self.model_for(threads)  # ONNX Runtime sessions and TorchScript graphs run calls at once
        if (threads, lane) not in self._models:
            start = time.perf_counter()
            with torch_threads(threads):
                self._models[threads, lane] = self._build(threads)
            self.build_seconds += time.perf_counter() - start
        return self._models[threads, lane]

    def built(self, threads: int) -> InferenceModel | FileModel | None:
        """The first lane's model for ``threads`` threads, if one was built."""
        return self._models.get((threads, 0))

    def _build(self, threads: int) -> InferenceModel | FileModel:
        """A model for ``threads`` threads (PyTorch's count now): a path built before, where one serves it."""
        spec = self.spec
        if spec.model_file is not None:
            return FileModel(spec.model_file, self._deployed.scale, self._deployed.shift)
        taken = [m for (t, _), m in self._models.items() if t == threads or spec.precision != "auto"]
        if taken:
            return taken[0].rebuilt()
        if self._int8_images is None:
            def pixels(image: Image.Image) -> torch.Tensor:  # what the deployed model takes: raw 0-255 pixels
                return torch.tensor(self.preprocess(image), dtype=torch.float32)

            self._int8_images = {
                name: None if folder is None else calibration_set(folder, self._deployed, split=split, transform=pixels)
                for name, folder, split in (("calibration", spec.calibration, "train"),
                                            ("validation", spec.validation, "val"))}
        example = torch.zeros(spec.batch_size, self._deployed.in_chans, *self.preprocess.size)
        return optimize(self._deployed, spec.precision, example, spec.backend, **self._int8_images)

    def predict_images(self, images: Iterable[str | Path | Image.Image], k: int = 5) -> PredictionRun:
        """A run over ``images`` (paths or PIL images): iterate it for their rows, in their order,
        as they are ready. An image that cannot be read gives a row with ``error`` set; the run
        goes on."""
        check_range("top", k, 1)
        return PredictionRun(self, images, k)

    def attention(self, image: np.ndarray, query: tuple[float, float], layer: int = -1) -> AttentionView:
        """Where each head of attention call ``layer`` looks from ``query`` ((y, x) in input pixels)
        for one image as ``preprocess`` gives it: the capture ``hybridvit plot attention`` draws,
        on the eager float32 model (an optimized graph records no maps)."""
        x = torch.tensor(image).unsqueeze(0).float()
        return attention_view(capture_maps(self._deployed.eval(), x), layer, query, self.preprocess.size)

    def predict(self, paths: list[str | Path], k: int = 5) -> list[Prediction]:
        """Rows for a few images; raises ``ValueError`` naming the file for anything Pillow cannot read."""
        rows = list(self.predict_images(paths, k))
        for row in rows:
            if row.error is not None:
                raise ValueError(row.error)
        return rows
