"""The model as ``predict`` and ``serve`` run it: raw 0-255 pixels in, normalised inside the
graph, logits (and embeddings) out; or a file ``export``/``quantize`` wrote, in its own runtime."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


class Deployed(nn.Module):
    """The classifier as ``predict`` runs it: raw 0-255 pixels in, normalised inside the graph
    (where the runtime does it in one pass), logits out, with the pooled features before the
    classifier beside them when ``embeddings`` is set."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], input_hw: tuple[int, int],
                 embeddings: bool = False) -> None:
        super().__init__()
        self.net, self.embeddings, self._input_hw = net, embeddings, tuple(input_hw)
        self.register_buffer("scale", 1 / (255 * torch.tensor(std).view(1, -1, 1, 1)))
        self.register_buffer("shift", torch.tensor(mean).view(1, -1, 1, 1) / torch.tensor(std).view(1, -1, 1, 1))
        self.in_chans, self.num_classes = net.in_chans, net.num_classes
        self.model_name = net.model_name
        self.cpu_graph_rewrite = getattr(net, "cpu_graph_rewrite", False)

    @property
    def input_hw(self) -> tuple[int, int]:
        return self._input_hw

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.net.forward_features(pixels * self.scale - self.shift)
        logits = self.net.forward_head(features)
        if not self.embeddings:
            return logits
        return torch.cat([logits, self.net.forward_head(features, pre_logits=True)], dim=1)


class FileModel:
    """A file ``export`` or ``quantize`` wrote, in its own runtime: ONNX (static int8 included) in
    ONNX Runtime, ExecuTorch programs in ExecuTorch, LiteRT programs in LiteRT. ONNX and ExecuTorch
    files take normalised float images, so the uint8 pixels are normalised here first; a LiteRT
    program normalises them itself and gives probabilities, returned as their logarithms (the
    softmax of which gives them back)."""

    def __init__(self, path: Path, scale: torch.Tensor, shift: torch.Tensor) -> None:
        self.suffix, self.scale, self.shift = path.suffix.lower(), scale, shift
        if self.suffix == ".onnx":
            from .runners import OnnxRuntimeRunner, onnxruntime_available

            if not onnxruntime_available():
                raise ImportError(f"{path}: running an ONNX file needs onnxruntime: pip install hybridvit[export]")
            self.precision, self.backend = "onnx-file", "onnxruntime"
            self.runner: Callable[[torch.Tensor], torch.Tensor] = OnnxRuntimeRunner(path.read_bytes())
            return
        from .edge import ProgramRunner, require

        format = "executorch" if self.suffix == ".pte" else "litert"
        require(format, run=True)
        self.precision, self.backend = f"{format}-file", format
        self.runner = ProgramRunner(path.read_bytes(), format, torch.get_num_threads())

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.suffix == ".tflite":
            return self.runner(pixels.float()).clamp_min(1e-30).log()
        return self.runner((pixels.float() * self.scale - self.shift).contiguous())
