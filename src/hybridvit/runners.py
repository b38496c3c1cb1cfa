"""Backends that run a fused model: a frozen TorchScript graph, ONNX Runtime, OpenVINO.

Each takes the fused model and an example input and returns a callable from an input
tensor to output logits. Which one is fastest depends on the CPU and the thread count
(docs/benchmarks.md), so ``optimize`` can measure them against each other.
"""

from __future__ import annotations

import importlib.util
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
from torch import nn

Runner = Callable[[torch.Tensor], torch.Tensor]


def installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def onnxruntime_available() -> bool:
    """Both halves of the ONNX Runtime backend are installed: the exporter's ``onnx`` and the runtime."""
    return installed("onnx", "onnxruntime")


def openvino_available() -> bool:
    return installed("onnx", "openvino")


class OnnxRuntimeRunner:
    """An ONNX model (the fused model's export, or its static int8 version) in ONNX Runtime's
    CPU provider, with PyTorch's thread count; its workers do not spin between runs, so they
    do not slow what runs next.

    With several threads, a batch of at least one image per thread runs as that many
    single-threaded slices at once (ONNX Runtime sessions may be run concurrently): LeViT's
    and CvT's matrices are small, and splitting each across threads lost 7-13% of throughput
    at 2 threads against slicing the batch (docs/benchmarks.md). Smaller batches (latency)
    use the intra-op threads.
    """

    def __init__(self, model: bytes) -> None:
        from .export import onnxruntime_session

        self.threads = torch.get_num_threads()
        self.session = onnxruntime_session(model, self.threads, spinning=False)
        if self.threads > 1:
            self.single = onnxruntime_session(model, 1, spinning=False)
            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="hybridvit-ort")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        images = x.contiguous().numpy()
        if self.threads == 1 or len(images) < self.threads:
            return torch.from_numpy(self.session.run(None, {"images": images})[0])
        slices = np.array_split(images, self.threads)
        return torch.from_numpy(np.concatenate(list(self.pool.map(self._run_single, slices))))

    def _run_single(self, images: np.ndarray) -> np.ndarray:
        return self.single.run(None, {"images": images})[0]


class OpenVinoRunner:
    """The same ONNX export compiled by OpenVINO's CPU plugin: one stream, latency hint,
    PyTorch's thread count, and fp32 or bf16 arithmetic as asked (no silent down-cast)."""

    def __init__(self, fused: nn.Module, example: torch.Tensor, precision: str = "fp32") -> None:
        import openvino as ov

        from .export import onnx_bytes

        core = ov.Core()
        compiled = core.compile_model(core.read_model(onnx_bytes(fused, example), b""), "CPU", {
            "INFERENCE_NUM_THREADS": torch.get_num_threads(), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision]})
        self.request = compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.request.infer({0: x.contiguous().numpy()})[0].copy())


def torchscript_runner(fused: nn.Module, example: torch.Tensor, rewrite: bool) -> Runner:
    """A frozen trace; ``rewrite`` adds ``optimize_for_inference`` (oneDNN prepacking and
    convolution fusion), which helps LeViT in fp32 and slows CvT and bf16."""
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # input checks run outside the graph; torch.jit's deprecation notice is not the user's to act on
        warnings.simplefilter("ignore")
        fused(example)  # fills size-dependent caches (LeViT's biases at another size): constants in the trace
        graph = torch.jit.freeze(torch.jit.trace(fused, example))
        if rewrite:
            graph = torch.jit.optimize_for_inference(graph)
    return graph
