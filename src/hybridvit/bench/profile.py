"""Where a model's time goes in OpenVINO: its CPU plugin's per-node counters, summed per op type.

A throughput figure says how far a model is from the machine's matrix-multiply bound; a profile
says why. OpenVINO reports each executed node's time and kernel (``brgemm_avx512_amx`` for an
AMX matrix product, ``jit_avx512_bf16`` for a fused elementwise subgraph, ``ref`` for a plain C++
fallback), so the rows show at once whether the products run on the fast kernels and how much
time the work around them (transposes, reorders, splits, softmax, Hardswish) takes.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..api import create_model
from ..fusion import fuse
from ..inference import quantize
from ..inference.export import onnx_bytes
from ..inference.machine import torch_threads
from ..inference.runners import OpenVinoRunner

PRECISIONS = ("fp32", "bf16", "int8")  # int8: NNCF's default post-training quantization


@dataclass
class OpTime:
    """One op type's share of a run: its time per batch, the kernels that ran it, its node count."""

    op_type: str
    ms: float
    nodes: int
    kernels: dict[str, float] = field(default_factory=dict)  # kernel name -> ms per batch


@dataclass
class Profile:
    model: str
    precision: str
    batch: int
    threads: int
    ms: float  # per batch, the nodes' times summed (median over runs)
    ops: list[OpTime]  # slowest first
    slowest_nodes: list[tuple[str, str, float]]  # (node name, kernel, ms)

    @property
    def images_per_second(self) -> float:
        return self.batch / self.ms * 1e3


def profile_openvino(name: str, precision: str = "bf16", batch: int = 16, threads: int = 1, runs: int = 10,
                     calibration: Callable[[], list[torch.Tensor]] | None = None) -> Profile:
    """Profile our fused ``name`` (random weights: speed does not depend on them) as ``optimize``
    runs it in OpenVINO, at ``batch`` (compiled with fixed shapes) and ``threads`` threads.
    ``int8``: NNCF's quantization of the same export, on ``calibration`` batches (default: the
    benchmark's offline photos)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    model = fuse(create_model(name).eval()).requires_grad_(False)
    example = torch.randn(batch, model.in_chans, *model.input_hw, generator=torch.Generator().manual_seed(0))
    with torch_threads(threads):
        if precision == "int8":
            from .candidates import Calibration

            batches = (calibration or Calibration().of(name))()
            source = quantize.nncf_openvino(onnx_bytes(model, example[:2]), batches)
            runner = OpenVinoRunner(source, static_batch=batch, perf_count=True)
        else:
            runner = OpenVinoRunner(model, example, precision, perf_count=True)
        for _ in range(3):
            runner(example)
        nodes = []
        for _ in range(runs):
            runner(example)
            nodes.append(runner.profiling_info(batch))
    return _summarise(name, precision, batch, threads, nodes)


def _summarise(name: str, precision: str, batch: int, threads: int,
               runs: list[list[tuple[str, str, str, float]]]) -> Profile:
    """Per op type, each node's median over the runs (a run is (node, op type, kernel, ms) rows)."""
    times: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for run in runs:
        for node, op_type, kernel, ms in run:
            times[node, op_type, kernel].append(ms)
    medians = {key: statistics.median(v) for key, v in times.items()}
    ops: dict[str, OpTime] = {}
    for (node, op_type, kernel), ms in medians.items():
        op = ops.setdefault(op_type, OpTime(op_type, 0.0, 0))
        op.ms += ms
        op.nodes += 1
        op.kernels[kernel] = op.kernels.get(kernel, 0.0) + ms
    slowest = sorted(((node, kernel, ms) for (node, _, kernel), ms in medians.items()), key=lambda r: -r[2])[:10]
    return Profile(name, precision, batch, threads, sum(medians.values()),
                   sorted(ops.values(), key=lambda o: -o.ms), slowest)
