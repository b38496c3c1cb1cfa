"""Export a fused model with a dynamic batch dimension: ONNX, TorchScript or a torch.export program."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .fusion import fuse
from .layers import reference_attention

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}


def _example(model: nn.Module, batch: int) -> torch.Tensor:
    return torch.randn(batch, model.in_chans, *model.input_hw)  # type: ignore[attr-defined]


def onnx_bytes(fused: nn.Module, example: torch.Tensor, opset: int = 17) -> bytes:
    """An inference-ready ``fused`` model as ONNX (input ``images``, output ``logits``, free batch)."""
    f = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(), reference_attention():  # plain MatMul/Softmax nodes
        warnings.simplefilter("ignore")  # tracer and exporter deprecation chatter
        torch.onnx.export(fused, (example,), f, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
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


def export(model: nn.Module, path: str | Path, format: str = "onnx", opset: int = 17) -> Path:
    """Write ``model`` BatchNorm-fused for inference; the batch dimension stays free.

    ``onnx`` uses PyTorch's TorchScript-based exporter (input ``images``, output ``logits``),
    ``torchscript`` a frozen trace (``torch.jit.load``), ``exported-program`` ``torch.export``
    (``torch.export.load``). Input height and width are the model's own.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fused = fuse(model).cpu().requires_grad_(False)
    example = _example(fused, 2)  # batch 2: torch.export specialises sizes 0 and 1
    if format == "onnx":
        path.write_bytes(onnx_bytes(fused, example, opset))
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


def check_onnx(path: str | Path, model: nn.Module, batch: int = 3, threads: int | None = None) -> float:
    """Largest relative difference between ONNX Runtime and the PyTorch model on random images."""
    session = onnxruntime_session(path, threads)
    x = _example(model, batch)
    with torch.no_grad():
        reference = model.eval()(x)
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    return ((got - reference).abs().max() / reference.abs().max()).item()
