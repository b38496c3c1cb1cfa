"""Backends that run a fused model: a frozen TorchScript graph, ONNX Runtime, OpenVINO.

Each takes the fused model and an example input and returns a callable from an input
tensor to output logits. Which one is fastest depends on the CPU and the thread count
(docs/benchmarks.md), so ``optimize`` can measure them against each other.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Callable

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
    """An ONNX export of the fused model in ONNX Runtime's CPU provider, with as many threads
    as PyTorch's; its workers do not spin between runs, so they do not slow what runs next."""

    def __init__(self, fused: nn.Module, example: torch.Tensor) -> None:
        from .export import onnx_bytes, onnxruntime_session

        self.session = onnxruntime_session(onnx_bytes(fused, example), torch.get_num_threads(), spinning=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"images": x.contiguous().numpy()})[0])


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
        graph = torch.jit.freeze(torch.jit.trace(fused, example))
        if rewrite:
            graph = torch.jit.optimize_for_inference(graph)
    return graph
