"""``InferenceSpec``: everything that decides how a model runs, in one typed value.

The command line builds it once from its options; ``Predictor`` takes it; Ray ships it to each
actor and replica, which build their model from it. A check that an option makes sense (ranges,
the int8 image folders, what an exported file can do) happens here, once, before any work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import KW_ONLY, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from ..checks import check_range


class _Choice(str, Enum):
    """A string option with fixed values: compares, hashes, prints and serialises as its value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Precision(_Choice):
    AUTO = "auto"  # the fastest path measured here (int8 too, given validation images)
    FP32 = "fp32"
    BF16 = "bf16"
    INT8 = "int8"  # dynamic: weights int8, activations quantized per call
    INT8_STATIC = "int8-static"  # calibrated on images


class Backend(_Choice):
    AUTO = "auto"
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"
    TORCHSCRIPT = "torchscript"
    NNCF = "nncf"  # NNCF's static int8, run in OpenVINO


# int8 (and an exported file) changes outputs: it counts as the same model when its top-1 class
# agrees with fp32's on at least this share of the validation images (optimize's gate, edge's check)
TOP1_AGREEMENT = 0.99

# files export and quantize write, run as they are in their own runtime
FILE_RUNTIMES = {".onnx": ("an ONNX file", "onnxruntime"), ".pte": ("an ExecuTorch program", "executorch"),
                 ".tflite": ("a LiteRT program", "litert")}
FILE_SUFFIXES = tuple(FILE_RUNTIMES)


@dataclass(frozen=True)
class InferenceSpec:
    """How to run one model. ``source``: anything ``load_source`` accepts, or an ``.onnx``,
    ``.pte`` or ``.tflite`` file in a model folder (which holds its preprocessing).

    ``batch_size``: the most images in one model call (a server's largest batch). ``exif``: turn
    photos as their EXIF orientation says. ``fast_decode``: large JPEGs decode at 1/2-1/8 scale
    (changes answers). ``decode_workers``/``model_threads``: how the cores are shared (None:
    measured). ``calibration``/``validation``: image folders for int8 (static int8 is calibrated
    on the first; ``auto`` weighs int8 only given the second). ``threshold``: multi-label models'
    probability from which a label is listed (None: the trained one).
    """

    source: str
    precision: Precision = Precision.AUTO
    _: KW_ONLY
    backend: Backend = Backend.AUTO
    batch_size: int = 16
    embeddings: bool = False
    exif: bool = True
    fast_decode: bool = False
    decode_workers: int | None = None
    model_threads: int | None = None
    calibration: str | None = None
    validation: str | None = None
    threshold: float | None = None
    pretrained: bool = False
    pretrained_tag: str | None = None

    def __post_init__(self) -> None:
        for name in ("source", "calibration", "validation"):  # paths travel as text (Ray, JSON)
            value = getattr(self, name)
            if isinstance(value, Path):
                object.__setattr__(self, name, str(value))
        for name, kind in (("precision", Precision), ("backend", Backend)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                raise ValueError(f"{name} must be one of {', '.join(k.value for k in kind)}; got {value!r}") from None
        check_range("batch size", self.batch_size, 1)
        check_range("decode workers", self.decode_workers, 1)
        check_range("model threads", self.model_threads, 1)
        check_range("threshold", self.threshold, 0, 1, low_open=True, high_open=True)
        if self.model_file is not None:
            self._check_file()
        else:
            self._check_int8_folders()

    @property
    def model_file(self) -> Path | None:
        """The exported file this spec runs, if it names one."""
        return Path(self.source) if self.source.lower().endswith(FILE_SUFFIXES) else None

    def replace(self, **changes: Any) -> InferenceSpec:
        return dataclasses.replace(self, **changes)

    def _check_file(self) -> None:
        kind, runtime = FILE_RUNTIMES[Path(self.source).suffix.lower()]
        if self.embeddings:
            raise ValueError(f"{self.source}: {kind} gives class scores only; --embeddings needs the model folder")
        if self.calibration is not None or self.validation is not None:
            raise ValueError(f"{self.source}: {kind} runs as it was written; --calibration and --validation "
                             "need the model folder")
        if self.precision != Precision.AUTO or self.backend not in (Backend.AUTO, runtime):
            raise ValueError(f"{self.source}: {kind} runs as it was written, in its own runtime; --precision "
                             f"{self.precision} --backend {self.backend} need the model folder (or leave both at auto)")

    def _check_int8_folders(self) -> None:
        """Refuse an image folder that is not there or that the precision would not read."""
        for option, folder, precisions in (("calibration", self.calibration, ("auto", "int8-static")),
                                           ("validation", self.validation, ("auto", "int8", "int8-static"))):
            if folder is None:
                continue
            if not Path(folder).is_dir():
                raise FileNotFoundError(f"--{option} {folder} is not a folder of images")
            if self.precision not in precisions:
                raise ValueError(f"--{option} is for --precision {', '.join(precisions)}; got {self.precision}")
        if self.precision == Precision.INT8_STATIC and self.calibration is None:
            raise ValueError("--precision int8-static needs --calibration: a folder of images to calibrate on")
        if self.precision == Precision.AUTO and self.calibration is not None and self.validation is None:
            raise ValueError("--calibration with --precision auto needs --validation: int8 is weighed only where its "
                             "top-1 agreement with fp32 is measured")
