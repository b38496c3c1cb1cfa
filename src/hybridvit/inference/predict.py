"""Top-k predictions (and embeddings) for images with a trained model and its own preprocessing,
from one image to whole collections (``Predictor.predict_images``; ``hybridvit predict``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from ..api import load_source
from ..checks import check_range
from ..data import eval_geometry, imagenet_labels, load_image, to_rgb
from ..layers import AttentionView, attention_view, capture_maps
from ..registry import get_model_info
from .machine import torch_threads
from .optimize import InferenceModel, optimize
from .pipeline import Pipeline, Prediction, default_splits
from .quantize import CalibrationSet, calibration_set

__all__ = ["Prediction", "Predictor"]


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
        self.in_chans, self.num_classes = net.in_chans, net.num_classes
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


FILE_SUFFIXES = (".onnx", ".pte", ".tflite")  # files export and quantize write, run as they are


class FileModel:
    """A file ``export`` or ``quantize`` wrote, in its own runtime: ONNX (static int8 included) in
    ONNX Runtime, ExecuTorch programs in ExecuTorch, LiteRT programs in LiteRT. ONNX and ExecuTorch
    files take normalised float images, so the uint8 pixels are normalised here first; a LiteRT
    program normalises them itself and gives probabilities, returned as their logarithms (the
    softmax of which gives them back)."""

    def __init__(self, path: Path, scale: torch.Tensor, shift: torch.Tensor) -> None:
        self.suffix, self.scale, self.shift = path.suffix.lower(), scale, shift
        if self.suffix == ".onnx":
            from .runners import OnnxRuntimeRunner, onnxruntime_available

            if not onnxruntime_available():
                raise ImportError(f"{path}: running an ONNX file needs onnxruntime: pip install hybridvit[export]")
            self.precision, self.backend = "onnx-file", "onnxruntime"
            self.runner: Callable[[torch.Tensor], torch.Tensor] = OnnxRuntimeRunner(path.read_bytes())
            return
        from .edge import ProgramRunner, require

        format = "executorch" if self.suffix == ".pte" else "litert"
        require(format, run=True)
        self.precision, self.backend = f"{format}-file", format
        self.runner = ProgramRunner(path.read_bytes(), format, torch.get_num_threads())

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.suffix == ".tflite":
            return self.runner(pixels.float()).clamp_min(1e-30).log()
        return self.runner((pixels.float() * self.scale - self.shift).contiguous())


class Predictor:
    """Loads a model once (anything ``load_source`` accepts, or an ``.onnx`` file in a model or run
    folder, such as the static int8 file ``hybridvit quantize`` writes) and predicts images with
    its own preprocessing on the fastest path here (``precision``/``backend`` as ``optimize`` takes them).

    ``exif``: turn photos as their EXIF orientation says, as a viewer shows them (training reads
    pixels as stored). ``fast_decode``: let large JPEGs decode at 1/2-1/8 scale in the DCT domain,
    keeping twice the resize target; off by default, since it changes answers (docs/benchmarks.md).
    ``decode_workers``/``model_threads`` fix how the cores are shared; by default both ways are
    timed on the first batches of the first run long enough to tell, and later runs keep the faster.
    ``calibration``/``validation``: image folders (ImageNet layout: their train and val splits) for
    int8, read with the first model built: static int8 is calibrated on the first; with ``auto``,
    int8 is weighed only given the second, on which its top-1 must agree with fp32's (``optimize``).
    A multi-label model (trained with ``--multi-label``) gives each class a sigmoid; a row lists the
    most probable classes that reach ``threshold`` (default: the one it was trained with).
    """

    def __init__(self, checkpoint: str | Path, precision: str = "auto", pretrained: bool = False,
                 pretrained_tag: str | None = None, *, backend: str = "auto", batch_size: int = 16,
                 embeddings: bool = False, exif: bool = True, fast_decode: bool = False,
                 decode_workers: int | None = None, model_threads: int | None = None,
                 calibration: str | Path | None = None, validation: str | Path | None = None,
                 threshold: float | None = None) -> None:
        check_range("batch size", batch_size, 1)
        check_range("threshold", threshold, 0, 1, low_open=True, high_open=True)
        self.model_file = Path(checkpoint) if str(checkpoint).lower().endswith(FILE_SUFFIXES) else None
        if self.model_file is not None:  # e.g. MODEL/levit_128s_int8.onnx: the folder holds the preprocessing
            kind = {".onnx": "an ONNX file", ".pte": "an ExecuTorch program", ".tflite": "a LiteRT program"}[
                self.model_file.suffix.lower()]
            runtime = {".onnx": "onnxruntime", ".pte": "executorch", ".tflite": "litert"}[self.model_file.suffix.lower()]
            if embeddings:
                raise ValueError(f"{checkpoint}: {kind} gives class scores only; --embeddings needs the model folder")
            if calibration is not None or validation is not None:
                raise ValueError(f"{checkpoint}: {kind} runs as it was written; --calibration and --validation "
                                 "need the model folder")
            if precision != "auto" or backend not in ("auto", runtime):
                raise ValueError(f"{checkpoint}: {kind} runs as it was written, in its own runtime; --precision "
                                 f"{precision} --backend {backend} need the model folder (or leave both at auto)")
            if not self.model_file.is_file():
                raise FileNotFoundError(f"no such file: {checkpoint}")
            checkpoint = self.model_file.parent
        else:
            _check_int8_folders(precision, calibration, validation)
        self.calibration, self.validation = calibration, validation
        self._int8_images: dict[str, CalibrationSet | None] | None = None  # read with the first model built
        model, extra = load_source(checkpoint, pretrained, pretrained_tag)
        if model.model_name is None:
            raise ValueError(f"{checkpoint}: unknown model variant, cannot pick its preprocessing")
        info = get_model_info(model.model_name)
        size = model.input_hw  # training builds the model at its training size
        geometry = eval_geometry(info, size, crop_pct=extra.get("crop_pct"))
        # fast_decode: the decoder keeps at least twice the resize target, so the resize still filters
        self.preprocess = Preprocess(geometry, size, exif, 2 * geometry.transforms[0].size if fast_decode else None)
        imagenet = imagenet_labels(model.num_classes)
        self.classes: list[str] = (extra.get("class_names") or extra.get("classes")
                                   or (imagenet[1] if imagenet else None) or [str(i) for i in range(model.num_classes)])
        self.multi_label = bool(extra.get("multi_label"))
        if threshold is not None and not self.multi_label:
            raise ValueError(f"{checkpoint} is a single-label model (softmax over its classes): --threshold is for "
                             "models trained with --multi-label")
        self.threshold: float | None = (threshold or extra.get("threshold", 0.5)) if self.multi_label else None
        self.embedding_dim: int | None = None
        self.model_name: str = model.model_name
        resize = geometry.transforms[0]
        self.preprocessing = {"resize_short_side": resize.size, "interpolation": resize.interpolation.value,
                              "center_crop": list(size), "mean": list(info.mean), "std": list(info.std),
                              "exif_orientation": exif}
        self._deployed = Deployed(model, info.mean, info.std, size, embeddings)
        if embeddings:
            with torch.inference_mode():
                probe = self._deployed(torch.zeros(1, model.in_chans, *size))
            self.embedding_dim = probe.shape[1] - model.num_classes
        self.precision, self.backend, self.batch_size = precision, backend, batch_size
        self.splits = default_splits(torch.get_num_threads(), decode_workers, model_threads)
        self._models: dict[tuple[int, int], InferenceModel | FileModel] = {}  # (threads, lane)
        self.build_seconds = 0.0  # spent building (and with "auto", measuring) models
        self.last_run: Pipeline | None = None

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

    def _build(self, threads: int) -> InferenceModel | FileModel:
        """A model for ``threads`` threads (PyTorch's count now): a path built before, where one serves it."""
        if self.model_file is not None:
            return FileModel(self.model_file, self._deployed.scale, self._deployed.shift)
        taken = [m for (t, _), m in self._models.items() if t == threads or self.precision != "auto"]
        if taken:
            return taken[0].rebuilt()
        if self._int8_images is None:
            def pixels(image: Image.Image) -> torch.Tensor:  # what the deployed model takes: raw 0-255 pixels
                return torch.tensor(self.preprocess(image), dtype=torch.float32)

            self._int8_images = {
                name: None if folder is None else calibration_set(folder, self._deployed, split=split, transform=pixels)
                for name, folder, split in (("calibration", self.calibration, "train"),
                                            ("validation", self.validation, "val"))}
        example = torch.zeros(self.batch_size, self._deployed.in_chans, *self.preprocess.size)
        return optimize(self._deployed, self.precision, example, self.backend, **self._int8_images)

    @property
    def path_used(self) -> str:
        """``precision/backend`` of the model the last run used ('' before one is built)."""
        split = self.last_run.split if self.last_run else self.splits[0]
        model = self._models.get((split.model_threads, 0))
        return f"{model.precision}/{model.backend}" if model is not None else ""

    def predict_images(self, images: Iterable[str | Path | Image.Image], k: int = 5) -> Iterator[Prediction]:
        """Rows for ``images`` (paths or PIL images) in their order, as they are ready. An image
        that cannot be read gives a row with ``error`` set; the run goes on."""
        check_range("top", k, 1)
        pipeline = Pipeline(self.preprocess, self.model_for, self.classes, k, self.batch_size, self.splits,
                            threshold=self.threshold)
        self.last_run = pipeline
        with torch_threads(None):  # model lanes set their own thread count: give the caller's back
            yield from pipeline.run(str(i) if isinstance(i, Path) else i for i in images)
        if pipeline.measured:  # measured once: later runs of this predictor take that split at once
            self.splits = [pipeline.split]

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


def _check_int8_folders(precision: str, calibration: str | Path | None, validation: str | Path | None) -> None:
    """Refuse, before any work, an image folder that is not there or that ``precision`` would not read."""
    for option, folder, precisions in (("calibration", calibration, ("auto", "int8-static")),
                                       ("validation", validation, ("auto", "int8", "int8-static"))):
        if folder is None:
            continue
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--{option} {folder} is not a folder of images")
        if precision not in precisions:
            raise ValueError(f"--{option} is for --precision {', '.join(precisions)}; got {precision}")
    if precision == "int8-static" and calibration is None:
        raise ValueError("--precision int8-static needs --calibration: a folder of images to calibrate on")
    if precision == "auto" and calibration is not None and validation is None:
        raise ValueError("--calibration with --precision auto needs --validation: int8 is weighed only where its "
                         "top-1 agreement with fp32 is measured")
