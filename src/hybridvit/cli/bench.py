"""``benchmark``: throughput, latency and share of the matrix-multiply bound, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .common import console, fmt


def benchmark_cmd(
    models: Optional[list[str]] = typer.Argument(None, help="models (default: the five LeViTs), or files export "
                                                 "wrote (.onnx, .pte, .tflite), timed in their own runtimes"),
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
    calibration: Optional[Path] = typer.Option(None, help="int8-static: images to calibrate every int8 row on, ours "
                                               "and NNCF's (the train split of an ImageNet-layout folder, or a "
                                               "folder of images; default: 256 photos made offline)"),
) -> None:
    """Throughput (images/s), batch-1 latency and share of the machine's matrix-multiply bound, side by side."""
    import dataclasses
    import json
    import warnings

    import torch

    from ..bench import Plan, benchmark
    from ..bench.candidates import (CPU_PRECISIONS, GPU_PRECISIONS, Calibration, file_candidate,
                                    hybridvit_candidates, paper_candidates, reference_candidates)
    from ..bench.throughput import paired_ratio
    from ..checks import check_output_file, check_range
    from ..figures import plot_speed_accuracy
    from ..registry import get_model_info, list_models

    check_range("threads", threads, 1)
    plan = Plan(batch, warmup, seconds, rounds)  # checks its values
    if plot:
        check_output_file(plot)
    on_gpu = torch.device(device).type == "cuda"
    allowed = GPU_PRECISIONS if on_gpu else CPU_PRECISIONS
    precisions = precision or ["fp16" if on_gpu else "fp32"]
    for p in precisions:
        if p not in allowed:
            raise ValueError(f"--precision on {device} must be one of {', '.join(allowed)}, got {p!r}")
    if calibration is not None:
        if "int8-static" not in precisions:
            raise ValueError("--calibration is for --precision int8-static")
        if not calibration.is_dir():
            raise ValueError(f"--calibration {calibration} is not a folder of images")
    names = models or list_models("levit_*")
    files = [n for n in names if n not in list_models() and Path(n).suffix.lower() in (".onnx", ".pte", ".tflite")]
    names = [n for n in names if n not in files]
    for name in names:
        get_model_info(name)
    if not on_gpu:
        precisions = _drop_slow_bf16(precisions, threads, json_output)
    # references run as shipped: once on CPU (fp32), at each precision's autocast on GPU; beside
    # static int8 also NNCF's int8 of the official and transformers models, beside auto OpenVINO at
    # its default precision
    float_references = precisions if on_gpu else ["fp32"]
    reference_precisions = float_references + [p for p in precisions if p in ("int8-static", "auto") and not on_gpu]
    images = Calibration(calibration)  # one set per model, shared by every int8-static row
    with warnings.catch_warnings(), _progress_bar(json_output) as progress:
        for category in (DeprecationWarning, FutureWarning, UserWarning):  # other libraries' notices
            warnings.simplefilter("ignore", category)
        candidates = [file_candidate(f) for f in files]  # exported files, as they are
        for name in names:
            candidates += [c for p in precisions
                           for c in hybridvit_candidates(name, p, device, pretrained, images, batch)]
            if compare:
                candidates += [c for p in reference_precisions
                               for c in reference_candidates(name, device, official, p, images)]
        if paper_rows:
            candidates += [c for p in float_references for c in paper_candidates(device, p)]
        rows, machine = benchmark(candidates, device, threads, plan, progress, tuned_allocator)
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


def _drop_slow_bf16(precisions: list[str], threads: int, quiet: bool) -> list[str]:
    """bf16 rows on a CPU whose bf16 products run at under a quarter of fp32's (a fallback
    path, minutes per row) are left out, with the reason."""
    from ..inference.machine import matmul_rates, torch_threads

    if "bf16" not in precisions:
        return precisions
    with torch_threads(threads):  # the rates at the benchmark's thread count; the caller's count kept
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
        table.add_row(r.name, r.source, str(r.batch), f"{r.images_per_second:,.1f}", fmt(r.bound_share, ".0%"),
                      f"{r.latency_ms_median:.2f}", f"{r.latency_ms_p90:.2f}", fmt(r.peak_memory_mb),
                      fmt(r.paper_top1, ".1f"))
    console.print(table)
    if rates:
        console.print("matrix-multiply bound (GFLOP/s, this run): "
                      + ", ".join(f"{k} {fmt(v, '.1f')}" for k, v in rates.items()), highlight=False)
    for a, b, r in ratios:
        console.print(f"{a} / {b}: {r:.2f}x", highlight=False)


def profile_cmd(
    models: list[str] = typer.Argument(..., help="registered models, e.g. levit_128s cvt_13"),
    precision: Optional[list[str]] = typer.Option(None, help="fp32, bf16 (default), int8 (NNCF's; repeatable)"),
    threads: int = typer.Option(1, help="CPU threads"),
    batch: int = typer.Option(16, help="batch size (compiled with fixed shapes, as predict runs it)"),
    runs: int = typer.Option(20, help="profiled runs (each node's median is kept)"),
    calibration: Optional[Path] = typer.Option(None, help="int8: images to calibrate on (default: photos made "
                                               "offline)"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Where each model's time goes in OpenVINO, per op type and kernel (its per-node counters)."""
    import dataclasses
    import json

    import torch

    from ..bench import machine_info
    from ..bench.candidates import Calibration
    from ..bench.profile import PRECISIONS, profile_openvino
    from ..checks import check_range
    from ..inference.runners import openvino_available
    from ..registry import get_model_info

    for value, name in ((threads, "threads"), (batch, "batch"), (runs, "runs")):
        check_range(name, value, 1)
    precisions = precision or ["bf16"]
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {p!r}")
    for name in models:
        get_model_info(name)
    if not openvino_available():
        raise ImportError("profiling needs OpenVINO: pip install hybridvit[openvino]")
    images = Calibration(calibration)
    profiles = [profile_openvino(name, p, batch, threads, runs, images.of(name)) for name in models for p in precisions]
    machine = machine_info(torch.device("cpu"), threads)
    if json_output:
        print(json.dumps({"machine": machine, "profiles": [dataclasses.asdict(p) for p in profiles]}))
        return
    for p in profiles:
        table = Table(title=f"{p.model}, {p.precision}, batch {p.batch}, {p.threads} thread(s): {p.ms:.2f} ms per "
                            f"batch ({p.images_per_second:,.0f} images/s)")
        for col in ("op type", "ms", "share", "nodes", "kernels (ms)"):
            table.add_column(col, justify="left" if col in ("op type", "kernels (ms)") else "right")
        for op in p.ops:
            kernels = ", ".join(f"{k} {v:.2f}" for k, v in sorted(op.kernels.items(), key=lambda kv: -kv[1]))
            table.add_row(op.op_type, f"{op.ms:.2f}", f"{op.ms / p.ms:.1%}", str(op.nodes), kernels)
        console.print(table)
    console.print(", ".join(f"{k} {v}" for k, v in machine.items()), highlight=False)
