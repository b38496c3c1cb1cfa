"""CvT: exact sizes, any input size, parity with Hugging Face, checkpoint formats, fusion, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_, rel_err
from torch import nn

import hybridvit
from hybridvit.checkpoints import CheckpointError

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
