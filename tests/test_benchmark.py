"""The benchmark's logic: rows against the matrix-multiply bound, the GPU protocol (with the device
stood in for), which rows run, and what the command prints."""

from __future__ import annotations

import gc
import json
import sys
import weakref

import pytest
import torch
from conftest import randomize_, with_sources
from typer.testing import CliRunner

from hybridvit.bench import Candidate, DeviceOps, Plan, benchmark
from hybridvit.bench.candidates import _amp, hybridvit_candidates, macs, reference_candidates
from hybridvit.cli import app
from hybridvit.inference.machine import bound_share, matmul_rates, torch_threads

runner = CliRunner()


def test_bound_share_is_images_per_second_over_what_the_rate_allows():
    # 305.4M MACs at 93.7 GFLOP/s allow 153.4 images/s
    assert bound_share(115.0, 305.4e6, 93.7) == pytest.approx(115.0 / (93.7e9 / (2 * 305.4e6)))
    assert bound_share(115.0, None, 93.7) is None and bound_share(115.0, 305.4e6, None) is None


def test_matmul_rates_are_measured_per_precision_and_thread_count():
    with torch_threads(1):
        one = matmul_rates(seconds=0.1)
        assert one["fp32"] > 1 and one["bf16"] > 0 and (one["int8"] or 0) > 1  # onnxruntime comes with the tests
        assert matmul_rates(seconds=0.1) == one  # cached for this thread count


def test_the_fp32_bound_is_the_fastest_fp32_kernel_at_hand(monkeypatch):
    import hybridvit.inference.machine as machine

    monkeypatch.setattr(machine, "_torch_rate", lambda dtype, seconds: {torch.float32: 115.0, torch.bfloat16: 500.0}[dtype])
    monkeypatch.setattr(machine, "_onnxruntime_rate", lambda integer, seconds: 980.0 if integer else 266.0)
    machine._cached.cache_clear()
    try:
        assert machine.matmul_rates() == {"fp32": 266.0, "bf16": 500.0, "int8": 980.0}  # Zen 5's: ONNX Runtime's fp32
        monkeypatch.setattr(machine, "_onnxruntime_rate", lambda integer, seconds: None)  # not installed
        machine._cached.cache_clear()
        assert machine.matmul_rates() == {"fp32": 115.0, "bf16": 500.0, "int8": None}
    finally:
        machine._cached.cache_clear()


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
    import hybridvit.inference.machine

    monkeypatch.setattr(hybridvit.inference.machine, "matmul_rates", lambda: {"fp32": 90.0, "bf16": 1.3, "int8": 180.0})
    result = runner.invoke(app, ["benchmark", "levit_128s", "--precision", "bf16", "--precision", "int8", "--warmup",
                                 "0", "--time", "0.2", "--rounds", "1"])
    assert result.exit_code == 0, result.output
    assert "bf16 left out" in result.output and "levit_128s (int8)" in result.output
    assert "levit_128s (bf16)" not in result.output


QUICK = ["--warmup", "0", "--time", "0.05", "--rounds", "1", "--batch", "2", "--json"]

_OFFICIAL_LEVIT = '''"""Stand-in for facebookresearch/LeViT's levit.py: a model constructor per variant name."""
import torch
import utils  # as the official file does


class Tiny(torch.nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 16, stride=16)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def LeViT_128S(num_classes=1000, **kwargs):
    utils.built.append(num_classes)
    return Tiny(num_classes)
'''

_OFFICIAL_UTILS = '''"""Stand-in for the official utils.py: its BatchNorm fusion, counted."""
import torch

built, fused = [], []


def replace_batchnorm(net):
    for name, child in net.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(net, name, torch.nn.Identity())
            fused.append(name)
        else:
            replace_batchnorm(child)
'''


@pytest.fixture
def official_clone(tmp_path):
    """A folder laid out as a clone of facebookresearch/LeViT (levit.py, utils.py at its root);
    the modules it imports under those top-level names are dropped afterwards."""
    clone = tmp_path / "LeViT"
    clone.mkdir()
    (clone / "levit.py").write_text(_OFFICIAL_LEVIT)
    (clone / "utils.py").write_text(_OFFICIAL_UTILS)
    assert "levit" not in sys.modules and "utils" not in sys.modules  # else the clone's would not be imported
    yield clone
    for name in ("levit", "utils"):
        sys.modules.pop(name, None)


def _report(args: list[str]) -> dict:
    result = runner.invoke(app, ["benchmark", *args, *QUICK])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # stdout holds the JSON alone (a download's progress bar goes to stderr)


@pytest.mark.slow
def test_benchmark_official_rows_run_the_clones_fused_models(official_clone, monkeypatch):
    from hybridvit.bench import candidates

    monkeypatch.setattr(candidates, "installed", lambda *modules: "transformers" not in modules)  # timm and the clone
    report = _report(["levit_128s", "--precision", "int8", "--compare", "--official", str(official_clone)])
    rows = {r["name"]: r for r in report["results"]}
    official = {name for name, r in rows.items() if r["source"] == "official"}
    assert official == {f"official levit_128s (fused, {way})" for way in ("traced", "OpenVINO", "ONNX Runtime")}
    assert all((rows[n]["model"], rows[n]["precision"], rows[n]["paper_top1"]) == ("levit_128s", "fp32", 76.6)
               for n in official)
    utils = sys.modules["utils"]
    assert utils.__file__ == str(official_clone / "utils.py")
    assert utils.built == [1000] * 3 and utils.fused == ["bn"] * 3  # each row built and fused the clone's model
    assert {(q["ours"], q["reference"]) for q in report["ratios"]} == {
        ("levit_128s (int8)", name) for name in official | {"timm levit_128s"}}


def test_auto_is_compared_with_openvino_at_its_own_default_precision(official_clone, monkeypatch):
    import openvino as ov

    from hybridvit.bench import candidates

    monkeypatch.setattr(candidates, "installed", lambda *modules: "transformers" not in modules)
    rows = reference_candidates("levit_128s", "cpu", official_clone, "auto")
    assert [r.name for r in rows] == ["official levit_128s (fused, OpenVINO, default precision)"]
    built = rows[0].build()
    plugin_default = str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))  # bf16 where the CPU has it
    assert str(built.compiled[None].get_property("INFERENCE_PRECISION_HINT")) == plugin_default
    assert built.precision == ("bf16" if "bfloat16" in plugin_default else "fp32")  # the bound its row is held to


@pytest.mark.slow
def test_benchmark_paper_rows_are_timm_models_at_their_resolution(monkeypatch):
    from hybridvit.bench import candidates

    name = "deit_tiny_distilled_patch16_224"
    assert candidates.PAPER_ROWS[name] == (224, 76.6)  # LeViT paper, Table 3 (DeiT-Tiny, distilled, 1000 epochs)
    monkeypatch.setattr(candidates, "PAPER_ROWS", {name: candidates.PAPER_ROWS[name]})  # one row of the table
    report = _report(["levit_128s", "--precision", "int8", "--paper-rows"])
    rows = {r["name"]: r for r in report["results"]}
    assert set(rows) == {"levit_128s (int8)", name}
    assert (rows[name]["source"], rows[name]["model"], rows[name]["precision"]) == ("timm", name, "fp32")
    assert rows[name]["paper_top1"] == 76.6 and rows[name]["images_per_second"] > 0
    assert report["ratios"] == []  # another architecture: nothing to pair it with


@pytest.mark.slow
def test_benchmark_int8_static_rows_run_the_int8_model_of_the_published_weights(monkeypatch, tmp_path,
                                                                                 torch_hub_dir):
    """``--precision int8-static --pretrained``: the row times the static int8 model calibrated from
    the published weights (here a local file standing in for the official URL)."""
    import hybridvit
    import hybridvit.inference.quantize
    from hybridvit.model_info import _REGISTRY
    from hybridvit.registry import get_model_info

    weights = randomize_(hybridvit.create_model("levit_128s"), seed=2).state_dict()
    torch.save(weights, tmp_path / "weights.pth")
    monkeypatch.setitem(_REGISTRY, "levit_128s",
                        with_sources(get_model_info("levit_128s"), (tmp_path / "weights.pth").as_uri()))
    quantized, calls = [], []
    real = hybridvit.inference.quantize.quantize_static

    def quantize_static(model, calibration, *args, **kwargs):
        quantized.append((model.state_dict(), list(calibration), kwargs["backend"]))
        int8 = real(model, calibration, *args, **kwargs)
        assert (int8.precision, int8.backend) == ("int8-static", kwargs["backend"])
        return lambda x: calls.append(len(x)) or int8(x)

    monkeypatch.setattr(hybridvit.inference.quantize, "quantize_static", quantize_static)
    report = _report(["levit_128s", "--precision", "int8-static", "--pretrained"])
    rows = {r["name"]: r for r in report["results"]}
    assert set(rows) == {"levit_128s (int8-static, onnxruntime)", "levit_128s (int8-static, nncf)"}  # one per backend
    rate = report["machine"]["matmul_gflops"]["int8"] * 1e9  # the bound of an int8 row is the int8 rate
    for row in rows.values():
        assert (row["source"], row["precision"]) == ("hybridvit", "int8-static")
        assert row["bound_share"] == pytest.approx(row["images_per_second"] * 2 * row["macs"] / rate)
    assert sorted(backend for *_, backend in quantized) == ["nncf", "onnxruntime"], "rows not quantize_static's"
    for state, calibration, _ in quantized:
        assert all(torch.equal(state[k], v) for k, v in weights.items())  # the published weights, not a fresh init
        # by default 256 photos, preprocessed as the model's evaluation does (ImageNet's mean and std)
        assert [tuple(b.shape) for b in calibration] == [(32, 3, 224, 224)] * 8
        assert all(torch.equal(a, b) for a, b in zip(calibration, quantized[0][1]))  # both rows: the same set
    assert (torch_hub_dir / "checkpoints" / "weights.pth").is_file()  # fetched into torch.hub's cache
    # per row: warm-up, one timed round and 30 batch-1 latency runs, all on the int8 model
    assert calls.count(2) >= 4 and calls.count(1) == 60


@pytest.mark.slow
def test_benchmark_nncf_rows_and_ours_are_calibrated_on_the_same_images(official_clone, monkeypatch, tmp_path):
    """``--compare --precision int8-static``: NNCF's int8 of the official fused LeViT (and of
    transformers' CvT) runs beside ours, every one calibrated on the user's images."""
    import numpy as np
    from PIL import Image

    import hybridvit
    from hybridvit.inference import quantize

    folder = tmp_path / "calibration"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (260, 300, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    seen = []

    def recorder(real):
        def record(model, batches, *args):
            seen.append([b.clone() for b in batches])
            return real(model, batches, *args)
        return record

    monkeypatch.setattr(quantize, "qdq_onnx", recorder(quantize.qdq_onnx))
    monkeypatch.setattr(quantize, "nncf_openvino", recorder(quantize.nncf_openvino))
    report = _report(["levit_128s", "--precision", "int8-static", "--compare", "--official", str(official_clone),
                      "--calibration", str(folder)])
    rows = {r["name"]: r for r in report["results"] if r["precision"] == "int8-static"}
    peer = "official levit_128s (fused, NNCF int8, OpenVINO)"
    assert set(rows) == {"levit_128s (int8-static, onnxruntime)", "levit_128s (int8-static, nncf)", peer}
    assert rows[peer]["source"] == "official"
    assert ("levit_128s (int8-static, nncf)", "official levit_128s (fused, NNCF int8, OpenVINO)") in {
        (q["ours"], q["reference"]) for q in report["ratios"]}
    with torch.device("meta"):
        model = hybridvit.create_model("levit_128s")
    (expected,) = quantize.calibration_set(folder, model).batches  # the folder's 5 images, preprocessed
    assert len(seen) == 3 and all(len(s) == 1 and torch.equal(s[0], expected) for s in seen)
    assert [c.name for c in reference_candidates("cvt_13", "cpu", precision="int8-static")] == [
        "transformers cvt_13 (NNCF int8, OpenVINO)"]


def test_tuned_allocator_is_applied_before_any_row_is_built(monkeypatch):
    from hybridvit.bench import throughput

    events = []
    row = Candidate("noop", lambda: events.append("build") or (lambda x: x), (1, 1), "hybridvit", "noop")
    plan = Plan(warmup_s=0.0, time_s=0.01, rounds=1, latency_runs=1)
    for tuned, works, allocator in ((True, True, "glibc tuned (no mmap, no trim)"),
                                    (True, False, "tuning unsupported: defaults"), (False, True, "C library defaults")):
        events.clear()
        monkeypatch.setattr(throughput, "tune_cpu_allocator", lambda works=works: events.append("tune") or works)
        _, machine = benchmark([row], plan=plan, tuned_allocator=tuned)  # process-wide for real: stood in for
        assert machine["allocator"] == allocator and events == ["tune", "build"][not tuned:]
    seen = {}
    monkeypatch.setattr("hybridvit.bench.benchmark", lambda *args: seen.update(args=args) or ([], {}))
    _report(["levit_128s", "--precision", "int8", "--tuned-allocator"])
    candidates, device, threads, plan, _, tuned = seen["args"]
    assert [c.name for c in candidates] == ["levit_128s (int8)"] and tuned is True
    assert (device, threads, plan.batch, plan.rounds) == ("cpu", 1, 2, 1)


def test_an_auto_row_is_held_to_the_bound_of_the_precision_it_chose(monkeypatch):
    import hybridvit.bench.throughput as throughput

    monkeypatch.setattr(throughput, "matmul_rates", lambda: {"fp32": 100.0, "bf16": 400.0, "int8": 800.0})

    def build():
        def run(x):
            return x.sum()
        run.precision = "int8-static"  # what optimize("auto") picked
        return run

    rows, machine = benchmark([Candidate("m (auto)", build, (8, 8), "hybridvit", "m", precision="auto", macs=10**6)],
                              "cpu", 1, Plan(2, 0.0, 0.05, 1))
    assert rows[0].precision == "int8-static"
    assert rows[0].bound_share == pytest.approx(bound_share(rows[0].images_per_second, 10**6, 800.0))
    assert "cpu_features" in machine


@pytest.mark.slow
def test_profile_shows_where_openvino_spends_each_precisions_time(tmp_path):
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 90, 200 - 40 * i)).save(tmp_path / f"{i}.jpg")
    result = runner.invoke(app, ["profile", "levit_128s", "--precision", "fp32", "--precision", "int8", "--batch",
                                 "2", "--runs", "2", "--calibration", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    fp32, int8 = report["profiles"]
    for profile in (fp32, int8):
        assert profile["ms"] == pytest.approx(sum(op["ms"] for op in profile["ops"]))
        assert [op["ms"] for op in profile["ops"]] == sorted((op["ms"] for op in profile["ops"]), reverse=True)
        assert profile["batch"] == 2 and profile["threads"] == 1
    kernels = [{k.lower() for op in p["ops"] for k in op["kernels"]} for p in (fp32, int8)]
    assert not any("i8" in k for k in kernels[0]) and any("i8" in k for k in kernels[1])  # NNCF's products in int8
    assert {"FullyConnected", "Convolution"} <= {op["op_type"] for op in fp32["ops"]}
    refused = runner.invoke(app, ["profile", "levit_128s", "--precision", "fp16"])
    assert isinstance(refused.exception, ValueError) and "fp32, bf16, int8" in str(refused.exception)
