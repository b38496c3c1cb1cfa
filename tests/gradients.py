"""A check that training reaches every parameter, shared by the architecture tests."""

from __future__ import annotations

import torch
from torch import nn


def parameters_without_gradient(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, lr: float = 0.05) -> list[str]:
    """Names of the parameters whose gradient is missing or all zero after one real SGD step.

    The step counts: LeViT's residual BatchNorm scales start at zero, so at step 0 every gradient
    behind them is exactly zero; once the step has moved them, every parameter the loss depends
    on gets a nonzero gradient. Every output of the model (both heads) is in the loss.
    """
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def backward() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        sum(nn.functional.cross_entropy(o, labels) for o in (out if isinstance(out, tuple) else (out,))).backward()

    backward()
    optimizer.step()
    backward()
    return [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
