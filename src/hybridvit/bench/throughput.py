"""Images/s and latency, measured the paper's way (LeViT §5.1) and interleaved across candidates.

CPU: ``threads`` threads (1 in the paper), batch 16. Every candidate gets a warm-up, then its
timed window is split into rounds run round-robin with the other candidates; throughput =
images / total timed seconds (the paper's figure), and ratios are medians of per-round paired
ratios, so that a noisy shared machine hits both sides of a comparison alike. Each row is also
given as a share of what the machine's own matrix-multiply rate (measured in the same run, at
the same thread count and precision) allows its MACs. GPU: the largest power-of-two batch that
fits, each candidate measured alone (built, probed, timed, released), so that neither its
batch nor its peak memory depends on the others; ``fp16`` is the paper's protocol (AMP).
"""

from __future__ import annotations

import gc
import math
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..checks import check_range
from ..inference.machine import bound_share, cpu_features, matmul_rates, torch_threads
from ..inference.optimize import tune_cpu_allocator

Progress = Callable[[str, int, int], None]  # description, steps done, steps in all


@dataclass
class Candidate:
    """One row: a callable on an input batch, and what to call it."""

    name: str
    build: Callable[[], Callable[[torch.Tensor], Any]]  # built lazily (some are large)
    input_hw: tuple[int, int]
    source: str  # "hybridvit" or the reference it stands for
    model: str  # the architecture measured (rows of one architecture are compared)
    paper_top1: float | None = None
    precision: str = "fp32"
    macs: int | None = None  # per image; gives the row's share of the matrix-multiply bound


@dataclass
class BenchResult:
    name: str
    source: str
    model: str
    precision: str
    batch: int
    images_per_second: float
    round_images_per_second: list[float]
    latency_ms_median: float
    latency_ms_p90: float
    peak_memory_mb: float | None
    paper_top1: float | None
    macs: int | None = None
    bound_share: float | None = None


class DeviceOps:
    """What the measurement asks of a device. Tests stand in for a GPU with a subclass."""

    out_of_memory: type[BaseException] = torch.OutOfMemoryError

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_gpu = device.type == "cuda"

    def sync(self) -> None:
        if self.is_gpu:
            torch.cuda.synchronize(self.device)

    def release(self) -> None:
        """Return cached blocks after a candidate (or a probe that ran out of memory) is done."""
        gc.collect()
        if self.is_gpu:
            torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        if self.is_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mb(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.is_gpu else None

    def make_input(self, batch: int, hw: tuple[int, int]) -> torch.Tensor:
        return torch.randn(batch, 3, *hw, device=self.device)


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    import timm

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_features": " ".join(cpu_features()), "threads": threads,
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "date": time.strftime("%Y-%m-%d")}
    for module in ("onnxruntime", "openvino"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def paired_ratio(ours: BenchResult, reference: BenchResult) -> float:
    """Median over rounds of the two throughputs' ratio: rounds run back to back, so a slow
    spell of a shared machine hits both sides of each pair alike."""
    return statistics.median(a / b for a, b in zip(ours.round_images_per_second, reference.round_images_per_second))


@dataclass
class Plan:
    """How long to measure: warm-up and timed seconds per candidate, rounds, batch-1 runs."""

    batch: int = 16
    warmup_s: float = 2.0
    time_s: float = 6.0
    rounds: int = 3
    latency_runs: int = 30

    def __post_init__(self) -> None:  # named as the benchmark command's options
        check_range("batch", self.batch, 1)
        check_range("warmup", self.warmup_s, 0)
        check_range("time", self.time_s, 0, low_open=True)
        check_range("rounds", self.rounds, 1)
        check_range("latency_runs", self.latency_runs, 1)


def benchmark(candidates: list[Candidate], device: str = "cpu", threads: int = 1, plan: Plan | None = None,
              progress: Progress | None = None, tuned_allocator: bool = False,
              ops: DeviceOps | None = None) -> tuple[list[BenchResult], dict[str, Any]]:
    """Measure every candidate; returns the rows and the machine description (with its
    matrix-multiply rates on CPU).

    ``tuned_allocator`` applies ``tune_cpu_allocator`` first, so that no candidate pays page
    faults; otherwise they run on the C library's defaults, whose state depends on what ran
    earlier in the process (docs/benchmarks.md).
    """
    check_range("threads", threads, 1)
    plan = plan or Plan()
    ops = ops or DeviceOps(torch.device(device))
    allocator = "C library defaults"
    rates: dict[str, float | None] = {}
    steps = _Steps(progress, len(candidates) * (plan.rounds + 2))
    if ops.is_gpu:  # one at a time: nothing else resident while its batch is probed and timed
        rows = []
        for c in candidates:
            rows += _time([_prepare(c, ops, plan, steps)], ops, plan, steps)
            ops.release()
    else:
        with torch_threads(threads):  # the caller gets its own thread count back
            if tuned_allocator:
                allocator = "glibc tuned (no mmap, no trim)" if tune_cpu_allocator() else "tuning unsupported: defaults"
            rates = matmul_rates()
            rows = _time([_prepare(c, ops, plan, steps) for c in candidates], ops, plan, steps)
    for row in rows:
        row.bound_share = bound_share(row.images_per_second, row.macs, rates.get(row.precision.split("-")[0]))
    info = machine_info(ops.device, threads)
    info["allocator"] = allocator
    info["matmul_gflops"] = rates
    info["process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return rows, info


class _Steps:
    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self, description: str) -> None:
        if self.progress:
            self.progress(description, self.done, self.total)
        self.done += 1


@dataclass
class _Prepared:
    candidate: Candidate
    fn: Callable[[torch.Tensor], Any]
    x: torch.Tensor


def _prepare(c: Candidate, ops: DeviceOps, plan: Plan, steps: _Steps) -> _Prepared:
    """Build ``c``, pick its batch (the largest that fits on GPU) and warm it up."""
    steps(f"preparing {c.name}")
    fn = c.build()
    batch = _largest_batch(fn, c.input_hw, ops) if ops.is_gpu else plan.batch
    x = ops.make_input(batch, c.input_hw)
    start = time.perf_counter()
    while True:
        fn(x)
        ops.sync()
        if time.perf_counter() - start >= plan.warmup_s:
            break
    ops.reset_peak()
    return _Prepared(c, fn, x)


def _largest_batch(fn: Callable, hw: tuple[int, int], ops: DeviceOps, cap: int = 4096) -> int:
    """Largest power-of-two batch that runs without running out of GPU memory."""
    batch, best = 1, 1
    while batch <= cap:
        try:
            fn(ops.make_input(batch, hw))
            ops.sync()
            best = batch
            batch *= 2
        except ops.out_of_memory:
            break
        finally:
            ops.release()
    return best


def _time(prepared: list[_Prepared], ops: DeviceOps, plan: Plan, steps: _Steps) -> list[BenchResult]:
    """Timed rounds, round-robin over ``prepared``, then batch-1 latency."""
    per_round = plan.time_s / plan.rounds
    rounds: dict[int, list[tuple[int, float]]] = {id(p): [] for p in prepared}
    for r in range(plan.rounds):
        for p in prepared:
            steps(f"round {r + 1}/{plan.rounds}: {p.candidate.name}")
            start, images = time.perf_counter(), 0
            while images == 0 or time.perf_counter() - start < per_round:
                p.fn(p.x)
                ops.sync()
                images += p.x.shape[0]
            rounds[id(p)].append((images, time.perf_counter() - start))
    rows = []
    for p in prepared:
        c = p.candidate
        steps(f"latency: {c.name}")
        peak = ops.peak_mb()
        times = []
        for _ in range(plan.latency_runs):
            start = time.perf_counter()
            p.fn(p.x[:1])
            ops.sync()
            times.append((time.perf_counter() - start) * 1e3)
        images, seconds = (sum(v) for v in zip(*rounds[id(p)]))
        # an ``auto`` row's bound is the precision it chose (int8 products run at twice bf16's rate)
        precision = getattr(p.fn, "precision", "fp32") if c.precision == "auto" else c.precision
        rows.append(BenchResult(c.name, c.source, c.model, precision, p.x.shape[0], images / seconds,
                                [i / s for i, s in rounds[id(p)]], *latency_summary(times), peak, c.paper_top1,
                                c.macs))
    return rows


def latency_summary(times_ms: list[float]) -> tuple[float, float]:
    """Median and 90th percentile (nearest rank: the smallest time at least 90% of runs do not exceed)."""
    ordered = sorted(times_ms)
    return statistics.median(ordered), ordered[math.ceil(0.9 * len(ordered)) - 1]
