"""The Open Inference Protocol over REST (in process, through httpx's ASGI transport): answers
equal ``predict``'s for every input form, JSON and binary tensor data, v1 and v2 requests share
batches, bad tensors get the protocol's 400s, several models and versions are served, loaded,
unloaded and reloaded under load without a failed request, and traces nest and link batches."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from prometheus_text import by_status, metric  # noqa: E402
from conftest import wait_for  # noqa: E402
from test_serve import _digit_files, _free_port, _ready  # noqa: E402

from hybridvit.serving import tracing  # noqa: E402
from hybridvit.serving.predict import InferenceSpec, Predictor  # noqa: E402
from hybridvit.serving.repository import ModelRepository  # noqa: E402
from hybridvit.serving.model_server import ModelServer, ServeConfig  # noqa: E402
from hybridvit.serving.server import create_app  # noqa: E402


@pytest.fixture(scope="module")
def predictor(digits_run):
    return Predictor(InferenceSpec(digits_run / "model", "fp32", backend="onnxruntime", batch_size=8,
                                   embeddings=True))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _digit_files(tmp_path_factory.mktemp("v2") / "digits", 6)


def _run(app, test):
    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=600) as client:
                return await test(client)

    return asyncio.run(main())


def _serve(predictor, test, **config):
    return _run(create_app(ModelServer(predictor, ServeConfig(**config), name="digits")), test)


def _image_request(images: list[bytes], outputs=None, **parameters) -> dict:
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                           "data": [base64.b64encode(i).decode() for i in images]}]}
    if outputs is not None:
        request["outputs"] = outputs
    if parameters:
        request["parameters"] = parameters
    return request


def _outputs(answer: dict) -> dict[str, np.ndarray]:
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in answer["outputs"]}


def test_v2_answers_equal_predict_for_encoded_images_pixels_and_normalised_input(tmp_path, predictor, images):
    folder = tmp_path / "files"
    folder.mkdir()
    for n, data in enumerate(images):
        (folder / f"{n}.img").write_bytes(data)
    expected = predictor.predict([folder / f"{n}.img" for n in range(len(images))], k=3)
    pixels = np.stack([predictor.preprocess(folder / f"{n}.img") for n in range(len(images))])
    mean = np.array(predictor.preprocessing["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.array(predictor.preprocessing["std"], np.float32).reshape(1, 3, 1, 1)
    normalised = (pixels / 255.0 - mean) / std

    async def test(client):
        meta = (await client.get("/v2/models/digits")).json()
        server = (await client.get("/v2")).json()
        health = [(await client.get(p)).status_code for p in ("/v2/health/live", "/v2/health/ready",
                                                             "/v2/models/digits/ready",
                                                             "/v2/models/digits/versions/1/ready")]
        by_image = await client.post("/v2/models/digits/infer", json=_image_request(images, top_k=3,
                                                                                  outputs=None))
        by_pixels = await client.post("/v2/models/digits/versions/1/infer", json={
            "id": "px", "parameters": {"top_k": 3},
            "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                        "data": pixels.ravel().tolist()}],
            "outputs": [{"name": "probabilities"}, {"name": "top_labels"}, {"name": "embeddings"}]})
        by_input = await client.post("/v2/models/digits/infer", json={
            "parameters": {"top_k": 3}, "inputs": [{"name": "input", "datatype": "FP32", "shape": list(normalised.shape),
                        "data": normalised.tolist()}],  # nested lists, as numpy gives them
            "outputs": [{"name": "top_indices"}, {"name": "top_labels", "parameters": {"classification": 2}}]})
        return meta, server, health, by_image, by_pixels, by_input

    meta, server, health, by_image, by_pixels, by_input = _serve(predictor, test)
    assert meta["name"] == "digits" and meta["versions"] == ["1"]
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "image": ("BYTES", [-1]), "pixels": ("UINT8", [-1, 3, 32, 32]), "input": ("FP32", [-1, 3, 32, 32])}
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "top_indices", "top_labels", "embeddings"]
    assert server["name"] == "hybridvit" and "binary_tensor_data" in server["extensions"]
    assert health == [200, 200, 200, 200]
    for answer in (by_image, by_pixels, by_input):
        assert answer.status_code == 200, answer.text
    image_out, pixel_out = _outputs(by_image.json()), _outputs(by_pixels.json())
    assert by_pixels.json()["id"] == "px" and by_image.json()["model_version"] == "1"
    for n, row in enumerate(expected):
        labels = [c for c, _ in row.top]
        assert list(image_out["top_labels"][n]) == labels == list(pixel_out["top_labels"][n])
        assert [predictor.classes[i] for i in image_out["top_indices"][n]] == labels
        top = np.sort(image_out["probabilities"][n])[::-1][:3]
        assert np.allclose(top, [p for _, p in row.top], atol=1e-5)
        assert np.allclose(pixel_out["embeddings"][n], row.embedding, atol=1e-4)
    assert image_out["probabilities"].shape == (len(images), len(predictor.classes))
    input_out = _outputs(by_input.json())
    assert (input_out["top_indices"] == image_out["top_indices"]).all()  # normalised floats: the same answers
    cells = input_out["top_labels"]  # Triton's classification: "score:index:label", best first
    assert cells.shape == (len(images), 2)
    for n, row in enumerate(expected):
        score, index, label = cells[n][0].split(":")
        assert label == row.top[0][0] and predictor.classes[int(index)] == label
        assert abs(float(score) - row.top[0][1]) < 1e-5


def _binary_body(images: list[bytes], outputs: list[str]) -> tuple[bytes, int]:
    blob = b"".join(struct.pack("<I", len(i)) + i for i in images)
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                                   "parameters": {"binary_data_size": len(blob)}}],
                       "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in outputs]}).encode()
    return head + blob, len(head)


def _binary_outputs(response: httpx.Response) -> dict[str, np.ndarray]:
    length = int(response.headers["inference-header-content-length"])
    head, blob = json.loads(response.content[:length]), response.content[length:]
    out, at = {}, 0
    for o in head["outputs"]:
        size = o["parameters"]["binary_data_size"]
        raw = blob[at:at + size]
        at += size
        if o["datatype"] == "BYTES":
            items, i = [], 0
            while i < len(raw):
                (n,) = struct.unpack_from("<I", raw, i)
                items.append(raw[i + 4:i + 4 + n].decode())
                i += 4 + n
            out[o["name"]] = np.array(items).reshape(o["shape"])
        else:
            out[o["name"]] = np.frombuffer(raw, {"FP32": np.float32, "INT64": np.int64}[o["datatype"]]).reshape(
                o["shape"])
    assert at == len(blob)
    return out


def test_binary_tensor_data_both_ways_and_v1_and_v2_share_one_batch(predictor, images):
    body, length = _binary_body(images[:3], ["probabilities", "top_labels"])

    async def test(client):
        v1 = client.post("/v1/predict?top_k=1", content=images[3], headers={"content-type": "image/png"})
        v2 = client.post("/v2/models/digits/infer", content=body, headers={
            "inference-header-content-length": str(length), "content-type": "application/octet-stream"})
        answers = await asyncio.gather(v1, v2)
        return answers, (await client.get("/metrics")).text

    # a batch of up to 8 that waits a minute for images: both requests' four images make one model call
    (v1, v2), metrics = _serve(Predictor(predictor.spec.replace(batch_size=4)), test, max_wait_ms=60_000)
    assert v1.status_code == 200 and v2.status_code == 200, (v1.text, v2.text[:200])
    assert metric(metrics, "hybridvit_batch_size_count") == 1 and metric(metrics, "hybridvit_batch_size_sum") == 4
    assert metric(metrics, "hybridvit_requests_total", protocol="v1", status="200") == 1
    assert metric(metrics, "hybridvit_requests_total", protocol="v2", status="200") == 1
    out = _binary_outputs(v2)
    assert out["probabilities"].shape == (3, len(predictor.classes))
    assert np.allclose(out["probabilities"].sum(1), 1, atol=1e-5)
    assert out["top_labels"].shape == (3, 5)
    assert out["top_labels"][0][0] == predictor.classes[int(out["probabilities"][0].argmax())]


def test_bad_tensors_get_the_protocols_errors_and_the_server_goes_on(predictor, images):
    good = _image_request(images[:1])
    pixels = {"name": "pixels", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [0] * 3072}
    bad = {
        "wrong shape": {"inputs": [{**pixels, "shape": [1, 3, 16, 16], "data": [0] * 768}]},
        "wrong datatype": {"inputs": [{**pixels, "datatype": "FP32"}]},
        "too many elements": {"inputs": [{**pixels, "data": [0] * 3073}]},
        "not an input": {"inputs": [{**pixels, "name": "images"}]},
        "not an output": {**good, "outputs": [{"name": "logits"}]},
        "two inputs": {"inputs": [pixels, pixels]},
        "no inputs": {"outputs": []},
        "unknown datatype": {"inputs": [{**pixels, "datatype": "FLOAT"}]},
        "values out of range": {"inputs": [{**pixels, "data": [300] * 3072}]},
        "not base64": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]},
        "not an image": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "data": [base64.b64encode(b"hello").decode()]}]},
        "bad top_k": {**good, "parameters": {"top_k": 0}},
        "NaN input": {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                  "data": ["NaN"] * 3072}]},
    }

    async def test(client):
        answers = {name: await client.post("/v2/models/digits/infer", json=body) for name, body in bad.items()}
        answers["not JSON"] = await client.post("/v2/models/digits/infer", content=b"{")
        answers["header past the body"] = await client.post("/v2/models/digits/infer", content=b"{}",
                                                            headers={"inference-header-content-length": "99"})
        answers["unknown model"] = await client.post("/v2/models/nope/infer", json=good)
        answers["unknown version"] = await client.post("/v2/models/digits/versions/7/infer", json=good)
        after = await client.post("/v2/models/digits/infer", json=good)
        return answers, after, (await client.get("/metrics")).text

    answers, after, metrics = _serve(predictor, test)
    for name, answer in answers.items():
        want = 404 if name.startswith("unknown m") or name == "unknown version" else (
            415 if name == "not an image" else 400)
        assert answer.status_code == want, (name, answer.status_code, answer.text)
        assert isinstance(answer.json()["error"], str) and answer.json()["error"], name
    assert "3,073 elements" in answers["too many elements"].json()["error"]
    assert "no input named 'images'" in answers["not an input"].json()["error"]
    assert after.status_code == 200
    assert not any(status.startswith("5") for status in by_status(metrics))


def _repository(tmp_path, digits_run, names=("digits",), versions=("1",)):
    root = tmp_path / "repository"
    for name in names:
        for version in versions:
            (root / name).mkdir(parents=True, exist_ok=True)
            os.symlink(digits_run / "model", root / name / version)
    return root


def _template(source: str = ".", **changes):
    return InferenceSpec(source, "fp32", backend="onnxruntime", batch_size=4, **changes)


def test_several_models_and_versions_load_and_unload_behind_the_key(tmp_path, digits_run, images):
    root = _repository(tmp_path, digits_run, names=("digits", "other"), versions=("1", "3"))
    repository = ModelRepository(ServeConfig(api_key="k"), root=root, template=_template())
    key = {"x-api-key": "k"}

    async def test(client):
        calls = {}
        calls["index"] = (await client.post("/v2/repository/index", headers=key)).json()
        calls["meta"] = (await client.get("/v2/models/other", headers=key)).json()
        calls["v3"] = await client.post("/v2/models/digits/versions/3/infer", json=_image_request(images[:1]),
                                        headers=key)
        calls["v1"] = await client.post("/v2/models/digits/versions/1/infer", json=_image_request(images[:1]),
                                        headers=key)
        calls["newest"] = await client.post("/v2/models/digits/infer", json=_image_request(images[:1]), headers=key)
        calls["v1 api"] = await client.post("/v1/predict?model=other", content=images[0],
                                            headers={**key, "content-type": "image/png"})
        calls["no key"] = await client.post("/v2/repository/models/other/unload")
        calls["unload"] = await client.post("/v2/repository/models/other/unload", headers=key)
        calls["gone"] = await client.post("/v2/models/other/infer", json=_image_request(images[:1]), headers=key)
        calls["gone ready"] = (await client.get("/v2/models/other/ready", headers=key)).status_code
        calls["index after"] = (await client.post("/v2/repository/index", headers=key)).json()
        calls["load"] = await client.post("/v2/repository/models/other/load", headers=key)
        calls["back"] = await client.post("/v2/models/other/infer", json=_image_request(images[:1]), headers=key)
        calls["missing"] = await client.post("/v2/repository/models/nope/load", headers=key)
        calls["metrics"] = (await client.get("/metrics")).text
        return calls

    calls = _run(create_app(repository), test)
    assert sorted((r["name"], r["version"], r["state"]) for r in calls["index"]) == [
        ("digits", "1", "READY"), ("digits", "3", "READY"), ("other", "1", "READY"), ("other", "3", "READY")]
    assert calls["meta"]["versions"] == ["1", "3"]
    for name in ("v3", "v1", "newest", "back"):
        assert calls[name].status_code == 200, (name, calls[name].text)
    assert (calls["v3"].json()["model_version"], calls["v1"].json()["model_version"],
            calls["newest"].json()["model_version"]) == ("3", "1", "3")
    assert calls["v1 api"].status_code == 200
    assert calls["no key"].status_code == 401 and calls["unload"].status_code == 200
    assert calls["gone"].status_code == 404 and calls["gone ready"] == 404
    assert ("other", "", "UNAVAILABLE") in [(r["name"], r["version"], r["state"]) for r in calls["index after"]]
    assert calls["load"].json() == {"name": "other", "versions": ["1", "3"]}
    assert calls["missing"].status_code == 404
    metrics = calls["metrics"]  # each version's batches and share of the cores, under its own labels
    assert metric(metrics, "hybridvit_batch_size_count", model="digits", version="3") == 2
    assert metric(metrics, "hybridvit_batch_size_count", model="digits", version="1") == 1
    assert metric(metrics, "hybridvit_model_seconds_total", model="digits", version="3") > 0


def test_a_new_version_replaces_the_old_under_load_without_a_failed_request(tmp_path, digits_run, images):
    root = _repository(tmp_path, digits_run)
    repository = ModelRepository(ServeConfig(max_wait_ms=2), root=root, template=_template())
    body = _image_request(images[:2])

    async def test(client):
        statuses, versions, stop = [], [], asyncio.Event()

        async def client_loop():
            while not stop.is_set():
                answer = await client.post("/v2/models/digits/infer", json=body)
                statuses.append(answer.status_code)
                if answer.status_code == 200:
                    versions.append(answer.json()["model_version"])

        loops = [asyncio.create_task(client_loop()) for _ in range(8)]
        while len(statuses) < 20:  # requests are flowing
            await asyncio.sleep(0)
        os.symlink(digits_run / "model", root / "digits" / "2")
        os.unlink(root / "digits" / "1")
        load = await client.post("/v2/repository/models/digits/load")
        served_before, sent_before = len(versions), len(statuses)
        while len(versions) < served_before + 20 and len(statuses) < sent_before + 200:  # they go on flowing
            await asyncio.sleep(0)
        stop.set()
        await asyncio.gather(*loops)
        return load, statuses, versions

    load, statuses, versions = _run(create_app(repository), test)
    assert load.status_code == 200 and load.json()["versions"] == ["2"]
    assert statuses and set(statuses) == {200}, f"{len([s for s in statuses if s != 200])} failed requests"
    assert versions[0] == "1" and versions[-1] == "2"
    assert "1" in versions and "2" in versions  # both served: the swap happened under load


def test_traces_nest_per_request_and_link_requests_to_their_shared_batch(predictor, images):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}

    async def test(client):
        return await asyncio.gather(
            client.post("/v2/models/digits/infer", json=_image_request(images[:1]), headers=parent),
            client.post("/v1/predict", content=images[1], headers={"content-type": "image/png"}))

    assert tracing.configure(exporter)
    try:
        answers = _serve(Predictor(predictor.spec.replace(batch_size=2)), test, max_wait_ms=60_000)
    finally:
        tracing.disable()
    assert [a.status_code for a in answers] == [200, 200]
    spans = exporter.get_finished_spans()
    by_name: dict[str, list] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    (batch,) = by_name["batch"]  # one batch for both requests
    assert batch.attributes["batch.size"] == 2
    receives = by_name["receive"]
    assert len(receives) == 2 and len(by_name["model"]) == 2 and len(by_name["queue"]) == 2
    v2 = next(s for s in receives if format(s.context.trace_id, "032x") == trace_id)  # the client's trace
    assert v2.parent.span_id == 0x00f067aa0ba902b7
    for receive in receives:
        children = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == receive.context.span_id}
        assert set(children) == {"decode", "queue", "model"}, children
        assert children["model"].attributes["batch.size"] == 2
        assert [link.context.span_id for link in children["model"].links] == [batch.context.span_id]
    assert {link.context.span_id for link in batch.links} == {s.context.span_id for s in receives}
    assert not tracing.on()


def test_tracing_is_off_unless_the_standard_variables_ask(monkeypatch):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    loaded = subprocess.run([sys.executable, "-c", "import sys; import hybridvit.serving.server, hybridvit.cli.serve; "
                             "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', "
                             "'opentelemetry.exporter'))))"],
                            capture_output=True, text=True, env=env, timeout=600)
    # off: neither the SDK nor an exporter is imported (FastAPI itself imports OpenTelemetry's API)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert not tracing.wanted() and not tracing.configure() and not tracing.on()
    assert tracing.waiting() is None and tracing.extract({"traceparent": "00-x"}) is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not tracing.wanted()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.delenv("OTEL_TRACES_EXPORTER")
    assert tracing.wanted()


# -- real server processes, clients no one here wrote ----------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
# tritonclient and KServe's SDK live in an environment of their own (.ci/run makes it; the README's install)
CLIENTS_PYTHON = Path(os.environ.get("HYBRIDVIT_CLIENTS_PYTHON", ROOT / ".venv-clients" / "bin" / "python"))


def _start(args: list[str], url: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "hybridvit", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: _ready(url), proc)
    return proc


@pytest.mark.slow
@pytest.mark.skipif(not CLIENTS_PYTHON.exists(), reason="no .venv-clients: see the README's install (.ci/run makes it)")
def test_tritonclient_and_kserve_clients_get_predicts_answers_over_rest_and_grpc(tmp_path, digits_run, predictor,
                                                                                  images):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    import grpc

    files = []
    for n, data in enumerate(images[:3]):
        files.append(tmp_path / f"{n}.png")
        files[-1].write_bytes(data)
    expected = predictor.predict(files, k=5)
    np.save(str(files[0]) + ".pixels.npy", np.stack([predictor.preprocess(f) for f in files]))
    port, grpc_port = _free_port(), _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start([f"digits={digits_run / 'model'}", "--port", str(port), "--grpc-port", str(grpc_port),
                   "--precision", "fp32", "--backend", "onnxruntime", "--api-key", "k"], url)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:  # gRPC's standard health checking
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        runs = [subprocess.run([str(CLIENTS_PYTHON), str(ROOT / "tests" / "protocol_clients.py"), family, url,
                                f"127.0.0.1:{grpc_port}", "digits", "k", *map(str, files)],
                               capture_output=True, text=True, timeout=600) for family in ("triton", "kserve")]
        metrics = httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        output = proc.communicate(timeout=600)[0]
    assert "Traceback" not in output, output
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    got = {}
    for run in runs:
        assert run.returncode == 0, run.stdout + run.stderr
        got.update(json.loads(run.stdout))
    answers = {"triton http binary": got["triton_http"]["binary"], "triton http json": got["triton_http"]["json"],
               "triton http pixels": got["triton_http"]["pixels"], "triton grpc": got["triton_grpc"]["bytes"],
               "triton grpc pixels": got["triton_grpc"]["pixels"], "kserve rest": got["kserve"]["rest"],
               "kserve grpc": got["kserve"]["grpc"]}
    for client, answer in answers.items():
        for n, row in enumerate(expected):
            labels = [c for c, _ in row.top]
            top = answer["labels"][n]
            if ":" in top[0]:  # tritonclient's class_count: "score:index:label"
                top = [cell.split(":", 2)[2] for cell in top]
            assert top == labels[:len(top)], client
            assert np.allclose(sorted(answer["probabilities"][n], reverse=True)[:5], [p for _, p in row.top],
                               atol=1e-5), client
    assert got["triton_http"]["ready"] and got["triton_grpc"]["ready"] and got["triton_grpc"]["versions"] == ["1"]
    assert got["kserve"]["rest_id"] == "kserve-rest"
    for protocol, status in (("triton_http", "400"), ("triton_grpc", "StatusCode.INVALID_ARGUMENT")):
        errors = got[protocol]["errors"]
        for case in ("wrong shape", "wrong datatype", "not an input", "too many images"):
            assert errors[case] == status, (protocol, case, errors)
    assert got["triton_http"]["errors"]["unknown model"] == "404"
    assert got["triton_grpc"]["errors"]["unknown model"] == "StatusCode.NOT_FOUND"
    assert got["triton_http"]["errors"]["wrong key"] == "401"
    assert got["triton_grpc"]["errors"]["wrong key"] == "StatusCode.UNAUTHENTICATED"
    assert not any(status.startswith(("5", "INTERNAL")) for status in by_status(metrics))
    assert metric(metrics, "hybridvit_requests_total", protocol="grpc", status="OK") >= 3


class _Collector:
    """An OTLP/HTTP trace collector on a free local port: the protobuf bodies it was sent."""

    def __init__(self) -> None:
        import http.server
        import threading

        bodies = self.bodies = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                bodies.append(self.rfile.read(int(self.headers["content-length"])))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def span_names(self) -> set[str]:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        names = set()
        for body in list(self.bodies):
            request = ExportTraceServiceRequest.FromString(body)
            names |= {span.name for resource in request.resource_spans for scope in resource.scope_spans
                      for span in scope.spans}
        return names


@pytest.mark.slow
def test_the_kserve_manifests_command_line_serves_its_repository_and_exports_traces(tmp_path, digits_run, images):
    """Kubernetes is not here: the InferenceService's container command, arguments, environment
    and probes run as they are, with the repository KServe would mount and a local collector."""
    import yaml

    manifest = yaml.safe_load((ROOT / "deploy" / "kserve" / "inferenceservice.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    container = manifest["spec"]["predictor"]["containers"][0]
    assert container["command"][0] == "hybridvit"
    port = _free_port()
    local = {"/mnt/models": str(_repository(tmp_path, digits_run)), "8080": str(port)}
    args = [local.get(a, a) for a in container["args"]]
    collector = _Collector()
    env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    for item in container["env"]:
        if "valueFrom" in item:  # the Secret's key
            env[item["name"]] = "secret"
        elif item["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT":
            env[item["name"]] = collector.url
    assert env["HYBRIDVIT_API_KEY"] == "secret" and "OTEL_EXPORTER_OTLP_ENDPOINT" in env
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", *container["command"], *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    probes = [container[p]["httpGet"] for p in ("readinessProbe", "livenessProbe")]
    try:
        wait_for(lambda: _ready(url) and httpx.get(url + probes[0]["path"]).status_code == 200, proc)
        assert all(p["port"] == 8080 for p in probes) and httpx.get(url + probes[1]["path"]).status_code == 200
        answer = httpx.post(url + "/v2/models/digits/infer", json=_image_request(images[:2]),
                            headers={"authorization": "Bearer secret"}, timeout=60)
        refused = httpx.post(url + "/v2/models/digits/infer", json=_image_request(images[:2]), timeout=60)
        wait_for(lambda: {"receive", "decode", "queue", "model", "batch"} <= collector.span_names(), proc)
    finally:
        proc.terminate()
        output = proc.communicate(timeout=600)[0]
        collector.server.shutdown()
    assert answer.status_code == 200 and answer.json()["model_name"] == "digits", answer.text
    assert refused.status_code == 401
    assert "tracing on" in output and "Traceback" not in output, output


def test_models_named_on_the_command_line_and_a_clash(tmp_path, digits_run):
    from hybridvit.cli.serve import _named

    assert _named(f"a={digits_run}") == ("a", str(digits_run))
    assert _named(str(digits_run)) == (None, str(digits_run))
    assert _named("hf-hub:org/name=x") == (None, "hf-hub:org/name=x")  # not a name: a source with '='
    with pytest.raises(ValueError, match="letters, digits"):
        _named("a b=model")
    repository = ModelRepository(ServeConfig())
    repository.add_source(_template(source=str(digits_run / "model")), "digits")
    with pytest.raises(ValueError, match="two models named 'digits'"):
        repository.add_source(_template(source=str(digits_run / "model")), "digits")
    repository = ModelRepository(ServeConfig())
    for _ in range(2):  # both would be named after their model: refused, naming the way out
        repository.add_source(_template(source=str(digits_run / "model")))

    async def start():
        try:
            await repository.start()
        finally:
            await repository.stop()

    with pytest.raises(ValueError, match="NAME=SOURCE"):
        asyncio.run(start())


def test_the_cores_go_to_the_model_with_the_least_time_on_them(monkeypatch):
    """Two models under load: a model whose calls take twice as long gets half the calls, so each
    has the same seconds on the cores (a model clock the calls advance: no waiting on time)."""
    import threading

    from hybridvit.serving import cores as cores_module

    clock = [0.0]
    monkeypatch.setattr(cores_module.time, "perf_counter", lambda: clock[0])
    cores = cores_module.Cores()
    gate, running, order = threading.Event(), threading.Event(), []

    def call(name: str, seconds: float) -> str:
        running.set()
        gate.wait()
        clock[0] += seconds
        order.append(name)
        return name

    cores.submit("hold", call, "hold", 0.0)  # keeps the thread busy until both models have queued
    running.wait(timeout=600)
    futures = [cores.lane("slow").submit(call, "slow", 2.0) for _ in range(6)]
    futures += [cores.lane("fast").submit(call, "fast", 1.0) for _ in range(12)]
    gate.set()
    assert [f.result(timeout=600) for f in futures][:1] == ["slow"]
    first = order[1:13]  # after the held call, while both models still had calls waiting
    assert first.count("fast") == 8 and first.count("slow") == 4, order
    assert cores.used == {"hold": 0.0, "slow": 12.0, "fast": 12.0}
    gate.clear()  # a model that was idle joins at the least time of those waiting, not at its own 0
    running.clear()
    held = cores.submit("hold", call, "hold", 0.0)
    running.wait(timeout=600)  # the thread holds it: only what follows waits
    cores.lane("slow").submit(call, "slow", 2.0)
    joined = cores.lane("new").submit(call, "new", 1.0)
    assert cores.used["new"] == 12.0
    gate.set()
    held.result(timeout=600), joined.result(timeout=600)
    cores.shutdown()


def test_a_batcher_hands_the_shared_cores_a_second_batch_only_when_models_share_them():
    """With several models on the cores, each keeps a batch waiting there while one runs, so the
    cores' fairness has a choice when a call ends; alone, the next batch gathers what came meanwhile."""
    from concurrent.futures import Executor, Future

    import torch

    from hybridvit.serving.batcher import Batcher

    class Held(Executor):  # runs nothing until told: what was handed over is observable
        def __init__(self):
            self.handed: list[tuple[Future, object, tuple]] = []

        def submit(self, fn, /, *args):
            future = Future()
            self.handed.append((future, fn, args))
            return future

        def release(self):
            for future, fn, args in self.handed:
                if not future.done():
                    future.set_result(fn(*args))

    def handed(in_flight: int) -> int:
        async def main():
            held = Held()
            batcher = Batcher(lambda images: torch.zeros(len(images), 2), max_batch_size=2, max_wait_s=0.0,
                              incoming=lambda: 0, executor=held, in_flight=lambda: in_flight)
            batcher.start()
            rows = [batcher.submit(np.zeros((3, 4, 4), np.uint8)) for _ in range(6)]
            while len(held.handed) < in_flight:  # the batches it may hand over, handed
                await asyncio.sleep(0)
            for _ in range(100):  # and no more, however long it is given
                await asyncio.sleep(0)
            count = len(held.handed)
            while not all(r.done() for r in rows):
                held.release()
                await asyncio.sleep(0)
            await batcher.stop()
            return count

        return asyncio.run(main())

    assert handed(1) == 1 and handed(2) == 2
