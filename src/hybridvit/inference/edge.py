"""On-device export: ExecuTorch with the XNNPACK delegate, checked in ExecuTorch's own runtime
before the file is written.

The model is fused, rewritten by the device pass (``deploy.for_device``) and exported at batch 1
and its own input size; the exporter counts the operators left outside XNNPACK (none, for LeViT),
runs the program on images and compares it with the eager model. A program whose top-1 agrees
with eager PyTorch on fewer than ``AGREEMENT`` of the images is refused. Beside ``MODEL.pte``,
``MODEL.json`` holds what an app needs to feed it: the class names and the preprocessing (the
program takes normalised float images, as the ONNX export does).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checks import check_output_file
from ..fusion import fuse
from .deploy import for_device

AGREEMENT = 0.99  # top-1 agreement with eager PyTorch a file must reach to be written (as optimize's int8 gate)


@dataclass
class EdgeExport:
    """What was written and how it was checked."""

    path: Path
    format: str
    size_bytes: int
    partitions: int  # XNNPACK delegate calls
    outside: dict[str, int] = field(default_factory=dict)  # operators left outside the delegate, by name
    max_difference: float = 0.0  # largest absolute logit difference from eager PyTorch
    agreement: float = 1.0  # top-1 agreement with eager PyTorch
    images: int = 0

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def _require_executorch() -> None:
    try:
        import executorch  # noqa: F401
    except ImportError as e:
        raise ImportError(f'ExecuTorch export needs executorch: pip install "hybridvit[edge]" ({e})') from e


def executorch_program(model: nn.Module, example: torch.Tensor) -> tuple[bytes, int, dict[str, int]]:
    """``model`` lowered to XNNPACK: the program's bytes, its delegate calls and the operators
    left outside the delegate."""
    _require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with torch.no_grad():
        edge = to_edge_transform_and_lower(torch.export.export(model, (example,)), partitioner=[XnnpackPartitioner()])
    partitions, outside = 0, Counter()
    for node in edge.exported_program().graph_module.graph.nodes:
        if node.op != "call_function" or "getitem" in str(node.target):
            continue
        if "executorch_call_delegate" in str(node.target):
            partitions += 1
        else:
            outside[getattr(node.target, "__name__", str(node.target))] += 1
    return edge.to_executorch().buffer, partitions, dict(outside)


def run_executorch(program: bytes, images: torch.Tensor) -> torch.Tensor:
    """The program's logits for ``images`` (one at a time: the program takes batch 1)."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(program).load_method("forward")
    return torch.cat([method.execute([image[None].contiguous()])[0] for image in images])


def export_executorch(model: nn.Module, path: str | Path, images: torch.Tensor | None = None,
                      extra: dict[str, Any] | None = None, agreement: float = AGREEMENT) -> EdgeExport:
    """Write ``model`` as an ExecuTorch program for XNNPACK (``MODEL.pte``, and ``MODEL.json`` with
    ``extra``: classes and preprocessing), after checking it in ExecuTorch's runtime on ``images``
    (normalised, the model's input size; default: 16 random ones). ``ValueError`` if its top-1
    agrees with eager PyTorch on fewer than ``agreement`` of them: nothing is written then."""
    path = check_output_file(path)
    fused = fuse(model).cpu().requires_grad_(False).eval()
    device = for_device(fused)
    example = torch.zeros(1, fused.in_chans, *fused.input_hw)
    program, partitions, outside = executorch_program(device, example)
    if images is None:
        images = torch.randn(16, fused.in_chans, *fused.input_hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = fused(images)
    got = run_executorch(program, images)
    agree = (got.argmax(1) == reference.argmax(1)).float().mean().item()
    result = EdgeExport(path, "executorch", len(program), partitions, outside,
                        (got - reference).abs().max().item(), agree, len(images))
    if agree < agreement:
        raise ValueError(f"the ExecuTorch program's top-1 agrees with PyTorch on {agree:.1%} of {len(images)} images, "
                         f"under {agreement:.0%}: not written ({path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(program)
    os.replace(tmp, path)
    sidecar = {"format": "executorch", "input": {"shape": [1, fused.in_chans, *fused.input_hw], "dtype": "float32",
                                                 "layout": "NCHW, RGB, normalised: (pixel / 255 - mean) / std"},
               "model": getattr(fused, "model_name", None), **(extra or {}), "check": result.summary()}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=1))
    return result
