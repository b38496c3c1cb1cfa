"""The papers' recipes: their values against the official sources, and each part's effect in a real run."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from hybridvit import create_model
from hybridvit.checkpoints import load_model, save_model
from hybridvit.registry import get_model_info
from hybridvit.train import TrainConfig, evaluate, train
from hybridvit.train import engine
from hybridvit.train.builder import TrainingRun, build_data, build_run
from hybridvit.train.distributed import DistInfo
from hybridvit.train.losses import DistillationLoss, SoftTargets

CPU = torch.device("cpu")
IMAGENET = 1_281_167

# facebookresearch/LeViT main.py (commit 3772b8e); the README trains on 8 GPUs x 256 images.
LEVIT_OFFICIAL = dict(
    epochs=1000, batch_size=256, lr=5e-4,  # main.py:34, 33, 69 (lr * batch * world / 512, main.py:302)
    weight_decay=0.025, clip_grad=0.01, clip_mode="agc",  # main.py:64, 58, 60
    warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5,  # main.py:84, 77, 79
    cooldown_epochs=0,  # main.py:86 says 10, but main.py:307 discards the longer schedule and :371 runs `epochs`
    lr_step="epoch",  # main.py:382: lr_scheduler.step(epoch) once per epoch
    model_ema=True, model_ema_decay=0.99996,  # main.py:42-47
    auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4, smoothing=0.1,  # main.py:96, 94, 99
    reprob=0.25, mixup=0.8, cutmix=1.0, repeated_aug=True,  # main.py:110, 120, 122, 104-107
    distillation="hard", distillation_tau=1.0,  # main.py:138, 142
)
# microsoft/CvT experiments/imagenet/cvt/*.yaml (commit f851e68), 8 GPUs; lr per GPU x 8 = 5e-4 per 512 images.
CVT_OFFICIAL = dict(
    epochs=300, lr=5e-4, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, cooldown_epochs=0, lr_step="epoch",
    auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1, clip_grad=None,
    model_ema=False, distillation="none",
)
CVT_VARIANTS = {  # model: (weight decay, images per GPU, repeated augmentation)
    "cvt_13": (0.05, 256, False),  # cvt-13-224x224.yaml:79, :64, no SAMPLER
    "cvt_21": (0.1, 128, True),  # cvt-21-224x224.yaml:80, :65, :58 SAMPLER repeated_aug
    "cvt_w24": (0.1, 128, False),  # cvt-w24-384x384.yaml
}


def test_levit_recipe_is_the_official_one():
    cfg = TrainConfig(model="levit_256").resolved(IMAGENET, "levit")
    assert cfg.recipe == "levit"
    assert {k: getattr(cfg, k) for k in LEVIT_OFFICIAL} == LEVIT_OFFICIAL
    assert cfg.lr * 256 * 8 / 512 == 2e-3  # the README's 8-GPU run


@pytest.mark.parametrize("model", list(CVT_VARIANTS))
def test_cvt_recipe_is_the_official_one(model):
    cfg = TrainConfig(model=model).resolved(IMAGENET, "cvt")
    assert {k: getattr(cfg, k) for k in CVT_OFFICIAL} == CVT_OFFICIAL
    wd, batch, repeated = CVT_VARIANTS[model]
    assert (cfg.weight_decay, cfg.batch_size, cfg.repeated_aug) == (wd, batch, repeated)
    per_gpu_lr = {256: 2.5e-4, 128: 1.25e-4}[batch]  # the yaml's TRAIN.LR
    assert cfg.lr * batch * 8 / 512 == pytest.approx(per_gpu_lr * 8)


def test_recipe_choice_and_overrides():
    tiny = TrainConfig().resolved(1437, "levit")
    assert tiny.recipe == "tiny" and tiny.mixup == 0 and tiny.input_size == 64 and not tiny.model_ema
    assert TrainConfig(model_ema=False, epochs=3).resolved(IMAGENET, "levit").model_ema is False
    with pytest.raises(ValueError, match="unknown recipe"):
        TrainConfig(recipe="fast").resolved(10, "levit")
    for option, value in (("amp", "fp8"), ("device", "gpu"), ("clip_mode", "unitwise"), ("resume", "maybe")):
        with pytest.raises(ValueError, match=f"--{option.replace('_', '-')} must be one of"):
            TrainConfig(**{option: value})


def _official_lr(t: float, peak: float, warmup_t: float, total_t: float, warmup_lr=1e-6, min_lr=1e-5) -> float:
    """timm's CosineLRScheduler as the official code configures it (warm-up not a prefix, one cycle)."""
    if t < warmup_t:
        return warmup_lr + t * (peak - warmup_lr) / warmup_t
    if t >= total_t:
        return min_lr
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * t / total_t))


def test_levit_schedule_is_the_official_one_epoch_by_epoch(recipe_folder):
    run = build_run(TrainConfig(recipe="levit", data=str(recipe_folder), batch_size=32, input_size=32, workers=0),
                    CPU, DistInfo())
    peak = 5e-4 * 32 / 512
    assert run.lr == peak and run.num_epochs == 1000
    for epoch in (0, 1, 4, 5, 6, 250, 500, 999):
        for step in (0, run.steps_per_epoch - 1):  # constant within an epoch
            run.set_lr(epoch, step)
            assert run.optimizer.param_groups[0]["lr"] == pytest.approx(_official_lr(epoch, peak, 5, 1000), rel=1e-9)
    decay_of = {id(p): g["weight_decay"] for g in run.optimizer.param_groups for p in g["params"]}
    for name, p in run.model.named_parameters():  # no decay on attention biases, norms and biases (main.py, timm)
        assert decay_of[id(p)] == (0.0 if p.ndim <= 1 or "attention_bias" in name else 0.025), name


def test_tiny_schedule_steps_per_update_with_cooldown(recipe_folder):
    run = build_run(TrainConfig(data=str(recipe_folder), epochs=4, cooldown_epochs=2, batch_size=32, input_size=32,
                                workers=0), CPU, DistInfo())
    assert run.cfg.recipe == "tiny" and run.num_epochs == 6
    spe = run.steps_per_epoch
    for epoch in range(6):
        for step in (0, spe // 2):
            run.set_lr(epoch, step)
            expected = _official_lr(epoch * spe + step, 8e-3 * 32 / 512, 2 * spe, 4 * spe)
            assert run.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9)


def test_levit_recipe_augmentations_change_pixels_and_repeats(recipe_folder):
    info = get_model_info("levit_128s")

    def pipeline(rank=0, world=1, **changes):
        cfg = TrainConfig(recipe="levit", data=str(recipe_folder), input_size=32, batch_size=32, workers=0, **changes)
        return build_data(cfg, info, DistInfo(rank, world), CPU)[1]

    # Repeated augmentation: every image 3 times per epoch, its repeats spread over the ranks.
    samplers = [pipeline(rank, 2).sampler for rank in (0, 1)]
    keys = []
    for sampler in samplers:
        sampler.set_epoch(3)
        keys.append(list(sampler))
    counts = Counter(i for rank_keys in keys for _, _, i in rank_keys)
    assert max(counts.values()) == 3 and sum(c == 3 for c in counts.values()) > 60
    assert set(i for _, _, i in keys[0]) & set(i for _, _, i in keys[1])  # the same image on both ranks
    # ... and each repeat is augmented differently (the draw, not only the index, seeds it).
    data = pipeline().train_loader.dataset
    index = next(i for i, c in Counter(i for _, _, i in keys[0]).items() if c == 2)
    first, second = [k for k in keys[0] if k[2] == index]
    assert not torch.equal(data[first][0], data[second][0]) and torch.equal(data[first][0], data[first][0])

    sample_keys = [(0, draw, draw % 200) for draw in range(40)]

    def images(pipe):
        dataset = pipe.train_loader.dataset
        return [dataset[k][0] for k in sample_keys if dataset[k][0] is not None]

    plain = images(pipeline(auto_augment="none", reprob=0.0))
    augmented = images(pipeline(reprob=0.0))
    erased = images(pipeline())
    # RandAugment: the same crop and flip, other pixels.
    assert sum(not torch.equal(a, b) for a, b in zip(plain, augmented)) >= 0.8 * len(plain)
    # Random erasing (p=0.25): some images get exactly one rectangle of new pixels.
    changed = [(a != b).any(0) for a, b in zip(augmented, erased) if not torch.equal(a, b)]
    assert 2 <= len(changed) <= 0.6 * len(plain)
    for mask in changed:
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.float().mean() > 0.95


@pytest.mark.slow
def test_deit_recipe_trains_a_graft_as_deit_does(recipe_folder, tmp_path):
    """--recipe deit (the grafted models' own, as DeiT's main.py): 128 images a step at 5e-4 per 512,
    repeated augmentation, weight decay 0.05 off tokens and norms, hard distillation when a teacher
    is given (plain labels on both heads without one) and an EMA that starts at the first step's
    weights and then barely moves (decay 0.99996)."""
    graft = dict(model="graft_resnet50_deit_s", model_args={"resnet_stages": 1, "deit_layers": 1}, recipe="deit",
                 data=str(recipe_folder), input_size=32, workers=0)
    family_recipe = get_model_info(graft["model"]).model_class.default_recipe
    assert TrainConfig(model=graft["model"]).resolved(IMAGENET, family_recipe).recipe == "deit"  # auto, at scale
    teacher = tmp_path / "teacher"
    save_model(create_model("levit_128s", num_classes=3, img_size=32), teacher)
    run = build_run(TrainConfig(**graft, teacher=str(teacher)), CPU, DistInfo())
    assert run.data.train_loader.batch_size == 128 and run.lr == 5e-4 * 128 / 512
    run.set_lr(10, 0)
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(_official_lr(10, run.lr, 5, 300), rel=1e-9)
    decay_of = {id(p): g["weight_decay"] for g in run.optimizer.param_groups for p in g["params"]}
    for name, p in run.model.named_parameters():
        no_decay = p.ndim <= 1 or name in ("pos_embed", "cls_token", "dist_token")
        assert decay_of[id(p)] == (0.0 if no_decay else 0.05), name
    run.data.sampler.set_epoch(0)
    counts = Counter(i for _, _, i in run.data.sampler)
    assert max(counts.values()) == 3 and sum(c == 3 for c in counts.values()) > 60  # 211 draws, each image 3 times

    torch.manual_seed(0)
    x, targets = torch.randn(4, 3, 32, 32), torch.softmax(torch.randn(4, 3), 1)
    cls, dist = run.model.train()(x)
    with torch.no_grad():
        teacher_says = load_model(teacher).eval()(x).argmax(1)
    expected = (SoftTargetCrossEntropy()(cls, targets) + torch.nn.functional.cross_entropy(dist, teacher_says)) / 2
    torch.testing.assert_close(run.criterion(x, (cls, dist), targets), expected)
    alone = build_run(TrainConfig(**graft, batch_size=64), CPU, DistInfo())
    assert alone.lr == 5e-4 * 64 / 512
    torch.testing.assert_close(alone.criterion(x, (cls, dist), targets),
                               (SoftTargetCrossEntropy()(cls, targets) + SoftTargetCrossEntropy()(dist, targets)) / 2)

    # Two real steps: the EMA takes the first step's weights (timm's decay is 0 at its first update), then
    # moves 1 - 0.99996 of the way to the second's.
    initial = _floats(run.model)
    labels = torch.tensor([0, 1, 2, 0])
    assert math.isfinite(engine._train_step(run, x, labels, 0, 0, DistInfo()))
    first = _floats(run.model)
    assert all(torch.equal(v, first[k]) for k, v in _floats(run.ema.module).items())
    assert math.isfinite(engine._train_step(run, x, labels, 0, 1, DistInfo()))
    second, ema = _floats(run.model), _floats(run.ema.module)
    assert _distance(first, initial) > 0 and _distance(second, first) > 0
    assert _distance(ema, first) < 1e-3 * _distance(second, first)


def _floats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Summed absolute difference of ``a``'s weights from ``b``'s (BatchNorm statistics left out)."""
    return sum((a[k].double() - b[k].double()).abs().sum().item() for k in a if "running" not in k)


def test_soft_targets_mix_even_batches_and_smooth_odd_ones():
    torch.manual_seed(0)
    targets = SoftTargets(num_classes=4, smoothing=0.1, mixup=0.8, cutmix=1.0)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    mixed_x, mixed_y = targets(x.clone(), y)  # timm mixes in place
    assert not torch.equal(mixed_x, x)
    assert ((mixed_y > 0.1 / 4 + 1e-6).sum(1) == 2).any()  # two classes in a row: mixed
    odd_x, odd_y = targets(x[:5].clone(), y[:5])
    assert torch.equal(odd_x, x[:5])
    expected = torch.full((5, 4), 0.025)
    expected[torch.arange(5), y[:5]] = 0.925
    torch.testing.assert_close(odd_y, expected)
    logits = torch.randn(5, 4)
    torch.testing.assert_close(SoftTargetCrossEntropy()(logits, odd_y), LabelSmoothingCrossEntropy(0.1)(logits, y[:5]))


class _Recorder:
    """Watches a real run: targets given to the loss, learning rates set, gradients clipped, and,
    at every optimizer step, whether the gradients stepped on are the ones backward produced
    (clipping seen without the clipping hook) and this test's own exponential average of the
    weights (``ema_decay``)."""

    def __init__(self, monkeypatch, ema_decay: float | None = None) -> None:
        self.batches: list[torch.Tensor] = []
        self.lrs: list[tuple[int, int, float]] = []
        self.clips: list[tuple[bool, bool]] = []  # (something clipped, all within the AGC bound after)
        self.steps: list[bool] = []  # per optimizer step: were the gradients changed after backward?
        self.initial: dict[str, torch.Tensor] = {}  # the weights before the first step
        self.average: dict[str, torch.Tensor] = {}  # float64 EMA of the weights after each step
        loss_forward, set_lr, clip = DistillationLoss.forward, TrainingRun.set_lr, engine.dispatch_clip_grad
        build = engine.build_run

        def record_loss(loss_self, inputs, outputs, targets):
            self.batches.append(targets.detach().clone())
            return loss_forward(loss_self, inputs, outputs, targets)

        def record_lr(run, epoch, step):
            set_lr(run, epoch, step)
            self.lrs.append((epoch, step, run.optimizer.param_groups[0]["lr"]))

        def record_clip(parameters, value, mode):
            params = [p for p in parameters if p.grad is not None]
            before = [p.grad.clone() for p in params]
            clip(params, value, mode=mode)
            within = all((_unitwise(p.grad) <= value * _unitwise(p).clamp(min=1e-3) * (1 + 1e-4)).all() for p in params)
            self.clips.append((any(not torch.equal(b, p.grad) for b, p in zip(before, params)), within))

        def watch(cfg, device, dist):
            run = build(cfg, device, dist)
            backward: dict[torch.Tensor, torch.Tensor] = {}
            for p in run.model.parameters():
                p.register_post_accumulate_grad_hook(lambda p: backward.__setitem__(p, p.grad.clone()))
            run.optimizer.register_step_pre_hook(lambda *_: self.steps.append(
                any(not torch.equal(g, p.grad) for p, g in backward.items())))
            run.optimizer.register_step_post_hook(lambda *_: self._average(run.model.state_dict()))
            self.initial = {k: v.clone() for k, v in run.model.state_dict().items() if v.is_floating_point()}
            return run

        self.ema_decay = ema_decay
        monkeypatch.setattr(DistillationLoss, "forward", record_loss)
        monkeypatch.setattr(TrainingRun, "set_lr", record_lr)
        monkeypatch.setattr(engine, "dispatch_clip_grad", record_clip)
        monkeypatch.setattr(engine, "build_run", watch)

    @torch.no_grad()
    def _average(self, state: dict[str, torch.Tensor]) -> None:
        """average = decay * average + (1 - decay) * weights, starting from the first step's weights
        (timm's EMA takes decay 0 at its first update)."""
        if self.ema_decay is None:
            return
        decay = self.ema_decay if self.average else 0.0
        for k in self.initial:
            self.average[k] = decay * self.average.get(k, 0.0) + (1 - decay) * state[k].double()


def _unitwise(t: torch.Tensor) -> torch.Tensor:
    return t.norm() if t.ndim <= 1 else torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)), keepdim=True)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _expected_unreadable(cfg: TrainConfig, epochs: int) -> int:
    """How often the sampler draws the corrupt file in the batches a run trains on."""
    cfg, pipe = build_data(cfg, get_model_info(cfg.model), DistInfo(), CPU)
    bad = next(i for i, (path, _) in enumerate(pipe.datasets.train.samples) if path.name == "bad.jpg")
    used = len(pipe.train_loader) * cfg.batch_size
    total = 0
    for epoch in range(epochs):
        pipe.sampler.set_epoch(epoch)
        total += sum(i == bad for _, _, i in list(pipe.sampler)[:used])
    return total


@pytest.mark.slow
def test_levit_recipe_run_on_a_folder(recipe_folder, tmp_path, monkeypatch):
    """--recipe levit for real: every part acts, and each output evaluates to the figure the run reported."""
    decay = 0.9  # the recipe's 0.99996 averages over ~25,000 steps: over these 12 it would not move
    seen = _Recorder(monkeypatch, ema_decay=decay)
    out = tmp_path / "run"
    cfg = TrainConfig(recipe="levit", data=str(recipe_folder), epochs=2, warmup_epochs=1, input_size=32,
                      batch_size=32, workers=0, output=str(out), model_ema_decay=decay, amp="none", channels_last=False)
    train(cfg, progress=False)
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert sum(r["skipped_train"] for r in rows) == _expected_unreadable(cfg, 2)
    assert all(r["skipped_val"] == 0 for r in rows)
    # Mixup/CutMix changed the targets of every even batch; an odd one got smoothed one-hot targets.
    on, off = 1 - 0.1 + 0.1 / 3, 0.1 / 3
    for targets in seen.batches:
        one_hot = torch.isclose(targets, torch.tensor(on)) | torch.isclose(targets, torch.tensor(off))
        if len(targets) % 2:
            assert one_hot.all()
        else:
            assert not one_hot.all()
    assert sum(len(t) % 2 == 0 for t in seen.batches) >= 8
    # 211 images seen 3 times each, 211 drawn per epoch (repeated augmentation): 6 full batches an epoch.
    assert len(seen.steps) == len(seen.lrs) == len(seen.batches) == 2 * (211 // 32)
    # Adaptive gradient clipping clipped, to its unit-wise bound, and the optimizer stepped on the clipped gradients.
    assert len(seen.clips) == len(seen.steps) and all(within for _, within in seen.clips)
    assert [clipped for clipped, _ in seen.clips] == seen.steps and any(seen.steps)
    # The official per-epoch schedule: warm-up epoch at warmup_lr, then the cosine.
    peak = 5e-4 * 32 / 512
    assert all(lr == pytest.approx(_official_lr(e, peak, 1, 2), rel=1e-9) for e, _, lr in seen.lrs)
    # EMA on: the saved average is this test's own average of the weights after every step, which
    # lies neither at the initial nor at the trained weights.
    trained, averaged = load_file(out / "model" / "model.safetensors"), load_file(out / "ema" / "model.safetensors")
    assert set(seen.average) == {k for k, v in averaged.items() if v.is_floating_point()}
    for k, expected in seen.average.items():
        torch.testing.assert_close(averaged[k].double(), expected, rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
    travelled = _distance(seen.initial, trained)
    assert _distance(seen.initial, averaged) > 0.1 * travelled and _distance(seen.average, trained) > 0.1 * travelled
    for output, figure in (("model", rows[-1]["val_top1"]), ("best", max(r["val_top1"] for r in rows)),
                           ("checkpoint.pt", rows[-1]["val_top1"]), ("ema", rows[-1]["ema_val_top1"])):
        result = evaluate(out / output, data=recipe_folder, workers=0)
        assert result["images"] == 31 and result["top1"] == pytest.approx(figure), output
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(state["model"][k], trained[k]) for k in trained)


@pytest.mark.slow
def test_cvt_recipe_trains_a_cvt(recipe_folder, tmp_path, monkeypatch):
    seen = _Recorder(monkeypatch)
    out = tmp_path / "cvt"
    result = train(TrainConfig(model="cvt_13", recipe="cvt", data=str(recipe_folder), epochs=1, input_size=32,
                               batch_size=32, workers=0, amp="none", channels_last=False, output=str(out)), progress=False)
    assert result["images"] == 31 and not (out / "ema").exists()  # no EMA
    # 211 images, no repeats: 6 full batches, each stepped on its gradients as backward left them (no clipping).
    assert len(seen.steps) == len(seen.lrs) == len(seen.batches) == 211 // 32
    assert not any(seen.steps) and not seen.clips
    assert any(len(t) % 2 == 0 and (t > 0.1 / 3 + 1e-6).sum(1).max() == 2 for t in seen.batches)
    assert all(lr == pytest.approx(1e-6) for _, _, lr in seen.lrs)  # the first warm-up epoch
    config = json.loads((out / "train_config.json").read_text())
    assert (config["recipe"], config["weight_decay"], config["repeated_aug"]) == ("cvt", 0.05, False)
    assert evaluate(out / "model", data=recipe_folder, workers=0)["top1"] == pytest.approx(result["top1"])


def test_strongest_randaugment_never_fails_and_transform_errors_are_not_skipped(recipe_folder):
    """Magnitude 10 asks timm's posterize for 0 bits (Pillow 13 refuses: pinned below). A failing
    transform must stop the run, not pass for an unreadable file."""
    from hybridvit.data import load_image, train_transform
    from hybridvit.data import build_datasets

    info = get_model_info("levit_128s")
    strongest = train_transform(info, (32, 32), auto_augment="rand-m10-n3-mstd0.5-inc1", color_jitter=0.0,
                                re_prob=0.0, hflip=0.5, scale=(0.08, 1.0))
    image = load_image(recipe_folder / "train" / "a" / "0.jpg")
    for seed in range(300):
        torch.manual_seed(seed)
        __import__("random").seed(seed)
        assert strongest(image).shape == (3, 32, 32)

    def broken(image):
        raise ValueError("a bug in a transform")

    datasets = build_datasets(recipe_folder)
    datasets.prepare((32, 32), broken, broken)
    with pytest.raises(ValueError, match="a bug in a transform"):
        datasets.train[0]
