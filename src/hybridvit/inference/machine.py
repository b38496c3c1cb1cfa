"""This machine's own matrix-multiply rate: the ceiling a model's MAC count puts on its speed.

CPUs of one kind differ by 1.5x and more in fp32, bf16 and int8 matrix-multiply rates (an
AVX2 EPYC runs bf16 through a slow fallback; an AVX512-BF16 Xeon can run it slower than its
fp32). A throughput figure only means something next to the rate of the machine it came
from, so the benchmark measures the rate in the same run, at the same thread count, and
reports each row as a share of ``rate / (2 * MACs)`` images/s.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator

import torch

from .runners import onnxruntime_available

# Square products of this size run at the kernels' peak (measured from 256 to 2048) while a
# slow bf16 fallback still finishes one in a fraction of a second.
SIZE = 512


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads (None: as they are), then give the caller
    back its own count: the count is process-wide, so a library call must not leave it changed."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _rate(run, flops: float, seconds: float) -> float:
    """GFLOP/s (GOP/s for int8) of ``run``: best of short repeated windows after a warm-up."""
    run()
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        start, count = time.perf_counter(), 0
        while count == 0 or time.perf_counter() - start < seconds / 5:
            run()
            count += 1
        best = max(best, flops * count / (time.perf_counter() - start) / 1e9)
        if time.perf_counter() >= deadline:
            return best


def _torch_rate(dtype: torch.dtype, seconds: float) -> float:
    a, b = torch.randn(SIZE, SIZE).to(dtype), torch.randn(SIZE, SIZE).to(dtype)
    return _rate(lambda: torch.mm(a, b), 2 * SIZE**3, seconds)


def _onnxruntime_rate(integer: bool, seconds: float) -> float | None:
    """ONNX Runtime's product, u8 x s8 (``MatMulInteger``, the kernel its int8 models run) or
    fp32 (``MatMul``); None without it."""
    if not onnxruntime_available():
        return None
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from .export import onnxruntime_session

    rng = np.random.default_rng(0)
    if integer:
        weight = rng.integers(-127, 127, (SIZE, SIZE), dtype=np.int8)
        a = rng.integers(0, 255, (SIZE, SIZE), dtype=np.uint8)
        op, types = "MatMulInteger", (TensorProto.UINT8, TensorProto.INT32)
    else:
        weight = rng.standard_normal((SIZE, SIZE)).astype(np.float32)
        a = rng.standard_normal((SIZE, SIZE)).astype(np.float32)
        op, types = "MatMul", (TensorProto.FLOAT, TensorProto.FLOAT)
    graph = helper.make_graph([helper.make_node(op, ["A", "B"], ["C"])], "mm",
                              [helper.make_tensor_value_info("A", types[0], [SIZE, SIZE])],
                              [helper.make_tensor_value_info("C", types[1], [SIZE, SIZE])],
                              [numpy_helper.from_array(weight, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = onnxruntime_session(model.SerializeToString(), torch.get_num_threads(), spinning=False)
    return _rate(lambda: session.run(None, {"A": a}), 2 * SIZE**3, seconds)


@functools.lru_cache(maxsize=None)
def _cached(threads: int, seconds: float) -> dict[str, float | None]:
    fp32 = max(_torch_rate(torch.float32, seconds), _onnxruntime_rate(False, seconds) or 0.0)
    return {"fp32": fp32, "bf16": _torch_rate(torch.bfloat16, seconds), "int8": _onnxruntime_rate(True, seconds)}


def matmul_rates(seconds: float = 0.5) -> dict[str, float | None]:
    """GFLOP/s of a square matrix product per precision at the current thread count (cached
    per thread count), from the fastest kernel at hand: fp32 the faster of PyTorch's and ONNX
    Runtime's (on a Zen 5 EPYC PyTorch's ran at 115 GFLOP/s, ONNX Runtime's at 266, and both
    runtimes ran LeViT at 1.7x the lower figure), bf16 PyTorch's (oneDNN's AVX512-BF16 and AMX
    kernels; OpenVINO's ran below it), int8 ONNX Runtime's u8 x s8 (VNNI, AMX)."""
    return dict(_cached(torch.get_num_threads(), seconds))


# The instruction sets that decide which kernels a CPU runtime picks for each precision.
MATMUL_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_features() -> list[str]:
    """Which of ``MATMUL_FEATURES`` this CPU has (from /proc/cpuinfo; empty where it cannot be read):
    bf16 and int8 rates, and the runtime that wins, differ across them by 2x and more."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [feature for feature in MATMUL_FEATURES if feature in flags]


def bound_share(images_per_second: float, macs: float, rate_gflops: float | None) -> float | None:
    """Fraction of the images/s that ``rate_gflops`` allows a model of ``macs`` MACs per image."""
    if not rate_gflops or not macs:
        return None
    return images_per_second * 2 * macs / (rate_gflops * 1e9)
