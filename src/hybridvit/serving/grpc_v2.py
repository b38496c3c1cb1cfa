"""The Open Inference Protocol over gRPC (grpcio's asyncio server, on the HTTP server's event
loop): the same models, batches, limits and API key as REST (``v2.infer``), and the standard
gRPC health service (``grpc.health.v1.Health``, serving once every model is warmed up).

Tensor data comes as ``raw_input_contents`` (what Triton's and KServe's clients send) or typed
``contents``; outputs go back as ``raw_output_contents``. The API key travels as ``x-api-key``
or ``authorization: Bearer KEY`` metadata. Refusals carry the protocol's status codes:
INVALID_ARGUMENT for a bad tensor, NOT_FOUND for an unknown model, UNAUTHENTICATED for a wrong
key, UNAVAILABLE while a model warms up.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from .. import __version__
from . import tracing
from .pipeline import describe_error
from .protos import predict_v2_pb2 as pb
from .protos import predict_v2_pb2_grpc as pb_grpc
from .model_server import ServeConfig, UploadError, check_api_key
from .v2 import DTYPES, EXTENSIONS, InferRequest, Tensor, bytes_blob, bytes_elements, infer, model_metadata

if TYPE_CHECKING:
    from .repository import ModelRepository

STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
          415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
          503: grpc.StatusCode.UNAVAILABLE}
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _parameters(entries: Any) -> dict[str, Any]:
    return {key: getattr(value, value.WhichOneof("parameter_choice")) for key, value in entries.items()
            if value.WhichOneof("parameter_choice")}


def _set_parameters(target: Any, parameters: dict[str, Any]) -> None:
    for key, value in parameters.items():
        kind = "bool_param" if isinstance(value, bool) else "int64_param" if isinstance(value, int) else "string_param"
        setattr(target[key], kind, value if kind != "string_param" else str(value))


def parse_grpc(request: Any) -> InferRequest:
    """A ``ModelInferRequest`` as the protocol-neutral ``InferRequest``."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise UploadError(400, f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    inputs = []
    for i, item in enumerate(request.inputs):
        tensor = Tensor(item.name, item.datatype, list(item.shape), parameters=_parameters(item.parameters))
        if tensor.datatype not in DTYPES:
            raise UploadError(400, f"input {tensor.name!r}: unknown datatype {tensor.datatype}")
        if raw:
            if tensor.datatype == "BYTES":
                tensor.data = bytes_elements(raw[i], tensor.name)
            else:
                width = np.dtype(DTYPES[tensor.datatype]).itemsize
                if len(raw[i]) % width:
                    raise UploadError(400, f"input {tensor.name!r}: {len(raw[i]):,} bytes is not a whole number of "
                                      f"{tensor.datatype} values")
                tensor.data = np.frombuffer(raw[i], dtype=DTYPES[tensor.datatype])
        elif tensor.datatype in CONTENTS:
            values = getattr(item.contents, CONTENTS[tensor.datatype])
            tensor.data = (list(values) if tensor.datatype == "BYTES"
                           else np.asarray(values, dtype=DTYPES[tensor.datatype]))
        else:
            raise UploadError(400, f"input {tensor.name!r}: {tensor.datatype} data comes as raw_input_contents")
        inputs.append(tensor)
    outputs = [Tensor(o.name, "", [], parameters=_parameters(o.parameters)) for o in request.outputs] or None
    return InferRequest(inputs, outputs, _parameters(request.parameters), request.id)


def encode_grpc(name: str, version: str, request: InferRequest, outputs: list[Tensor]) -> Any:
    response = pb.ModelInferResponse(model_name=name, model_version=version, id=request.id)
    for tensor in outputs:
        item = response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        _set_parameters(item.parameters, {k: v for k, v in tensor.parameters.items() if k != "classification"})
        response.raw_output_contents.append(bytes_blob(tensor.data) if tensor.datatype == "BYTES"
                                            else np.ascontiguousarray(tensor.data).tobytes())
    return response


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's RPCs over the server's model repository."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository, self.config, self.metrics = repository, repository.config, repository.metrics

    async def _refuse(self, context: grpc.aio.ServicerContext, e: UploadError) -> None:
        await context.abort(STATUS.get(e.status, grpc.StatusCode.INVALID_ARGUMENT), str(e))

    def _check_key(self, context: grpc.aio.ServicerContext) -> None:
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ())}
        check_api_key(self.config, metadata.get("x-api-key"), metadata.get("authorization"))

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.repository.ready)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(name="hybridvit", version=__version__, extensions=EXTENSIONS)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self._check_key(context)
            return pb.ModelReadyResponse(ready=self.repository.get(request.name, request.version or None).ready)
        except UploadError as e:
            if e.status == 404:
                return pb.ModelReadyResponse(ready=False)
            await self._refuse(context, e)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self._check_key(context)
            server = self.repository.get(request.name, request.version or None)
        except UploadError as e:
            await self._refuse(context, e)
        meta = model_metadata(server, sorted(self.repository.models.get(server.name, {}), key=int))
        response = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
        for kind in ("inputs", "outputs"):
            for t in meta[kind]:
                getattr(response, kind).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return response

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        start = time.perf_counter()
        self.metrics.in_flight.inc()
        served, status = ("", ""), "OK"
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        try:
            with tracing.span("receive", tracing.extract(metadata), {"model": request.model_name}):
                self._check_key(context)
                if request.ByteSize() > self.config.max_body_mb * 2**20:
                    raise UploadError(413, f"request of {request.ByteSize():,} bytes is over the server's limit "
                                      f"(--max-body-mb {self.config.max_body_mb:g})")
                server = self.repository.get(request.model_name, request.model_version or None)
                served = (server.name, server.version)
                async with server.use():
                    parsed = parse_grpc(request)
                    outputs = await infer(server, parsed)
                return encode_grpc(server.name, server.version, parsed, outputs)
        except UploadError as e:
            status = STATUS.get(e.status, grpc.StatusCode.INVALID_ARGUMENT).name
            await self._refuse(context, e)
        except Exception as e:  # noqa: BLE001 - a model failure fails this request, and the server goes on
            if isinstance(e, grpc.aio.AbortError):
                raise
            status = "INTERNAL"
            await context.abort(grpc.StatusCode.INTERNAL, f"model failed: {describe_error(e)}")
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(status, *served, "grpc").inc()
            self.metrics.latency.labels("grpc").observe(time.perf_counter() - start)

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self._check_key(context)
            await self.repository.load(request.model_name)
        except UploadError as e:
            await self._refuse(context, e)
        return pb.RepositoryModelLoadResponse(model_name=request.model_name, isLoaded=True)

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self._check_key(context)
            await self.repository.unload(request.model_name)
        except UploadError as e:
            await self._refuse(context, e)
        return pb.RepositoryModelUnloadResponse(model_name=request.model_name, isUnloaded=True)


class GrpcServer:
    """The gRPC server on ``host:port`` (0: a free one, kept in ``repository.grpc_port``), bound
    and started before the models load (a port in use fails at once); its health service says
    NOT_SERVING until ``serving()`` (for the whole server and for the inference service)."""

    def __init__(self, server: grpc.aio.Server, checks: Any) -> None:
        self.server, self.checks = server, checks

    async def serving(self, ready: bool = True) -> None:
        from grpc_health.v1 import health_pb2

        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", "inference.GRPCInferenceService"):
            await self.checks.set(service, status)

    async def stop(self, grace: float) -> None:
        await self.serving(False)
        await self.server.stop(grace)


async def start_grpc(repository: ModelRepository, port: int, host: str = "127.0.0.1") -> GrpcServer:
    from grpc_health.v1 import health, health_pb2_grpc

    from ..checks import BindError

    config: ServeConfig = repository.config
    limit = int(config.max_body_mb * 2**20) + 2**16  # the message cap: the body limit, and room for the rest
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", -1)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(repository), server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        repository.grpc_port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise BindError(f"cannot serve gRPC at {address}: {e}") from None
    await server.start()
    grpc_server = GrpcServer(server, checks)
    await grpc_server.serving(False)
    return grpc_server
