"""LeViT's attention bias: a learnt per-head scalar for every relative offset (|dy|, |dx|).

The paper replaces positional embeddings with ``B[h, |y - y'|, |x - x'|]`` added to the
attention logits. The table holds one column per offset on the key grid, in row-major
order ``|dy| * W + |dx|`` (the order of the official release, so its tables load as they are).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def bias_index(key_grid: tuple[int, int], stride: int = 1) -> torch.Tensor:
    """``(Nq, Nk)`` indices into the bias table, queries taken every ``stride`` keys."""
    h, w = key_grid
    ky, kx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    qy, qx = ky[::stride, ::stride], kx[::stride, ::stride]
    dy = (qy.reshape(-1, 1) - ky.reshape(1, -1)).abs()
    dx = (qx.reshape(-1, 1) - kx.reshape(1, -1)).abs()
    return dy * w + dx


class AttentionBias(nn.Module):
    """Returns the ``(heads, Nq, Nk)`` bias gathered from a learnt ``(heads, H*W)`` table."""

    def __init__(self, num_heads: int, key_grid: tuple[int, int], stride: int = 1) -> None:
        super().__init__()
        self.key_grid = key_grid
        self.table = nn.Parameter(torch.zeros(num_heads, key_grid[0] * key_grid[1]))
        # Derived from the geometry, so never saved: checkpoints hold only the table.
        self.register_buffer("index", bias_index(key_grid, stride), persistent=False)

    def forward(self) -> torch.Tensor:
        return self.table[:, self.index]

    @torch.no_grad()
    def fuse(self) -> "FixedAttentionBias":
        return FixedAttentionBias(self.forward().detach().clone())


class FixedAttentionBias(nn.Module):
    """The gathered bias precomputed once for inference (no gather per forward)."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("bias", bias)

    def forward(self) -> torch.Tensor:
        return self.bias


def resize_bias_table(table: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resample a ``(heads, H*W)`` table to another key grid (fine-tuning at a new size)."""
    heads = table.shape[0]
    grid = table.reshape(1, heads, *old_grid)
    resized = F.interpolate(grid, size=new_grid, mode="bilinear", align_corners=False)
    return resized.reshape(heads, new_grid[0] * new_grid[1])
