"""Published weights and the Hugging Face Hub, against a local Hub on 127.0.0.1 (never the network).

Fixtures are written by the reference libraries (transformers' ``save_pretrained``, timm's state
dict) in the layouts the real repositories use, served by ``hub_server.FakeHub`` and fetched by
huggingface_hub into a private cache.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import timm
import torch
import transformers
from conftest import randomize_, rel_err, with_sources
from huggingface_hub import constants
from hub_server import hub  # noqa: F401  (the local Hub fixture)
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import hybridvit
from hybridvit.api import load_source
from hybridvit.checkpoints import CheckpointError, load_trained
from hybridvit.checkpoints.hf_folder import foreign_extra
from hybridvit.checkpoints.io import Checkpoint
from hybridvit.cli import app, main
from hybridvit.data import example_image
from hybridvit.serving.predict import InferenceSpec, Predictor
from hybridvit.publish import push_to_hub, save_for_hub
from hybridvit.model_info import _REGISTRY
from hybridvit.registry import PretrainedWeights, get_model_info, list_models, to_hw

# Facts from outside hybridvit, to hold its registry against.
# The official LeViT README's model table: ImageNet-1k top-1, top-5 and the weights file, whose name
# carries the first 8 hex digits of the file's SHA-256 (torch.hub's convention); transformers' LeViT
# conversion script named the Hub copies after the release (levit-128S ...).
LEVIT_RELEASE = {
    "levit_128s": (76.6, 92.9, "LeViT-128S-96703c44.pth"),
    "levit_128": (78.6, 94.0, "LeViT-128-b88c2750.pth"),
    "levit_192": (80.0, 94.7, "LeViT-192-92712e41.pth"),
    "levit_256": (81.6, 95.4, "LeViT-256-13b5763e.pth"),
    "levit_384": (82.6, 96.0, "LeViT-384-9bdaf2e2.pth"),
}
LEVIT_URL = "https://dl.fbaipublicfiles.com/LeViT/"
# Microsoft's CvT repositories (transformers' CvT archive list; W24 from its conversion script) ->
# (variant, input size, pre-training data, ImageNet-1k top-1 in the CvT paper's Tables 2 and 3).
CVT_PAPER = {
    "microsoft/cvt-13": ("cvt_13", 224, "ImageNet-1k", 81.6),
    "microsoft/cvt-13-384": ("cvt_13", 384, "ImageNet-1k", 83.0),
    "microsoft/cvt-13-384-22k": ("cvt_13", 384, "ImageNet-22k", 83.3),
    "microsoft/cvt-21": ("cvt_21", 224, "ImageNet-1k", 82.5),
    "microsoft/cvt-21-384": ("cvt_21", 384, "ImageNet-1k", 83.3),
    "microsoft/cvt-21-384-22k": ("cvt_21", 384, "ImageNet-22k", 84.9),
    "microsoft/cvt-w24-384-22k": ("cvt_w24", 384, "ImageNet-22k", 87.7),
}
# The architectures as transformers' conversion scripts configure them (LeViT: hidden sizes, heads,
# depths, key dim) and the CvT paper's Table 2 gives them (embedding dims, heads, depths).
LEVIT_HF_CONFIG = {
    "levit_128s": ([128, 256, 384], [4, 6, 8], [2, 3, 4], 16),
    "levit_128": ([128, 256, 384], [4, 8, 12], [4, 4, 4], 16),
    "levit_192": ([192, 288, 384], [3, 5, 6], [4, 4, 4], 32),
    "levit_256": ([256, 384, 512], [4, 6, 8], [4, 4, 4], 32),
    "levit_384": ([384, 512, 768], [6, 9, 12], [4, 4, 4], 32),
}
CVT_HF_CONFIG = {"cvt_13": ([64, 192, 384], [1, 3, 6], [1, 2, 10]), "cvt_21": ([64, 192, 384], [1, 3, 6], [1, 4, 16]),
                 "cvt_w24": ([192, 768, 1024], [3, 12, 16], [2, 2, 20])}


def _cvt_folder(path, size: int, name: str = "cvt_13"):
    """A microsoft/cvt-*-style folder: transformers' CvT (the paper's architecture) with 1000 ImageNet
    labels and ConvNext's processor at ``size``."""
    torch.manual_seed(0)
    labels = hybridvit.data.imagenet_labels(1000)[1]
    dims, heads, depth = CVT_HF_CONFIG[name]
    ref = randomize_(transformers.CvtForImageClassification(transformers.CvtConfig(
        embed_dim=dims, num_heads=heads, depth=depth, num_labels=1000, id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)}))).eval()
    ref.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": size}, "crop_pct": 0.875,
         "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3}))
    return ref


def _blank(build: Callable[[], nn.Module]) -> nn.Module:
    """A model whose weights are zeros, built without initialising them: for checks of keys and shapes."""
    with torch.device("meta"):
        model = build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.zero_()
    return model.eval()


def _timm_folder(path, name: str = "levit_128s", ref: nn.Module | None = None):
    """A timm/levit_*.fb_dist_in1k-style folder: timm's keys in safetensors, timm's config.json."""
    ref = randomize_(timm.create_model(name), seed=3).eval() if ref is None else ref
    path.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"architecture": name, "num_classes": 1000, "pretrained_cfg": {
        "input_size": [3, 224, 224], "crop_pct": 0.9, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}))
    return ref


def _published() -> dict[tuple[str, str], PretrainedWeights]:
    """Every registered set of published weights by (variant, tag)."""
    return {(name, w.tag): w for name in list_models() for w in get_model_info(name).pretrained}


def test_levit_weights_are_the_official_release_and_its_hub_copies():
    levit = {key: w for key, w in _published().items() if key[0].startswith("levit")}
    assert sorted(levit) == sorted((name, "in1k") for name in LEVIT_RELEASE)
    for (name, _), weights in levit.items():
        info, (top1, top5, release) = get_model_info(name), LEVIT_RELEASE[name]
        official, facebook, timm_copy = weights.sources  # the release first, then its Hub copies
        assert official == LEVIT_URL + release, name
        # the file name's hash is what torch.hub checks the download against
        variant, digest = re.fullmatch(r"LeViT-(\w+)-([0-9a-f]{8})\.pth", release).groups()
        assert torch.hub.HASH_REGEX.search(official.rsplit("/", 1)[1]).group(1) == digest, name
        assert facebook == f"hf-hub:facebook/levit-{variant}", name
        assert timm_copy.removeprefix("hf-hub:") in {timm.models.get_pretrained_cfg(t).hf_hub_id
                                                      for t in timm.list_pretrained(f"{name}.*")}, name
        assert timm.models.get_pretrained_cfg(timm_copy.split("/")[1]).input_size == info.input_size, name
        assert (weights.top1, info.paper_top1, info.paper_top5) == (top1, top1, top5), name
        assert weights.num_classes == 1000 and weights.pretrain == "ImageNet-1k", name


def test_cvt_weights_are_microsofts_hub_repositories_with_the_papers_figures():
    cvt = {key: w for key, w in _published().items() if key[0].startswith("cvt")}
    rows = {}
    for (name, tag), weights in cvt.items():
        (source,) = weights.sources
        repo = source.removeprefix("hf-hub:")
        assert repo in CVT_PAPER, (name, tag, repo)
        variant, size, data, top1 = CVT_PAPER[repo]
        info = get_model_info(name)
        rows[repo] = name
        assert name == variant and weights.top1 == top1, (name, tag)
        assert to_hw(weights.img_size or info.config.img_size) == (size, size), (name, tag)
        assert weights.pretrain.startswith(data), (name, tag)
        assert tag == "in" + data.split("-")[1] + ("-384" if size == 384 else ""), (name, tag)  # in1k, in1k-384, in22k-384
    assert rows.keys() == CVT_PAPER.keys()  # every published set, and nothing else
    for name in {row[0] for row in CVT_PAPER.values()}:  # the default set: the paper's headline, at the smallest input
        info = get_model_info(name)
        headline = min((row for row in CVT_PAPER.values() if row[0] == name), key=lambda row: row[1:3])
        assert CVT_PAPER[info.pretrained[0].sources[0].removeprefix("hf-hub:")] == headline, name
        assert info.paper_top1 == headline[3] and to_hw(info.config.img_size) == (headline[1], headline[1]), name


def test_download_sizes_are_the_fp32_weights():
    for (name, tag), weights in _published().items():
        with torch.device("meta"):
            model = hybridvit.create_model(name, num_classes=weights.num_classes)
        assert weights.download_mb == pytest.approx(4 * hybridvit.count_params(model) / 1e6, rel=0.03), (name, tag)


def test_unknown_tags_and_unpublished_models_are_refused():
    with pytest.raises(ValueError, match="no pretrained tag 'in21k'.*in1k, in1k-384, in22k-384"):
        hybridvit.create_model("cvt_13", pretrained=True, pretrained_tag="in21k")
    with pytest.raises(ValueError, match="no published weights"):
        hybridvit.create_model("graft_resnet50_deit_s", pretrained=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", LEVIT_RELEASE)
def test_every_levit_source_loads_into_the_registered_architecture(name, hub, tmp_path, torch_hub_dir, monkeypatch):
    """Each source in its publisher's layout, with the architecture from outside hybridvit (timm's by
    name; transformers' configured as its conversion script did): the release from torch.hub's cache,
    the Hub copies through the local Hub. Loading is strict (every key, every shape); the outputs
    of each layout are compared with its library's in test_checkpoints."""
    from test_checkpoints import timm_to_official

    ref = _timm_folder(tmp_path / "timm", name, _blank(lambda: timm.create_model(name)))
    hub.add_folder(f"timm/{name}.fb_dist_in1k", tmp_path / "timm")
    release = torch_hub_dir / "checkpoints" / LEVIT_RELEASE[name][2]
    release.parent.mkdir(parents=True)
    torch.save({"model": timm_to_official(ref.state_dict(), tuple(len(s.blocks) for s in ref.stages))}, release)
    hidden, heads, depths, key_dim = LEVIT_HF_CONFIG[name]
    _blank(lambda: transformers.LevitForImageClassificationWithTeacher(transformers.LevitConfig(
        hidden_sizes=hidden, num_attention_heads=heads, depths=depths, key_dim=[key_dim] * 3, num_labels=1000,
    ))).save_pretrained(tmp_path / "hf")
    hub.add_folder("facebook/levit-" + LEVIT_RELEASE[name][2].split("-")[1], tmp_path / "hf")
    info = get_model_info(name)
    for source in info.pretrained[0].sources:
        monkeypatch.setitem(_REGISTRY, name, with_sources(info, source))
        # offline for the release: a URL the registry got wrong fails on the cache, never reaching the network
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", not source.startswith("hf-hub:"))
        model = hybridvit.create_model(name, pretrained=True)
        assert model.input_hw == (224, 224) and model.num_classes == 1000, source  # nothing resampled


def _hf_cvt(name: str) -> nn.Module:
    dims, heads, depth = CVT_HF_CONFIG[name]
    return transformers.CvtForImageClassification(transformers.CvtConfig(
        embed_dim=dims, num_heads=heads, depth=depth, num_labels=1000))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cvt_13", "cvt_21"])
@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_every_cvt_tag_loads_into_the_registered_architecture(name, hub, tmp_path):
    """One transformers folder of the paper's architecture under each of the variant's repositories,
    at the repository's input size, loaded strictly into the registered variant built on the meta
    device (the shapes are the check; the outputs are compared with transformers' in test_cvt)."""
    _blank(lambda: _hf_cvt(name)).save_pretrained(tmp_path / "hf")
    files = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    for repo, (variant, size, _, _) in CVT_PAPER.items():
        if variant == name:
            processor = {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": size}}
            hub.add_commit(repo, {**files, "preprocessor_config.json": json.dumps(processor).encode()})
    for weights in get_model_info(name).pretrained:
        with torch.device("meta"):
            model = hybridvit.create_model(name, pretrained=True, pretrained_tag=weights.tag)
        size = CVT_PAPER[weights.sources[0].removeprefix("hf-hub:")][1]
        assert model.input_hw == (size, size) and model.num_classes == 1000, weights.tag


def test_cvt_w24_layout_loads_into_the_registered_architecture():
    """As above without the 1.1 GB download: transformers' W24 on the meta device, its state dict,
    config and processor as the folder would hold them, through the same detection and strict load."""
    with torch.device("meta"):
        ref, model = _hf_cvt("cvt_w24"), hybridvit.create_model("cvt_w24")
    (source,) = get_model_info("cvt_w24").pretrained[0].sources
    folder = Checkpoint(ref.state_dict(), Path(source), ref.config.to_dict(), {"size": {"shortest_edge": 384}})
    assert hybridvit.load_checkpoint(model, folder) == "cvt-huggingface"
    assert model.input_hw == (CVT_PAPER[source.removeprefix("hf-hub:")][1],) * 2


@pytest.mark.slow
def test_pretrained_cvt_from_the_hub_cache_offline_and_republished(hub, tmp_path, monkeypatch):
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
    predictor = Predictor(InferenceSpec("cvt_13", pretrained=True, pretrained_tag="in1k-384"))
    assert len(hub.requests) == seen  # offline: the cache only
    assert predictor.classes[0] == "tench, Tinca tinca" and len(predictor.classes) == 1000
    _, extra = load_source("cvt_13", pretrained=True, pretrained_tag="in1k-384")
    assert extra["crop_pct"] == 1.0 and extra["input_size"] == [384, 384] and extra["classes"][0] == "n01440764"
    _, folder_extra = load_trained("hf-hub:microsoft/cvt-13-384")  # what the folder itself says
    assert folder_extra["crop_pct"] == 1.0 and folder_extra["input_size"] == [384, 384]
    assert folder_extra["class_names"][0] == "tench, Tinca tinca" and folder_extra["classes"][0] == "n01440764"
    # republished (push --pretrained, e.g. to a mirror): the weights with their preprocessing, private, with a message
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    result = CliRunner().invoke(app, ["push", "cvt_13", "--pretrained", "--pretrained-tag", "in1k-384", "--repo",
                                      "me/cvt-mirror", "--private", "--message", "mirror of microsoft/cvt-13-384"])
    assert result.exit_code == 0, result.output
    assert hub.repos["me/cvt-mirror"].private and hub.repos["me/cvt-mirror"].messages == ["mirror of microsoft/cvt-13-384"]
    mirror, mirror_extra = load_trained("hf-hub:me/cvt-mirror")
    small = torch.randn(1, 3, 64, 64)  # CvT runs at any size
    with torch.no_grad():
        assert torch.equal(mirror(small), model(small))
    assert {k: mirror_extra[k] for k in ("crop_pct", "input_size", "mean")} == {k: extra[k] for k in ("crop_pct", "input_size", "mean")}
    assert mirror_extra["class_names"][0] == "tench, Tinca tinca"
    processor = transformers.AutoImageProcessor.from_pretrained(hybridvit.checkpoints.download_hub_folder("me/cvt-mirror"))
    assert processor(images=example_image(500), return_tensors="pt").pixel_values.shape == (1, 3, 384, 384)
    # the default tag is another repository, not in the cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"offline \(HF_HUB_OFFLINE=1\) and microsoft/cvt-13 is not in the Hub cache"):
        hybridvit.create_model("cvt_13", pretrained=True)


def test_levit_falls_back_from_the_official_url_to_the_hub(hub, tmp_path, monkeypatch, torch_hub_dir, images):
    info = get_model_info("levit_128s")
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
    assert done.returncode == 2 and "offline (HF_HUB_OFFLINE=1) and me/elsewhere is not in the Hub cache" in done.stderr


def test_unmappable_model_is_pushed_in_hybridvit_layout(hub, tmp_path):
    model = randomize_(hybridvit.create_model("levit_128s", ablation="A3", num_classes=4)).eval()
    folder = save_for_hub(model, tmp_path / "folder", "me/a3", extra={"classes": ["a", "b", "c", "d"]})
    assert json.loads((folder / "config.json").read_text())["format"] == "hybridvit"
    card = (folder / "README.md").read_text()
    assert "ablation A3" in card and "| differs from levit_128s in | norm=layer |" in card
    assert "AutoModelForImageClassification" not in card
    result = CliRunner().invoke(app, ["push", str(folder), "--repo", "me/a3"])  # a model folder
    assert result.exit_code == 0, result.output
    assert not hub.repos["me/a3"].private and hub.repos["me/a3"].messages == ["Upload with hybridvit"]  # the defaults
    pulled, extra = load_trained("hf-hub:me/a3")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(pulled(x), model(x))
    assert extra["classes"] == ["a", "b", "c", "d"]


def _cli(capsys, *args: str) -> tuple[int, str]:
    """``hybridvit ARGS`` run by the console script's ``main`` in this process: exit code and output."""
    with pytest.raises(SystemExit) as done:
        main(list(args))
    out = capsys.readouterr()
    return done.value.code, out.out + out.err


@pytest.fixture
def model_folder(tmp_path):
    model = randomize_(hybridvit.create_model("levit_128s", num_classes=3, img_size=32), seed=6).eval()
    return hybridvit.save_model(model, tmp_path / "model", extra={"classes": ["a", "b", "c"]})


def test_push_dry_run_writes_the_folder_and_uploads_nothing(hub, model_folder, tmp_path, capsys):
    code, out = _cli(capsys, "push", str(model_folder), "--repo", "me/levit-abc", "--dry-run", str(tmp_path / "out"))
    assert code == 0, out
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    assert f"wrote {tmp_path / 'out'}: {', '.join(files)}" in " ".join(out.split())
    assert 'load_model("hf-hub:me/levit-abc")' in (tmp_path / "out" / "README.md").read_text()
    assert hub.requests == [] and hub.repos == {}  # nothing reached the Hub
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        assert torch.equal(hybridvit.load_model(tmp_path / "out")(x), hybridvit.load_model(model_folder)(x))


@pytest.mark.parametrize("repo", ["me/bad name!", "a/b/c", "me/..", "levit", "me/-x"])
def test_invalid_repository_ids_are_refused_before_anything_is_written(repo, hub, model_folder, tmp_path, capsys):
    for dry_run in (["--dry-run", str(tmp_path / "out")], []):
        code, out = _cli(capsys, "push", str(model_folder), "--repo", repo, *dry_run)
        assert code == 2 and out.startswith(f"error: invalid Hub repository id {repo!r}") and out.count("\n") == 1, out
    assert not (tmp_path / "out").exists() and hub.requests == []
    with pytest.raises(ValueError, match="invalid Hub repository id"):
        push_to_hub(model_folder, repo)


def test_save_for_hub_refuses_a_used_target_and_never_leaves_a_partial_folder(model_folder, tmp_path, monkeypatch):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="used is not empty"):
        save_for_hub(model_folder, tmp_path / "used")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(NotADirectoryError, match="file is a file"):
        save_for_hub(model_folder, tmp_path / "file")
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["notes.txt"] and (tmp_path / "file").read_text() == "mine"

    def card_fails(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hybridvit.publish, "model_card", card_fails)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OSError, match="disk full"):
        save_for_hub(model_folder, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # neither the folder nor its staging copy


def test_push_with_the_hub_unreachable_is_one_line(model_folder, capsys):
    code, out = _cli(capsys, "push", str(model_folder), "--repo", "me/levit-abc")  # conftest: a dead endpoint
    assert code == 4 and out.count("\n") == 1, out
    assert out.startswith("error: cannot push to me/levit-abc: the Hugging Face Hub at http://127.0.0.1:9 cannot be reached")


@pytest.mark.parametrize("failure, code, says", [
    (401, 2, "error: the Hub at {url} refused to push to me/levit-abc (HTTP 401): log in with `hf auth login`"),
    (500, 4, "error: the Hub at {url} answered HTTP 500 to the upload to me/levit-abc"),
    ("drop", 4, "error: cannot push to me/levit-abc: the Hugging Face Hub at {url} cannot be reached (RemoteProtocolError"),
])
def test_a_failed_upload_is_one_line(failure, code, says, hub, model_folder, capsys):
    hub.post_failure = failure
    got, out = _cli(capsys, "push", str(model_folder), "--repo", "me/levit-abc")
    assert got == code and out.count("\n") == 1 and out.startswith(says.format(url=hub.url)), out


def test_cli_names_need_pretrained():
    result = CliRunner().invoke(app, ["predict", "levit_128s", "x.png"])
    assert result.exit_code != 0 and "add --pretrained" in str(result.exception)


def test_models_weights_table_lists_every_source():
    result = CliRunner(env={"COLUMNS": "250"}).invoke(app, ["models", "cvt_13", "--weights"])
    assert result.exit_code == 0, result.output
    for text in ("in1k-384", "in22k-384", "hf-hub:microsoft/cvt-13-384-22k", "83.3", "80 MB", "ImageNet-22k, then 1k"):
        assert text in result.output, text
