"""Static int8 (ONNX Runtime, QDQ): accuracy of the digits-trained LeViT and of a briefly trained CvT,
the choices the graph makes (what stays float, one quantized copy per weight), the written file, the command."""

from __future__ import annotations

import importlib
import math
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, numpy_helper
from typer.testing import CliRunner

from conftest import digits_folder

import hybridvit
from hybridvit.checkpoints import load_trained
from hybridvit.cli import app
from hybridvit.data import DataError, build_datasets, eval_transform
from hybridvit.inference.export import onnxruntime_session
from hybridvit.layers import capture_attention
from hybridvit.inference.machine import torch_threads
from hybridvit.inference.optimize import optimize
from hybridvit.inference.spec import TOP1_AGREEMENT
from hybridvit.inference.quantize import calibration_set, quantize_static

runner = CliRunner()
SIZE = (32, 32)  # the digits run's input size


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits at 32x32 as LeViT and CvT see them (both use ImageNet's mean and std; no crop):
    training images and labels, then the 360 validation images and labels."""
    data = build_datasets(None)
    transform = eval_transform(hybridvit.get_model_info("levit_128s"), SIZE, crop_pct=1.0)
    data.prepare(SIZE, transform, transform)
    train = torch.stack([data.train[i][0] for i in range(len(data.train))])
    val = torch.stack([data.val[i][0] for i in range(len(data.val))])
    return train, torch.tensor(data.train.targets), val, torch.tensor(data.val.targets)


@pytest.fixture(scope="module")
def quantized(digits_run, digits, tmp_path_factory):
    """The digits run, its int8 model calibrated on 256 seeded training digits (written to a
    file), and the 360 validation digits with their labels."""
    model, extra = load_trained(digits_run / "model")
    assert tuple(extra["input_size"]) == SIZE
    train, _, x, y = digits
    picked = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:256]
    path = tmp_path_factory.mktemp("int8") / "digits_int8.onnx"
    int8 = quantize_static(model, train[picked], path)
    return model, int8, path, x, y


class Graph:
    """A QDQ graph's producers and consumers, to say which nodes compute on dequantized values."""

    def __init__(self, path: Path) -> None:
        self.graph = onnx.load(str(path)).graph
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.producer = {name: node for node in self.graph.node for name in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                self.consumers[name].append(node)

    def nodes(self, op_type: str) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if n.op_type == op_type]

    def fed(self, node: onnx.NodeProto, op_type: str) -> list[str]:
        """The inputs of ``node`` that an ``op_type`` node produces."""
        return [i for i in node.input if i in self.producer and self.producer[i].op_type == op_type]

    def is_float_initializer(self, name: str) -> bool:
        return name in self.initializers and self.initializers[name].data_type == TensorProto.FLOAT

    def constant(self, name: str) -> bool:
        """Whether tensor ``name`` depends on no graph input (a weight, however the graph reaches it)."""
        node = self.producer.get(name)
        if node is None:
            return name in self.initializers
        return all(self.constant(i) for i in node.input if i)


def assert_float_choices(path: Path, model: torch.nn.Module) -> None:
    """What the module docstring of ``hybridvit.inference.quantize`` keeps in float, checked on the written graph.

    In QDQ form an op runs in int8 when DequantizeLinear feeds it and its output is quantized; a
    float op reads float tensors. The residual stream and the projections' outputs (q, k) are
    int8 by design, so a float op may read them dequantized: what must stay float is the
    attention scores (the score MatMul's output, the scale and bias arithmetic and each
    Softmax), the stem convolution (reading the images) and LayerNorm's own scale and bias.
    """
    g = Graph(path)
    softmaxes = g.nodes("Softmax")
    with torch.inference_mode(), capture_attention() as calls:
        model.eval()(torch.zeros(1, 3, *SIZE))
    assert len(softmaxes) == len(calls)  # one per attention layer
    for softmax in softmaxes:
        node, steps = softmax, 0
        while node.op_type != "MatMul":  # back through the bias and scale to the score product Q·Kᵀ
            assert not g.fed(node, "DequantizeLinear"), f"{node.op_type} {node.name} computes on int8 scores"
            node, steps = g.producer[node.input[0]], steps + 1
            assert steps <= 3, f"no score MatMul before {softmax.name}"
        assert "QuantizeLinear" not in {c.op_type for c in g.consumers[node.output[0]]}, \
            f"the scores of {node.name} are quantized"
    stem = g.nodes("Conv")[0]  # nodes are in topological order
    assert stem.input[0] == "images" and g.is_float_initializer(stem.input[1]), f"{stem.name} runs in int8"
    norms = g.nodes("LayerNormalization")
    assert len(norms) == sum(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    for norm in norms:
        assert all(g.is_float_initializer(i) for i in norm.input[1:]), f"{norm.name}'s scale or bias is quantized"


def assert_weights_quantized_apart(path: Path) -> None:
    """Every weight of a product (MatMul, Gemm, Conv; the stem convolution excepted) reaches it
    through a DequantizeLinear of its own, per output channel, from an int8 initializer read by
    nothing else: a weight shared between nodes, or hidden behind an Identity, would be
    quantized per tensor or taken for an activation (``quantize._unshare_weights``)."""
    g = Graph(path)
    stem = g.nodes("Conv")[0]
    products = [n for n in g.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and n is not stem]
    weighted = [n for n in products if g.constant(n.input[1])]
    assert len(weighted) > len(products) / 2  # the linear maps; the rest multiply activations
    for node in weighted:
        dq = g.producer.get(node.input[1])
        assert dq is not None and dq.op_type == "DequantizeLinear", f"{node.name}'s weight is not quantized"
        assert dq.input[0] in g.initializers, f"{node.name}'s weight is quantized as an activation"
        weight = g.initializers[dq.input[0]]
        assert weight.data_type == TensorProto.INT8
        scales = numpy_helper.to_array(g.initializers[dq.input[1]])
        assert scales.size > 1 and scales.size in weight.dims, f"{node.name}'s weight is quantized per tensor"
        assert [c.name for c in g.consumers[dq.output[0]]] == [node.name], f"{node.name} shares its weight"
        assert len(g.consumers[dq.input[0]]) == 1
    for dq in g.nodes("DequantizeLinear"):
        if dq.input[0] in g.initializers:
            assert len(g.consumers[dq.output[0]]) == 1, f"{dq.name} is shared"


def agreement(int8_file: Path, reference: torch.nn.Module, x: torch.Tensor) -> float:
    """Top-1 agreement of an int8 ONNX file, run by ONNX Runtime itself, with the eager model."""
    session = onnxruntime.InferenceSession(str(int8_file), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0].argmax(1)
    with torch.inference_mode():
        expected = reference.eval()(x).argmax(1).numpy()
    return float((got == expected).mean())


@pytest.mark.slow
def test_static_int8_keeps_the_digits_accuracy(quantized):
    model, int8, _, x, y = quantized
    reference = hybridvit.optimize(model, "fp32", x[:1])(x).argmax(1)
    got = int8(x).argmax(1)
    fp32_top1, int8_top1 = [100 * (p == y).float().mean().item() for p in (reference, got)]
    assert int8_top1 >= fp32_top1 - 0.5, f"top-1 {int8_top1:.2f}% in int8, {fp32_top1:.2f}% in fp32"
    agreement = (got == reference).float().mean().item()
    assert agreement >= 0.99, f"int8 agrees with fp32 on {agreement:.2%} of {len(y)} digits"
    assert int8.precision == "int8-static" and int8.backend == "onnxruntime"


@pytest.mark.slow
def test_written_file_is_quantized_and_runs_in_onnxruntime(quantized):
    model, int8, path, x, _ = quantized
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    session = onnxruntime_session(path)
    for batch in (1, 5):  # free batch dimension
        got = session.run(None, {"images": x[:batch].numpy()})[0]
        np.testing.assert_allclose(got, int8(x[:batch]).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expects images"):  # the source model's input checks
        int8(x[0])
    assert path.stat().st_size < 0.5 * 4 * hybridvit.count_params(model)  # int8 weights


@pytest.mark.slow
def test_graph_keeps_the_scores_stem_and_norms_float_and_each_weight_apart(quantized):
    model, _, path, _, _ = quantized
    assert_float_choices(path, model)
    assert_weights_quantized_apart(path)


@pytest.mark.slow
def test_weights_the_export_shares_are_quantized_apart(tmp_path):
    """An untrained LeViT's residual branches end in zero-initialised BatchNorms: after fusion their
    weights and biases are equal tensors, which the exporter merges into one."""
    from hybridvit.inference.export import onnx_bytes

    torch.manual_seed(0)
    model = hybridvit.create_model("levit_128s", img_size=SIZE, num_classes=10).eval()
    exported = onnx.load_from_string(onnx_bytes(hybridvit.fuse(model), torch.zeros(2, 3, *SIZE)))
    readers = defaultdict(int)
    for node in exported.graph.node:
        for name in node.input:
            readers[name] += 1
    initializers = {t.name for t in exported.graph.initializer}
    shared = [n for n in initializers if readers[n] > 1]
    hidden = [n for n in exported.graph.node if n.op_type == "Identity" and n.input[0] in initializers]
    assert shared or hidden  # what the unsharing has to undo
    quantize_static(model, torch.randn(16, 3, *SIZE, generator=torch.Generator().manual_seed(0)), tmp_path / "q.onnx")
    assert_weights_quantized_apart(tmp_path / "q.onnx")
    assert_float_choices(tmp_path / "q.onnx", model)


@pytest.mark.slow
def test_static_int8_of_cvt(digits, tmp_path):
    """A small CvT (CvT-13's blocks, one per stage, narrower) after 20 steps on the digits: its
    outputs depend on the image (random weights give nearly the same logits for every image, so
    agreement would say nothing), and int8 must agree with fp32 on the validation digits."""
    train, labels, x, y = digits
    torch.manual_seed(0)
    model = hybridvit.create_model("cvt_13", img_size=SIZE, num_classes=10, depth=(1, 1, 1), embed_dim=(32, 64, 96),
                                   num_heads=(1, 2, 3), drop_path_rate=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    with torch_threads(1):  # tensors this small: a second thread only waits (60x slower on a busy machine)
        for _ in range(20):
            batch = torch.randint(len(train), (64,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(train[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.inference_mode():
        fp32_top1 = (model(x).argmax(1) == y).float().mean().item()
    assert fp32_top1 > 0.5  # far above chance (10%): the predictions depend on the image
    int8 = quantize_static(model, train[:64], tmp_path / "cvt_int8.onnx")
    assert (int8.precision, int8.backend) == ("int8-static", "onnxruntime")
    assert_float_choices(tmp_path / "cvt_int8.onnx", model)
    assert_weights_quantized_apart(tmp_path / "cvt_int8.onnx")
    # measured 97-99%; 0.95 of 360 images allows 18 flips, where int8 outputs that had lost
    # the image would agree on about one in ten
    assert agreement(tmp_path / "cvt_int8.onnx", model, x) >= 0.95


@pytest.mark.slow
def test_quantize_command(digits_run, digits, tmp_path):
    shutil.copytree(digits_run / "model", tmp_path / "model")
    data = digits_folder(tmp_path / "data", 90)  # fewer than asked for: all are read
    result = runner.invoke(app, ["quantize", str(tmp_path / "model"), "--calibration", str(data), "--images", "64",
                                 "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    target = tmp_path / "model" / "levit_128s_int8.onnx"
    assert f"wrote {target}" in result.output.replace("\n", "")
    assert "calibrated on 64 images, 1 unreadable skipped" in result.output
    assert "on 26 held-out images: top-1 agreement" in result.output  # the last two batches: 16 + 10
    # the written file in ONNX Runtime against the trained model, on the 360 validation digits
    # (never calibrated on): 0.97 allows 10 flips; the fixture's int8 model, calibrated on 256
    # digits, agrees on at least 99%, and an uncalibrated or broken one near the 10% of chance
    model, _ = load_trained(digits_run / "model")
    assert agreement(target, model, digits[2]) >= 0.97
    assert_float_choices(target, model)


def test_calibration_set_is_seeded_and_skips_unreadable_files(tmp_path):
    model = hybridvit.create_model("levit_128s", img_size=32, num_classes=10)
    data = digits_folder(tmp_path, 40)
    first = calibration_set(data, model, images=50, batch_size=16)  # more than there are
    assert [len(b) for b in first] == [16, 16, 8] and first.images == 40
    assert first.skipped == [data / "train" / "3" / "broken.png"]
    assert first.batches[0].shape == (16, 3, 32, 32)
    again = calibration_set(data / "train", model, images=10, batch_size=16)  # a plain folder works too
    assert again.images == 10
    assert torch.equal(calibration_set(data, model, 10).batches[0], calibration_set(data, model, 10).batches[0])
    assert not torch.equal(calibration_set(data, model, 10, seed=1).batches[0], again.batches[0])


def test_bad_calibration_data_is_a_clear_error(tmp_path, monkeypatch):
    model = hybridvit.create_model("levit_128s", img_size=32, num_classes=10)
    with pytest.raises(DataError, match="not a folder"):
        calibration_set(tmp_path / "missing", model)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no image files in"):
        calibration_set(tmp_path / "empty", model)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match="none of the 1 image files"):
        calibration_set(tmp_path / "broken", model)
    hybridvit.save_model(model, tmp_path / "model")
    result = runner.invoke(app, ["quantize", str(tmp_path / "model"), "--calibration", str(tmp_path / "empty")])
    assert result.exit_code != 0 and "no image files in" in str(result.exception)
    with pytest.raises(ValueError, match="no calibration images"):
        quantize_static(model, [])
    monkeypatch.setattr("hybridvit.inference.quantize.onnxruntime_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install hybridvit\[export\]"):
        quantize_static(model, torch.zeros(1, 3, 32, 32))


def _digits_auto(quantized, digits, monkeypatch, int8_output=None, slow_float=False):
    """``optimize("auto")`` on the digits run with int8 allowed (ONNX Runtime only, to keep it
    short): ``int8_output`` changes what the static int8 model answers; ``slow_float`` makes every
    float candidate run its graph four times per call."""
    opt = importlib.import_module("hybridvit.inference.optimize")  # the package attribute is the function

    model, *_ = quantized
    train, _, val, _ = digits
    real_quantize, real_build = opt.quantize_static, opt._build

    def quantize(*args, **kwargs):
        q = real_quantize(*args, **kwargs)
        if int8_output is not None:
            runner = q.runners[q.input_hw]
            q.runners[q.input_hw] = lambda x: int8_output(runner(x))
        return q

    def build(model, fused, example, precision, backend, data=None):
        built = real_build(model, fused, example, precision, backend, data)
        if slow_float and not precision.startswith("int8"):
            runner = built.runners[built.input_hw]

            def four_times(x):
                for _ in range(3):
                    runner(x)
                return runner(x)
            built.runners[built.input_hw] = four_times
        return built

    monkeypatch.setattr(opt, "quantize_static", quantize)
    monkeypatch.setattr(opt, "_build", build)
    return optimize(model, "auto", torch.zeros(16, 3, *SIZE), backend="onnxruntime", calibration=train[:128],
                    validation=val)


def test_auto_refuses_int8_that_disagrees_with_fp32(quantized, digits, monkeypatch):
    # the int8 model made to disagree: its logits reversed; it is also the fastest candidate
    chosen = _digits_auto(quantized, digits, monkeypatch, int8_output=lambda logits: -logits, slow_float=True)
    assert chosen.precision == "fp32"
    assert chosen.agreement["int8-static/onnxruntime"] < TOP1_AGREEMENT
    assert math.isnan(chosen.measured["int8-static/onnxruntime"])
    assert chosen.reason.startswith("fp32/onnxruntime at ")  # says why, in what was measured
    assert (f"int8-static/onnxruntime refused: top-1 agreed with fp32 on "
            f"{chosen.agreement['int8-static/onnxruntime']:.1%}") in chosen.reason


def test_auto_picks_int8_when_it_agrees_and_is_faster(quantized, digits, monkeypatch):
    chosen = _digits_auto(quantized, digits, monkeypatch, slow_float=True)
    assert (chosen.precision, chosen.backend) == ("int8-static", "onnxruntime")
    assert chosen.agreement["int8-static/onnxruntime"] >= TOP1_AGREEMENT
    assert chosen.measured["int8-static/onnxruntime"] > chosen.measured["fp32/onnxruntime"]
    ratio = chosen.measured["fp32/onnxruntime"] / chosen.measured["int8-static/onnxruntime"]
    assert chosen.reason.startswith("int8-static/onnxruntime at ") and "fp32/onnxruntime " in chosen.reason
    assert f"({ratio:.2f}x)" in chosen.reason
    val = digits[2]
    assert (chosen(val).argmax(1) == quantized[0].eval()(val).argmax(1)).float().mean() >= TOP1_AGREEMENT


def test_auto_without_validation_stays_in_float(quantized, digits):
    model, *_ = quantized
    chosen = optimize(model, "auto", torch.zeros(16, 3, *SIZE), backend="onnxruntime", calibration=digits[0][:64])
    assert chosen.precision == "fp32" and not chosen.agreement
    assert not any(key.startswith("int8") for key in chosen.measured)
    assert chosen.reason.endswith("int8 not tried: no validation images to check its answers on")


def test_static_int8_through_nncf_runs_and_is_close_to_fp32(quantized, digits):
    """NNCF's default quantization, the peer's method on our export: int8, fixed size, and close
    to fp32 (on the digits run it agreed on 96.9% of the images, below auto's 99% gate)."""
    model, _, _, x, y = quantized
    int8 = quantize_static(model, digits[0][:256], backend="nncf")
    assert (int8.precision, int8.backend) == ("int8-static", "nncf")
    with torch.inference_mode():
        fp32 = model.eval()(x).argmax(1)
    assert (int8(x).argmax(1) == fp32).float().mean() >= 0.95
    with pytest.raises(ValueError, match="32x32"):
        int8(torch.zeros(1, 3, 48, 48))
