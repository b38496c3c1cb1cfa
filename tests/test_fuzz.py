"""Fuzzing ``predict`` and the server with generated inputs (hypothesis), bounded in examples:
folders with special files and odd names, manifests of every format with odd rows, request
bodies, headers and query strings. The invariants: no traceback; no 5xx for a client's error;
every listed image appears exactly once in the output, as a row or as an error row; an output
never replaces an input; exit codes as documented (README, "Exit codes")."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import json
import os
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from hybridvit.cli import app
from hybridvit.serving.collection import predict_collection
from hybridvit.serving.inputs import check_sources, iter_inputs
from hybridvit.serving.predict import InferenceSpec, Predictor
from prometheus_text import by_status

CAMPAIGN = int(os.environ.get("HYBRIDVIT_FUZZ_CAMPAIGN", "0"))  # N: N times the examples, freshly drawn


def fuzz(examples: int) -> settings:
    """Bounded and repeatable in the suite: the same ``examples`` examples each run, none stored on
    disk. A campaign (``HYBRIDVIT_FUZZ_CAMPAIGN=N``) draws N times as many, new ones each time."""
    return settings(max_examples=examples * max(CAMPAIGN, 1), deadline=None, derandomize=not CAMPAIGN,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

KINDS = ("png", "jpeg", "empty", "garbage", "truncated", "pipe", "device", "dangling", "folder", "loop")
SUFFIXES = (".png", ".jpg", ".JPEG", ".gif", ".txt", "")
# file names: any character a file system takes (no "/", no NUL), not "." or ".."
NAMES = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1,
                max_size=24).filter(lambda s: s not in (".", "..") and len(s.encode()) < 200)
ENTRIES = st.lists(st.tuples(NAMES, st.sampled_from(KINDS), st.sampled_from(SUFFIXES)), max_size=8,
                   unique_by=lambda e: e[0] + e[2])
ODD_ROWS = st.lists(st.one_of(NAMES, st.just("x" * 140_000), st.just("/dev/zero"), st.just("missing/*.jpg"),
                              st.just("../outside.png")), max_size=3)
_counter = itertools.count()


def _image_bytes(fmt: str, seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def _make(folder: Path, name: str, kind: str, seed: int) -> None:
    path = folder / name
    if kind in ("png", "jpeg"):
        path.write_bytes(_image_bytes(kind.upper(), seed))
    elif kind == "truncated":
        path.write_bytes(_image_bytes("JPEG", seed)[:100])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(seed).bytes(300))
    elif kind == "pipe":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "dangling":
        path.symlink_to(folder / "never-there")
    elif kind == "folder":
        path.mkdir()
        (path / "inner.png").write_bytes(_image_bytes("PNG", seed))
    else:  # a link back to the folder itself
        path.symlink_to(folder)


def _write_manifest(path: Path, rows: list[str]) -> None:
    if path.suffix == ".parquet":
        pq.write_table(pa.table({"path": rows}), path)
    elif path.suffix == ".txt":
        path.write_text("".join(r + "\n" for r in rows if r.strip() and not r.lstrip().startswith("#")
                                and "\n" not in r and "\r" not in r), encoding="utf-8")
    else:
        with open(path, "w", newline="", encoding="utf-8-sig") as f:  # a spreadsheet's export: with a BOM
            writer = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writerow(["label", "path"])
            writer.writerows([["x", r] for r in rows])


def _rows_of(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [{"path": r["path"], "error": r.get("error")} for r in map(json.loads, path.open(encoding="utf-8"))]
    with open(path, newline="", encoding="utf-8") as f:
        return [{"path": r["path"], "error": r["error"] or None} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def predictor(digits_run):
    return Predictor(InferenceSpec(digits_run, "fp32", backend="onnxruntime", batch_size=4, model_threads=1))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@fuzz(150)
@given(entries=ENTRIES, odd=ODD_ROWS, manifest=st.sampled_from([None, ".txt", ".csv", ".tsv", ".parquet"]),
       output=st.sampled_from([".csv", ".jsonl", ".parquet"]), onto_input=st.booleans(), k=st.integers(1, 40))
def test_every_listed_image_is_one_row_and_no_input_is_replaced(predictor, scratch, entries, odd, manifest, output,
                                                                onto_input, k):
    case = scratch / f"case{next(_counter)}"
    folder = case / "in"
    folder.mkdir(parents=True)
    for seed, (name, kind, suffix) in enumerate(entries):
        _make(folder, name + suffix, kind, seed)
    sources = [str(folder)]
    if manifest is not None:
        sources = [str(case / f"list{manifest}")]
        _write_manifest(Path(sources[0]), [os.path.join("in", n + s) for n, _, s in entries] + odd)
    before = {s: Path(s).read_bytes() for s in sources if os.path.isfile(s)}
    out = Path(sources[0]) if onto_input and manifest is not None else case / f"out{output}"
    if out.suffix not in (".csv", ".jsonl", ".parquet"):
        out = out.with_name(out.name + ".csv")  # a .txt/.tsv manifest cannot be an output anyway
    if out in map(Path, sources):
        with pytest.raises(ValueError, match="one of the run's inputs"):
            predict_collection(predictor, sources, k, out)
    else:
        check_sources(sources)  # what we wrote is always a valid manifest
        listing = list(iter_inputs(sources))
        summary = predict_collection(predictor, sources, k, out)
        rows = _rows_of(out)
        event(f"{min(len(rows), 6)}+ rows, {min(summary.failed, 3)}+ errors")
        assert Counter(r["path"] for r in rows) == Counter(listing)  # each listed image once, errors included
        assert summary.images == len(listing) and summary.failed == sum(r["error"] is not None for r in rows)
        kinds = {name + suffix: kind for name, kind, suffix in entries}
        for row in rows:  # a real image is read, whatever its name
            if kinds.get(os.path.relpath(row["path"], folder)) in ("png", "jpeg"):
                assert row["error"] is None, row
    assert {s: Path(s).read_bytes() for s in before} == before  # no input changed


@fuzz(20)
@given(entries=ENTRIES, json_lines=st.booleans(), top=st.integers(1, 30))
def test_the_command_keeps_stdout_machine_readable_and_its_exit_codes(digits_run, scratch, entries, json_lines, top):
    folder = scratch / f"cli{next(_counter)}"
    folder.mkdir()
    for seed, (name, kind, suffix) in enumerate(entries):
        _make(folder, name + suffix, kind, seed)
    args = ["predict", str(digits_run), str(folder), "--top", str(top), "--precision", "fp32", "--backend",
            "onnxruntime", "--model-threads", "1", *(["--json"] if json_lines else [])]
    result = CliRunner().invoke(app, args)
    listing = list(iter_inputs([folder]))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    if json_lines:
        rows = [json.loads(line) for line in result.stdout.splitlines()]  # nothing but JSON on stdout
        assert Counter(r["path"] for r in rows) == Counter(listing)
        failed = sum("error" in r for r in rows)
        assert all(len(r["top"]) == min(top, 10) for r in rows if "error" not in r)
    else:
        failed = sum(line.startswith("error: ") for line in result.stderr.splitlines())
        assert "error:" not in result.stdout
    assert result.exit_code == (1 if failed else 0), result.output


# -- the server ------------------------------------------------------------------------------------

CONTENT_TYPES = st.one_of(st.none(), st.sampled_from(["image/png", "image/jpeg", "application/octet-stream", "text/plain",
                                           "multipart/form-data", "multipart/form-data; boundary=zz", "", "image/"]),
                          st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30))
ODD_VALUES = st.one_of(st.integers(-5, 2000).map(str), st.sampled_from(["true", "false", "abc", "", "1e3", "nan", "%00"]))
QUERY = st.one_of(
    st.dictionaries(st.sampled_from(["top_k", "embeddings", "y", "x", "layer", "other"]), ODD_VALUES, max_size=3),
    st.fixed_dictionaries({"y": st.integers(-2, 40).map(str), "x": st.integers(-2, 40).map(str)},  # attention's
                          optional={"layer": st.integers(-12, 12).map(str), "top_k": ODD_VALUES}))
BODIES = st.one_of(st.binary(max_size=2048), st.sampled_from(["png", "jpeg", "truncated", "nan-tiff", "multipart",
                                                               "multipart-bad"]))
AUTH = st.sampled_from(["Bearer k"] * 6 + ["bearer k", "BEARER  k", None, "k", "Bearer", "Basic k", "Bearer wrong"])


def _body(kind: bytes | str, seed: int) -> tuple[bytes, str | None]:
    """A body for ``kind``, and the content type it must be sent with (None: the drawn one)."""
    if isinstance(kind, bytes):
        return kind, None
    if kind in ("png", "jpeg"):
        return _image_bytes(kind.upper(), seed), None
    if kind == "truncated":
        return _image_bytes("JPEG", seed)[:200], None
    if kind == "nan-tiff":
        buffer = io.BytesIO()
        Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32), mode="F").save(buffer, "TIFF")
        return buffer.getvalue(), None
    image = _image_bytes("PNG", seed)
    parts = b"".join(b"--zz\r\ncontent-disposition: form-data; name=\"f%d\"; filename=\"%d.png\"\r\n"
                     b"content-type: image/png\r\n\r\n" % (i, i) + image + b"\r\n" for i in range(seed % 3 + 1))
    if kind == "multipart-bad":
        parts = parts[: len(parts) // 2]
    return parts + b"--zz--\r\n", "multipart/form-data; boundary=zz"


@pytest.fixture(scope="module")
def live_app(digits_run):
    """One started app (its lifespan entered) on an event loop in a thread, and a client for it."""
    import httpx

    from hybridvit.serving.model_server import ModelServer, ServeConfig

    from hybridvit.serving.server import create_app

    server = ModelServer(Predictor(InferenceSpec(digits_run / "model", "fp32", backend="onnxruntime", batch_size=4)),
                         ServeConfig(max_wait_ms=1, max_body_mb=0.01, max_images=2,
                                     max_pixels=100_000, api_key="k"))
    app_ = create_app(server)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    lifespan = app_.router.lifespan_context(app_)
    asyncio.run_coroutine_threadsafe(lifespan.__aenter__(), loop).result()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app_), base_url="http://test")

    def call(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    sent: Counter[str] = Counter()
    yield call, client, server, sent
    call(client.aclose())
    call(lifespan.__aexit__(None, None, None))
    loop.call_soon_threadsafe(loop.stop)
    thread.join()


@fuzz(400)
@given(body=BODIES, kind=CONTENT_TYPES, query=QUERY, auth=AUTH, path=st.sampled_from(["/v1/predict", "/v1/attention"]),
       seed=st.integers(0, 1000))
def test_no_request_gets_a_server_error_and_every_refusal_is_named(live_app, body, kind, query, auth, path, seed):
    call, client, server, sent = live_app
    data, fixed_kind = _body(body, seed)
    headers = {"content-type": fixed_kind or kind or "image/png"}  # None: the right type
    if auth is not None:
        headers["authorization"] = auth
    try:
        response = call(client.post(path, content=data, headers=headers, params=query))
    except UnicodeEncodeError:  # httpx cannot send this header at all: nothing reached the server
        return
    if path == "/v1/predict":
        sent[str(response.status_code)] += 1
    event(f"{path} {response.status_code}")
    assert response.status_code < 500, response.text
    answer = response.json()
    if response.status_code >= 400:
        assert isinstance(answer["error"], str) and answer["error"] and "object at 0x" not in answer["error"]
    elif path == "/v1/predict":
        assert len(answer["predictions"]) >= 1 and all("top" in row for row in answer["predictions"])
    counted = {s: v for s, v in by_status(call(client.get("/metrics")).text).items() if v}
    assert counted == dict(sent)  # every predict request counted once, under its own status
