"""Training data as users keep it, timed: the same JPEGs as an ImageNet-layout folder, a CSV
manifest, Hugging Face Parquet shards (image bytes in the table) and WebDataset tars.

Two figures per layout, alternated over rounds (median reported):

- ``data``: images/s of the data path alone: one epoch of ``hybridvit train``'s own training
  loader (reading, decoding, the recipe's augmentation at the model's input size, collation),
  with ``--workers`` processes, nothing else running;
- ``train``: epoch 2's images/s of ``hybridvit train`` (data waiting included), each run its
  own process.

With ``--cold`` the page cache is dropped before each measurement, so the files come from the
disk (many small files against a few large ones); otherwise they are read from memory.

The photos are those of ``scripts/benchmark_train.py`` (500x375 and 375x500, quality 90, 10
classes); the shards are written in a shuffled order, as WebDataset advises.

    python scripts/benchmark_data.py --images 1280 --rounds 3 --workers 2 --json docs/bench_data_cpu.json
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_train import hybridvit_rate, make_folder, run  # noqa: E402

LAYOUTS = ("folder", "csv", "parquet", "webdataset")


def write_layouts(folder: Path, root: Path) -> dict[str, tuple[str, str | None]]:
    """The folder's images in every layout: ``--data`` and ``--val-data`` of each."""
    import random

    import datasets

    splits = {split: sorted((p, p.parent.name) for p in (folder / split).rglob("*.jpg")) for split in ("train", "val")}
    classes = sorted({label for _, label in splits["train"]})
    for split, rows in splits.items():
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("path", "label"), *((str(p), label) for p, label in rows)])
        table = datasets.Dataset.from_dict(
            {"image": [{"bytes": p.read_bytes(), "path": None} for p, _ in rows], "label": [classes.index(c) for _, c in rows]},
            features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)}))
        (root / "hub" / "data").mkdir(parents=True, exist_ok=True)
        name = "train" if split == "train" else "validation"
        for shard in range(4):
            table.shard(4, shard).to_parquet(str(root / "hub" / "data" / f"{name}-{shard:05d}-of-00004.parquet"))
        shuffled = list(rows)
        random.Random(0).shuffle(shuffled)
        (root / "shards").mkdir(exist_ok=True)
        per = -(-len(shuffled) // 4)
        for shard in range(4):
            with tarfile.open(root / "shards" / f"{split}-{shard:03d}.tar", "w") as tar:
                for i, (path, label) in enumerate(shuffled[shard * per:(shard + 1) * per]):
                    for ext, data in (("jpg", path.read_bytes()), ("cls", label.encode())):
                        info = tarfile.TarInfo(f"{shard:03d}{i:06d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    return {"folder": (str(folder), None), "csv": (str(root / "train.csv"), str(root / "val.csv")),
            "parquet": (str(root / "hub"), None),
            "webdataset": (str(root / "shards" / "train-{000..003}.tar"), str(root / "shards" / "val-{000..003}.tar"))}


def data_rate(data: str, val: str | None, args: argparse.Namespace, out: Path) -> float:
    """Images/s of one epoch of the training loader alone (in a process of its own)."""
    code = f"""
import time, torch
from hybridvit.registry import get_model_info
from hybridvit.train import TrainConfig
from hybridvit.train.builder import build_data
from hybridvit.train.distributed import DistInfo
cfg = TrainConfig(model={args.model!r}, data={data!r}, val_data={val!r}, batch_size={args.batch}, workers={args.workers},
                  recipe="tiny", input_size={args.input_size}, output={str(out)!r})
cfg, pipe = build_data(cfg, get_model_info(cfg.model), DistInfo(), torch.device("cpu"))
pipe.sampler.set_epoch(0)
start, images = time.perf_counter(), 0
for x, y, bad in pipe.train_loader:
    images += len(y)
print("RATE", images / (time.perf_counter() - start))
"""
    log, _ = run([sys.executable, "-c", code], "all", dict(os.environ))
    return float(log.split("RATE")[-1].split()[0])


def train_rate(data: str, val: str | None, args: argparse.Namespace, out: Path) -> float:
    cmd = [sys.executable, "-m", "hybridvit", "train", "--model", args.model, "--data", data,
           *(["--val-data", val] if val else []), "--epochs", "2", "--batch-size", str(args.batch), "--workers",
           str(args.workers), "--input-size", str(args.input_size), "--recipe", "tiny", "--amp", args.amp,
           "--no-channels-last", "--output", str(out), "--overwrite"]
    run(cmd, "all", dict(os.environ))
    return hybridvit_rate(out)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1280, help="training photos (and a tenth as many to validate)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--model", default="levit_128s")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--amp", default="bf16", help="the training rows' precision")
    parser.add_argument("--rows", default="data,train")
    parser.add_argument("--output", type=Path, default=Path("runs/data_bench"))
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each measurement (root): "
                        "the files come from the disk, as a first epoch over a large dataset reads them")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    folder = make_folder(args.output / "photos", args.images, args.images // 10)
    layouts = write_layouts(folder, args.output)
    rows = args.rows.split(",")
    rates: dict[str, dict[str, list[float]]] = {row: {name: [] for name in LAYOUTS} for row in rows}
    for round_ in range(args.rounds):
        for row in rows:
            for name in (LAYOUTS if round_ % 2 == 0 else LAYOUTS[::-1]):
                data, val = layouts[name]
                measure = data_rate if row == "data" else train_rate
                if args.cold:
                    os.sync()
                    Path("/proc/sys/vm/drop_caches").write_text("3\n")
                rates[row][name].append(measure(data, val, args, args.output / f"run-{name}"))
                print(f"round {round_ + 1} {row:5s} {name:10s} {rates[row][name][-1]:8.1f} images/s", flush=True)
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "args": {
        k: str(v) for k, v in vars(args).items()}, "date": time.strftime("%Y-%m-%d"),
        "median": {row: {name: statistics.median(v) for name, v in by.items()} for row, by in rates.items()},
        "rounds": rates}
    for row in rows:
        base = result["median"][row]["folder"]
        print(f"{row}: " + ", ".join(f"{name} {v:.1f} ({v / base:.2f}x)" for name, v in result["median"][row].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
