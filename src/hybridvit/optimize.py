"""``optimize``: the fastest inference callable we measured for a model on its device.

Measured on CPU (single thread, batch 16; see docs/benchmarks.md): fp32 runs fastest as an
ONNX export in ONNX Runtime when that is installed. The TorchScript path (bf16, int8, GPU,
or fp32 without ONNX Runtime) applies BatchNorm fusion, the
precomputed attention bias and the fastest attention path per shape (``layers.attention``),
then TorchScript tracing with freezing, plus ``optimize_for_inference`` (oneDNN weight
prepacking, convolution/activation fusion) in fp32 for families whose ``cpu_graph_rewrite``
says it helped (LeViT: +14%; CvT, and LeViT in bf16: slower). ``torch.compile`` (inductor)
was slower here and takes ~30 s to compile, so it is not used. Tokens stay token-major
``(B, N, C)``: on CPU the linear maps are then plain matrix products, which beat the
1x1-convolution ``(B, C, H, W)`` form.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import warnings
from typing import Callable

import torch
from torch import nn

from .fusion import fuse

PRECISIONS = ("fp32", "bf16", "int8")
BACKENDS = ("auto", "torchscript", "onnxruntime")


class InferenceModel(nn.Module):
    """A captured, fused model: checks inputs like the original and returns float32 logits."""

    def __init__(self, runner: Callable[[torch.Tensor], torch.Tensor], source: nn.Module, dtype: torch.dtype,
                 precision: str, backend: str) -> None:
        super().__init__()
        self.runner = runner
        self.dtype = dtype
        self.precision = precision
        self.backend = backend
        self.model_name = getattr(source, "model_name", None)
        self._check_input = getattr(source, "check_input", None)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._check_input is not None:
            self._check_input(x)
        return self.runner(x.to(self.dtype)).float()


class _OnnxRuntimeRunner:
    """Runs an ONNX export of the fused model in ONNX Runtime's CPU provider."""

    def __init__(self, fused: nn.Module, example: torch.Tensor) -> None:
        from .export import onnx_bytes, onnxruntime_session

        self.session = onnxruntime_session(onnx_bytes(fused, example), torch.get_num_threads())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"images": x.contiguous().numpy()})[0])


def onnxruntime_available() -> bool:
    """Both halves of the ONNX Runtime backend are installed: the exporter's ``onnx`` and the runtime."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def optimize(model: nn.Module, precision: str = "fp32", example_input: torch.Tensor | None = None,
             backend: str = "auto") -> InferenceModel:
    """Return the fastest inference version of ``model`` (left untouched) on its current device.

    ``fp32`` stays within 1e-5 of the eager model. ``bf16`` runs in bfloat16 (CPUs with
    AVX512-BF16/AMX, or the GPU). ``int8`` applies dynamic int8 quantization to the linear
    maps (CPU only). ``example_input`` fixes the captured input size (default: the model's
    own size, batch 1); any batch size works afterwards. ``backend``: ``torchscript`` (a
    frozen trace), ``onnxruntime`` (CPU fp32: an in-memory ONNX export run by ONNX Runtime,
    whose threads follow ``torch.get_num_threads()``), or ``auto``: ONNX Runtime for fp32 on
    the CPU when it and ``onnx`` are installed (13-16% faster than TorchScript there), TorchScript
    otherwise.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = next(model.parameters()).device
    if backend == "auto":
        cpu_fp32 = device.type == "cpu" and precision == "fp32"
        backend = "onnxruntime" if cpu_fp32 and onnxruntime_available() else "torchscript"
    if backend == "onnxruntime" and (device.type != "cpu" or precision != "fp32"):
        raise ValueError("the onnxruntime backend runs fp32 on the CPU")
    if example_input is None:
        example_input = torch.zeros(1, model.in_chans, *model.input_hw, device=device)  # type: ignore[attr-defined]
    getattr(model, "check_input", lambda x: None)(example_input)
    fused = fuse(model).requires_grad_(False)
    if backend == "onnxruntime":
        return InferenceModel(_OnnxRuntimeRunner(fused, example_input), model, torch.float32, precision, backend)
    dtype = torch.float32
    if precision == "bf16":
        dtype = torch.bfloat16
        fused = fused.to(dtype)
    elif precision == "int8":
        if device.type != "cpu":
            raise ValueError("int8 (dynamic quantization) runs on the CPU; move the model to the CPU first")
        fused = torch.ao.quantization.quantize_dynamic(fused, {nn.Linear}, dtype=torch.qint8)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # input checks run outside the graph
        graph = torch.jit.freeze(torch.jit.trace(fused, example_input.to(dtype)))
        if device.type == "cpu" and precision == "fp32" and getattr(model, "cpu_graph_rewrite", False):
            graph = torch.jit.optimize_for_inference(graph)
    return InferenceModel(graph, model, dtype, precision, backend)


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
