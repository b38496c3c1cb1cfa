"""End-to-end predict throughput (decoding included) against the pipelines a user would otherwise run.

On N ImageNet-like JPEGs (500x375 and 375x500, quality 90, random crops of scikit-learn's two
bundled photos), all cores, one process, the same LeViT weights:

- ``today``: the one-image-at-a-time loop ``predict`` ran before (Pillow + torchvision transforms
  in the main thread, one forward pass per image, fp32 in ONNX Runtime);
- ``timm-style``: torchvision transforms in a DataLoader with a worker per core, batch 16, fed to
  the model ``optimize(precision="auto")`` picks at all cores;
- ``hybridvit predict``: ``predict_collection`` writing a Parquet file (the command's code path).

The ideal is ``cores / (decode + model)`` per image: this machine's one-thread decode-and-resize
time and one-thread model time (the path ``auto`` picks at one thread, batch 16), both measured in
this run. Each pipeline runs ``--rounds`` times, interleaved; the best round counts, and all are
kept (``predict``'s first round measures the core split; later rounds reuse it).

    python scripts/benchmark_predict.py --images 2000 --output runs/predict_bench
    taskset -c 0 python scripts/benchmark_predict.py --skip-today   # one core
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--model", default="levit_128s")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("runs/predict_bench"))
    parser.add_argument("--skip-today", action="store_true", help="leave out the slow one-image loop")
    args = parser.parse_args()

    import hybridvit
    from hybridvit.api import load_source
    from hybridvit.bench.photos import make_photos
    from hybridvit.bench.throughput import machine_info
    from hybridvit.data import eval_transform, load_image
    from hybridvit.serving.collection import predict_collection
    from hybridvit.inference.machine import matmul_rates, torch_threads
    from hybridvit.serving.predict import Predictor
    from hybridvit.registry import get_model_info

    cores = torch.get_num_threads()
    paths = make_photos(args.output / "photos", args.images)
    model_dir = args.output / "model"
    if not model_dir.exists():
        hybridvit.save_model(hybridvit.create_model(args.model).eval(), model_dir)
    transform = eval_transform(get_model_info(args.model))
    predictor = Predictor(model_dir)

    # the ideal: one-thread decode and one-thread model per image, measured here
    sample = paths[:200]
    decode_s = min(_seconds(lambda: [predictor.preprocess(p) for p in sample]) for _ in range(2)) / len(sample)
    one_thread = predictor.model_for(1)
    batch = torch.zeros(16, 3, *predictor.preprocess.size, dtype=torch.uint8)
    with torch_threads(1):
        model_s = min(_seconds(lambda: [one_thread(batch) for _ in range(8)]) for _ in range(3)) / (8 * 16)
        rate_1t = matmul_rates()["fp32"]
    ideal = cores / (decode_s + model_s)

    eager, _ = load_source(model_dir)
    today_model = hybridvit.optimize(eager, "fp32")

    def today() -> None:
        for p in paths:
            today_model(transform(load_image(p))[None]).softmax(-1).topk(5)

    timm_model = hybridvit.optimize(eager, "auto", torch.zeros(16, 3, *predictor.preprocess.size))

    class TimmFiles(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int) -> torch.Tensor:
            return transform(Image.open(paths[i]).convert("RGB"))  # torchvision, in the workers

    def timm_style() -> None:
        loader = torch.utils.data.DataLoader(TimmFiles(), batch_size=16, num_workers=cores)
        for x in loader:
            timm_model(x).softmax(-1).topk(5)

    summaries = []  # each round's: the split (the first round measures it; later rounds keep it), the path

    def ours() -> float:  # as the command reports it: model building (and measuring paths) not counted
        summary = predict_collection(predictor, [str(args.output / "photos")], 5, args.output / "preds.parquet",
                                     progress=False)
        summaries.append(summary)
        return summary.images_per_second

    runs = {"hybridvit predict": ours, "timm-style": timm_style}
    if not args.skip_today:
        runs["today"] = today
    rounds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            rate = run()
            rounds[name].append(rate or len(paths) / (time.perf_counter() - start))
    rates = {name: max(r) for name, r in rounds.items()}
    result = {
        **machine_info(torch.device("cpu"), cores), "images": len(paths), "model": args.model,
        "decode_ms": decode_s * 1e3, "model_ms_1thread": model_s * 1e3, "fp32_gflops_1thread": rate_1t,
        "ideal_images_per_s": ideal, "images_per_s": rates, "rounds": rounds, "split": summaries[-1].split,
        "measured_splits": summaries[0].measured, "path": summaries[-1].path_used,
        "timm_style_path": f"{timm_model.precision}/{timm_model.backend}"}
    result["share_of_ideal"] = rates["hybridvit predict"] / ideal
    result["vs_timm_style"] = rates["hybridvit predict"] / rates["timm-style"]
    result["vs_timm_style_rounds"] = [a / b for a, b in zip(rounds["hybridvit predict"], rounds["timm-style"])]
    if "today" in rates:
        result["vs_today"] = rates["hybridvit predict"] / rates["today"]
    print(json.dumps(result, indent=2))
    (args.output / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
