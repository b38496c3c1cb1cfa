"""On-device export: the device pass computes what the fused model computes, LeViT lowers to
XNNPACK whole, and the ExecuTorch program is checked in ExecuTorch's own runtime before it is
written (a program that disagrees with PyTorch is refused)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_

import hybridvit
from hybridvit.fusion import fuse
from hybridvit.inference.deploy import for_device

executorch = pytest.importorskip("executorch")
# imported here, before any test's state check: importing them sets OPENVINO_LIB_PATH in os.environ
pytest.importorskip("executorch.backends.xnnpack.partition.xnnpack_partitioner")
pytest.importorskip("executorch.exir")
pytest.importorskip("executorch.runtime")


@pytest.mark.parametrize("name, args", [("levit_128s", {}), ("levit_192", {"img_size": 160}),
                                        ("levit_128s", {"ablation": "A5"}),  # A5: without the attention bias
                                        ("cvt_13", {"img_size": 96}), ("cvt_21", {"img_size": 64})])
def test_the_device_pass_computes_what_the_fused_model_computes(name, args):
    fused = fuse(randomize_(hybridvit.create_model(name, **args), seed=2).eval())
    before = [type(m).__name__ for m in fused.modules()]
    device = for_device(fused)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in device.modules())  # no native_layer_norm left
    x = torch.randn(3, 3, *fused.input_hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(device(x), fused(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(device.forward_head(device.forward_features(x), pre_logits=True),
                                   fused.forward_head(fused.forward_features(x), pre_logits=True), rtol=1e-5, atol=1e-5)
    assert [type(m).__name__ for m in fused.modules()] == before  # the caller's model is left as it was


@pytest.mark.slow
def test_executorch_export_is_fully_delegated_checked_and_labelled(digits_run, tmp_path):
    from typer.testing import CliRunner

    from hybridvit.cli import app
    from hybridvit.data import build_datasets, eval_transform
    from hybridvit.inference.edge import export_executorch, run_executorch
    from hybridvit.registry import get_model_info

    target = tmp_path / "digits.pte"
    result = CliRunner().invoke(app, ["export", str(digits_run / "model"), "--format", "executorch", "--output",
                                      str(target)])
    assert result.exit_code == 0, result.output
    assert "1 XNNPACK partition(s), operators outside: none" in " ".join(result.output.split())
    sidecar = json.loads(target.with_suffix(".json").read_text())
    assert sidecar["classes"] == [str(d) for d in range(10)] and sidecar["input"]["shape"] == [1, 3, 32, 32]
    assert sidecar["mean"] and sidecar["check"]["agreement"] == 1.0
    # the digits' validation images through the written file: the eager model's answers
    model = hybridvit.load_model(digits_run / "model")
    data = build_datasets(None, with_train=False)
    data.prepare((32, 32), None, eval_transform(get_model_info("levit_128s"), (32, 32), crop_pct=1.0))
    images = torch.stack([data.val[i][0] for i in range(64)])
    with torch.no_grad():
        eager = fuse(model)(images)
    got = run_executorch(target.read_bytes(), images)
    assert (got.argmax(1) == eager.argmax(1)).all() and (got - eager).abs().max() < 1e-3
    # a program that disagrees is refused, and nothing is written
    import hybridvit.inference.edge as edge

    original = edge.run_executorch
    edge.run_executorch = lambda program, x: -original(program, x)
    try:
        with pytest.raises(ValueError, match="top-1 agrees with PyTorch on .* under 99%: not written"):
            export_executorch(model, tmp_path / "bad.pte", images=images)
    finally:
        edge.run_executorch = original
    assert not (tmp_path / "bad.pte").exists() and not (tmp_path / "bad.json").exists()
