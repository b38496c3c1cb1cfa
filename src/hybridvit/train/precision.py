"""How the training step computes (``--amp``, ``--channels-last``), chosen by timing it.

A GPU with bf16 trains in bf16 autocast. On a CPU it depends on the chip: with AVX512-BF16 or
AMX a LeViT-128S training step runs 2.3x faster in bf16 autocast (a Zen 5 EPYC), while a CPU
without them emulates bf16 and runs slower than fp32. The memory layout matters less but also
differs by chip and model: channels-last made the convolution stem, and so the LeViT-128S step,
6-9% faster on that EPYC. So ``auto`` times a few forward and backward passes of a copy of the
model at the run's batch and input size, in every candidate alternately, and takes bf16 or
channels-last only when it is clearly faster (``BF16_MARGIN``, ``LAYOUT_MARGIN``), so that a noisy
machine does not flip the choice from one run to the next. Under torchrun the times are summed
over the processes, so all of them choose the same. A resumed run keeps the choice its
checkpoint records: a run changes how it computes only when asked to.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from .distributed import DistInfo, all_reduce_sum
from .runtime import amp_dtype, autocast

BF16_MARGIN = 1.15  # bf16's speed-up over fp32 needed to choose it
LAYOUT_MARGIN = 1.04  # channels-last's speed-up needed to choose it
ROUNDS = 3  # timed steps per candidate, after one warm-up step each
_NAMES = {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}

Candidate = tuple[torch.dtype | None, bool]  # (autocast dtype, channels-last)


@dataclass(frozen=True)
class StepChoice:
    dtype: torch.dtype | None  # the autocast dtype; None: full precision
    channels_last: bool
    reason: str  # why, for the run's first lines

    @property
    def amp(self) -> str:
        """The dtype as ``--amp`` spells it (none, bf16, fp16): what a checkpoint records."""
        return _NAMES[self.dtype]


def choose_step(amp: str, channels_last: bool | None, model: nn.Module, batch_shape: tuple[int, ...],
                device: torch.device, dist: DistInfo, stored: dict | None = None) -> StepChoice:
    """The run's precision and layout: what the options name, else what the checkpoint ``stored``
    records, else (``auto``) bf16 on a GPU that has it and the faster of fp32 and bf16 on a CPU,
    and the faster layout, as measured."""
    stored = stored or {}
    if amp != "auto":
        dtypes, why_dtype = [amp_dtype(amp, device)], f"--amp {amp}"
    elif stored.get("amp") is not None:
        dtypes, why_dtype = [amp_dtype(stored["amp"], device)], "as chosen when this run started"
    elif device.type != "cpu":
        dtypes = [amp_dtype("auto", device)]
        why_dtype = "bf16 on this GPU" if dtypes[0] else "this GPU has no bf16"
    else:
        dtypes, why_dtype = [None, torch.bfloat16], "measured"
    if channels_last is not None:
        layouts, why_layout = [channels_last], "as asked"
    elif stored.get("channels_last") is not None:
        layouts, why_layout = [stored["channels_last"]], "as chosen when this run started"
    else:
        layouts, why_layout = [False, True], "measured"
    candidates = list(itertools.product(dtypes, layouts))
    if len(candidates) == 1:
        (dtype, layout), = candidates
        return StepChoice(dtype, layout, f"{_describe(dtype, layout)} ({why_dtype}; layout {why_layout})")
    measured = step_seconds(model, batch_shape, device, candidates)
    summed = dict(zip(candidates, all_reduce_sum([measured[c] for c in candidates], dist, device)))
    best = {dtype: min(summed[(dtype, layout)] for layout in layouts) for dtype in dtypes}
    dtype = dtypes[0]  # fp32 when measured
    if len(dtypes) > 1 and best[None] / best[torch.bfloat16] >= BF16_MARGIN:
        dtype = torch.bfloat16
    layout = layouts[0]
    if len(layouts) > 1 and summed[(dtype, False)] / summed[(dtype, True)] >= LAYOUT_MARGIN:
        layout = True
    times = ", ".join(f"{_describe(d, cl)} {summed[(d, cl)] / dist.world_size * 1e3:.0f} ms" for d, cl in candidates)
    return StepChoice(dtype, layout, f"{_describe(dtype, layout)}; a training step measured here: {times}")


def _describe(dtype: torch.dtype | None, channels_last: bool) -> str:
    name = "fp32" if dtype is None else f"{_NAMES[dtype]} autocast"
    return f"{name}, channels-last" if channels_last else name


def step_seconds(model: nn.Module, batch_shape: tuple[int, ...], device: torch.device,
                 candidates: list[Candidate]) -> dict[Candidate, float]:
    """Median seconds of one forward and backward pass per candidate, on a copy of ``model`` in
    training mode (the run's own weights and BatchNorm statistics are left as they are)."""
    probe = copy.deepcopy(model).train()
    x = torch.randn(batch_shape, generator=torch.Generator().manual_seed(0)).to(device)

    def step(candidate: Candidate) -> float:
        dtype, channels_last = candidate
        layout = torch.channels_last if channels_last else torch.contiguous_format
        probe.to(memory_format=layout)
        start = time.perf_counter()
        with autocast(device, dtype):
            out = probe(x.contiguous(memory_format=layout))
        loss = sum(o.float().logsumexp(dim=1).mean() for o in (out if isinstance(out, tuple) else (out,)))
        loss.backward()
        probe.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for candidate in candidates:
        step(candidate)
    times: dict[Candidate, list[float]] = {c: [] for c in candidates}
    for _ in range(ROUNDS):  # alternated, so that a slow moment of the machine hits every candidate
        for candidate in candidates:
            times[candidate].append(step(candidate))
    return {c: statistics.median(t) for c, t in times.items()}
