"""The benchmark's logic: rows against the matrix-multiply bound, the GPU protocol (with the device
stood in for), which rows run, and what the command prints."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from typer.testing import CliRunner

from hybridvit.bench import Candidate, DeviceOps, Plan, benchmark
from hybridvit.bench.candidates import _amp, hybridvit_candidates, macs, reference_candidates
from hybridvit.cli import app
from hybridvit.machine import bound_share, matmul_rates

runner = CliRunner()


def test_bound_share_is_images_per_second_over_what_the_rate_allows():
    # 305.4M MACs at 93.7 GFLOP/s allow 153.4 images/s
    assert bound_share(115.0, 305.4e6, 93.7) == pytest.approx(115.0 / (93.7e9 / (2 * 305.4e6)))
    assert bound_share(115.0, None, 93.7) is None and bound_share(115.0, 305.4e6, None) is None


def test_matmul_rates_are_measured_per_precision_and_thread_count():
    torch.set_num_threads(1)
    one = matmul_rates(seconds=0.1)
    assert one["fp32"] > 1 and one["bf16"] > 0 and (one["int8"] or 0) > 1  # onnxruntime comes with the tests
    assert matmul_rates(seconds=0.1) == one  # cached for this thread count


class FakeGPU(DeviceOps):
    """A GPU of ``capacity`` units: each live model holds its weights, a forward needs its batch on top."""

    out_of_memory = MemoryError

    def __init__(self, capacity: int) -> None:
        super().__init__(torch.device("cpu"))
        self.is_gpu = True
        self.capacity, self.peak = capacity, 0
        self.live: weakref.WeakSet = weakref.WeakSet()

    def sync(self) -> None:
        pass

    def release(self) -> None:
        gc.collect()

    def reset_peak(self) -> None:
        self.peak = 0

    def peak_mb(self) -> float:
        return float(self.peak)

    def make_input(self, batch, hw):
        return torch.zeros(batch, 1)


class FakeModel:
    def __init__(self, gpu: FakeGPU, weights: int) -> None:
        self.gpu, self.weights = gpu, weights
        gpu.live.add(self)

    def __call__(self, x):
        need = sum(m.weights for m in self.gpu.live) + x.shape[0]
        if need > self.gpu.capacity:
            raise MemoryError
        self.gpu.peak = max(self.gpu.peak, need)


def test_gpu_candidates_are_probed_timed_and_released_one_at_a_time():
    """Alone, each model fits batch 512 (100 + 512 <= 612); had the first stayed resident, the
    second would only fit 256, and its peak would include the first's weights."""
    gpu = FakeGPU(612)
    rows = [Candidate(f"m{i}", lambda: FakeModel(gpu, 100), (1, 1), "hybridvit", f"m{i}", precision=p)
            for i, p in enumerate(("fp32", "fp16"))]
    results, _ = benchmark(rows, plan=Plan(warmup_s=0.0, time_s=0.02, rounds=2, latency_runs=2), ops=gpu)
    assert [r.batch for r in results] == [512, 512]
    assert [r.peak_memory_mb for r in results] == [612.0, 612.0]
    assert [r.precision for r in results] == ["fp32", "fp16"]
    assert len(gpu.live) == 0


def test_gpu_rows_run_at_their_own_precision():
    assert not isinstance(_amp("cuda", "fp32"), torch.autocast)
    assert _amp("cuda", "fp16").fast_dtype == torch.float16 and _amp("cuda", "bf16").fast_dtype == torch.bfloat16
    assert not isinstance(_amp("cpu", "fp16"), torch.autocast)  # CPU references run as shipped
    rows = hybridvit_candidates("levit_128s", "fp32", "cuda") + reference_candidates("levit_128s", "cuda", None, "bf16")
    assert [r.precision for r in rows] == ["fp32", "bf16", "bf16"]
    assert rows[0].name == "levit_128s (fp32)" and rows[1].name == "timm levit_128s (bf16)"


def test_cpu_rows_cover_every_installed_backend_with_the_architectures_macs():
    rows = hybridvit_candidates("levit_128s", "fp32", "cpu")
    assert [r.name for r in rows] == [f"levit_128s ({b})" for b in ("onnxruntime", "openvino", "torchscript")]
    assert {r.macs for r in rows} == {macs("levit_128s")} and macs("efficientnet_b0") is None
    refs = {r.name for r in reference_candidates("cvt_13", "cpu")}
    assert refs == {"transformers cvt_13", "transformers cvt_13 (OpenVINO)", "transformers cvt_13 (ONNX Runtime)"}


def test_benchmark_cli_rejects_a_precision_the_device_cannot_run():
    result = runner.invoke(app, ["benchmark", "levit_128s", "--device", "cuda", "--precision", "int8"])
    assert isinstance(result.exception, ValueError) and "fp16" in str(result.exception)


def test_benchmark_leaves_out_bf16_where_this_cpu_runs_it_on_a_fallback(monkeypatch):
    import hybridvit.machine

    monkeypatch.setattr(hybridvit.machine, "matmul_rates", lambda: {"fp32": 90.0, "bf16": 1.3, "int8": 180.0})
    result = runner.invoke(app, ["benchmark", "levit_128s", "--precision", "bf16", "--precision", "int8", "--warmup",
                                 "0", "--time", "0.2", "--rounds", "1"])
    assert result.exit_code == 0, result.output
    assert "bf16 left out" in result.output and "levit_128s (int8)" in result.output
    assert "levit_128s (bf16)" not in result.output
