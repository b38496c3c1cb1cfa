"""Calibrated post-training static int8 quantization with ONNX Runtime (QDQ format).

``optimize(model, "int8")`` quantizes activations at run time; static int8 fixes every
activation's scale from calibration images instead, so chains of linear maps, reshapes,
transposes and residual additions run in int8 with no range search per batch. The fused
model's ONNX export goes through ONNX Runtime's ``quantize_static`` (min/max calibration).
The choices below were measured on a 2-core AMD EPYC with AVX2 and no VNNI, one thread,
batch 16, 224x224, against the fp32 ONNX Runtime model (``optimize(model, "fp32")``):

- uint8 activations, int8 weights: LeViT-128S at 1.37x fp32, against 1.18x with uint8
  weights and 0.79x with int8 activations (ONNX Runtime's x86 kernels are built for u8 x s8).
- Per-channel weights with ``reduce_range`` (7-bit weights): without VNNI the u8 x s8 kernel
  adds pairs of products in saturating 16-bit lanes, which full-range per-channel weights
  overflow (LeViT-128S: 3x the output error of the u8 x u8 kernel, which cannot saturate;
  with 7 bits, the same error). Per-tensor weights and asymmetric weights were no faster.
- The attention scores stay float: each Softmax, the arithmetic between it and the MatMul of
  its scores, and that MatMul are left out, so no score is rounded to int8. With the scores in
  int8 the digits-trained LeViT fell from 96% top-1 to 10%, and they were slower too (a K=16
  product; ONNX Runtime's int8 Softmax). The MatMul's inputs, q and k, are the int8 outputs of
  their quantized projections: ONNX Runtime multiplies them in integers with a float result
  (MatMulIntegerToFloat), the exact product of their dequantized values. Convolutions of the
  input images stay float as well: LeViT's 3-channel stem convolution was slower in int8.
- No ``quant_pre_process``: it changed neither speed nor accuracy here.

Result: LeViT-128S at 1.40x and CvT-13 at 1.48x fp32's images/s, top-1 unchanged on the
digits-trained LeViT. What separates this from int8's 2x matrix-product rate on this CPU is
the quantize/dequantize steps and the ops left in float (a quarter of LeViT-128S's fp32 time
is spent outside matrix products).
"""

from __future__ import annotations

import contextlib
import logging
import random
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from PIL import Image
from torch import nn

from ..checks import check_output_file
from ..data import DataError, eval_transform, load_image
from ..data.datasets import image_files
from ..fusion import fuse
from ..registry import get_model_info
from .export import onnx_bytes
from .model import InferenceModel, Runner
from .runners import OnnxRuntimeRunner, OpenVinoRunner, installed, onnxruntime_available, openvino_available

if TYPE_CHECKING:
    import onnx

CALIBRATION_IMAGES = 256
# Our QDQ model also reads into OpenVINO 2026.4, but there it agreed with fp32 on 19% of the digits
# (top-1): OpenVINO misreads ONNX Runtime's quantized Add and ReduceMean (with both left in float
# it agreed on 100%). It is not offered even so: NNCF's int8 of the same export ran 1.6x faster
# there (LeViT-128S, 1 thread, Zen 4; docs/benchmarks.md).
QUANTIZED_BACKENDS = ("onnxruntime", "nncf")
# An attention-score MatMul and the arithmetic (scale, bias) between it and its Softmax.
_SCORE_PATH = {"MatMul", "Add", "Sub", "Mul", "Div"}
_PREPROCESSING = {"Add", "Sub", "Mul", "Div"}
_CALIBRATION_PIECE = 4  # images per calibration run of ONNX Runtime's quantizer (its memory grows with it)


@dataclass
class CalibrationSet:
    """Preprocessed calibration batches; ``skipped``: files Pillow could not decode."""

    batches: list[torch.Tensor]
    skipped: list[Path] = field(default_factory=list)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.batches)

    @property
    def images(self) -> int:
        return sum(len(b) for b in self.batches)


def calibration_set(data: str | Path, model: nn.Module, images: int = CALIBRATION_IMAGES, batch_size: int = 32,
                    seed: int = 0, crop_pct: float | None = None, split: str = "train",
                    transform: Callable[[Image.Image], torch.Tensor] | None = None) -> CalibrationSet:
    """``images`` images drawn at random (seeded) from a folder, preprocessed as for evaluation.

    ``data``: an ImageNet-layout root (its ``split``: ``train`` to calibrate, so that ``val``
    still measures the quantized model), a class folder or any folder of images, searched
    recursively. As in training and evaluation, files that cannot be decoded are skipped (and
    listed), and the next files drawn take their place. ``crop_pct``: the model's own (stored
    with trained models), default its variant's. ``transform``: another preprocessing (such as
    ``predict``'s raw pixels) in place of the model's evaluation transform.
    """
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"image data {root} is not a folder of images")
    if (root / split).is_dir():
        root = root / split
    files = image_files(root)
    if not files:
        raise DataError(f"no image files in {root} or its subfolders")
    if transform is None:
        if getattr(model, "model_name", None) is None:
            raise ValueError("unknown model variant, cannot pick its preprocessing")
        transform = eval_transform(get_model_info(model.model_name), model.input_hw, crop_pct)
    random.Random(seed).shuffle(files)
    tensors, skipped = [], []
    for path in files:
        if len(tensors) == images:
            break
        try:
            image = load_image(path)
        except ValueError:  # undecodable file; a failing transform is a bug and is raised
            skipped.append(path)
            continue
        tensors.append(transform(image))
    if not tensors:
        raise DataError(f"none of the {len(skipped)} image files in {root} could be read")
    return CalibrationSet(list(torch.stack(tensors).split(batch_size)), skipped)


def quantize_static(model: nn.Module, calibration: Iterable[torch.Tensor] | torch.Tensor,
                    output: str | Path | None = None, per_channel: bool = True,
                    reduce_range: bool = True, backend: str = "onnxruntime",
                    static_batch: int | None = None) -> InferenceModel:
    """Static int8 version of ``model`` (left untouched), calibrated on ``calibration``.

    ``calibration``: preprocessed image batches (e.g. a ``calibration_set``) or one tensor of
    images (split into batches of 32); their height and width are the model's from now on, the
    batch size stays free. ``backend``: where the int8 model runs, with PyTorch's thread count:
    ``onnxruntime`` runs our QDQ model; ``nncf`` runs NNCF's default
    post-training quantization of the fused model's export in OpenVINO (the peer, on our graph).
    ``output``: also write the QDQ ONNX file there (not for ``nncf``). ``reduce_range`` (7-bit
    weights) avoids overflow on CPUs without VNNI; without it, VNNI CPUs gain one bit of
    weight precision. ``static_batch``: a batch size OpenVINO also compiles with fixed shapes (the
    one the caller runs most; ``OpenVinoRunner``). Returns float logits.
    """
    if backend not in QUANTIZED_BACKENDS:
        raise ValueError(f"static int8 backend must be one of {', '.join(QUANTIZED_BACKENDS)}, got {backend!r}")
    if not quantized_backend_available(backend):
        extra = {"onnxruntime": "export", "nncf": "openvino"}[backend]
        raise ImportError(f"static int8 in {backend} needs onnx, onnxruntime, openvino or nncf as its extra says: "
                          f"pip install hybridvit[{extra}]")
    if output is not None:
        if backend == "nncf":
            raise ValueError("the nncf backend makes an OpenVINO model, not a QDQ ONNX file: leave output unset")
        check_output_file(output)
    batches = calibration_batches(model, calibration)
    fused = fuse(model).cpu().requires_grad_(False)
    source = onnx_bytes(fused, torch.zeros(2, *batches[0].shape[1:]))
    quantized = nncf_openvino(source, batches) if backend == "nncf" else qdq_onnx(source, batches, per_channel,
                                                                                     reduce_range)
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_bytes(quantized)
    hw = tuple(batches[0].shape[-2:])

    def capture(example: torch.Tensor) -> Runner:  # at the calibrated size only (fixed_size)
        if backend == "onnxruntime":
            return OnnxRuntimeRunner(quantized)
        return OpenVinoRunner(quantized, static_batch=static_batch)

    return InferenceModel(capture(torch.zeros(1, *batches[0].shape[1:])), model, torch.float32, "int8-static",
                          backend, hw, capture, fixed_size=True)


def quantized_backend_available(backend: str) -> bool:
    """Whether static int8 can run in ``backend`` here (ONNX Runtime's quantizer makes the QDQ model)."""
    return {"onnxruntime": onnxruntime_available(), "nncf": openvino_available() and installed("nncf")}[backend]


def calibration_batches(model: nn.Module, calibration: Iterable[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    """``calibration`` as a list of float batches of one size that ``model`` accepts."""
    batches = list(calibration.split(32) if isinstance(calibration, torch.Tensor) else calibration)
    if not batches or not sum(len(b) for b in batches):
        raise ValueError("no calibration images")
    check = getattr(model, "check_input", lambda x: None)
    for batch in batches:
        check(batch)
        if batch.shape[1:] != batches[0].shape[1:]:
            raise ValueError(f"calibration batches differ in size: {tuple(batches[0].shape)}, {tuple(batch.shape)}")
    return [b.detach().cpu().float().contiguous() for b in batches]


def qdq_onnx(model: bytes, batches: list[torch.Tensor], per_channel: bool = True, reduce_range: bool = True) -> bytes:
    """ONNX Runtime's static quantization (QDQ) of an ONNX model with our choices of what stays
    float (see the module docstring), min/max-calibrated on ``batches``."""
    import onnx
    from onnxruntime import quantization as ortq

    # A few images per run: ONNX Runtime's calibration session holds memory in proportion to its
    # batch (CvT-13 went past 23 GB on 256 images in batches of 32, 3.8 GB in pieces of 4; min and
    # max, and so the ranges, do not depend on how the images are split).
    pieces = [piece for batch in batches for piece in batch.split(_CALIBRATION_PIECE)]

    class Reader(ortq.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(pieces)

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch.numpy()}

    source = onnx.load_from_string(model)
    _unshare_weights(source)
    with tempfile.TemporaryDirectory() as tmp, _without_preprocessing_advice():
        target = Path(tmp) / "int8.onnx"
        ortq.quantize_static(source, target, Reader(), quant_format=ortq.QuantFormat.QDQ,
                             activation_type=ortq.QuantType.QUInt8, weight_type=ortq.QuantType.QInt8,
                             per_channel=per_channel, reduce_range=reduce_range, nodes_to_exclude=_float_nodes(source))
        return target.read_bytes()


def nncf_openvino(model: bytes | Any, batches: list[torch.Tensor], **options: Any) -> Any:
    """NNCF's default post-training quantization (``nncf.quantize``, its own choices of what stays
    float) of an ONNX model (bytes) or ``openvino.Model``, calibrated on every image of
    ``batches``: what a user who wants int8 in OpenVINO does. ``options``: ``nncf.quantize``'s
    (``model_type``, ``ignored_scope``, ...). Returns an ``openvino.Model``."""
    import openvino as ov

    images = [image[None].numpy() for batch in batches for image in batch]
    source = ov.Core().read_model(model, b"") if isinstance(model, bytes) else model
    with _quiet_nncf() as nncf:
        return nncf.quantize(source, nncf.Dataset(images), subset_size=len(images), **options)


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[Any]:
    """NNCF, imported and run without its progress bars (on rich's global console), INFO lines
    and the CUDA notice its import has PyTorch log: they are for NNCF's own users."""
    import rich

    extension, logger, console = logging.getLogger("torch.utils.cpp_extension"), logging.getLogger("nncf"), \
        rich.get_console()
    saved = extension.level, logger.level, console.quiet
    extension.setLevel(logging.ERROR)
    console.quiet = True
    try:
        logger.setLevel(logging.WARNING)
        import nncf

        yield nncf
    finally:
        extension.setLevel(saved[0])
        logger.setLevel(saved[1])
        console.quiet = saved[2]


def _unshare_weights(model: onnx.ModelProto) -> None:
    """Give every node a float initializer of its own. The exporter merges equal tensors (the
    zero weights and biases of an untrained LeViT's residual branches), by name or through
    Identity nodes; ONNX Runtime's quantizer takes a weight behind an Identity, or a bias that
    an Add also reads, for an activation, and leaves its product in float or per-tensor."""
    from onnx import TensorProto

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    for node in [n for n in graph.node if n.op_type == "Identity" and n.input[0] in initializers]:
        initializers[node.output[0]] = _copy(graph, initializers[node.input[0]], node.output[0])
        graph.node.remove(node)
    readers: Counter[str] = Counter()
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in initializers and initializers[name].data_type == TensorProto.FLOAT:
                readers[name] += 1
                if readers[name] > 1:
                    node.input[k] = _copy(graph, initializers[name], f"{name}.{readers[name]}").name


def _copy(graph: onnx.GraphProto, tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
    copy = graph.initializer.add()
    copy.CopyFrom(tensor)
    copy.name = name
    return copy


def _float_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes kept in float: each Softmax with the score arithmetic and MatMul
    before it, convolutions of the graph input, or of its scaled version (see the module
    docstring), and LayerNorms
    (ONNX Runtime has no int8 kernel for them, and its per-channel rule misfits their 1-D scales)."""
    graph = model.graph
    producer = {name: node for node in graph.node for name in node.output}
    inputs = {i.name for i in graph.input}
    names = []
    for node in graph.node:  # in graph order: elementwise steps on the images (predict's scaling) count as input
        if node.op_type in _PREPROCESSING and node.input[0] in inputs:
            inputs.add(node.output[0])
            names.append(node.name)
    names += [n.name for n in graph.node if n.op_type == "LayerNormalization"
              or n.op_type == "Conv" and n.input[0] in inputs]
    for softmax in (n for n in graph.node if n.op_type == "Softmax"):
        names.append(softmax.name)
        node = producer.get(softmax.input[0])
        while node is not None and node.op_type in _SCORE_PATH:
            names.append(node.name)
            if node.op_type == "MatMul":
                break
            node = next((producer[i] for i in node.input if i in producer and producer[i].op_type in _SCORE_PATH), None)
    return names


@contextlib.contextmanager
def _without_preprocessing_advice() -> Iterator[None]:
    """Silence ONNX Runtime's advice (on the root logger) to run ``quant_pre_process``: measured
    here, it changed nothing."""
    def advice(record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()

    logging.getLogger().addFilter(advice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(advice)
