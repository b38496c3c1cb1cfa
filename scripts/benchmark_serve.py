"""Load test of ``hybridvit serve``: throughput and latency at several concurrencies, against the
same server with batching off, a minimal FastAPI app around timm's eager LeViT-128S (one
request at a time; carried here, ``--reference-app``), and bulk ``predict`` on the same images.

Each server runs in its own process on the machine's cores; the client is an asyncio httpx
client in this process, sending every image once per concurrency level (raw JPEG bodies).

    python scripts/benchmark_serve.py --images 2000 --output runs/serve_bench

``--protocols``: one server, the same images through ``/v1``, the Open Inference Protocol's REST
(JSON with base64 images, and Triton's binary tensor data) and gRPC (``raw_input_contents``, as
tritonclient sends them), at concurrency 1/16/64; then two models served together, each loaded
alone and both at once, for each one's share of its alone-rate.

    python scripts/benchmark_serve.py --protocols --images 1000 --json docs/bench_serve_protocols.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from fastapi import Request  # at module level: the reference app's annotations are strings

CONCURRENCY = (1, 4, 16, 64)
PROTOCOL_CONCURRENCY = (1, 16, 64)


def reference_app(port: int) -> None:
    """The app a user would write first: timm's LeViT-128S, eager, torchvision transforms, one
    request at a time (random weights: speed does not depend on them)."""
    import io
    import threading

    import timm
    import torch
    import uvicorn
    from fastapi import FastAPI
    from PIL import Image
    from torchvision import transforms as T

    model = timm.create_model("levit_128s").eval()
    transform = T.Compose([T.Resize(248, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/ready")
    def ready() -> dict:
        return {"ready": True}

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict:
        body = await request.body()

        def run() -> dict:
            with lock, torch.inference_mode():
                x = transform(Image.open(io.BytesIO(body)).convert("RGB"))[None]
                top = model(x).softmax(-1).topk(5)
            return {"top": top.indices[0].tolist()}

        return await asyncio.get_running_loop().run_in_executor(None, run)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _start(command: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while True:  # ready when /ready says so (the server warms up first)
        if proc.poll() is not None:
            raise RuntimeError(f"{command} ended: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)


class RawClient:
    """One keep-alive HTTP/1.1 connection that sends prepared requests and reads whole responses:
    a few microseconds of CPU per request, against about a millisecond for httpx, so a client on the
    server's own cores takes little from it (as a client on another machine would take nothing)."""

    def __init__(self, port: int, path: str = "/v1/predict") -> None:
        self.port, self.path = port, path.encode()
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, body: bytes | tuple[bytes, bytes]) -> int:
        """POST ``body`` (an image, or a prepared (extra headers, body) pair)."""
        if self.streams is None:
            self.streams = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.streams
        headers, body = body if isinstance(body, tuple) else (b"content-type: image/jpeg\r\n", body)
        writer.write(b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\n%scontent-length: %d\r\n\r\n"
                     % (self.path, headers, len(body)) + body)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
        await reader.readexactly(length)
        return int(lines[0].split()[1])

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()


async def _load(port: int, bodies: list, concurrency: int, client: str, path: str = "/v1/predict",
                done_at: list[float] | None = None) -> dict:
    """Send every body once from ``concurrency`` clients; ``done_at`` collects each answer's time."""
    latencies: list[float] = []
    done_at = [] if done_at is None else done_at
    failures = 0
    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=300) as shared:
        async def httpx_post(body: bytes) -> int:
            r = await shared.post("/v1/predict", content=body, headers={"content-type": "image/jpeg"})
            return r.status_code

        async def worker() -> None:
            nonlocal failures
            raw = RawClient(port, path)
            post = raw.post if client == "raw" else httpx_post
            while not queue.empty():
                body = queue.get_nowait()
                start = time.perf_counter()
                try:
                    failures += await post(body) != 200
                except (httpx.TransportError, OSError, asyncio.IncompleteReadError):  # counted: the figure says how many
                    failures += 1
                    raw.close()
                    raw.streams = None
                latencies.append(time.perf_counter() - start)
                done_at.append(time.perf_counter())
            raw.close()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return _summary(latencies, len(bodies), seconds, failures)


def _summary(latencies: list[float], images: int, seconds: float, failures: int) -> dict:
    q = statistics.quantiles(latencies, n=100)
    return {"images_per_s": images / seconds, "p50_ms": q[49] * 1e3, "p95_ms": q[94] * 1e3,
            "p99_ms": q[98] * 1e3, "failures": failures}


def v2_json(image: bytes) -> tuple[bytes, bytes]:
    """An Open Inference Protocol request for one image, JSON (base64, as JSON carries bytes)."""
    import base64

    body = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "data": [base64.b64encode(image).decode()]}]}).encode()
    return b"content-type: application/json\r\n", body


def v2_binary(image: bytes) -> tuple[bytes, bytes]:
    """The same request in Triton's binary tensor data extension, outputs asked for in binary."""
    import struct

    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(image) + 4}}],
                       "parameters": {"binary_data_output": True}}).encode()
    headers = b"content-type: application/octet-stream\r\ninference-header-content-length: %d\r\n" % len(head)
    return headers, head + struct.pack("<I", len(image)) + image


async def _load_grpc(port: int, model: str, bodies: list[bytes], concurrency: int) -> dict:
    """gRPC ModelInfer calls with the image in ``raw_input_contents`` (what tritonclient sends)."""
    import struct

    import grpc

    from hybridvit.serving.protos import predict_v2_pb2 as pb
    from hybridvit.serving.protos import predict_v2_pb2_grpc as pb_grpc

    latencies: list[float] = []
    failures = 0
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def worker() -> None:
            nonlocal failures
            while not queue.empty():
                body = queue.get_nowait()
                request = pb.ModelInferRequest(model_name=model, raw_input_contents=[struct.pack("<I", len(body))
                                                                                     + body])
                request.inputs.add(name="image", datatype="BYTES", shape=[1])
                start = time.perf_counter()
                try:
                    await stub.ModelInfer(request)
                except grpc.aio.AioRpcError:
                    failures += 1
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return _summary(latencies, len(bodies), seconds, failures)


def protocols(args: argparse.Namespace, model_dir: Path, second_dir: Path, bodies: list[bytes]) -> dict:
    """/v1, v2 REST (JSON, binary) and gRPC on one server; then two models on one server."""
    grpc_port = args.port + 1
    serve = [sys.executable, "-m", "hybridvit", "serve", "--port", str(args.port), "--max-wait-ms",
             str(args.max_wait_ms)]
    rows: dict[str, dict[int, dict]] = {}
    proc = _start(serve + [f"m={model_dir}", "--grpc-port", str(grpc_port)], args.port)
    try:
        loads = {"/v1 (raw image body)": lambda c: _load(args.port, bodies, c, "raw"),
                 "v2 REST, JSON (base64)": lambda c: _load(args.port, [v2_json(b) for b in bodies], c, "raw",
                                                           "/v2/models/m/infer"),
                 "v2 REST, binary tensor data": lambda c: _load(args.port, [v2_binary(b) for b in bodies], c, "raw",
                                                                "/v2/models/m/infer"),
                 "v2 gRPC (raw_input_contents)": lambda c: _load_grpc(grpc_port, "m", bodies, c)}
        for level in PROTOCOL_CONCURRENCY:  # the protocols alternate at each level: drift hits them alike
            for name, load in loads.items():
                rows.setdefault(name, {})[level] = asyncio.run(load(level))
                print(name, level, json.dumps(rows[name][level]), flush=True)
    finally:
        proc.terminate()
        proc.wait()
    v1 = max(r["images_per_s"] for r in rows["/v1 (raw image body)"].values())
    ratios = {name: max(r["images_per_s"] for r in levels.values()) / v1 for name, levels in rows.items()}

    together: dict[str, dict] = {}
    proc = _start(serve + [f"a={model_dir}", f"b={second_dir}"], args.port)
    try:
        for name in ("a", "b"):
            together[f"{name} alone"] = asyncio.run(_load(args.port, bodies, 64, "raw", f"/v1/predict?model={name}"))

        async def both() -> tuple[list[dict], list[list[float]], float]:
            done: list[list[float]] = [[], []]
            start = time.perf_counter()
            loads = await asyncio.gather(*(_load(args.port, bodies, 64, "raw", f"/v1/predict?model={name}", times)
                                           for name, times in zip(("a", "b"), done)))
            return loads, done, start

        (with_b, with_a), done, start = asyncio.run(both())
        # each model's rate while both were loaded: up to the moment the first one had sent all its images
        window = min(max(times) for times in done) - start
        for key, load, times in (("a with b", with_b, done[0]), ("b with a", with_a, done[1])):
            together[key] = {**load, "images_per_s": sum(t - start <= window for t in times) / window,
                             "window_s": window}
    finally:
        proc.terminate()
        proc.wait()
    shares = {name: together[f"{name} with {other}"]["images_per_s"] / together[f"{name} alone"]["images_per_s"]
              for name, other in (("a", "b"), ("b", "a"))}
    return {"protocols": rows, "saturation_vs_v1": ratios, "two_models": together, "share_of_alone_rate": shares}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--model", default="levit_128s")
    parser.add_argument("--output", type=Path, default=Path("runs/serve_bench"))
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw",
                        help="load generator: prepared HTTP/1.1 requests on keep-alive connections, or httpx")
    parser.add_argument("--reference-app", action="store_true", help="run the reference app on --port (internal)")
    parser.add_argument("--protocols", action="store_true", help="/v1 against the Open Inference Protocol's REST "
                        "and gRPC, and two models served together")
    parser.add_argument("--second-model", default="levit_192", help="--protocols: the other model served beside")
    parser.add_argument("--json", type=Path, help="--protocols: write the result here too")
    args = parser.parse_args()
    if args.reference_app:
        reference_app(args.port)
        return

    import torch

    import hybridvit
    from hybridvit.bench.photos import make_photos
    from hybridvit.bench.throughput import machine_info
    from hybridvit.serving.collection import predict_collection
    from hybridvit.serving.predict import Predictor

    paths = make_photos(args.output / "photos", args.images)
    model_dir = args.output / "model"
    if not model_dir.exists():
        hybridvit.save_model(hybridvit.create_model(args.model).eval(), model_dir)
    bodies = [Path(p).read_bytes() for p in paths]
    if args.protocols:
        second_dir = args.output / "second"
        if not second_dir.exists():
            hybridvit.save_model(hybridvit.create_model(args.second_model).eval(), second_dir)
        result = {**machine_info(torch.device("cpu"), torch.get_num_threads()), "images": len(paths),
                  "model": args.model, "second_model": args.second_model, "max_wait_ms": args.max_wait_ms,
                  **protocols(args, model_dir, second_dir, bodies)}
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return
    predictor = Predictor(model_dir)
    predict_collection(predictor, paths[:200], progress=False)  # measures the split once
    bulk = predict_collection(predictor, paths, progress=False).images_per_second

    serve = [sys.executable, "-m", "hybridvit", "serve", str(model_dir), "--port", str(args.port)]
    servers = {
        "hybridvit serve": serve + ["--max-wait-ms", str(args.max_wait_ms)],
        "hybridvit serve, batching off (--max-batch-size 1)": serve + ["--max-batch-size", "1"],
        "FastAPI + timm eager, one request at a time": [sys.executable, __file__, "--reference-app", "--port",
                                                         str(args.port)],
    }
    results: dict[str, dict[int, dict]] = {}
    for name, command in servers.items():
        proc = _start(command, args.port)
        try:
            results[name] = {c: asyncio.run(_load(args.port, bodies, c, args.client)) for c in CONCURRENCY}
        finally:
            proc.terminate()
            proc.wait()
        print(name, json.dumps(results[name]), flush=True)
    ours = results["hybridvit serve"]
    saturation = max(r["images_per_s"] for r in ours.values())
    result = {**machine_info(torch.device("cpu"), torch.get_num_threads()), "images": len(paths), "client": args.client,
              "model": args.model, "max_wait_ms": args.max_wait_ms, "bulk_predict_images_per_s": bulk,
              "results": results, "saturation_vs_bulk": saturation / bulk,
              "c16_vs_batching_off": ours[16]["images_per_s"]
              / results["hybridvit serve, batching off (--max-batch-size 1)"][16]["images_per_s"],
              "c16_vs_reference_app": ours[16]["images_per_s"]
              / results["FastAPI + timm eager, one request at a time"][16]["images_per_s"]}
    print(json.dumps(result, indent=2))
    (args.output / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
