"""Training and evaluation: outputs, exact resume after SIGKILL and Ctrl-C, DDP, distillation, bad data."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import hybridvit
from conftest import make_image_folder, reached, read_progress, wait_for
from hybridvit.data import DataError
from hybridvit.train import DistillationLoss, TrainConfig, TrainingError, evaluate, train

FAST = dict(workers=0, input_size=32, batch_size=32, amp="none", channels_last=False)  # as the reference run: not measured


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hybridvit", *args]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def reference_run(digits_run) -> Path:
    """An uninterrupted 3-epoch run that the resumed runs must reproduce."""
    return digits_run


def test_outputs_of_a_run(reference_run):
    run = reference_run
    assert {"checkpoint.pt", "model", "best", "metrics.jsonl", "tensorboard", "training_curve.png"} <= {p.name for p in run.iterdir()}
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [0, 1, 2] and rows[-1]["val_top1"] > rows[0]["val_top1"]
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert read_progress(run) | {"time": 0} == {"epoch": 3, "step": 0, "steps_per_epoch": 44, "epochs": 3,  # 1437 // 32
                                                "state": "done", "time": 0} and (state["epoch"], state["step"]) == (3, 0)
    model = hybridvit.load_model(run / "model")
    assert model.num_classes == 10 and model.model_name == "levit_128s"
    assert hybridvit.checkpoints.read_extra(run / "model")["classes"] == [str(d) for d in range(10)]
    # eval reports the fused model on the same split: the last epoch's numbers
    result = evaluate(run / "model", workers=0)
    assert result["images"] == 360 and result["top1"] == pytest.approx(rows[-1]["val_top1"])
    assert result["loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-4)
    out = subprocess.run(cli("eval", "--checkpoint", str(run / "checkpoint.pt"), "--json", "--workers", "0"),
                         capture_output=True, text=True, check=True)
    assert set(json.loads(out.stdout)) >= {"top1", "top5", "loss", "images"}


def _same_final_state(a: Path, b: Path) -> None:
    timings = {"epoch_seconds": 0, "images_per_second": 0, "data_wait_fraction": 0}
    assert metrics(a)[-1] | timings == metrics(b)[-1] | timings
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(reference_run, tmp_path):
    out = tmp_path / "run"
    args = cli("train", "--epochs", "3", "--workers", "0", "--amp", "none", "--no-channels-last", "--input-size", "32", "--batch-size", "32",
               "--output", str(out))
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(reached(out, 1, 1), proc)  # a step into the second epoch: its checkpoint is one epoch old
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] in (1, 2) and state["step"] == 0  # SIGKILL saves nothing: the last epoch's checkpoint
    subprocess.run(args + ["--resume"], check=True, capture_output=True)
    _same_final_state(out, reference_run)


@pytest.mark.slow
def test_ctrl_c_saves_mid_epoch_checkpoint_and_resume_is_exact_with_workers(reference_run, tmp_path):
    """Two data-loading workers here, none in the reference run: the same batches either way."""
    out = tmp_path / "run"
    args = cli("train", "--epochs", "3", "--workers", "2", "--amp", "none", "--no-channels-last", "--input-size", "32", "--batch-size", "32",
               "--output", str(out))
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(reached(out, 1, 1), proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] >= 1 and state["step"] > 0  # mid-epoch, after the first epoch's checkpoint
    assert read_progress(out) | {"time": 0} == {"epoch": state["epoch"], "step": state["step"], "steps_per_epoch": 44,
                                                "epochs": 3, "state": "interrupted", "time": 0}
    subprocess.run(args + ["--resume"], check=True, capture_output=True)
    _same_final_state(out, reference_run)


@pytest.mark.slow
def test_progress_json_follows_every_step_and_matches_the_checkpoint(tmp_path, monkeypatch):
    """12 images, batch 4: 3 steps an epoch. Ctrl-C after step 1 of epoch 2, then resume."""
    from hybridvit.train.reporting import Reporter

    data, out = make_image_folder(tmp_path / "data"), tmp_path / "run"
    seen: list[tuple[int, int, str]] = []
    stop_at = [(1, 1, "running")]  # once
    original = Reporter.position

    def position(self, *args, **kwargs):
        original(self, *args, **kwargs)
        record = read_progress(out)  # what a monitor polling the file reads now
        assert (record["steps_per_epoch"], record["epochs"]) == (3, 2)
        seen.append((record["epoch"], record["step"], record["state"]))
        if seen[-1] in stop_at:
            stop_at.clear()
            signal.raise_signal(signal.SIGINT)  # Ctrl-C; the run stops at the next step

    monkeypatch.setattr(Reporter, "position", position)
    cfg = TrainConfig(data=str(data), epochs=2, output=str(out), progress_interval=0, **{**FAST, "batch_size": 4})
    assert train(cfg, progress=False) == {"interrupted": True, "epoch": 1, "step": 1}
    running = [(e, s, "running") for e, s in ((0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1))]
    assert seen == running + [(1, 1, "interrupted")]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 1)

    seen.clear()
    train(dataclasses.replace(cfg, resume="yes"), progress=False)
    assert seen == [(1, 1, "running"), (1, 2, "running"), (1, 3, "running"), (2, 0, "running"), (2, 0, "done")]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (2, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *extra]


DDP_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DDP_TRAIN = ["-m", "hybridvit", "train", "--epochs", "3", "--workers", "0", "--amp", "none", "--no-channels-last", "--input-size", "32",
             "--batch-size", "16"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted 2-process gloo run (3 epochs): its output folder and its log."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    done = subprocess.run(_torchrun(f"--master_port={_free_port()}") + DDP_TRAIN + ["--output", str(out)],
                          capture_output=True, text=True, env=DDP_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stderr


@pytest.mark.slow
def test_two_process_ddp_on_cpu(ddp_run):
    out, log = ddp_run
    rows = metrics(out)
    assert len(rows) == 3  # rank 0 alone writes
    config = json.loads((out / "train_config.json").read_text())
    assert config["batch_size"] == 16
    assert "batch 16 x 2 process(es), lr 5.00e-04" in log  # 8e-3 * 32 / 512: lr scaled by the global batch
    single = evaluate(out / "model", workers=0)
    assert single["images"] == 360 and single["top1"] == pytest.approx(rows[-1]["val_top1"])
    ev = subprocess.run(_torchrun(f"--master_port={_free_port()}", "-m", "hybridvit", "eval", "--checkpoint",
                                  str(out / "model"), "--json", "--workers", "0"),
                        capture_output=True, text=True, env=DDP_ENV)
    assert ev.returncode == 0, ev.stderr[-3000:]
    distributed = json.loads(ev.stdout.strip().splitlines()[-1])
    assert distributed["images"] == 360 and distributed["top1"] == pytest.approx(single["top1"])


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_elastic_restart_after_a_worker_is_killed(ddp_run, tmp_path):
    """torchrun --max-restarts 1 with --resume auto: a SIGKILLed worker costs time, not the result."""
    out = tmp_path / "elastic"
    proc = subprocess.Popen(_torchrun("--max-restarts=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{_free_port()}")
                            + DDP_TRAIN + ["--output", str(out), "--resume", "auto"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=DDP_ENV)
    wait_for(lambda: reached(out, 1, 1)() and len(_children(proc.pid)) == 2, proc)  # both workers in epoch 2
    os.kill(_children(proc.pid)[-1], signal.SIGKILL)
    _, log = proc.communicate(timeout=1800)
    assert proc.returncode == 0, log[-3000:]
    assert "restart" in log.lower()
    _same_final_state(out, ddp_run[0])


@pytest.mark.slow
def test_a_rank_with_no_readable_batch_does_not_hang_ddp(tmp_path):
    """Half the training files are corrupt: some steps leave one process with < 2 images; all skip together."""
    data = make_image_folder(tmp_path / "data", per_class=8, corrupt=tuple(
        f"train/{c}/{i}.{'png' if i % 2 or i % 3 == 2 else 'jpg'}" for c in ("cat", "dog") for i in (0, 1, 2, 3)))
    out = tmp_path / "run"
    done = subprocess.run(_torchrun(f"--master_port={_free_port()}", "-m", "hybridvit", "train", "--data", str(data),
                                    "--epochs", "2", "--workers", "0", "--input-size", "32", "--batch-size", "2",
                                    "--output", str(out)),
                          capture_output=True, text=True, env=DDP_ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(out)
    assert len(rows) == 2 and sum(r["skipped_steps"] for r in rows) > 0
    assert sum(r["skipped_train"] for r in rows) > 0


class _Recorder(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.linear = nn.Linear(8, num_classes)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x)
        return self.linear(x)


def test_distillation_losses():
    torch.manual_seed(0)
    x, y = torch.randn(6, 8), torch.randint(0, 5, (6,))
    cls, dist = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    teacher = _Recorder().train()
    hard = DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    loss = hard(x, (cls, dist), y)
    t_out = teacher.linear(x)
    expected = 0.5 * nn.functional.cross_entropy(cls, y) + 0.5 * nn.functional.cross_entropy(dist, t_out.argmax(1))
    torch.testing.assert_close(loss, expected)
    assert teacher.seen[-1] is x  # the teacher sees the very batch the student saw
    loss.backward()
    assert teacher.linear.weight.grad is None and dist.grad is not None

    tau = 3.0
    soft = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", tau=tau)
    p_t = (t_out.detach() / tau).softmax(1)
    kl = (p_t * (p_t.log() - (dist / tau).log_softmax(1))).sum() * tau**2 / dist.numel()
    torch.testing.assert_close(soft(x, (cls, dist), y), 0.5 * nn.functional.cross_entropy(cls, y) + 0.5 * kl)

    none = DistillationLoss(nn.CrossEntropyLoss())
    torch.testing.assert_close(none(x, (cls, dist), y), (nn.functional.cross_entropy(cls, y) + nn.functional.cross_entropy(dist, y)) / 2)
    with pytest.raises(ValueError, match="distillation head"):
        hard(x, cls, y)
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationLoss(nn.CrossEntropyLoss(), None, "soft")


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    data = make_image_folder(tmp_path / "data", corrupt=("train/cat/bad.jpg", "train/dog/bad.png", "val/dog/bad.jpg"))
    result = train(TrainConfig(data=str(data), epochs=2, output=str(tmp_path / "run"), **{**FAST, "batch_size": 4}),
                   progress=False)
    rows = metrics(tmp_path / "run")
    assert [r["skipped_train"] for r in rows] == [2, 2]
    assert all(r["skipped_val"] == 1 for r in rows)
    assert result["images"] == 12 and result["skipped"] == 1


@pytest.mark.parametrize("layout, message", [
    ("no_val", "no validation split: give --val-data"),
    ("mismatch", "different classes"),
    ("empty_class", "no images: bird"),
    ("no_classes", "no class folders"),
])
def test_bad_layouts_fail_before_training(tmp_path, layout, message):
    data = make_image_folder(tmp_path / "data", per_class=2)
    if layout == "no_val":
        import shutil

        shutil.rmtree(data / "val")
    elif layout == "mismatch":
        (data / "val" / "dog").rename(data / "val" / "wolf")
    elif layout == "empty_class":
        (data / "train" / "bird").mkdir()
        (data / "val" / "bird").mkdir()
    elif layout == "no_classes":
        data = tmp_path / "flat"
        (data / "train").mkdir(parents=True)
        (data / "val").mkdir()
    with pytest.raises(DataError, match=message):
        train(TrainConfig(data=str(data), epochs=1, output=str(tmp_path / "run"), **FAST), progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(TrainConfig(epochs=1, output=str(out), **FAST), progress=False)
    good = torch.load(out / "checkpoint.pt", weights_only=True)
    original = DistillationLoss.forward
    calls = {"n": 0}

    def poisoned(self, *args):
        calls["n"] += 1
        loss = original(self, *args)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(DistillationLoss, "forward", poisoned)
    with pytest.raises(TrainingError, match="loss is nan at epoch 1 step 3"):
        train(TrainConfig(epochs=3, output=str(out), resume=True, **FAST), progress=False)
    kept = torch.load(out / "checkpoint.pt", weights_only=True)
    assert kept["epoch"] == 1 and all(torch.equal(kept["model"][k], good["model"][k]) for k in good["model"])


def test_finetune_to_new_classes(reference_run, tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=6)
    train(TrainConfig(data=str(data), epochs=1, finetune=str(reference_run / "model"), output=str(tmp_path / "ft"),
                      **{**FAST, "batch_size": 4}), progress=False)
    model = hybridvit.load_model(tmp_path / "ft" / "model")
    assert model.num_classes == 2
    with pytest.raises(DataError, match=r"trained on classes \[.cat., .dog.\]"):
        evaluate(tmp_path / "ft" / "model", workers=0)


@pytest.mark.slow
def test_odd_batch_size_with_mixup_trains(recipe_folder, tmp_path):
    """--recipe levit --batch-size 33: every batch is odd, so Mixup cannot run; smoothed targets instead."""
    out = tmp_path / "odd"
    done = subprocess.run(cli("train", "--data", str(recipe_folder), "--recipe", "levit", "--batch-size", "33", "--epochs",
                              "1", "--input-size", "32", "--workers", "0", "--output", str(out)),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert metrics(out)[0]["train_loss"] > 0


def test_tensorboard_writer_is_closed_when_a_run_diverges(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    closed = []
    original = SummaryWriter.close
    monkeypatch.setattr(SummaryWriter, "close", lambda self: (closed.append(self), original(self))[1])
    monkeypatch.setattr(DistillationLoss, "forward", lambda self, *args: torch.tensor(float("inf"), requires_grad=True))
    with pytest.raises(TrainingError, match="loss is inf"):
        train(TrainConfig(epochs=1, output=str(tmp_path / "run"), **FAST), progress=False)
    assert len(closed) == 1


@pytest.mark.parametrize("args, message", [
    (["--amp", "fp8"], "--amp must be one of auto, bf16, fp16, none; got 'fp8'"),
    (["--device", "gpu"], "--device must be one of auto, cpu, cuda; got 'gpu'"),
    (["--clip-mode", "unitwise"], "--clip-mode must be one of norm, value, agc"),
    (["--resume", "later"], "--resume must be one of no, yes, auto"),
])
def test_bad_option_values_are_one_line_errors(args, message):
    done = subprocess.run(cli("train", *args), capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_eval_of_a_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    done = subprocess.run(cli("eval", "--checkpoint", str(tmp_path / "notes.txt")), capture_output=True, text=True)
    assert done.returncode == 2 and "notes.txt is not a PyTorch checkpoint" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr and "Unpickl" not in done.stdout + done.stderr


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_and_channels_last_on_cpu(amp, recipe_folder, tmp_path, monkeypatch):
    """The autocast, gradient-scaling and memory-format code that GPUs use, exercised on the CPU."""
    seen = []
    original = DistillationLoss.forward

    def record(self, inputs, outputs, targets):
        seen.append((inputs.is_contiguous(memory_format=torch.channels_last), outputs[0].dtype))
        return original(self, inputs, outputs, targets)

    monkeypatch.setattr(DistillationLoss, "forward", record)
    out = tmp_path / amp
    result = train(TrainConfig(data=str(recipe_folder), epochs=1, device="cpu", output=str(out),
                               **{**FAST, "amp": amp, "channels_last": True}), progress=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert len(seen) == 6 and all(layout and out_dtype == dtype for layout, out_dtype in seen)
    assert result["images"] == 31 and math.isfinite(result["loss"])
    scaler = torch.load(out / "checkpoint.pt", weights_only=True)["scaler"]
    assert (scaler is not None and scaler["scale"] > 0) if amp == "fp16" else scaler is None


# --- distillation teachers --------------------------------------------------------------------

DIGITS = [str(d) for d in range(10)]


def test_a_named_teacher_needs_weights(tmp_path):
    for name in ("resnet18", "levit_128s"):
        with pytest.raises(ValueError, match=f"--teacher {name} has no weights"):
            train(TrainConfig(epochs=1, teacher=name, output=str(tmp_path / name), **FAST), progress=False)
        assert not (tmp_path / name / "checkpoint.pt").exists()


def test_teacher_sources_load_their_trained_weights(reference_run, tmp_path):
    import timm
    from safetensors.torch import save_file

    from hybridvit.train.teacher import build_teacher

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    trained = hybridvit.load_model(reference_run / "model")
    save_file(trained.state_dict(), tmp_path / "levit.safetensors")
    resnet = timm.create_model("resnet18", num_classes=10).eval()
    torch.save({"state_dict": resnet.state_dict()}, tmp_path / "resnet18.pth")
    sources = [
        (dict(teacher=str(reference_run / "model")), trained),
        (dict(teacher=str(reference_run)), trained),  # a run folder
        (dict(teacher="levit_128s", teacher_checkpoint=str(tmp_path / "levit.safetensors")), trained),
        (dict(teacher="resnet18", teacher_checkpoint=str(tmp_path / "resnet18.pth")), resnet),
    ]
    with torch.no_grad():
        for options, reference in sources:
            teacher = build_teacher(TrainConfig(**options), DIGITS, (32, 32))
            assert not teacher.training
            torch.testing.assert_close(teacher(x), reference(x), rtol=1e-5, atol=1e-5)


def test_teacher_must_fit_the_data(reference_run, tmp_path):
    import timm

    from hybridvit.train.teacher import build_teacher

    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"teacher resnet18 \(for 2 classes\): size mismatch for fc.weight"):
        build_teacher(TrainConfig(teacher="resnet18", teacher_checkpoint=str(tmp_path / "r18.pth")), ["a", "b"], (32, 32))
    with pytest.raises(ValueError, match="was trained on classes"):
        build_teacher(TrainConfig(teacher=str(reference_run / "model")), ["a", "b"], (32, 32))
    with pytest.raises(ValueError, match=r"cannot take the training images \(48x48\)"):
        build_teacher(TrainConfig(teacher=str(reference_run / "model")), DIGITS, (48, 48))  # LeViT built for 32x32
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=10).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(ValueError, match=r"teacher vit_tiny_patch16_224 cannot take the training images \(32x32\)"):
        build_teacher(TrainConfig(teacher="vit_tiny_patch16_224", teacher_checkpoint=str(tmp_path / "vit.pth")), DIGITS, (32, 32))


def test_hard_and_soft_distillation_differ_in_loss_and_gradient(reference_run):
    from hybridvit.train.builder import build_run
    from hybridvit.train.distributed import DistInfo

    def loss_and_grads(distillation: str, teacher: str | None):
        run = build_run(TrainConfig(epochs=1, teacher=teacher, distillation=distillation, distillation_tau=2.0, **FAST),
                        torch.device("cpu"), DistInfo())
        x, y, _ = next(iter(run.data.train_loader))
        x, targets = run.targets(x, y)
        loss = run.criterion(x, run.model.train()(x), targets)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in run.model.parameters() if p.grad is not None])

    teacher = str(reference_run / "model")
    (hard, g_hard), (soft, g_soft), (none, g_none) = (loss_and_grads(d, t) for d, t in
                                                      (("hard", teacher), ("soft", teacher), ("none", None)))
    assert len({hard, soft, none}) == 3
    assert not torch.allclose(g_hard, g_soft) and not torch.allclose(g_hard, g_none)


@pytest.mark.slow
def test_teacher_never_changes_during_training(reference_run, tmp_path, monkeypatch):
    from hybridvit.train import builder

    built = []
    original = builder.build_teacher
    monkeypatch.setattr(builder, "build_teacher", lambda *a: built.append(original(*a)) or built[-1])
    train(TrainConfig(epochs=1, teacher=str(reference_run / "model"), output=str(tmp_path / "t"), **FAST), progress=False)
    (teacher,) = built
    before = hybridvit.load_model(reference_run / "model").state_dict()
    assert all(torch.equal(teacher.state_dict()[k], before[k]) for k in before)  # BatchNorm statistics too
    assert not teacher.training
