"""On-device programs against ONNX Runtime on this CPU (XNNPACK standing in for an ARM core):
latency at batch 1, the model's input size, fused, random weights (speed does not depend on them;
int8 is calibrated on random images here, its agreement is the exporter's check on a trained
model). Each model's programs are exported once; each thread count is measured in a process of
its own, and each program too (ExecuTorch's thread pool is set before its program loads, and one
runtime's idle workers cannot slow another): 3 x 100 calls after 10 warm-up calls per process,
3 processes per program alternated across programs, the median reported.

LiteRT needs litert-torch, which lives in its own environment: run the script with that
environment's Python to get the LiteRT rows (it sees the project's packages too).

    .venv-litert/bin/python scripts/benchmark_edge.py levit_128s levit_256 cvt_13 --threads 1 2 \\
        --json docs/bench_edge_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROGRAMS = {"onnxruntime": ".onnx", "onnxruntime_int8": ".onnx", "executorch": ".pte", "executorch_int8": ".pte",
            "litert": ".tflite", "litert_int8": ".tflite"}  # ONNX Runtime first: its file gives the input shape


def export(name: str, folder: Path) -> dict:
    """Every program of ``name`` into ``folder``; what each left outside its delegate."""
    import torch

    import hybridvit
    from hybridvit.fusion import fuse
    from hybridvit.inference.deploy import decompose_activations, for_device
    from hybridvit.inference.edge import ImageClassifierProgram, executorch_program, litert_outside, litert_program
    from hybridvit.inference.export import onnx_bytes
    from hybridvit.inference.quantize import qdq_onnx
    from hybridvit.registry import get_model_info

    torch.manual_seed(0)
    fused = fuse(hybridvit.create_model(name).eval())
    device, info = for_device(fused), get_model_info(name)
    x = torch.randn(1, 3, *fused.input_hw)
    calibration = [torch.randn(4, 3, *fused.input_hw)]
    outside = {}
    for label, batches in (("executorch", None), ("executorch_int8", calibration)):
        program, partitions, left = executorch_program(device, x, batches)
        (folder / f"{label}.pte").write_bytes(program)
        outside[label] = {"partitions": partitions, "outside": left}
    if importlib.util.find_spec("litert_torch") is not None:
        nhwc = torch.zeros(1, *fused.input_hw, 3)
        pixels = [torch.rand(4, *fused.input_hw, 3) * 255]
        for label, model, batches in (("litert", device, None),
                                      ("litert_int8", decompose_activations(copy.deepcopy(device)), pixels)):
            program = litert_program(ImageClassifierProgram(model, list(info.mean), list(info.std), True).eval(), nhwc,
                                     batches)
            (folder / f"{label}.tflite").write_bytes(program)
            partitions, left = litert_outside(program)
            outside[label] = {"partitions": partitions, "outside": left}
    onnx = onnx_bytes(fused, x)
    (folder / "onnxruntime.onnx").write_bytes(onnx)
    (folder / "onnxruntime_int8.onnx").write_bytes(qdq_onnx(onnx, calibration))
    return outside


def measure(folder: Path, threads: int, label: str) -> float:
    """Milliseconds per call of one program in ``folder`` at ``threads`` threads (median of 3 x 100
    calls, after 10), alone in this process: one runtime's idle workers cannot slow another's."""
    import executorch.extension.pybindings.portable_lib as portable
    import onnx
    import torch

    portable._unsafe_reset_threadpool(threads)  # before the program loads: its delegate takes the pool then
    torch.set_num_threads(threads)
    from hybridvit.inference.edge import ProgramRunner
    from hybridvit.inference.export import onnxruntime_session

    dims = onnx.load(str(folder / "onnxruntime.onnx"), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value or 1 for d in dims]  # the batch dimension is free: 1
    path = folder / f"{label}{PROGRAMS[label]}"
    if path.suffix == ".onnx":
        session, x = onnxruntime_session(str(path), threads), torch.randn(shape).numpy()
        call = lambda: session.run(None, {"images": x})  # noqa: E731
    else:
        runner = ProgramRunner.from_file(path, threads)
        x = torch.randn(shape) if path.suffix == ".pte" else torch.rand(shape) * 255
        call = lambda: runner.one(x)  # noqa: E731
    times = []
    for _ in range(3):
        for _ in range(10):
            call()
        start = time.perf_counter()
        for _ in range(100):
            call()
        times.append((time.perf_counter() - start) * 10)  # ms per call
    return statistics.median(times)


def agreement(model_dir: Path, data: Path, count: int) -> dict:
    """int8 programs of a trained 32x32 digits model (``model_dir``; ``hybridvit train --input-size
    32``), calibrated on 300 images of ``data`` (ImageNet layout), against eager PyTorch on the first
    ``count`` validation digits: top-1 agreement and largest difference, per format."""
    import torch

    import hybridvit
    from hybridvit.data import build_datasets, eval_transform
    from hybridvit.fusion import fuse
    from hybridvit.inference.edge import ProgramRunner, export_edge, to_pixels
    from hybridvit.inference.quantize import calibration_set
    from hybridvit.registry import get_model_info

    model = hybridvit.load_model(model_dir)
    digits = build_datasets(None, with_train=False)
    digits.prepare((32, 32), None, eval_transform(get_model_info("levit_128s"), (32, 32), crop_pct=1.0))
    images = torch.stack([digits.val[i][0] for i in range(count)])
    with torch.no_grad():
        eager = fuse(model)(images)
    calibration = calibration_set(data, model, 300, 16).batches
    info, out = get_model_info("levit_128s"), {}
    formats = ["executorch"] + (["litert"] if importlib.util.find_spec("litert_torch") else [])
    with tempfile.TemporaryDirectory() as tmp:
        for format in formats:
            path = Path(tmp) / f"digits{'.pte' if format == 'executorch' else '.tflite'}"
            export_edge(model, path, format, images=images, calibration=calibration)
            inputs = images if format == "executorch" else to_pixels(images, list(info.mean), list(info.std))
            got, reference = ProgramRunner.from_file(path)(inputs), eager if format == "executorch" else eager.softmax(1)
            out[format] = {"agreement": (got.argmax(1) == reference.argmax(1)).float().mean().item(), "images": count,
                           "max_difference": (got - reference).abs().max().item()}
    return out


def markdown(rows: list[dict]) -> str:
    """The rows as docs/benchmarks.md shows them: ms (ratio to ONNX Runtime fp32) per program."""
    labels = [label for label in PROGRAMS if label in rows[0]["ms"]]
    lines = ["| model | threads | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for row in rows:
        cells = [f"{row['ms'][k]:.2f} ms ({row['vs_onnxruntime_fp32'][k]:.2f}x)" for k in labels]
        lines.append(f"| {row['model']} | {row['threads']} | " + " | ".join(cells) + " |")
    first: dict[str, dict] = {}
    for row in rows:
        first.setdefault(row["model"], row)  # one row per model, for its file sizes
    for model, row in first.items():
        lines.append(f"| {model}: file size | | " + " | ".join(f"{row['size_mib'][k]:.1f} MiB" for k in labels) + " |")
    return "\n".join(lines)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--rounds", type=int, default=3, help="processes per program, alternated")
    parser.add_argument("--table", help="print the Markdown table of a JSON file this script wrote, and stop")
    parser.add_argument("--agreement", nargs=2, metavar=("MODEL", "DATA"),
                        help="int8 agreement of a trained digits model on the 360 validation digits, and stop")
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)  # export NAME DIR | measure DIR THREADS LABEL
    args = parser.parse_args()
    if args.agreement:
        print(json.dumps(agreement(Path(args.agreement[0]), Path(args.agreement[1]), 360)))
        return
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())["rows"]))
        return
    if args.one:
        result = export(args.one[1], Path(args.one[2])) if args.one[0] == "export" else measure(
            Path(args.one[1]), int(args.one[2]), args.one[3])
        print(json.dumps(result))
        return

    def child(*one: str) -> dict:
        done = subprocess.run([sys.executable, __file__, "-", "--one", *one], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        return json.loads(done.stdout.strip().splitlines()[-1])

    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            delegation = child("export", name, tmp)
            sizes = {p.stem: p.stat().st_size / 2**20 for p in Path(tmp).iterdir()}
            labels = [label for label, suffix in PROGRAMS.items() if (Path(tmp) / f"{label}{suffix}").exists()]
            for threads in args.threads:
                runs: dict[str, list[float]] = {label: [] for label in labels}
                for _ in range(args.rounds):
                    for label in labels:
                        runs[label].append(child("measure", tmp, str(threads), label))
                ms = {label: statistics.median(v) for label, v in runs.items()}
                row = {"model": name, "threads": threads, "cpu": _cpu(), "ms": ms, "size_mib": sizes,
                       "delegation": delegation,
                       "vs_onnxruntime_fp32": {k: v / ms["onnxruntime"] for k, v in ms.items()}}
                rows.append(row)
                print(f"{name:11s} {threads} thread(s): " + ", ".join(
                    f"{k} {v:.2f} ms ({row['vs_onnxruntime_fp32'][k]:.2f}x, {sizes[k]:.1f} MiB)" for k, v in ms.items()),
                    flush=True)
        print(f"{name:11s} delegation: " + ", ".join(
            f"{k} {d['partitions']} partition(s), {sum(d['outside'].values())} op(s) outside" for k, d in
            delegation.items()), flush=True)
    if args.json:
        meta = {"machine": _cpu(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
                "command": "python " + " ".join(sys.argv)}
        for module in ("torch", "executorch", "ai_edge_litert", "litert_torch", "onnxruntime"):
            try:
                meta[module] = __import__(module).__version__
            except (ImportError, AttributeError):
                meta[module] = None
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
