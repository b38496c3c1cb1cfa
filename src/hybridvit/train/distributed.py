"""PyTorch's own distributed engine: set-up from torchrun's environment, and small helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        # torchrun's elastic agent keeps one store across restarts, and the process group's keys
        # would then hold the dead attempt's addresses (gloo: "connectFullMesh ... Connection
        # refused", costing a restart): each attempt gets keys of its own.
        store, rank, world = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"attempt_{attempt}", store),
                                rank=rank, world_size=world)
    return info


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum a few numbers over all processes (identity for one process)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


@torch.no_grad()
def average_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Average floating-point buffers (BatchNorm statistics) over processes.

    Each process updates its BatchNorm statistics on its own batches, so before evaluating
    and saving we make every replica identical to the one that is saved.
    """
    if not info.enabled:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(info.world_size)


@torch.no_grad()
def gather_buffers(model: torch.nn.Module, info: DistInfo) -> list[dict[str, torch.Tensor]]:
    """Every process's floating-point buffers (BatchNorm statistics differ by rank mid-epoch), rank-ordered."""
    if not info.enabled:
        return [{name: buf.detach().cpu().clone() for name, buf in model.named_buffers() if buf.is_floating_point()}]
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(info.world_size)]
    for name, buf in model.named_buffers():
        if buf.is_floating_point():
            parts = [torch.empty_like(buf) for _ in range(info.world_size)]
            dist.all_gather(parts, buf.contiguous())
            for rank, part in enumerate(parts):
                ranks[rank][name] = part.cpu()
    return ranks
