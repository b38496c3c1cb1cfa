"""The CvT paper's ablations (Tables 5-8) as config options: counts, effects, fusion, round trips."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from conftest import randomize_, rel_err
from gradients import parameters_without_gradient
from hybridvit import count_macs, count_params, create_model, fuse
from hybridvit.checkpoints import load_model, save_model
from hybridvit.models.cvt import ConvAttention, CvT, CvTConfig
from hybridvit.registry import find_variant

BASE_PARAMS = 19_997_480
POS = {(True, False, False): 56 * 56 * 64, (False, False, True): 14 * 14 * 384,
       (True, True, True): 56 * 56 * 64 + 28 * 28 * 192 + 14 * 14 * 384}
VARIANTS = [dict(pos_embed=(True, True, True)), dict(patch_size=(4, 2, 2), patch_padding=(0, 0, 0)),
            dict(stride_kv=1), dict(conv_proj=(False, False, False)), dict(conv_proj=(True, False, True))]


def _meta(**kw):
    with torch.device("meta"):
        return create_model("cvt_13", **kw)


def test_table_7_kv_stride_macs():
    """Paper: 4.53G with stride 2, 6.55G with stride 1 (ours count the softmax too: +1-2%)."""
    assert abs(count_macs(_meta()) / 4.53e9 - 1) < 0.02
    stride1 = _meta(stride_kv=1)
    assert abs(count_macs(stride1) / 6.55e9 - 1) < 0.02 and count_params(stride1) == BASE_PARAMS


@pytest.mark.parametrize("flags", list(POS))
def test_position_embedding_adds_one_vector_per_cell(flags):
    assert count_params(_meta(pos_embed=flags)) - BASE_PARAMS == POS[flags]


def test_patch_embedding_drops_the_kernel_overlap():
    model = _meta(patch_size=(4, 2, 2), patch_padding=(0, 0, 0))
    dropped = (7 * 7 - 4 * 4) * 3 * 64 + (9 - 4) * 64 * 192 + (9 - 4) * 192 * 384
    assert BASE_PARAMS - count_params(model) == dropped  # 19.56M: the paper's 19.5M (Table 6)
    base = create_model("cvt_13", num_classes=10).eval()
    patch = create_model("cvt_13", num_classes=10, patch_size=(4, 2, 2), patch_padding=(0, 0, 0)).eval()
    x = torch.randn(1, 3, 224, 224)
    assert [m.shape for m in base.forward_intermediates(x, intermediates_only=True)] == \
        [m.shape for m in patch.forward_intermediates(x, intermediates_only=True)]


@pytest.mark.parametrize("stages", [(False, False, False), (True, False, False), (True, True, False)])
def test_linear_projection_has_no_convolution(stages):
    model = _meta(conv_proj=stages)
    depth = (1, 2, 10)
    dw = [d * 3 * (dim * 9 + 2 * dim) for d, dim in zip(depth, (64, 192, 384))]  # 3 depth-wise convs + BN each
    assert BASE_PARAMS - count_params(model) == sum(n for n, conv in zip(dw, stages) if not conv)
    for stage, conv in zip(model.stages, stages):
        assert all(hasattr(b.attn, "conv_proj_q") == conv for b in stage.blocks)


@pytest.mark.parametrize("options", VARIANTS)
def test_trains_every_parameter(options):
    """Every parameter but one: the last block's query convolution shapes only the grid tokens'
    outputs, which the head (reading the class token) never sees: dead weights of CvT itself, as
    in the official model. No stochastic depth: a dropped block gets no gradient."""
    torch.manual_seed(0)
    model = create_model("cvt_13", num_classes=10, img_size=64, drop_path_rate=0.0, **options)
    dead = [f"stages.2.blocks.9.attn.conv_proj_q.{n}" for n in ("conv.weight", "bn.weight", "bn.bias")]
    expected = dead if model.config.conv_proj[-1] else []
    assert parameters_without_gradient(model, torch.randn(2, 3, 64, 64), torch.tensor([0, 1])) == expected


def test_position_embedding_is_used_and_resampled_at_other_sizes():
    model = create_model("cvt_13", num_classes=10, img_size=64, pos_embed=(True, True, True)).eval()
    assert model.stages[0].pos_embed.shape == (1, 16 * 16, 64) and "stages.2.pos_embed" in model.no_weight_decay()
    x = torch.randn(2, 3, 64, 64)
    before = model(x)
    with torch.no_grad():
        model.stages[1].pos_embed.add_(1.0)
    assert rel_err(model(x), before) > 1e-3
    assert model(torch.randn(1, 3, 96, 80)).isfinite().all()


def test_linear_projection_attends_at_full_resolution():
    model = create_model("cvt_13", num_classes=10, img_size=64, conv_proj=(False, True, True)).eval()
    attn = model.stages[0].blocks[0].attn
    assert isinstance(attn, ConvAttention) and not attn.conv_proj
    from hybridvit.layers import capture_attention
    with capture_attention() as maps:
        model(torch.randn(1, 3, 64, 64))
    assert maps[0].probs.shape[-2:] == (256, 256)  # 16x16 queries and keys: no k/v subsampling
    assert maps[1].probs.shape[-2:] == (64, 16)  # stage 2 keeps its stride-2 k/v convolution


def test_fuse_and_round_trip_of_an_ablated_model(tmp_path):
    model = randomize_(create_model("cvt_13", num_classes=10, img_size=64, conv_proj=(True, False, True),
                                    pos_embed=(True, False, False))).eval()
    x = torch.randn(2, 3, 64, 64)
    assert rel_err(fuse(model)(x), model(x)) < 1e-4
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config == model.config and torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("bad, message", [(dict(conv_proj=(True, False)), "one value per stage"),
                                          (dict(pos_embed=True), "one value per stage"),
                                          (dict(pos_embed="yes"), "one value per stage"),
                                          (dict(conv_proj=("no", True, True)), "True/False per stage")])
def test_bad_options(bad, message):
    with pytest.raises(ValueError, match=message):
        create_model("cvt_13", **bad)


def test_ablations_are_architecture_fields():
    """An ablated CvT-13 is not the registered cvt_13 (its weights do not fit), even after JSON."""
    assert find_variant(CvT, _meta().config) == "cvt_13"
    for options in VARIANTS:
        config = _meta(**options).config
        assert find_variant(CvT, config) is None
        assert CvTConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config
    assert find_variant(CvT, _meta(conv_proj=[True] * 3, pos_embed=[False] * 3).config) == "cvt_13"


def test_position_embedding_is_resampled_only_at_another_size(monkeypatch):
    import timm.layers

    calls = []
    monkeypatch.setattr(timm.layers, "resample_abs_pos_embed",  # imported where needed, from timm.layers
                        lambda *a, **k: calls.append(a[1]) or resample_abs_pos_embed(*a, **k))
    model = create_model("cvt_13", num_classes=10, img_size=(64, 48), pos_embed=(False, False, True)).eval()
    assert model.stages[2].pos_embed.shape == (1, 4 * 3, 384)
    model(torch.randn(1, 3, 64, 48))
    assert calls == []
    model(torch.randn(1, 3, 96, 80))
    assert calls == [[6, 5]]
