"""The training loop's machinery that decides its speed: the measured precision, the data
workers (idle priority, kept across epochs, started early, batches in shared memory), the
progress file's pace, cheap per-sample seeding and JPEG draft decoding."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

import hybridvit
from conftest import make_image_folder
from hybridvit.data import load_image, train_transform
from hybridvit.data.datasets import collate_skipping_bad
from hybridvit.data.sampling import SeededSamples
from hybridvit.registry import get_model_info
from hybridvit.train import TrainConfig, precision, reporting, train
from hybridvit.train.distributed import DistInfo
from hybridvit.train.runtime import PrestartedLoader, default_workers, make_loader

CPU = torch.device("cpu")
FAST = dict(workers=0, input_size=32, batch_size=4, epochs=1, device="cpu")  # precision and layout: auto


# --- precision: --amp auto ------------------------------------------------------------------------

BF16 = torch.bfloat16


def _timed(fp32: float, bf16: float, channels_last_gain: float = 1.0):
    """A stand-in for the measurement: these seconds per step (channels-last ``channels_last_gain`` times faster)."""
    def step_seconds(model, batch_shape, device, candidates):
        assert batch_shape == (4, 3, 32, 32)
        assert candidates == [(None, False), (None, True), (BF16, False), (BF16, True)]
        seconds = {None: fp32, BF16: bf16}
        return {(d, cl): seconds[d] / (channels_last_gain if cl else 1.0) for d, cl in candidates}
    return step_seconds


@pytest.fixture
def small_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data", per_class=4)


def _steps_seen(monkeypatch) -> list[tuple[torch.dtype, bool]]:
    """(output dtype, input in channels-last) of every training step."""
    from hybridvit.train import DistillationLoss

    seen: list[tuple[torch.dtype, bool]] = []
    original = DistillationLoss.forward

    def record(self, inputs, outputs, targets):
        seen.append((outputs[0].dtype, inputs.is_contiguous(memory_format=torch.channels_last)))
        return original(self, inputs, outputs, targets)

    monkeypatch.setattr(DistillationLoss, "forward", record)
    return seen


def test_auto_step_follows_the_measurement_and_a_resumed_run_keeps_it(small_folder, tmp_path, monkeypatch, capsys):
    seen = _steps_seen(monkeypatch)
    out = tmp_path / "run"
    monkeypatch.setattr(precision, "step_seconds", _timed(fp32=1.0, bf16=0.5, channels_last_gain=1.1))
    train(TrainConfig(data=str(small_folder), output=str(out), **FAST), progress=False)
    assert set(seen) == {(BF16, True)}
    assert ("training step: bf16 autocast, channels-last; a training step measured here: fp32 1000 ms, fp32, "
            "channels-last 909 ms, bf16 autocast 500 ms, bf16 autocast, channels-last 455 ms") in capsys.readouterr().err
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["amp"], state["channels_last"]) == ("bf16", True)

    # the machine now times fp32 and the plain layout faster: the run continues as it started
    seen.clear()
    monkeypatch.setattr(precision, "step_seconds", _timed(fp32=0.5, bf16=1.0, channels_last_gain=0.5))
    train(TrainConfig(data=str(small_folder), output=str(out), resume="yes", **{**FAST, "epochs": 2}), progress=False)
    assert seen and set(seen) == {(BF16, True)}
    assert "bf16 autocast, channels-last (as chosen when this run started; layout as chosen when this run started)" \
        in capsys.readouterr().err


def test_auto_step_needs_a_clear_margin(small_folder, tmp_path, monkeypatch):
    seen = _steps_seen(monkeypatch)
    gains = dict(bf16=1.0 / (precision.BF16_MARGIN - 0.05), channels_last_gain=precision.LAYOUT_MARGIN - 0.02)
    monkeypatch.setattr(precision, "step_seconds", _timed(fp32=1.0, **gains))
    train(TrainConfig(data=str(small_folder), output=str(tmp_path / "run"), **FAST), progress=False)
    assert set(seen) == {(torch.float32, False)}
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (state["amp"], state["channels_last"]) == ("none", False)


def test_step_seconds_times_a_copy_and_leaves_the_model_as_it_was():
    model = hybridvit.create_model("levit_128s", num_classes=3, img_size=32).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    candidates = [(None, False), (BF16, True)]
    seconds = precision.step_seconds(model, (2, 3, 32, 32), CPU, candidates)
    assert set(seconds) == set(candidates) and all(s > 0 for s in seconds.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics too
    assert all(p.grad is None for p in model.parameters())
    assert all(p.is_contiguous() for p in model.parameters())  # its layout too


def test_named_precision_and_layout_are_not_measured(monkeypatch):
    monkeypatch.setattr(precision, "step_seconds", lambda *a, **k: pytest.fail("measured"))
    chosen = precision.choose_step("none", False, torch.nn.Linear(2, 2), (1, 2), CPU, DistInfo())
    assert (chosen.dtype, chosen.channels_last, chosen.amp) == (None, False, "none")
    assert chosen.reason == "fp32 (--amp none; layout as asked)"


# --- data workers ---------------------------------------------------------------------------------

class _WhoLoads(Dataset):
    """Each sample says which process loaded it and at which scheduling policy."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index):
        return torch.tensor([float(os.getpid()), float(os.sched_getscheduler(0))]), index


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling classes")
def test_cpu_workers_run_at_idle_priority_are_kept_across_epochs_and_share_memory():
    loader = make_loader(_WhoLoads(), 4, range(8), 2, CPU, False)
    epochs = [[batch for batch in loader] for _ in range(2)]
    pids = [{int(p) for x, _, _ in batches for p in x[:, 0].tolist()} for batches in epochs]
    assert pids[0] == pids[1] and len(pids[0]) == 2 and os.getpid() not in pids[0]  # the same two workers
    assert all(int(policy) == os.SCHED_IDLE for x, _, _ in epochs[0] for policy in x[:, 1].tolist())
    assert all(x.is_shared() for x, _, _ in epochs[0])  # stacked in shared memory, not copied there
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the training process keeps its priority


def test_evaluation_workers_start_before_the_first_pass_and_every_pass_is_whole():
    loader = PrestartedLoader(make_loader(_WhoLoads(), 3, range(8), 1, CPU, False))
    workers = loader.loader._iterator._workers
    assert len(workers) == 1 and workers[0].is_alive()  # forked now, before any pass
    for _ in range(2):
        assert [y.tolist() for _, y, _ in loader] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert loader.loader._iterator._workers[0].pid == workers[0].pid
    assert list(PrestartedLoader(make_loader(_WhoLoads(), 8, range(8), 0, CPU, False)))  # no workers: plain


@pytest.mark.parametrize("cores, local, cpu, cuda", [(2, 1, 2, 1), (1, 1, 0, 1), (2, 2, 0, 1), (16, 2, 8, 7),
                                                    (64, 1, 8, 8)])
def test_default_workers_follow_the_cores(cores, local, cpu, cuda, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    assert default_workers(CPU) == cpu and default_workers(torch.device("cuda")) == cuda


def test_samples_are_seeded_alike_in_any_process_and_queue_no_cuda_seeding(small_folder, monkeypatch):
    """The seeding no longer goes through torch.manual_seed, which in a CUDA build queues a
    CUDA seeding with a stack trace per call while CUDA is not started."""
    from hybridvit.data import build_datasets

    datasets = build_datasets(small_folder)
    info = get_model_info("levit_128s")
    datasets.prepare((32, 32), train_transform(info, (32, 32), auto_augment=None, color_jitter=0.4, re_prob=0.25,
                                               hflip=0.5, scale=(0.08, 1.0)), None)
    samples = SeededSamples(datasets.train, seed=3)
    queued = []
    monkeypatch.setattr(torch.cuda.random, "_lazy_call", lambda *args, **kwargs: queued.append(kwargs))
    first = [samples[(1, draw, 2)][0] for draw in range(3)]
    assert queued == []
    random.random(), np.random.random(), torch.rand(1)  # whatever the process drew in between
    assert all(torch.equal(a, samples[(1, draw, 2)][0]) for draw, a in enumerate(first))
    assert not torch.equal(first[0], first[1])  # another draw of the same image: another augmentation
    loader = make_loader(samples, 3, [(1, draw, 2) for draw in range(3)], 1, CPU, False)
    assert torch.equal(next(iter(loader))[0], torch.stack(first))  # the same in a worker process


# --- progress.json --------------------------------------------------------------------------------

def test_progress_file_is_written_at_most_once_per_interval_but_always_at_boundaries(tmp_path, monkeypatch):
    clock = iter(np.arange(0, 100, 0.3))  # each call 0.3 s later
    monkeypatch.setattr(reporting.time, "monotonic", lambda: float(next(clock)))
    written = []
    monkeypatch.setattr(reporting, "write_json_atomic", lambda path, record: written.append(
        (record["epoch"], record["step"], record["state"])))
    reporter = reporting.Reporter(tmp_path, True, False, epochs=2, steps_per_epoch=10, progress_interval=1.0)
    for step in range(10):
        reporter.position(0, step)
    reporter.position(1, 0)
    reporter.position(1, 1)
    reporter.position(1, 2, "interrupted")
    assert written == [(0, 0, "running"), (0, 4, "running"), (0, 8, "running"), (1, 0, "running"),
                       (1, 2, "interrupted")]
    every = reporting.Reporter(tmp_path, True, False, epochs=2, steps_per_epoch=10, progress_interval=0)
    written.clear()
    for step in range(4):
        every.position(0, step)
    assert [s for _, s, _ in written] == [0, 1, 2, 3]


# --- JPEG draft decoding --------------------------------------------------------------------------

def _photo(path: Path, size: tuple[int, int]) -> Path:
    from sklearn.datasets import load_sample_images

    Image.fromarray(load_sample_images().images[1]).resize(size, Image.BICUBIC).save(path, quality=90)
    return path


def _crops(transform, path: Path, seed: int, count: int = 12) -> list[np.ndarray]:
    random.seed(seed)
    return [np.asarray(transform.read(path), dtype=np.float32) for _ in range(count)]


def test_jpeg_draft_decodes_large_photos_at_reduced_scale_close_to_a_full_decode(tmp_path, monkeypatch):
    info = get_model_info("levit_128s")
    make = lambda draft: train_transform(info, (64, 64), auto_augment=None, color_jitter=0.0, re_prob=0.0, hflip=0.0,
                                         scale=(0.08, 1.0), jpeg_draft=draft)
    large = _photo(tmp_path / "large.jpg", (1200, 900))
    drafts: list = []
    from PIL.JpegImagePlugin import JpegImageFile

    original = JpegImageFile.draft
    monkeypatch.setattr(JpegImageFile, "draft", lambda self, mode, size: drafts.append(size) or original(self, mode, size))
    draft, full = _crops(make(True), large, seed=1), _crops(make(False), large, seed=1)
    assert len(drafts) == 12 and all(size[0] <= 600 for size in drafts)  # every crop of 8% or more of 1200x900 is >= 128 px: 1/2 or less
    assert all(a.shape == (64, 64, 3) for a in draft)
    assert np.mean([np.abs(a - b).mean() for a, b in zip(draft, full)]) < 3  # the same crops, within 3/255
    assert all(np.array_equal(a, b) for a, b in zip(draft, _crops(make(True), large, seed=1)))  # every run alike
    # no room to scale (crops smaller than twice the output) or not a JPEG: timm's own crop, pixel for pixel
    drafts.clear()
    for small in (_photo(tmp_path / "small.jpg", (100, 90)), tmp_path / "large.png"):
        if small.suffix == ".png":
            Image.open(large).save(small)
        random.seed(2)
        ours = [np.asarray(make(True).read(small)) for _ in range(6)]
        random.seed(2)
        timm_crop = make(True).crop  # DraftResizedCrop's __call__ is timm's
        image = load_image(small)
        assert all(np.array_equal(a, np.asarray(timm_crop(image))) for a in ours)
    assert drafts == []


def test_unreadable_file_in_the_draft_path_is_a_skipped_sample(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=3, corrupt=("train/cat/0.jpg",))
    from hybridvit.data import build_datasets

    datasets = build_datasets(data)
    info = get_model_info("levit_128s")
    datasets.prepare((32, 32), train_transform(info, (32, 32), auto_augment=None, color_jitter=0.0, re_prob=0.0,
                                               hflip=0.0, scale=(0.08, 1.0)), None)
    index = next(i for i, (p, _) in enumerate(datasets.train.samples) if p.name == "0.jpg" and p.parent.name == "cat")
    assert datasets.train[index] == (None, index)
    x, y, bad = collate_skipping_bad([datasets.train[i] for i in range(len(datasets.train))])
    assert bad == [index] and x.shape == (len(datasets.train) - 1, 3, 32, 32)


# --- --compile ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_compile_trains_through_a_compiled_graph(small_folder, tmp_path, monkeypatch):
    """About 45 s of inductor compilation on 2 cores: the training model runs as a compiled graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setenv("_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR", "")  # inductor sets it in-process: removed after
    monkeypatch.delenv("_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR")

    def graphs_after(**options) -> int:
        torch._dynamo.reset()
        counters.clear()
        train(TrainConfig(data=str(small_folder), output=str(tmp_path / str(options)), amp="none", channels_last=False,
                          **{**FAST, **options}), progress=False)
        return counters["stats"]["unique_graphs"]

    assert graphs_after(compile=False) == 0
    assert graphs_after(compile=True) >= 1
    model = hybridvit.load_model(tmp_path / str({"compile": True}) / "model")  # saved without the compile wrapper
    assert model.model_name == "levit_128s"


def test_the_train_command_tunes_the_allocator_before_training(small_folder, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import hybridvit.allocator
    from hybridvit.cli import app
    from hybridvit.train import engine

    events: list[str] = []
    monkeypatch.setattr(hybridvit.allocator, "tune_cpu_allocator", lambda: events.append("tuned") or True)
    original = engine.build_run
    monkeypatch.setattr(engine, "build_run", lambda *a, **k: events.append("built") or original(*a, **k))
    result = CliRunner().invoke(app, ["train", "--data", str(small_folder), "--epochs", "1", "--workers", "0",
                                      "--input-size", "32", "--batch-size", "4", "--amp", "none", "--no-channels-last",
                                      "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert events == ["tuned", "built"]
