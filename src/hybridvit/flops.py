"""Multiply-accumulate counting in the paper's convention, on top of PyTorch's FlopCounterMode.

PyTorch counts 2 FLOPs per multiply-accumulate of convolutions, linear maps and batched
matmuls (Q·Kᵀ, A·V). The LeViT paper also counts one operation per softmax score, which we
add through the counter's ``custom_mapping``. Elementwise work (norms, activations, adds) is
not counted, as in the papers.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .layers import reference_attention


def _softmax_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode reports 2 per MAC; report 2 per score so that halving gives 1.
    return 2 * math.prod(x_shape)


_CUSTOM = {torch.ops.aten._softmax: _softmax_flops}


@torch.no_grad()
def macs_by_module(model: nn.Module, input_size: tuple[int, int] | None = None) -> dict[str, int]:
    """MACs per image for every submodule path that does any (``""`` is the whole model).

    Runs one eval-mode forward of a batch-1 input; on a model built under
    ``torch.device("meta")`` nothing is computed, only shapes.
    """
    h, w = input_size or model.input_hw  # type: ignore[attr-defined]
    param = next(model.parameters())
    x = torch.zeros(1, model.in_chans, h, w, device=param.device, dtype=param.dtype)  # type: ignore[attr-defined]
    was_training = model.training
    model.eval()
    try:
        with reference_attention(), FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
            model(x)
    finally:
        model.train(was_training)
    root = type(model).__name__
    result: dict[str, int] = defaultdict(int)
    for path, ops in counter.get_flop_counts().items():
        if path == "Global":
            continue
        name = path[len(root) + 1:] if path.startswith(root + ".") else ("" if path == root else path)
        result[name] += sum(ops.values()) // 2
    return dict(result)


def count_macs(model: nn.Module, input_size: tuple[int, int] | None = None) -> int:
    """Multiply-accumulates for one image of ``input_size`` (default: the model's own size)."""
    return macs_by_module(model, input_size)[""]


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
