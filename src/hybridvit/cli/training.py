"""``train``, ``eval`` and ``experiment``."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import typing
from pathlib import Path
from typing import Optional

import typer

from ..train.config import TrainConfig
from .common import PRETRAINED, PRETRAINED_TAG, SOURCE_HELP, console, print_error


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


@_dataclass_command(TrainConfig, skip=frozenset({"scale"}))
def train_cmd(cfg: TrainConfig) -> None:
    """Train a model (default: levit_128s on the built-in digits); also runs under torchrun."""
    from ..allocator import tune_cpu_allocator
    from ..train import TrainingError, train

    tune_cpu_allocator()  # the command owns its process: freed activations stay in the heap (5-8% a bf16 CPU step)
    try:
        result = train(cfg)
    except TrainingError as e:  # the run diverged: its last good checkpoint is kept
        print_error(str(e))
        raise typer.Exit(1) from None
    if result.get("interrupted"):
        raise typer.Exit(130)


def eval_cmd(
    checkpoint: str = typer.Option(..., help=SOURCE_HELP),
    data: Optional[str] = typer.Option(None, help="validation images in any layout train reads (an ImageNet-layout "
                                       "folder: its val split; a run's --val-split: the images it held out); "
                                       "default: digits"),
    path_column: Optional[str] = typer.Option(None, help="manifests and tables: the column of image paths"),
    label_column: Optional[str] = typer.Option(None, help="manifests and tables: the column of labels"),
    pretrained: bool = PRETRAINED,
    pretrained_tag: Optional[str] = PRETRAINED_TAG,
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
    import os

    from ..train import evaluate
    from ..train.config import input_hw

    from ..data import DataSpec

    spec = DataSpec(data, path_column=path_column, label_column=label_column)
    metrics = evaluate(checkpoint, spec, batch_size=batch_size, workers=workers, device=device, amp=amp, fused=fused,
                       input_size=input_hw(input_size, input_width), bias_resampling=bias_resampling, pretrained=pretrained, pretrained_tag=pretrained_tag)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    names = ("map", "f1") if "map" in metrics else ("top1", "top5")  # a multi-label model: mAP and F1
    if json_output:
        print(json.dumps({k: metrics[k] for k in (*names, "loss", "images", "skipped")}))
    else:
        label = {"top1": "top-1", "top5": "top-5", "map": "mAP", "f1": "F1"}
        console.print(f"{label[names[0]]} {metrics[names[0]]:.2f}%  {label[names[1]]} {metrics[names[1]]:.2f}%  "
                      f"loss {metrics['loss']:.4f}  on {metrics['images']} images ({metrics['skipped']} unreadable skipped)")


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
    from ..experiments import ExperimentInterrupted, Settings, run_experiment

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
