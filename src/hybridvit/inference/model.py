"""``InferenceModel``: what ``optimize`` and ``quantize_static`` return, a captured graph in a
runner behind the source model's input checks."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

Runner = Callable[[torch.Tensor], torch.Tensor]
_SIZES_KEPT = 8  # captured graphs per input size (a server sees a handful of sizes)


class InferenceModel(nn.Module):
    """A captured, fused model: checks inputs like the original and returns float32 logits.

    A graph is captured for one input size. Given ``rebuild`` (input example -> runner), a new
    size captures another graph on its first call (about a second; the last few sizes are
    kept), so the model serves every size its source serves; without it, or with
    ``fixed_size`` (a static int8 graph, calibrated at one size), other sizes are refused.
    ``measured`` holds images/s per ``precision/backend`` candidate when ``precision="auto"``
    chose this one (nan where a candidate's outputs disagreed with fp32); ``agreement`` the
    share of validation images whose top-1 class an int8 candidate shared with fp32; ``reason``
    both in a sentence.
    """

    def __init__(self, runner: Runner, source: nn.Module, dtype: torch.dtype, precision: str, backend: str,
                 input_hw: tuple[int, int], rebuild: Callable[[torch.Tensor], Runner] | None = None,
                 fixed_size: bool = False) -> None:
        super().__init__()
        self.runners: dict[tuple[int, int], Runner] = {tuple(input_hw): runner}
        self.input_hw = tuple(input_hw)
        self.rebuild = rebuild
        self.fixed_size = fixed_size
        self.dtype = dtype
        self.precision = precision
        self.backend = backend
        self.model_name = getattr(source, "model_name", None)
        self.in_chans: int = getattr(source, "in_chans", 3)
        self._check_input = getattr(source, "check_input", None)
        self.measured: dict[str, float] = {}
        self.agreement: dict[str, float] = {}
        self.reason = ""  # auto: why this path, in a sentence of what was measured

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._check_input is not None:
            self._check_input(x)
        return self._runner_for(x)(x.to(self.dtype)).float()

    def _runner_for(self, x: torch.Tensor) -> Runner:
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        runner = self.runners.get(hw)
        if runner is not None:
            return runner
        if self.rebuild is None or self.fixed_size:
            h, w = self.input_hw
            raise ValueError(f"this {self.precision} {self.backend} model was captured for {h}x{w} inputs; got "
                             f"{hw[0]}x{hw[1]} (build it again at the size you serve)")
        if len(self.runners) >= _SIZES_KEPT:
            del self.runners[list(self.runners)[1]]  # the oldest extra size; the first is the one asked for
        runner = self.runners[hw] = self.rebuild(torch.zeros(1, *x.shape[1:], dtype=torch.float32, device=x.device))
        return runner

    def rebuilt(self) -> InferenceModel:
        """The same CPU path captured again for PyTorch's current thread count (runners take the
        count at capture), without measuring or quantizing again; ``self`` if it cannot be."""
        if self.rebuild is None:
            return self
        other = copy.copy(self)  # no parameters or submodules: the attributes are all there is
        other.__dict__ = dict(self.__dict__)
        other.runners = {self.input_hw: self.rebuild(torch.zeros(1, self.in_chans, *self.input_hw))}
        return other
