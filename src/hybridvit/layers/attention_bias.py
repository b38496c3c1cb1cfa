"""LeViT's attention bias: a learnt per-head scalar for every relative offset (|dy|, |dx|).

The paper replaces positional embeddings with ``B[h, |y - y'|, |x - x'|]`` added to the
attention logits. The table holds one column per offset on the key grid, in row-major
order ``|dy| * W + |dx|`` (the order of the official release, so its tables load as they are).

The table ties a model to the key grid it was trained on. For another grid the bias is
derived from the same table (``bias_for_grid``): ``"bilinear"`` resamples the table over
the offsets to the new grid's extent, ``"keep"`` uses the learnt offsets as they are (only
for grids no larger than the trained one). The native grid takes the plain gather, so a
model serving several sizes computes exactly what a fixed-size model does at its own size.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..configs.levit import BIAS_RESAMPLING

_IN_GRAPH = False
_CACHE_SIZE = 8  # key grids remembered per layer (a server sees a handful of input sizes)


@contextmanager
def bias_in_graph() -> Iterator[None]:
    """Compute every bias from its table in the forward (no native-size shortcut, no cache).

    For tracing a graph that serves any input size: the resampling and the gather become
    graph operations on the traced grid size.
    """
    global _IN_GRAPH
    previous, _IN_GRAPH = _IN_GRAPH, True
    try:
        yield
    finally:
        _IN_GRAPH = previous


def bias_index(key_grid: tuple[int, int], stride: int = 1, device: torch.device | None = None) -> torch.Tensor:
    """``(Nq, Nk)`` indices into the bias table, queries taken every ``stride`` keys."""
    h, w = key_grid
    ky, kx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    qy, qx = ky[::stride, ::stride], kx[::stride, ::stride]
    dy = (qy.reshape(-1, 1) - ky.reshape(1, -1)).abs()
    dx = (qx.reshape(-1, 1) - kx.reshape(1, -1)).abs()
    return dy * w + dx


def resize_bias_table(table: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resample a ``(heads, H*W)`` table to another key grid (fine-tuning at a new size)."""
    heads = table.shape[0]
    grid = table.reshape(1, heads, old_grid[0], old_grid[1])
    resized = F.interpolate(grid, size=new_grid, mode="bilinear", align_corners=False)
    return resized.reshape(heads, -1)


def bias_for_grid(table: torch.Tensor, table_grid: tuple[int, int], key_grid: tuple[int, int], stride: int = 1,
                  resampling: str = "bilinear") -> torch.Tensor:
    """The ``(heads, Nq, Nk)`` bias of a table learnt on ``table_grid``, for keys on ``key_grid``."""
    if resampling == "keep":
        if key_grid[0] > table_grid[0] or key_grid[1] > table_grid[1]:
            raise ValueError(f"bias_resampling='keep' serves key grids up to the trained {table_grid[0]}x"
                             f"{table_grid[1]}; got {key_grid[0]}x{key_grid[1]} (use 'bilinear' for larger inputs)")
        table = table.reshape(-1, *table_grid)[:, :key_grid[0], :key_grid[1]].reshape(table.shape[0], -1)
    elif resampling == "bilinear":
        table = resize_bias_table(table, table_grid, key_grid)
    else:
        raise ValueError(f"bias resampling must be one of {BIAS_RESAMPLING}, got {resampling!r}")
    return table[:, bias_index(key_grid, stride, table.device)]


class _GridBias(nn.Module):
    """Serves the bias of any key grid from ``table``; subclasses give the native grid's bias."""

    table: torch.Tensor
    key_grid: tuple[int, int]
    stride: int
    resampling: str

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[tuple, torch.Tensor] = {}

    def native_bias(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, key_grid: tuple[int, int] | None = None) -> torch.Tensor:
        if _IN_GRAPH:
            return self._derived(key_grid or self.key_grid)
        if key_grid is None or tuple(key_grid) == self.key_grid:
            return self.native_bias()
        key_grid = (int(key_grid[0]), int(key_grid[1]))
        if torch.is_grad_enabled() and self.table.requires_grad:
            return self._derived(key_grid)
        # The table's version counter moves with every in-place update (optimizer step, load).
        key = (key_grid, self.table._version, self.table.data_ptr(), self.table.dtype, self.table.device)
        if key not in self._cache:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            with torch.no_grad():
                self._cache[key] = self._derived(key_grid)
        return self._cache[key]

    def _derived(self, key_grid: tuple[int, int]) -> torch.Tensor:
        return bias_for_grid(self.table, self.key_grid, key_grid, self.stride, self.resampling)


class AttentionBias(_GridBias):
    """Returns the ``(heads, Nq, Nk)`` bias gathered from a learnt ``(heads, H*W)`` table.

    ``forward(key_grid)`` serves other key grids too (see the module docstring); their biases
    are cached per grid while the table is unchanged and no gradient is needed.
    """

    def __init__(self, num_heads: int, key_grid: tuple[int, int], stride: int = 1,
                 resampling: str = "bilinear") -> None:
        super().__init__()
        if resampling not in BIAS_RESAMPLING:
            raise ValueError(f"bias resampling must be one of {BIAS_RESAMPLING}, got {resampling!r}")
        self.key_grid = key_grid
        self.stride = stride
        self.resampling = resampling
        self.table = nn.Parameter(torch.zeros(num_heads, key_grid[0] * key_grid[1]))
        # Derived from the geometry, so never saved: checkpoints hold only the table.
        self.register_buffer("index", bias_index(key_grid, stride), persistent=False)

    def native_bias(self) -> torch.Tensor:
        return self.table[:, self.index]

    @torch.no_grad()
    def fuse(self) -> "FixedAttentionBias":
        return FixedAttentionBias(self.native_bias().detach().clone(), self)


class FixedAttentionBias(_GridBias):
    """The native grid's bias precomputed for inference (no gather per forward).

    It keeps a copy of the table, so other key grids are still served.
    """

    def __init__(self, bias: torch.Tensor, source: AttentionBias) -> None:
        super().__init__()
        self.register_buffer("bias", bias)
        self.register_buffer("table", source.table.detach().clone())
        self.key_grid, self.stride, self.resampling = source.key_grid, source.stride, source.resampling

    def native_bias(self) -> torch.Tensor:
        return self.bias
