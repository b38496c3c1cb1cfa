"""The LeViT paper's grafted models (Table 1): counts, shapes, training, fusion and round trips."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

from conftest import randomize_, rel_err
from gradients import parameters_without_gradient
from hybridvit import count_params, create_model, fuse
from hybridvit.checkpoints import load_model, save_model
from hybridvit.flops import macs_by_module

NAME = "graft_resnet50_deit_s"
# Table 1: ResNet-50 stages k, DeiT-S layers n -> params, conv MACs, transformer MACs.
TABLE_1 = {(0, 12): (22.0e6, 57e6, 4519e6), (1, 9): (17.1e6, 820e6, 3389e6), (2, 6): (13.1e6, 1876e6, 2260e6),
           (3, 3): (15.1e6, 3385e6, 1130e6), (4, 0): (25.5e6, 4119e6, 0)}


def graft(k: int, n: int, **kw) -> nn.Module:
    return create_model(NAME, resnet_stages=k, deit_layers=n, **kw)


@pytest.mark.parametrize("pair", list(TABLE_1))
def test_counts_match_table_1(pair):
    with torch.device("meta"):
        model = graft(*pair)
    params, conv, transformer = TABLE_1[pair]
    assert abs(count_params(model) / params - 1) < 0.02
    macs = macs_by_module(model)
    ours_conv = sum(macs.get(m, 0) for m in ("trunk", "patch_embed", "proj"))
    assert abs(ours_conv / conv - 1) < 0.02  # ours: +1.4% to -1.8% (the paper adds BatchNorm work)
    if transformer:
        assert abs(macs["blocks"] / transformer - 1) < 0.015  # ours: +1.0% (the paper leaves out the 2 tokens)


def test_four_stages_no_layers_is_resnet50():
    ours, theirs = graft(4, 0), torchvision.models.resnet50()
    assert count_params(ours) == count_params(theirs) == 25_557_032
    expected = {f"trunk.{k}" for k in theirs.state_dict() if not k.startswith("fc.")} | {"head.weight", "head.bias"}
    assert set(ours.state_dict()) == expected and ours.head_dist is None


@pytest.mark.parametrize("pair", [(0, 2), (1, 1), (3, 1), (4, 0), (4, 1)])
def test_trains_every_parameter(pair):
    """No stochastic depth here: a dropped layer gets no gradient."""
    torch.manual_seed(0)
    model = graft(*pair, num_classes=10, img_size=64, drop_path_rate=0.0)
    assert isinstance(model(torch.randn(2, 3, 64, 64)), tuple) == (pair[1] > 0)
    assert parameters_without_gradient(model, torch.randn(2, 3, 64, 64), torch.tensor([0, 1])) == []
    model.eval()
    out = model(torch.randn(2, 3, 48, 80))  # any size: pooled to ceil(size / 16)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


@pytest.mark.parametrize("stages", [0, 1])
def test_interface_grid_is_14x14_at_224_and_proportional_elsewhere(stages):
    model = graft(stages, 1, num_classes=10).eval()
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    for size in ((224, 224), (64, 96), (56, 72)):
        model(torch.randn(1, 3, *size))
    assert seen == [2 + 14 * 14, 2 + 4 * 6, 2 + 4 * 5]  # class and distillation tokens + the ceil(size / 16) grid


def test_pooling_and_position_embedding_are_used():
    # Training mode: batch statistics keep the random ResNet's map at unit scale (its initial running
    # statistics would not), so a change of the embedding shows in the logits.
    model = graft(2, 1, num_classes=10, img_size=64, distillation=False, drop_path_rate=0.0).train()
    assert model.pos_embed.shape == (1, 1 + 16, 384)
    assert {"pos_embed", "cls_token"} <= model.no_weight_decay()
    assert {"pos_embed", "cls_token", "dist_token"} <= graft(2, 1, num_classes=10, img_size=64).no_weight_decay()
    x = torch.randn(2, 3, 64, 64)
    before = model(x)
    with torch.no_grad():
        model.pos_embed[:, 1:].add_(torch.randn(1, 16, 384))  # a constant per token would vanish in LayerNorm
    assert rel_err(model(x), before) > 1e-3


@pytest.mark.parametrize("pair", [(2, 1), (4, 0)])
def test_fuse_folds_the_resnet_batchnorms(pair):
    model = randomize_(graft(*pair, num_classes=10, img_size=64)).eval()
    x = torch.randn(2, 3, 64, 64)
    fused = fuse(model)
    assert rel_err(fused(x), model(x)) < 1e-4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())


def test_save_and_load_round_trip(tmp_path):
    model = randomize_(graft(3, 1, num_classes=10, img_size=64)).eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    x = torch.randn(2, 3, 64, 64)
    assert loaded.config == model.config and torch.equal(loaded(x), model(x))


def test_bad_options():
    with pytest.raises(ValueError, match="resnet_stages must be 0-4"):
        graft(5, 1)
    with pytest.raises(ValueError, match="deit_layers"):
        graft(1, -1)


@pytest.mark.slow
def test_hybridvit_train_trains_a_graft_that_reloads_to_its_figures(recipe_folder, tmp_path):
    """``hybridvit train`` with --model-args and the DeiT recipe (the grafting experiment's): the saved
    folders rebuild the small graft and evaluate to the figures the run reported."""
    from typer.testing import CliRunner

    from hybridvit.cli import app
    from hybridvit.train import evaluate

    out = tmp_path / "graft"
    result = CliRunner().invoke(app, [
        "train", "--model", NAME, "--model-args", '{"resnet_stages": 1, "deit_layers": 1}', "--recipe", "deit",
        "--data", str(recipe_folder), "--epochs", "1", "--input-size", "32", "--batch-size", "32", "--workers", "0",
        "--amp", "none", "--no-channels-last", "--output", str(out)])
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    model = load_model(out / "model")
    assert (model.config.resnet_stages, model.config.deit_layers, model.input_hw) == (1, 1, (32, 32))
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    for output, prefix in (("model", "val_"), ("ema", "ema_val_")):  # the DeiT recipe keeps an EMA
        figures = evaluate(out / output, data=recipe_folder, workers=0)
        assert figures["images"] == 31
        assert figures["top1"] == pytest.approx(row[prefix + "top1"]), output
        assert figures["loss"] == pytest.approx(row[prefix + "loss"], rel=1e-4), output
