"""Images/s and latency, measured the paper's way (LeViT §5.1) and interleaved across candidates.

CPU: ``threads`` threads (1 in the paper), batch 16. GPU: the largest power-of-two batch
that fits, mixed precision. Each candidate gets a warm-up, then its timed window is split
into short rounds run round-robin with the other candidates; throughput = images / total
timed seconds (the paper's figure), and ratios are medians of per-round paired ratios, so that
a noisy shared machine hits both sides of a comparison alike.
"""

from __future__ import annotations

import math
import platform
import resource
import statistics
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..api import create_model
from ..optimize import onnxruntime_available, optimize, tune_cpu_allocator
from ..registry import get_model_info


@dataclass
class Candidate:
    """One row: a callable on an input batch, and what to call it."""

    name: str
    build: Callable[[], Callable[[torch.Tensor], Any]]  # built lazily (some are large)
    input_hw: tuple[int, int]
    source: str  # "hybridvit" or the reference it stands for
    model: str  # the architecture measured (rows of one architecture are compared)
    paper_top1: float | None = None
    dtype: torch.dtype = torch.float32


@dataclass
class BenchResult:
    name: str
    source: str
    model: str
    batch: int
    images_per_second: float
    round_images_per_second: list[float]
    latency_ms_median: float
    latency_ms_p90: float
    peak_memory_mb: float | None
    paper_top1: float | None


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    import timm

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "threads": threads, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _largest_batch(fn: Callable, make_input: Callable[[int], torch.Tensor], device: torch.device, cap: int = 4096) -> int:
    """Largest power-of-two batch that runs without running out of GPU memory."""
    batch, best = 1, 1
    while batch <= cap:
        try:
            fn(make_input(batch))
            _sync(device)
            best = batch
            batch *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return best


def paired_ratio(ours: BenchResult, reference: BenchResult) -> float:
    """Median over rounds of the two throughputs' ratio: rounds run back to back, so a slow
    spell of a shared machine hits both sides of each pair alike."""
    return statistics.median(a / b for a, b in zip(ours.round_images_per_second, reference.round_images_per_second))


def benchmark(candidates: list[Candidate], device: str = "cpu", threads: int = 1, batch: int = 16,
              warmup_s: float = 10.0, time_s: float = 60.0, rounds: int = 20, latency_runs: int = 30,
              progress: Callable[[str], None] | None = None,
              tuned_allocator: bool = False) -> tuple[list[BenchResult], dict[str, Any]]:
    """Measure every candidate; returns the rows and the machine description.

    ``tuned_allocator`` applies ``tune_cpu_allocator`` first, so that no candidate pays page
    faults; otherwise they run on the C library's defaults, whose state depends on what ran
    earlier in the process (docs/benchmarks.md).
    """
    dev = torch.device(device)
    allocator = "C library defaults"
    if dev.type == "cpu":
        torch.set_num_threads(threads)
        if tuned_allocator:
            allocator = "glibc tuned (no mmap, no trim)" if tune_cpu_allocator() else "tuning unsupported: defaults"
    rows = _measure(candidates, dev, batch, warmup_s, time_s, rounds, latency_runs, progress)
    info = machine_info(dev, threads)
    info["allocator"] = allocator
    info["process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return rows, info


def _measure(candidates: list[Candidate], dev: torch.device, batch: int, warmup_s: float, time_s: float, rounds: int,
             latency_runs: int, progress: Callable[[str], None] | None) -> list[BenchResult]:
    """Build and warm up every candidate, then time them in interleaved rounds."""
    built, results = [], {}
    for c in candidates:
        if progress:
            progress(f"preparing {c.name} ({c.source})")
        fn = c.build()

        def make_input(b: int, c: Candidate = c) -> torch.Tensor:
            return torch.randn(b, 3, *c.input_hw, device=dev).to(c.dtype)

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        b = _largest_batch(fn, make_input, dev) if dev.type == "cuda" else batch
        x = make_input(b)
        start = time.perf_counter()
        while time.perf_counter() - start < warmup_s or time.perf_counter() == start:
            fn(x)
            _sync(dev)
        built.append((c, fn, x, b))
        results[c.name] = {"seconds": 0.0, "images": 0, "rounds": []}
    per_round = time_s / rounds
    for r in range(rounds):
        for c, fn, x, b in built:
            if progress:
                progress(f"round {r + 1}/{rounds}: {c.name}")
            start, images = time.perf_counter(), 0
            while True:
                fn(x)
                _sync(dev)
                images += b
                if time.perf_counter() - start >= per_round:
                    break
            seconds = time.perf_counter() - start
            results[c.name]["seconds"] += seconds
            results[c.name]["images"] += images
            results[c.name]["rounds"].append(images / seconds)
    rows = []
    for c, fn, x, b in built:
        one = x[:1]
        times = []
        for _ in range(latency_runs):
            start = time.perf_counter()
            fn(one)
            _sync(dev)
            times.append((time.perf_counter() - start) * 1e3)
        peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
        r = results[c.name]
        rows.append(BenchResult(c.name, c.source, c.model, b, r["images"] / r["seconds"], r["rounds"],
                                *latency_summary(times), peak, c.paper_top1))
    return rows


def latency_summary(times_ms: list[float]) -> tuple[float, float]:
    """Median and 90th percentile (nearest rank: the smallest time at least 90% of runs do not exceed)."""
    ordered = sorted(times_ms)
    return statistics.median(ordered), ordered[math.ceil(0.9 * len(ordered)) - 1]


def hybridvit_candidates(name: str, precision: str, device: str) -> list[Candidate]:
    """Our model through ``optimize``; in fp32 on the CPU with ONNX Runtime installed, both
    backends (``auto`` picks ONNX Runtime; the TorchScript row shows the pure-PyTorch path)."""
    info = get_model_info(name)
    hw = info.input_size[1:]
    on_gpu = torch.device(device).type == "cuda"

    def build(backend: str):
        def make():
            model = create_model(name).to(device).eval()
            if on_gpu:  # the paper's GPU protocol: AMP (fp16) on the fused model
                from ..fusion import fuse

                fused = fuse(model)

                def run(x):
                    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
                        return fused(x)
                return run
            return optimize(model, precision, torch.zeros(1, 3, *hw, device=device), backend=backend)
        return make

    if not on_gpu and precision == "fp32" and onnxruntime_available():
        backends = {f"{name} (onnxruntime)": "onnxruntime", f"{name} (torchscript)": "torchscript"}
    else:
        backends = {name if precision == "fp32" else f"{name} ({precision})": "auto"}
    return [Candidate(label, build(b), hw, "hybridvit", name, info.paper_top1) for label, b in backends.items()]


def _amp(device: str):
    """The paper's GPU protocol runs references under fp16 autocast; CPU runs fp32."""
    return torch.autocast("cuda", dtype=torch.float16) if torch.device(device).type == "cuda" else nullcontext()


def eager(model_fn: Callable[[], torch.nn.Module], device: str, output: Callable[[Any], Any] = lambda o: o):
    """A reference model run as its authors ship it (eager, eval mode, no gradients)."""
    def build():
        model = model_fn().to(device).eval()

        def run(x):
            with torch.inference_mode(), _amp(device):
                return output(model(x))
        return run
    return build


def traced(model_fn: Callable[[], torch.nn.Module], hw: tuple[int, int], device: str):
    """A reference model jit-traced, as the paper's speed test does for every row."""
    def build():
        model = model_fn().to(device).eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = torch.jit.trace(model, torch.zeros(1, 3, *hw, device=device))

        def run(x):
            with torch.inference_mode(), _amp(device):
                return graph(x)
        return run
    return build
