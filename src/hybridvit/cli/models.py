"""``models``, ``info`` and ``forward``: what the registered variants are and what they compute."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.table import Table

from .common import PRETRAINED_TAG, console, fmt

if TYPE_CHECKING:
    from torch import nn

# Parameters and MACs of the registered variants, counted once by scripts/update_model_figures.py:
# counting them all takes seconds (the meta-device forward, torchvision and timm for the graft).
FIGURES_FILE = Path(__file__).with_name("model_figures.json")


def _meta_model(name: str, **overrides) -> nn.Module:
    """Build on the meta device: shapes, parameter and MAC counts without allocating weights."""
    import torch

    from ..api import create_model

    with torch.device("meta"):
        return create_model(name, **overrides)


def figures_key(name: str) -> dict[str, Any]:
    """What a variant's parameter and MAC counts depend on: its class and its whole config."""
    from ..registry import get_model_info

    info = get_model_info(name)
    return json.loads(json.dumps({"class": info.class_path,
                                  "config": dataclasses.asdict(info.config)}))


def count_figures(name: str) -> dict[str, int]:
    """A registered variant's parameters and MACs at its input size, counted on the meta device."""
    from ..flops import count_macs, count_params

    model = _meta_model(name)
    return {"params": count_params(model), "macs": count_macs(model)}


@functools.cache
def _stored_figures() -> dict[str, Any]:
    return json.loads(FIGURES_FILE.read_text()) if FIGURES_FILE.exists() else {}


def model_figures(name: str) -> dict[str, int]:
    """``count_figures``, read from FIGURES_FILE when it holds them for this class and config."""
    stored = _stored_figures().get(name)
    if stored is not None and stored["key"] == figures_key(name):
        return {"params": stored["params"], "macs": stored["macs"]}
    return count_figures(name)


def models_cmd(pattern: str = typer.Argument("*", help="shell-style filter, e.g. 'levit_*'"),
               weights: bool = typer.Option(False, "--weights", help="list the published weights instead")) -> None:
    """List the models with their size, cost and the paper's figures (or their published weights)."""
    from ..registry import get_model_info, list_models

    if weights:
        _weights_table(pattern)
        return
    table = Table(caption="MACs at the input size. Paper figures: ImageNet top-1 and images/s on a V100 GPU, "
                          "one Xeon 6138 thread and one Graviton2 thread.")
    for col in ("model", "params", "MACs", "input", "top-1", "GPU im/s", "CPU im/s", "ARM im/s"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    for name in list_models(pattern):
        info = get_model_info(name)
        figures = model_figures(name)
        _, h, w = info.input_size
        table.add_row(name, f"{figures['params'] / 1e6:.2f}M", f"{figures['macs'] / 1e6:,.0f}M", f"{h}x{w}",
                      fmt(info.paper_top1, ".1f"), fmt(info.paper_gpu_throughput),
                      fmt(info.paper_cpu_throughput, ".1f"), fmt(info.paper_arm_throughput, ".1f"))
    console.print(table)


def _weights_table(pattern: str) -> None:
    from ..registry import get_model_info, list_models

    table = Table(caption="--pretrained-tag picks the weights (default: the first of a model). Sources are tried in "
                          "order; top-1 is ImageNet-1k val as the authors report it.")
    for col in ("model", "tag", "input", "pretrained on", "download", "top-1", "sources"):
        table.add_column(col, justify="right" if col in ("download", "top-1") else "left")
    for name in list_models(pattern):
        info = get_model_info(name)
        for w in info.pretrained:
            size = w.img_size or info.input_size[1]
            table.add_row(name, w.tag, f"{size}x{size}", w.pretrain, f"{w.download_mb:,.0f} MB" if w.download_mb else "-",
                          fmt(w.top1, ".1f"), "\n".join(w.sources))
    console.print(table)


def _summary_parts(model: nn.Module) -> list[str]:
    """Rows of ``info``: top-level parts, with each stage split into its children."""
    from torch import nn

    parts = []
    for name, child in model.named_children():
        if name == "stages":
            for s, stage in child.named_children():
                parts += [f"stages.{s}.{sub}" for sub, m in stage.named_children() if not isinstance(m, nn.Identity)]
        elif not isinstance(child, (nn.Identity, type(None))):
            parts.append(name)
    return parts


def info_cmd(name: str, height: Optional[int] = typer.Option(None, help="input height"),
             width: Optional[int] = typer.Option(None, help="input width")) -> None:
    """Stage-by-stage structure: output shapes, parameters and MACs."""
    from torch import nn

    from ..flops import count_params, macs_by_module
    from ..registry import get_model_info

    info = get_model_info(name)
    size = (height or info.input_size[1], width or info.input_size[2])
    model = _meta_model(name, img_size=size).eval()
    parts = _summary_parts(model)
    shapes: dict[str, tuple[int, ...]] = {}

    def record(part: str):
        def hook(module, inputs, output):
            shapes[part] = tuple((output[0] if isinstance(output, tuple) else output).shape)
        return hook

    hooks = []
    for p in parts:
        module = model.get_submodule(p)
        if isinstance(module, nn.ModuleList):  # not called itself: its last member's output
            module = module[-1]
        hooks.append(module.register_forward_hook(record(p)))
    macs = macs_by_module(model, size)
    for h in hooks:
        h.remove()
    table = Table(title=f"{name} at {size[0]}x{size[1]} (batch 1)")
    for col in ("part", "output", "params", "MACs"):
        table.add_column(col, justify="left" if col in ("part", "output") else "right")
    for p in parts:
        module = model.get_submodule(p)
        part_macs = macs.get(p, 0)
        if isinstance(module, nn.ModuleList):  # the counter sees its members, not the list
            part_macs = sum(macs.get(f"{p}.{k}", 0) for k, _ in module.named_children())
        table.add_row(p, str(shapes.get(p, "-")), f"{count_params(module):,}", f"{part_macs / 1e6:,.1f}M")
    table.add_row("total", "", f"{count_params(model):,}", f"{macs[''] / 1e6:,.1f}M", style="bold")
    console.print(table)


def forward_cmd(
    name: str = typer.Argument("levit_128s"),
    image: Optional[Path] = typer.Argument(None, help="image file (default: a built-in synthetic picture)"),
    checkpoint: Optional[Path] = typer.Option(None, help="weights in any supported format"),
    pretrained: bool = typer.Option(False, help="download the published weights"),
    pretrained_tag: Optional[str] = PRETRAINED_TAG,
) -> None:
    """Run one image through a model, unfused and fused, and print the top-5 and timings."""
    import time

    import torch

    from ..api import create_model, pretrained_extra
    from ..data import eval_transform, example_image, load_image
    from ..fusion import fuse
    from ..registry import get_model_info

    info = get_model_info(name)
    model = create_model(name, pretrained=pretrained, pretrained_tag=pretrained_tag, checkpoint_path=checkpoint).eval()
    img = load_image(image) if image else example_image()
    extra = pretrained_extra(name, pretrained_tag) if pretrained else {}
    x = eval_transform(info, model.input_hw, crop_pct=extra.get("crop_pct"))(img).unsqueeze(0)
    fused = fuse(model)
    with torch.inference_mode():
        results = {}
        for label, m in (("unfused", model), ("fused", fused)):
            m(x)  # warm-up
            start = time.perf_counter()
            out = m(x)
            results[label] = (out, (time.perf_counter() - start) * 1e3)
    probs = results["fused"][0].softmax(-1)[0]
    top = probs.topk(5)
    weights = "published" if pretrained else (str(checkpoint) if checkpoint else "random (untrained)")
    console.print(f"{name}: weights {weights}, input {tuple(x.shape)}")
    names = extra.get("class_names")
    for p, i in zip(top.values.tolist(), top.indices.tolist()):
        console.print(f"  class {i:5d}  p={p:.4f}" + (f"  {names[i]}" if names else ""), highlight=False)
    diff = (results["fused"][0] - results["unfused"][0]).abs().max().item()
    console.print(f"latency: unfused {results['unfused'][1]:.1f} ms, fused {results['fused'][1]:.1f} ms; "
                  f"max |fused - unfused| = {diff:.2e}")
