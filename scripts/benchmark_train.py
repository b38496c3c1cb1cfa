"""Training throughput of ``hybridvit train`` against timm's own ``train.py``, side by side.

Both train the same model on the same generated JPEG folder (640 training and 80 validation
photos, 500x375 and 375x500, quality 90, 10 classes) with the same batch, data workers and
recipe parts: AdamW at lr 5e-4 (hybridvit's --lr is per 512 images, so it is scaled to match),
weight decay 0.025, label smoothing 0.1, adaptive gradient clipping 0.01, random resized crop,
flip and colour jitter 0.4; no Mixup, RandAugment, random erasing, EMA, repeated augmentation or
warm-up; 2 epochs. Each run is its own process; the two sides alternate within every round.
The figure is epoch 2's images/s (data waiting included, evaluation excluded): hybridvit's
``images_per_second`` in ``metrics.jsonl``, timm's running average on its last logged line.

Rows (``--rows``):

- ``fp32``, ``bf16``: the same settings on both sides (hybridvit's layout named, not measured),
  at fp32 and in bf16 autocast;
- ``defaults``: ``hybridvit train`` with its defaults (precision and layout measured, workers
  from the cores) against timm's ``train.py`` in fp32 with its defaults (what each user gets
  without tuning);
- ``channels-last``, ``compile``: hybridvit's ``--channels-last`` / ``--compile`` (bf16) against
  timm with the same flag, and the whole run's wall time (compilation included);
- ``overhead``: the framework's own cost per step: LeViT-128S at 32x32 on 48x48 JPEGs, batch 8,
  where the model and the decoding cost almost nothing (ms per step, lower is better).

Before the runs it times the decoding and augmentation of one image at one thread, as a data
worker does it; with each row's share of time spent waiting for data, that says whether the
model waits on the loader.

``--threads 1`` pins every process of a run (data workers too) to one core with one thread;
``all`` leaves them the machine. On a GPU (``--device cuda``) both sides add ``--channels-last``
and bf16 autocast (timm's ``--amp --amp-dtype bfloat16``) to every row.

    git clone https://github.com/huggingface/pytorch-image-models /tmp/timm
    python scripts/benchmark_train.py --timm-train /tmp/timm/train.py --rounds 3 --output runs/train_bench
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROWS = ("fp32", "bf16", "defaults", "channels-last", "compile", "overhead")
_TIMM_RATE = re.compile(r"Train: (\d+) \[\s*\d+/\d+.*?\(\s*([\d.]+)s,\s*([\d.]+)/s\)")


def make_folder(root: Path, count: int, val: int, size: tuple[int, int] | None = None) -> Path:
    """``count`` training and ``val`` validation JPEGs in 10 class folders (reused when present)."""
    from PIL import Image

    from hybridvit.bench.photos import make_photos

    if (root / "done").exists():
        return root
    photos = make_photos(root.parent / f"{root.name}-photos", count + val)
    for i, path in enumerate(photos):
        folder = root / ("train" if i < count else "val") / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        if size is None:
            shutil.copy(path, folder / Path(path).name)
        else:
            Image.open(path).resize(size).save(folder / Path(path).name, quality=90)
    (root / "done").touch()
    return root


def hybridvit_command(args, data: Path, out: Path, row: str, batch: int, input_size: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "hybridvit", "train", "--data", str(data), "--model", args.model, "--recipe", "levit",
           "--epochs", "2", "--batch-size", str(batch), "--lr", str(5e-4 * 512 / batch), "--auto-augment", "none",
           "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--no-repeated-aug", "--no-model-ema", "--warmup-epochs",
           "0", "--device", args.device, "--output", str(out), "--overwrite"]
    if row != "defaults":
        cmd += ["--workers", str(args.workers)]
    precision = {"fp32": "none", "defaults": "auto", "overhead": "none"}.get(row, "bf16")
    cmd += ["--amp", "bf16" if args.device == "cuda" else precision]
    if row == "channels-last" or args.device == "cuda":
        cmd.append("--channels-last")
    elif row != "defaults":  # the same layout as timm's: not measured
        cmd.append("--no-channels-last")
    if row == "compile":
        cmd.append("--compile")
    if input_size:
        cmd += ["--input-size", str(input_size)]
    return cmd


def timm_command(args, data: Path, out: Path, row: str, batch: int, input_size: int | None) -> list[str]:
    cmd = [sys.executable, str(args.timm_train), str(data), "--model", args.model, "--num-classes", "10", "-b", str(batch),
           "--epochs", "2", "--opt", "adamw", "--lr", "5e-4", "--weight-decay", "0.025", "--smoothing", "0.1",
           "--clip-grad", "0.01", "--clip-mode", "agc", "--reprob", "0", "--warmup-epochs", "0", "--device", args.device,
           "--output", str(out.parent), "--experiment", out.name, "--log-interval", "50"]
    if row != "defaults":
        cmd += ["--workers", str(args.workers)]
    if args.device == "cpu":
        cmd.append("--no-prefetcher")  # its prefetcher is CUDA-only
    if args.device == "cuda" or row in ("bf16", "channels-last", "compile"):
        cmd += ["--amp", "--amp-dtype", "bfloat16"]
    if row == "channels-last" or args.device == "cuda":
        cmd.append("--channels-last")
    if row == "compile":
        cmd += ["--torchcompile", "inductor"]
    if input_size:
        cmd += ["--input-size", "3", str(input_size), str(input_size), "--model-kwargs", f"img_size={input_size}"]
    return cmd


def run(cmd: list[str], threads: str, env: dict[str, str]) -> tuple[str, float]:
    """Output and wall seconds of one run; ``threads`` 1 pins the run and its workers to core 0."""
    env = dict(env)
    if threads == "1":
        cmd = ["taskset", "-c", "0", *cmd]
        env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout + done.stderr, seconds


def hybridvit_rate(out: Path) -> tuple[float, float]:
    """Epoch 2's images/s and the share of it spent waiting for data."""
    row = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    return row["images_per_second"], row.get("data_wait_fraction", float("nan"))


def timm_rate(log: str) -> float:
    """The running average on timm's last logged training line of epoch 2."""
    rates = [float(m.group(3)) for m in _TIMM_RATE.finditer(log) if m.group(1) == "1"]
    if not rates:
        raise RuntimeError(f"no epoch-2 training line in timm's output:\n{log[-2000:]}")
    return rates[-1]


def decode_cost(folder: Path, model: str, images: int = 200) -> dict[str, float]:
    """Milliseconds per training image at one thread: reading, decoding and the whole augmentation
    (as a data worker does it), and the share of that spent reading and cropping."""
    import random
    import time

    import torch

    from hybridvit.data import train_transform
    from hybridvit.registry import get_model_info

    info = get_model_info(model)
    transform = train_transform(info, tuple(info.input_size[1:]), auto_augment=None, color_jitter=0.4, re_prob=0.0,
                                hflip=0.5, scale=(0.08, 1.0))
    paths = sorted((folder / "train").rglob("*.jpg"))[:images]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        random.seed(0)
        start = time.perf_counter()
        crops = [transform.read(p) for p in paths]
        read = time.perf_counter() - start
        for crop in crops:
            transform.after_read(crop)
        total = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return {"ms_per_image": 1e3 * total / len(paths), "read_and_crop_share": read / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-train", type=Path, required=True, help="timm's train.py (a clone of pytorch-image-models)")
    parser.add_argument("--model", default="levit_128s")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="1,all", help="comma-separated: 1 and/or all")
    parser.add_argument("--rows", default="fp32,bf16,defaults,overhead", help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--output", type=Path, default=Path("runs/train_bench"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import torch

    from hybridvit.bench.throughput import machine_info

    args.output.mkdir(parents=True, exist_ok=True)
    photos = make_folder(args.output / "data", 640, 80)
    small = make_folder(args.output / "data48", 640, 80, size=(48, 48))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    decoding = decode_cost(photos, args.model)
    print(f"decoding and augmentation: {decoding['ms_per_image']:.2f} ms per image at one thread "
          f"({decoding['read_and_crop_share']:.0%} reading and cropping)", flush=True)
    results = {"machine": machine_info(torch.device(args.device), torch.get_num_threads()),
               "settings": {k: str(v) for k, v in vars(args).items()}, "decoding": decoding, "rows": []}
    for threads in args.threads.split(","):
        for row in args.rows.split(","):
            batch, size, data = (8, 32, small) if row == "overhead" else (args.batch_size, None, photos)
            record = {"row": row, "threads": threads, "ours": [], "timm": [], "data_wait": [], "ours_wall": [],
                      "timm_wall": []}
            for r in range(args.rounds):
                for side in (("ours", "timm") if r % 2 == 0 else ("timm", "ours")):
                    out = args.output / "runs" / f"{row}-{threads}t-{side}-{r}"
                    shutil.rmtree(out, ignore_errors=True)
                    if side == "ours":
                        log, wall = run(hybridvit_command(args, data, out, row, batch, size), threads, env)
                        rate, wait = hybridvit_rate(out)
                        record["data_wait"].append(wait)
                    else:
                        log, wall = run(timm_command(args, data, out, row, batch, size), threads, env)
                        rate = timm_rate(log)
                    record[side].append(rate)
                    record[f"{side}_wall"].append(wall)
                    print(f"{row} {threads}t round {r} {side}: {rate:.1f} img/s ({wall:.0f} s)", flush=True)
            record["ratio"] = statistics.median(a / b for a, b in zip(record["ours"], record["timm"]))
            results["rows"].append(record)
    print(f"\n{results['machine']['cpu']}, torch {results['machine']['torch']}, timm {results['machine']['timm']}")
    print("| row | threads | hybridvit (img/s) | timm train.py (img/s) | ratio | hybridvit data wait |")
    print("|---|---|---|---|---|---|")
    for rec in results["rows"]:
        unit = 1.0 if rec["row"] != "overhead" else None
        ours, timm_ = statistics.median(rec["ours"]), statistics.median(rec["timm"])
        if unit is None:  # ms per step at batch 8
            cells = f"{8000 / ours:.1f} ms/step | {8000 / timm_:.1f} ms/step | {rec['ratio']:.2f}x"
        else:
            cells = f"{ours:.1f} | {timm_:.1f} | {rec['ratio']:.2f}x"
        print(f"| {rec['row']} | {rec['threads']} | {cells} | {statistics.median(rec['data_wait']):.1%} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
