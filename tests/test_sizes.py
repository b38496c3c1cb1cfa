"""Any input size (LeViT dynamic_size, odd and non-square sizes) and backbone features."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

import hybridvit
from hybridvit.cli import app
from hybridvit.inference.export import check_onnx, export, onnx_bytes
from hybridvit.layers import AttentionBias, bias_for_grid, bias_index
from hybridvit.models.features import FeatureExtractor

from conftest import randomize_, rel_err

SIZES = [(96, 96), (80, 112), (97, 131), (16, 16)]  # other square, non-square, odd, the smallest


def levit(img_size=64, dynamic=True, **kw):
    torch.manual_seed(0)
    return randomize_(hybridvit.create_model("levit_128s", num_classes=5, img_size=img_size, dynamic_size=dynamic,
                                             **kw)).eval()


def x_of(size, batch=2, seed=0):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def grids_of(model):
    return {n: m.key_grid for n, m in model.named_modules() if isinstance(m, AttentionBias)}


def test_native_size_is_unchanged_bit_for_bit():
    fixed, dynamic = levit(dynamic=False), levit(dynamic=True)
    x = x_of((64, 64))
    with torch.no_grad():
        assert torch.equal(fixed(x), dynamic(x))
        assert torch.equal(hybridvit.fuse(fixed)(x), hybridvit.fuse(dynamic)(x))
    fixed.train(), dynamic.train()
    torch.manual_seed(1)
    a = fixed(x)
    torch.manual_seed(1)
    assert all(torch.equal(p, q) for p, q in zip(a, dynamic(x)))


@pytest.mark.parametrize("size", SIZES[:3])
def test_other_sizes_equal_a_model_built_for_them(size, tmp_path):
    """Serving a size equals building the model for it from the same checkpoint (tables resampled)."""
    model = levit(img_size=(64, 80))
    hybridvit.save_model(model, tmp_path / "m")
    built = hybridvit.create_model("levit_128s", num_classes=5, img_size=size, checkpoint_path=tmp_path / "m").eval()
    x = x_of(size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), built(x), rtol=1e-5, atol=1e-5)
        fused = hybridvit.fuse(model)
        torch.testing.assert_close(fused(x), built(x), rtol=1e-4, atol=1e-4)  # a fused model serves them too
        torch.testing.assert_close(fused(x_of((64, 80))), model(x_of((64, 80))), rtol=1e-4, atol=1e-4)


def test_odd_sizes_round_up_like_the_stem():
    model = levit()
    maps = model.forward_intermediates(x_of((97, 131)), intermediates_only=True)
    assert [tuple(m.shape[-2:]) for m in maps] == [(7, 9), (4, 5), (2, 3)]  # ceil(97/16), ceil(7/2), ...
    with pytest.raises(ValueError, match="at least 16x16"):
        model(x_of((15, 40)))
    with pytest.raises(ValueError, match="dynamic_size=True"):
        levit(dynamic=False)(x_of((96, 96)))


def test_bias_for_a_grid_follows_the_offsets():
    table = torch.randn(3, 4 * 5)
    keep = bias_for_grid(table, (4, 5), (3, 2), stride=1, resampling="keep")
    for q in range(6):
        for k in range(6):
            dy, dx = abs(q // 2 - k // 2), abs(q % 2 - k % 2)
            assert torch.equal(keep[:, q, k], table[:, dy * 5 + dx])  # the learnt offset, as it is
    same = bias_for_grid(table, (4, 5), (4, 5), stride=2)
    assert torch.equal(same, table[:, bias_index((4, 5), 2)])
    with pytest.raises(ValueError, match="up to the trained 4x5"):
        bias_for_grid(table, (4, 5), (5, 5), resampling="keep")
    with pytest.raises(ValueError, match="bias_resampling must be one of"):
        hybridvit.create_model("levit_128s", bias_resampling="nearest")


def test_kept_offsets_serve_smaller_grids_only():
    model = levit(img_size=96, bias_resampling="keep")
    attn = model.stages[0].blocks[0].attn.attention_bias
    with torch.no_grad():
        small = model(x_of((64, 80)))
        assert torch.equal(attn((4, 5)), attn.table.view(4, 6, 6)[:, :4, :5].reshape(4, -1)[:, bias_index((4, 5))])
        with pytest.raises(ValueError, match="up to the trained"):
            model(x_of((112, 96)))
    assert small.shape == (2, 5)


def test_biases_are_cached_per_grid_and_follow_training():
    model = levit()
    bias = model.stages[0].blocks[0].attn.attention_bias
    with torch.no_grad():
        first = bias((5, 6))
        assert bias((5, 6)) is first and bias((6, 5)) is not first
    # With gradients the bias is recomputed and the table learns at the new size.
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logits, logits_dist = model(x_of((80, 96)))
    (logits.logsumexp(1).sum() + logits_dist.sum()).backward()
    assert bias.table.grad is not None and bias.table.grad.abs().sum() > 0
    optimizer.step()
    with torch.no_grad():
        assert not torch.equal(bias((5, 6)), first)  # the in-place update invalidated the cache


def test_onnx_serves_any_size_in_one_file(tmp_path):
    pytest.importorskip("onnxruntime")
    model = levit()
    path = export(model, tmp_path / "levit.onnx", dynamic_size=True)
    for size in [(64, 64)] + SIZES:
        assert check_onnx(path, model, size=size) < 1e-4, size
    cvt = randomize_(hybridvit.create_model("cvt_13", num_classes=5, img_size=64)).eval()
    path = export(cvt, tmp_path / "cvt.onnx", dynamic_size=True)
    for size in [(64, 64), (96, 80), (97, 131)]:
        assert check_onnx(path, cvt, size=size) < 1e-4, size
    with pytest.raises(ValueError, match="create it with dynamic_size=True"):
        onnx_bytes(hybridvit.fuse(levit(dynamic=False)), x_of((64, 64)), dynamic_size=True)


def test_export_cli_dynamic_size(tmp_path):
    pytest.importorskip("onnxruntime")
    model = levit(dynamic=False)
    hybridvit.save_model(model, tmp_path / "m")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "m"), "--dynamic-size", "--output", str(tmp_path / "d.onnx")])
    assert result.exit_code == 0, result.output
    assert "dynamic batch, height and width" in result.output
    differences = [float(line.rsplit(" ", 1)[1]) for line in result.output.splitlines() if "ONNX Runtime vs" in line]
    assert len(differences) == 3 and max(differences) < 1e-4
    assert "at 96x64" in result.output and "at 49x83" in result.output


@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript"])
def test_optimized_models_serve_other_sizes(backend):
    pytest.importorskip("onnxruntime")
    cvt = randomize_(hybridvit.create_model("cvt_13", num_classes=5, img_size=64)).eval()
    for model in (levit(), cvt):
        fast = hybridvit.optimize(model, backend=backend)
        for size in [(64, 64), (80, 96), (64, 64)]:
            x = x_of(size)
            with torch.no_grad():
                assert rel_err(fast(x), model(x)) < 1e-4
        assert set(fast.runners) == {(64, 64), (80, 96)}
    fixed = hybridvit.optimize(levit(dynamic=False), backend=backend)
    with pytest.raises(ValueError, match="built for 64x64"):
        fixed(x_of((80, 96)))


def test_quantized_model_names_its_size():
    pytest.importorskip("onnxruntime")
    model = levit()
    int8 = hybridvit.quantize_static(model, x_of((64, 64), batch=8))
    with pytest.raises(ValueError, match="captured for 64x64 inputs; got 80x96"):
        int8(x_of((80, 96)))


# ---- backbone features ----

def conv_out(n, kernel, stride, padding):
    return (n + 2 * padding - kernel) // stride + 1


def levit_grids(n):  # four 3x3/2 convolutions, then two subsamplings: each rounds up
    sides = [n]
    for _ in range(6):
        sides.append(conv_out(sides[-1], 3, 2, 1))
    return sides[4:]


def cvt_grids(n):  # 7x7/4 (padding 2), then two 3x3/2 embeddings
    first = conv_out(n, 7, 4, 2)
    second = conv_out(first, 3, 2, 1)
    return [first, second, conv_out(second, 3, 2, 1)]


@pytest.mark.parametrize("name,strides,grids", [("levit_128s", (16, 32, 64), levit_grids),
                                                ("cvt_13", (4, 8, 16), cvt_grids)])
def test_features_shapes_and_strides(name, strides, grids):
    backbone = hybridvit.create_model(name, features_only=True, img_size=64).eval()
    assert isinstance(backbone, FeatureExtractor)
    assert backbone.feature_info.reduction() == list(strides)
    assert backbone.feature_info.module_name() == ["stages.0", "stages.1", "stages.2"]
    for size in [(64, 64), (128, 192), (97, 131)]:
        with torch.no_grad():
            maps = backbone(x_of(size, batch=1))
        assert [m.shape[1] for m in maps] == backbone.feature_info.channels()
        assert [tuple(m.shape[-2:]) for m in maps] == list(zip(grids(size[0]), grids(size[1])))
        if size == (128, 192):  # divisible: exactly the stride
            assert [tuple(m.shape[-2:]) for m in maps] == [(128 // s, 192 // s) for s in strides]
    two = hybridvit.create_model(name, features_only=True, out_indices=(1, -1))
    assert two.feature_info.reduction() == list(strides[1:])


def test_intermediates_equal_the_classifier_tokens():
    model = levit(img_size=(64, 80))
    cvt = randomize_(hybridvit.create_model("cvt_13", num_classes=5, img_size=64)).eval()
    x = x_of((80, 96))
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        tokens = model.forward_features(x)
        assert torch.equal(final, tokens)
        assert torch.equal(maps[-1].flatten(2).transpose(1, 2), tokens)
        assert torch.equal(model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)[0], tokens)
        final, maps = cvt.forward_intermediates(x, norm=True)
        tokens = cvt.forward_features(x)
        assert torch.equal(final, tokens)
        assert torch.equal(maps[-1].flatten(2).transpose(1, 2), tokens[:, 1:])  # no class token
        plain = cvt.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        assert not torch.allclose(plain[-1], maps[-1]) and torch.equal(plain[0], maps[0])
        early = cvt.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        assert torch.equal(early[0], maps[0])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_features_load_checkpoints_and_fuse(tmp_path):
    classifier = levit(img_size=64, dynamic=False)
    hybridvit.save_model(classifier, tmp_path / "m")
    backbone = hybridvit.create_model("levit_128s", features_only=True, img_size=64,
                                      checkpoint_path=tmp_path / "m").eval()
    assert backbone.model.config.dynamic_size  # a backbone serves any size
    x = x_of((64, 64))
    with torch.no_grad():
        expected = classifier.forward_intermediates(x, intermediates_only=True)
        for got, want in zip(backbone(x), expected):
            assert torch.equal(got, want)
        fused = hybridvit.fuse(backbone)
        for size in [(64, 64), (96, 128)]:
            for got, want in zip(fused(x_of(size)), backbone(x_of(size))):
                assert rel_err(got, want) < 1e-4
    assert not any(k.startswith("model.head") for k in backbone.state_dict())
    assert dataclasses.asdict(backbone.model.config)["num_classes"] == 0


def test_finetune_at_a_new_size_keeps_a_fitting_classifier(tmp_path):
    from hybridvit.train import TrainConfig
    from hybridvit.train.builder import build_model

    source = levit(img_size=64, dynamic=False)
    hybridvit.save_model(source, tmp_path / "m")
    cfg = TrainConfig(finetune=str(tmp_path / "m"), input_size=80, input_width=96)
    same, _ = build_model(cfg, 5, (80, 96))
    assert same.input_hw == (80, 96)
    assert torch.equal(same.head.linear.weight, source.head.linear.weight)  # same classes: kept
    other, _ = build_model(cfg, 3, (80, 96))
    assert other.head.linear.weight.shape[0] == 3  # other classes: a new classifier, the rest loaded
    assert torch.equal(other.stem.conv1.conv.weight, source.stem.conv1.conv.weight)
    with pytest.raises(ValueError, match="--input-width 96 needs --input-size"):
        TrainConfig(input_width=96)


def resampled_tables(model, built):
    """``model``'s state dict with every bias table resampled to ``built``'s key grids, computed
    here (bilinear over the (|dy|, |dx|) offsets, as documented) rather than by the library."""
    state, old, new = model.state_dict(), grids_of(model), grids_of(built)
    for name, grid in new.items():
        table = state[f"{name}.table"]
        state[f"{name}.table"] = torch.nn.functional.interpolate(
            table.reshape(1, -1, *old[name]), size=grid, mode="bilinear", align_corners=False).reshape(len(table), -1)
    return state


@pytest.mark.slow
def test_eval_at_other_sizes(digits_run, tmp_path):
    """Trained at 32x32, evaluated at 40x32: the same figures as a model built for 40x32 from tables
    this test resamples itself, and far above chance (10 classes: 10%)."""
    from hybridvit.checkpoints import load_trained
    from hybridvit.train import evaluate

    native = evaluate(digits_run, workers=0)
    assert native["top1"] > 80
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(digits_run), "--workers", "0", "--input-size", "40",
                                      "--input-width", "32", "--json"])
    assert result.exit_code == 0, result.output
    other = json.loads(result.output)
    trained, extra = load_trained(digits_run)
    built = hybridvit.create_model("levit_128s", num_classes=10, img_size=(40, 32))
    built.load_state_dict(resampled_tables(trained, built))
    hybridvit.save_model(built, tmp_path / "built", extra=extra)
    reference = evaluate(tmp_path / "built", workers=0)  # its own size: no resampling at run time
    assert reference["images"] == other["images"] == 360
    assert other["top1"] == reference["top1"] and other["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert other["top1"] > 40  # measured 72.8 (a third less than at the trained size: the digits are larger)
    kept = evaluate(digits_run, workers=0, input_size=(32, 32), bias_resampling="keep")
    assert kept["top1"] == native["top1"]  # the trained grid: the learnt offsets are the table itself
    with pytest.raises(ValueError, match="up to the trained"):
        evaluate(digits_run, workers=0, input_size=(48, 40), bias_resampling="keep")


@pytest.mark.parametrize("name, options", [
    ("graft_resnet50_deit_s", {}),
    ("cvt_13", {"pos_embed": (True, True, True)}),
    ("levit_128s", {"ablation": "A5", "dynamic_size": True}),
])
def test_position_embeddings_are_resampled_when_loaded_at_another_size(name, options, tmp_path):
    """A checkpoint trained at 224 loads into a model built for 96 (its position embeddings, class
    and distillation tokens kept, resampled as the 224 model does at run time): the same outputs."""
    reference = randomize_(hybridvit.create_model(name, num_classes=7, **options)).eval()
    with torch.no_grad():
        for p in (p for n, p in reference.named_parameters() if n.endswith("pos_embed")):
            p.normal_(std=0.5)  # visible in the outputs
    hybridvit.save_model(reference, tmp_path / "folder")
    torch.save(reference.state_dict(), tmp_path / "bare.pth")
    x = torch.randn(2, 3, 96, 96)
    for source in ("folder", "bare.pth"):
        small = hybridvit.create_model(name, num_classes=7, img_size=96, checkpoint_path=tmp_path / source, **options).eval()
        with torch.no_grad():
            assert rel_err(small(x), reference(x)) < 1e-5, source
