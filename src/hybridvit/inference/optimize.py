"""``optimize``: the fastest inference callable for a model on the machine at hand.

Which path is fastest depends on the CPU and its thread count (docs/benchmarks.md): ONNX
Runtime and OpenVINO run the fused model's ONNX export within a few percent of each other in
fp32 and beat the frozen TorchScript graph by 10-25%; bf16 is 1.7x fp32 on a CPU with
AVX512-BF16 and a hundred times slower on one without it. ``precision="auto"`` therefore
measures the candidates on this machine; an explicit ``bf16`` warns when this CPU multiplies
bf16 matrices slower than fp32 ones. The TorchScript path applies BatchNorm fusion, the
precomputed attention bias and the fastest attention path per shape (``layers.attention``),
then freezing, plus ``optimize_for_inference`` in fp32 for families whose
``cpu_graph_rewrite`` says it helped (LeViT: +14%; CvT, and LeViT in bf16: slower).
``torch.compile`` (inductor) was slower and takes ~30 s to compile, so it is not used.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import statistics
import time
import warnings
from typing import Callable

import torch
from torch import nn

from .export import onnx_bytes
from ..fusion import fuse
from .machine import matmul_rates
from .runners import (OnnxRuntimeRunner, OpenVinoRunner, onnxruntime_available, openvino_available,
                      torchscript_runner)

PRECISIONS = ("auto", "fp32", "bf16", "int8")
BACKENDS = ("auto", "onnxruntime", "openvino", "torchscript")
# Largest relative difference from the eager fp32 model that counts as the same outputs.
AGREEMENT = {"fp32": 1e-4, "bf16": 5e-2}


Runner = Callable[[torch.Tensor], torch.Tensor]
_SIZES_KEPT = 8  # captured graphs per input size (a server sees a handful of sizes)


class InferenceModel(nn.Module):
    """A captured, fused model: checks inputs like the original and returns float32 logits.

    A graph is captured for one input size. Given ``rebuild`` (input example -> runner), a new
    size captures another graph on its first call (about a second; the last few sizes are
    kept), so the model serves every size its source serves; without it other sizes are refused.
    ``measured`` holds images/s per ``precision/backend`` candidate when ``precision="auto"``
    chose this one (nan where a candidate's outputs disagreed with fp32).
    """

    def __init__(self, runner: Runner, source: nn.Module, dtype: torch.dtype, precision: str, backend: str,
                 input_hw: tuple[int, int], rebuild: Callable[[torch.Tensor], Runner] | None = None) -> None:
        super().__init__()
        self.runners: dict[tuple[int, int], Runner] = {tuple(input_hw): runner}
        self.rebuild = rebuild
        self.dtype = dtype
        self.precision = precision
        self.backend = backend
        self.model_name = getattr(source, "model_name", None)
        self._check_input = getattr(source, "check_input", None)
        self.measured: dict[str, float] = {}

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._check_input is not None:
            self._check_input(x)
        return self._runner_for(x)(x.to(self.dtype)).float()

    def _runner_for(self, x: torch.Tensor) -> Runner:
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        runner = self.runners.get(hw)
        if runner is not None:
            return runner
        if self.rebuild is None:
            h, w = next(iter(self.runners))
            raise ValueError(f"this {self.precision} {self.backend} model was captured for {h}x{w} inputs; got "
                             f"{hw[0]}x{hw[1]} (build it again at the size you serve)")
        if len(self.runners) >= _SIZES_KEPT:
            del self.runners[list(self.runners)[1]]  # the oldest extra size; the first is the one asked for
        runner = self.runners[hw] = self.rebuild(torch.zeros(1, *x.shape[1:], dtype=torch.float32, device=x.device))
        return runner


def optimize(model: nn.Module, precision: str = "fp32", example_input: torch.Tensor | None = None,
             backend: str = "auto") -> InferenceModel:
    """Return the fastest inference version of ``model`` (left untouched) on its current device.

    ``fp32`` stays within 1e-4 of the eager model. ``bf16`` runs in bfloat16 (fast on CPUs with
    AVX512-BF16/AMX, and on the GPU; a warning says when this CPU's bf16 products are slower
    than fp32). ``int8`` applies dynamic int8 quantization to the linear maps (CPU; for
    calibrated static int8 see ``hybridvit.quantize``). ``auto`` builds every precision and
    backend that can run here, times them on ``example_input`` for a few seconds, and keeps
    the fastest whose outputs agree with fp32 (bf16 is skipped where this CPU's bf16 matrix
    products are slower than fp32). ``example_input`` fixes the captured input size (default:
    the model's own, batch 1); any batch size works afterwards. ``backend``: ``onnxruntime``
    or ``openvino`` (CPU: an in-memory ONNX export, PyTorch's thread count), ``torchscript``
    (a frozen trace), or ``auto``: ONNX Runtime for fp32 on the CPU when installed,
    TorchScript otherwise (with ``precision="auto"``: measured).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = next(model.parameters()).device
    if example_input is None:
        example_input = torch.zeros(1, model.in_chans, *model.input_hw, device=device)  # type: ignore[attr-defined]
    getattr(model, "check_input", lambda x: None)(example_input)
    fused = fuse(model).requires_grad_(False)
    if precision == "auto":
        return _fastest(model, fused, example_input, backend)
    if backend == "auto":
        backend = "onnxruntime" if device.type == "cpu" and precision == "fp32" and onnxruntime_available() \
            else "torchscript"
    if not supports(backend, precision, device):
        raise ValueError(f"the {backend} backend does not run {precision} on {device.type}")
    if precision == "bf16" and device.type == "cpu":
        _warn_if_slow_bf16()
    return _build(model, fused, example_input, precision, backend)


def supports(backend: str, precision: str, device: torch.device) -> bool:
    """Whether ``backend`` can run ``precision`` on ``device``."""
    if backend == "torchscript":
        return precision != "int8" or device.type == "cpu"
    if device.type != "cpu":
        return False
    if backend == "onnxruntime":
        return precision == "fp32"
    return precision in ("fp32", "bf16")  # openvino


def _build(model: nn.Module, fused: nn.Module, example: torch.Tensor, precision: str, backend: str) -> InferenceModel:
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


def _candidates(device: torch.device, backend: str) -> list[tuple[str, str]]:
    """(precision, backend) pairs worth timing here; int8 changes outputs too much to be picked blindly."""
    precisions = ["fp32"]
    if device.type != "cpu" or matmul_rates()["bf16"] >= matmul_rates()["fp32"]:
        precisions.append("bf16")
    available = {"onnxruntime": onnxruntime_available(), "openvino": openvino_available(), "torchscript": True}
    backends = [b for b in BACKENDS[1:] if available[b]] if backend == "auto" else [backend]
    return [(p, b) for p in precisions for b in backends if supports(b, p, device)]


def _fastest(model: nn.Module, fused: nn.Module, example: torch.Tensor, backend: str, rounds: int = 3,
             round_s: float = 0.3) -> InferenceModel:
    """Build each candidate, drop those whose outputs disagree with the eager fp32 model, time
    the rest in interleaved rounds on ``example`` and keep the fastest."""
    x = torch.randn(example.shape, generator=torch.Generator().manual_seed(0)).to(example.device)
    with torch.inference_mode():
        reference = fused(x).float()
    built: dict[str, InferenceModel] = {}
    measured: dict[str, float] = {}  # nan: outputs disagreed
    for precision, b in _candidates(example.device, backend):
        candidate = _build(model, fused, example, precision, b)
        error = ((candidate(x) - reference).abs().max() / reference.abs().max()).item()
        if error <= AGREEMENT[precision]:
            built[f"{precision}/{b}"] = candidate
        else:
            measured[f"{precision}/{b}"] = float("nan")
    if not built:
        raise RuntimeError("no inference path reproduced the model's fp32 outputs")
    speeds: dict[str, list[float]] = {key: [] for key in built}
    for _ in range(rounds):
        for key, candidate in built.items():
            speeds[key].append(_images_per_second(candidate, x, round_s))
    fastest = max(speeds, key=lambda key: statistics.median(speeds[key]))
    best = built[fastest]
    best.measured = {key: statistics.median(v) for key, v in speeds.items()} | measured
    return best


def _images_per_second(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, seconds: float) -> float:
    fn(x)
    start, images = time.perf_counter(), 0
    while images == 0 or time.perf_counter() - start < seconds:
        fn(x)
        images += x.shape[0]
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return images / (time.perf_counter() - start)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def tune_cpu_allocator() -> bool:
    """Keep freed memory in glibc's heap, process-wide: no page faults per forward pass.

    With glibc's defaults every activation above the (adaptive) mmap threshold is a fresh
    ``mmap`` whose pages fault on first touch, and freed heap tops go back to the OS; on our
    2-core machine that cost LeViT models up to a third of their CPU throughput, depending on
    what ran before in the process (docs/benchmarks.md). This is the glibc counterpart of the
    jemalloc/tcmalloc advice in PyTorch's CPU tuning guide: the process keeps its peak memory.
    Returns False where the C library is not glibc (nothing is changed).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
