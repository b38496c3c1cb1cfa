"""Deployment: optimize (fp32/bf16/int8), export (ONNX checked in ONNX Runtime), predict, benchmark."""

from __future__ import annotations

import importlib
import json
import statistics
import subprocess
import sys

import pytest
import torch
from conftest import randomize_, rel_err
from PIL import Image
from typer.testing import CliRunner

import hybridvit
from hybridvit.checkpoints import load_trained
from hybridvit.cli import app
from hybridvit.data import build_datasets, eval_transform, example_image, load_image
from hybridvit.inference.export import check_onnx, export
from hybridvit.data import imagenet_labels
from hybridvit.serving.predict import InferenceSpec, Predictor
from hybridvit.registry import get_model_info

runner = CliRunner()
opt = importlib.import_module("hybridvit.inference.optimize")  # the module (the package exports the function)


@pytest.mark.parametrize("backend", ["torchscript", "onnxruntime", "openvino"])
@pytest.mark.parametrize("name", ["levit_128s", "cvt_13"])
def test_optimize_fp32_matches_eager(name, backend):
    model = randomize_(hybridvit.create_model(name)).eval()
    fast = hybridvit.optimize(model, backend=backend)
    assert fast.backend == backend
    for batch in (1, 4):  # captured at batch 1, any batch afterwards
        x = torch.randn(batch, 3, 224, 224)
        with torch.no_grad():
            assert rel_err(fast(x), model(x)) < 1e-5
    with pytest.raises(ValueError):
        fast(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="precision"):
        hybridvit.optimize(model, "fp8")


def test_openvino_runs_the_callers_batch_size_in_a_fixed_shape_graph():
    from hybridvit.fusion import fuse
    from hybridvit.inference.runners import OpenVinoRunner

    model = fuse(randomize_(hybridvit.create_model("levit_128s", img_size=64)).eval()).requires_grad_(False)
    ov_runner = OpenVinoRunner(model, torch.zeros(4, 3, 64, 64))
    fixed = ov_runner.compiled[4].inputs[0].partial_shape
    assert fixed.is_static and list(fixed.to_shape()) == [4, 3, 64, 64]
    assert ov_runner.compiled[None].inputs[0].partial_shape[0].is_dynamic
    for batch in (4, 3, 5):  # the named batch size in its own graph, the others in the free one
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            assert rel_err(ov_runner(x), model(x)) < 1e-5
    assert set(ov_runner._local.requests) == {None, 4}
    assert set(OpenVinoRunner(model, torch.zeros(1, 3, 64, 64)).compiled) == {None}  # batch 1: nothing to fix


def test_an_explicit_precision_runs_on_the_backend_measured_fastest_for_it(monkeypatch):
    """fp32 and bf16 with backend auto: every installed backend that runs the precision is built
    and timed (on a fake clock), the fastest kept; int8 (dynamic) runs in TorchScript alone."""
    import types

    model = hybridvit.create_model("levit_128s", img_size=64).eval()
    _fake_rates(monkeypatch, 100.0, 200.0)
    now = [0.0]
    monkeypatch.setattr(opt, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    real_build, built = opt._build, []

    def timed_build(source, fused, example, precision, backend, data=None):
        cost = {"onnxruntime": 0.004, "openvino": 0.002, "torchscript": 0.008}[backend]
        inner = real_build(source, fused, example, precision, backend, data)
        built.append(f"{precision}/{backend}")
        runner = inner.runners[inner.input_hw]

        def run(x):
            now[0] += cost
            return runner(x)
        inner.runners[inner.input_hw] = run
        return inner

    monkeypatch.setattr(opt, "_build", timed_build)
    fast = hybridvit.optimize(model, "fp32", torch.zeros(2, 3, 64, 64))
    assert built == ["fp32/onnxruntime", "fp32/openvino", "fp32/torchscript"]
    assert (fast.precision, fast.backend) == ("fp32", "openvino")
    assert fast.measured == pytest.approx({"fp32/onnxruntime": 500.0, "fp32/openvino": 1000.0, "fp32/torchscript": 250.0})
    assert fast.reason.startswith("fp32/openvino at 1,000 images/s; fp32/onnxruntime 500 (0.50x)")
    built.clear()
    assert hybridvit.optimize(model, "bf16", torch.zeros(2, 3, 64, 64)).backend == "openvino"
    assert built == ["bf16/openvino", "bf16/torchscript"]
    built.clear()
    assert hybridvit.optimize(model, "int8").backend == "torchscript" and built == ["int8/torchscript"]
    assert hybridvit.optimize(model, backend="onnxruntime").backend == "onnxruntime"  # named: not measured


def test_optimize_refuses_what_a_backend_cannot_run():
    model = hybridvit.create_model("levit_128s", img_size=64).eval()
    with pytest.raises(ValueError, match="onnxruntime backend does not run int8"):
        hybridvit.optimize(model, "int8", backend="onnxruntime")
    with pytest.raises(ValueError, match="backend"):
        hybridvit.optimize(model, backend="tensorrt")


def _digits_val(run, n=None):
    model, extra = load_trained(run / "model")
    size = tuple(extra["input_size"])
    data = build_datasets(None, with_train=False)
    data.prepare(size, None, eval_transform(hybridvit.get_model_info("levit_128s"), size, crop_pct=1.0))
    x = torch.stack([data.val[i][0] for i in range(len(data.val))])
    return model, x


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_low_precision_agrees_with_fp32_on_a_trained_model(digits_run, precision):
    model, x = _digits_val(digits_run)
    reference = hybridvit.optimize(model, "fp32", x[:1])(x).argmax(1)
    low = hybridvit.optimize(model, precision, x[:1])(x).argmax(1)
    agreement = (low == reference).float().mean().item()
    assert agreement >= 0.99, f"{precision} agrees with fp32 on {agreement:.2%} of 360 digits"


@pytest.mark.parametrize("name", ["levit_128s", "cvt_13"])
def test_onnx_export_runs_in_onnxruntime(name, tmp_path):
    model = randomize_(hybridvit.create_model(name)).eval()
    path = export(model, tmp_path / "m.onnx", "onnx")
    for batch in (1, 3):
        assert check_onnx(path, model, batch=batch) < 1e-4
    import onnx

    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not any(node.op_type == "BatchNormalization" for node in graph.node)


def test_torchscript_and_exported_program(tmp_path, digits_run):
    model, x = _digits_val(digits_run)
    with torch.no_grad():
        reference = model(x[:5])
    runner_result = runner.invoke(app, ["export", str(digits_run), "--format", "torchscript", "--output", str(tmp_path / "m.pt")])
    assert runner_result.exit_code == 0, runner_result.output
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    assert rel_err(scripted(x[:5]), reference) < 1e-5
    export(model, tmp_path / "m.pt2", "exported-program")
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    assert rel_err(program(x[:5]), reference) < 1e-5 and program(x[:3]).shape == (3, 10)


def test_export_cli_checks_onnx(tmp_path, digits_run):
    result = runner.invoke(app, ["export", str(digits_run / "model"), "--format", "onnx", "--output", str(tmp_path / "d.onnx")])
    assert result.exit_code == 0, result.output
    assert "ONNX Runtime vs PyTorch at 32x32: max relative difference" in result.output


def test_predict_any_image_mode_and_size(tmp_path, digits_run):
    paths = []
    for mode, size, ext in [("L", (50, 70), "png"), ("RGBA", (300, 200), "png"), ("RGB", (33, 33), "jpg"), ("P", (64, 64), "png")]:
        img = Image.new("RGB", size, (255, 255, 255))
        img.paste((0, 0, 0), (size[0] // 3, size[1] // 4, 2 * size[0] // 3, 3 * size[1] // 4))
        paths.append(tmp_path / f"img_{mode}.{ext}")
        img.convert(mode).save(paths[-1])
    (tmp_path / "broken.jpg").write_bytes(b"nope")
    result = runner.invoke(app, ["predict", str(digits_run), *map(str, paths), str(tmp_path / "broken.jpg"), "--json"])
    assert result.exit_code == 1  # one unreadable file
    rows = [json.loads(line) for line in result.stdout.splitlines()]  # JSON Lines, the error row included
    assert [r["path"] for r in rows if "error" in r] == [str(tmp_path / "broken.jpg")]
    lines = [r for r in rows if "error" not in r]
    assert len(lines) == 4 and all(len(r["top"]) == 5 for r in lines)
    assert all(r["top"][0]["class"] in [str(d) for d in range(10)] for r in lines)
    probs = [p["probability"] for p in lines[0]["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5  # 5 of 10 classes
    assert "cannot read image" in result.output and "broken.jpg" in result.output


def test_predict_uses_imagenet_names_for_1000_classes(tmp_path):
    model = randomize_(hybridvit.create_model("levit_128s")).eval()
    hybridvit.save_model(model, tmp_path / "m")
    example_image(256).save(tmp_path / "x.png")
    (result,) = Predictor(InferenceSpec(tmp_path / "m", "fp32")).predict([tmp_path / "x.png"])  # auto may take bf16: other top-5
    names = imagenet_labels(1000)[1]
    assert len(names) == 1000 and names[0].startswith("tench") and names[999].startswith("toilet tissue")
    with torch.no_grad():  # the same image through the eager model, preprocessed by hand
        x = eval_transform(get_model_info("levit_128s"))(load_image(tmp_path / "x.png"))[None]
        probs = model(x).softmax(-1)[0]
    top = probs.topk(5)
    assert [name for name, _ in result.top] == [names[i] for i in top.indices.tolist()]
    assert [p for _, p in result.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_latency_summary_is_median_and_nearest_rank_p90():
    from hybridvit.bench.throughput import latency_summary

    assert latency_summary([7.0, 1.0, 10.0, 3.0, 2.0, 9.0, 4.0, 8.0, 6.0, 5.0]) == (5.5, 9.0)
    assert latency_summary([float(t) for t in range(1, 31)]) == (15.5, 27.0)


def test_benchmark_json_compare_and_plot(tmp_path):
    result = runner.invoke(app, ["benchmark", "levit_128s", "--compare", "--warmup", "0.1", "--time", "0.5", "--rounds", "2",
                                 "--json", "--plot", str(tmp_path / "fig.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # warnings go to standard error
    sources = {r["source"] for r in report["results"]}
    assert {"hybridvit", "timm", "transformers"} <= sources
    assert all(r["images_per_second"] > 0 and len(r["round_images_per_second"]) == 2 for r in report["results"])
    assert report["machine"]["threads"] == 1
    # one ratio per (our row, reference row of the same architecture): the median over rounds of
    # the paired throughputs, ours over theirs
    rows = {r["name"]: r for r in report["results"]}
    pairs = {(a, b) for a, r in rows.items() if r["source"] == "hybridvit"
             for b, ref in rows.items() if ref["source"] != "hybridvit" and ref["model"] == r["model"]}
    assert {(q["ours"], q["reference"]) for q in report["ratios"]} == pairs and len(pairs) == len(report["ratios"])
    for q in report["ratios"]:
        ours, ref = rows[q["ours"]]["round_images_per_second"], rows[q["reference"]]["round_images_per_second"]
        assert q["ratio"] == pytest.approx(statistics.median(a / b for a, b in zip(ours, ref, strict=True)))
    assert report["machine"]["allocator"] == "C library defaults"
    assert set(report["machine"]["matmul_gflops"]) == {"fp32", "bf16", "int8"}
    ours = [r for r in report["results"] if r["source"] == "hybridvit"]
    assert {r["name"] for r in ours} == {f"levit_128s ({b})" for b in ("onnxruntime", "openvino", "torchscript")}
    rate = report["machine"]["matmul_gflops"]["fp32"] * 1e9
    for r in report["results"]:  # every row of this architecture: its share of the fp32 bound
        assert r["bound_share"] == pytest.approx(r["images_per_second"] * 2 * r["macs"] / rate)
    assert (tmp_path / "fig.png").stat().st_size > 10_000


_FAULTS = """
import json, resource, sys, torch
import hybridvit
if sys.argv[1] == "tuned":
    assert hybridvit.tune_cpu_allocator()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # warm-up; a 64 MiB activation is above glibc's largest adaptive mmap threshold
    torch.ones(2**24).sum()
per_pass = []
for _ in range(10):
    start = faults()
    torch.ones(2**24).sum()
    per_pass.append(faults() - start)
print(json.dumps(per_pass))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_stops_page_faults_on_reused_activations():
    """By default each large activation is a fresh mmap (16k page faults per 64 MiB); tuned, the heap keeps it.

    The median pass: the heap can take a pass or two more than the warm-up to settle (seen: 16k faults in
    the first two of ten passes, then none)."""
    def per_pass(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        return statistics.median(json.loads(out.stdout.splitlines()[-1]))

    assert per_pass("default") > 15_000  # about one fault per 4 KiB page of the activation
    assert per_pass("tuned") < 1_000


_CTRL_C_AFTER_OPENVINO = """
import signal, torch, hybridvit
from hybridvit.inference.runners import OpenVinoRunner
model = hybridvit.fuse(hybridvit.create_model("levit_128s", img_size=32).eval())
x = torch.zeros(1, 3, 32, 32)
first, second = OpenVinoRunner(model, x), OpenVinoRunner(model, x)  # as optimize("auto") measures candidates
del first, second  # freed in the order they were compiled
try:
    signal.raise_signal(signal.SIGINT)
except KeyboardInterrupt:
    print("KeyboardInterrupt")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the signal stack OpenVINO replaces on Linux")
def test_ctrl_c_after_openvino_models_are_freed_is_a_keyboard_interrupt():
    """Before keep_signal_stack, the second model put back the first one's freed signal stack and this
    Ctrl-C was a SIGSEGV (seen as the whole test suite dying later, in an unrelated test)."""
    done = subprocess.run([sys.executable, "-c", _CTRL_C_AFTER_OPENVINO], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.split() == ["KeyboardInterrupt"], (done.returncode, done.stderr[-2000:])


def _bomb_png(path) -> None:
    """A PNG whose header claims 100000 x 100000 pixels (Pillow refuses to decode it)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def test_decompression_bomb_is_a_clear_error(tmp_path, digits_run):
    _bomb_png(tmp_path / "bomb.png")
    predicted = subprocess.run([sys.executable, "-m", "hybridvit", "predict", str(digits_run), str(tmp_path / "bomb.png")],
                               capture_output=True, text=True)
    forward = subprocess.run([sys.executable, "-m", "hybridvit", "forward", "levit_128s", str(tmp_path / "bomb.png")],
                             capture_output=True, text=True)
    for done, code in ((predicted, 1), (forward, 2)):
        output = done.stdout + done.stderr
        assert done.returncode == code and "cannot read image" in output and "bomb.png" in output
        assert "Traceback" not in output and "decompression bomb" in output


def test_export_writes_next_to_the_checkpoint_by_default(tmp_path, digits_run):
    import shutil

    shutil.copytree(digits_run / "model", tmp_path / "model")
    result = runner.invoke(app, ["export", str(tmp_path / "model"), "--format", "torchscript"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model" / "levit_128s.pt").stat().st_size > 1e6
    shutil.copy(digits_run / "checkpoint.pt", tmp_path / "checkpoint.pt")
    result = runner.invoke(app, ["export", str(tmp_path / "checkpoint.pt"), "--format", "torchscript"])
    assert result.exit_code == 0 and (tmp_path / "levit_128s.pt").exists()


def test_optimize_auto_keeps_fp32_outputs_and_reports_what_it_measured():
    model = randomize_(hybridvit.create_model("levit_128s", img_size=64)).eval()
    fast = hybridvit.optimize(model, "auto", torch.zeros(4, 3, 64, 64))
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(fast(x), model(x)) < (1e-4 if fast.precision == "fp32" else 5e-2)
    assert {"fp32/onnxruntime", "fp32/openvino", "fp32/torchscript"} <= set(fast.measured)
    assert fast.measured[f"{fast.precision}/{fast.backend}"] == max(fast.measured.values())


def test_a_bf16_candidate_leaves_the_fused_model_the_others_share_in_fp32():
    """``auto`` builds every candidate from one fused copy: the bf16 TorchScript one must not
    convert it under the fp32 ones (they failed with a dtype error, or rebuilt in bf16)."""
    model = randomize_(hybridvit.create_model("levit_128s", img_size=64)).eval()
    fused = hybridvit.fuse(model)
    x = torch.randn(2, 3, 64, 64)
    fp32 = opt._build(model, fused, x, "fp32", "torchscript")
    opt._build(model, fused, x, "bf16", "torchscript")
    assert next(fused.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert rel_err(fp32(x), model(x)) < 1e-4


def _fake_rates(monkeypatch, fp32, bf16):
    monkeypatch.setattr(opt, "matmul_rates", lambda: {"fp32": fp32, "bf16": bf16, "int8": None})


def test_optimize_auto_picks_the_fastest_path_whose_outputs_agree(monkeypatch):
    """Three fake paths on a fake clock that each run advances by its own cost: the fastest gives
    wrong logits and is dropped; the others are ranked by images per second of that clock."""
    import types

    _fake_rates(monkeypatch, 100.0, 200.0)  # bf16 looks fast here, so it is tried
    model = hybridvit.create_model("levit_128s", img_size=64).eval()
    fused = hybridvit.fuse(model)
    seconds = {"fp32/onnxruntime": 0.008, "fp32/openvino": 0.004, "fp32/torchscript": 0.002}  # per batch of 2
    now = [0.0]
    monkeypatch.setattr(opt, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def fake_build(source, fused_model, example, precision, backend, data=None):
        def run(x):
            now[0] += seconds.get(f"{precision}/{backend}", 0.001)
            out = fused_model(x.float())
            return out + 1.0 if precision == "bf16" else out  # bf16 here: fast but wrong
        return opt.InferenceModel(run, source, torch.float32, precision, backend, example.shape[-2:])

    monkeypatch.setattr(opt, "_build", fake_build)
    assert ("bf16", "torchscript") in opt._candidates(torch.device("cpu"), "auto")
    data = opt._Int8Data(model, fused, None, None)
    pairs = opt._candidates(torch.device("cpu"), "auto", data)
    best = opt._fastest(model, fused, torch.zeros(2, 3, 64, 64), pairs, data, gate=True, rounds=2, round_s=0.02)
    assert (best.precision, best.backend) == ("fp32", "torchscript")
    assert {k: v for k, v in best.measured.items() if k.startswith("fp32")} == pytest.approx(
        {"fp32/onnxruntime": 250.0, "fp32/openvino": 500.0, "fp32/torchscript": 1000.0})  # 2 images / seconds
    assert all(v != v for k, v in best.measured.items() if k.startswith("bf16"))  # rejected: nan


def test_bf16_is_tried_and_allowed_silently_only_where_this_cpu_runs_it_fast(monkeypatch):
    import warnings

    model = hybridvit.create_model("levit_128s", img_size=64).eval()
    _fake_rates(monkeypatch, 100.0, 20.0)
    assert all(p == "fp32" for p, _ in opt._candidates(torch.device("cpu"), "auto"))
    with pytest.warns(RuntimeWarning, match="bf16 will be slower than fp32"):
        hybridvit.optimize(model, "bf16")
    _fake_rates(monkeypatch, 100.0, 180.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert hybridvit.optimize(model, "bf16").precision == "bf16"
