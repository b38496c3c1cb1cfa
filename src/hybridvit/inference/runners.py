"""Backends that run a fused model: a frozen TorchScript graph, ONNX Runtime, OpenVINO.

Each takes the fused model and an example input and returns a callable from an input
tensor to output logits. Which one is fastest depends on the CPU and the thread count
(docs/benchmarks.md), so ``optimize`` can measure them against each other.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator

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


class _SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextmanager
def keep_signal_stack() -> Iterator[None]:
    """Give the calling thread its alternate signal stack back after the block (Linux).

    Compiling an OpenVINO model (2026.4) installs a signal stack of its own on the calling thread and
    puts back the one it found when the model is freed. Two models freed in the order they were
    compiled leave a freed stack installed; Python's signal handlers run on that stack
    (SA_ONSTACK), so the next Ctrl-C killed the process with SIGSEGV, not KeyboardInterrupt. With
    the stack given back at once, each model later restores the process's own stack.
    """
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    saved = _SignalStack()
    known = libc.sigaltstack(None, ctypes.byref(saved)) == 0
    try:
        yield
    finally:
        if known:
            libc.sigaltstack(ctypes.byref(saved), None)


class OpenVinoRunner:
    """A model compiled by OpenVINO's CPU plugin: one stream, latency hint, PyTorch's thread
    count, and fp32 or bf16 arithmetic as asked (no silent down-cast; int8 where the graph says
    so). ``model``: a fused module (exported to ONNX on ``example``), ONNX bytes (such as a QDQ
    int8 model) or an ``openvino.Model`` (such as NNCF's int8 model).

    ``static_batch`` (default: ``example``'s batch size, when it has more than one image): that
    batch size is also compiled with every shape fixed, and batches of exactly that size run
    there; others run in the graph with a free batch size. Fixed shapes let the plugin plan
    each layer's memory and kernels once: LeViT-128S at batch 16 ran 3-8% faster (bf16 and
    f32, 1 and 2 threads; docs/benchmarks.md). A compile costs about 0.15 s and a copy of the
    weights, so only the batch the caller names is fixed (``predict``'s batch size).
    ``perf_count``: keep OpenVINO's per-node counters (``profiling_info``; ``bench.profile``).
    Each calling thread gets infer requests of its own, so it may be called from several.
    Threads are not pinned: pinned, every one-thread model took the same core, and two of them
    in lanes beside decoding threads ran no faster than one (docs/benchmarks.md)."""

    def __init__(self, model: nn.Module | bytes | Any, example: torch.Tensor | None = None,
                 precision: str = "fp32", static_batch: int | None = None, perf_count: bool = False) -> None:
        import openvino as ov

        from .export import onnx_bytes

        core = ov.Core()
        if isinstance(model, nn.Module):
            if example is None:
                raise ValueError("an example input is needed to export a module for OpenVINO")
            model = onnx_bytes(model, example)
        if isinstance(model, bytes):
            model = core.read_model(model, b"")
        if static_batch is None and example is not None:
            static_batch = int(example.shape[0])
        config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                  "ENABLE_CPU_PINNING": False, "PERF_COUNT": perf_count}
        if precision != "default":  # "default": the plugin's own choice (bf16 where the CPU has it), as a peer runs
            config["INFERENCE_PRECISION_HINT"] = {"fp32": "f32", "bf16": "bf16"}[precision]
        with keep_signal_stack():
            self.compiled = {None: core.compile_model(model, "CPU", config)}
            if static_batch is not None and static_batch > 1 and model.inputs[0].partial_shape[0].is_dynamic:
                fixed = model.clone()
                shape = model.inputs[0].partial_shape
                fixed.reshape({fixed.inputs[0]: ov.PartialShape([static_batch, *list(shape)[1:]])})
                self.compiled[static_batch] = core.compile_model(fixed, "CPU", config)
        hint = str(self.compiled[None].get_property("INFERENCE_PRECISION_HINT"))
        self.precision = "bf16" if "bfloat16" in hint else "fp16" if "f16" in hint else "fp32"  # what it computes in
        self._local = threading.local()
        self._request(None)  # the calling thread's, now: a first request costs the first call nothing

    def _request(self, batch: int | None) -> Any:
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = {}
        request = requests.get(batch)
        if request is None:
            with keep_signal_stack():
                request = requests[batch] = self.compiled[batch].create_infer_request()
        return request

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._request(self._graph(x.shape[0])).infer({0: x.contiguous().numpy()})[0].copy())

    def _graph(self, batch: int) -> int | None:
        return batch if batch in self.compiled else None

    def profiling_info(self, batch: int) -> list[tuple[str, str, str, float]]:
        """(node, op type, kernel, ms) of each node this thread's last call at ``batch`` executed
        (compiled with ``perf_count``)."""
        executed = []
        for node in self._request(self._graph(batch)).profiling_info:
            if node.status == node.Status.EXECUTED:
                executed.append((node.node_name, node.node_type, node.exec_type,
                                 node.real_time.total_seconds() * 1e3))
        return executed


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
