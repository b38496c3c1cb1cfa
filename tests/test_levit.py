"""LeViT architecture: exact sizes, heads, input checks, initialisation."""

from __future__ import annotations

import pytest
import torch

import hybridvit
from hybridvit.layers import LinearBN

from gradients import parameters_without_gradient

PAPER = {  # name: (exact params, paper MACs in millions)
    "levit_128s": (7_777_058, 305),
    "levit_128": (9_213_936, 406),
    "levit_192": (10_947_069, 658),
    "levit_256": (18_893_876, 1120),
    "levit_384": (39_128_836, 2353),
}


EXACT_MACS = {"levit_128s": 305_108_946, "levit_128": 406_114_880, "levit_192": 657_601_916,
              "levit_256": 1_128_024_056, "levit_384": 2_352_935_380}


@pytest.mark.parametrize("name", PAPER)
def test_params_and_macs_match_paper(name):
    with torch.device("meta"):
        model = hybridvit.create_model(name)
    params, macs_m = PAPER[name]
    assert hybridvit.count_params(model) == params
    macs = hybridvit.count_macs(model, (224, 224))
    assert macs == EXACT_MACS[name]  # pinned: any change to the counting rule or the architecture shows
    assert abs(macs / 1e6 - macs_m) / macs_m < 0.01


def test_macs_include_softmax_term():
    model = hybridvit.create_model("levit_128s")
    by_module = hybridvit.flops.macs_by_module(model)
    attn = model.stages[0].blocks[0].attn
    heads, n = attn.num_heads, 14 * 14
    qkv = 14 * 14 * attn.qkv.linear.in_features * attn.qkv.linear.out_features
    proj = 14 * 14 * attn.proj.linear.in_features * attn.proj.linear.out_features
    expected = qkv + proj + heads * n * n * (attn.key_dim + 1 + attn.val_dim)  # QK^T, softmax, AV
    assert by_module["stages.0.blocks.0.attn"] == expected


def test_list_models():
    assert hybridvit.list_models("levit_*") == ["levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"]
    with pytest.raises(ValueError, match="unknown model"):
        hybridvit.create_model("levit_999")


def test_distillation_heads(images):
    model = hybridvit.create_model("levit_128s")
    model.train()
    cls, dist = model(images)
    assert cls.shape == dist.shape == (2, 1000)
    model.eval()
    with torch.no_grad():
        out = model(images)
        feats = model.forward_head(model.forward_features(images), pre_logits=True)
        expected = (model.head(feats) + model.head_dist(feats)) / 2
    torch.testing.assert_close(out, expected)


def test_single_head(images):
    model = hybridvit.create_model("levit_128s", distillation=False, num_classes=10).train()
    assert model.head_dist is None
    out = model(images)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)
    assert hybridvit.count_params(model) == 7_777_058 - 2 * (384 * 1000 + 1000 + 2 * 384) + 384 * 10 + 10 + 2 * 384


def test_forward_features_and_reset_classifier(images):
    model = hybridvit.create_model("levit_192").eval()
    feats = model.forward_features(images)
    assert feats.shape == (2, 16, 384)  # 4x4 grid at 224
    model.reset_classifier(7)
    assert model(images).shape == (2, 7)
    model.reset_classifier(0)
    assert model(images).shape == (2, 384)


def test_non_square_img_size():
    model = hybridvit.create_model("levit_128s", img_size=(160, 256)).eval()
    assert model.grids == [(10, 16), (5, 8), (3, 4)]
    assert model(torch.randn(1, 3, 160, 256)).shape == (1, 1000)


def test_no_weight_decay():
    model = hybridvit.create_model("levit_128s")
    nwd = model.no_weight_decay()
    assert "stages.0.blocks.0.attn.attention_bias.table" in nwd
    assert "stages.1.downsample.attn.attention_bias.table" in nwd
    assert "stages.0.blocks.0.attn.qkv.bn.weight" in nwd and "head.linear.bias" in nwd
    assert "stages.0.blocks.0.attn.qkv.linear.weight" not in nwd and "head.linear.weight" not in nwd


def test_residual_branch_batchnorms_start_at_zero():
    model = hybridvit.create_model("levit_128s")
    block = model.stages[0].blocks[0]
    assert torch.all(block.attn.proj.bn.weight == 0) and torch.all(block.mlp.down.bn.weight == 0)
    assert torch.all(block.attn.qkv.bn.weight == 1)
    # the shrinking attention has no residual, so its projection starts at one
    assert torch.all(model.stages[1].downsample.attn.proj.bn.weight == 1)
    assert isinstance(model.stages[1].downsample.attn.q, LinearBN)


def test_drop_path_rates():
    assert hybridvit.create_model("levit_384").config.drop_path_rate == 0.1
    assert hybridvit.create_model("levit_128s").config.drop_path_rate == 0.0
    model = hybridvit.create_model("levit_128s", drop_path_rate=0.5)
    assert model.stages[0].blocks[0].drop_path.drop_prob == 0.5
    with pytest.raises(TypeError, match="no option"):
        hybridvit.create_model("levit_128s", depht=(1, 1, 1))


@pytest.mark.parametrize(
    "shape, match",
    [((1, 1, 224, 224), r"\(batch, 3, height, width\)"),
     ((1, 3, 64, 64), "built for 224x224"),
     ((3, 224, 224), r"\(batch, 3, height, width\)")],
)
def test_bad_input_shapes(shape, match):
    model = hybridvit.create_model("levit_128s").eval()
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


def test_training_step_updates_all_parameters(images):
    """After one SGD step (which moves the zero-initialised residual scales) every parameter,
    attention biases and both heads included, gets a nonzero gradient."""
    torch.manual_seed(0)
    model = hybridvit.create_model("levit_128s", num_classes=5)
    assert parameters_without_gradient(model, images, torch.tensor([0, 1])) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 196, 196, 16, 32), (8, 49, 196, 16, 64), (6, 49, 49, 16, 32), (8, 16, 16, 16, 32),
                                   (3, 49, 49, 64, 64)])
def test_every_attention_path_computes_the_formula(shape, dtype):
    """Fused kernel (padded or not) and the in-place explicit path agree with softmax(q·kᵀ/√d + bias)·v."""
    from hybridvit.layers import attention

    heads, nq, nk, d, dv = shape
    q, k, v = torch.randn(2, heads, nq, d), torch.randn(2, heads, nk, d), torch.randn(2, heads, nk, dv)
    bias = torch.randn(heads, nq, nk)
    expected = ((q @ k.transpose(-2, -1)) * d**-0.5 + bias).softmax(-1) @ v
    kept = bias.clone()
    with torch.no_grad():
        out = attention(q.to(dtype), k.to(dtype), v.to(dtype), bias.to(dtype))
    assert out.dtype == dtype and out.shape == expected.shape
    assert torch.equal(bias, kept)  # the in-place path must not touch the bias it adds
    tol = 1e-5 if dtype == torch.float32 else 0.05
    assert (out.float() - expected).abs().max() < tol


@pytest.mark.parametrize("name", ["levit_128s", "levit_256", "cvt_13"])
def test_fused_attention_kernel_matches_the_formula(name):
    """Inference runs PyTorch's fused attention (q, k zero-padded for LeViT); it must equal the paper's formula."""
    from conftest import randomize_, rel_err

    from hybridvit.layers import reference_attention

    model = randomize_(hybridvit.create_model(name)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        fast = model(x)
        with reference_attention():
            reference = model(x)
    assert rel_err(fast, reference) < 1e-5
