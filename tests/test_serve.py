"""``hybridvit serve``: the answers equal ``predict``'s, concurrent requests share batches, bad
uploads get named 4xx errors and the server goes on, a model error fails one batch only, and
non-local binds need an API key. Requests go through httpx's ASGI transport (no sockets), with
the app's own start-up and shut-down."""

from __future__ import annotations

import asyncio
import io
import re
import struct
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from prometheus_text import by_status, metric  # noqa: E402

from hybridvit.serving.batcher import Batcher  # noqa: E402
from hybridvit.serving.predict import InferenceSpec, Predictor  # noqa: E402
from hybridvit.serving.model_server import ModelServer, ServeConfig  # noqa: E402
from hybridvit.serving.server import check_bind, create_app  # noqa: E402


def _digit_files(folder, count: int) -> list[bytes]:
    from hybridvit.data.datasets import digits_split

    images, _, _, val = digits_split()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n in range(count):
        pixels = (images[val[n]] * (255 / 16)).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).resize((32, 32), Image.BICUBIC).convert("RGB").save(buffer, ["PNG", "JPEG"][n % 2])
        (folder / f"{n:03d}.{['png', 'jpg'][n % 2]}").write_bytes(buffer.getvalue())
        out.append(buffer.getvalue())
    return out


@pytest.fixture(scope="module")
def predictor(digits_run):
    return Predictor(InferenceSpec(digits_run / "model", "fp32", backend="onnxruntime", batch_size=8, embeddings=True))


def _serve(predictor, test, max_batch_size=None, **config):
    """Run ``test(client, server)`` against a started app (batches of at most ``max_batch_size``:
    the predictor's batch size unless given)."""
    if max_batch_size is not None:
        predictor = Predictor(predictor.spec.replace(batch_size=max_batch_size))
    server = ModelServer(predictor, ServeConfig(**config))
    app = create_app(server)

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await test(client, server)

    return asyncio.run(main())


_metric = metric


def test_answers_equal_predict_and_concurrent_requests_share_one_batch(tmp_path, predictor):
    files = _digit_files(tmp_path / "digits", 16)
    expected = predictor.predict(sorted(str(p) for p in (tmp_path / "digits").iterdir()), k=3)

    async def test(client, server):
        assert (await client.get("/ready")).json() == {"ready": True}
        # 16 requests at once, a batch of at most 16 that waits up to 30 s for them: exactly one model call
        answers = await asyncio.gather(*(client.post("/v1/predict?top_k=3&embeddings=true", content=data,
                                                     headers={"content-type": "image/png"}) for data in files))
        metrics = (await client.get("/metrics")).text
        several = await client.post("/v1/predict?top_k=3", files=[(f"f{i}", (f"{i:03d}.png", files[i], "image/png"))
                                                                  for i in range(3)])
        assert all(a.status_code == 200 for a in answers), answers[0].text
        return [a.json()["predictions"][0] for a in answers], metrics, several.json()["predictions"]

    rows, metrics, several = _serve(predictor, test, max_batch_size=16, max_wait_ms=30_000)
    for row, want in zip(rows, expected):
        assert [c["class"] for c in row["top"]] == [c for c, _ in want.top]
        assert np.allclose([c["probability"] for c in row["top"]], [p for _, p in want.top], atol=1e-5)
        assert np.allclose(row["embedding"], want.embedding, atol=1e-4)
    assert _metric(metrics, "hybridvit_batch_size_count") == 1  # the warm-up is not counted
    assert _metric(metrics, "hybridvit_batch_size_sum") == 16
    assert _metric(metrics, 'hybridvit_requests_total{status="200"}') == 16
    assert [r["path"] for r in several] == ["000.png", "001.png", "002.png"] and "embedding" not in several[0]
    assert [c["class"] for c in several[1]["top"]] == [c for c, _ in expected[1].top]


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (the pixel data never comes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_bad_uploads_get_named_4xx_errors_and_the_server_goes_on(tmp_path, predictor):
    (tmp_path / "on_the_server.jpg").write_bytes(_digit_files(tmp_path / "digits", 2)[1])
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, "JPEG", quality=90)
    jpeg = buffer.getvalue()  # large enough that half of it still has a whole header

    async def test(client, server):
        async def post(body, kind="image/jpeg", **kw):
            return await client.post("/v1/predict", content=body, headers={"content-type": kind}, **kw)

        answers = {
            "not an image": await post(b"hello, not an image"),
            "truncated": await post(jpeg[: len(jpeg) // 2]),
            "bomb": await post(_png_header(100_000, 100_000), "image/png"),
            "over the pixel limit": await post(_png_header(5_000, 5_000), "image/png"),
            "zero bytes": await post(b""),
            "wrong type": await post(jpeg, "text/plain"),
            "too big": await post(b"\xff" * (2 * 2**20)),
            "too many": await client.post("/v1/predict", files=[(f"f{i}", (f"{i}.jpg", jpeg, "image/jpeg"))
                                                                for i in range(5)]),
            # bytes only: a path on the server, as a body or a form field, is not read
            "a path as the body": await post(str(tmp_path / "on_the_server.jpg").encode()),
            "a path as a form field": await post(b'--b\r\ncontent-disposition: form-data; name="path"\r\n\r\n'
                                                 + str(tmp_path / "on_the_server.jpg").encode() + b"\r\n--b--\r\n",
                                                 "multipart/form-data; boundary=b"),
        }
        after = await post(jpeg)
        return answers, after

    answers, after = _serve(predictor, test, max_body_mb=1, max_images=4, max_pixels=1_000_000)
    status = {name: (r.status_code, r.json()["error"]) for name, r in answers.items()}
    assert status["not an image"][0] == 415 and "not an image" in status["not an image"][1]
    assert status["truncated"][0] == 422 and "truncated" in status["truncated"][1]
    assert status["bomb"][0] == 413 and "pixels" in status["bomb"][1]
    assert status["over the pixel limit"][0] == 413 and "25,000,000 pixels" in status["over the pixel limit"][1]
    assert status["zero bytes"][0] == 422 and "zero bytes" in status["zero bytes"][1]
    assert status["wrong type"][0] == 415 and "text/plain" in status["wrong type"][1]
    assert status["too big"][0] == 413 and "limit" in status["too big"][1]
    assert status["too many"][0] == 400 and "images" in status["too many"][1]
    assert status["a path as the body"][0] == 415
    assert status["a path as a form field"] == (400, "no image in the request")
    assert after.status_code == 200 and after.json()["predictions"][0]["top"]


def test_a_model_error_fails_its_batch_with_500_and_the_next_batch_works(tmp_path, predictor):
    image = _digit_files(tmp_path / "digits", 1)[0]

    async def test(client, server):
        model, calls = server.model, []

        def failing_once(x):
            calls.append(len(x))
            if len(calls) == 1:
                raise RuntimeError("out of memory (on purpose)")
            return model(x)

        server.model = failing_once
        first = await client.post("/v1/predict", content=image, headers={"content-type": "image/png"})
        second = await client.post("/v1/predict", content=image, headers={"content-type": "image/png"})
        return first, second

    first, second = _serve(predictor, test, max_wait_ms=0)
    assert first.status_code == 500 and "out of memory (on purpose)" in first.json()["error"]
    assert second.status_code == 200


def test_the_model_endpoint_docs_health_and_the_api_key(predictor):
    async def test(client, server):
        return {path: await client.get(path, headers=headers) for path, headers in (
            ("/health", {}), ("/docs", {}), ("/openapi.json", {}), ("/v1/model", {}),
            ("/v1/model?key", {"x-api-key": "s3cret"}), ("/v1/model?bearer", {"authorization": "Bearer s3cret"}))}

    got = _serve(predictor, test, api_key="s3cret")
    assert got["/health"].json() == {"status": "ok"} and got["/docs"].status_code == 200
    assert "/v1/predict" in got["/openapi.json"].json()["paths"]
    assert got["/v1/model"].status_code == 401
    info = got["/v1/model?key"].json()
    assert got["/v1/model?bearer"].json() == info
    assert info["model"] == "levit_128s" and info["classes"] == [str(i) for i in range(10)]
    assert info["precision"] == "fp32" and info["backend"] == "onnxruntime"
    assert info["preprocessing"]["center_crop"] == [32, 32] and info["embedding_dim"] > 0


def test_the_model_endpoint_reports_the_int8_agreement_measured(tmp_path, digits_run):
    _digit_files(tmp_path / "digits", 40)
    predictor = Predictor(InferenceSpec(digits_run / "model", "int8-static", backend="onnxruntime", batch_size=8,
                          calibration=tmp_path / "digits", validation=tmp_path / "digits"))

    async def test(client, server):
        return (await client.get("/v1/model")).json()

    info = _serve(predictor, test)
    assert (info["precision"], info["backend"]) == ("int8-static", "onnxruntime")
    assert list(info["agreement"]) == ["int8-static/onnxruntime"] and info["agreement"]["int8-static/onnxruntime"] > 0.9


def test_a_non_local_bind_needs_an_api_key():
    for host in ("127.0.0.1", "localhost", "::1"):
        check_bind(host, None, False)
    with pytest.raises(ValueError, match="--api-key"):
        check_bind("0.0.0.0", None, False)
    check_bind("0.0.0.0", "key", False)
    check_bind("0.0.0.0", None, True)


def test_the_serve_command_refuses_a_public_bind_without_a_key(digits_run):
    from typer.testing import CliRunner

    from hybridvit.cli import app

    result = CliRunner().invoke(app, ["serve", str(digits_run / "model"), "--host", "0.0.0.0"], env={})
    assert result.exit_code != 0 and "--api-key" in str(result.exception or result.output)


# -- the batcher alone -----------------------------------------------------------------------------


def test_the_batcher_drops_requests_whose_client_left_and_serves_the_rest():
    calls: list[list[int]] = []

    def run(images):
        calls.append(images[:, 0, 0, 0].tolist())
        return torch.from_numpy(images[:, 0, 0, :1].astype(np.float32))

    async def main():
        batcher = Batcher(run, max_batch_size=4, max_wait_s=60.0)
        tasks = [asyncio.ensure_future(batcher.submit(np.full((1, 1, 1), n, dtype=np.uint8))) for n in range(4)]
        while batcher.depth < 4:  # all four waiting for a batch (an observable condition)
            await asyncio.sleep(0)
        tasks[1].cancel()  # its client went away before the batch ran
        batcher.start()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop()
        return results

    results = asyncio.run(main())
    assert isinstance(results[1], asyncio.CancelledError)
    assert [float(r[0]) for i, r in enumerate(results) if i != 1] == [0.0, 2.0, 3.0]
    assert calls == [[0, 2, 3]]  # one batch, without the request that left


# -- a real server process ---------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_drains_the_requests_in_flight(tmp_path, digits_run):
    """A request whose body is half sent when SIGTERM arrives is still answered, and then the
    process ends."""
    import signal
    import subprocess
    import sys
    import threading

    from conftest import wait_for

    image = _digit_files(tmp_path / "digits", 1)[0]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "hybridvit", "serve", str(digits_run / "model"), "--port", str(port),
                             "--precision", "fp32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def get(path: str) -> httpx.Response | None:
        try:
            return httpx.get(url + path, timeout=30)
        except httpx.TransportError:
            return None

    signalled = threading.Event()
    answers: list[httpx.Response] = []

    def body():
        yield image[: len(image) // 2]
        signalled.wait(timeout=600)  # a guard, not a delay: set once SIGTERM is sent
        yield image[len(image) // 2:]

    def post() -> None:
        answers.append(httpx.post(url + "/v1/predict", content=body(), headers={"content-type": "image/png"},
                                  timeout=600))

    try:
        wait_for(lambda: (r := get("/ready")) is not None and r.status_code == 200, proc)
        client = threading.Thread(target=post)
        client.start()
        wait_for(lambda: "hybridvit_requests_in_flight 1.0" in get("/metrics").text, proc)
        proc.send_signal(signal.SIGTERM)
        signalled.set()
        client.join(timeout=600)
        # after draining, uvicorn re-raises the signal: the exit status says SIGTERM ended it
        assert proc.wait(timeout=600) == -signal.SIGTERM, proc.stdout.read()
    finally:
        signalled.set()
        if proc.poll() is None:
            proc.kill()
    assert [a.status_code for a in answers] == [200] and answers[0].json()["predictions"][0]["top"]


def test_a_lone_request_does_not_wait_for_a_batch_that_no_one_will_join():
    waiting = [0]  # images on their way, as the server counts them

    def run(images):
        return torch.from_numpy(images[:, 0, 0, :1].astype(np.float32))

    async def main():
        batcher = Batcher(run, max_batch_size=16, max_wait_s=600.0, incoming=lambda: waiting[0])
        batcher.start()
        lone = await asyncio.wait_for(batcher.submit(np.full((1, 1, 1), 7, dtype=np.uint8)), 60)  # a guard
        waiting[0] = 1  # another image is decoding: the next batch waits for it
        first = asyncio.ensure_future(batcher.submit(np.full((1, 1, 1), 8, dtype=np.uint8)))
        while batcher.depth < 1:
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not first.done()
        waiting[0] = 0
        second = await asyncio.wait_for(batcher.submit(np.full((1, 1, 1), 9, dtype=np.uint8)), 60)
        result = await first
        await batcher.stop()
        return float(lone[0]), float(result[0]), float(second[0])

    assert asyncio.run(main()) == (7.0, 8.0, 9.0)


def test_attention_maps_are_those_plot_attention_draws(tmp_path, digits_run, predictor):
    from hybridvit.api import load_source
    from hybridvit.figures import model_input
    from hybridvit.layers import attention_view, capture_maps

    image = _digit_files(tmp_path / "digits", 1)[0]
    (tmp_path / "one.png").write_bytes(image)
    model, extra = load_source(digits_run / "model")
    wanted = [attention_view(capture_maps(model.eval(), model_input(model, tmp_path / "one.png", extra)), layer,
                             (20.0, 9.0), (32, 32)) for layer in (-1, 0)]

    async def test(client, server):
        def post(query):
            return client.post(f"/v1/attention?{query}", content=image, headers={"content-type": "image/png"})

        return [await post("y=20&x=9"), await post("y=20&x=9&layer=0"), await post("y=40&x=9"),
                await post("y=1&x=1&layer=99")]

    last, first, outside, no_layer = _serve(predictor, test)
    for answer, want in zip((last, first), wanted):
        got = answer.json()
        assert (got["layer"], got["layers"], tuple(got["query_cell"])) == (want.layer, want.layers, want.query_cell)
        assert got["key_grid"] == list(want.maps.shape[1:])
        assert np.allclose(got["heads"], want.maps.numpy(), atol=1e-5)
    assert first.json()["layer"] == 0 and last.json()["layer"] == last.json()["layers"] - 1
    assert outside.status_code == 422 and "outside the 32x32 input" in outside.json()["error"]
    assert no_layer.status_code == 422 and "layer 99 does not exist" in no_layer.json()["error"]


def test_a_client_that_leaves_mid_batch_does_not_disturb_the_others(tmp_path, predictor):
    import threading

    files = _digit_files(tmp_path / "digits", 3)
    expected = predictor.predict(sorted(str(p) for p in (tmp_path / "digits").iterdir()), k=2)
    running, release = threading.Event(), threading.Event()

    async def test(client, server):
        model = server.model

        def held(x):  # the batch runs until the test lets it go
            running.set()
            assert release.wait(timeout=600)  # a guard: set once the client has left
            return model(x)

        server.model = held
        requests = [asyncio.ensure_future(client.post("/v1/predict?top_k=2", content=data,
                                                      headers={"content-type": "image/png"})) for data in files]
        while not running.is_set():  # all three in the one batch, now running
            await asyncio.sleep(0.001)
        requests[1].cancel()  # that client disconnects mid-batch
        await asyncio.gather(requests[1], return_exceptions=True)
        release.set()
        answers = [await requests[0], await requests[2]]
        server.model = model
        after = await client.post("/v1/predict?top_k=2", content=files[1], headers={"content-type": "image/png"})
        metrics = (await client.get("/metrics")).text
        return answers, after, metrics

    answers, after, metrics = _serve(predictor, test, max_batch_size=3, max_wait_ms=60_000)
    for answer, want in zip([*answers, after], [expected[0], expected[2], expected[1]]):
        assert answer.status_code == 200
        assert [c["class"] for c in answer.json()["predictions"][0]["top"]] == [c for c, _ in want.top]
    assert _metric(metrics, "hybridvit_requests_in_flight") == 0
    assert _metric(metrics, "hybridvit_batch_size_sum") == 4  # 3 in the held batch, then 1


def test_the_demo_page_is_served_at_the_root(predictor):
    async def test(client, server):
        return await client.get("/")

    page = _serve(predictor, test)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/predict" in page.text and "/v1/attention" in page.text


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _connections(port: int) -> int:
    """TCP connections to ``port`` that are open (established, or closing with data unread) on this machine."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                local, state = line.split()[1], line.split()[3]
                count += int(local.rsplit(":", 1)[1], 16) == port and state in ("01", "08")  # ESTABLISHED, CLOSE_WAIT
    return count


SLOW, GONE = 24, 24  # soak: clients that never finish their body, and clients that hang up mid-body


@pytest.mark.slow
def test_a_long_load_with_bad_slow_and_abandoned_clients_mixed_in(tmp_path, digits_run):
    """The soak test: 11,000 requests at concurrency 16 against a real server, one in ten bad (8
    kinds), with slow clients (a body that never ends) and clients that hang up mid-body mixed in:
    no 5xx, each bad request its named 4xx, each good one its ``predict`` answer, each slow client
    408 and its connection closed by the server, each hang-up 499; the counts in /metrics add up
    to the requests sent, by class; no connection is left open; and resident memory grows less
    than 10% over the last 10,000."""
    import socket
    import subprocess
    import sys
    import threading

    from conftest import wait_for

    files = _digit_files(tmp_path / "digits", 16)
    expected = [[c for c, _ in row.top] for row in Predictor(InferenceSpec(digits_run / "model", "fp32")).predict(
        sorted(str(p) for p in (tmp_path / "digits").iterdir()), k=3)]
    jpeg = files[1]
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(buffer, "JPEG")
    noise = buffer.getvalue()  # large enough that half of it still has a whole header
    bad = [  # (body, content type, status, words in the error)
        (b"not an image at all", "image/jpeg", 415, "not an image"),
        (noise[: len(noise) // 2], "image/jpeg", 422, "truncated"),
        (b"", "image/png", 422, "zero bytes"),
        (_png_header(100_000, 100_000), "image/png", 413, "pixels"),
        (jpeg, "text/plain", 415, "content type"),
        (b"\xff" * (2**20 + 1), "image/jpeg", 413, "limit"),
        (None, None, 400, "images in one request"),  # multipart with 5 images: over --max-images 4
        (_png_header(3_000, 3_000), "image/png", 413, "over the server's limit"),
    ]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "hybridvit", "serve", str(digits_run / "model"), "--port", str(port),
                             "--precision", "fp32", "--max-body-mb", "1", "--max-images", "4", "--max-pixels",
                             "1000000", "--body-timeout-s", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    head = (b"POST /v1/predict HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\ncontent-length: 5000\r\n\r\n"
            + b"\x89PNG")
    slow_answers: list[bytes] = []

    def slow_client() -> None:  # sends a part of its body, then nothing: the server must let go
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head)
            slow_answers.append(_read_all(sock))  # returns once the server closes the connection

    def gone_client() -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head)

    async def load(first: int, count: int) -> list[str]:
        """Requests ``first``..``first + count``; every tenth is bad. Returns what went wrong."""
        problems: list[str] = []
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(first, first + count):
            queue.put_nowait(n)

        async def client_loop(client: httpx.AsyncClient) -> None:
            while not queue.empty():
                n = queue.get_nowait()
                if n % 10 == 9:
                    body, kind, status, words = bad[(n // 10) % len(bad)]
                    if body is None:
                        r = await client.post("/v1/predict", files=[(f"f{i}", (f"{i}.jpg", jpeg, "image/jpeg"))
                                                                    for i in range(5)])
                    else:
                        r = await client.post("/v1/predict", content=body, headers={"content-type": kind})
                    if r.status_code != status or words not in r.json().get("error", ""):
                        problems.append(f"bad request {n}: {r.status_code} {r.text[:200]}")
                else:
                    i = n % len(files)
                    r = await client.post("/v1/predict?top_k=3", content=files[i],
                                          headers={"content-type": "image/png" if i % 2 == 0 else "image/jpeg"})
                    if r.status_code != 200 or [c["class"] for c in r.json()["predictions"][0]["top"]] != expected[i]:
                        problems.append(f"request {n}: {r.status_code} {r.text[:200]}")

        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            await asyncio.gather(*(client_loop(client) for _ in range(16)))
        return problems

    try:
        wait_for(lambda: _ready(url), proc)
        problems = asyncio.run(load(0, 1_000))  # the allocator and caches settle
        before = _rss_kib(proc.pid)
        odd = [threading.Thread(target=slow_client if n % 2 else gone_client) for n in range(SLOW + GONE)]
        for thread in odd:
            thread.start()
        problems += asyncio.run(load(1_000, 10_000))
        for thread in odd:
            thread.join(timeout=600)
        wait_for(lambda: _metric(httpx.get(url + "/metrics", timeout=60).text,
                                 'hybridvit_requests_total{status="499"}') == GONE, proc)
        after = _rss_kib(proc.pid)
        metrics = httpx.get(url + "/metrics", timeout=60).text
        wait_for(lambda: _connections(port) == 0, proc)  # nothing held once the clients are gone
    finally:
        proc.terminate()
        proc.wait(timeout=600)
    assert problems == []
    assert len(slow_answers) == SLOW and all(a.startswith(b"HTTP/1.1 408") for a in slow_answers)
    assert not any(status.startswith("5") for status in by_status(metrics))
    statuses = by_status(metrics)
    sent_bad = Counter(bad[(n // 10) % len(bad)][2] for n in range(11_000) if n % 10 == 9)
    assert statuses == {"200": 11_000 - sum(sent_bad.values()), **{str(k): v for k, v in sent_bad.items()},
                        "408": SLOW, "499": GONE}  # every request counted once, under its class
    assert _metric(metrics, "hybridvit_body_timeouts_total") == SLOW
    assert after < 1.1 * before, f"resident memory {before / 1024:.0f} MiB -> {after / 1024:.0f} MiB"


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=30).status_code == 200
    except httpx.TransportError:
        return False


def test_bad_query_values_and_keys_get_the_apis_errors_and_are_counted(tmp_path, predictor):
    image = _digit_files(tmp_path / "digits", 1)[0]
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32), mode="F").save(buffer, "TIFF")

    async def test(client, server):
        async def post(query="", key="Bearer s3cret", body=image):
            return await client.post("/v1/predict" + query, content=body,
                                     headers={"content-type": "image/png", "authorization": key})

        answers = {"abc": await post("?top_k=abc"), "zero": await post("?top_k=0"),
                   "maybe": await post("?embeddings=maybe"), "lower": await post(key="bearer s3cret"),
                   "spaces": await post(key="  BEARER   s3cret "), "bare": await post(key="s3cret"),
                   "basic": await post(key="Basic s3cret"), "nan": await post(body=buffer.getvalue()),
                   "attention": await client.post("/v1/attention?y=oops", content=image,
                                                  headers={"x-api-key": "s3cret", "content-type": "image/png"})}
        return answers, (await client.get("/metrics")).text

    answers, metrics = _serve(predictor, test, api_key="s3cret")
    status = {name: (r.status_code, r.json().get("error", "")) for name, r in answers.items()}
    assert status["abc"][0] == 422 and "top_k" in status["abc"][1] and "'abc'" in status["abc"][1]
    assert status["zero"][0] == 422 and "top_k" in status["zero"][1]
    assert status["maybe"][0] == 422 and "embeddings" in status["maybe"][1]
    assert status["attention"][0] == 422 and "y" in status["attention"][1]  # {"error": ...}, not {"detail": [...]}
    assert status["lower"] == (200, "") and status["spaces"] == (200, "")  # RFC 7235: the scheme's case is free
    assert status["bare"][0] == 401 and status["basic"][0] == 401  # a key without the Bearer scheme is not one
    assert status["nan"][0] == 422 and "NaN" in status["nan"][1] and "object at 0x" not in status["nan"][1]
    assert _metric(metrics, 'hybridvit_requests_total{status="422"}') == 4  # 3 bad queries and the NaN image
    assert _metric(metrics, 'hybridvit_requests_total{status="401"}') == 2


def test_embeddings_from_a_model_without_them_is_a_named_400(tmp_path, digits_run):
    image = _digit_files(tmp_path / "digits", 1)[0]
    plain = Predictor(InferenceSpec(digits_run / "model", "fp32", backend="onnxruntime", batch_size=4))  # as an .onnx file serves

    async def test(client, server):
        return await client.post("/v1/predict?embeddings=true", content=image, headers={"content-type": "image/png"})

    answer = _serve(plain, test)
    assert answer.status_code == 400 and "embeddings" in answer.json()["error"]


def test_head_and_the_docs_work_offline(predictor):
    async def test(client, server):
        page = await client.get("/docs")
        links = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        return (await client.head("/")).status_code, page, links, {u: (await client.get(u)).status_code for u in links}

    head, page, links, assets = _serve(predictor, test)
    assert head == 200 and page.status_code == 200
    assert sorted(links) == ["/docs-assets/favicon.png", "/docs-assets/swagger-ui-bundle.js",
                             "/docs-assets/swagger-ui.css"]  # nothing from a CDN
    assert set(assets.values()) == {200}


def _read_all(sock) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.slow
def test_slow_bodies_time_out_hang_ups_are_499_and_a_port_in_use_is_exit_5(tmp_path, digits_run):
    """A body that does not arrive within --body-timeout-s gets 408 and its connection is closed;
    a client that hangs up mid-body is counted as 499, not as the server's fault; a second server
    on the same port fails before it says it serves, with its own exit code."""
    import socket
    import subprocess
    import sys

    from conftest import wait_for

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "hybridvit", "serve", str(digits_run / "model"), "--port", str(port),
               "--precision", "fp32", "--body-timeout-s", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    head = (b"POST /v1/predict HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\ncontent-length: 5000\r\n\r\n"
            + b"\x89PNG")
    try:
        wait_for(lambda: _ready(url), proc)
        second = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert second.returncode == 5 and "Address already in use" in second.stderr, second.stderr
        assert "serving" not in second.stdout + second.stderr
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        for sock in slow:
            sock.sendall(head)  # and then nothing: the server must let go
        answers = [_read_all(sock) for sock in slow]  # returns once the server closes the connection
        for sock in range(2):
            gone = socket.create_connection(("127.0.0.1", port))
            gone.sendall(head)
            wait_for(lambda: "hybridvit_requests_in_flight 1.0" in httpx.get(url + "/metrics").text, proc)
            gone.close()
            wait_for(lambda: "hybridvit_requests_in_flight 0.0" in httpx.get(url + "/metrics").text, proc)
        metrics = httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=600)
    assert all(a.startswith(b"HTTP/1.1 408") and b"--body-timeout-s" in a for a in answers), answers
    assert _metric(metrics, 'hybridvit_requests_total{status="408"}') == 3
    assert _metric(metrics, "hybridvit_body_timeouts_total") == 3
    assert _metric(metrics, 'hybridvit_requests_total{status="499"}') == 2
    assert not any(status.startswith("5") for status in by_status(metrics))
