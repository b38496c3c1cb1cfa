"""``--amp auto``: the training precision, chosen by timing the model's own training step.

A GPU with bf16 trains in bf16 autocast. On a CPU it depends on the chip: with AVX512-BF16 or
AMX a LeViT-128S training step runs 2.3x faster in bf16 autocast (a Zen 5 EPYC), while a CPU
without them emulates bf16 and runs slower than fp32. So on a CPU ``auto`` times a few
forward and backward passes of a copy of the model at the run's batch and input size, in fp32
and in bf16 alternately, and takes bf16 only when it is clearly faster (``MARGIN``, so that a
noisy machine does not flip the choice from one run to the next). Under torchrun the times are
summed over the processes, so all of them choose the same. A resumed run keeps the choice its
checkpoint records: a run changes precision only when asked to.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from .distributed import DistInfo, all_reduce_sum
from .runtime import amp_dtype, autocast

MARGIN = 1.15  # bf16's speed-up over fp32 needed to choose it
ROUNDS = 3  # timed steps per precision, after one warm-up step each
_NAMES = {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype | None  # the autocast dtype; None: full precision
    reason: str  # why, for the run's first lines

    @property
    def name(self) -> str:
        """As ``--amp`` spells it (none, bf16, fp16): what a checkpoint records."""
        return _NAMES[self.dtype]


def choose_precision(amp: str, model: nn.Module, batch_shape: tuple[int, ...], device: torch.device, dist: DistInfo,
                     channels_last: bool = False, stored: str | None = None) -> Precision:
    """The precision of a run: ``amp`` when it names one, else the checkpoint's ``stored`` choice,
    else bf16 on a GPU that has it, else (a CPU) the faster of fp32 and bf16 autocast as measured."""
    if amp != "auto":
        return Precision(amp_dtype(amp, device), f"--amp {amp}")
    if stored is not None:
        return Precision(amp_dtype(stored, device), f"--amp auto: {stored}, as chosen when this run started")
    if device.type != "cpu":
        dtype = amp_dtype("auto", device)
        return Precision(dtype, "--amp auto: bf16 on this GPU" if dtype else "--amp auto: this GPU has no bf16")
    seconds = step_seconds(model, batch_shape, device, (None, torch.bfloat16), channels_last)
    fp32, bf16 = all_reduce_sum([seconds[None], seconds[torch.bfloat16]], dist, device)
    speedup = fp32 / bf16
    measured = (f"a training step took {bf16 / dist.world_size * 1e3:.0f} ms in bf16, "
                f"{fp32 / dist.world_size * 1e3:.0f} ms in fp32 ({speedup:.2f}x)")
    if speedup >= MARGIN:
        return Precision(torch.bfloat16, f"--amp auto: bf16 autocast on this CPU, measured: {measured}")
    return Precision(None, f"--amp auto: fp32 on this CPU, measured: {measured}; bf16 needs {MARGIN}x")


def step_seconds(model: nn.Module, batch_shape: tuple[int, ...], device: torch.device,
                 dtypes: tuple[torch.dtype | None, ...], channels_last: bool = False) -> dict[torch.dtype | None, float]:
    """Median seconds of one forward and backward pass per autocast dtype, on a copy of ``model``
    in training mode (the run's own weights and BatchNorm statistics are left as they are)."""
    probe = copy.deepcopy(model).train()
    x = torch.randn(batch_shape, generator=torch.Generator().manual_seed(0)).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step(dtype: torch.dtype | None) -> float:
        start = time.perf_counter()
        with autocast(device, dtype):
            out = probe(x)
        loss = sum(o.float().logsumexp(dim=1).mean() for o in (out if isinstance(out, tuple) else (out,)))
        loss.backward()
        probe.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for dtype in dtypes:
        step(dtype)
    times: dict[torch.dtype | None, list[float]] = {dtype: [] for dtype in dtypes}
    for _ in range(ROUNDS):  # alternated, so that a slow moment of the machine hits every dtype
        for dtype in dtypes:
            times[dtype].append(step(dtype))
    return {dtype: statistics.median(t) for dtype, t in times.items()}
