"""Scaled dot-product attention with an optional additive bias, on PyTorch's fused kernels.

One entry point for every family. Inference uses ``F.scaled_dot_product_attention`` (the fused
CPU kernel needs q, k and v of one width, so narrower q and k are zero-padded, which leaves
every dot product unchanged). Training with a learnt bias, and MAC counting, take the explicit
formula: it trains the bias and counts the paper's operations (Q·Kᵀ, softmax, A·V) unpadded.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

_REFERENCE_ONLY = False


@contextmanager
def reference_attention() -> Iterator[None]:
    """Force the explicit formula inside the block (``count_macs`` uses it)."""
    global _REFERENCE_ONLY
    previous, _REFERENCE_ONLY = _REFERENCE_ONLY, True
    try:
        yield
    finally:
        _REFERENCE_ONLY = previous


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """``softmax(q·kᵀ·scale + bias) · v`` for ``(B, heads, N, d)`` tensors and a ``(heads, Nq, Nk)`` bias.

    ``scale`` defaults to ``1 / sqrt(q width)``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    needs_bias_grad = bias is not None and torch.is_grad_enabled() and (q.requires_grad or bias.requires_grad)
    if _REFERENCE_ONLY or needs_bias_grad:
        scores = (q @ k.transpose(-2, -1)) * scale
        return (scores if bias is None else scores + bias).softmax(dim=-1) @ v
    if q.shape[-1] < v.shape[-1]:
        pad = (0, v.shape[-1] - q.shape[-1])
        q, k = F.pad(q, pad), F.pad(k, pad)
    mask = None if bias is None else bias.to(q.dtype).expand(q.shape[0], -1, -1, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
