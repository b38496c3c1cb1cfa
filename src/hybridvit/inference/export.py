"""Export a fused model with a dynamic batch dimension: ONNX, TorchScript or a torch.export program.

ONNX files can also leave height and width free (``dynamic_size``): CvT's graph has nothing
tied to the input size; LeViT's attention biases are then derived from the learnt tables
inside the graph (resampled to each key grid), which costs a little per run, so a file for
one size is the faster choice when the size is known.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checks import check_output_file
from ..fusion import fuse
from ..layers import bias_in_graph, reference_attention

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2",
           "executorch": ".pte", "litert": ".tflite", "coreml": ".mlpackage"}
DEVICE_FORMATS = ("executorch", "litert", "coreml")  # on-device programs: edge.py
# Every family exports and runs in ONNX Runtime from opset 14 (the grafted DeiT's attention needs
# it; LeViT works from 10, CvT from 9) to 20, the last one PyTorch's TorchScript-based exporter writes.
ONNX_OPSETS = range(14, 21)


def check_export(format: str, opset: int = 17, dynamic_size: bool = False) -> None:
    """``ValueError`` for options ``export`` cannot honour, before a model is loaded or traced
    (the exporter's own error for an opset it lacks is hundreds of lines, graph included)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if dynamic_size and format != "onnx":
        raise ValueError(f"dynamic_size is for ONNX files; {format} exports are traced at the model's input size")
    if format in DEVICE_FORMATS:
        from .edge import require

        require(format)
    if format == "onnx" and opset not in ONNX_OPSETS:
        raise ValueError(f"--opset must be between {ONNX_OPSETS.start} and {ONNX_OPSETS[-1]} (what PyTorch's ONNX "
                         f"exporter writes for every model here); got {opset}")


def serves_any_size(model: nn.Module) -> bool:
    """Whether ``model`` accepts inputs of other sizes than its own (LeViT: ``dynamic_size``)."""
    return bool(getattr(getattr(model, "config", None), "dynamic_size", True))


def onnx_bytes(fused: nn.Module, example: torch.Tensor, opset: int = 17, dynamic_size: bool = False) -> bytes:
    """An inference-ready ``fused`` model as ONNX (input ``images``, output ``logits``, free batch;
    free height and width too with ``dynamic_size``)."""
    if dynamic_size and not serves_any_size(fused):
        raise ValueError(f"{getattr(fused, 'model_name', None) or type(fused).__name__} serves only its own input "
                         f"size: create it with dynamic_size=True to export a graph for any size")
    check_export("onnx", opset)
    image_axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    f = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(), reference_attention():  # plain MatMul/Softmax nodes
        warnings.simplefilter("ignore")  # tracer and exporter deprecation chatter
        with bias_in_graph() if dynamic_size else contextlib.nullcontext():
            torch.onnx.export(fused, (example,), f, input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": image_axes, "logits": {0: "batch"}}, opset_version=opset,
                              dynamo=False)
    return f.getvalue()


def onnxruntime_session(model: str | Path | bytes, threads: int | None = None, spinning: bool = True) -> Any:
    """An ONNX Runtime CPU session (``threads``: intra-op threads, default ONNX Runtime's).

    ``spinning=False`` lets its worker threads sleep after a run: by default they spin,
    which saves a wake-up per run but slows whatever else runs in the process next.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])


def export(model: nn.Module, path: str | Path, format: str = "onnx", opset: int = 17,
           dynamic_size: bool = False) -> Path:
    """Write ``model`` BatchNorm-fused for inference; the batch dimension stays free.

    ``onnx`` uses PyTorch's TorchScript-based exporter (input ``images``, output ``logits``),
    ``torchscript`` a frozen trace (``torch.jit.load``), ``exported-program`` ``torch.export``
    (``torch.export.load``), ``executorch``, ``litert`` and ``coreml`` programs for devices at batch 1 (``edge.export_edge``:
    int8 and the check there). Input height and width are the model's own, or free in an ONNX
    file with ``dynamic_size`` (LeViT: models created with ``dynamic_size=True``).
    """
    check_export(format, opset, dynamic_size)
    if format in DEVICE_FORMATS:  # the device pass, and a check in the runtime
        from .edge import export_edge

        return export_edge(model, path, format).path
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fused = fuse(model).cpu().requires_grad_(False)
    example = torch.randn(2, fused.in_chans, *fused.input_hw)  # batch 2: torch.export specialises sizes 0 and 1
    if format == "onnx":
        path.write_bytes(onnx_bytes(fused, example, opset, dynamic_size))
        return path
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter deprecation chatter
        if format == "torchscript":
            torch.jit.save(torch.jit.freeze(torch.jit.trace(fused, example)), str(path))
        else:
            batch = torch.export.Dim("batch", min=1, max=65536)
            program = torch.export.export(fused, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, str(path))
    return path


def check_onnx(path: str | Path, model: nn.Module, batch: int = 3, threads: int | None = None,
               size: tuple[int, int] | None = None) -> float:
    """Largest relative difference between ONNX Runtime and the PyTorch model on random images
    (of the model's input size, or ``size``)."""
    session = onnxruntime_session(path, threads)
    x = torch.randn(batch, model.in_chans, *(size or model.input_hw))  # type: ignore[attr-defined]
    with torch.no_grad():
        reference = model.eval()(x)
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    return ((got - reference).abs().max() / reference.abs().max()).item()
