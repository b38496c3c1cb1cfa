"""Figures: every panel holds the model's own numbers (bias tables, attention rows, filters),
block timings add up, and the plot command serves each kind."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import hybridvit
from hybridvit import figures
from hybridvit.bench import BenchResult
from hybridvit.cli import app
from hybridvit.layers import AttentionBias, capture_attention

runner = CliRunner()


@pytest.fixture(scope="module")
def levit() -> torch.nn.Module:
    """LeViT-128S at 64x64 (key grids 4x4, 2x2, 1x1) with random bias tables."""
    torch.manual_seed(0)
    model = hybridvit.create_model("levit_128s", num_classes=3, img_size=64).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AttentionBias):
                torch.nn.init.normal_(m.table)
    return model


@pytest.fixture(scope="module")
def cvt() -> torch.nn.Module:
    torch.manual_seed(0)
    return hybridvit.create_model("cvt_13", num_classes=3, img_size=64).eval()


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    figures._pyplot().close("all")


def biases(model: torch.nn.Module) -> list[torch.Tensor]:
    """Each layer's table as ``(heads, H, W)``, straight from the modules."""
    return [m.table.detach().reshape(-1, *m.key_grid) for m in model.modules() if isinstance(m, AttentionBias)]


def arrays(fig, index: int = -1) -> list[np.ndarray]:
    """The ``index``-th image of every image panel (-1: the one drawn last, on top)."""
    return [np.asarray(ax.images[index].get_array()) for ax in figures.panels(fig)]


def saved(fig, path) -> np.ndarray:
    """Save ``fig``, check the PNG has the figure's pixel size and is not blank; its pixels."""
    expected = tuple(int(round(v)) for v in fig.get_size_inches() * figures.DPI)
    figures.save_figure(fig, path)
    with Image.open(path) as img:
        assert img.size == expected
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert pixels.std() > 0
    return pixels


def test_attention_bias_panels_are_the_tables(levit):
    tables = biases(levit)
    assert [t.shape[0] for t in tables] == [4, 4, 8, 6, 6, 6, 16, 8, 8, 8, 8]
    fig = figures.figure_attention_bias(levit)
    data = arrays(fig)
    assert len(data) == sum(t.shape[0] for t in tables) == 82
    assert [d.shape for d in data[:4]] == [(4, 4)] * 4 and data[20].shape == (2, 2) and data[-1].shape == (1, 1)
    expected = [t[h].numpy() for t in tables for h in range(t.shape[0])]
    for got, want in zip(data, expected):
        np.testing.assert_array_equal(got, want)
    assert len(fig.axes) == 82  # no axes where a row has fewer heads than the widest
    assert [ax.get_subplotspec().colspan.start for ax in fig.axes[:9]] == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    lo, hi = tables[3].min().item(), tables[3].max().item()  # one colour scale per layer, its range in the label
    assert fig.axes[16].images[0].get_clim() == (lo, hi) and f"{lo:+.2f}..{hi:+.2f}" in fig.axes[16].get_ylabel()


def test_attention_bias_layer_filter_and_fused_model(levit, tmp_path):
    tables = biases(levit)
    fig = figures.figure_attention_bias(levit, layers=[2, -1])
    data = arrays(fig)
    assert len(data) == 8 + 8
    saved(fig, tmp_path / "bias.png")
    np.testing.assert_array_equal(data[3], tables[2][3].numpy())
    np.testing.assert_array_equal(data[-1], tables[-1][-1].numpy())
    fused = arrays(figures.figure_attention_bias(hybridvit.fuse(levit)))  # FixedAttentionBias keeps the table
    np.testing.assert_array_equal(fused[5], tables[1][1].numpy())
    with pytest.raises(ValueError, match="layer 11 does not exist"):
        figures.figure_attention_bias(levit, layers=[11])


def test_attention_bias_of_cvt_is_a_clear_error(cvt):
    with pytest.raises(ValueError, match="cvt_13 has no attention bias"):
        figures.figure_attention_bias(cvt)


def test_attention_panels_hold_the_query_row(levit, tmp_path):
    x = figures.model_input(levit)
    with torch.inference_mode(), capture_attention() as maps:
        levit(x)
    shrink = maps[2]  # stage 2's shrinking attention: queries on 2x2, keys on 4x4
    assert (shrink.query_grid, shrink.key_grid) == ((2, 2), (4, 4))
    # pixel (40, 10) of 64x64 lies in query cell (1, 0): row-major index 2
    want = shrink.probs[0, :, 2].reshape(-1, 4, 4)
    fig = figures.figure_attention(levit, query=(40, 10), layer=2)
    panels = figures.panels(fig)
    assert len(panels) == 8 + 1
    assert panels[0].images[0].get_array().shape == (64, 64, 3)
    for h, ax in enumerate(panels[1:]):
        np.testing.assert_allclose(np.asarray(ax.images[-1].get_array()), want[h].numpy(), rtol=1e-5, atol=1e-7)
        assert ax.images[-1].get_extent() == [0, 64, 64, 0]  # drawn over the whole image
    assert "call 2 of 11" in fig._suptitle.get_text() and "cell (1, 0)" in fig._suptitle.get_text()
    saved(fig, tmp_path / "attention.png")


def test_attention_of_cvt_skips_the_class_token(cvt, tmp_path):
    picture = np.zeros((80, 100, 3), np.uint8)
    picture[20:60, 30:70] = (200, 40, 40)
    Image.fromarray(picture).save(tmp_path / "square.png")
    x = figures.model_input(cvt, tmp_path / "square.png")
    assert x.shape == (1, 3, 64, 64)
    with torch.inference_mode(), capture_attention() as maps:
        cvt(x)
    last = maps[-1].probs  # 1 + 4x4 queries, 1 + 2x2 keys: the class token comes first
    assert last.shape == (1, 6, 17, 5)
    want = last[0, :, 1 + 15, 1:].reshape(-1, 2, 2)  # pixel (63, 63): query cell (3, 3)
    fig = figures.figure_attention(cvt, tmp_path / "square.png", query=(63, 63))
    data = arrays(fig)
    assert len(data) == 6 + 1
    for h in range(6):
        np.testing.assert_allclose(data[h + 1], want[h].numpy(), rtol=1e-5, atol=1e-7)
    grids = [(m.query_grid, m.key_grid) for m in figures.capture_maps(cvt, x)]
    assert grids == [((16, 16), (8, 8))] + [((8, 8), (4, 4))] * 2 + [((4, 4), (2, 2))] * 10
    with pytest.raises(FileNotFoundError, match="no image file"):
        figures.figure_attention(cvt, tmp_path / "missing.png")


def test_a_trained_models_stored_preprocessing_is_used(levit):
    from torchvision.transforms.functional import to_tensor

    extra = {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0, "input_size": [64, 64], "classes": ["a", "b", "c"]}
    info = figures.preprocessing(levit, extra)
    assert (info.mean, info.std, info.crop_pct) == ((0.5,) * 3, (0.5,) * 3, 1.0)
    assert figures.preprocessing(levit).crop_pct == 224 / 256  # the registered variant's otherwise
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    x = figures.model_input(levit, picture, extra)  # crop_pct 1.0: no resize, no crop
    torch.testing.assert_close(x[0], (to_tensor(picture) - 0.5) / 0.5)
    np.testing.assert_allclose(figures.denormalise(x[0], info), np.asarray(picture) / 255, atol=1e-6)


def test_filters_are_the_first_convolution(levit, cvt, tmp_path):
    for model, weight in ((levit, levit.stem.conv1.conv.weight), (cvt, cvt.stages[0].embed.proj.weight)):
        fig = figures.figure_filters(model)
        data = arrays(fig)
        assert len(data) == weight.shape[0]
        w = weight[5].detach()
        want = ((w - w.min()) / (w.max() - w.min())).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(data[5], want, atol=1e-6)
        assert all(d.min() == 0 and d.max() == pytest.approx(1) for d in data)
    fused = hybridvit.fuse(levit)
    assert figures.first_conv(fused) is fused.stem.conv1
    saved(fig, tmp_path / "filters.png")


def test_block_timings_add_up(levit, tmp_path):
    timings = figures.plot_block_timings(levit, tmp_path / "blocks.png", batch_size=2, iterations=2, threads=1)
    assert [r.block for r in timings.rows] == ["stem", "attention", "MLP", "shrinking attention", "head"]
    for r in timings.rows:
        assert r.unfused_ms > 0 and r.fused_ms > 0 and 0 < r.unfused_share < 1 and 0 < r.fused_share < 1
    for key in ("unfused", "fused"):
        assert sum(getattr(r, f"{key}_ms") for r in timings.rows) <= timings.total_ms[key]
    assert (timings.input_hw, timings.batch, timings.threads) == ((64, 64), 2, 1)
    table = (tmp_path / "blocks.md").read_text()
    assert table == timings.markdown()
    assert all(f"| {r.block} | {r.unfused_ms:.3f} |" in table for r in timings.rows) and "| total |" in table
    with Image.open(timings.path) as img:
        assert img.size[0] > 0 and np.asarray(img.convert("L"), dtype=float).std() > 0


def test_block_types_of_cvt_are_disjoint(cvt):
    types = figures.block_types(cvt)
    assert sorted(set(types.values())) == ["MLP", "attention", "head", "token embedding"]
    assert list(types.values()).count("attention") == 1 + 2 + 10
    names = list(types)
    assert not any(a != b and b.startswith(a + ".") for a in names for b in names)  # nothing timed twice


def test_curves_from_a_run_folder(tmp_path):
    rows = [dict(epoch=e, train_loss=2.0 - e, val_loss=2.1 - e, val_top1=30.0 + 20 * e, val_top5=60.0 + 10 * e)
            for e in range(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    fig = figures.figure_curves(tmp_path)
    loss, acc = fig.axes
    assert list(loss.lines[0].get_xdata()) == [1, 2, 3] and list(loss.lines[0].get_ydata()) == [2.0, 1.0, 0.0]
    assert list(acc.lines[0].get_ydata()) == [30.0, 50.0, 70.0] and list(acc.lines[1].get_ydata()) == [60, 70, 80]
    saved(fig, tmp_path / "curves.png")
    from hybridvit.train.reporting import plot_curves  # the training run draws the same figure

    assert plot_curves is figures.plot_curves
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        figures.figure_curves(tmp_path / "nowhere")


def test_speed_accuracy_from_benchmark_json(tmp_path):
    def row(name, source, model, ips, top1):
        return BenchResult(name, source, model, "fp32", 16, ips, [ips], 10.0, 11.0, None, top1, 1, 0.5)

    rows = [row("levit_192 (torchscript)", "hybridvit", "levit_192", 60.0, 80.0),
            row("levit_128s (torchscript)", "hybridvit", "levit_128s", 120.0, 76.6),
            row("levit_128s", "timm", "levit_128s", 90.0, 76.6)]
    data = {"machine": {"cpu": "Test CPU", "threads": 1}, "results": [dataclasses.asdict(r) for r in rows]}
    (tmp_path / "bench.json").write_text(json.dumps(data))
    read, machine = figures.read_benchmark(tmp_path / "bench.json")
    assert read == rows and figures.benchmark_title(machine) == "Test CPU, 1 thread(s)"
    fig = figures.figure_speed_accuracy(read, "title")
    ours, timm = fig.axes[0].lines
    assert list(ours.get_xdata()) == [120.0, 60.0] and list(ours.get_ydata()) == [76.6, 80.0]
    assert list(timm.get_xdata()) == [90.0]
    saved(fig, tmp_path / "speed.png")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not the JSON of hybridvit benchmark"):
        figures.read_benchmark(tmp_path / "bad.json")


def test_figures_do_not_import_training_or_cli():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(figures))
    modules = [("." * n.level) + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert ".bench.throughput" in modules and ".api" in modules  # the walk sees imports inside functions too
    assert not [m for m in modules if m.lstrip(".").removeprefix("hybridvit.").split(".")[0] in ("train", "cli")]


def test_plot_command_on_a_model_folder(levit, tmp_path):
    hybridvit.save_model(levit, tmp_path / "model")
    png = tmp_path / "bias.png"
    result = runner.invoke(app, ["plot", "attention-bias", str(tmp_path / "model"), "--layer", "0", "--layer", "-1",
                                 "--output", str(png)])
    assert result.exit_code == 0, result.output
    assert f"wrote {png}" in result.output.replace("\n", "")
    with Image.open(png) as img:
        assert np.asarray(img.convert("L"), dtype=float).std() > 0
    result = runner.invoke(app, ["plot", "attention", str(tmp_path / "model"), "--query", "10", "50", "--layer", "1",
                                 "--output", str(tmp_path / "att.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "att.png").is_file()


@pytest.mark.parametrize("args, error, message", [
    (["attention-bias", "cvt_13"], ValueError, "cvt_13 has no attention bias"),
    (["heatmap", "levit_128s"], ValueError, "unknown figure kind 'heatmap'"),
    (["filters", "no/such/run"], FileNotFoundError, "neither a registered model"),
    (["curves", "no/such/run"], FileNotFoundError, "no metrics file"),
    (["attention", "levit_128s", "--query", "300", "5"], ValueError, "(300, 5) lies outside the 224x224 input"),
    (["attention", "levit_128s", "--layer", "11"], ValueError, "attention layer 11 does not exist"),
])
def test_plot_command_errors(tmp_path, args, error, message):
    result = runner.invoke(app, ["plot", *args, "--output", str(tmp_path / "x.png")])
    assert result.exit_code != 0 and isinstance(result.exception, error)
    assert message in str(result.exception)
    assert not (tmp_path / "x.png").exists()
