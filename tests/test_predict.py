"""Predicting collections: inputs, the threaded pipeline, output files, resume after SIGKILL, bad inputs."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import wait_for
from PIL import Image
from typer.testing import CliRunner

from hybridvit.checkpoints import load_trained
from hybridvit.cli import app
from hybridvit.data import eval_geometry, eval_transform, load_image
from hybridvit.serving.inputs import check_sources, iter_inputs
from hybridvit.serving.outputs import PredictionWriter
from hybridvit.serving.pipeline import Pipeline, Prediction, Split
from hybridvit.serving.predict import InferenceSpec, Predictor, Preprocess
from hybridvit.registry import get_model_info

runner = CliRunner()
FAST = ["--precision", "fp32", "--backend", "onnxruntime", "--model-threads", "1"]  # no measuring: quick start


def _digits(folder, count: int, start: int = 0) -> list[str]:
    """``count`` validation digits as 32x32 files (PNG and JPEG, several modes), their paths in order."""
    from hybridvit.data.datasets import digits_split

    images, _, _, val = digits_split()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(start, start + count):
        pixels = (images[val[n % len(val)]] * (255 / 16)).astype(np.uint8)
        img = Image.fromarray(pixels).resize((32, 32), Image.BICUBIC).convert(["L", "RGB"][n % 2])
        paths.append(str(folder / f"{n:05d}.{['png', 'jpg'][n % 3 == 0]}"))
        img.save(paths[-1])
    return paths


# -- inputs ----------------------------------------------------------------------------------------


def test_listing_reads_folders_globs_manifests_and_standard_input(tmp_path):
    for name in ("a/1.jpg", "a/b/2.png", "a/b/3.JPEG", "a/notes.txt", "c.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "list.txt").write_text("# photos\na/1.jpg\n\n/abs/x.jpg\nc.jpg\n")
    (tmp_path / "table.csv").write_text("label,path\ncat,a/1.jpg\ndog,c.jpg\n")
    pq.write_table(pa.table({"id": [1, 2], "image": ["c.jpg", "a/b/2.png"]}), tmp_path / "table.parquet")
    t = str(tmp_path)
    assert list(iter_inputs([f"{t}/a"])) == [f"{t}/a/1.jpg", f"{t}/a/b/2.png", f"{t}/a/b/3.JPEG"]  # not notes.txt
    assert sorted(iter_inputs([f"{t}/a/**/*.png", f"{t}/*.jpg"])) == [f"{t}/a/b/2.png", f"{t}/c.jpg"]
    assert list(iter_inputs([f"{t}/list.txt"])) == [f"{t}/a/1.jpg", "/abs/x.jpg", f"{t}/c.jpg"]  # manifest-relative
    assert list(iter_inputs([f"{t}/table.csv", f"{t}/table.parquet"])) == [
        f"{t}/a/1.jpg", f"{t}/c.jpg", f"{t}/c.jpg", f"{t}/a/b/2.png"]
    assert list(iter_inputs(["-", f"{t}/c.jpg"], stdin=io.StringIO("x.png\ny z.jpg\n"))) == [
        "x.png", "y z.jpg", f"{t}/c.jpg"]
    assert list(iter_inputs([f"{t}/missing.jpg"])) == [f"{t}/missing.jpg"]  # an error row later, not a crash


def test_listing_is_lazy():
    lines = io.StringIO("".join(f"{i}.jpg\n" for i in range(10)))
    listing = iter_inputs(["-"], stdin=lines)
    assert [next(listing) for _ in range(3)] == ["0.jpg", "1.jpg", "2.jpg"]
    assert lines.tell() < len(lines.getvalue())  # the rest of standard input is not read yet


def test_bad_source_lists_are_refused_before_any_work(tmp_path):
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"no column of image paths .* its columns are \['a', 'b'\]"):
        check_sources([tmp_path / "t.csv"])
    with pytest.raises(ValueError, match="can be given once"):
        check_sources(["-", "-"])
    result = runner.invoke(app, ["predict", "levit_128s", str(tmp_path / "t.csv")])
    assert isinstance(result.exception, ValueError) and "no column of image paths" in str(result.exception)


# -- output files ----------------------------------------------------------------------------------


def _rows(k: int = 2, dim: int | None = 3) -> list[Prediction]:
    emb = (lambda i: np.arange(dim, dtype=np.float32) + i) if dim else (lambda i: None)
    return [Prediction("a.jpg", [("cat", 0.75), ("dog", 0.25)][:k], emb(0)),
            Prediction("b,\"odd\" name.jpg", [("dog", 0.5), ("cat", 0.5)][:k], emb(1)),
            Prediction("broken.jpg", error="cannot read image broken.jpg: truncated"),
            Prediction("a.jpg", [("cat", 0.75), ("dog", 0.25)][:k], emb(0))]  # listed twice


def _read(path) -> list[dict]:
    """Rows of any output file as plain dicts (path, error, classes, probabilities, embedding)."""
    suffix = os.path.splitext(str(path))[1]
    if suffix == ".parquet":
        return [{**r, "embedding": None if r["error"] else r.get("embedding")} for r in pq.read_table(path).to_pylist()]
    out = []
    if suffix == ".jsonl":
        for line in open(path):
            r = json.loads(line)
            out.append({"path": r["path"], "error": r.get("error"), "classes": [t["class"] for t in r.get("top", [])],
                        "probabilities": [t["probability"] for t in r.get("top", [])], "embedding": r.get("embedding")})
        return out
    import csv

    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            k = sum(1 for key in r if key.startswith("class_"))
            classes = [r[f"class_{i}"] for i in range(1, k + 1) if r[f"class_{i}"]]
            out.append({"path": r["path"], "error": r["error"] or None, "classes": classes,
                        "probabilities": [float(r[f"probability_{i}"]) for i in range(1, len(classes) + 1)],
                        "embedding": json.loads(r["embedding"]) if r.get("embedding") else None})
    return out


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_output_files_hold_every_row_and_resume_counts_them(tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    writer = PredictionWriter(path, k=2, embedding_dim=3)
    writer.write(_rows()[:2])
    writer.write(_rows()[2:])
    writer.close()
    rows = _read(path)
    assert [r["path"] for r in rows] == ["a.jpg", "b,\"odd\" name.jpg", "broken.jpg", "a.jpg"]
    assert rows[0]["classes"] == ["cat", "dog"] and rows[0]["probabilities"] == [0.75, 0.25]
    assert rows[1]["embedding"] == [1.0, 2.0, 3.0] and rows[2]["error"].startswith("cannot read image")
    assert rows[2]["embedding"] is None and rows[2]["classes"] == []
    again = PredictionWriter(path, k=2, embedding_dim=3, resume=True)
    assert again.done == Counter({os.path.abspath("a.jpg"): 2, os.path.abspath("b,\"odd\" name.jpg"): 1,
                                  os.path.abspath("broken.jpg"): 1}) and again.failed == 1
    with pytest.raises(ValueError, match="other options"):
        PredictionWriter(path, k=3 if suffix != ".parquet" else 2, embedding_dim=None, resume=True)
    PredictionWriter(path, k=2, embedding_dim=3).close()  # not resuming: the file starts again
    assert _read(path) == []


def test_parquet_embeddings_are_fixed_size_float32_lists(tmp_path):
    writer = PredictionWriter(tmp_path / "o.parquet", k=2, embedding_dim=3)
    writer.write(_rows())
    writer.close()
    schema = pq.read_schema(tmp_path / "o.parquet")
    assert schema.field("embedding").type == pa.list_(pa.float32(), 3)
    assert schema.field("probabilities").type == pa.list_(pa.float32())
    assert not (tmp_path / "o.parquet.parts").exists()
    errors = pq.read_table(tmp_path / "o.parquet").to_pylist()[2]
    assert errors["error"] and errors["classes"] == [] and np.isnan(errors["embedding"]).all()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_resume_cuts_the_line_a_kill_interrupted(tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    writer = PredictionWriter(path, k=2, embedding_dim=None)
    writer.write(_rows(dim=None)[:2])
    writer.close()
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b"broken.jpg,cannot rea" if suffix == ".csv" else b'{"path": "broken.jpg", "err')
    writer = PredictionWriter(path, k=2, embedding_dim=None, resume=True)
    assert path.read_bytes() == whole and sum(writer.done.values()) == 2
    writer.write(_rows(dim=None)[2:3])
    writer.close()
    assert [r["path"] for r in _read(path)] == ["a.jpg", "b,\"odd\" name.jpg", "broken.jpg"]


# -- pipeline --------------------------------------------------------------------------------------


def _fake(classes: int = 4, batch_size: int = 3, reorder: bool = True):
    """A decoder that encodes each item's number in its pixels, and a model whose answer is that
    number (mod ``classes``). With ``reorder``, the first batch finishes only after the second
    has: rows must still come out in input order."""
    second_done = threading.Event()

    def decode(item: str) -> np.ndarray:
        if item.startswith("bad"):
            raise ValueError(f"cannot read image {item}: corrupt")
        return np.full((3, 2, 2), int(item), dtype=np.uint8)

    def model(x: torch.Tensor) -> torch.Tensor:
        numbers = x[:, 0, 0, 0].long()
        if reorder and int(numbers[0]) == 0:
            second_done.wait(timeout=60)  # a guard, not a delay: the second batch sets it
        out = torch.nn.functional.one_hot(numbers % classes, classes).float() * 10
        if int(numbers[0]) == batch_size:
            second_done.set()
        return out

    return decode, model


def test_rows_come_out_in_input_order_with_errors_in_place():
    decode, model = _fake()
    items = [str(i) for i in range(50)]
    items[7] = "bad7"
    pipeline = Pipeline(decode, lambda threads, lane: model, ["a", "b", "c", "d"], 2, 3, [Split(3, 3, 1)])
    rows = list(pipeline.run(items))
    assert [r.path for r in rows] == items
    assert rows[7].error == "cannot read image bad7: corrupt" and rows[7].top == []
    assert all(r.top[0][0] == "abcd"[int(r.path) % 4] for r in rows if r.error is None)
    assert all(len(r.top) == 2 and r.top[0][1] > 0.99 for r in rows if r.error is None)


def test_each_lane_runs_a_model_of_its_own():
    """One compiled OpenVINO model runs one call at a time: lanes sharing it would not overlap."""
    decode, model = _fake(reorder=False)
    callers: dict[int, set[str]] = {0: set(), 1: set(), 2: set()}

    def model_for(threads: int, lane: int):
        def run(x):
            callers[lane].add(threading.current_thread().name)
            return model(x)
        return run

    rows = list(Pipeline(decode, model_for, list("abcd"), 1, 2, [Split(3, 3, 1)]).run(str(i) for i in range(60)))
    assert len(rows) == 60 and all(r.error is None for r in rows)
    used = [names for names in callers.values() if names]
    assert all(len(names) == 1 for names in used)  # a model is only ever called by its own lane
    assert len(set().union(*used)) == len(used) >= 2


def test_the_core_split_is_chosen_by_measurement(monkeypatch):
    """The probe's timings decide; a virtual clock, which only the slow model moves, makes them exact."""
    import types

    import hybridvit.serving.pipeline as pipeline_module

    decode, model = _fake(reorder=False)
    now = [0.0]
    clock_lock = threading.Lock()
    monkeypatch.setattr(pipeline_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    ran: dict[str, list[int]] = {"slow": [], "fast": []}

    def timed(name, cost):
        def run(x):
            with clock_lock:
                now[0] += cost  # virtual seconds per call
                ran[name].extend(x.flatten(1)[:, 0].tolist())
            return model(x)
        return run

    slow, fast = timed("slow", 1.0), timed("fast", 0.001)
    splits = [Split(2, 2, 1), Split(2, 1, 2)]
    for slow_threads, expected in ((1, Split(2, 1, 2)), (2, Split(2, 2, 1))):
        ran["slow"].clear(), ran["fast"].clear()
        pipeline = Pipeline(decode, lambda t, lane, s=slow_threads: slow if t == s else fast, list("abcd"), 1, 3, splits,
                            probe_batches=2)
        rows = list(pipeline.run(str(i) for i in range(60)))
        assert [r.path for r in rows] == [str(i) for i in range(60)]  # the probe's rows are kept, once
        assert pipeline.split == expected and set(pipeline.measured) == {str(s) for s in splits}
        assert pipeline.measured[str(expected)] > 100 * min(pipeline.measured.values())
        assert set(range(45, 60)) <= set(ran["fast"])  # the run's end went to the faster split
        assert set(ran["slow"]) & set(range(6, 18))  # a timed probe segment ran on the slow one


# -- predictions -----------------------------------------------------------------------------------


def test_bulk_predictions_and_embeddings_equal_the_reference_pipeline(tmp_path, digits_run):
    paths = _digits(tmp_path / "digits", 40)
    predictor = Predictor(InferenceSpec(digits_run, "fp32", backend="onnxruntime", batch_size=8, embeddings=True,
                          decode_workers=2, model_threads=1))
    rows = list(predictor.predict_images(paths, k=3))
    model, extra = load_trained(digits_run)
    transform = eval_transform(get_model_info(model.model_name), model.input_hw, extra.get("crop_pct"))
    with torch.no_grad():
        x = torch.stack([transform(load_image(p)) for p in paths])
        features = model.forward_features(x)
        probs, pooled = model.forward_head(features).softmax(-1), model.forward_head(features, pre_logits=True)
    top = probs.topk(3)
    assert [r.path for r in rows] == paths and predictor.embedding_dim == pooled.shape[1]
    for row, values, indices, emb in zip(rows, top.values, top.indices, pooled):
        assert [c for c, _ in row.top] == [predictor.classes[i] for i in indices.tolist()]
        assert np.allclose([p for _, p in row.top], values.numpy(), atol=1e-5)
        assert np.allclose(row.embedding, emb.numpy(), atol=1e-4)
    pil = list(predictor.predict_images([Image.open(p) for p in paths[:3]], k=3))  # PIL images too
    assert [r.top[0][0] for r in pil] == [r.top[0][0] for r in rows[:3]]


def test_fast_decoding_keeps_the_digits_answers_and_stays_opt_in(tmp_path, digits_run):
    """JPEG draft decoding (DCT-domain scaling) against the reference Pillow pipeline: top-1
    agreement of at least 99.5% on the digits validation set (trained model). On photos the
    digits model's answers are fragile (re-encoding them at quality 95 already moves 1%), and
    draft decoding moved 3.5% (docs/benchmarks.md): below the bar, so it stays off by default."""
    from hybridvit.bench.photos import make_photos
    from hybridvit.data.datasets import digits_split

    images, _, _, val = digits_split()
    (tmp_path / "digits").mkdir()
    digits = []
    for n in val:  # 128x128 JPEGs: large enough for the decoder to scale down by 2
        pixels = (images[n] * (255 / 16)).astype(np.uint8)
        digits.append(str(tmp_path / "digits" / f"{n}.jpg"))
        Image.fromarray(pixels).resize((128, 128), Image.BICUBIC).save(digits[-1], quality=90)
    photos = make_photos(tmp_path / "photos", 200)
    kwargs = dict(backend="onnxruntime", model_threads=1)
    reference, fast = Predictor(InferenceSpec(digits_run, "fp32", **kwargs)), Predictor(InferenceSpec(digits_run, "fp32", fast_decode=True, **kwargs))
    assert fast.preprocess.draft is not None and reference.preprocess.draft is None
    agreement = {}
    for name, paths in (("digits", digits), ("photos", photos)):
        ref = [r.top[0][0] for r in reference.predict_images(paths, k=1)]
        got = [r.top[0][0] for r in fast.predict_images(paths, k=1)]
        agreement[name] = np.mean(np.array(ref) == np.array(got))
    assert agreement["digits"] >= 0.995 and agreement["photos"] >= 0.9, agreement
    for path in (digits[0], photos[0]):  # the shortcut was taken: not the same pixels
        assert np.abs(fast.preprocess(path).astype(int) - reference.preprocess(path)).mean() > 0
    assert Predictor(digits_run).preprocess.draft is None


def test_a_static_int8_onnx_file_predicts_with_its_folders_preprocessing(tmp_path, digits_run):
    import shutil

    from hybridvit.inference.export import onnxruntime_session

    shutil.copytree(digits_run, tmp_path / "run")
    paths = _digits(tmp_path / "in", 24)
    result = runner.invoke(app, ["quantize", str(tmp_path / "run"), "--calibration", str(tmp_path / "in"),
                                 "--images", "16", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    (onnx_file,) = (tmp_path / "run").glob("*_int8.onnx")
    rows = list(Predictor(InferenceSpec(onnx_file, model_threads=1)).predict_images(paths, k=2))
    model, extra = load_trained(digits_run)
    transform = eval_transform(get_model_info(model.model_name), model.input_hw, extra.get("crop_pct"))
    x = torch.stack([transform(load_image(p)) for p in paths]).numpy()
    probs = torch.from_numpy(onnxruntime_session(str(onnx_file), 1).run(None, {"images": x})[0]).softmax(-1)
    assert [r.top[0][0] for r in rows] == [str(i) for i in probs.argmax(1).tolist()]
    assert np.allclose([r.top[0][1] for r in rows], probs.max(1).values.numpy(), atol=1e-3)
    with pytest.raises(ValueError, match="class scores only"):
        Predictor(InferenceSpec(onnx_file, embeddings=True))


def test_exif_orientation_is_applied_unless_turned_off(tmp_path):
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[:, :20] = 255  # white on the left: which way it is turned shows
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: a viewer rotates it 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "turned.jpg", exif=exif, quality=100)
    geometry = eval_geometry(get_model_info("levit_128s"), (32, 32), crop_pct=1.0)
    upright = Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_270)
    expected = {True: np.asarray(geometry(upright)), False: np.asarray(geometry(Image.fromarray(pixels)))}
    for exif_on in (True, False):
        got = Preprocess(geometry, (32, 32), exif=exif_on)(str(tmp_path / "turned.jpg")).transpose(1, 2, 0)
        assert np.abs(got.astype(int) - expected[exif_on]).mean() < 8, exif_on  # JPEG noise only
        assert np.abs(got.astype(int) - expected[not exif_on]).mean() > 40, exif_on


def _bad_and_odd_files(folder) -> tuple[list[str], set[str]]:
    """Every kind of file a collection holds; returns the listing and the names that must fail."""
    digit = Image.open(_digits(folder / "src", 1)[0]).convert("RGB")
    digit.save(folder / "good.png")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "text.jpg").write_text("just some words")
    digit.resize((320, 320)).save(folder / "whole.jpg")
    (folder / "truncated.jpg").write_bytes((folder / "whole.jpg").read_bytes()[:600])
    digit.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.asarray(digit.convert("L")).astype(np.uint16) * 257).save(folder / "16bit.png")
    digit.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    digit.save(folder / "animated.gif", save_all=True, append_images=[Image.new("RGB", digit.size, (255, 0, 0))])
    from test_inference import _bomb_png

    _bomb_png(folder / "bomb.png")
    names = ["good.png", "zero.jpg", "corrupt.jpg", "text.jpg", "truncated.jpg", "cmyk.jpg", "16bit.png",
             "palette.png", "animated.gif", "bomb.png", "vanished.jpg"]
    return [str(folder / n) for n in names], {"zero.jpg", "corrupt.jpg", "text.jpg", "truncated.jpg", "bomb.png",
                                              "vanished.jpg"}


def test_bad_inputs_become_error_rows_and_the_run_goes_on(tmp_path, digits_run):
    listing, failing = _bad_and_odd_files(tmp_path / "in")
    (tmp_path / "in" / "vanished.jpg").write_bytes((tmp_path / "in" / "good.png").read_bytes())
    (tmp_path / "list.txt").write_text("\n".join(listing) + "\n")

    def vanishing(paths):  # the file is there when listed and gone when read
        for p in paths:
            if p.endswith("vanished.jpg"):
                os.remove(p)
            yield p

    predictor = Predictor(InferenceSpec(digits_run, "fp32", backend="onnxruntime", model_threads=1))
    rows = list(predictor.predict_images(vanishing(iter_inputs([tmp_path / "list.txt"]))))
    assert [os.path.basename(r.path) for r in rows] == [os.path.basename(p) for p in listing]
    assert {os.path.basename(r.path) for r in rows if r.error} == failing
    by_name = {os.path.basename(r.path): r for r in rows}
    assert "decompression bomb" in by_name["bomb.png"].error and "truncated" in by_name["truncated.jpg"].error
    assert "No such file" in by_name["vanished.jpg"].error
    good = by_name["good.png"].top[0][0]
    for name in ("cmyk.jpg", "16bit.png", "palette.png", "animated.gif"):  # read right: the same digit
        assert by_name[name].top[0][0] == good, name
    # the command: the same rows in the file, exit code 1 for the failures
    result = runner.invoke(app, ["predict", str(digits_run), str(tmp_path / "list.txt"), "-o",
                                 str(tmp_path / "o.jsonl"), *FAST])
    assert result.exit_code == 1, result.output
    written = _read(tmp_path / "o.jsonl")
    assert len(written) == len(listing) and sum(r["error"] is not None for r in written) == len(failing)


def test_predict_command_reads_folders_and_stdin_into_parquet(tmp_path, digits_run):
    paths = _digits(tmp_path / "photos", 30)
    result = runner.invoke(app, ["predict", str(digits_run), str(tmp_path / "photos"), "-o", str(tmp_path / "p.parquet"),
                                 "--embeddings", "--top", "2", *FAST])
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert [r["path"] for r in table] == paths and all(len(r["classes"]) == 2 for r in table)
    assert "30 image(s), 0 failed" in result.output and "fp32/onnxruntime" in result.output
    result = runner.invoke(app, ["predict", str(digits_run), "-", "--json", *FAST], input="\n".join(paths[:4]) + "\n")
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [r["path"] for r in lines] == paths[:4]
    assert [r["top"][0]["class"] for r in lines] == [r["classes"][0] for r in table[:4]]


def test_resume_needs_an_output_and_yes_needs_the_file(tmp_path, digits_run):
    result = runner.invoke(app, ["predict", str(digits_run), str(tmp_path), "--resume", "yes"])
    assert isinstance(result.exception, ValueError) and "--output" in str(result.exception)
    result = runner.invoke(app, ["predict", str(digits_run), str(tmp_path), "-o", str(tmp_path / "x.csv"), "--resume",
                                 "yes"])
    assert isinstance(result.exception, FileNotFoundError) and "nothing to resume" in str(result.exception)
    result = runner.invoke(app, ["predict", str(digits_run), str(tmp_path), "-o", str(tmp_path / "x.txt")])
    assert isinstance(result.exception, ValueError) and ".csv, .jsonl, .parquet" in str(result.exception)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_sigkill_twice_then_resume_gives_the_uninterrupted_rows(tmp_path, digits_run, suffix):
    from hybridvit.serving.outputs import ROWS_PER_PART

    count = 2 * ROWS_PER_PART + 500 if suffix == ".parquet" else 1200
    _digits(tmp_path / "in", count)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"nope")  # an error row is a row too
    command = [sys.executable, "-m", "hybridvit", "predict", str(digits_run), str(tmp_path / "in"), "--batch-size",
               "4", *FAST]
    done = subprocess.run(command + ["-o", str(tmp_path / f"whole{suffix}")], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr  # the broken file
    out = tmp_path / f"killed{suffix}"

    def rows_written() -> int:
        if suffix == ".parquet":
            parts = sorted((tmp_path / f"killed{suffix}.parts").glob("part-*.parquet"))
            return len(parts) * ROWS_PER_PART
        return out.read_bytes().count(b"\n") if out.exists() else 0

    rng = random.Random(0)
    for kill, resume in ((1, "no"), (2, "yes")):
        # a random row count in each third of the run (Parquet: the part files written)
        at = kill * ROWS_PER_PART if suffix == ".parquet" else rng.randint(kill * 400 - 350, kill * 400)
        proc = subprocess.Popen(command + ["-o", str(out), "--resume", resume], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: rows_written() >= at, proc)
        proc.kill()
        proc.wait()
        assert proc.returncode == -9  # killed mid-run, not finished
    done = subprocess.run(command + ["-o", str(out), "--resume"], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    whole, resumed = _read(tmp_path / f"whole{suffix}"), _read(out)
    assert len(resumed) == len(whole) == count + 1
    key = lambda r: r["path"]  # noqa: E731
    assert sorted(r["path"] for r in resumed) == sorted(r["path"] for r in whole)  # no duplicate, none missing
    for a, b in zip(sorted(whole, key=key), sorted(resumed, key=key)):
        assert (a["path"], a["error"], a["classes"]) == (b["path"], b["error"], b["classes"])
        assert np.allclose(a["probabilities"], b["probabilities"], atol=1e-5)


# -- int8 ------------------------------------------------------------------------------------------

TRAIN_RGB, VAL_RGB = (200, 40, 10), (10, 40, 200)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A saved 32x32, 10-class LeViT-128S (untrained): quick to quantize."""
    import hybridvit

    folder = tmp_path_factory.mktemp("model") / "levit"
    hybridvit.save_model(hybridvit.create_model("levit_128s", img_size=32, num_classes=10), folder)
    return folder


def _splits(root):
    """An ImageNet-layout folder whose splits tell apart by colour: 5 train images, 3 val images."""
    for split, colour, count in (("train", TRAIN_RGB, 5), ("val", VAL_RGB, 3)):
        (root / split / "a").mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (40 + 3 * i, 40), colour).save(root / split / "a" / f"{i}.png")
    return root


def test_auto_weighs_static_int8_calibrated_on_train_and_checked_on_val_in_raw_pixels(tmp_path, monkeypatch,
                                                                                       small_model):
    import hybridvit.serving.predict as predict_module

    root = _splits(tmp_path / "data")
    real, received = predict_module.optimize, []

    def recording(model, precision, example, backend, **images):
        received.append(images)
        return real(model, precision, example, backend, **images)

    monkeypatch.setattr(predict_module, "optimize", recording)
    predictor = Predictor(InferenceSpec(small_model, "auto", backend="onnxruntime", calibration=root, validation=root,
                                        model_threads=1))
    run = predictor.predict_images([], k=1)
    list(run)  # an empty run builds the model for its split: its time is the run's
    model = predictor.model_for(1)
    (images,) = received
    for name, colour, count in (("calibration", TRAIN_RGB, 5), ("validation", VAL_RGB, 3)):
        pixels = torch.cat(list(images[name]))
        assert pixels.shape == (count, 3, 32, 32), name  # the deployed model's input, every image of its split
        assert (pixels.mean((0, 2, 3)) - torch.tensor(colour)).abs().max() < 2, name  # 0-255, not normalised
    assert set(model.agreement) == {"int8-static/onnxruntime"}  # int8 was weighed...
    assert set(model.measured) == {"fp32/onnxruntime", "int8-static/onnxruntime"}  # ...beside fp32
    assert predictor.build_seconds > 0 and run.build_seconds == predictor.build_seconds
    assert run.reason == model.reason and run.reason.startswith(f"{run.path_used} at ")  # why that path


def test_other_thread_counts_and_lanes_reuse_the_int8_model_calibrated_once(tmp_path, monkeypatch, small_model):
    import importlib

    optimize_module = importlib.import_module("hybridvit.inference.optimize")  # the package attribute is the function
    real, calibrated = optimize_module.quantize_static, []

    def counting(*args, **kwargs):
        calibrated.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(optimize_module, "quantize_static", counting)
    predictor = Predictor(InferenceSpec(small_model, "int8-static", backend="nncf", calibration=_splits(tmp_path / "data")))
    first = predictor.model_for(1)
    others = {(2, 0): predictor.model_for(2), (1, 1): predictor.model_for(1, lane=1)}
    assert calibrated == ["nncf"]
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for (threads, _), other in others.items():  # OpenVINO models of their own, on their thread count
        assert other is not first and (other.precision, other.backend) == ("int8-static", "nncf")
        assert all(c.get_property("INFERENCE_NUM_THREADS") == threads for c in other.runners[32, 32].compiled.values())
        assert torch.allclose(other(x), first(x), rtol=1e-4, atol=1e-4)


def test_int8_folders_are_checked_before_any_work(tmp_path, small_model):
    root = _splits(tmp_path / "data")
    (tmp_path / "int8.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="an ONNX file runs as it was written; --calibration and --validation"):
        Predictor(InferenceSpec(tmp_path / "int8.onnx", validation=root))
    with pytest.raises(FileNotFoundError, match=f"--validation {tmp_path / 'missing'} is not a folder"):
        Predictor(InferenceSpec(small_model, validation=tmp_path / "missing"))
    with pytest.raises(ValueError, match="int8-static needs --calibration"):
        Predictor(InferenceSpec(small_model, "int8-static", validation=root))
    with pytest.raises(ValueError, match="--calibration is for --precision auto, int8-static; got fp32"):
        Predictor(InferenceSpec(small_model, "fp32", calibration=root))
    with pytest.raises(ValueError, match="--calibration with --precision auto needs --validation"):
        Predictor(InferenceSpec(small_model, calibration=root))  # auto would not weigh int8 unchecked: the folder would go unread


def test_predict_command_runs_static_int8_calibrated_on_a_folder(tmp_path, small_model):
    root = _splits(tmp_path / "data")
    result = runner.invoke(app, ["predict", str(small_model), str(root / "val"), "-o", str(tmp_path / "o.jsonl"),
                                 "--precision", "int8-static", "--calibration", str(root)])
    assert result.exit_code == 0, result.output
    assert "3 image(s), 0 failed" in result.output and "int8-static/" in result.output
    assert len(_read(tmp_path / "o.jsonl")) == 3


# -- Ray -------------------------------------------------------------------------------------------


def _spec(digits_run, **changes):
    fields = dict(source=str(digits_run), precision="fp32", backend="onnxruntime", batch_size=8, embeddings=True,
                  model_threads=1)
    return InferenceSpec(**{**fields, **changes})


def test_ray_actors_build_their_int8_model_from_the_specs_folders(tmp_path, small_model):
    root = _splits(tmp_path / "data")
    spec = _spec(small_model, precision="int8-static", calibration=str(root), validation=str(root), embeddings=False)
    from hybridvit.inference.machine import torch_threads
    from hybridvit.serving.ray_data import actor_predictor

    with torch_threads(None):  # the actor sets its process's thread count: given back here
        model = actor_predictor(spec).model_for(spec.model_threads)  # what each model actor runs
    assert (model.precision, model.backend, list(model.agreement)) == ("int8-static", "onnxruntime",
                                                                        ["int8-static/onnxruntime"])


def _ray_rows(folder) -> dict[str, dict]:
    rows = pq.read_table(folder).to_pylist()
    by_path = {r["path"]: r for r in rows}
    assert len(by_path) == len(rows)  # no duplicate
    return by_path


def _assert_same_as_local(by_path, local: list[Prediction]):
    assert set(by_path) == {r.path for r in local}  # none missing
    for row in local:
        got = by_path[row.path]
        assert got["error"] == row.error and got["classes"] == [c for c, _ in row.top]
        if row.error is None:
            assert np.allclose(got["probabilities"], [p for _, p in row.top], atol=1e-5)
            assert np.allclose(got["embedding"], row.embedding, atol=1e-4)


@pytest.mark.slow
def test_ray_rows_equal_the_local_rows(tmp_path, digits_run, local_ray):
    from hybridvit.serving.ray_data import predict_on_ray

    paths = _digits(tmp_path / "in", 60)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"nope")
    local = list(Predictor(InferenceSpec(digits_run, "fp32", backend="onnxruntime", embeddings=True, model_threads=1))
                 .predict_images(iter_inputs([tmp_path / "in"]), k=3))
    rows, failed = predict_on_ray(_spec(digits_run), [str(tmp_path / "in")], tmp_path / "out", 3, actors=1)
    assert (rows, failed) == (len(paths) + 1, 1)
    _assert_same_as_local(_ray_rows(tmp_path / "out"), local)
    pq.write_table(pa.table({"path": [os.path.relpath(p, tmp_path) for p in paths[:10]]}), tmp_path / "m.parquet")
    predict_on_ray(_spec(digits_run), [str(tmp_path / "m.parquet")], tmp_path / "out2", 3, actors=1)  # a manifest
    assert set(_ray_rows(tmp_path / "out2")) == set(paths[:10])


def _model_actor_pids() -> list[int]:
    """Processes of Ray Data's model actors (their titles name the ``_Model`` stage)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            title = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ")
        except OSError:
            continue
        if b"ray::" in title and b"_Model" in title:
            pids.append(int(entry))
    return pids


@pytest.mark.slow
def test_a_model_actor_killed_mid_run_is_replaced_and_nothing_is_lost(tmp_path, digits_run, local_ray):
    import signal
    import threading

    from hybridvit.serving.ray_data import predict_on_ray

    _digits(tmp_path / "in", 160)
    local = list(Predictor(InferenceSpec(digits_run, "fp32", backend="onnxruntime", embeddings=True, model_threads=1))
                 .predict_images(iter_inputs([tmp_path / "in"]), k=3))
    result: dict = {}
    run = threading.Thread(target=lambda: result.update(rows=predict_on_ray(
        _spec(digits_run, batch_size=4), [str(tmp_path / "in")], tmp_path / "out", 3, actors=1)))
    run.start()
    deadline = time.monotonic() + 600  # a guard against a hang, not a delay: the loop waits for the condition
    while run.is_alive() and time.monotonic() < deadline:  # some blocks written: the actor is mid-run
        if any((tmp_path / "out").glob("*.parquet")) and (pids := _model_actor_pids()):
            break
        time.sleep(0.05)
    assert run.is_alive(), "the run ended before its model actor could be killed"
    os.kill(pids[0], signal.SIGKILL)
    run.join()
    assert result["rows"] == (160, 0)
    _assert_same_as_local(_ray_rows(tmp_path / "out"), local)


# -- hostile use -----------------------------------------------------------------------------------


def test_listing_follows_linked_folders_once_and_keeps_unmatched_patterns(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.jpg", "a/b/2.jpg"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "a" / "b" / "up").symlink_to(tmp_path / "a")  # a loop
    (tmp_path / "linked").symlink_to(tmp_path / "a" / "b")
    t = str(tmp_path)
    assert list(iter_inputs([f"{t}/a"])) == [f"{t}/a/1.jpg", f"{t}/a/b/2.jpg"]  # the loop is not entered again
    assert list(iter_inputs([f"{t}/linked"])) == [f"{t}/linked/2.jpg", f"{t}/linked/up/1.jpg"]
    assert list(iter_inputs([f"{t}/none/*.jpg"])) == [f"{t}/none/*.jpg"]  # an error row, as a missing file is


def test_manifests_with_a_byte_order_mark_or_long_fields_are_read(tmp_path):
    (tmp_path / "bom.csv").write_text("path,label\nx.jpg,cat\n", encoding="utf-8-sig")
    (tmp_path / "long.tsv").write_text("path\n" + "y" * 200_000 + ".jpg\nz.jpg\n")
    check_sources([tmp_path / "bom.csv", tmp_path / "long.tsv"])
    listed = list(iter_inputs([tmp_path / "bom.csv", tmp_path / "long.tsv"]))
    assert listed == [str(tmp_path / "x.jpg"), str(tmp_path / ("y" * 200_000 + ".jpg")), str(tmp_path / "z.jpg")]


def _special_files(folder) -> dict[str, str]:
    """A folder with a named pipe, device links, a dangling link and a folder named like an image
    among good images; returns what each name must give (a class, or words of its error)."""
    paths = _digits(folder, 3)
    os.mkfifo(folder / "pipe.jpg")
    (folder / "zero.jpg").symlink_to("/dev/zero")
    (folder / "random.png").symlink_to("/dev/urandom")
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    (folder / "folder.jpg").mkdir()
    return {**{os.path.basename(p): "" for p in paths}, "pipe.jpg": "named pipe", "zero.jpg": "character device",
            "random.png": "character device", "dangling.jpg": "No such file"}


def test_special_files_become_error_rows_and_nothing_hangs(tmp_path, digits_run):
    """A named pipe once hung the run forever, losing the rows of its batch."""
    wanted = _special_files(tmp_path / "in")
    done = subprocess.run([sys.executable, "-m", "hybridvit", "predict", str(digits_run), str(tmp_path / "in"), "-o",
                           str(tmp_path / "o.csv"), *FAST], capture_output=True, text=True, timeout=600)  # a guard
    assert done.returncode == 1, done.stderr
    rows = {os.path.basename(r["path"]): r for r in _read(tmp_path / "o.csv")}
    assert sorted(rows) == sorted(wanted)  # each once; a folder named .jpg is a folder, not an input
    for name, words in wanted.items():
        assert (rows[name]["error"] or "") and words in rows[name]["error"] if words else rows[name]["classes"], name


def test_json_output_is_json_lines_with_error_rows_and_diagnostics_on_stderr(tmp_path, digits_run):
    paths = _digits(tmp_path / "in", 2)
    (tmp_path / "in" / "bad.jpg").write_bytes(b"nope")
    result = CliRunner().invoke(app, ["predict", str(digits_run), str(tmp_path / "in"), "--json", *FAST])
    assert result.exit_code == 1
    rows = [json.loads(line) for line in result.stdout.splitlines()]  # every line of stdout is JSON
    assert [r["path"] for r in rows] == sorted(paths + [str(tmp_path / "in" / "bad.jpg")])
    assert "cannot read image" in rows[-1]["error"] and "top" in rows[0]
    assert "error:" not in result.stdout


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_resume_matches_paths_however_spelled_appends_to_a_finished_file_and_counts_earlier_failures(
        tmp_path, digits_run, suffix, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _digits(tmp_path / "in", 4)
    (tmp_path / "in" / "bad.jpg").write_bytes(b"nope")
    out = str(tmp_path / f"o{suffix}")
    first = runner.invoke(app, ["predict", str(digits_run), "in", "-o", out, *FAST])
    assert first.exit_code == 1 and "5 image(s), 1 failed" in first.output, first.output
    _digits(tmp_path / "in", 2, start=4)  # two more images, and the folder spelled otherwise
    again = runner.invoke(app, ["predict", str(digits_run), f"./in/../../{tmp_path.name}/in/", "-o",
                                out, "--resume", "yes", *FAST])
    assert again.exit_code == 1, again.output  # the failure written before counts, as in one run
    assert "2 image(s) (5 from before), 1 failed" in again.output, again.output
    rows = _read(out)
    assert len(rows) == 7 and len({os.path.abspath(r["path"]) for r in rows}) == 7
    done = runner.invoke(app, ["predict", str(digits_run), str(tmp_path / "in"), "-o", out, "--resume", "yes", *FAST])
    assert "0 image(s) (7 from before), 1 failed" in done.output and len(_read(out)) == 7


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_resume_with_another_top_is_refused_and_a_top_beyond_the_classes_is_clamped(tmp_path, digits_run, suffix):
    _digits(tmp_path / "in", 2)
    out = str(tmp_path / f"o{suffix}")
    assert runner.invoke(app, ["predict", str(digits_run), str(tmp_path / "in"), "-o", out, "--top", "1000",
                               *FAST]).exit_code == 0
    assert all(len(r["classes"]) == 10 for r in _read(out))  # the digits' 10 classes, not 1000 columns
    if suffix == ".csv":
        assert open(out).readline().count(",") + 1 == 2 + 2 * 10
    if suffix == ".parquet":
        assert pq.read_schema(out).metadata[b"top"] == b"10"
    same = runner.invoke(app, ["predict", str(digits_run), str(tmp_path / "in"), "-o", out, "--top", "1000",
                               "--resume", "yes", *FAST])
    assert same.exit_code == 0, same.output  # clamped the same way: the same options
    other = runner.invoke(app, ["predict", str(digits_run), str(tmp_path / "in"), "-o", out, "--top", "2",
                                "--resume", "yes", *FAST])
    assert isinstance(other.exception, ValueError) and "other options" in str(other.exception)
    assert len(_read(out)) == 2 and all(len(r["classes"]) == 10 for r in _read(out))


def test_sigterm_writes_every_finished_row_before_exiting(tmp_path, digits_run):
    """Rows waiting for their Parquet part file are written on SIGTERM, as on Ctrl-C (the
    process signals itself once the 12th path has been read, so the pending rows are known)."""
    import signal

    from hybridvit.cli.predict import interrupt_on_sigterm
    from hybridvit.serving.collection import predict_collection

    paths = _digits(tmp_path / "in", 20)

    class Paths:  # standard input that ends the run by SIGTERM partway
        def __iter__(self):
            for n, path in enumerate(paths):
                if n == 12:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield path + "\n"

    predictor = Predictor(InferenceSpec(digits_run, "fp32", backend="onnxruntime", batch_size=1, model_threads=1))
    out = tmp_path / "o.parquet"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), interrupt_on_sigterm():
        predict_collection(predictor, ["-"], 3, out, stdin=Paths())
    parts = sorted((tmp_path / "o.parquet.parts").glob("part-*.parquet"))
    kept = [r["path"] for part in parts for r in pq.read_table(part).to_pylist()]
    assert 0 < len(kept) < 12 and kept == paths[:len(kept)]  # the rows yielded before the signal, in order
    assert signal.getsignal(signal.SIGTERM) == before  # given back
    summary = predict_collection(predictor, paths, 3, out, resume=True)
    assert summary.resumed == len(kept) and [r["path"] for r in _read(out)] == paths


@pytest.mark.slow
def test_the_command_exits_130_on_sigterm_and_resume_finishes_the_file(tmp_path, digits_run):
    import signal

    from hybridvit.serving.outputs import ROWS_PER_PART

    _digits(tmp_path / "in", ROWS_PER_PART + 300)
    out = tmp_path / "o.parquet"
    command = [sys.executable, "-m", "hybridvit", "predict", str(digits_run), str(tmp_path / "in"), "-o", str(out),
               "--batch-size", "4", *FAST]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any((tmp_path / "o.parquet.parts").glob("part-*.parquet")), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130 and "interrupted" in err and "--resume" in err, err
    done = subprocess.run(command + ["--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(r["path"] for r in _read(out)) == sorted(iter_inputs([tmp_path / "in"]))


def test_pil_images_are_turned_by_their_exif_as_paths_are(tmp_path):
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "turned.jpg", exif=exif, quality=100)
    geometry = eval_geometry(get_model_info("levit_128s"), (32, 32), crop_pct=1.0)
    for exif_on in (True, False):
        preprocess = Preprocess(geometry, (32, 32), exif=exif_on)
        with Image.open(tmp_path / "turned.jpg") as opened:
            assert np.array_equal(preprocess(opened), preprocess(str(tmp_path / "turned.jpg"))), exif_on


def test_an_onnx_file_refuses_options_it_would_ignore(tmp_path, digits_run):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"")  # refused before it is read
    for options in (["--precision", "int8"], ["--backend", "openvino"], ["--embeddings"]):
        result = runner.invoke(app, ["predict", str(onnx), str(tmp_path), *options])
        assert isinstance(result.exception, ValueError) and "ONNX file" in str(result.exception), options
