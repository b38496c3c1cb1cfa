"""One fusion walk for every family: each fusable module folds itself (see ``layers``)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def _fuse_children(module: nn.Module) -> None:
    for name, child in module.named_children():
        fuse_fn = getattr(child, "fuse", None)
        if callable(fuse_fn):
            setattr(module, name, fuse_fn())
        else:
            _fuse_children(child)


@torch.no_grad()
def fuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm into its neighbouring conv/linear and precompute attention biases.

    Returns an eval-mode model for inference only (a copy unless ``inplace``): its outputs
    equal the unfused model's eval outputs up to float rounding.
    """
    if not inplace:
        model = copy.deepcopy(model)
    _fuse_children(model)
    model.is_fused = True
    return model.eval()
