"""Static int8 (ONNX Runtime, QDQ): accuracy of the digits-trained LeViT, the written file, the command."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import hybridvit
from hybridvit.checkpoints import load_trained
from hybridvit.cli import app
from hybridvit.data import DataError, build_datasets, eval_transform
from hybridvit.data.datasets import digits_split
from hybridvit.export import onnxruntime_session
from hybridvit.quantize import calibration_set, quantize_static

runner = CliRunner()


@pytest.fixture(scope="module")
def quantized(digits_run, tmp_path_factory):
    """The digits run, its int8 model calibrated on 256 seeded training digits (written to a
    file), and the 360 validation digits with their labels."""
    model, extra = load_trained(digits_run / "model")
    size = tuple(extra["input_size"])
    data = build_datasets(None)
    transform = eval_transform(hybridvit.get_model_info("levit_128s"), size, crop_pct=1.0)
    data.prepare(size, transform, transform)
    picked = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:256].tolist()
    calibration = torch.stack([data.train[i][0] for i in picked])
    path = tmp_path_factory.mktemp("int8") / "digits_int8.onnx"
    int8 = quantize_static(model, calibration, path)
    x = torch.stack([data.val[i][0] for i in range(len(data.val))])
    return model, int8, path, x, torch.tensor(data.val.targets)


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


def _digits_folder(root: Path, count: int) -> Path:
    """ImageNet layout with ``count`` 8x8 training digits as PNGs (upscaled by the model's
    own preprocessing) and one file that is not an image."""
    images, targets, train_idx, _ = digits_split()
    for i in train_idx[:count]:
        folder = root / "train" / str(targets[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((images[i] * 255 / 16).astype(np.uint8), mode="L").save(folder / f"{i}.png")
    (root / "train" / "3" / "broken.png").write_bytes(b"not a png")
    (root / "val").mkdir()  # never calibrated on
    return root


@pytest.mark.slow
def test_quantize_command(digits_run, tmp_path):
    shutil.copytree(digits_run / "model", tmp_path / "model")
    data = _digits_folder(tmp_path / "data", 90)  # fewer than asked for: all are read
    result = runner.invoke(app, ["quantize", str(tmp_path / "model"), "--calibration", str(data), "--images", "64",
                                 "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    target = tmp_path / "model" / "levit_128s_int8.onnx"
    assert f"wrote {target}" in result.output.replace("\n", "")
    assert "calibrated on 64 images, 1 unreadable skipped" in result.output
    assert "on 26 held-out images: top-1 agreement" in result.output  # the last two batches: 16 + 10
    agreement = float(result.output.split("top-1 agreement")[1].split("%")[0])
    assert agreement >= 90
    assert "QuantizeLinear" in {node.op_type for node in onnx.load(str(target)).graph.node}


def test_calibration_set_is_seeded_and_skips_unreadable_files(tmp_path):
    model = hybridvit.create_model("levit_128s", img_size=32, num_classes=10)
    data = _digits_folder(tmp_path, 40)
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
    monkeypatch.setattr("hybridvit.quantize.onnxruntime_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install hybridvit\[export\]"):
        quantize_static(model, torch.zeros(1, 3, 32, 32))
