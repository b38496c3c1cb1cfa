"""On-device export: ExecuTorch and LiteRT programs for XNNPACK, and Core ML packages, each checked
before it is written.

The model is fused, rewritten by the device pass (``deploy.for_device``) and exported at batch 1
and its own input size, in fp32 or, with calibration images, int8 (post-training, static,
per-channel weights). The exporter counts the operators left outside XNNPACK (none, for LeViT and
CvT, in fp32 and int8), runs the program in its own runtime's Python API on images and compares
it with the eager model: a program whose top-1 agrees with eager PyTorch on fewer than
``AGREEMENT`` of them is refused, nothing written. Core ML programs cannot run off Apple's
systems: there the check reads the package back with coremltools (its inputs, outputs, labels,
operations and metadata).

What each file takes, as its platform's tools expect:

- ``.pte`` (ExecuTorch): normalised float images, NCHW, as the ONNX export; ``MODEL.json``
  beside it has the class names and the preprocessing;
- ``.tflite`` (LiteRT): RGB pixels 0-255 as float, NHWC, normalised in the graph, probabilities
  out; its TFLite metadata (labels, normalisation, input size) is what MediaPipe's and LiteRT's
  image classifier tasks read, so the file classifies with no code of the app's own;
- ``.mlpackage`` (Core ML): an image classifier, an ``ImageType`` RGB input normalised in the
  graph, class labels, and the model's name and licence in its description.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import threading
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..checks import check_output_file, check_output_folder
from ..fusion import fuse
from ..registry import IMAGENET_MEAN, IMAGENET_STD, get_model_info
from .deploy import DeviceLayerNorm, decompose_activations, for_device
from .spec import TOP1_AGREEMENT

AGREEMENT = TOP1_AGREEMENT  # top-1 agreement with eager PyTorch a file must reach to be written, as optimize's gate
EDGE_FORMATS = {"executorch": ".pte", "litert": ".tflite", "coreml": ".mlpackage"}
LICENCES = {"levit": "Apache-2.0 (the published LeViT weights, facebookresearch/LeViT)",
            "cvt": "MIT (the published CvT weights, microsoft/CvT)"}
_INSTALL = {"executorch": 'pip install "hybridvit[edge]"',
            "litert": "litert-torch needs an environment of its own (it pins typing-extensions<4.13): "
                      "python -m venv --system-site-packages .venv-litert && "
                      '.venv-litert/bin/pip install "hybridvit[litert]", then run .venv-litert/bin/hybridvit',
            "coreml": 'pip install "hybridvit[edge]"'}
_MODULES = {"executorch": "executorch", "litert": "litert_torch", "coreml": "coremltools"}


@dataclass
class EdgeExport:
    """What was written and how it was checked."""

    path: Path
    format: str
    int8: bool
    size_bytes: int
    partitions: int  # XNNPACK delegate calls (0 for Core ML)
    outside: dict[str, int] = field(default_factory=dict)  # operators left outside the delegate, by name
    max_difference: float = 0.0  # largest absolute difference from eager PyTorch (logits; LiteRT: probabilities)
    agreement: float = 1.0  # top-1 agreement with eager PyTorch
    images: int = 0  # images the file ran on (0: Core ML, read back but not run)
    operations: dict[str, int] = field(default_factory=dict)  # Core ML: the program's operations, by type

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def require(format: str, run: bool = False) -> None:
    """``ImportError`` saying how to install what exporting (``run``: running) ``format`` needs,
    when it is missing."""
    if format not in EDGE_FORMATS:
        raise ValueError(f"device formats are {', '.join(EDGE_FORMATS)}, not {format!r}")
    if run and format == "litert":
        if importlib.util.find_spec("ai_edge_litert") is None:
            raise ImportError('running LiteRT programs needs ai-edge-litert: pip install "hybridvit[edge]"')
    elif importlib.util.find_spec(_MODULES[format]) is None:
        raise ImportError(f"--format {format} needs {_MODULES[format]}: {_INSTALL[format]}")


class Normalize(nn.Module):
    """RGB pixels 0-255 to the model's normalised input, kept in float by the quantizers."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        std_t = torch.tensor(std).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -torch.tensor(mean).view(1, -1, 1, 1) / std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class ImageClassifierProgram(nn.Module):
    """A device model as image classifier tasks take it: pixels in (NHWC with ``channels_last``,
    MediaPipe's layout), normalised in the graph, probabilities out."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], channels_last: bool) -> None:
        super().__init__()
        self.model, self.normalize, self.channels_last = model, Normalize(mean, std), channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return self.model(self.normalize(x)).softmax(-1)


def to_pixels(images: torch.Tensor, mean: list[float], std: list[float], channels_last: bool = False) -> torch.Tensor:
    """Normalised NCHW images back to the pixels (0-255, float) an image classifier program takes."""
    pixels = (images * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)) * 255.0
    return pixels.permute(0, 2, 3, 1).contiguous() if channels_last else pixels


_EXECUTORCH_THREADS: int | None = None  # ExecuTorch's thread pool is one per process, set before the first load


class ProgramRunner:
    """A device program (``.pte`` or ``.tflite``) in its runtime's Python API, on batches of NCHW
    images: a ``.pte`` takes them normalised and gives logits, a ``.tflite`` takes pixels 0-255
    and gives probabilities. The programs take batch 1: each image is one call. ExecuTorch runs
    every program of a process on one thread pool, sized by the first runner (``threads``)."""

    def __init__(self, program: bytes, format: str, threads: int = 1) -> None:
        self.format, self.lock = format, threading.Lock()
        if format == "executorch":
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime

            global _EXECUTORCH_THREADS
            if _EXECUTORCH_THREADS is None:  # once: a loaded program's delegate keeps the pool (a reset crashed it)
                portable_lib._unsafe_reset_threadpool(threads)
                _EXECUTORCH_THREADS = threads
            self.threads = _EXECUTORCH_THREADS
            # the runtime reads the program from these bytes without copying them: both are kept
            self.buffer, self.program = program, Runtime.get().load_program(program)
            self.method = self.program.load_method("forward")
        elif format == "litert":
            self.threads = threads
            self.interpreter = _litert_interpreter(program, threads)
            (self.source,), (self.target,) = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        else:
            raise ValueError(f"programs run here are executorch or litert, not {format!r}")

    @classmethod
    def from_file(cls, path: str | Path, threads: int = 1) -> ProgramRunner:
        formats = {suffix: name for name, suffix in EDGE_FORMATS.items()}
        return cls(Path(path).read_bytes(), formats.get(Path(path).suffix.lower(), "?"), threads)

    def one(self, image: torch.Tensor) -> torch.Tensor:
        """One ``(1, C, H, W)`` image's output."""
        if self.format == "executorch":
            return self.method.execute([image.contiguous()])[0]
        # the layout changed in numpy: a torch copy this size runs on torch's threads, which then spin
        # for a while on the cores the interpreter's threads need (LeViT-128S at 2 threads: 4.8 vs 2.6 ms)
        pixels = np.ascontiguousarray(image.numpy().transpose(0, 2, 3, 1))
        self.interpreter.set_tensor(self.source["index"], pixels)
        self.interpreter.invoke()
        return torch.from_numpy(self.interpreter.get_tensor(self.target["index"]).copy())

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with self.lock:  # a method or interpreter runs one call at a time; predict's lanes share one
            return torch.cat([self.one(image[None]) for image in images])


def _calibrated(model: nn.Module, example: torch.Tensor, batches: list[torch.Tensor], quantizer: Any,
                fold: bool = True) -> nn.Module:
    """``model`` quantized by ``quantizer`` (PT2E, static), its activations' ranges read on ``batches``
    one image at a time (the program takes batch 1)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(torch.export.export(model, (example,)).module(), quantizer)
    with torch.no_grad():
        for batch in batches:
            for image in batch:
                prepared(image[None])
    return convert_pt2e(prepared, fold_quantize=fold)


def _float_parts(quantizer: Any, by_name: bool = False) -> Any:
    """The pixel normalisation and LayerNorm's written-out statistics stay in float. ``by_name``:
    the quantizer matches the exported graph's module types by qualified name (litert-torch's)."""
    for kind in (Normalize, DeviceLayerNorm):
        quantizer.set_module_type(f"{kind.__module__}.{kind.__qualname__}" if by_name else kind, None)
    return quantizer


def executorch_program(model: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor] | None = None
                       ) -> tuple[bytes, int, dict[str, int]]:
    """``model`` lowered to XNNPACK (int8 when ``calibration`` batches are given): the program's
    bytes, its delegate calls and the operators left outside the delegate."""
    require("executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    if calibration is not None:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )

        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        model = _calibrated(model, example, calibration, _float_parts(quantizer))
    with torch.no_grad():
        edge = to_edge_transform_and_lower(torch.export.export(model, (example,)), partitioner=[XnnpackPartitioner()])
    partitions, outside = 0, Counter()
    for node in edge.exported_program().graph_module.graph.nodes:
        if node.op != "call_function" or "getitem" in str(node.target):
            continue
        if "executorch_call_delegate" in str(node.target):
            partitions += 1
        else:
            outside[getattr(node.target, "__name__", str(node.target))] += 1
    return edge.to_executorch().buffer, partitions, dict(outside)


def litert_program(model: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor] | None = None) -> bytes:
    """``model`` converted by litert-torch (int8 when ``calibration`` batches are given)."""
    require("litert")
    import litert_torch

    with _quiet_litert():
        if calibration is None:
            return litert_torch.convert(model, (example,)).model_content()
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig

        quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        quantized = _calibrated(model, example, calibration, _float_parts(quantizer, by_name=True), fold=False)
        return litert_torch.convert(quantized, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer)
                                    ).model_content()


@contextlib.contextmanager
def _quiet_litert():
    """litert-torch's progress lines go to stdout otherwise (the command's report is printed there)."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def _litert_interpreter(program: bytes, threads: int = 1) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=program, num_threads=threads)
    interpreter.allocate_tensors()
    return interpreter


def litert_outside(program: bytes) -> tuple[int, dict[str, int]]:
    """The XNNPACK delegate's partitions in a LiteRT program and the operators it left out, by name.

    The interpreter lists the model's operators and the delegate's nodes, not its execution plan:
    an operator is inside when it makes a delegate's output, or makes a tensor that an operator
    inside reads and no delegate takes as input.
    """
    operators = _litert_interpreter(program)._get_ops_details()
    delegates = [op for op in operators if op["op_name"] == "DELEGATE"]
    plain = {op["index"]: op for op in operators if op["op_name"] != "DELEGATE"}
    delegate_in = {t for d in delegates for t in d["inputs"]}
    delegate_out = {t for d in delegates for t in d["outputs"]}
    producer = {t: index for index, op in plain.items() for t in op["outputs"]}
    inside = {index for index, op in plain.items() if set(op["outputs"]) & delegate_out}
    todo = list(inside)
    while todo:
        for tensor in plain[todo.pop()]["inputs"]:
            index = producer.get(tensor)
            if index is not None and tensor not in delegate_in and index not in inside:
                inside.add(index)
                todo.append(index)
    return len(delegates), dict(Counter(op["op_name"] for index, op in plain.items() if index not in inside))


def with_litert_metadata(program: bytes, name: str, classes: list[str], size: tuple[int, int]) -> bytes:
    """``program`` with the TFLite metadata image classifier tasks read: the input as an RGB image of
    ``size`` (pixels 0-255: mean 0, std 1, the normalisation is in the graph), and the output as
    probabilities over ``classes`` (the label file packed into the model)."""
    import tempfile

    _stand_in_for_mediapipe_version_module()
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_writer

    with tempfile.TemporaryDirectory() as folder:
        labels = Path(folder) / "labels.txt"
        labels.write_text("".join(f"{c}\n" for c in classes))
        writer = metadata_writer.MetadataWriter.create(bytearray(program))
        writer.add_general_info(name, f"{name}: image classifier, {size[0]}x{size[1]} RGB input, probabilities "
                                      f"over {len(classes)} classes (hybridvit)")
        writer.add_image_input([0.0], [1.0])
        writer.add_classification_output(metadata_writer.Labels().add_from_file(str(labels)))
        model, _ = writer.populate()
        del writer  # its clean-up, now: at interpreter exit it fails on a torn-down os module
    return bytes(model)


def _stand_in_for_mediapipe_version_module() -> None:
    """mediapipe 1.2's wheel lacks the compiled module its metadata populator asks for the minimum
    parser version (``mediapipe.tasks.cc.metadata.python._pywrap_metadata_version``); every field
    ``with_litert_metadata`` writes dates from metadata version 1.0.0."""
    import sys
    import types

    names = ["mediapipe.tasks.cc", "mediapipe.tasks.cc.metadata", "mediapipe.tasks.cc.metadata.python",
             "mediapipe.tasks.cc.metadata.python._pywrap_metadata_version"]
    if importlib.util.find_spec("mediapipe.tasks.cc") is not None or names[-1] in sys.modules:
        return
    modules = [sys.modules.setdefault(name, types.ModuleType(name)) for name in names]
    for parent, child, name in zip(modules, modules[1:], names[1:]):
        setattr(parent, name.rsplit(".", 1)[1], child)
    modules[-1].GetMinimumMetadataParserVersion = lambda buffer: "1.0.0"  # type: ignore[attr-defined]


def coreml_package(program_model: nn.Module, example: torch.Tensor, classes: list[str], name: str,
                   licence: str, int8: bool) -> Any:
    """``program_model`` (an ``ImageClassifierProgram``, NCHW) as a Core ML image classifier
    (ML program); ``int8``: weights linearly quantized to int8 (activations need a Mac to calibrate)."""
    require("coreml")
    import coremltools as ct

    exported = torch.export.export(program_model, (example,)).run_decompositions({})
    with warnings.catch_warnings():  # coremltools warns of its own deprecated registry once per operation
        warnings.simplefilter("ignore", DeprecationWarning)
        package = ct.convert(exported, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                             inputs=[ct.ImageType(name="image", shape=tuple(example.shape),
                                                  color_layout=ct.colorlayout.RGB)],
                             classifier_config=ct.ClassifierConfig(classes))
    if int8:
        from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

        config = OptimizationConfig(global_config=OpLinearQuantizerConfig(mode="linear_symmetric"))
        # an output channel whose weights round to zero in fp16 (a residual branch's BatchNorm that
        # stayed near its zero start) gets scale 0: it dequantizes to zeros, and numpy warns of 0/0
        with np.errstate(divide="ignore", invalid="ignore"):
            package = linear_quantize_weights(package, config=config)
    package.short_description = f"{name}: image classifier, probabilities over {len(classes)} classes (hybridvit)"
    package.author = "hybridvit"
    package.license = licence
    package.version = "1"
    return package


def coreml_spec_check(path: Path, classes: list[str], size: tuple[int, int]) -> dict[str, int]:
    """Read a written package back with coremltools' spec reader: an image input of ``size``, a
    classifier over ``classes``; its operations, by name. ``ValueError`` when it is not that."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    (image,) = spec.description.input
    kind = image.type.WhichOneof("Type")
    if kind != "imageType" or (image.type.imageType.height, image.type.imageType.width) != tuple(size):
        raise ValueError(f"the Core ML package's input is {kind}, not a {size[0]}x{size[1]} image")
    operations = [op for function in spec.mlProgram.functions.values()
                  for block in function.block_specializations.values() for op in block.operations]
    labels = [value.immediateValue.tensor.strings.values[0] for op in operations if op.type == "classify"
              for value in op.inputs["classes"].arguments[0].value.immediateValue.list.values]
    if labels != list(classes) or spec.description.predictedFeatureName != "classLabel":
        raise ValueError(f"the Core ML package is not a classifier over the model's {len(classes)} classes")
    return dict(Counter(op.type for op in operations))


def check_output_path(path: str | Path, format: str) -> Path:
    """``path`` as an output ``format`` can write: a file, or for Core ML a ``.mlpackage`` folder
    (an existing one is replaced)."""
    path = Path(path)
    if format != "coreml":
        return check_output_file(path)
    if path.suffix != ".mlpackage":
        raise ValueError(f"a Core ML package is a folder named NAME.mlpackage, not {path.name}")
    check_output_folder(path.parent)
    return path


def _classes(extra: dict[str, Any], num_classes: int) -> list[str]:
    names = extra.get("class_names") or extra.get("classes")
    return [str(c) for c in names] if names and len(names) == num_classes else [str(i) for i in range(num_classes)]


def _write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary name, so an interrupted export leaves no partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # the suffix kept: Core ML's save insists on it
    write(tmp)
    if path.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)


def export_edge(model: nn.Module, path: str | Path, format: str = "executorch", *,
                images: torch.Tensor | None = None, calibration: list[torch.Tensor] | None = None,
                extra: dict[str, Any] | None = None, agreement: float = AGREEMENT) -> EdgeExport:
    """Write ``model`` for a device runtime (``EDGE_FORMATS``), checked before it is written.

    ``images``: normalised images of the model's input size to check the file on (default: the
    calibration images, else 16 random ones). ``calibration``: batches of such images; given, the
    program is int8 (Core ML: its weights). ``extra``: class names and preprocessing, as
    ``load_source`` returns them. ``ValueError`` if the file's top-1 agrees with eager PyTorch on
    fewer than ``agreement`` of the images: nothing is written then.
    """
    require(format)
    path = check_output_path(path, format)
    extra = dict(extra or {})
    fused = fuse(model).cpu().requires_grad_(False).eval()
    device = for_device(fused)
    info = get_model_info(fused.model_name) if getattr(fused, "model_name", None) else None
    mean = list(extra.get("mean") or (info.mean if info else IMAGENET_MEAN))
    std = list(extra.get("std") or (info.std if info else IMAGENET_STD))
    classes, size, name = _classes(extra, fused.num_classes), fused.input_hw, fused.model_name or "model"
    if images is None:
        images = (torch.cat(calibration) if calibration else
                  torch.randn(16, fused.in_chans, *size, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        reference = fused(images)
    int8 = calibration is not None
    if format == "executorch":
        example = torch.zeros(1, fused.in_chans, *size)
        program, partitions, outside = executorch_program(device, example, calibration)
        got = ProgramRunner(program, format)(images)
        write: Callable[[Path], None] = lambda target: target.write_bytes(program)  # noqa: E731
    elif format == "litert":
        wrapped = ImageClassifierProgram(decompose_activations(device) if int8 else device, mean, std, True).eval()
        pixels = [to_pixels(b, mean, std, True) for b in calibration] if int8 else None
        program = litert_program(wrapped, torch.zeros(1, *size, fused.in_chans), pixels)
        program = with_litert_metadata(program, name, classes, size)
        partitions, outside = litert_outside(program)
        got, reference = ProgramRunner(program, format)(to_pixels(images, mean, std)), reference.softmax(-1)
        write = lambda target: target.write_bytes(program)  # noqa: E731
    else:
        wrapped = ImageClassifierProgram(device, mean, std, False).eval()
        licence = extra.get("license") or LICENCES.get(getattr(fused, "family", ""), "see the weights' source")
        package = coreml_package(wrapped, torch.zeros(1, fused.in_chans, *size), classes, name, licence, int8)
        partitions, outside, got = 0, {}, None
        write = lambda target: package.save(str(target))  # noqa: E731
    if got is None:
        result = EdgeExport(path, format, int8, 0, partitions, outside, 0.0, 1.0, 0)
    else:
        agree = (got.argmax(1) == reference.argmax(1)).float().mean().item()
        result = EdgeExport(path, format, int8, len(program), partitions, outside,
                            (got - reference).abs().max().item(), agree, len(images))
        if agree < agreement:
            raise ValueError(f"the {format} program's top-1 agrees with PyTorch on {agree:.1%} of {len(images)} images, "
                             f"under {agreement:.0%}: not written ({path})")
    _write(path, write)
    if format == "coreml":
        result.operations = coreml_spec_check(path, classes, size)
        result.size_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    layout = {"executorch": "NCHW, RGB, normalised: (pixel / 255 - mean) / std",
              "litert": "NHWC, RGB pixels 0-255 as float (normalised in the graph)",
              "coreml": "an RGB image (normalised in the graph)"}[format]
    shape = [1, *size, fused.in_chans] if format == "litert" else [1, fused.in_chans, *size]
    sidecar = {"format": format, "int8": int8, "model": name, "classes": classes, "mean": mean, "std": std,
               "output": "logits" if format == "executorch" else "probabilities",
               "input": {"shape": shape, "dtype": "float32", "layout": layout},
               **{k: v for k, v in extra.items() if k not in ("classes", "class_names", "mean", "std")},
               "check": result.summary()}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=1))
    return result
