"""``optimize``: the fastest inference callable for a model on the machine at hand.

Which path is fastest depends on the CPU and its thread count (docs/benchmarks.md): ONNX
Runtime and OpenVINO run the fused model's ONNX export within a few percent of each other in
fp32 and beat the frozen TorchScript graph by 10-25%; bf16 is 1.7x fp32 on a CPU with
AVX512-BF16 and a hundred times slower on one without it. ``precision="auto"`` therefore
measures every precision and backend on this machine, an explicit precision the backends that
run it; an explicit ``bf16`` warns when this CPU multiplies bf16 matrices slower than fp32 ones.
The TorchScript path applies BatchNorm fusion, the precomputed attention bias and the fastest
attention path per shape (``layers.attention``), then freezing, plus ``optimize_for_inference``
in fp32 for families whose ``cpu_graph_rewrite`` says it helped (LeViT: +14%; CvT, and LeViT in
bf16: slower).
``torch.compile`` (inductor) was slower and takes ~30 s to compile, so it is not used.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from collections.abc import Iterable
from typing import Callable

import torch
from torch import nn

from ..allocator import tune_cpu_allocator  # noqa: F401  (its public name here too)
from ..fusion import fuse
from .export import onnx_bytes
from .machine import matmul_rates
from .model import InferenceModel, Runner
from .quantize import QUANTIZED_BACKENDS, calibration_batches, quantize_static, quantized_backend_available
from .spec import TOP1_AGREEMENT, Backend, Precision
from .runners import OnnxRuntimeRunner, OpenVinoRunner, onnxruntime_available, openvino_available, torchscript_runner

PRECISIONS = tuple(p.value for p in Precision)
BACKENDS = tuple(b.value for b in Backend)
# Largest relative difference from the eager fp32 model that counts as the same outputs.
AGREEMENT = {"fp32": 1e-4, "bf16": 5e-2}
Images = Iterable[torch.Tensor] | torch.Tensor  # image batches, or one tensor of images


def optimize(model: nn.Module, precision: str = "fp32", example_input: torch.Tensor | None = None,
             backend: str = "auto", calibration: Images | None = None,
             validation: Images | None = None) -> InferenceModel:
    """Return the fastest inference version of ``model`` (left untouched) on its current device.

    ``fp32`` stays within 1e-4 of the eager model. ``bf16`` runs in bfloat16 (fast on CPUs with
    AVX512-BF16/AMX, and on the GPU; a warning says when this CPU's bf16 products are slower
    than fp32). ``int8`` applies dynamic int8 quantization to the linear maps (CPU, TorchScript).
    ``int8-static`` is ``quantize_static`` calibrated on ``calibration`` (CPU; ONNX Runtime,
    or NNCF's quantization in OpenVINO). ``auto`` builds every precision and backend
    that can run here, times them on ``example_input`` for a few seconds, and keeps the fastest
    whose outputs agree with fp32 (bf16 is skipped where this CPU's bf16 matrix products are
    slower than fp32). int8 enters ``auto`` only with ``validation`` images (static int8 also
    needs ``calibration``): an int8 candidate counts only if its top-1 class agrees with fp32's
    on at least ``TOP1_AGREEMENT`` of them; the result's ``agreement`` reports what was measured.
    ``example_input`` fixes the captured input size (default: the model's own, batch 1); any
    batch size works afterwards. ``backend``: ``onnxruntime`` or ``openvino`` (CPU: an in-memory
    ONNX export, PyTorch's thread count), ``torchscript`` (a frozen trace), ``nncf`` (static int8
    only), or ``auto``: where several installed backends run the precision, the fastest on
    ``example`` (ONNX Runtime led fp32 on AVX2 EPYCs, OpenVINO on AVX-512 ones: measured, not assumed).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision == "int8-static" and calibration is None:
        raise ValueError("int8-static needs calibration images (a folder of them: hybridvit.calibration_set)")
    device = next(model.parameters()).device
    if example_input is None:
        example_input = torch.zeros(1, model.in_chans, *model.input_hw, device=device)  # type: ignore[attr-defined]
    getattr(model, "check_input", lambda x: None)(example_input)
    fused = fuse(model).requires_grad_(False)
    data = _Int8Data(model, fused, calibration, validation)
    if precision == "auto":
        return _fastest(model, fused, example_input, _candidates(device, backend, data), data, gate=True)
    if precision == "bf16" and device.type == "cpu":
        _warn_if_slow_bf16()
    if backend == "auto":  # the backends that run this precision here, measured (not gated: it was asked for)
        pairs = [(precision, b) for b in _backends("auto") if supports(b, precision, device)]
        if len(pairs) > 1 or precision == "int8-static":
            return _fastest(model, fused, example_input, pairs, data, gate=False)
        backend = pairs[0][1] if pairs else "torchscript"
    if not supports(backend, precision, device):
        raise ValueError(f"the {backend} backend does not run {precision} on {device.type}")
    built = _build(model, fused, example_input, precision, backend, data)
    if data.validation is not None and precision.startswith("int8"):
        built.agreement = {f"{precision}/{backend}": data.agreement(built)}
    return built


def supports(backend: str, precision: str, device: torch.device) -> bool:
    """Whether ``backend`` can run ``precision`` on ``device`` (with what is installed, for static int8)."""
    if precision == "int8-static":
        return device.type == "cpu" and backend in QUANTIZED_BACKENDS and quantized_backend_available(backend)
    if backend == "torchscript":
        return precision != "int8" or device.type == "cpu"
    if device.type != "cpu":
        return False
    if backend == "onnxruntime":
        return precision == "fp32"
    return backend == "openvino" and precision in ("fp32", "bf16")


class _Int8Data:
    """Calibration and validation images for int8 candidates, with fp32's top-1 on the latter."""

    def __init__(self, model: nn.Module, fused: nn.Module, calibration: Images | None,
                 validation: Images | None) -> None:
        self.fused = fused
        self.calibration = calibration_batches(model, calibration) if calibration is not None else None
        self.validation = calibration_batches(model, validation) if validation is not None else None
        self.classes: int | None = getattr(model, "num_classes", None)  # logits first, then any embeddings
        self._expected: torch.Tensor | None = None

    def top1(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        assert self.validation is not None
        with torch.inference_mode():
            return torch.cat([fn(batch)[:, :self.classes].argmax(1) for batch in self.validation])

    def agreement(self, candidate: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """Share of the validation images whose top-1 class ``candidate`` shares with fp32."""
        if self._expected is None:
            self._expected = self.top1(lambda x: self.fused(x).float())
        return (self.top1(candidate) == self._expected).float().mean().item()


def _build(model: nn.Module, fused: nn.Module, example: torch.Tensor, precision: str, backend: str,
           data: _Int8Data | None = None) -> InferenceModel:
    if precision == "int8-static":
        assert data is not None and data.calibration is not None
        return quantize_static(model, data.calibration, backend=backend, static_batch=int(example.shape[0]))
    dtype = torch.bfloat16 if precision == "bf16" and backend == "torchscript" else torch.float32
    graph_model = fused
    if backend == "torchscript" and precision == "bf16":
        graph_model = copy.deepcopy(fused).to(dtype)  # Module.to is in place: other candidates share ``fused``
    elif precision == "int8":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao's notice: not the user's to act on
            graph_model = torch.ao.quantization.quantize_dynamic(fused, {nn.Linear}, dtype=torch.qint8)
    rewrite = precision == "fp32" and getattr(model, "cpu_graph_rewrite", False)

    def capture(example: torch.Tensor) -> Runner:
        if backend == "onnxruntime":
            return OnnxRuntimeRunner(onnx_bytes(fused, example))
        if backend == "openvino":
            return OpenVinoRunner(fused, example, precision)
        return torchscript_runner(graph_model, example.to(dtype), rewrite and example.device.type == "cpu")

    return InferenceModel(capture(example), model, dtype, precision, backend, example.shape[-2:], capture)


def _warn_if_slow_bf16() -> None:
    rates = matmul_rates()
    if rates["bf16"] < rates["fp32"]:
        warnings.warn(f"this CPU multiplies bf16 matrices at {rates['bf16']:.1f} GFLOP/s against {rates['fp32']:.1f} "
                      f"in fp32: bf16 will be slower than fp32 here (precision='auto' picks by measurement)",
                      RuntimeWarning, stacklevel=3)


def _backends(backend: str) -> list[str]:
    """The backends ``auto`` weighs: those installed here."""
    if backend != "auto":
        return [backend]
    available = {"onnxruntime": onnxruntime_available(), "openvino": openvino_available(), "torchscript": True,
                 "nncf": quantized_backend_available("nncf")}
    return [b for b in BACKENDS[1:] if available[b]]


def _candidates(device: torch.device, backend: str, data: _Int8Data | None = None) -> list[tuple[str, str]]:
    """(precision, backend) pairs worth timing here; int8 only with validation images to check it on."""
    precisions = ["fp32"]
    if device.type != "cpu" or matmul_rates()["bf16"] >= matmul_rates()["fp32"]:
        precisions.append("bf16")
    if data is not None and data.validation is not None:
        precisions.append("int8")
        if data.calibration is not None:
            precisions.append("int8-static")
    return [(p, b) for p in precisions for b in _backends(backend) if supports(b, p, device)]


def _fastest(model: nn.Module, fused: nn.Module, example: torch.Tensor, pairs: list[tuple[str, str]],
             data: _Int8Data, gate: bool, rounds: int = 3, round_s: float = 0.3) -> InferenceModel:
    """Build each candidate, drop those whose outputs disagree with the eager fp32 model (int8:
    with ``gate``, top-1 on fewer than ``TOP1_AGREEMENT`` of the validation images), time the
    rest in interleaved rounds on ``example`` and keep the fastest."""
    if not pairs:
        raise ValueError(f"no backend installed here runs {example.device.type} inference of this kind")
    x = torch.randn(example.shape, generator=torch.Generator().manual_seed(0)).to(example.device)
    with torch.inference_mode():
        reference = fused(x).float()
    built: dict[str, InferenceModel] = {}
    measured: dict[str, float] = {}  # nan: outputs disagreed
    agreement: dict[str, float] = {}
    for precision, b in pairs:
        key = f"{precision}/{b}"
        candidate = _build(model, fused, example, precision, b, data)
        if precision.startswith("int8"):
            if data.validation is not None:
                agreement[key] = data.agreement(candidate)
            agrees = not gate or agreement[key] >= TOP1_AGREEMENT
        else:
            agrees = ((candidate(x) - reference).abs().max() / reference.abs().max()).item() <= AGREEMENT[precision]
        if agrees:
            built[key] = candidate
        else:
            measured[key] = float("nan")
    if not built:
        raise RuntimeError("no inference path reproduced the model's fp32 outputs")
    speeds: dict[str, list[float]] = {key: [] for key in built}
    for _ in range(rounds):
        for key, candidate in built.items():
            speeds[key].append(_images_per_second(candidate, x, round_s))
    fastest = max(speeds, key=lambda key: statistics.median(speeds[key]))
    best = built[fastest]
    best.measured = {key: statistics.median(v) for key, v in speeds.items()} | measured
    best.agreement = agreement
    best.reason = _reason(fastest, best.measured, agreement, gate, data.validation is not None)
    return best


def _reason(chosen: str, measured: dict[str, float], agreement: dict[str, float], gate: bool,
            validated: bool) -> str:
    """Why ``auto`` kept ``chosen``: each other candidate's speed against it, and why any was
    left out (outputs that disagreed, int8 untried without validation images). Which wins,
    int8 or bf16, differs between CPUs (AMX-int8, VNNI, AVX2), so the sentence says what this
    machine measured."""
    rate = measured[chosen]
    parts = [f"{chosen} at {rate:,.0f} images/s"]
    for key, value in sorted(measured.items(), key=lambda kv: 0.0 if math.isnan(kv[1]) else -kv[1]):
        if key == chosen:
            continue
        if math.isnan(value):  # refused
            why = (f"top-1 agreed with fp32 on {agreement[key]:.1%} of the validation images "
                   f"({TOP1_AGREEMENT:.0%} needed)" if gate and key in agreement else "outputs differed from fp32")
            parts.append(f"{key} refused: {why}")
        else:
            parts.append(f"{key} {value:,.0f} ({value / rate:.2f}x)")
    if not validated and gate:
        parts.append("int8 not tried: no validation images to check its answers on")
    return "; ".join(parts)


def _images_per_second(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, seconds: float) -> float:
    fn(x)
    start, images = time.perf_counter(), 0
    while images == 0 or time.perf_counter() - start < seconds:
        fn(x)
        images += x.shape[0]
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return images / (time.perf_counter() - start)

