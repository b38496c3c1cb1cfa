"""Run in the protocol clients' environment (tritonclient and KServe's SDK, which cannot share the
project's: see the README): infer with each client on a running ``hybridvit serve``, send it bad
tensors, and print what came back as one JSON object.

    python protocol_clients.py triton|kserve HTTP_URL GRPC_URL MODEL API_KEY IMAGE...

One family of clients per process: tritonclient's and KServe's gRPC modules both define the
protocol's messages, which one protobuf registry holds once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys

import numpy as np


def _top(probs: np.ndarray, labels: np.ndarray) -> dict:
    return {"labels": [[x.decode() if isinstance(x, bytes) else str(x) for x in row] for row in labels],
            "probabilities": probs.astype(float).tolist()}


def triton_http(url: str, model: str, key: str, images: list[bytes], pixels: np.ndarray) -> dict:
    import tritonclient.http as http

    client = http.InferenceServerClient(url.removeprefix("http://"))
    headers = {"x-api-key": key}  # passed as copies: tritonclient writes its own headers into the dict
    out = {"ready": client.is_server_ready() and client.is_model_ready(model, headers=dict(headers)),
           "metadata": client.get_model_metadata(model, headers=dict(headers))}
    for mode, binary in (("binary", True), ("json", False)):
        tensor = http.InferInput("image", [len(images)], "BYTES")
        data = images if binary else [base64.b64encode(i) for i in images]  # JSON: base64 strings
        tensor.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
        outputs = [http.InferRequestedOutput("probabilities", binary_data=binary),
                   http.InferRequestedOutput("top_labels", binary_data=binary)]
        result = client.infer(model, [tensor], outputs=outputs, headers=dict(headers))
        out[mode] = _top(result.as_numpy("probabilities"), result.as_numpy("top_labels"))
    tensor = http.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    result = client.infer(model, [tensor], outputs=[http.InferRequestedOutput("probabilities"),
                                                    http.InferRequestedOutput("top_labels", class_count=2)],
                          headers=dict(headers))
    out["pixels"] = _top(result.as_numpy("probabilities"), result.as_numpy("top_labels"))
    out["errors"] = _errors(http, client, model, headers, pixels)
    try:
        client.infer(model, [tensor], headers={"x-api-key": "wrong"})
    except http.InferenceServerException as e:
        out["errors"]["wrong key"] = str(e.status())
    return out


def triton_grpc(url: str, model: str, key: str, images: list[bytes], pixels: np.ndarray) -> dict:
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(url)
    headers = {"x-api-key": key}
    out = {"ready": client.is_server_ready() and client.is_model_ready(model, headers=dict(headers)),
           "versions": list(client.get_model_metadata(model, headers=dict(headers)).versions)}
    tensor = grpc.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    outputs = [grpc.InferRequestedOutput("probabilities"), grpc.InferRequestedOutput("top_labels")]
    result = client.infer(model, [tensor], outputs=outputs, headers=dict(headers))
    out["bytes"] = _top(result.as_numpy("probabilities"), result.as_numpy("top_labels"))
    tensor = grpc.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    result = client.infer(model, [tensor], outputs=outputs, headers=dict(headers))
    out["pixels"] = _top(result.as_numpy("probabilities"), result.as_numpy("top_labels"))
    out["errors"] = _errors(grpc, client, model, headers, pixels)
    try:
        client.infer(model, [tensor], headers={"x-api-key": "wrong"})
    except grpc.InferenceServerException as e:
        out["errors"]["wrong key"] = str(e.status())
    return out


def _errors(module, client, model: str, headers: dict, pixels: np.ndarray) -> dict:
    """Bad tensors the client lets through: the server's status for each."""
    cases = {"wrong shape": ("pixels", pixels[:, :, :16, :16], "UINT8"),
             "wrong datatype": ("pixels", pixels.astype(np.float32), "FP32"),
             "not an input": ("images", pixels, "UINT8"),
             "too many images": ("pixels", np.repeat(pixels, 40, axis=0), "UINT8")}
    out = {}
    for name, (input_name, data, datatype) in cases.items():
        tensor = module.InferInput(input_name, list(data.shape), datatype)
        tensor.set_data_from_numpy(data)
        try:
            client.infer(model, [tensor], headers=dict(headers))
            out[name] = "accepted"
        except module.InferenceServerException as e:
            out[name] = str(e.status())
    try:
        client.infer("no_such_model", [tensor], headers=dict(headers))
    except module.InferenceServerException as e:
        out["unknown model"] = str(e.status())
    return out


async def kserve_clients(http_url: str, grpc_url: str, model: str, key: str, images: list[bytes]) -> dict:
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

    out = {}
    rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    tensor = InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array([base64.b64encode(i) for i in images], dtype=np.object_),
                               binary_data=False)
    request = InferRequest(model, [tensor], request_id="kserve-rest")
    response = await rest.infer(http_url, request, model_name=model, headers={"x-api-key": key})
    outputs = {o.name: o.as_numpy() for o in response.outputs}
    out["rest"] = _top(outputs["probabilities"], outputs["top_labels"])
    out["rest_id"] = response.id
    await rest._client.aclose()
    grpc_client = InferenceGRPCClient(grpc_url)
    tensor = InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    response = await grpc_client.infer(InferRequest(model, [tensor], request_id="kserve-grpc"),
                                       headers=(("x-api-key", key),))
    outputs = {o.name: o.as_numpy() for o in response.outputs}
    out["grpc"] = _top(outputs["probabilities"], outputs["top_labels"])
    await grpc_client.close()
    return out


def main() -> None:
    family, http_url, grpc_url, model, key, *files = sys.argv[1:]
    images = [open(f, "rb").read() for f in files]
    pixels = np.load(files[0] + ".pixels.npy")  # the model's input for the first images, as predict makes it
    if family == "triton":
        result = {"triton_http": triton_http(http_url, model, key, images, pixels),
                  "triton_grpc": triton_grpc(grpc_url, model, key, images, pixels)}
    else:
        result = {"kserve": asyncio.run(kserve_clients(http_url, grpc_url, model, key, images))}
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
