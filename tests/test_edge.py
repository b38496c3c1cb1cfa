"""On-device export: the device pass computes what the fused model computes; LeViT and CvT lower
to XNNPACK whole in fp32 and int8; every file is checked in its own runtime before it is written
(a program that disagrees with PyTorch is refused); int8 agrees with the trained digits model;
the files run in predict and benchmark; LiteRT files classify in MediaPipe with no code of ours;
Core ML packages read back as image classifiers."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import digits_folder, randomize_
from PIL import Image
from typer.testing import CliRunner

import hybridvit
from hybridvit.cli import app
from hybridvit.fusion import fuse
from hybridvit.inference.deploy import decompose_activations, for_device

executorch = pytest.importorskip("executorch")
# imported here, before any test's state check: importing them sets OPENVINO_LIB_PATH in os.environ
pytest.importorskip("executorch.backends.xnnpack.partition.xnnpack_partitioner")
pytest.importorskip("executorch.exir")
pytest.importorskip("executorch.runtime")
pytest.importorskip("coremltools")  # sets TF_CPP_MIN_LOG_LEVEL when imported

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
# litert-torch lives in an environment of its own (.ci/run makes it; the README's install)
LITERT_PYTHON = Path(os.environ.get("HYBRIDVIT_LITERT_PYTHON", ROOT / ".venv-litert" / "bin" / "python"))


@pytest.mark.parametrize("name, args", [("levit_128s", {}), ("levit_192", {"img_size": 160}),
                                        ("levit_128s", {"ablation": "A5"}),  # A5: without the attention bias
                                        ("cvt_13", {"img_size": 96}), ("cvt_21", {"img_size": 64})])
def test_the_device_pass_computes_what_the_fused_model_computes(name, args):
    fused = fuse(randomize_(hybridvit.create_model(name, **args), seed=2).eval())
    before = [type(m).__name__ for m in fused.modules()]
    device = for_device(fused)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in device.modules())  # no native_layer_norm left
    x = torch.randn(3, 3, *fused.input_hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(device(x), fused(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(device.forward_head(device.forward_features(x), pre_logits=True),
                                   fused.forward_head(fused.forward_features(x), pre_logits=True), rtol=1e-5, atol=1e-5)
    assert [type(m).__name__ for m in fused.modules()] == before  # the caller's model is left as it was
    written_out = decompose_activations(copy.deepcopy(device))  # LiteRT's int8 form: GELU's tanh form within 1e-3
    assert not any(isinstance(m, (torch.nn.GELU, torch.nn.Hardswish)) for m in written_out.modules())
    with torch.no_grad():
        torch.testing.assert_close(written_out(x), device(x), rtol=0, atol=2e-3 if "cvt" in name else 1e-5)


@pytest.mark.slow
def test_cvt_lowers_to_xnnpack_whole_in_fp32_and_int8():
    """CvT-13 with one block per stage: its stem, class token, LayerNorms and one-head first stage
    (LeViT's programs are checked whole on the digits model below)."""
    from hybridvit.inference.edge import executorch_program

    device = for_device(fuse(randomize_(hybridvit.create_model("cvt_13", img_size=64, depth=(1, 1, 1)),
                                        seed=1).eval()))
    example = torch.zeros(1, 3, *device.input_hw)
    calibration = [torch.randn(2, 3, *device.input_hw)]
    for batches in (None, calibration):
        _, partitions, outside = executorch_program(device, example, batches)
        assert (partitions, outside) == (1, {}), batches is not None


def _digits_val(count: int) -> torch.Tensor:
    """The digits' validation images as the 32x32 digits model takes them (normalised)."""
    from hybridvit.data import build_datasets, eval_transform
    from hybridvit.registry import get_model_info

    data = build_datasets(None, with_train=False)
    data.prepare((32, 32), None, eval_transform(get_model_info("levit_128s"), (32, 32), crop_pct=1.0))
    return torch.stack([data.val[i][0] for i in range(count)])


@pytest.fixture(scope="module")
def digits_programs(digits_run, tmp_path_factory):
    """The digits model with an ExecuTorch program beside it, fp32 and int8 (calibrated on 300
    training digits), written by the command."""
    root = tmp_path_factory.mktemp("edge")
    shutil.copytree(digits_run / "model", root / "model")
    data = digits_folder(root / "data", 300)
    outputs = {}
    for label, options in (("fp32", []), ("int8", ["--int8", "--calibration", str(data)])):
        target = root / "model" / f"digits_{label}.pte"
        outputs[label] = runner.invoke(app, ["export", str(root / "model"), "--format", "executorch",
                                             "--output", str(target), *options])
        assert outputs[label].exit_code == 0, outputs[label].output
    return root, outputs


@pytest.mark.slow
def test_executorch_programs_are_delegated_checked_labelled_and_int8_agrees(digits_programs):
    from hybridvit.inference.edge import ProgramRunner

    root, outputs = digits_programs
    model_dir = root / "model"
    for label, result in outputs.items():
        assert "1 XNNPACK partition(s), operators outside: none" in " ".join(result.output.split()), label
    assert "ExecuTorch vs PyTorch on 32 held-out images" in " ".join(outputs["int8"].output.split())
    sidecar = json.loads((model_dir / "digits_fp32.json").read_text())
    assert sidecar["classes"] == [str(d) for d in range(10)] and sidecar["input"]["shape"] == [1, 3, 32, 32]
    assert sidecar["mean"] and sidecar["check"]["agreement"] == 1.0 and sidecar["output"] == "logits"
    assert json.loads((model_dir / "digits_int8.json").read_text())["int8"] is True
    # the digits' validation images through the written files: fp32 gives the eager logits, int8 its top-1
    images = _digits_val(256)
    with torch.no_grad():
        eager = fuse(hybridvit.load_model(model_dir))(images)
    fp32 = ProgramRunner.from_file(model_dir / "digits_fp32.pte")(images)
    assert (fp32.argmax(1) == eager.argmax(1)).all() and (fp32 - eager).abs().max() < 1e-3
    int8 = ProgramRunner.from_file(model_dir / "digits_int8.pte")(images)
    assert (int8.argmax(1) == eager.argmax(1)).float().mean() >= 0.99
    assert (int8 - eager).abs().max() > 1e-3  # it is int8: not the fp32 program again
    assert (model_dir / "digits_int8.pte").stat().st_size < 0.4 * (model_dir / "digits_fp32.pte").stat().st_size


@pytest.mark.slow
def test_a_program_that_disagrees_is_refused_and_nothing_is_written(digits_programs, monkeypatch):
    from hybridvit.inference import edge

    root, _ = digits_programs
    original = edge.ProgramRunner.__call__
    monkeypatch.setattr(edge.ProgramRunner, "__call__", lambda self, x: -original(self, x))
    with pytest.raises(ValueError, match="top-1 agrees with PyTorch on .* under 99%: not written"):
        edge.export_edge(hybridvit.load_model(root / "model"), root / "bad.pte", "executorch", images=_digits_val(32))
    assert not (root / "bad.pte").exists() and not (root / "bad.json").exists()


@pytest.mark.slow
def test_predict_and_benchmark_take_program_files(digits_programs):
    from hybridvit.inference.edge import ProgramRunner
    from hybridvit.serving.predict import InferenceSpec, Predictor

    root, _ = digits_programs
    program = root / "model" / "digits_int8.pte"
    paths = sorted((root / "data" / "train" / "7").glob("*.png"))[:6]
    predictor = Predictor(InferenceSpec(program, model_threads=1))
    rows = list(predictor.predict_images(paths, k=1))
    pixels = torch.stack([torch.from_numpy(predictor.preprocess(p)) for p in paths]).float()
    logits = ProgramRunner.from_file(program)(pixels * predictor._deployed.scale - predictor._deployed.shift)
    assert [r.top[0][0] for r in rows] == [str(i) for i in logits.argmax(1).tolist()]
    assert np.allclose([r.top[0][1] for r in rows], logits.softmax(1).max(1).values.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="an ExecuTorch program runs as it was written"):
        Predictor(InferenceSpec(program, "int8"))
    result = runner.invoke(app, ["benchmark", str(program), "--time", "0.3", "--warmup", "0", "--rounds", "1",
                                 "--batch", "2", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output.strip().splitlines()[-1])["results"]
    assert row["name"] == "digits_int8.pte (ExecuTorch)" and row["images_per_second"] > 0


@pytest.mark.slow
def test_core_ml_packages_read_back_as_image_classifiers(digits_programs):
    import coremltools as ct

    root, _ = digits_programs
    sizes = {}
    for label, options in (("fp32", []), ("int8", ["--int8", "--calibration", str(root / "data")])):
        target = root / f"digits_{label}.mlpackage"
        for _ in range(2):  # a second export replaces the package
            result = runner.invoke(app, ["export", str(root / "model"), "--format", "coreml", "--output", str(target),
                                         *options])
            assert result.exit_code == 0, result.output
        assert "an image classifier over 10 classes" in " ".join(result.output.split())
        spec = ct.utils.load_spec(str(target))
        (image,) = spec.description.input
        assert image.type.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
        assert (image.type.imageType.height, image.type.imageType.width) == (32, 32)
        assert spec.description.predictedFeatureName == "classLabel"
        assert spec.description.metadata.license.startswith("Apache-2.0")
        assert "levit_128s" in spec.description.metadata.shortDescription
        sizes[label] = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    assert sizes["int8"] < 0.6 * sizes["fp32"]  # int8 weights (the fp32 package stores fp16 weights)
    result = runner.invoke(app, ["export", str(root / "model"), "--format", "coreml", "--output",
                                 str(root / "x.coreml")])
    assert result.exit_code != 0 and "NAME.mlpackage" in str(result.exception)


def _litert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(LITERT_PYTHON), *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.skipif(not LITERT_PYTHON.exists(), reason="no .venv-litert: see the README's install (.ci/run makes it)")
def test_litert_programs_are_delegated_checked_and_classify_in_mediapipe(digits_programs):
    from hybridvit.inference.edge import ProgramRunner, litert_outside, to_pixels
    from hybridvit.serving.predict import InferenceSpec, Predictor

    root, _ = digits_programs
    model_dir = root / "model"
    for label, options in (("fp32", []), ("int8", ["--int8", "--calibration", str(root / "data")])):
        done = _litert("-m", "hybridvit", "export", str(model_dir), "--format", "litert", "--output",
                       str(model_dir / f"digits_{label}.tflite"), *options)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "1 XNNPACK partition(s), operators outside: none" in " ".join(done.stdout.split()), label
        assert litert_outside((model_dir / f"digits_{label}.tflite").read_bytes()) == (1, {})
    model = fuse(hybridvit.load_model(model_dir))
    images = _digits_val(256)
    with torch.no_grad():
        eager = model(images).softmax(1)
    sidecar = json.loads((model_dir / "digits_fp32.json").read_text())
    mean, std = sidecar["mean"], sidecar["std"]
    assert sidecar["input"]["shape"] == [1, 32, 32, 3] and sidecar["output"] == "probabilities"
    fp32 = ProgramRunner.from_file(model_dir / "digits_fp32.tflite")(to_pixels(images, mean, std))
    assert (fp32 - eager).abs().max() < 1e-4
    int8 = ProgramRunner.from_file(model_dir / "digits_int8.tflite")(to_pixels(images, mean, std))
    assert (int8.argmax(1) == eager.argmax(1)).float().mean() >= 0.99 and (int8 - eager).abs().max() > 1e-4
    # predict reads the .tflite (it normalises in its graph): the eager model's probabilities
    paths = sorted((root / "data" / "train" / "7").glob("*.png"))[:4]
    rows = list(Predictor(InferenceSpec(model_dir / "digits_fp32.tflite", model_threads=1)).predict_images(paths, k=1))
    reference = list(Predictor(InferenceSpec(model_dir, "fp32", backend="torchscript", model_threads=1)).predict_images(paths, k=1))
    assert [r.top[0][0] for r in rows] == [r.top[0][0] for r in reference]
    assert np.allclose([r.top[0][1] for r in rows], [r.top[0][1] for r in reference], atol=1e-4)
    # MediaPipe's image classifier task reads the labels and the input from the file's metadata
    image = (to_pixels(images[:1], mean, std)[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy())
    Image.fromarray(image).save(root / "digit.png")
    script = ("import sys, mediapipe as mp\n"
              "from mediapipe.tasks.python import BaseOptions, vision\n"
              "options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=sys.argv[1]), "
              "max_results=1)\n"
              "with vision.ImageClassifier.create_from_options(options) as classifier:\n"
              "    top = classifier.classify(mp.Image.create_from_file(sys.argv[2])).classifications[0].categories[0]\n"
              "    print(top.category_name, top.score)\n")
    done = _litert("-c", script, str(model_dir / "digits_fp32.tflite"), str(root / "digit.png"))
    assert done.returncode == 0, done.stderr
    name, score = done.stdout.split()[-2:]
    with torch.no_grad():
        expected = model((torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 - torch.tensor(mean).view(
            1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).softmax(1)[0]
    assert name == str(expected.argmax().item()) and abs(float(score) - expected.max().item()) < 1e-4
