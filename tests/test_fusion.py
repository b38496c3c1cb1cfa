"""BatchNorm fusion: no BatchNorm left, same eval output (randomised statistics)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_, rel_err
from torch import nn

import hybridvit
from hybridvit.layers import FixedAttentionBias


@pytest.mark.parametrize("name", ["levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"])
def test_fused_equals_unfused(name, images):
    model = randomize_(hybridvit.create_model(name)).eval()
    fused = hybridvit.fuse(model)
    assert fused is not model and not fused.training
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert any(isinstance(m, FixedAttentionBias) for m in fused.modules())
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())  # original untouched
    with torch.no_grad():
        ref, out = model(images), fused(images)
    assert rel_err(out, ref) < 1e-5


def test_fuse_inplace_and_single_head(images):
    model = randomize_(hybridvit.create_model("levit_128s", distillation=False, num_classes=3)).eval()
    with torch.no_grad():
        ref = model(images)
        fused = hybridvit.fuse(model, inplace=True)
        out = fused(images)
    assert fused is model
    assert rel_err(out, ref) < 1e-5


def test_fused_model_cannot_be_saved(tmp_path):
    fused = hybridvit.fuse(hybridvit.create_model("levit_128s"))
    with pytest.raises(ValueError, match="before hybridvit.fuse"):
        hybridvit.save_model(fused, tmp_path / "m")
