"""Figures: every panel holds the model's own numbers (bias tables, attention rows, filters),
block timings add up, and the plot command serves each kind."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re

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
OPTIMIZE = importlib.import_module("hybridvit.inference.optimize")  # the module (the package exports the function)


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
    figures.base.pyplot().close("all")


def biases(model: torch.nn.Module) -> list[torch.Tensor]:
    """Each layer's table as ``(heads, H, W)``, straight from the modules."""
    return [m.table.detach().reshape(-1, *m.key_grid) for m in model.modules() if isinstance(m, AttentionBias)]


def arrays(fig, index: int = -1) -> list[np.ndarray]:
    """The ``index``-th image of every image panel (-1: the one drawn last, on top)."""
    return [np.asarray(ax.images[index].get_array()) for ax in figures.panels(fig)]


def png(path) -> np.ndarray:
    """The pixels of a PNG file (RGBA)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGBA"))


def saved(fig, path) -> np.ndarray:
    """Save ``fig``, check the PNG has the figure's pixel size and is not blank; its pixels."""
    expected = tuple(int(round(v)) for v in fig.get_size_inches() * figures.DPI)
    figures.save_figure(fig, path)
    pixels = png(path)
    assert pixels.shape[1::-1] == expected and pixels[..., :3].std() > 0
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
        # the blocks hold most of the forward (72-98% measured on a loaded 2-core machine); the rest
        # is residual additions, reshapes and the hooks themselves. Exact counts: the fake-clock test.
        blocks = sum(getattr(r, f"{key}_ms") for r in timings.rows)
        assert 0.5 * timings.total_ms[key] <= blocks <= timings.total_ms[key], (key, blocks, timings.total_ms)
    assert (timings.input_hw, timings.batch, timings.threads) == ((64, 64), 2, 1)
    table = (tmp_path / "blocks.md").read_text()
    assert table == timings.markdown()
    assert all(f"| {r.block} | {r.unfused_ms:.3f} |" in table for r in timings.rows) and "| total |" in table
    assert png(timings.path).shape == (430, 700, 4)  # 7 x (0.5 per row + 1.8) inches at 100 dpi: five rows
    np.testing.assert_array_equal(png(timings.path), saved(figures.figure_block_timings(timings), tmp_path / "b.png"))


@pytest.mark.parametrize("option, value, message", [
    ("iterations", 0, "iterations must be at least 1, got 0"),
    ("batch_size", -2, "batch size must be at least 1, got -2"),
    ("warmup", -1, "warmup must be at least 0, got -1"),
    ("threads", 0, "threads must be at least 1, got 0")])
def test_block_timings_refuse_options_that_measure_nothing(levit, option, value, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):  # one line, naming the value
        figures.measure_block_timings(levit, **{option: value})


def is_leaf(module: torch.nn.Module) -> bool:
    return next(module.children(), None) is None


class LeafClock:
    """A fake ``time.perf_counter`` that advances one second per leaf module run: a block's time is
    then the number of leaf modules it ran, and the whole forward's the number of all that ran."""

    def __init__(self) -> None:
        self.now = 0.0
        self.handle = torch.nn.modules.module.register_module_forward_hook(self._tick)

    def _tick(self, module, inputs, output) -> None:
        self.now += is_leaf(module)

    def perf_counter(self) -> float:
        return self.now


def leaves_per_block(model: torch.nn.Module, kinds: dict[type, str], heads: set[str]) -> tuple[dict[str, int], int]:
    """Leaf modules one forward runs inside each block type (blocks found by class, or by name for
    the head; the outermost where they nest), and in all."""
    blocks: dict[str, str] = {}
    for name, module in model.named_modules():
        kind = "head" if name in heads else kinds.get(type(module))
        if kind and not any(name.startswith(b + ".") for b in blocks):
            blocks[name] = kind
    kind_of = {sub: kind for name, kind in blocks.items() for sub in model.get_submodule(name).modules()}
    counts = dict.fromkeys(blocks.values(), 0)
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if is_leaf(module):
            total += 1
            if module in kind_of:
                counts[kind_of[module]] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, *model.input_hw))
    finally:
        handle.remove()
    return counts, total


@pytest.mark.slow
def test_block_timings_count_every_block_on_a_fake_clock(levit, monkeypatch):
    """On a clock that ticks once per leaf module, each row is exactly the leaf modules of its
    blocks and the rest of the forward exactly the leaves outside them: a block left out of the
    timing, or timed twice, changes the counts."""
    import types

    from hybridvit.models import cvt as cvt_module
    from hybridvit.models import levit as levit_module

    kinds = {levit_module.PatchEmbed: "stem", levit_module.Attention: "attention", levit_module.MLP: "MLP",
             levit_module.ShrinkAttention: "shrinking attention", cvt_module.ConvEmbed: "token embedding",
             cvt_module.ConvAttention: "attention", cvt_module.MLP: "MLP"}
    cvt = hybridvit.create_model("cvt_13", num_classes=3, img_size=32, depth=(1, 1, 2)).eval()  # every block kind
    for model, heads in ((levit, {"head", "head_dist"}), (cvt, {"head", "norm"})):
        clock = LeafClock()
        monkeypatch.setattr(figures.timings, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
        try:
            timings = figures.measure_block_timings(model, batch_size=2, iterations=2, warmup=0, threads=1)
        finally:
            clock.handle.remove()
        for key, reference in (("unfused", model), ("fused", hybridvit.fuse(model))):
            counts, total = leaves_per_block(reference, kinds, heads)
            ms = 1e3 / 2  # one second per leaf, per image of the batch of 2
            assert {r.block: getattr(r, f"{key}_ms") for r in timings.rows} == pytest.approx(
                {kind: n * ms for kind, n in counts.items()}), key
            assert timings.total_ms[key] == pytest.approx(total * ms)


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


def write_benchmark(path) -> list[BenchResult]:
    """A ``hybridvit benchmark --json`` file of three rows (two of ours, one of timm); its rows."""
    def row(name, source, model, ips, top1):
        return BenchResult(name, source, model, "fp32", 16, ips, [ips], 10.0, 11.0, None, top1, 1, 0.5)

    rows = [row("levit_192 (torchscript)", "hybridvit", "levit_192", 60.0, 80.0),
            row("levit_128s (torchscript)", "hybridvit", "levit_128s", 120.0, 76.6),
            row("levit_128s", "timm", "levit_128s", 90.0, 76.6)]
    data = {"machine": {"cpu": "Test CPU", "threads": 1}, "results": [dataclasses.asdict(r) for r in rows]}
    path.write_text(json.dumps(data))
    return rows


def test_speed_accuracy_from_benchmark_json(tmp_path):
    rows = write_benchmark(tmp_path / "bench.json")
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


def test_figures_import_one_way_and_never_training_or_the_cli():
    """The package imports its families, each family of this package only ``base``, ``base`` none
    of them; nothing imports hybridvit's training code or its command line."""
    import ast
    import inspect
    import pkgutil

    imports = {}
    for name in ["__init__"] + [m.name for m in pkgutil.iter_modules(figures.__path__)]:
        module = figures if name == "__init__" else importlib.import_module(f"hybridvit.figures.{name}")
        tree = ast.parse(inspect.getsource(module))
        imports[name] = [("." * n.level) + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imports[name] += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    families = {"attention", "curves", "filters", "results", "speed", "timings"}
    assert set(imports) == {"__init__", "base"} | families
    assert "..bench.throughput" in imports["timings"] and "..api" in imports["__init__"]  # imports in functions too
    for name, modules in imports.items():
        inside = {m[1:] for m in modules if m.startswith(".") and not m.startswith("..")}
        assert inside <= {"__init__": families | {"base"}, "base": set()}.get(name, {"base"}), name
        hybridvit_parts = [m.lstrip(".").removeprefix("hybridvit.").split(".")[0] for m in modules
                           if m.startswith("..") or m.startswith("hybridvit")]
        assert not {"train", "cli"} & set(hybridvit_parts), name


def plot(*args: str) -> str:
    """``hybridvit plot ARGS``, which must succeed; what it printed."""
    result = runner.invoke(app, ["plot", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_plot_command_on_a_model_folder(levit, tmp_path):
    from hybridvit.checkpoints import load_trained

    hybridvit.save_model(levit, tmp_path / "model")
    model, extra = load_trained(tmp_path / "model")
    out = plot("attention-bias", str(tmp_path / "model"), "--layer", "0", "--layer", "-1",
               "--output", str(tmp_path / "bias.png"))
    assert f"wrote {tmp_path / 'bias.png'}" in out.replace("\n", "")
    # the PNG is the library's figure of that model with those options, pixel for pixel
    want = saved(figures.figure_attention_bias(model, [0, -1]), tmp_path / "want.png")
    np.testing.assert_array_equal(png(tmp_path / "bias.png"), want)
    plot("attention", str(tmp_path / "model"), "--query", "10", "50", "--layer", "1",
         "--output", str(tmp_path / "att.png"))
    want = saved(figures.figure_attention(model, query=(10, 50), layer=1, extra=extra), tmp_path / "want.png")
    np.testing.assert_array_equal(png(tmp_path / "att.png"), want)


@pytest.mark.slow
def test_plot_command_on_a_training_run(digits_run, tmp_path, monkeypatch):
    """filters, block-timings and curves of the digits run (LeViT-128S at 32x32, 3 epochs)."""
    from hybridvit.checkpoints import load_trained

    model, _ = load_trained(digits_run)
    plot("filters", str(digits_run), "--output", str(tmp_path / "filters.png"))
    fig = figures.figure_filters(model)
    assert len(figures.panels(fig)) == 16  # stem.conv1: 16 filters
    np.testing.assert_array_equal(png(tmp_path / "filters.png"), saved(fig, tmp_path / "want.png"))

    epochs = [json.loads(line) for line in (digits_run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig = figures.figure_curves(digits_run)
    assert list(fig.axes[0].lines[0].get_ydata()) == [e["train_loss"] for e in epochs] and len(epochs) == 3
    assert list(fig.axes[1].lines[0].get_ydata()) == [e["val_top1"] for e in epochs]
    want = saved(fig, tmp_path / "want.png")
    for source in (digits_run, digits_run / "metrics.jsonl"):
        plot("curves", str(source), "--output", str(tmp_path / "curves.png"))
        np.testing.assert_array_equal(png(tmp_path / "curves.png"), want)

    tuned = []  # process-wide for real: stood in for
    monkeypatch.setattr(OPTIMIZE, "tune_cpu_allocator", lambda: tuned.append(True) or True)
    out = plot("block-timings", str(digits_run), "--batch-size", "2", "--iterations", "1", "--threads", "1",
               "--output", str(tmp_path / "blocks.png"))
    table = (tmp_path / "blocks.md").read_text()
    assert table.splitlines()[0].startswith("levit_128s at 32x32, batch 2, 1 thread(s), 1 timed iterations")
    assert [line.split(" | ")[0].lstrip("| ") for line in table.splitlines()[4:]] == [
        "stem", "attention", "MLP", "shrinking attention", "head", "other (residuals, reshapes, pooling)", "total"]
    assert table.strip() in out and tuned == [True]
    pixels = png(tmp_path / "blocks.png")
    assert pixels.shape == (430, 700, 4) and pixels[..., :3].std() > 0  # five rows of bars


def test_plot_command_speed_accuracy(tmp_path):
    rows = write_benchmark(tmp_path / "bench.json")
    out = plot("speed-accuracy", str(tmp_path / "bench.json"), "--output", str(tmp_path / "speed.png"))
    assert f"wrote {tmp_path / 'speed.png'}" in out.replace("\n", "")
    want = saved(figures.figure_speed_accuracy(rows, "Test CPU, 1 thread(s)"), tmp_path / "want.png")
    np.testing.assert_array_equal(png(tmp_path / "speed.png"), want)


@pytest.mark.parametrize("args, error, message", [
    (["attention-bias", "cvt_13"], ValueError, "cvt_13 has no attention bias"),
    (["heatmap", "levit_128s"], ValueError, "unknown figure kind 'heatmap'"),
    (["filters", "no/such/run"], FileNotFoundError, "neither a registered model"),
    (["curves", "no/such/run"], FileNotFoundError, "no metrics file"),
    (["attention", "levit_128s", "--query", "300", "5"], ValueError, "(300, 5) lies outside the 224x224 input"),
    (["attention", "levit_128s", "--layer", "11"], ValueError, "attention layer 11 does not exist"),
    (["block-timings", "levit_128s", "--iterations", "0"], ValueError, "iterations must be at least 1, got 0"),
    (["block-timings", "levit_128s", "--batch-size", "-2"], ValueError, "batch size must be at least 1, got -2"),
    (["block-timings", "levit_128s", "--threads", "0"], ValueError, "threads must be at least 1, got 0"),
])
def test_plot_command_errors(tmp_path, monkeypatch, args, error, message):
    monkeypatch.setattr(OPTIMIZE, "tune_cpu_allocator", lambda: True)  # block-timings: process-wide for real
    result = runner.invoke(app, ["plot", *args, "--output", str(tmp_path / "x.png")])
    assert result.exit_code != 0 and isinstance(result.exception, error)
    assert message in str(result.exception)
    assert not (tmp_path / "x.png").exists()
