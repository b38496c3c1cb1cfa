"""A model trained at one size, evaluated at others: docs/resolution.md.

Trains LeViT-128S on the digits at ``--train-size``, then for each other size evaluates it
with the attention biases resampled from the learnt tables (``bilinear``), with the learnt
offsets kept as they are (``keep``, for grids no larger than the trained one), and after a
short fine-tune at that size; as a control, with every bias table set to zero (what the
biases contribute at all). Writes ``resolution.json``, ``resolution.md`` and
``resolution.png`` into ``--output``.

    python scripts/resolution_experiment.py --output runs/resolution
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import hybridvit
from hybridvit.bench import machine_info
from hybridvit.checkpoints import load_trained
from hybridvit.figures import plot_resolution
from hybridvit.train import TrainConfig, evaluate, train


def grid(size: tuple[int, int]) -> tuple[int, int]:
    """LeViT's first key grid: four stride-2 convolutions, each rounding up."""
    h, w = size
    for _ in range(4):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def top1(model_dir: Path, size: tuple[int, int], resampling: str | None = None) -> float:
    return evaluate(model_dir, None, workers=0, input_size=size, bias_resampling=resampling)["top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("runs/resolution"))
    parser.add_argument("--train-size", type=int, default=128)
    parser.add_argument("--sizes", default="96x96,160x160,96x128", help="comma-separated HxW")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    native = (args.train_size, args.train_size)
    base = args.output / "base"
    if not (base / "model").exists():
        train(TrainConfig(epochs=args.epochs, input_size=args.train_size, batch_size=64, workers=0, output=str(base)))
    no_bias = args.output / "base_without_bias"
    model, extra = load_trained(base / "model")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "attention_bias" in name:
                p.zero_()
    hybridvit.save_model(model, no_bias, extra)
    rows = [dict(size=list(native), trained=True, bilinear=top1(base / "model", native), keep=None, finetuned=None,
                 no_bias=top1(no_bias, native))]
    for size in sizes:
        fits = all(g <= n for g, n in zip(grid(size), grid(native)))
        tuned = args.output / f"finetune_{size[0]}x{size[1]}"
        if not (tuned / "model").exists():
            train(TrainConfig(epochs=args.finetune_epochs, input_size=size[0], input_width=size[1], batch_size=64,
                              workers=0, lr=2e-3, warmup_epochs=0, finetune=str(base / "model"), output=str(tuned)))
        rows.append(dict(size=list(size), trained=False, bilinear=top1(base / "model", size, "bilinear"),
                         keep=top1(base / "model", size, "keep") if fits else None,
                         finetuned=top1(tuned / "model", size), no_bias=top1(no_bias, size)))
    meta = machine_info(torch.device("cpu"), torch.get_num_threads()) | dict(
        hybridvit=hybridvit.__version__, model="levit_128s", data="digits (360 val images)", epochs=args.epochs,
        finetune_epochs=args.finetune_epochs)
    (args.output / "resolution.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    plot_resolution(rows, args.output / "resolution.png", f"LeViT-128S on digits, trained at {native[0]}x{native[1]}")
    print(table(rows))


def table(rows: list[dict]) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    lines = ["| input | first key grid | biases resampled (bilinear) | offsets kept | fine-tuned at that size "
             "| control: biases zeroed |", "|---|---|---|---|---|---|"]
    for r in rows:
        h, w = r["size"]
        g = grid((h, w))
        name = f"{h}x{w}" + (" (trained)" if r["trained"] else "")
        lines.append(f"| {name} | {g[0]}x{g[1]} | {pct(r['bilinear'])} | {pct(r['keep'])} | {pct(r['finetuned'])} "
                     f"| {pct(r['no_bias'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
