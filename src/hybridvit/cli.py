"""The ``hybridvit`` command: thin wrappers that call the public API and print."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import sys
import time
import typing
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from . import create_model, fuse, list_models
from .api import load_source
from .flops import count_params, macs_by_module
from .registry import get_model_info
from .train.config import TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hybrid convolution/transformer image classifiers.")
console = Console()
if not console.is_terminal:  # pipes and CI logs: don't squeeze tables into 80 columns
    console = Console(width=200)


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def _meta_model(name: str, **overrides) -> torch.nn.Module:
    """Build on the meta device: shapes, parameter and MAC counts without allocating weights."""
    with torch.device("meta"):
        return create_model(name, **overrides)


@app.command("models")
def models_cmd(pattern: str = typer.Argument("*", help="shell-style filter, e.g. 'levit_*'"),
               weights: bool = typer.Option(False, "--weights", help="list the published weights instead")) -> None:
    """List the models with their size, cost and the paper's figures (or their published weights)."""
    if weights:
        _weights_table(pattern)
        return
    table = Table(caption="MACs at the input size. Paper figures: ImageNet top-1 and images/s on a V100 GPU, "
                          "one Xeon 6138 thread and one Graviton2 thread.")
    for col in ("model", "params", "MACs", "input", "top-1", "GPU im/s", "CPU im/s", "ARM im/s"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    for name in list_models(pattern):
        info = get_model_info(name)
        model = _meta_model(name)
        macs = macs_by_module(model)[""]
        _, h, w = info.input_size
        table.add_row(name, f"{count_params(model) / 1e6:.2f}M", f"{macs / 1e6:,.0f}M", f"{h}x{w}",
                      _fmt(info.paper_top1, ".1f"), _fmt(info.paper_gpu_throughput),
                      _fmt(info.paper_cpu_throughput, ".1f"), _fmt(info.paper_arm_throughput, ".1f"))
    console.print(table)


def _weights_table(pattern: str) -> None:
    table = Table(caption="--pretrained-tag picks the weights (default: the first of a model). Sources are tried in "
                          "order; top-1 is ImageNet-1k val as the authors report it.")
    for col in ("model", "tag", "input", "pretrained on", "download", "top-1", "sources"):
        table.add_column(col, justify="right" if col in ("download", "top-1") else "left")
    for name in list_models(pattern):
        info = get_model_info(name)
        for w in info.pretrained:
            size = w.img_size or info.input_size[1]
            table.add_row(name, w.tag, f"{size}x{size}", w.pretrain, f"{w.download_mb:,.0f} MB" if w.download_mb else "-",
                          _fmt(w.top1, ".1f"), "\n".join(w.sources))
    console.print(table)


def _summary_parts(model: torch.nn.Module) -> list[str]:
    """Rows of ``info``: top-level parts, with each stage split into its children."""
    parts = []
    for name, child in model.named_children():
        if name == "stages":
            for s, stage in child.named_children():
                parts += [f"stages.{s}.{sub}" for sub, m in stage.named_children() if not isinstance(m, torch.nn.Identity)]
        elif not isinstance(child, (torch.nn.Identity, type(None))):
            parts.append(name)
    return parts


@app.command("info")
def info_cmd(name: str, height: Optional[int] = typer.Option(None, help="input height"),
             width: Optional[int] = typer.Option(None, help="input width")) -> None:
    """Stage-by-stage structure: output shapes, parameters and MACs."""
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
        if isinstance(module, torch.nn.ModuleList):  # not called itself: its last member's output
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
        if isinstance(module, torch.nn.ModuleList):  # the counter sees its members, not the list
            part_macs = sum(macs.get(f"{p}.{k}", 0) for k, _ in module.named_children())
        table.add_row(p, str(shapes.get(p, "-")), f"{count_params(module):,}", f"{part_macs / 1e6:,.1f}M")
    table.add_row("total", "", f"{count_params(model):,}", f"{macs[''] / 1e6:,.1f}M", style="bold")
    console.print(table)


_SOURCE_HELP = "model folder, training run folder, checkpoint.pt, hf-hub:ORG/NAME[@REVISION], or a model name with --pretrained"
_PRETRAINED = typer.Option(False, "--pretrained", help="a model name: use its published weights")
_PRETRAINED_TAG = typer.Option(None, "--pretrained-tag", help="which published weights (see `hybridvit models`; "
                               "default: the first)")


@app.command("forward")
def forward_cmd(
    name: str = typer.Argument("levit_128s"),
    image: Optional[Path] = typer.Argument(None, help="image file (default: a built-in synthetic picture)"),
    checkpoint: Optional[Path] = typer.Option(None, help="weights in any supported format"),
    pretrained: bool = typer.Option(False, help="download the published weights"),
    pretrained_tag: Optional[str] = _PRETRAINED_TAG,
) -> None:
    """Run one image through a model, unfused and fused, and print the top-5 and timings."""
    from .api import pretrained_extra
    from .data import eval_transform, example_image, load_image

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


def _json_option(name: str, text: str | None) -> dict:
    """A ``--name '{...}'`` option's JSON object (``{}`` when not given)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--{name.replace('_', '-')} must be a JSON object such as '{{\"ablation\": \"A1\"}}': {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--{name.replace('_', '-')} must be a JSON object; got {text!r}")
    return value


def _dataclass_command(config_class: type, skip: frozenset[str] = frozenset()):
    """Decorator: expose every field of ``config_class`` as a ``--option`` (one source of truth)."""
    hints = typing.get_type_hints(config_class)

    def option(f: dataclasses.Field) -> inspect.Parameter:
        flag = f"--{f.name.replace('_', '-')}"
        if typing.get_origin(hints[f.name]) is dict:  # given as JSON on the command line
            return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                     default=typer.Option(None, flag, help=f.metadata.get("help")))
        if hints[f.name] in (bool, Optional[bool]):  # on/off switches, e.g. --model-ema / --no-model-ema
            flag += f"/--no-{flag[2:]}"
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                                 default=typer.Option(f.default, flag, help=f.metadata.get("help")))

    def decorate(fn):
        params = [option(f) for f in dataclasses.fields(config_class) if f.name not in skip]

        @functools.wraps(fn)
        def command(**kwargs):
            for name, hint in hints.items():
                if typing.get_origin(hint) is dict and name in kwargs:
                    kwargs[name] = _json_option(name, kwargs[name])
            return fn(config_class(**kwargs))

        command.__signature__ = inspect.Signature(params)
        return command

    return decorate


@app.command("train")
@_dataclass_command(TrainConfig, skip=frozenset({"scale"}))
def train_cmd(cfg: TrainConfig) -> None:
    """Train a model (default: levit_128s on the built-in digits); also runs under torchrun."""
    from .train import TrainingError, train

    try:
        result = train(cfg)
    except TrainingError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None
    if result.get("interrupted"):
        raise typer.Exit(130)


@app.command("eval")
def eval_cmd(
    checkpoint: str = typer.Option(..., help=_SOURCE_HELP),
    data: Optional[str] = typer.Option(None, help="ImageNet-layout folder (its val split); default: digits"),
    pretrained: bool = _PRETRAINED,
    pretrained_tag: Optional[str] = _PRETRAINED_TAG,
    batch_size: int = typer.Option(64),
    workers: int = typer.Option(2),
    device: str = typer.Option("auto"),
    amp: str = typer.Option("auto", help="auto, bf16, fp16 or none"),
    fused: bool = typer.Option(True, help="fold BatchNorms first (the deployed model)"),
    input_size: Optional[int] = typer.Option(None, help="evaluate at this height (default: the training size)"),
    input_width: Optional[int] = typer.Option(None, help="width, when it differs from --input-size"),
    bias_resampling: Optional[str] = typer.Option(None, help="LeViT at another size: bilinear (default) or keep "
                                                  "(the learnt offsets as they are; smaller sizes only)"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Top-1, top-5 and loss of a trained model (fused), also under torchrun."""
    import json
    import os

    from .train import evaluate

    size = (input_size, input_width or input_size) if input_size else None
    metrics = evaluate(checkpoint, data, batch_size=batch_size, workers=workers, device=device, amp=amp, fused=fused,
                       input_size=size, bias_resampling=bias_resampling, pretrained=pretrained, pretrained_tag=pretrained_tag)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if json_output:
        print(json.dumps({k: metrics[k] for k in ("top1", "top5", "loss", "images", "skipped")}))
    else:
        console.print(f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
                      f"on {metrics['images']} images ({metrics['skipped']} unreadable skipped)")


@app.command("predict")
def predict_cmd(
    checkpoint: str = typer.Argument(..., help=_SOURCE_HELP),
    images: list[Path] = typer.Argument(..., help="image files (any size and mode Pillow reads)"),
    top: int = typer.Option(5, help="how many classes to show"),
    pretrained: bool = _PRETRAINED,
    pretrained_tag: Optional[str] = _PRETRAINED_TAG,
    json_output: bool = typer.Option(False, "--json", help="print JSON lines"),
) -> None:
    """Top-5 classes with probabilities for each image (the model's own preprocessing)."""
    import json

    from .predict import Predictor

    predictor = Predictor(checkpoint, pretrained=pretrained, pretrained_tag=pretrained_tag)
    failed = 0
    for path in images:
        try:
            (result,) = predictor.predict([path], k=top)
        except ValueError as e:
            console.print(f"[red]error:[/red] {e}", highlight=False)
            failed += 1
            continue
        if json_output:
            print(json.dumps({"image": result.path, "top": [{"class": c, "probability": p} for c, p in result.top]}))
        else:
            console.print(f"[bold]{result.path}[/bold]", highlight=False)
            for name, p in result.top:
                console.print(f"  {p:7.2%}  {name}", highlight=False)
    if failed:
        raise typer.Exit(1)


@app.command("export")
def export_cmd(
    checkpoint: str = typer.Argument(..., help=_SOURCE_HELP),
    format: str = typer.Option("onnx", help="onnx, torchscript or exported-program"),
    output: Optional[Path] = typer.Option(None, help="output file (default: MODEL_NAME.EXT in the checkpoint's folder, "
                                          "else the current one)"),
    opset: int = typer.Option(17, help="ONNX opset"),
    dynamic_size: bool = typer.Option(False, "--dynamic-size", help="ONNX: leave height and width free too "
                                      "(LeViT: attention biases computed in the graph)"),
    pretrained: bool = _PRETRAINED,
    pretrained_tag: Optional[str] = _PRETRAINED_TAG,
) -> None:
    """Write the fused model with a dynamic batch dimension (ONNX files are checked in ONNX Runtime)."""
    import importlib.util

    from .export import FORMATS, check_onnx, export

    model, _ = load_source(checkpoint, pretrained, pretrained_tag)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if dynamic_size and hasattr(model.config, "dynamic_size"):
        model = model.reconfigured(dynamic_size=True)  # the same weights serve any size
    target = output or _output_folder(checkpoint) / f"{model.model_name or 'model'}{FORMATS[format]}"
    export(model, target, format, opset=opset, dynamic_size=dynamic_size)
    h, w = model.input_hw
    console.print(f"wrote {target} ({format}, fused, dynamic batch{', height and width' if dynamic_size else ''})")
    if format == "onnx":
        if importlib.util.find_spec("onnxruntime") is None:
            console.print("onnxruntime is not installed: the file was not checked")
            return
        # other sizes: larger, non-square and odd
        sizes = [(h, w)] + ([(h + h // 2, w), (h - h // 4 + 1, w + w // 4 + 3)] if dynamic_size else [])
        for size in sizes:
            difference = check_onnx(target, model, size=size)
            console.print(f"ONNX Runtime vs PyTorch at {size[0]}x{size[1]}: max relative difference {difference:.2e}")


@app.command("quantize")
def quantize_cmd(
    checkpoint: str = typer.Argument(..., help=_SOURCE_HELP),
    calibration: Path = typer.Option(..., help="image folder: ImageNet layout (its train split) or any images"),
    images: int = typer.Option(256, min=1, help="calibration images (a seeded random subset)"),
    output: Optional[Path] = typer.Option(None, help="output file (default: MODEL_NAME_int8.onnx next to the model, "
                                          "else in the current folder)"),
    batch_size: int = typer.Option(32, min=1, help="calibration batch size"),
    pretrained: bool = _PRETRAINED,
    pretrained_tag: Optional[str] = _PRETRAINED_TAG,
) -> None:
    """Write a static int8 ONNX model (QDQ) calibrated on your images, checked against fp32."""
    from .quantize import calibration_set, quantize_static

    model, extra = load_source(checkpoint, pretrained, pretrained_tag)
    target = output or _output_folder(checkpoint) / f"{model.model_name or 'model'}_int8.onnx"
    # two more batches, held out from calibration, to compare the int8 model with fp32
    data = calibration_set(calibration, model, images + 2 * batch_size, batch_size, crop_pct=extra.get("crop_pct"))
    held_out = 2 if len(data.batches) > 2 else 0
    calibrate = data.batches[:len(data.batches) - held_out]
    try:
        int8 = quantize_static(model, calibrate, target)
    except ImportError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    skipped = f", {len(data.skipped)} unreadable skipped" if data.skipped else ""
    console.print(f"wrote {target} (static int8, QDQ; calibrated on {sum(len(b) for b in calibrate)} images{skipped})")
    x = torch.cat(data.batches[-held_out:] if held_out else calibrate)
    with torch.inference_mode():
        reference, got = fuse(model)(x), int8(x)
    difference = ((got - reference).abs().max() / reference.abs().max()).item()
    agreement = (got.argmax(1) == reference.argmax(1)).float().mean().item()
    console.print(f"int8 vs fp32 on {len(x)} {'held-out' if held_out else 'calibration'} images: top-1 agreement "
                  f"{agreement:.1%}, max relative difference {difference:.2e}")


@app.command("benchmark")
def benchmark_cmd(
    models: Optional[list[str]] = typer.Argument(None, help="models (default: the five LeViTs)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    threads: int = typer.Option(1, help="CPU threads (the paper: 1)"),
    batch: int = typer.Option(16, help="CPU batch size (the paper: 16); on GPU the largest power of two that fits"),
    precision: Optional[list[str]] = typer.Option(
        None, help="CPU: fp32 (default), bf16, int8 (dynamic), int8-static, auto; GPU: fp16 (default, the paper's "
                   "AMP), fp32, bf16 (repeatable)"),
    compare: bool = typer.Option(False, help="also measure the installed reference implementations"),
    paper_rows: bool = typer.Option(False, help="also measure the paper's other Table 3 rows (timm, traced)"),
    official: Optional[Path] = typer.Option(None, help="a clone of facebookresearch/LeViT to measure its fused models"),
    warmup: float = typer.Option(2.0, help="warm-up seconds per model"),
    seconds: float = typer.Option(6.0, "--time", help="timed seconds per model"),
    rounds: int = typer.Option(3, help="timed rounds, interleaved across models"),
    tuned_allocator: bool = typer.Option(False, help="keep freed memory in glibc's heap for every model (no page faults)"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
    plot: Optional[Path] = typer.Option(None, help="write the speed-accuracy figure (PNG)"),
    pretrained: bool = typer.Option(False, "--pretrained", help="measure the models with their published weights"),
) -> None:
    """Throughput (images/s), batch-1 latency and share of the machine's matrix-multiply bound, side by side."""
    import json
    import warnings

    from .bench import Plan, benchmark
    from .bench.candidates import (CPU_PRECISIONS, GPU_PRECISIONS, hybridvit_candidates, paper_candidates,
                                   reference_candidates)
    from .bench.throughput import paired_ratio
    from .figures import plot_speed_accuracy

    on_gpu = torch.device(device).type == "cuda"
    allowed = GPU_PRECISIONS if on_gpu else CPU_PRECISIONS
    precisions = precision or ["fp16" if on_gpu else "fp32"]
    for p in precisions:
        if p not in allowed:
            raise ValueError(f"--precision on {device} must be one of {', '.join(allowed)}, got {p!r}")
    names = models or list_models("levit_*")
    for name in names:
        get_model_info(name)
    if not on_gpu:
        precisions = _drop_slow_bf16(precisions, threads, json_output)
    # references run as shipped: once on CPU (fp32), at each precision's autocast on GPU
    reference_precisions = precisions if on_gpu else ["fp32"]
    with warnings.catch_warnings(), _progress_bar(json_output) as progress:
        for category in (DeprecationWarning, FutureWarning, UserWarning):  # other libraries' notices
            warnings.simplefilter("ignore", category)
        candidates = []
        for name in names:
            candidates += [c for p in precisions for c in hybridvit_candidates(name, p, device, pretrained)]
            if compare:
                candidates += [c for p in reference_precisions for c in reference_candidates(name, device, official, p)]
        if paper_rows:
            candidates += [c for p in reference_precisions for c in paper_candidates(device, p)]
        rows, machine = benchmark(candidates, device, threads, Plan(batch, warmup, seconds, rounds), progress,
                                  tuned_allocator)
    ratios = [(ours.name, ref.name, paired_ratio(ours, ref))
              for ours in rows if ours.source == "hybridvit"
              for ref in rows if ref.source != "hybridvit" and ref.model == ours.model]
    if json_output:
        print(json.dumps({"machine": machine, "results": [dataclasses.asdict(r) for r in rows],
                          "ratios": [{"ours": a, "reference": b, "ratio": r} for a, b, r in ratios]}))
    else:
        _print_benchmark(rows, machine, ratios)
    if plot:
        plot_speed_accuracy(rows, plot, f"{device}, {threads} thread(s)" if device == "cpu" else device)


@app.command("push")
def push_cmd(
    source: str = typer.Argument(..., help="training run folder, model folder, checkpoint.pt, or a model name with --pretrained"),
    repo: str = typer.Option(..., help="Hub repository ORG/NAME (created if needed)"),
    private: bool = typer.Option(False, help="create the repository private"),
    message: Optional[str] = typer.Option(None, help="commit message"),
    dry_run: Optional[Path] = typer.Option(None, "--dry-run", help="only write the folder that would be uploaded here"),
    pretrained: bool = _PRETRAINED,
    pretrained_tag: Optional[str] = _PRETRAINED_TAG,
) -> None:
    """Upload a model to the Hugging Face Hub with a model card (HF_TOKEN or `hf auth login`; HF_ENDPOINT for a mirror)."""
    from .publish import push_to_hub, save_for_hub

    if pretrained:  # republishing published weights (e.g. to a mirror): they carry their preprocessing
        model, extra = load_source(source, pretrained, pretrained_tag)
        target: object = model
    else:
        target, extra = source, {}
    if dry_run:
        folder = save_for_hub(target, dry_run, repo, extra)
        console.print(f"wrote {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}", highlight=False)
        return
    url = push_to_hub(target, repo, private=private, commit_message=message, extra=extra)
    console.print(f"pushed to {repo}: {url}\nload it with hybridvit.load_model(\"hf-hub:{repo}\")", highlight=False)


@app.command("experiment")
def experiment_cmd(
    name: str = typer.Argument(..., metavar="EXPERIMENT", help="grafting, levit-ablations or cvt-ablations"),
    epochs: int = typer.Option(..., help="epochs per variant"),
    output: Path = typer.Option(..., help="folder: one run per variant, results.md/.json/.png"),
    data: Optional[str] = typer.Option(None, help="ImageNet-layout folder (ROOT/train, ROOT/val) or 'digits' (default)"),
    input_size: Optional[int] = typer.Option(None, help="train and measure every variant at this size (default: "
                                             "the recipe's; the digits: 64)"),
    batch_size: Optional[int] = typer.Option(None, help="images per process (default: the recipe's)"),
    recipe: str = typer.Option("auto", help="auto, levit, cvt, deit or tiny (one recipe for every variant)"),
    seed: int = typer.Option(0),
    teacher: Optional[str] = typer.Option(None, help="distil every variant that has a distillation head from this "
                                          "teacher (model name or run folder); A4 never is"),
    only: Optional[str] = typer.Option(None, help="comma-separated variants to run (default: all)"),
    jobs: int = typer.Option(1, help="variants trained side by side, each in its own process"),
    workers: int = typer.Option(2, help="data loading processes per training process"),
    bench_seconds: float = typer.Option(3.0, help="timed seconds per variant for the throughput"),
    quiet: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Rerun one of the papers' tables on your data: train, evaluate and time every variant (resumable)."""
    from .experiments import ExperimentInterrupted, Settings, run_experiment

    settings = Settings(name, None if data == "digits" else data, epochs, input_size, batch_size, recipe, seed, teacher)
    try:
        rows = run_experiment(settings, output, jobs=jobs, only=only.split(",") if only else None, workers=workers,
                              bench_seconds=bench_seconds, progress=not quiet,
                              log=lambda m: console.print(m, highlight=False))
    except ExperimentInterrupted as e:
        console.print(f"[yellow]stopped:[/yellow] {e}", highlight=False)
        raise typer.Exit(130) from None
    if rows is not None:
        console.print((output / "results.md").read_text(), highlight=False)


@app.command("plot")
def plot_cmd(
    kind: str = typer.Argument(..., metavar="KIND",
                               help="attention-bias, attention, filters, block-timings, curves or speed-accuracy"),
    source: str = typer.Argument(..., metavar="MODEL_OR_RUN", help="model name (random weights), model/run folder or "
                                 "checkpoint.pt; curves: run folder or metrics.jsonl; speed-accuracy: benchmark JSON"),
    output: Path = typer.Option(..., help="PNG to write (block-timings also writes its table as .md beside it)"),
    image: Optional[Path] = typer.Option(None, help="attention: image file (default: a synthetic picture)"),
    query: Optional[tuple[int, int]] = typer.Option(None, help="attention: query pixel Y X (default: the centre)"),
    layer: Optional[list[int]] = typer.Option(None, help="attention: the attention call (default: the last; negative "
                                              "counts back); attention-bias: layers to show (repeatable; default all)"),
    batch_size: int = typer.Option(16, help="block-timings: images per forward"),
    iterations: int = typer.Option(10, help="block-timings: timed forwards (after 2 warm-up ones)"),
    threads: Optional[int] = typer.Option(None, help="block-timings: CPU threads (default: torch's)"),
) -> None:
    """The papers' figures for any model or checkpoint, and a run's or benchmark's plots."""
    from .figures import BlockTimings, make_figure
    from .optimize import tune_cpu_allocator

    if kind == "block-timings":
        # glibc's page faults on fresh activations made the stem's time vary 2.2-3.5 ms/image between runs
        tune_cpu_allocator()
    result = make_figure(kind, source, output, image=image, query=query, layers=layer or None,
                         batch_size=batch_size, iterations=iterations, threads=threads)
    if isinstance(result, BlockTimings):
        console.print(result.markdown(), highlight=False)
        console.print(f"wrote {result.path} and {result.path.with_suffix('.md')}", highlight=False)
    else:
        console.print(f"wrote {result}", highlight=False)


def _output_folder(source: str) -> Path:
    """Where a command writes next to a local model; the current folder for Hub and published weights."""
    path = Path(source)
    if not path.exists():
        return Path.cwd()
    return path if path.is_dir() else path.parent


def _drop_slow_bf16(precisions: list[str], threads: int, quiet: bool) -> list[str]:
    """bf16 rows on a CPU whose bf16 products run at under a quarter of fp32's (a fallback
    path, minutes per row) are left out, with the reason."""
    from .machine import matmul_rates

    if "bf16" not in precisions:
        return precisions
    torch.set_num_threads(threads)
    rates = matmul_rates()
    if rates["bf16"] >= rates["fp32"] / 4:
        return precisions
    if not quiet:
        console.print(f"[yellow]bf16 left out: this CPU multiplies bf16 matrices at {rates['bf16']:.1f} GFLOP/s "
                      f"against {rates['fp32']:.1f} in fp32[/yellow]", highlight=False)
    return [p for p in precisions if p != "bf16"]


def _progress_bar(quiet: bool):
    """A live bar (on stderr, so --json output stays clean) that the benchmark advances."""
    import contextlib

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if quiet:
        return contextlib.nullcontext(None)

    @contextlib.contextmanager
    def bar():
        with Progress(TextColumn("{task.description:<60}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task("benchmark", total=None)
            yield lambda description, done, total: progress.update(task, description=description, completed=done,
                                                                    total=total)
    return bar()


def _print_benchmark(rows: list, machine: dict, ratios: list[tuple[str, str, float]]) -> None:
    rates = machine.pop("matmul_gflops", {})
    table = Table(caption=", ".join(f"{k} {v}" for k, v in machine.items()))
    for col in ("model", "source", "batch", "images/s", "of bound", "latency p50 (ms)", "p90 (ms)", "peak GPU MB",
                "top-1 (paper)"):
        table.add_column(col, justify="left" if col in ("model", "source") else "right", no_wrap=True)
    for r in rows:
        table.add_row(r.name, r.source, str(r.batch), f"{r.images_per_second:,.1f}", _fmt(r.bound_share, ".0%"),
                      f"{r.latency_ms_median:.2f}", f"{r.latency_ms_p90:.2f}", _fmt(r.peak_memory_mb),
                      _fmt(r.paper_top1, ".1f"))
    console.print(table)
    if rates:
        console.print("matrix-multiply bound (GFLOP/s, this run): "
                      + ", ".join(f"{k} {_fmt(v, '.1f')}" for k, v in rates.items()), highlight=False)
    for a, b, r in ratios:
        console.print(f"{a} / {b}: {r:.2f}x", highlight=False)


def _bare_resume_means_yes(argv: list[str]) -> list[str]:
    """``train --resume`` alone stands for ``--resume yes`` (typer options cannot take an optional value)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--resume" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out[i] = "--resume=yes"
    return out


def main() -> None:
    try:
        app(args=_bare_resume_means_yes(sys.argv[1:]))
    except (ValueError, TypeError, FileNotFoundError) as e:  # user errors (incl. DataError): a message, not a traceback
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise SystemExit(2) from None
