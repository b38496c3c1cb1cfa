"""The papers' controlled experiments, one command per table, on any data.

``grafting`` (LeViT §3, Table 1), ``levit-ablations`` (LeViT Table 5) and ``cvt-ablations``
(CvT Tables 5-8). ``run_experiment`` trains every variant of a table with one recipe and seed
(each variant an ordinary resumable run in ``OUTPUT/<variant>``), then measures them all together
with the benchmark's method (one thread, batch 16, interleaved rounds) and writes
``results.md``, ``results.json`` and ``results.png`` with the paper's figures beside ours.
Interrupted, it picks up where it stopped: finished variants are kept, the running one resumes
from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .api import create_model
from .bench.candidates import eager
from .bench.throughput import Candidate, Plan, benchmark
from .checkpoints import load_trained
from .figures import plot_experiment
from .flops import count_macs, count_params
from .fusion import fuse
from .inference.machine import torch_threads
from .checks import check_range
from .train import TrainConfig, train
from .train.config import RANGES
from .train.distributed import DistInfo, cleanup_distributed, init_distributed


@dataclass(frozen=True)
class Variant:
    """One row of a paper's table: a registered model with config changes, and the paper's figures."""

    name: str  # folder name and table label
    change: str  # what differs from the reference model, in the paper's words
    model: str
    model_args: dict[str, Any] = field(default_factory=dict)
    paper_params: float | None = None
    paper_macs: float | None = None
    paper_top1: float | None = None
    teacher: bool = True  # trained with the experiment's teacher, when one is given


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    variants: tuple[Variant, ...]
    count_args: dict[str, Any] = field(default_factory=dict)  # the config the paper's counts are for
    notes: tuple[str, ...] = ()


def _graft(stages: int, layers: int, params: float, conv: float, transformer: float, top1: float) -> Variant:
    return Variant(f"resnet{stages}-deit{layers}", f"{stages} ResNet-50 stages + {layers} DeiT-S layers",
                   "graft_resnet50_deit_s", dict(resnet_stages=stages, deit_layers=layers), params,
                   conv + transformer, top1, teacher=layers > 0)  # no token to distil without layers


def _levit(name: str, change: str, params: float, macs: float, top1: float) -> Variant:
    args = {} if name == "base" else {"ablation": name}
    return Variant(name, change, "levit_128s", args, params, macs, top1, teacher=name != "A4")


def _cvt(name: str, change: str, top1: float, macs: float | None = None, **args: Any) -> Variant:
    return Variant(name, change, "cvt_13", args, 20e6 if not args or "stride_kv" in args else None, macs, top1,
                   teacher=False)


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    Experiment("grafting", "LeViT paper Table 1: ResNet-50 stages grafted under DeiT-S layers", (
        _graft(0, 12, 22.0e6, 57e6, 4519e6, 79.9),
        _graft(1, 9, 17.1e6, 820e6, 3389e6, 80.6),
        _graft(2, 6, 13.1e6, 1876e6, 2260e6, 80.9),
        _graft(3, 3, 15.1e6, 3385e6, 1130e6, 80.1),
        _graft(4, 0, 25.5e6, 4119e6, 0, 78.4),
    ), notes=(
        "Paper: DeiT recipe, 300 epochs, ImageNet; params include a DeiT distillation head (see models/graft.py).",
        "The 4/0 row is a plain ResNet-50: it has no token to distil, so it trains without the teacher.",
    )),
    Experiment("levit-ablations", "LeViT paper Table 5: ablations of LeViT-128S", (
        _levit("base", "LeViT-128S", 7.4e6, 305e6, 71.9),
        _levit("A1", "without pyramid: one stage of depth 11 at 14x14, D=19, N=3, C=114", 1.2e6, 308e6, 56.5),
        _levit("A2", "without PatchConv: one 16x16 stride-16 convolution", 7.4e6, 275e6, 65.3),
        _levit("A3", "without BatchNorm: pre-norm LayerNorm", 7.4e6, 305e6, 66.6),
        _levit("A4", "without distillation", 7.4e6, 305e6, 69.7),
        _levit("A5", "without attention bias: DeiT-style position embedding", 7.4e6, 305e6, 70.4),
        _levit("A6", "without wider blocks: D=30, MLP ratio 4, C=120/180/240", 6.2e6, 312e6, 70.9),
        _levit("A7", "without attention activation", 7.4e6, 305e6, 71.1),
    ), count_args={"distillation": False}, notes=(
        "Paper: 100 epochs on ImageNet with distillation (A4 without); params counted without the "
        "distillation head, as the table's 7.4M for the base (7.8M with it).",
        "Without --teacher no variant is distilled: A4 then differs from the base only by its missing second head.",
    )),
    Experiment("cvt-ablations", "CvT paper Tables 5-8: ablations of CvT-13", (
        _cvt("base", "CvT-13: conv token embedding, conv projection, k/v stride 2, no position embedding",
             81.6, 4.53e9),
        _cvt("pos-first", "position embedding in the first stage (Table 5)", 81.4, pos_embed=(True, False, False)),
        _cvt("pos-last", "position embedding in the last stage (Table 5)", 81.4, pos_embed=(False, False, True)),
        _cvt("pos-every", "position embedding in every stage (Table 5)", 81.5, pos_embed=(True, True, True)),
        _cvt("patch-embed", "non-overlapping patch embedding, no position embedding (Table 6)", 80.7,
             patch_size=(4, 2, 2), patch_padding=(0, 0, 0)),
        _cvt("patch-embed-pos", "non-overlapping patch embedding + position embedding (Table 6)", 81.1,
             patch_size=(4, 2, 2), patch_padding=(0, 0, 0), pos_embed=(True, True, True)),
        _cvt("kv-stride-1", "key/value projection stride 1 (Table 7)", 82.3, 6.55e9, stride_kv=1),
        _cvt("linear-proj", "linear projection in every stage (Table 8)", 80.6, conv_proj=(False, False, False)),
        _cvt("conv-proj-1", "convolutional projection in stage 1 only (Table 8)", 80.8,
             conv_proj=(True, False, False)),
        _cvt("conv-proj-1-2", "convolutional projection in stages 1-2 (Table 8)", 81.0,
             conv_proj=(True, True, False)),
    ), notes=(
        "Paper: 300 epochs on ImageNet. The base row is the reference of all four tables (81.6).",
        "Table 6's position embedding is taken to be in every stage (the paper does not say which).",
    )),
)}


def get_experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise ValueError(f"unknown experiment {name!r}; choose {', '.join(EXPERIMENTS)}") from None


@dataclass
class Settings:
    """What every variant of one experiment folder shares (saved as ``experiment.json``)."""

    experiment: str
    data: str | None
    epochs: int
    input_size: int | None = None
    batch_size: int | None = None
    recipe: str = "auto"
    seed: int = 0
    teacher: str | None = None

    def __post_init__(self) -> None:  # before the folder is made: the options every variant's run gets
        for option in ("epochs", "input_size", "batch_size"):
            check_range(option, getattr(self, option), **RANGES[option])


class ExperimentInterrupted(RuntimeError):
    """A variant was stopped (Ctrl-C, SIGTERM); run the same command again to continue."""


def run_experiment(settings: Settings, output: str | Path, jobs: int = 1, only: list[str] | None = None,
                   workers: int = 2, bench_seconds: float = 3.0, progress: bool = True,
                   log: Callable[[str], None] = print) -> list[dict[str, Any]] | None:
    """Train, measure and tabulate every variant (or those ``only`` names); returns the rows on the
    main process (``None`` on the others under torchrun). ``jobs`` trains variants in parallel
    processes, each with its share of the CPU threads."""
    check_range("jobs", jobs, 1)
    check_range("workers", workers, 0)
    check_range("bench_seconds", bench_seconds, 0, low_open=True)  # measured after training: checked first
    experiment = get_experiment(settings.experiment)
    variants = _select(experiment, only)
    output = Path(output)
    _check_settings(settings, output)
    dist = init_distributed("cuda" if torch.cuda.is_available() else "cpu")
    if dist.enabled and jobs > 1:
        raise ValueError("--jobs runs variants side by side in one process each; under torchrun use --jobs 1")
    try:
        _train_variants(variants, settings, output, jobs, workers, progress, dist, log)
    finally:
        cleanup_distributed()
    if not dist.is_main:
        return None
    rows = _measure(experiment, variants, settings, output, bench_seconds, log)
    write_report(experiment, rows, settings, output)
    log(f"wrote {output / 'results.md'} and {output / 'results.png'}")
    return rows


def _select(experiment: Experiment, only: list[str] | None) -> list[Variant]:
    if not only:
        return list(experiment.variants)
    names = {v.name for v in experiment.variants}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ValueError(f"{experiment.name} has no variant(s) {unknown}; variants: {', '.join(sorted(names))}")
    return [v for v in experiment.variants if v.name in only]


def _check_settings(settings: Settings, output: Path) -> None:
    """One folder, one set of settings: a rerun with others would mix incomparable rows."""
    path = output / "experiment.json"
    wanted = dataclasses.asdict(settings)
    if path.exists():
        found = json.loads(path.read_text())
        if found != wanted:
            differ = sorted(k for k in wanted if found.get(k) != wanted[k])
            raise ValueError(f"{output} holds a run of this experiment with other settings ({', '.join(differ)}); "
                             f"rerun with the same options or choose another --output")
    elif int(os.environ.get("RANK", "0")) == 0:
        output.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(wanted, indent=2))


def train_config(variant: Variant, settings: Settings, output: Path, workers: int) -> TrainConfig:
    """The variant's run: the experiment's recipe, seed and size; resumes from its own checkpoint."""
    return TrainConfig(model=variant.model, model_args=dict(variant.model_args), data=settings.data,
                       output=str(output / variant.name), recipe=settings.recipe, epochs=settings.epochs,
                       batch_size=settings.batch_size, input_size=settings.input_size, seed=settings.seed,
                       teacher=settings.teacher if variant.teacher else None, workers=workers, resume="auto")


def _trained(output: Path, variant: Variant) -> dict[str, Any] | None:
    path = output / variant.name / "trained.json"
    return json.loads(path.read_text()) if path.exists() else None


def _train_one(cfg: TrainConfig, threads: int | None, progress: bool) -> dict[str, Any]:
    with torch_threads(threads):  # a --jobs worker: its share of the cores
        result = train(cfg, progress=progress)
    if not result.get("interrupted") and int(os.environ.get("RANK", "0")) == 0:
        (Path(cfg.output) / "trained.json").write_text(json.dumps(result, indent=2))
    return result


def _train_variants(variants: list[Variant], settings: Settings, output: Path, jobs: int, workers: int,
                    progress: bool, dist: DistInfo, log: Callable[[str], None]) -> None:
    todo = [v for v in variants if _trained(output, v) is None]
    for v in variants:
        if v not in todo and dist.is_main:
            log(f"{v.name}: trained already, kept")
    configs = [train_config(v, settings, output, workers) for v in todo]
    for v, cfg in zip(todo, configs):
        if dist.is_main and (Path(cfg.output) / "checkpoint.pt").exists():
            log(f"{v.name}: resuming from {Path(cfg.output) / 'checkpoint.pt'}")
    if jobs <= 1:
        for v, cfg in zip(todo, configs):
            if _train_one(cfg, None, progress).get("interrupted"):
                raise ExperimentInterrupted(f"{v.name} was interrupted; run the same command to continue")
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_train_one, configs, [threads] * len(configs), [False] * len(configs)))
    stopped = [v.name for v, r in zip(todo, results) if r.get("interrupted")]
    if stopped:
        raise ExperimentInterrupted(f"{', '.join(stopped)} interrupted; run the same command to continue")


def _paper_counts(experiment: Experiment, variant: Variant) -> tuple[int, int]:
    """Params and MACs at the paper's setting (224x224, 1000 classes), built on meta: no memory."""
    with torch.device("meta"):
        model = create_model(variant.model, **{**variant.model_args, **experiment.count_args})
    return count_params(model), count_macs(model)


def _measure(experiment: Experiment, variants: list[Variant], settings: Settings, output: Path,
             bench_seconds: float, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Counts, top-1 and single-thread throughput of every trained variant (throughput kept in
    ``throughput.json``; variants not measured yet are measured together, interleaved)."""
    models = {v.name: load_trained(output / v.name)[0].eval() for v in variants}
    macs_at_input = {name: count_macs(model) for name, model in models.items()}
    store = output / "throughput.json"
    measured = json.loads(store.read_text()) if store.exists() else {"rows": {}}
    missing = [v for v in variants if v.name not in measured["rows"]]
    if missing:
        log(f"measuring {len(missing)} variant(s), 1 thread, batch 16")
        candidates = [Candidate(v.name, eager(lambda m=models[v.name]: fuse(m), "cpu"), models[v.name].input_hw,
                                "hybridvit", v.model, macs=macs_at_input[v.name]) for v in missing]
        plan = Plan(batch=16, warmup_s=bench_seconds / 3, time_s=bench_seconds, rounds=3, latency_runs=1)
        rows, machine = benchmark(candidates, "cpu", threads=1, plan=plan, tuned_allocator=True)
        measured["machine"] = machine
        measured["rows"].update({r.name: r.images_per_second for r in rows})
        store.write_text(json.dumps(measured, indent=2))
    results = []
    for v in variants:
        model, trained = models[v.name], _trained(output, v)
        recipe = json.loads((output / v.name / "train_config.json").read_text())["recipe"]  # as resolved
        params, macs = _paper_counts(experiment, v)
        results.append(dict(
            variant=v.name, change=v.change, model=v.model, model_args=v.model_args, params=params, macs=macs,
            paper_params=v.paper_params, paper_macs=v.paper_macs, paper_top1=v.paper_top1,
            input_size=list(model.input_hw), macs_at_input=macs_at_input[v.name],
            images_per_second=measured["rows"][v.name], top1=trained.get("top1"), best_top1=trained.get("best_top1"),
            recipe=recipe, distilled=bool(settings.teacher and v.teacher)))
    return results


def _fmt(value: float | None, scale: float, unit: str, digits: int = 1) -> str:
    return "" if value is None else f"{value / scale:.{digits}f}{unit}"


def markdown_table(experiment: Experiment, rows: list[dict[str, Any]], settings: Settings,
                   machine: dict[str, Any] | None = None) -> str:
    """The results as a markdown table, the paper's figures beside ours."""
    h, w = rows[0]["input_size"] if rows else (0, 0)
    data = settings.data or "the built-in digits"
    lines = [f"### {experiment.title}", "",
             f"Ours: {data}, {settings.epochs} epochs at {h}x{w}, recipe {rows[0]['recipe'] if rows else '-'}, "
             f"seed {settings.seed}"
             + (f", teacher {settings.teacher}" if settings.teacher else ", no teacher") + ". Params and MACs at "
             "224x224 with 1000 classes (the paper's setting); images/s on one CPU thread at the training size"
             + (f" ({machine.get('cpu')}, torch {machine.get('torch')})" if machine else "") + ".", "",
             f"| variant | change | params | paper | MACs | paper | MACs at {h}x{w} | images/s | top-1 | paper top-1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top1 = "" if r["top1"] is None else f"{r['top1']:.2f}"
        lines.append(f"| {r['variant']} | {r['change']} | {_fmt(r['params'], 1e6, 'M', 2)} | "
                     f"{_fmt(r['paper_params'], 1e6, 'M')} | {_fmt(r['macs'], 1e6, 'M', 0)} | "
                     f"{_fmt(r['paper_macs'], 1e6, 'M', 0)} | {_fmt(r['macs_at_input'], 1e6, 'M', 1)} | "
                     f"{r['images_per_second']:,.0f} | {top1} | "
                     f"{'' if r['paper_top1'] is None else r['paper_top1']} |")
    lines += [""] + [f"- {note}" for note in experiment.notes]
    return "\n".join(lines) + "\n"


def write_report(experiment: Experiment, rows: list[dict[str, Any]], settings: Settings, output: Path) -> None:
    """``results.json``, ``results.md`` and ``results.png`` in ``output``."""
    store = output / "throughput.json"
    machine = json.loads(store.read_text()).get("machine") if store.exists() else None
    (output / "results.json").write_text(json.dumps({"settings": dataclasses.asdict(settings), "machine": machine,
                                                     "rows": rows}, indent=2))
    (output / "results.md").write_text(markdown_table(experiment, rows, settings, machine))
    plot_experiment(rows, output / "results.png", experiment.title)
