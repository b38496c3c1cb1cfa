"""Scaled dot-product attention with an optional additive bias, on the fastest CPU/GPU path.

One entry point for every family. Three paths, all computing ``softmax(q·kᵀ·scale + bias)·v``:

* the explicit autograd formula, when the bias needs a gradient (training LeViT) and for MAC
  counting (it counts the paper's operations, Q·Kᵀ, softmax, A·V, unpadded);
* PyTorch's fused kernel ``F.scaled_dot_product_attention`` (it needs q, k and v of one width,
  so narrower q and k are zero-padded, which leaves every dot product unchanged);
* without autograd, the explicit formula with the bias add and softmax done in place on the
  score matrix. Measured on CPU (docs/benchmarks.md), it beats the padded fused kernel when
  padding would more than double q·kᵀ (LeViT's shrinking attention, V = 4D), on small grids,
  and in bfloat16, whose fused CPU kernel is slow; the fused kernel wins for fp32 LeViT blocks on
  the 14x14 grid and for any q, k, v of one width (CvT).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

_REFERENCE_ONLY = False
_CAPTURED: list["AttentionMap"] | None = None
_SMALL_GRID = 64  # keys: below this, the score matrix is small and the explicit path is faster


@contextmanager
def reference_attention() -> Iterator[None]:
    """Force the explicit autograd formula inside the block (``count_macs`` and ONNX export use it)."""
    global _REFERENCE_ONLY
    previous, _REFERENCE_ONLY = _REFERENCE_ONLY, True
    try:
        yield
    finally:
        _REFERENCE_ONLY = previous


@dataclass
class AttentionMap:
    """One attention call's probabilities ``(B, heads, Nq, Nk)`` and the grids its tokens lie on
    (tokens beyond ``h * w``, such as CvT's class token, come first)."""

    probs: torch.Tensor
    query_grid: tuple[int, int]
    key_grid: tuple[int, int]


@contextmanager
def capture_attention() -> Iterator[list[AttentionMap]]:
    """Record every attention call's probabilities inside the block, in call order (for figures)."""
    global _CAPTURED
    previous, _CAPTURED = _CAPTURED, []
    try:
        yield _CAPTURED
    finally:
        _CAPTURED = previous


def _prefers_fused_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    if q.shape[-1] == v.shape[-1] or q.device.type == "cuda":
        return True
    return q.dtype == torch.float32 and v.shape[-1] <= 2 * q.shape[-1] and k.shape[-2] >= _SMALL_GRID


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
              scale: float | None = None, *, query_grid: tuple[int, int] | None = None,
              key_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """``softmax(q·kᵀ·scale + bias) · v`` for ``(B, heads, N, d)`` tensors and a ``(heads, Nq, Nk)`` bias.

    ``scale`` defaults to ``1 / sqrt(q width)``. The grids the queries and keys lie on are
    only recorded, by ``capture_attention``.
    """
    # float(): a constant when traced for export, not a Shape-Gather-Cast-Pow chain run per call
    scale = float(q.shape[-1]) ** -0.5 if scale is None else scale
    needs_bias_grad = bias is not None and torch.is_grad_enabled() and (q.requires_grad or bias.requires_grad)
    if _REFERENCE_ONLY or needs_bias_grad or _CAPTURED is not None:
        scores = (q @ k.transpose(-2, -1)) * scale
        probs = (scores if bias is None else scores + bias).softmax(dim=-1)
        if _CAPTURED is not None:
            _CAPTURED.append(AttentionMap(probs.detach(), tuple(map(int, query_grid or (0, 0))),
                                          tuple(map(int, key_grid or (0, 0)))))
        return probs @ v
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if needs_grad or _prefers_fused_kernel(q, k, v):
        if q.shape[-1] < v.shape[-1]:
            pad = (0, v.shape[-1] - q.shape[-1])
            q, k = F.pad(q, pad), F.pad(k, pad)
        mask = None if bias is None else bias.to(q.dtype).expand(q.shape[0], -1, -1, -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    if bias is not None:
        scores.add_(bias.to(scores.dtype))
    torch.softmax(scores, dim=-1, out=scores)
    return torch.matmul(scores, v)


@dataclass
class AttentionView:
    """One attention call seen from one query: the per-head maps over the key grid."""

    layer: int  # index among the forward's attention calls (non-negative)
    layers: int  # attention calls in the forward
    query_cell: tuple[int, int]  # the query's (row, column) on the query grid
    maps: torch.Tensor  # (heads, key H, key W) probabilities


def capture_maps(model: torch.nn.Module, x: torch.Tensor) -> list[AttentionMap]:
    """Every attention call's probabilities for input ``x``, with the grids its tokens lie on."""
    with torch.inference_mode(), capture_attention() as maps:
        model(x)
    return maps


def attention_view(maps: list[AttentionMap], layer: int, query: tuple[float, float],
                   image_hw: tuple[int, int]) -> AttentionView:
    """Each head's probabilities for the query at pixel ``query`` (y, x) of an ``image_hw`` input."""
    if not -len(maps) <= layer < len(maps):
        raise ValueError(f"attention layer {layer} does not exist: there are {len(maps)} (0..{len(maps) - 1})")
    amap = maps[layer]
    if not all(0 <= p < s for p, s in zip(query, image_hw)):
        raise ValueError(f"query (y, x) = {tuple(query)} lies outside the {image_hw[0]}x{image_hw[1]} input")
    (qh, qw), (kh, kw) = amap.query_grid, amap.key_grid
    cell = tuple(min(max(int(p * g / s), 0), g - 1) for p, g, s in zip(query, (qh, qw), image_hw))
    probs = amap.probs[0].float().cpu()  # (heads, Nq, Nk)
    q_index = probs.shape[1] - qh * qw + cell[0] * qw + cell[1]  # extra tokens (a class token) come first
    rows = probs[:, q_index, probs.shape[2] - kh * kw:]
    return AttentionView(layer % len(maps), len(maps), cell, rows.reshape(-1, kh, kw))
