"""The rows a benchmark measures: ours through ``optimize`` (each backend), the same
architectures as other libraries ship them (eager, traced, or exported to OpenVINO, the CPU
runtime a user would reach for), and the other rows of the LeViT paper's Table 3."""

from __future__ import annotations

import importlib
import sys
import tempfile
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..api import create_model
from ..flops import count_macs
from ..inference import quantize
from ..inference.export import onnx_bytes
from ..inference.optimize import optimize
from ..inference.runners import OnnxRuntimeRunner, OpenVinoRunner, installed, onnxruntime_available, openvino_available
from ..registry import get_model_info, list_models
from .photos import make_photos
from .throughput import Candidate

CPU_PRECISIONS = ("auto", "fp32", "bf16", "int8", "int8-static")
GPU_PRECISIONS = ("fp32", "fp16", "bf16")  # fp16: the paper's GPU protocol (AMP)

# timm name: (input resolution, top-1 printed in the LeViT paper's Table 3)
PAPER_ROWS = {
    "efficientnet_b0": (224, 77.1), "efficientnet_b1": (240, 79.1), "efficientnet_b2": (260, 80.1),
    "efficientnet_b3": (300, 81.6), "efficientnet_b4": (380, 82.9),
    "deit_tiny_distilled_patch16_224": (224, 76.6), "deit_small_distilled_patch16_224": (224, 82.6),
    "resnet50": (224, None),
}
_OFFICIAL_NAMES = {"levit_128s": "LeViT_128S", "levit_128": "LeViT_128", "levit_192": "LeViT_192",
                   "levit_256": "LeViT_256", "levit_384": "LeViT_384"}

Build = Callable[[], Callable[[torch.Tensor], Any]]


def macs(name: str) -> int | None:
    """MACs per image of a registered architecture at its own size (None for others)."""
    if name not in list_models():
        return None
    with torch.device("meta"):
        return count_macs(create_model(name))


def _amp(device: str, precision: str):
    """Autocast for a GPU row's precision; CPU references run as shipped, in fp32."""
    if torch.device(device).type != "cuda" or precision == "fp32":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def eager(model_fn: Callable[[], nn.Module], device: str, precision: str = "fp32",
          output: Callable[[Any], Any] = lambda o: o) -> Build:
    """A model run as its authors ship it (eager, eval mode, no gradients)."""
    def build():
        model = model_fn().to(device).eval()

        def run(x):
            with torch.inference_mode(), _amp(device, precision):
                return output(model(x))
        return run
    return build


def traced(model_fn: Callable[[], nn.Module], hw: tuple[int, int], device: str, precision: str = "fp32") -> Build:
    """A model jit-traced, as the paper's speed test does for every row."""
    def build():
        model = model_fn().to(device).eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = torch.jit.trace(model, torch.zeros(1, 3, *hw, device=device))

        def run(x):
            with torch.inference_mode(), _amp(device, precision):
                return graph(x)
        return run
    return build


class _Logits(nn.Module):
    """A model whose output carries ``.logits`` (transformers), as a plain tensor for export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def in_openvino(model_fn: Callable[[], nn.Module], hw: tuple[int, int], precision: str = "fp32") -> Build:
    """A model's plain ONNX export run by OpenVINO with the settings ``optimize`` uses, in
    ``precision`` (``default``: the plugin's own choice, as a user who sets nothing gets)."""
    def build():
        return OpenVinoRunner(model_fn().eval().requires_grad_(False), torch.zeros(1, 3, *hw), precision)
    return build


def in_onnxruntime(model_fn: Callable[[], nn.Module], hw: tuple[int, int]) -> Build:
    """A model's plain ONNX export run by ONNX Runtime with the settings ``optimize`` uses."""
    def build():
        return OnnxRuntimeRunner(onnx_bytes(model_fn().eval().requires_grad_(False), torch.zeros(1, 3, *hw)))
    return build


def in_nncf(model_fn: Callable[[], nn.Module], hw: tuple[int, int], calibration: Callable[[], list[torch.Tensor]]
            ) -> Build:
    """A model's plain ONNX export quantized by NNCF's default post-training quantization on
    ``calibration`` and run in OpenVINO: the int8 model a user of OpenVINO makes."""
    def build():
        source = onnx_bytes(model_fn().eval().requires_grad_(False), torch.zeros(2, 3, *hw))
        return OpenVinoRunner(quantize.nncf_openvino(source, calibration()))
    return build


class Calibration:
    """One calibration set per model for every int8-static row of a benchmark, ours and the
    peers': the same images, preprocessed once as the model's evaluation does. ``folder``: the
    user's images (an ImageNet-layout root gives its train split); by default JPEGs made from
    scikit-learn's bundled photos (``make_photos``)."""

    def __init__(self, folder: Path | None = None, images: int = quantize.CALIBRATION_IMAGES) -> None:
        self.folder, self.images = folder, images
        self._photos: tempfile.TemporaryDirectory | None = None  # the default images, made once
        self._sets: dict[str, list[torch.Tensor]] = {}

    def batches(self, name: str) -> list[torch.Tensor]:
        if name not in self._sets:
            folder = self.folder
            if folder is None:
                if self._photos is None:
                    self._photos = tempfile.TemporaryDirectory()
                    make_photos(Path(self._photos.name), self.images)
                folder = Path(self._photos.name)
            with torch.device("meta"):  # its name and input size pick the preprocessing
                model = create_model(name)
            self._sets[name] = quantize.calibration_set(folder, model, self.images).batches
        return self._sets[name]

    def of(self, name: str) -> Callable[[], list[torch.Tensor]]:
        """``name``'s set, made when a row first needs it."""
        return lambda: self.batches(name)


def hybridvit_candidates(name: str, precision: str, device: str, pretrained: bool = False,
                         calibration: Calibration | None = None, batch: int = 16) -> list[Candidate]:
    """Our model through ``optimize``: on CPU in fp32 and int8-static one row per installed
    backend, in ``auto`` the path it measured fastest; on GPU the fused model under the
    precision's autocast. ``pretrained``: with the published weights (speed does not depend on
    them; int8 accuracy does). ``calibration``: the images static int8 is calibrated on.
    ``batch``: the batch the rows are timed at, which ``optimize`` is told (as ``predict``
    tells it its batch size: OpenVINO compiles that size with fixed shapes)."""
    info = get_model_info(name)

    def build() -> torch.nn.Module:
        return create_model(name, pretrained=pretrained).eval()

    hw = info.input_size[1:]
    count = macs(name)

    def row(label: str, make: Callable[[], Any], row_precision: str = precision) -> Candidate:
        return Candidate(label, make, hw, "hybridvit", name, info.paper_top1, row_precision, count)

    if torch.device(device).type == "cuda":
        from ..fusion import fuse

        return [row(name if precision == "fp16" else f"{name} ({precision})",
                    eager(lambda: fuse(build()), device, precision))]

    def ours(p: str, backend: str = "auto"):
        example = torch.zeros(batch, 3, *hw)
        return lambda: optimize(build(), p, example, backend=backend)

    if precision == "fp32":
        available = {"onnxruntime": onnxruntime_available(), "openvino": openvino_available(), "torchscript": True}
        return [row(f"{name} ({b})", ours("fp32", b)) for b, ok in available.items() if ok]
    if precision == "int8-static":
        images = (calibration or Calibration()).of(name)
        return [row(f"{name} (int8-static, {b})",
                    lambda b=b: quantize.quantize_static(build(), images(), backend=b, static_batch=batch))
                for b in quantize.QUANTIZED_BACKENDS if quantize.quantized_backend_available(b)]
    return [row(f"{name} ({precision})", ours(precision))]


def file_candidate(path: str | Path) -> Candidate:
    """A file ``export`` or ``quantize`` wrote (``.onnx``, ``.pte``, ``.tflite``), timed in its own
    runtime as it is: its input size from the JSON beside it or its folder's model."""
    import json

    from ..api import load_source
    from ..inference.edge import ProgramRunner
    from ..inference.spec import FILE_SUFFIXES

    path = Path(path)
    if path.suffix.lower() not in FILE_SUFFIXES or not path.is_file():
        raise ValueError(f"{path}: not a model name, nor an existing {', '.join(FILE_SUFFIXES)} file")
    sidecar = path.with_suffix(".json")  # the export's own JSON beside the file
    if path.suffix.lower() != ".onnx" and sidecar.is_file():
        shape = json.loads(sidecar.read_text())["input"]["shape"]
        hw, name = ((shape[1], shape[2]) if path.suffix.lower() == ".tflite" else (shape[2], shape[3])), None
    else:
        model, _ = load_source(path.parent)
        hw, name = model.input_hw, model.model_name

    def build() -> Callable[[torch.Tensor], Any]:
        if path.suffix.lower() == ".onnx":
            return OnnxRuntimeRunner(path.read_bytes())
        return ProgramRunner.from_file(path, torch.get_num_threads())

    kind = {".onnx": "ONNX Runtime", ".pte": "ExecuTorch", ".tflite": "LiteRT"}[path.suffix.lower()]
    return Candidate(f"{path.name} ({kind})", build, tuple(hw), "hybridvit", name or path.stem, None, "file",
                     macs(name) if name else None)


def _hf_model(name: str) -> nn.Module:
    import transformers

    cfg = get_model_info(name).config
    if name.startswith("levit"):
        config = transformers.LevitConfig(hidden_sizes=list(cfg.embed_dim), num_attention_heads=list(cfg.num_heads),
                                          depths=list(cfg.depth), key_dim=[cfg.key_dim] * 3, drop_path_rate=0,
                                          num_labels=1000)
        return transformers.LevitForImageClassificationWithTeacher(config)
    config = transformers.CvtConfig(embed_dim=list(cfg.embed_dim), num_heads=list(cfg.num_heads), depth=list(cfg.depth),
                                    num_labels=1000)
    return transformers.CvtForImageClassification(config)


def _official_levit(repo: Path, name: str) -> Callable[[], nn.Module]:
    """The official repository's model, BatchNorm-fused with its own utility (its speed test's recipe)."""
    sys.path.insert(0, str(repo))
    try:
        levit, utils = importlib.import_module("levit"), importlib.import_module("utils")
    finally:
        sys.path.remove(str(repo))

    def make():
        model = getattr(levit, _OFFICIAL_NAMES[name])(num_classes=1000)
        utils.replace_batchnorm(model)
        return model
    return make


def reference_candidates(name: str, device: str, official_repo: Path | None = None,
                         precision: str = "fp32", calibration: Calibration | None = None) -> list[Candidate]:
    """Installed implementations of the same architecture as ``name`` (in OpenVINO too, on CPU).
    ``int8-static`` (CPU): the official fused LeViT's and transformers' CvT exports through NNCF's
    default quantization in OpenVINO, calibrated on the images ours are."""
    info = get_model_info(name)
    hw, top1, count = info.input_size[1:], info.paper_top1, macs(name)
    on_cpu = torch.device(device).type == "cpu"
    suffix = "" if precision in ("fp32", "fp16", "int8-static", "auto") else f" ({precision})"  # labels say it
    rows = []

    def add(label: str, source: str, build: Build) -> None:
        rows.append(Candidate(label + suffix, build, hw, source, name, top1, precision, count))

    if precision == "auto":  # the peer of ``auto``: OpenVINO at its default precision (bf16 where the CPU has it)
        if on_cpu and openvino_available():
            if name.startswith("levit") and official_repo is not None:
                add(f"official {name} (fused, OpenVINO, default precision)", "official",
                    in_openvino(_official_levit(official_repo, name), hw, "default"))
            if installed("transformers"):
                add(f"transformers {name} (OpenVINO, default precision)", "transformers",
                    in_openvino(lambda: _Logits(_hf_model(name)), hw, "default"))
        return rows
    if precision == "int8-static":
        if not (on_cpu and quantize.quantized_backend_available("nncf")):
            return []
        images = (calibration or Calibration()).of(name)
        if name.startswith("levit") and official_repo is not None:
            add(f"official {name} (fused, NNCF int8, OpenVINO)", "official",
                in_nncf(_official_levit(official_repo, name), hw, images))
        # NNCF 3.4 cannot quantize transformers' LeViT export (a KeyError at its attention-bias Gather)
        if installed("transformers") and not name.startswith("levit"):
            add(f"transformers {name} (NNCF int8, OpenVINO)", "transformers",
                in_nncf(lambda: _Logits(_hf_model(name)), hw, images))
        return rows

    if name.startswith("levit"):
        import timm

        add(f"timm {name}", "timm", eager(lambda: timm.create_model(name), device, precision))
        if official_repo is not None:
            official = _official_levit(official_repo, name)
            add(f"official {name} (fused, traced)", "official", traced(official, hw, device, precision))
            _exported(add, f"official {name} (fused, {{runtime}})", "official", official, hw, on_cpu)
    if installed("transformers"):
        add(f"transformers {name}", "transformers", eager(lambda: _hf_model(name), device, precision, lambda o: o.logits))
        _exported(add, f"transformers {name} ({{runtime}})", "transformers", lambda: _Logits(_hf_model(name)), hw,
                  on_cpu)
    return rows


def _exported(add: Callable[[str, str, Build], None], label: str, source: str, model_fn: Callable[[], nn.Module],
              hw: tuple[int, int], on_cpu: bool) -> None:
    """Rows of a model's plain ONNX export in each installed CPU runtime (``label`` has a ``{runtime}`` field)."""
    if on_cpu and openvino_available():
        add(label.format(runtime="OpenVINO"), source, in_openvino(model_fn, hw))
    if on_cpu and onnxruntime_available():
        add(label.format(runtime="ONNX Runtime"), source, in_onnxruntime(model_fn, hw))


def paper_candidates(device: str, precision: str = "fp32") -> list[Candidate]:
    """The non-LeViT rows of the paper's Table 3, from timm, traced."""
    import timm

    return [Candidate(n, traced(lambda n=n: timm.create_model(n), (r, r), device, precision), (r, r), "timm", n, top1,
                      precision) for n, (r, top1) in PAPER_ROWS.items()]
