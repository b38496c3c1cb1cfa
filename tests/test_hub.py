"""Published weights and the Hugging Face Hub, against a local Hub on 127.0.0.1 (never the network).

Fixtures are written by the reference libraries (transformers' ``save_pretrained``, timm's state
dict) in the layouts the real repositories use, served by ``hub_server.FakeHub`` and fetched by
huggingface_hub into a private cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
import transformers
from conftest import randomize_, rel_err, with_sources
from huggingface_hub import constants
from hub_server import FakeHub
from safetensors.torch import save_file
from typer.testing import CliRunner

import hybridvit
from hybridvit.api import load_source
from hybridvit.checkpoints import CheckpointError, load_trained
from hybridvit.checkpoints.hf_folder import foreign_extra
from hybridvit.cli import app
from hybridvit.data import example_image
from hybridvit.predict import Predictor
from hybridvit.publish import push_to_hub, save_for_hub
from hybridvit.registry import _REGISTRY, get_model_info, list_models

_LEVIT = "https://dl.fbaipublicfiles.com/LeViT/"
EXPECTED_SOURCES = {
    ("levit_128s", "in1k"): (_LEVIT + "LeViT-128S-96703c44.pth", "hf-hub:facebook/levit-128S", "hf-hub:timm/levit_128s.fb_dist_in1k"),
    ("levit_128", "in1k"): (_LEVIT + "LeViT-128-b88c2750.pth", "hf-hub:facebook/levit-128", "hf-hub:timm/levit_128.fb_dist_in1k"),
    ("levit_192", "in1k"): (_LEVIT + "LeViT-192-92712e41.pth", "hf-hub:facebook/levit-192", "hf-hub:timm/levit_192.fb_dist_in1k"),
    ("levit_256", "in1k"): (_LEVIT + "LeViT-256-13b5763e.pth", "hf-hub:facebook/levit-256", "hf-hub:timm/levit_256.fb_dist_in1k"),
    ("levit_384", "in1k"): (_LEVIT + "LeViT-384-9bdaf2e2.pth", "hf-hub:facebook/levit-384", "hf-hub:timm/levit_384.fb_dist_in1k"),
    ("cvt_13", "in1k"): ("hf-hub:microsoft/cvt-13",),
    ("cvt_13", "in1k-384"): ("hf-hub:microsoft/cvt-13-384",),
    ("cvt_13", "in22k-384"): ("hf-hub:microsoft/cvt-13-384-22k",),
    ("cvt_21", "in1k"): ("hf-hub:microsoft/cvt-21",),
    ("cvt_21", "in1k-384"): ("hf-hub:microsoft/cvt-21-384",),
    ("cvt_21", "in22k-384"): ("hf-hub:microsoft/cvt-21-384-22k",),
    ("cvt_w24", "in22k-384"): ("hf-hub:microsoft/cvt-w24-384-22k",),
}


@pytest.fixture
def hub(monkeypatch):
    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.close()


def _cvt_folder(path, size: int):
    """A microsoft/cvt-13-style folder: transformers' CvT-13 with 1000 ImageNet labels and ConvNext's processor."""
    torch.manual_seed(0)
    labels = hybridvit.data.imagenet_labels(1000)[1]
    ref = randomize_(transformers.CvtForImageClassification(transformers.CvtConfig(
        num_labels=1000, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}))).eval()
    ref.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": size}, "crop_pct": 0.875,
         "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3}))
    return ref


def _timm_folder(path):
    """A timm/levit_128s.fb_dist_in1k-style folder: timm's keys in safetensors, timm's config.json."""
    ref = randomize_(timm.create_model("levit_128s"), seed=3).eval()
    path.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"architecture": "levit_128s", "num_classes": 1000, "pretrained_cfg": {
        "input_size": [3, 224, 224], "crop_pct": 0.9, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}))
    return ref


def test_every_model_name_resolves_to_published_weights():
    got = {(name, w.tag): w.sources for name in list_models() for w in get_model_info(name).pretrained}
    assert got == EXPECTED_SOURCES
    assert all(w.download_mb and w.top1 for name in list_models() for w in get_model_info(name).pretrained)
    assert get_model_info("cvt_13").pretrained_weights("in22k-384").img_size == 384
    with pytest.raises(ValueError, match="no pretrained tag 'in21k'.*in1k, in1k-384, in22k-384"):
        hybridvit.create_model("cvt_13", pretrained=True, pretrained_tag="in21k")
    with pytest.raises(ValueError, match="no published weights"):
        hybridvit.create_model("graft_resnet50_deit_s", pretrained=True)


@pytest.mark.slow
def test_pretrained_cvt_from_the_hub_cache_reuse_and_offline(hub, tmp_path, monkeypatch):
    ref = _cvt_folder(tmp_path / "cvt", 384)
    hub.add_folder("microsoft/cvt-13-384", tmp_path / "cvt")
    model = hybridvit.create_model("cvt_13", pretrained=True, pretrained_tag="in1k-384").eval()
    assert model.input_hw == (384, 384)  # the tag's input size
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        assert rel_err(model(x), ref(pixel_values=x).logits) < 1e-4
    assert hub.downloads("model.safetensors") == 1
    hybridvit.create_model("cvt_13", pretrained=True, pretrained_tag="in1k-384")
    assert hub.downloads("model.safetensors") == 1  # the cache serves the second use
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen = len(hub.requests)
    predictor = Predictor("cvt_13", pretrained=True, pretrained_tag="in1k-384")
    assert len(hub.requests) == seen  # offline: the cache only
    assert predictor.classes[0] == "tench, Tinca tinca" and len(predictor.classes) == 1000
    _, extra = load_source("cvt_13", pretrained=True, pretrained_tag="in1k-384")
    assert extra["crop_pct"] == 1.0 and extra["input_size"] == [384, 384] and extra["classes"][0] == "n01440764"
    _, folder_extra = load_trained("hf-hub:microsoft/cvt-13-384")  # what the folder itself says
    assert folder_extra["crop_pct"] == 1.0 and folder_extra["input_size"] == [384, 384]
    assert folder_extra["class_names"][0] == "tench, Tinca tinca" and folder_extra["classes"][0] == "n01440764"
    # the default tag is another repository, not in the cache
    with pytest.raises(CheckpointError, match=r"offline \(HF_HUB_OFFLINE=1\) and microsoft/cvt-13 is not in the Hub cache"):
        hybridvit.create_model("cvt_13", pretrained=True)


def test_levit_falls_back_from_the_official_url_to_the_hub(hub, tmp_path, monkeypatch, torch_hub_dir, images):
    info = _REGISTRY["levit_128s"]
    dead = (tmp_path / "nowhere" / "LeViT-128S-96703c44.pth").as_uri()
    monkeypatch.setitem(_REGISTRY, "levit_128s", with_sources(info, dead, *info.pretrained[0].sources[1:]))
    ref = _timm_folder(tmp_path / "timm")
    hub.add_folder("timm/levit_128s.fb_dist_in1k", tmp_path / "timm")  # facebook/levit-128S is missing: skipped too
    model = hybridvit.create_model("levit_128s", pretrained=True).eval()
    with torch.no_grad():
        assert rel_err(model(images), ref(images)) < 1e-4
    # the timm folder alone describes its model
    loaded, extra = load_trained("hf-hub:timm/levit_128s.fb_dist_in1k")
    assert loaded.model_name == "levit_128s" and extra["crop_pct"] == 0.9 and extra["input_size"] == [224, 224]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="any source") as error:
        hybridvit.create_model("levit_128", pretrained=True)
    assert error.value.args[0].count("offline") == 3  # each source says why


def test_hub_folder_errors_revisions_and_corrupt_files(hub, tmp_path, monkeypatch):
    first = randomize_(hybridvit.create_model("levit_128s", num_classes=10), seed=1).eval()
    second = randomize_(hybridvit.create_model("levit_128s", num_classes=10), seed=2).eval()
    push_to_hub(first, "me/levit")
    sha = hub.repos["me/levit"].commits[-1][0]
    push_to_hub(second, "me/levit")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(hybridvit.load_model(f"hf-hub:me/levit@{sha}")(x), first(x))  # pinned
        assert torch.equal(hybridvit.load_model("hf-hub:me/levit")(x), second(x))  # main: the latest
    with pytest.raises(CheckpointError, match="revision .* does not exist"):
        hybridvit.load_model("hf-hub:me/levit@v9")
    with pytest.raises(CheckpointError, match="no Hub repository me/absent"):
        hybridvit.load_model("hf-hub:me/absent")
    with pytest.raises(ValueError, match="hf-hub:ORG/NAME"):
        hybridvit.load_model("hf-hub:levit")
    config = hub.repos["me/levit"].commits[-1][1]["config.json"]
    hub.add_commit("me/corrupt", {"config.json": config, "model.safetensors": b"\x00garbage, not safetensors"})
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        hybridvit.load_model("hf-hub:me/corrupt")
    hub.add_commit("me/no-weights", {"config.json": config})
    with pytest.raises(CheckpointError, match="holds none of model.safetensors, pytorch_model.bin"):
        hybridvit.load_model("hf-hub:me/no-weights")
    hub.add_commit("me/bin", {"config.json": config, "pytorch_model.bin": _torch_bytes(tmp_path, second)})
    with torch.no_grad():  # older repositories publish pytorch_model.bin only (read weights-only)
        assert torch.equal(hybridvit.load_model("hf-hub:me/bin")(x), second(x))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"offline \(HF_HUB_OFFLINE=1\) and me/never is not in the Hub cache"):
        hybridvit.load_model("hf-hub:me/never")


def _torch_bytes(tmp_path, model) -> bytes:
    from hybridvit.checkpoints.hf_folder import transformers_layout

    _, state, _ = transformers_layout(model, {})
    torch.save(state, tmp_path / "pytorch_model.bin")
    return (tmp_path / "pytorch_model.bin").read_bytes()


def test_unreachable_hub_says_so(monkeypatch):
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(http.time, "sleep", lambda seconds: None)  # huggingface_hub retries 5 times with backoff
    with pytest.raises(CheckpointError, match=r"the Hub \(http://127.0.0.1:9\) is unreachable and me/x is not in the Hub cache"):
        hybridvit.load_model("hf-hub:me/x")


@pytest.mark.slow
def test_push_then_load_round_trip_and_model_card(hub, digits_run, tmp_path):
    url = push_to_hub(digits_run, "me/levit-digits")
    assert url.startswith(hub.url)
    ours, extra = load_trained(digits_run / "model")
    pulled, pulled_extra = load_trained("hf-hub:me/levit-digits")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pulled(x), ours(x))
        folder = hybridvit.checkpoints.download_hub_folder("me/levit-digits")
        hf, info = transformers.AutoModelForImageClassification.from_pretrained(folder, output_loading_info=True)
        assert not any(info.values())  # no missing, unexpected or mismatched keys
        assert rel_err(hf.eval()(pixel_values=x).logits, ours(x)) < 1e-5
    assert pulled_extra["classes"] == extra["classes"] and pulled.model_name == "levit_128s"
    assert hf.config.id2label[3] == extra["classes"][3]
    # the image processor written for transformers says the run's own preprocessing
    read_back = foreign_extra(json.loads((folder / "config.json").read_text()),
                              json.loads((folder / "preprocessor_config.json").read_text()))
    assert read_back["crop_pct"] == pytest.approx(extra["crop_pct"]) and read_back["input_size"] == extra["input_size"]
    assert read_back["mean"] == pytest.approx(extra["mean"]) and read_back["classes"] == extra["classes"]
    files = hub.repos["me/levit-digits"].commits[-1][1]
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "train_config.json",
            "training_curve.png"} <= set(files)
    card = files["README.md"].decode()
    metrics = [json.loads(line) for line in (digits_run / "metrics.jsonl").read_text().splitlines()][-1]
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    for text in ("library_name: hybridvit", "levit_128s", f"{params:.2f}M", "32x32", 'load_model("hf-hub:me/levit-digits")',
                 "AutoModelForImageClassification", "| epochs | 3 |", f"| top-1 (%) | {metrics['val_top1']:.2f} |",
                 "![training curve](training_curve.png)", "76.6%"):
        assert text in card, text
    # another process, with HF_HUB_OFFLINE=1 and no Hub: the CLI reads the same repository from the cache
    example_image(40).save(tmp_path / "x.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "COLUMNS": "400"}
    command = [sys.executable, "-m", "hybridvit", "predict", "hf-hub:me/levit-digits", str(tmp_path / "x.png"), "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    top = json.loads(done.stdout.splitlines()[-1])["top"]
    assert top[0]["class"] == Predictor(digits_run / "model").predict([tmp_path / "x.png"])[0].top[0][0]
    done = subprocess.run(command[:4] + ["hf-hub:me/elsewhere"] + command[5:], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "offline (HF_HUB_OFFLINE=1) and me/elsewhere is not in the Hub cache" in done.stdout


def test_unmappable_model_is_pushed_in_hybridvit_layout(hub, tmp_path):
    model = randomize_(hybridvit.create_model("levit_128s", ablation="A3", num_classes=4)).eval()
    folder = save_for_hub(model, tmp_path / "folder", "me/a3", extra={"classes": ["a", "b", "c", "d"]})
    assert json.loads((folder / "config.json").read_text())["format"] == "hybridvit"
    card = (folder / "README.md").read_text()
    assert "ablation A3" in card and "| differs from levit_128s in | norm=layer |" in card
    assert "AutoModelForImageClassification" not in card
    result = CliRunner().invoke(app, ["push", str(folder), "--repo", "me/a3"])  # a model folder
    assert result.exit_code == 0, result.output
    pulled, extra = load_trained("hf-hub:me/a3")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(pulled(x), model(x))
    assert extra["classes"] == ["a", "b", "c", "d"]


def test_cli_names_need_pretrained():
    result = CliRunner().invoke(app, ["predict", "levit_128s", "x.png"])
    assert result.exit_code != 0 and "add --pretrained" in str(result.exception)


def test_models_weights_table_lists_every_source():
    result = CliRunner(env={"COLUMNS": "250"}).invoke(app, ["models", "cvt_13", "--weights"])
    assert result.exit_code == 0, result.output
    for text in ("in1k-384", "in22k-384", "hf-hub:microsoft/cvt-13-384-22k", "83.3", "80 MB", "ImageNet-22k, then 1k"):
        assert text in result.output, text
