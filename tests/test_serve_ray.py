"""``hybridvit serve --ray`` on a local Ray instance with 2 replicas (the command joins it as a
driver): the answers are the embedded server's, Ray Serve's batcher combines requests, and a replica killed under load is replaced with
no failed request beyond those it held."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("ray.serve")
import httpx  # noqa: E402

from conftest import wait_for  # noqa: E402
from test_serve import _digit_files, _free_port, _metric, _ready, _serve  # noqa: E402

from hybridvit.serving.predict import InferenceSpec, Predictor  # noqa: E402
from hybridvit.serving.ray_serve import APP_NAME  # noqa: E402


def _replicas() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#"))


@pytest.mark.slow
def test_two_ray_serve_replicas_answer_as_the_embedded_server_and_survive_a_kill(tmp_path, digits_run, local_ray):
    from ray import serve

    ray = local_ray
    files = _digit_files(tmp_path / "digits", 8)
    source = str(digits_run / "model")

    async def embedded_answers(client, server):
        return [(await client.post("/v1/predict?top_k=3", content=data, headers={"content-type": "image/png"})).json()
                for data in files]

    with_one_thread = Predictor(InferenceSpec(source, "fp32", backend="onnxruntime", batch_size=8, model_threads=1))
    wanted = _serve(with_one_thread, embedded_answers, max_batch_size=8)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "hybridvit", "serve", source, "--ray",
                             ray.get_runtime_context().gcs_address, "--replicas", "2", "--precision", "fp32",
                             "--backend", "onnxruntime", "--max-batch-size", "8", "--max-wait-ms", "20", "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: _ready(url), proc)
        first = _replicas()
        assert len(first) == 2
        got = [httpx.post(f"{url}/v1/predict?top_k=3", content=data, headers={"content-type": "image/png"},
                          timeout=120).json() for data in files]
        for answer, want in zip(got, wanted):
            (row,), (expected,) = answer["predictions"], want["predictions"]
            assert [c["class"] for c in row["top"]] == [c["class"] for c in expected["top"]]
            assert np.allclose([c["probability"] for c in row["top"]],
                               [c["probability"] for c in expected["top"]], atol=1e-6)

        outcomes: list[int] = []  # status codes (0: the connection failed)
        killed, replaced, enough = threading.Event(), threading.Event(), threading.Event()
        in_flight_at_kill = [0]
        in_flight = [0]

        async def load():
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                async def one_client(n):
                    while not enough.is_set():
                        in_flight[0] += 1
                        try:
                            r = await client.post("/v1/predict", content=files[n % len(files)],
                                                  headers={"content-type": "image/png"})
                            outcomes.append(r.status_code)
                        except httpx.TransportError:
                            outcomes.append(0)
                        in_flight[0] -= 1
                        if len(outcomes) == 100 and not killed.is_set():
                            in_flight_at_kill[0] = in_flight[0]
                            ray.kill(ray.get_actor(first[0], namespace="serve"), no_restart=True)
                            killed.set()
                        await asyncio.sleep(0)

                await asyncio.gather(*(one_client(n) for n in range(8)))

        loader = threading.Thread(target=lambda: asyncio.run(load()))
        loader.start()
        try:
            assert killed.wait(timeout=600)  # a guard: the kill happens after 100 answers
            serve_status = None
            for _ in range(1200):  # Ray Serve's controller starts a new replica; wait until it serves
                serve_status = serve.status().applications[APP_NAME].deployments[APP_NAME]
                replicas = _replicas()
                if first[0] not in replicas and len(replicas) == 2 and serve_status.status == "HEALTHY":
                    replaced.set()
                    break
                threading.Event().wait(0.5)  # polling a condition, not asserting after a delay
            assert replaced.is_set(), serve_status
            after = len(outcomes)
            while len(outcomes) < after + 100 and loader.is_alive():  # a hundred more answers, the new replica up
                threading.Event().wait(0.05)
        finally:
            enough.set()
            loader.join(timeout=600)
        failed = [n for n, s in enumerate(outcomes) if s != 200]
        # only requests already sent when the replica died may fail (Ray Serve's proxy answers them 500)
        assert len(failed) <= in_flight_at_kill[0], f"{failed} failed, {in_flight_at_kill[0]} in flight at the kill"
        assert all(s == 200 for s in outcomes[:100])
        metrics = [httpx.get(f"{url}/metrics", timeout=60).text for _ in range(6)]
        # Ray Serve's batcher combined concurrent requests: some replica ran batches of 2 or more
        assert max(_metric(m, "hybridvit_batch_size_sum") / _metric(m, "hybridvit_batch_size_count")
                   for m in metrics if _metric(m, "hybridvit_batch_size_count")) > 1
    finally:
        proc.terminate()  # the command takes its app down
        output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    assert "on Ray Serve at " + url in output
    assert _replicas() == []


def test_replica_and_autoscaling_settings_reach_ray_serves_deployment_config():
    from ray import serve

    from hybridvit.serving.ray_serve import Replica, Scaling

    def config(scaling: Scaling):
        deployment = serve.deployment(serve.ingress()(Replica), **scaling.options(max_batch_size=16, cpus=2))
        return deployment._deployment_config, deployment.ray_actor_options

    fixed, actor = config(Scaling(replicas=3))
    assert fixed.num_replicas == 3 and fixed.autoscaling_config is None and actor["num_cpus"] == 2
    assert fixed.max_ongoing_requests == 64  # 4 batches' worth: Ray Serve's default (5) would cap batches at 5
    scaled, _ = config(Scaling(min_replicas=2, max_replicas=6, target_ongoing_requests=24, max_ongoing_requests=40))
    auto = scaled.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (2, 6, 24)
    assert scaled.max_ongoing_requests == 40
    with pytest.raises(ValueError, match="--max-replicas"):
        Scaling(min_replicas=2)  # autoscaling settings without a ceiling are refused, not dropped
