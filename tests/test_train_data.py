"""Training on data as users keep it, end to end, as the README tells it: the digits model
fine-tuned on copies of the digits laid out as an ImageNet folder, a CSV manifest, Hugging Face
Parquet shards and WebDataset tars served over HTTP, all reaching the same top-1; and a run
over HTTP shards interrupted mid-epoch (Ctrl-C, then SIGKILL) that resumes to the weights of an
uninterrupted run."""

from __future__ import annotations

import functools
import http.server
import json
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import reached, wait_for
from PIL import Image
from test_data_sources import write_shards
from test_train import _same_final_state, cli

pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def digit_copies(tmp_path_factory) -> dict[str, Path]:
    """The digits' train and val splits as 32x32 PNG files, in every layout, in one order (so that
    the map-style layouts see the same batches)."""
    import datasets

    from hybridvit.data.datasets import digits_split

    root = tmp_path_factory.mktemp("digit-copies")
    images, targets, train_idx, val_idx = digits_split()
    pixels = {i: np.asarray(Image.fromarray((images[i] * (255 / 16)).astype(np.uint8)).resize((32, 32), Image.BICUBIC)
                            .convert("RGB")) for i in np.concatenate([train_idx, val_idx])}
    for split, indices in (("train", train_idx), ("val", val_idx)):
        indices = sorted(indices, key=lambda i: (targets[i], i))  # the folder's order (class, then file name)
        rows = []
        for i in indices:
            path = root / "folder" / split / str(targets[i]) / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i]).save(path)
            rows.append(f"folder/{split}/{targets[i]}/{i:04d}.png,{targets[i]}\n")
        (root / f"{split}.csv").write_text("path,label\n" + "".join(rows))
        table = datasets.Dataset.from_dict(
            {"image": [{"bytes": (root / "folder" / split / str(targets[i]) / f"{i:04d}.png").read_bytes(), "path": None}
                       for i in indices], "label": [int(targets[i]) for i in indices]},
            features=datasets.Features({"image": datasets.Image(),
                                        "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}))
        (root / "hub" / "data").mkdir(parents=True, exist_ok=True)
        name = "train" if split == "train" else "validation"
        for shard in range(2):
            table.shard(2, shard).to_parquet(str(root / "hub" / "data" / f"{name}-{shard:05d}-of-00002.parquet"))
        mixed = np.random.default_rng(0).permutation(indices)  # shards are written shuffled, as WebDataset advises
        write_shards(root / "shards", [pixels[i] for i in mixed], [str(targets[i]) for i in mixed], 300, split)
    return {"root": root}


@pytest.fixture(scope="module")
def shard_server(digit_copies):
    """The WebDataset tars behind a local HTTP server."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(digit_copies["root"] / "shards"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    yield {"train": url + "/train-{000..004}.tar", "val": url + "/val-{000..001}.tar"}
    server.shutdown()


def _finetune(digits_run: Path, output: Path, data: str, val: str | None = None) -> list[str]:
    return cli("train", "--finetune", str(digits_run / "model"), "--data", data, *(["--val-data", val] if val else []),
               "--epochs", "3", "--input-size", "32", "--batch-size", "32", "--amp", "none", "--no-channels-last",
               "--output", str(output))


@pytest.fixture(scope="module")
def shard_run(digits_run, shard_server, tmp_path_factory) -> Path:
    """An uninterrupted fine-tuning run over the HTTP shards, two data workers."""
    out = tmp_path_factory.mktemp("shard-run") / "run"
    subprocess.run(_finetune(digits_run, out, shard_server["train"], shard_server["val"]) + ["--workers", "2"],
                   check=True, capture_output=True)
    return out


def _top1(run: Path) -> float:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]["val_top1"]


@pytest.mark.slow
def test_every_layout_reaches_the_folders_top1(digits_run, digit_copies, shard_run, tmp_path):
    root = digit_copies["root"]
    top1 = {"webdataset over http": _top1(shard_run)}
    for name, data, val in (("folder", root / "folder", None), ("csv", root / "train.csv", root / "val.csv"),
                            ("parquet shards", root / "hub", None)):
        subprocess.run(_finetune(digits_run, tmp_path / name.replace(" ", "-"), str(data), val and str(val))
                       + ["--workers", "0"], check=True, capture_output=True)
        top1[name] = _top1(tmp_path / name.replace(" ", "-"))
    assert all(abs(v - top1["folder"]) <= 1.0 for v in top1.values()), top1
    assert top1["folder"] > 90, top1


@pytest.mark.slow
def test_http_shards_interrupted_mid_epoch_resume_to_the_uninterrupted_weights(digits_run, shard_server, shard_run,
                                                                             tmp_path):
    import torch

    out = tmp_path / "run"
    args = _finetune(digits_run, out, shard_server["train"], shard_server["val"]) + ["--workers", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(reached(out, 1, 3), proc)  # into the second epoch
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=600) == 130
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] >= 3  # a mid-epoch checkpoint
    proc = subprocess.Popen(args + ["--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(reached(out, 1, state["step"] + 4), proc)
    proc.send_signal(signal.SIGKILL)  # saves nothing: the next resume starts from the same mid-epoch checkpoint
    proc.wait()
    subprocess.run(args + ["--resume"], check=True, capture_output=True)
    _same_final_state(out, shard_run)


@pytest.fixture(scope="module")
def multi_label_digits(digit_copies) -> Path:
    """The digits with several labels each: the digit, even or odd, and "big" from 5 up."""
    root = digit_copies["root"]
    rows = ["path,labels\n"]
    for path in sorted((root / "folder").rglob("*.png")):
        digit = int(path.parent.name)
        labels = [f"d{digit}", "even" if digit % 2 == 0 else "odd"] + (["big"] if digit >= 5 else [])
        rows.append(f"{path.relative_to(root)},{';'.join(labels)}\n")
    (root / "multi.csv").write_text("".join(rows))
    return root / "multi.csv"


@pytest.mark.slow
def test_multi_label_trains_evaluates_predicts_and_serves(multi_label_digits, digits_run, tmp_path):
    import httpx

    from hybridvit.serving.predict import InferenceSpec, Predictor
    from hybridvit.serving.model_server import ModelServer, ServeConfig
    from hybridvit.serving.server import create_app
    from hybridvit.train import evaluate

    out = tmp_path / "run"
    subprocess.run(cli("train", "--data", str(multi_label_digits), "--val-split", "0.2", "--multi-label", "--epochs", "3",
                       "--input-size", "32", "--amp", "none", "--no-channels-last", "--workers", "0", "--output", str(out)),
                   check=True, capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"val_map", "val_f1", "best_map"} <= set(rows[-1]) and "val_top1" not in rows[-1]
    assert rows[-1]["val_map"] > 90 and rows[-1]["val_f1"] > 60
    result = evaluate(out, multi_label_digits, workers=0)  # the run's own held-out split
    assert result["map"] == pytest.approx(rows[-1]["val_map"]) and result["images"] == 359
    predictor = Predictor(InferenceSpec(out / "model", "fp32", backend="onnxruntime", batch_size=8))
    picture = next((multi_label_digits.parent / "folder" / "val" / "6").iterdir())
    (row,) = predictor.predict([picture], k=5)
    assert {"d6", "even", "big"} <= {name for name, _ in row.top} and all(p >= 0.5 for _, p in row.top)

    async def ask(client, query: str):
        return await client.post("/v1/predict" + query, content=picture.read_bytes(), headers={"content-type": "image/png"})

    async def main():
        server = ModelServer(predictor, ServeConfig())
        app = create_app(server)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                return await ask(client, "?top_k=5"), await ask(client, "?top_k=5&threshold=0.999999")

    import asyncio

    default, strict = asyncio.run(main())
    assert [c["class"] for c in default.json()["predictions"][0]["top"]] == [name for name, _ in row.top]
    assert len(strict.json()["predictions"][0]["top"]) < len(row.top)  # fewer labels reach a higher threshold
    with pytest.raises(ValueError, match="single-label model"):
        Predictor(InferenceSpec(digits_run / "model", "fp32", threshold=0.3))
