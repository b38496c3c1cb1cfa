"""The Open Inference Protocol ("KServe v2"), over REST: what KServe, Triton, MLServer and
Seldon speak, so their clients, gateways and monitoring work with ``hybridvit serve`` as it is.

Inputs (one per request): ``image``, encoded images as ``BYTES`` (base64 strings in JSON, raw
bytes in binary data); ``pixels``, ``UINT8`` ``[N, 3, H, W]`` after the model's resize and crop;
or ``input``, ``FP32`` ``[N, 3, H, W]`` normalised as the model's exported file takes it.
Outputs: ``probabilities`` ``FP32 [N, classes]``, ``top_indices`` ``INT64 [N, k]`` and
``top_labels`` ``BYTES [N, k]`` (``k``: the request's ``top_k`` parameter, default 5), and
``embeddings`` ``FP32 [N, D]`` when asked for. An output asked for with the ``classification``
parameter gives Triton's ``"score:index:label"`` strings. Triton's binary tensor data extension
is spoken both ways. The images join the same batches as ``/v1``'s (``ModelServer.infer``), and
the gRPC service (``grpc_v2``) uses the same ``infer``.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .. import __version__
from . import tracing
from .bodies import Served, answer, read_body
from .pipeline import probabilities
from .model_server import ModelServer, UploadError

if TYPE_CHECKING:
    from .repository import ModelRepository

DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
          "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_}
INPUTS = {"image": "BYTES", "pixels": "UINT8", "input": "FP32"}
OUTPUTS = ("probabilities", "top_indices", "top_labels", "embeddings")
DEFAULT_OUTPUTS = OUTPUTS[:3]
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository"]
HEADER_LENGTH = "inference-header-content-length"


@dataclass
class Tensor:
    """One input or output tensor: ``data`` a flat numpy array, or a list of bytes for ``BYTES``."""

    name: str
    datatype: str
    shape: list[int]
    data: Any = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferRequest:
    inputs: list[Tensor]
    outputs: list[Tensor] | None = None  # the outputs asked for (name, parameters); None: the default ones
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str = ""


def _refuse(message: str, status: int = 400) -> UploadError:
    return UploadError(status, message)


def _elements(shape: list[int]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


async def infer(server: ModelServer, request: InferRequest) -> list[Tensor]:
    """The protocol's inference on ``server``: the request's images through the shared batches,
    the outputs it asks for. Bad tensors raise ``UploadError`` 400 naming the problem."""
    if len(request.inputs) != 1:
        raise _refuse(f"send one input tensor: image (BYTES), pixels (UINT8) or input (FP32); got "
                      f"{len(request.inputs)}")
    tensor = request.inputs[0]
    expected = INPUTS.get(tensor.name)
    if expected is None:
        raise _refuse(f"no input named {tensor.name!r}; this model's inputs: image (BYTES), pixels (UINT8), "
                      "input (FP32)")
    if tensor.datatype != expected:
        raise _refuse(f"input {tensor.name!r} is {expected}, got {tensor.datatype}")
    if any(not isinstance(d, int) or d < 0 for d in tensor.shape):
        raise _refuse(f"input {tensor.name!r}: shape {tensor.shape} is not a list of sizes")
    count = len(tensor.data)
    if count != _elements(tensor.shape):
        raise _refuse(f"input {tensor.name!r} has {count:,} elements; its shape {tensor.shape} says "
                      f"{_elements(tensor.shape):,}")
    predictor, limit = server.predictor, server.config.max_images
    size = list(predictor.preprocess.size)
    if tensor.name == "image":
        if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise _refuse(f"input 'image' is [N] (or [N, 1]): one encoded image per element; got shape {tensor.shape}")
        images = tensor.shape[0]
    else:
        if len(tensor.shape) != 4 or tensor.shape[1:] != [3, *size]:
            raise _refuse(f"input {tensor.name!r} is [N, 3, {size[0]}, {size[1]}] for this model; got shape "
                          f"{tensor.shape}")
        images = tensor.shape[0]
    if not 1 <= images <= limit:
        raise _refuse(f"{images} images in one request; send 1 to {limit} (the server's --max-images)")
    outputs = request.outputs or [Tensor(name, "", []) for name in DEFAULT_OUTPUTS]
    for output in outputs:
        if output.name not in OUTPUTS:
            raise _refuse(f"no output named {output.name!r}; this model's outputs: {', '.join(OUTPUTS)}")
        if output.name == "embeddings" and predictor.embedding_dim is None:
            raise _refuse("this model gives class scores only (an exported file): no embeddings")
    k = _top_k(request.parameters.get("top_k", 5), len(predictor.classes))

    async def pixels() -> list[np.ndarray]:
        if tensor.name == "image":
            return await server.decode([(f"image {i}", data) for i, data in enumerate(tensor.data)])
        data = tensor.data.reshape(tensor.shape)
        if tensor.name == "input":  # normalised floats back to the 0-255 scale the model normalises itself
            if not np.isfinite(data).all():
                raise _refuse("input 'input' holds NaN or infinite values")
            mean = np.asarray(predictor.preprocessing["mean"], np.float32).reshape(1, 3, 1, 1)
            std = np.asarray(predictor.preprocessing["std"], np.float32).reshape(1, 3, 1, 1)
            data = (data.astype(np.float32) * std + mean) * 255
        return list(data)

    out = await server.infer(pixels, images)
    probs, features = probabilities(out, len(predictor.classes), predictor.multi_label)
    return [_output(output, probs, features, k, predictor.classes) for output in outputs]


def _top_k(value: Any, classes: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _refuse(f"parameter top_k is a positive integer; got {value!r}")
    return min(value, classes)


def _output(asked: Tensor, probs: torch.Tensor, features: torch.Tensor, k: int, classes: list[str]) -> Tensor:
    n = probs.shape[0]
    classification = asked.parameters.get("classification")
    if classification is not None:  # Triton's classification extension: "score:index:label", best first
        top = probs.topk(_top_k(classification, len(classes)), dim=-1)
        cells = [f"{p:f}:{i}:{classes[i]}".encode() for row_p, row_i in zip(top.values.tolist(), top.indices.tolist())
                 for p, i in zip(row_p, row_i)]
        return Tensor(asked.name, "BYTES", [n, top.indices.shape[1]], cells, asked.parameters)
    if asked.name == "probabilities":
        return Tensor(asked.name, "FP32", list(probs.shape), probs.numpy().ravel(), asked.parameters)
    if asked.name == "embeddings":
        return Tensor(asked.name, "FP32", list(features.shape), features.numpy().ravel(), asked.parameters)
    indices = probs.topk(k, dim=-1).indices
    if asked.name == "top_indices":
        return Tensor(asked.name, "INT64", [n, k], indices.numpy().astype(np.int64).ravel(), asked.parameters)
    return Tensor(asked.name, "BYTES", [n, k], [classes[i].encode() for i in indices.ravel().tolist()],
                  asked.parameters)


# -- REST encoding: JSON, and Triton's binary tensor data extension --------------------------------------------

def bytes_elements(blob: bytes, name: str) -> list[bytes]:
    """A ``BYTES`` tensor's raw form (each element a 4-byte little-endian length, then the bytes)."""
    items, at = [], 0
    while at < len(blob):
        if at + 4 > len(blob):
            raise _refuse(f"input {name!r}: BYTES data ends inside an element's length")
        (length,) = struct.unpack_from("<I", blob, at)
        at += 4
        if at + length > len(blob):
            raise _refuse(f"input {name!r}: a BYTES element of {length:,} bytes runs past the data")
        items.append(blob[at:at + length])
        at += length
    return items


def bytes_blob(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _flat(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [x for item in data for x in _flat(item)]
    return [data]


def _json_data(tensor: Tensor, data: Any) -> Any:
    if not isinstance(data, list):
        raise _refuse(f"input {tensor.name!r}: data is a list")
    flat = _flat(data)
    if tensor.datatype == "BYTES":
        try:
            return [base64.b64decode(item, validate=True) for item in flat]
        except (binascii.Error, TypeError, ValueError):
            raise _refuse(f"input {tensor.name!r}: BYTES elements in JSON are base64 strings "
                          "(or send binary data)") from None
    try:
        return np.asarray(flat, dtype=DTYPES[tensor.datatype])
    except (TypeError, ValueError, OverflowError):
        raise _refuse(f"input {tensor.name!r}: data is not {tensor.datatype}") from None


def parse_rest(body: bytes, header_length: str | None) -> InferRequest:
    """A REST infer body (JSON, or JSON then binary tensor data) as an ``InferRequest``."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise _refuse(f"Inference-Header-Content-Length {header_length!r} does not fit a body of {len(body):,} "
                          "bytes")
        head, blob = body[:int(header_length)], body[int(header_length):]
    else:
        head, blob = body, b""
    try:
        doc = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _refuse(f"the request is not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise _refuse("the request is a JSON object with an 'inputs' list")
    parameters = doc.get("parameters") or {}
    inputs, at = [], 0
    for item in doc["inputs"]:
        if not isinstance(item, dict) or not {"name", "shape", "datatype"} <= set(item):
            raise _refuse("each input has a name, shape and datatype")
        tensor = Tensor(str(item["name"]), str(item["datatype"]), item["shape"], parameters=item.get("parameters") or {})
        if tensor.datatype not in DTYPES:
            raise _refuse(f"input {tensor.name!r}: unknown datatype {tensor.datatype}")
        if not isinstance(tensor.shape, list):
            raise _refuse(f"input {tensor.name!r}: shape is a list")
        size = tensor.parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or at + size > len(blob):
                raise _refuse(f"input {tensor.name!r}: binary_data_size {size!r} runs past the binary data")
            raw = blob[at:at + size]
            at += size
            if tensor.datatype == "BYTES":
                tensor.data = bytes_elements(raw, tensor.name)
            else:
                width = np.dtype(DTYPES[tensor.datatype]).itemsize
                if len(raw) % width:
                    raise _refuse(f"input {tensor.name!r}: {len(raw):,} bytes is not a whole number of "
                                  f"{tensor.datatype} values")
                tensor.data = np.frombuffer(raw, dtype=DTYPES[tensor.datatype])
        elif "data" in item:
            tensor.data = _json_data(tensor, item["data"])
        else:
            raise _refuse(f"input {tensor.name!r} has no data (nor binary_data_size)")
        inputs.append(tensor)
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and "name" in o for o in outputs):
            raise _refuse("outputs is a list of {name, parameters}")
        outputs = [Tensor(str(o["name"]), "", [], parameters=o.get("parameters") or {}) for o in outputs]
    return InferRequest(inputs, outputs, parameters, str(doc.get("id", "")))


def encode_rest(name: str, version: str, request: InferRequest, outputs: list[Tensor]) -> Response:
    """The infer response: JSON, with each output's data inline, or (binary data asked for, per
    output or with ``binary_data_output``) after the JSON header."""
    every = bool(request.parameters.get("binary_data_output"))
    described, blobs = [], []
    for tensor in outputs:
        parameters = {k: v for k, v in tensor.parameters.items() if k not in ("binary_data", "classification")}
        item: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if tensor.parameters.get("binary_data", every):
            blob = bytes_blob(tensor.data) if tensor.datatype == "BYTES" else np.ascontiguousarray(tensor.data).tobytes()
            parameters["binary_data_size"] = len(blob)
            blobs.append(blob)
        else:
            item["data"] = ([b.decode("utf-8", "replace") for b in tensor.data] if tensor.datatype == "BYTES"
                            else tensor.data.tolist())
        if parameters:
            item["parameters"] = parameters
        described.append(item)
    doc: dict[str, Any] = {"model_name": name, "model_version": version, "outputs": described}
    if request.id:
        doc["id"] = request.id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


def model_metadata(server: ModelServer, versions: list[str]) -> dict[str, Any]:
    p = server.predictor
    h, w = p.preprocess.size
    outputs = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(p.classes)]},
               {"name": "top_indices", "datatype": "INT64", "shape": [-1, -1]},
               {"name": "top_labels", "datatype": "BYTES", "shape": [-1, -1]}]
    if p.embedding_dim is not None:
        outputs.append({"name": "embeddings", "datatype": "FP32", "shape": [-1, p.embedding_dim]})
    return {"name": server.name, "versions": versions, "platform": f"hybridvit_{server.model.backend}",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                       {"name": "pixels", "datatype": "UINT8", "shape": [-1, 3, h, w]},
                       {"name": "input", "datatype": "FP32", "shape": [-1, 3, h, w]}],
            "outputs": outputs}


def model_config(server: ModelServer) -> dict[str, Any]:
    """Triton's model configuration, in the fields its clients read (the batch dimension left out)."""
    meta = model_metadata(server, [server.version])

    def entries(tensors: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"name": t["name"], "data_type": "TYPE_STRING" if t["datatype"] == "BYTES" else f"TYPE_{t['datatype']}",
                 "dims": t["shape"][1:] or [1]} for t in tensors]

    return {"name": server.name, "platform": meta["platform"], "max_batch_size": server.config.max_images,
            "input": entries(meta["inputs"]), "output": entries(meta["outputs"]),
            "dynamic_batching": {"max_queue_delay_microseconds": int(server.config.max_wait_ms * 1000),
                                 "preferred_batch_size": [server.max_batch_size]}}


def add_v2_routes(app: FastAPI, repository: ModelRepository, check_key: Callable[[Request], None]) -> None:
    """The protocol's health, metadata, inference and model repository routes on ``app``."""
    config, metrics = repository.config, repository.metrics

    @app.get("/v2", summary="Server metadata (Open Inference Protocol)")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "hybridvit", "version": __version__, "extensions": EXTENSIONS}

    @app.get("/v2/health/live", summary="Live (Open Inference Protocol)")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", summary="Every model loaded is warmed up (Open Inference Protocol)")
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": repository.ready}, status_code=200 if repository.ready else 503)

    def versions(name: str) -> list[str]:
        return sorted(repository.models.get(name, {}), key=int)

    @app.get("/v2/models/{name}", summary="Model metadata: inputs, outputs, versions")
    @app.get("/v2/models/{name}/versions/{version}", summary="One version's metadata")
    async def metadata(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
        check_key(request)
        return model_metadata(repository.get(name, version), versions(name))

    @app.get("/v2/models/{name}/config", summary="Triton's model configuration", include_in_schema=False)
    @app.get("/v2/models/{name}/versions/{version}/config", include_in_schema=False)
    async def configuration(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
        check_key(request)
        return model_config(repository.get(name, version))

    @app.get("/v2/models/{name}/ready", summary="The model is loaded and warmed up")
    @app.get("/v2/models/{name}/versions/{version}/ready", summary="The version is loaded and warmed up")
    async def model_ready(request: Request, name: str, version: str | None = None) -> JSONResponse:
        check_key(request)
        server = repository.get(name, version)
        return JSONResponse({"name": name, "ready": server.ready}, status_code=200 if server.ready else 400)

    @app.post("/v2/models/{name}/infer", summary="Inference (Open Inference Protocol; binary tensor data too)")
    @app.post("/v2/models/{name}/versions/{version}/infer", summary="Inference on one version")
    async def infer_route(request: Request, name: str, version: str | None = None) -> Response:
        async def handle(served: Served) -> Response:
            with tracing.span("receive", tracing.extract(request.headers), {"model": name}):
                check_key(request)
                server = repository.get(name, version)
                served.name, served.version = server.name, server.version
                async with server.use():
                    body = await read_body(request, config, metrics, images=False)
                    parsed = parse_rest(body, request.headers.get(HEADER_LENGTH))
                    outputs = await infer(server, parsed)
                return encode_rest(server.name, server.version, parsed, outputs)

        return await answer(metrics, "v2", handle)

    @app.post("/v2/repository/index", summary="Every model of the repository, loaded or not")
    async def index(request: Request) -> list[dict[str, str]]:
        check_key(request)
        return repository.index()

    @app.post("/v2/repository/models/{name}/load", summary="Load (or reload) a model: its new versions "
              "warm up before they take requests, then the old ones retire")
    async def load(request: Request, name: str) -> dict[str, Any]:
        check_key(request)
        return {"name": name, "versions": await repository.load(name)}

    @app.post("/v2/repository/models/{name}/unload", summary="Unload a model (requests it holds are answered)")
    async def unload(request: Request, name: str) -> dict[str, Any]:
        check_key(request)
        await repository.unload(name)
        return {"name": name}
