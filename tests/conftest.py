"""Shared test helpers: randomised weights and statistics, relative error."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm, bias and attention-bias table random values (init values hide bugs)."""
    g = torch.Generator().manual_seed(seed)

    def rand(shape, lo, hi):
        return torch.rand(shape, generator=g) * (hi - lo) + lo

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(rand(module.weight.shape, 0.5, 1.5))
                module.bias.copy_(rand(module.bias.shape, -0.3, 0.3))
                module.running_mean.copy_(rand(module.running_mean.shape, -0.3, 0.3))
                module.running_var.copy_(rand(module.running_var.shape, 0.5, 2.0))
            elif isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
                module.bias.copy_(rand(module.bias.shape, -0.2, 0.2))
        for name, p in model.named_parameters():
            if "attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A 3-epoch levit_128s digits run (32x32): trained weights for resume, export and agreement tests."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("digits") / "run"
    subprocess.run([sys.executable, "-m", "hybridvit", "train", "--epochs", "3", "--workers", "0", "--input-size", "32",
                    "--batch-size", "32", "--output", str(out)], check=True, capture_output=True)
    return out
