"""The fine-tuning kit, each part tested for its effect: weights by name (a local Hub) and from
any source, frozen parts that do not move, layer-wise learning rates, accumulation equal to the
large batch, early stopping, class weights and the balanced sampler, the finetune recipe, and
MLflow and W&B (offline) tracking with their real libraries."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder, randomize_, with_sources
from hub_server import hub  # noqa: F401  (the local Hub fixture)
from safetensors.torch import load_file
from timm.loss import SoftTargetCrossEntropy

import hybridvit
from hybridvit.data.sampling import BalancedSampler, EpochSampler
from hybridvit.model_info import _REGISTRY
from hybridvit.registry import get_model_info
from hybridvit.train import TrainConfig, train
from hybridvit.train.builder import build_run
from hybridvit.train.distributed import DistInfo
from hybridvit.train.engine import _train_step
from hybridvit.train.losses import WeightedSoftTargetCrossEntropy, class_weights
from hybridvit.train.state import seed_all

FAST = dict(workers=0, amp="none", channels_last=False)


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "data", per_class=6)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_published_weights_by_name_with_the_head_frozen_out(hub, two_classes, tmp_path, monkeypatch):  # noqa: F811
    """--pretrained takes the registry's weights (here from a local Hub); --freeze head trains the
    new classifier only: every other weight and BatchNorm statistic stays as published."""
    published = randomize_(hybridvit.create_model("levit_128s"), seed=3).eval()
    hybridvit.save_model(published, tmp_path / "published")
    hub.add_folder("me/levit-128s", tmp_path / "published")
    monkeypatch.setitem(_REGISTRY, "levit_128s", with_sources(get_model_info("levit_128s"), "hf-hub:me/levit-128s"))
    out = tmp_path / "run"
    result = train(TrainConfig(data=str(two_classes), pretrained=True, freeze="head", epochs=1, batch_size=4,
                               output=str(out), **FAST), progress=False)
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["recipe"] == "finetune" and result["top1"] >= 0  # auto picks the fine-tuning recipe
    trained, before = _weights(out / "model"), published.state_dict()
    heads = ("head.", "head_dist.")
    body = [k for k in trained if not k.startswith(heads)]
    assert body and all(torch.equal(trained[k], before[k]) for k in body)  # running stats included
    seed_all(0)  # the run's seed: a new classifier as a fresh model's (timm's reset_classifier)
    fresh = hybridvit.create_model("levit_128s", num_classes=2, img_size=(224, 224)).state_dict()
    assert trained["head.linear.weight"].shape == (2, 384)
    assert not torch.equal(trained["head.linear.weight"], fresh["head.linear.weight"])  # trained...
    assert torch.allclose(trained["head.linear.weight"], fresh["head.linear.weight"], atol=0.05)  # ...from there


def test_finetune_takes_any_model_source(hub, digits_run, tmp_path):  # noqa: F811
    """A run folder and an hf-hub: repository; the same classes keep the classifier."""
    from hybridvit.publish import push_to_hub

    push_to_hub(digits_run / "model", "me/digits")
    for source in (str(digits_run), "hf-hub:me/digits"):
        out = tmp_path / source.replace("/", "_").replace(":", "_")
        train(TrainConfig(finetune=source, lr=1e-9, warmup_epochs=0, min_lr=0, epochs=1, input_size=32, batch_size=32,
                          freeze="1", output=str(out), **FAST), progress=False)
        start, end = _weights(digits_run / "model"), _weights(out / "model")
        frozen = [k for k in start if k.startswith(("stem.", "stages.0.", "stages.1."))]
        assert frozen and all(torch.equal(end[k], start[k]) for k in frozen), source
        assert torch.allclose(end["head.linear.weight"], start["head.linear.weight"], atol=1e-5), source  # kept


def test_layer_decay_gives_each_depth_its_rate(tmp_path):
    run = build_run(TrainConfig(layer_decay=0.5, input_size=32, output=str(tmp_path / "r"), **FAST),
                    torch.device("cpu"), DistInfo())
    scale = {name: group["lr_scale"] for group in run.optimizer.param_groups for name in [id(p) for p in group["params"]]}
    named = dict(run.model.named_parameters())
    of = lambda name: scale[id(named[name])]  # noqa: E731
    # levit_128s: stem, 2 + 3 + 4 blocks, 2 shrinking attentions, the heads: 13 depths
    assert of("head.linear.weight") == 1.0 and of("stages.2.blocks.3.mlp.up.linear.weight") == 0.5
    assert of("stages.2.downsample.attn.q.linear.weight") == 0.5 ** 5 and of("stem.conv1.conv.weight") == 0.5 ** 12
    run.set_lr(1, 0)  # the schedule scales every group
    assert len({round(g["lr"] / g["lr_scale"], 15) for g in run.optimizer.param_groups}) == 1


def test_accumulated_batches_equal_the_large_batch(tmp_path):
    """Batch 8 x 2 accumulated against batch 16, on the same 16 images, BatchNorm on its running
    statistics (so that a smaller batch does not change them): the same update."""
    runs = {}
    for batch, accum in ((16, 1), (8, 2)):
        run = build_run(TrainConfig(batch_size=batch, grad_accum_steps=accum, input_size=32,
                                    output=str(tmp_path / f"r{batch}"), **FAST), torch.device("cpu"), DistInfo())
        run.model.train()
        for module in run.model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        runs[batch] = run
    assert runs[16].lr == runs[8].lr
    initial = {k: v.clone() for k, v in runs[16].model.state_dict().items()}
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(16) % 10
    _train_step(runs[16], images, labels, 0, 0, DistInfo())
    for step in range(2):
        _train_step(runs[8], images[8 * step:8 * step + 8], labels[8 * step:8 * step + 8], 0, step, DistInfo())
    a, b = runs[16].model.state_dict(), runs[8].model.state_dict()
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # a step was taken
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_early_stop_ends_a_run_that_stopped_improving(tmp_path):
    out = tmp_path / "run"
    result = train(TrainConfig(lr=1e-12, warmup_epochs=0, min_lr=0, epochs=6, early_stop=1, input_size=32, batch_size=64,
                               output=str(out), **FAST), progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert result["stopped_early"] == len(rows) < 6  # before the schedule's end...
    assert rows[-1]["val_top1"] <= max(r["val_top1"] for r in rows[:-1])  # ...after an epoch that did no better
    assert all(r["val_top1"] > max([-1] + [q["val_top1"] for q in rows[:i]]) for i, r in enumerate(rows[:-1]))
    assert (out / "model").is_dir() and (out / "best").is_dir()


def test_class_weights_change_the_loss_as_asked(tmp_path):
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    targets = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 0, 1, 2]), 3).float()
    plain = SoftTargetCrossEntropy()(logits, targets)
    assert WeightedSoftTargetCrossEntropy(torch.ones(3))(logits, targets) == pytest.approx(plain.item())
    auto = class_weights("auto", [0, 0, 0, 0, 1, 2], ["a", "b", "c"])
    assert auto.tolist() == pytest.approx([0.5, 2.0, 2.0])  # N / (C n_c)
    each = torch.nn.functional.cross_entropy(logits, targets.argmax(1), reduction="none")
    assert WeightedSoftTargetCrossEntropy(auto)(logits, targets).item() == pytest.approx(
        (each * auto[targets.argmax(1)]).mean().item())
    (tmp_path / "w.json").write_text("[1, 0, 3]")
    assert class_weights(str(tmp_path / "w.json"), [0, 1, 2], ["a", "b", "c"]).tolist() == [1, 0, 3]
    with pytest.raises(ValueError, match="2 value.*3 classes"):
        (tmp_path / "w.txt").write_text("1\n2\n")
        class_weights(str(tmp_path / "w.txt"), [0, 1, 2], ["a", "b", "c"])
    run = build_run(TrainConfig(class_weights="auto", input_size=32, output=str(tmp_path / "r"), **FAST),
                    torch.device("cpu"), DistInfo())
    counts = Counter(run.data.datasets.train.targets)
    assert run.criterion.base.weights.tolist() == pytest.approx([len(run.data.datasets.train) / (10 * counts[c])
                                                                 for c in range(10)])


def test_the_balanced_sampler_draws_classes_equally_and_resumes_exactly():
    targets = [0] * 90 + [1] * 9 + [2] * 1
    sampler = BalancedSampler(targets, seed=0)
    sampler.set_epoch(0)
    drawn = Counter(targets[i] for i in sampler)
    assert len(list(sampler)) == 100 and all(20 <= drawn[c] <= 47 for c in range(3))  # about a third each
    wrapped = EpochSampler(BalancedSampler(targets, seed=0))
    wrapped.set_epoch(3)
    whole = [i for _, _, i in wrapped]
    wrapped.set_epoch(3, skip=40)
    assert [i for _, _, i in wrapped] == whole[40:]
    wrapped.set_epoch(4)
    assert [i for _, _, i in wrapped] != whole


def test_mlflow_and_wandb_offline_log_the_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    import mlflow

    monkeypatch.setenv("WANDB_SERVICE", "")  # W&B leaves its service's address here: taken back at the end
    monkeypatch.delenv("WANDB_SERVICE")

    for tracker in ("mlflow", "wandb"):
        train(TrainConfig(tracker=tracker, epochs=2, input_size=32, batch_size=64, output=str(tmp_path / tracker),
                          **FAST), progress=False)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("hybridvit").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["model"] == "levit_128s"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")] == [0, 1]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"model", "training_curve.png"}
    assert "model/model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    (record,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*/run-*.wandb")
    logged = record.read_bytes()  # W&B's offline record of the run, to be synced later
    assert b"val_top1" in logged and b"levit_128s" in logged and b"wandb-model" in logged
    assert json.loads((tmp_path / "wandb" / "tracker.json").read_text())["kind"] == "wandb"
