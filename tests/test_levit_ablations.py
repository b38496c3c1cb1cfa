"""The LeViT paper's ablations (Table 5, A1-A7): counts, effects, fusion and round trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import randomize_, rel_err
from gradients import parameters_without_gradient
from hybridvit import count_macs, count_params, create_model, fuse
from hybridvit.checkpoints import load_model, save_model
from hybridvit.layers import AttentionBias

# Table 5: params and MACs of LeViT-128S and each ablation at 224, counted without the distillation
# head (the table's 7.4M for the base; with the second head LeViT-128S has 7.8M, as in Table 3).
PAPER = {None: (7.4e6, 305e6), "A1": (1.2e6, 308e6), "A2": (7.4e6, 275e6), "A3": (7.4e6, 305e6),
         "A4": (7.4e6, 305e6), "A5": (7.4e6, 305e6), "A6": (6.2e6, 312e6), "A7": (7.4e6, 305e6)}
SMALL = dict(img_size=64, num_classes=10)


@pytest.mark.parametrize("ablation", list(PAPER))
def test_counts_match_table_5(ablation):
    with torch.device("meta"):
        model = create_model("levit_128s", ablation=ablation, distillation=False)
    params, macs = PAPER[ablation]
    # The paper rounds params to 0.1M (up to 1.4% of 7.4M, 4% of 1.2M) and MACs to 1M.
    assert abs(count_params(model) - params) <= 0.05e6
    assert abs(count_macs(model) - macs) / macs < 0.005


def test_paper_widths_of_a1_and_a6():
    a1 = create_model("levit_128s", ablation="A1")
    assert len(a1.stages) == 1 and a1.grids == [(14, 14)]
    attn = a1.stages[0].blocks[0].attn
    assert (attn.num_heads, attn.key_dim, attn.val_dim * attn.num_heads) == (3, 19, 114)  # C = 2ND
    a6 = create_model("levit_128s", ablation="A6")
    shrinks = [stage.downsample.attn for stage in a6.stages[1:]]
    assert [s.num_heads for s in shrinks] == [16, 24]  # 4C/D
    assert {s.key_dim for s in shrinks} == {s.val_dim for s in shrinks} == {30}
    assert a6.stages[0].blocks[0].mlp.up.linear.out_features == 4 * 120


def test_ablation_equals_its_explicit_options_and_options_win():
    named = create_model("levit_128s", ablation="A2")
    explicit = create_model("levit_128s", stem="patchify")
    assert {k: v.shape for k, v in named.state_dict().items()} == {k: v.shape for k, v in explicit.state_dict().items()}
    assert named.config.ablation == "A2" and explicit.config.ablation is None
    assert create_model("levit_128s", ablation="A6", mlp_ratio=2.0).config.mlp_ratio == 2.0
    combined = create_model("levit_128s", ablation="A3", attn_activation=False, attention_bias=False)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, AttentionBias)) for m in combined.modules())


def test_bad_ablations_are_refused():
    with pytest.raises(ValueError, match="no ablation 'A1'"):
        create_model("levit_256", ablation="A1")  # A1 and A6 replace LeViT-128S's widths
    with pytest.raises(ValueError, match="no ablation 'A9'"):
        create_model("levit_128s", ablation="A9")
    with pytest.raises(ValueError, match="norm must be one of"):
        create_model("levit_128s", norm="group")
    with pytest.raises(ValueError, match="one value per stage"):
        create_model("levit_128s", embed_dim=(128, 256))


@pytest.mark.parametrize("ablation", list(PAPER))
def test_trains_every_parameter(ablation):
    """64x96: the last grid has two keys (at 64x64 its single key makes the stage-3 biases inert)."""
    torch.manual_seed(0)
    model = create_model("levit_128s", ablation=ablation, img_size=(64, 96), num_classes=10)
    assert parameters_without_gradient(model, torch.randn(4, 3, 64, 96), torch.tensor([0, 1, 2, 3])) == []
    model.eval()
    assert model(torch.randn(2, 3, 64, 96)).shape == (2, 10)


def test_a2_patchify_stem_gives_the_same_grid_at_odd_sizes():
    model = create_model("levit_128s", ablation="A2", dynamic_size=True, **SMALL).eval()
    conv = model.stem.conv.conv
    assert (conv.kernel_size, conv.stride) == ((16, 16), (16, 16))
    base = create_model("levit_128s", dynamic_size=True, **SMALL).eval()
    x = torch.randn(1, 3, 70, 90)
    assert model._stem(x)[1] == base._stem(x)[1] == (5, 6)


def test_a5_position_embedding_replaces_the_bias_and_is_used():
    model = create_model("levit_128s", ablation="A5", **SMALL).eval()
    assert not any(isinstance(m, AttentionBias) for m in model.modules())
    assert model.pos_embed.shape == (1, 16, 128) and "pos_embed" in model.no_weight_decay()
    x = torch.randn(2, 3, 64, 64)
    before = model(x)
    with torch.no_grad():
        model.pos_embed.add_(1.0)
    assert rel_err(model(x), before) > 1e-3
    # Any input size: the embedding is resampled; at the built size it is used as is.
    dynamic = model.reconfigured(dynamic_size=True)
    assert torch.equal(dynamic(x), model(x))
    assert dynamic(torch.randn(1, 3, 96, 80)).isfinite().all()


def test_a7_removes_the_activation_on_attention_output():
    base = randomize_(create_model("levit_128s", **SMALL)).eval()
    a7 = create_model("levit_128s", ablation="A7", **SMALL).eval()
    a7.load_state_dict(base.state_dict())  # the same weights: only the activation differs
    x = torch.randn(2, 3, 64, 64)
    assert isinstance(a7.stages[0].blocks[0].attn.act, nn.Identity)
    assert rel_err(a7(x), base(x)) > 1e-3


def test_a4_has_no_distillation_head():
    model = create_model("levit_128s", ablation="A4", **SMALL)
    assert model.head_dist is None and isinstance(model(torch.randn(2, 3, 64, 64)), torch.Tensor)


@pytest.mark.parametrize("ablation", ["A1", "A2", "A3", "A5", "A6", "A7"])
def test_fuse_equals_eval(ablation):
    model = randomize_(create_model("levit_128s", ablation=ablation, **SMALL)).eval()
    x = torch.randn(2, 3, 64, 64)
    fused = fuse(model)
    assert rel_err(fused(x), model(x)) < 1e-4
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in fused.modules())


def test_a3_layer_norms_are_kept_by_fuse():
    """A3 has no BatchNorm to fold (the paper notes LayerNorm costs time at inference): fuse keeps its norms."""
    model = randomize_(create_model("levit_128s", ablation="A3", **SMALL)).eval()
    norms = sum(isinstance(m, nn.LayerNorm) for m in model.modules())  # timm's LayerNorm2d is one too
    fused = fuse(model)
    assert norms == 4 + 2 * (9 + 2) + 2  # 4 stem convs, 2 per block (9) and shrink (2), both heads
    assert sum(isinstance(m, nn.LayerNorm) for m in fused.modules()) == norms


@pytest.mark.parametrize("ablation", ["A1", "A2", "A3", "A5", "A6"])
def test_save_and_load_round_trip(tmp_path, ablation):
    model = randomize_(create_model("levit_128s", ablation=ablation, **SMALL)).eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.config == model.config and loaded.config.ablation == ablation
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded(x), model(x))


def test_single_stage_backbone_features():
    backbone = create_model("levit_128s", ablation="A1", features_only=True, out_indices=(0,), img_size=64)
    (feature,) = backbone(torch.randn(1, 3, 64, 64))
    assert feature.shape == (1, 114, 4, 4)
