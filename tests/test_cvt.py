"""CvT: exact sizes, any input size, parity with Hugging Face, checkpoint formats, fusion, errors,
and the transformers folder it is published as."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_, rel_err
from hub_server import hub  # noqa: F401  (the local Hub fixture)
from PIL import Image
from torch import nn

import hybridvit
from hybridvit.checkpoints import CheckpointError, load_trained
from hybridvit.publish import push_to_hub

import transformers  # noqa: E402  (test-only reference implementation)

PAPER = {  # name: (exact params, [(size, paper GMACs)])
    "cvt_13": (19_997_480, [(224, 4.5), (384, 16.3)]),
    "cvt_21": (31_622_696, [(224, 7.1), (384, 24.9)]),
    "cvt_w24": (277_196_392, [(384, 193.2)]),
}


@pytest.mark.parametrize("name", PAPER)
def test_params_and_macs_match_paper(name):
    with torch.device("meta"):
        model = hybridvit.create_model(name)
    params, macs = PAPER[name]
    assert hybridvit.count_params(model) == params
    for size, gmacs in macs:
        assert abs(hybridvit.count_macs(model, (size, size)) / 1e9 - gmacs) / gmacs < 0.02


def test_structure_follows_the_paper():
    model = hybridvit.create_model("cvt_13")
    embeds = [s.embed.proj for s in model.stages]
    assert [(e.kernel_size[0], e.stride[0], e.padding[0]) for e in embeds] == [(7, 4, 2), (3, 2, 1), (3, 2, 1)]
    attn = model.stages[1].blocks[0].attn
    assert attn.conv_proj_q.conv.groups == 192 and attn.conv_proj_q.conv.stride == (1, 1)
    assert attn.conv_proj_k.conv.stride == (2, 2) and attn.conv_proj_v.conv.stride == (2, 2)
    assert [s.cls_token is not None for s in model.stages] == [False, False, True]
    assert isinstance(model.stages[2].blocks[0].mlp.act, nn.GELU)
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for b in model.stages[2].blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and len(rates) == 10
    assert hybridvit.create_model("cvt_w24").stages[2].blocks[-1].drop_path.drop_prob == pytest.approx(0.3)
    assert all(isinstance(b.drop_path, nn.Identity) for b in model.stages[0].blocks)


def hf_cvt(seed: int = 0, **cfg):
    config = transformers.CvtConfig(**cfg)
    return randomize_(transformers.CvtForImageClassification(config), seed).eval()


@pytest.mark.parametrize("size", [(224, 224), (160, 256), (224, 320), (384, 384)])
def test_huggingface_parity_at_any_size(size, tmp_path):
    ref = hf_cvt(num_labels=1000)
    ref.save_pretrained(tmp_path / "hf")
    model = hybridvit.load_model(tmp_path / "hf")
    assert model.model_name == "cvt_13" and model.num_classes == 1000
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(model(x), ref(x).logits) < 1e-4


def test_huggingface_cvt21_into_create_model(tmp_path):
    ref = hf_cvt(depth=[1, 4, 16], num_labels=5, seed=2)
    ref.save_pretrained(tmp_path / "hf21")
    model = hybridvit.create_model("cvt_21", num_classes=5, checkpoint_path=tmp_path / "hf21").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(model(x), ref(x).logits) < 1e-4
    with pytest.raises(CheckpointError, match="different architecture"):
        hybridvit.create_model("cvt_13", num_classes=5, checkpoint_path=tmp_path / "hf21")


def hf_to_official(state: dict) -> dict:
    """Rename a Hugging Face CvT state dict to the official release's keys (built independently of hybridvit)."""
    parts = [("cvt.encoder.stages.", "stage"), (".embedding.convolution_embeddings.projection.", ".patch_embed.proj."),
             (".embedding.convolution_embeddings.normalization.", ".patch_embed.norm."), (".layers.", ".blocks."),
             (".layernorm_before.", ".norm1."), (".layernorm_after.", ".norm2."), (".attention.output.dense.", ".attn.proj."),
             (".intermediate.dense.", ".mlp.fc1."), (".output.dense.", ".mlp.fc2.")]
    for x, name in (("q", "query"), ("k", "key"), ("v", "value")):
        parts += [(f".attention.attention.convolution_projection_{name}.convolution_projection.convolution.", f".attn.conv_proj_{x}.conv."),
                  (f".attention.attention.convolution_projection_{name}.convolution_projection.normalization.", f".attn.conv_proj_{x}.bn."),
                  (f".attention.attention.projection_{name}.", f".attn.proj_{x}.")]
    out = {}
    for k, v in state.items():
        for old, new in parts:
            k = k.replace(old, new)
        k = k.replace("layernorm.", "norm.").replace("classifier.", "head.")
        out[k] = v
    return out


@pytest.mark.parametrize("wrapper", ["plain", "ddp", "state_dict"])
def test_official_release_parity(wrapper, tmp_path):
    ref = hf_cvt(num_labels=1000, seed=5)
    state = hf_to_official(ref.state_dict())
    assert "stage0.patch_embed.proj.weight" in state and "stage2.cls_token" in state
    assert "stage0.blocks.0.attn.conv_proj_q.conv.weight" in state and "stage0.blocks.0.attn.proj_q.weight" in state
    if wrapper == "ddp":
        state = {"module." + k: v for k, v in state.items()}
    elif wrapper == "state_dict":
        state = {"state_dict": state}
    torch.save(state, tmp_path / "CvT-13-224x224-IN-1k.pth")
    model = hybridvit.create_model("cvt_13")
    assert hybridvit.load_checkpoint(model.eval(), tmp_path / "CvT-13-224x224-IN-1k.pth") == "cvt-official"
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(model(x), ref(x).logits) < 1e-4


def test_fused_equals_unfused_and_keeps_layernorms():
    model = randomize_(hybridvit.create_model("cvt_13")).eval()
    fused = hybridvit.fuse(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert sum(isinstance(m, nn.LayerNorm) for m in fused.modules()) == sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert fused.stages[0].blocks[0].attn.conv_proj_k.groups == 64
    for size in [(224, 224), (160, 256)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert rel_err(fused(x), model(x)) < 1e-5


def test_native_roundtrip_and_api(tmp_path):
    model = randomize_(hybridvit.create_model("cvt_13", num_classes=3, mlp_act="quick_gelu")).eval()
    hybridvit.save_model(model, tmp_path / "m")
    loaded = hybridvit.load_model(tmp_path / "m")
    assert loaded.config == model.config and loaded.model_name == "cvt_13"
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    feats = model.forward_features(x)
    assert feats.shape == (1, 1 + 6 * 8, 384)
    assert model.forward_head(feats, pre_logits=True).shape == (1, 384)
    nwd = model.no_weight_decay()
    assert "stages.2.cls_token" in nwd and "norm.weight" in nwd and "stages.0.blocks.0.attn.proj_q.bias" in nwd
    assert "stages.0.blocks.0.attn.proj_q.weight" not in nwd
    model.reset_classifier(7)
    assert model(x).shape == (1, 7)


def test_bad_input_and_wrong_family(tmp_path):
    model = hybridvit.create_model("cvt_13").eval()
    with pytest.raises(ValueError, match="at least 16x16"):
        model(torch.randn(1, 3, 8, 64))
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        model(torch.randn(1, 4, 224, 224))
    hybridvit.save_model(hybridvit.create_model("levit_128s"), tmp_path / "levit")
    with pytest.raises(CheckpointError, match="levit checkpoint"):
        hybridvit.load_checkpoint(model, tmp_path / "levit")


_EXTRA = {"classes": ["cat", "dog", "owl"], "crop_pct": 0.95, "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3]}


def _tiny_input_cvt(seed: int, **overrides) -> nn.Module:
    """A shallower CvT-13 (cheap, and still more than one layer a stage to map; transformers builds
    stage i only with more than i layers) for 32x32 inputs, 3 classes, random BatchNorm statistics,
    biases and LayerNorm scales (so that swapped norms show)."""
    model = randomize_(hybridvit.create_model("cvt_13", num_classes=3, img_size=32, depth=(1, 2, 3), **overrides), seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, nn.LayerNorm)):
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)
            norm.bias.copy_(torch.rand(norm.bias.shape, generator=g) * 0.6 - 0.3)
    return model.eval()


def test_saved_for_hub_is_a_transformers_folder(tmp_path):
    """``to_hf``'s layout, read by transformers itself: every key used, the same logits, the
    class names, and an image processor with the model's preprocessing and input size."""
    model = _tiny_input_cvt(seed=3)
    folder = hybridvit.save_for_hub(model, tmp_path / "hub", "me/cvt", extra=_EXTRA)
    ref, info = transformers.CvtForImageClassification.from_pretrained(folder, local_files_only=True,
                                                                       output_loading_info=True)
    assert not any(info.values())  # no missing, unexpected or mismatched keys
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(ref.eval()(pixel_values=x).logits, model(x)) < 1e-5
    assert [ref.config.id2label[i] for i in range(3)] == _EXTRA["classes"]
    processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    assert (processor.crop_pct, list(processor.image_mean), list(processor.image_std)) == (0.95, _EXTRA["mean"], _EXTRA["std"])
    assert processor(images=Image.new("RGB", (80, 60)), return_tensors="pt").pixel_values.shape == (1, 3, 32, 32)


def test_quick_gelu_cvt_is_saved_in_hybridvit_layout(tmp_path):
    """transformers' CvT has GELU only: a QuickGELU model written in its layout would load there and
    compute something else, so it keeps hybridvit's own layout (and loads back exactly)."""
    model = _tiny_input_cvt(seed=4, mlp_act="quick_gelu")
    folder = hybridvit.save_for_hub(model, tmp_path / "hub", "me/cvt-quick")
    assert json.loads((folder / "config.json").read_text())["format"] == "hybridvit"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(hybridvit.load_model(folder)(x), model(x))


def test_cvt_pushed_to_the_hub_loads_back_the_same(hub, tmp_path):
    model = _tiny_input_cvt(seed=5)
    push_to_hub(model, "me/cvt-tiny", extra=_EXTRA)
    files = hub.repos["me/cvt-tiny"].commits[-1][1]
    assert json.loads(files["config.json"])["architectures"] == ["CvtForImageClassification"]  # transformers' layout
    pulled, pulled_extra = load_trained("hf-hub:me/cvt-tiny")
    assert pulled.config == model.config and {k: pulled_extra[k] for k in _EXTRA} == _EXTRA
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pulled(x), model(x))
