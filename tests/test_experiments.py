"""The experiment command: every table's variants and counts, end to end with resume, jobs and torchrun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_image_folder, reached, wait_for
from hybridvit import count_macs, count_params, create_model
from hybridvit.experiments import EXPERIMENTS, Settings, markdown_table, run_experiment, train_config
from hybridvit.train import evaluate

TINY = ["--epochs", "1", "--input-size", "32", "--batch-size", "32", "--workers", "0", "--bench-seconds", "0.3",
        "--quiet"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hybridvit", *args]


def _counts(variant, count_args) -> tuple[int, int]:
    with torch.device("meta"):
        model = create_model(variant.model, **{**variant.model_args, **count_args})
    return count_params(model), count_macs(model)


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_every_variant_builds_and_matches_the_papers_counts(experiment):
    exp = EXPERIMENTS[experiment]
    seen = set()
    for v in exp.variants:
        params, macs = _counts(v, exp.count_args)
        key = (v.model, json.dumps(v.model_args, sort_keys=True))
        assert key not in seen  # no two rows train the same model
        seen.add(key)
        if v.paper_params is not None:  # the papers round to 0.1M (Table 5) or to 1M (CvT's "20M")
            assert abs(params - v.paper_params) / v.paper_params < (0.026 if v.model == "cvt_13" else 0.02), v.name
        if v.paper_macs is not None:
            assert abs(macs - v.paper_macs) / v.paper_macs < 0.03, v.name


def test_variant_runs_share_recipe_and_seed_and_a4_has_no_teacher(tmp_path):
    settings = Settings("levit-ablations", None, 3, input_size=32, seed=5, teacher="runs/teacher")
    configs = {v.name: train_config(v, settings, tmp_path, 0) for v in EXPERIMENTS["levit-ablations"].variants}
    assert {c.seed for c in configs.values()} == {5} and {c.epochs for c in configs.values()} == {3}
    assert configs["A4"].teacher is None and configs["A3"].teacher == "runs/teacher"
    assert configs["A3"].model_args == {"ablation": "A3"} and configs["A3"].resume == "auto"
    assert Path(configs["A3"].output) == tmp_path / "A3"
    graft = {v.name: train_config(v, Settings("grafting", None, 1, teacher="t"), tmp_path, 0)
             for v in EXPERIMENTS["grafting"].variants}
    assert graft["resnet4-deit0"].teacher is None and graft["resnet2-deit6"].teacher == "t"


def test_bad_requests_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown experiment"):
        run_experiment(Settings("table-9", None, 1), tmp_path)
    with pytest.raises(ValueError, match="no variant"):
        run_experiment(Settings("levit-ablations", None, 1), tmp_path, only=["A8"])
    done = subprocess.run(cli("experiment", "grafting", "--output", str(tmp_path / "x"), "--epochs", "1", "--only",
                              "resnet9-deit0"), capture_output=True, text=True)
    assert done.returncode == 2 and "no variant" in done.stderr


def test_markdown_table_puts_the_paper_beside_ours():
    exp = EXPERIMENTS["levit-ablations"]
    row = dict(variant="A1", change=exp.variants[1].change, params=1214614, paper_params=1.2e6, macs=308307144,
               paper_macs=308e6, macs_at_input=9.1e6, input_size=[32, 32], images_per_second=1234.5, top1=51.25,
               paper_top1=56.5, recipe="tiny")
    table = markdown_table(exp, [row], Settings("levit-ablations", None, 4, input_size=32))
    assert "| A1 | without pyramid" in table
    assert "| 1.21M | 1.2M | 308M | 308M | 9.1M | 1,234 | 51.25 | 56.5 |" in table
    assert "4 epochs at 32x32, recipe tiny" in table


def _check_rows(experiment: str, out: Path, names: list[str], data: Path | None = None) -> list[dict]:
    """``results.json`` and ``.md`` against figures made here, apart from the experiment: each
    variant's saved model evaluated on the validation split, and its counts at the paper's setting."""
    exp = EXPERIMENTS[experiment]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == names
    table = (out / "results.md").read_text()
    for r in rows:
        figures = evaluate(out / r["variant"], data=data, workers=0)
        # fused and in fp32, against the run's own evaluation (in bf16 where --amp auto chose it): two borderline images
        assert r["top1"] == pytest.approx(figures["top1"], abs=200.5 / figures["images"])
        assert f"| {r['variant']} | {r['change']} |" in table and f"| {r['top1']:.2f} |" in table
        variant = next(v for v in exp.variants if v.name == r["variant"])
        assert (r["params"], r["macs"]) == _counts(variant, exp.count_args)
        assert r["input_size"] == [32, 32] and 0 < r["macs_at_input"] < r["macs"] and r["images_per_second"] > 0
    return rows


@pytest.mark.slow
def test_two_variants_end_to_end_interrupted_then_resumed(tmp_path):
    out = tmp_path / "exp"
    args = cli("experiment", "levit-ablations", "--only", "base,A7", "--output", str(out), *TINY)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(reached(out / "A7", 0, 1), proc)  # the second variant has taken a step
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 130, log[-3000:]
    assert "A7 was interrupted" in log
    base_done = (out / "base" / "trained.json").stat().st_mtime_ns
    state = torch.load(out / "A7" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"] > 0) == (0, True) and not (out / "A7" / "trained.json").exists()

    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "base: trained already, kept" in done.stdout and "A7: resuming from" in done.stdout
    assert (out / "base" / "trained.json").stat().st_mtime_ns == base_done
    rows = _check_rows("levit-ablations", out, ["base", "A7"])
    assert all(r["top1"] > 50 for r in rows)  # 10 classes, chance is 10%; one epoch reaches 90
    assert rows[0]["params"] == rows[1]["params"]  # A7 only drops an activation
    table = (out / "results.md").read_text()
    assert table.count("\n| base |") + table.count("\n| A7 |") == 2 and "| 71.9 |" in table
    assert (out / "results.png").stat().st_size > 10_000

    other = subprocess.run(cli("experiment", "levit-ablations", "--only", "base", "--output", str(out), "--epochs", "2"),
                           capture_output=True, text=True)
    assert other.returncode == 2 and "other settings (batch_size, epochs, input_size)" in other.stderr


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    """36 training images in 3 classes (one step of 32 per epoch) and 18 to validate on."""
    return make_image_folder(tmp_path_factory.mktemp("small") / "data", classes=("a", "b", "c"), per_class=12,
                             val_per_class=6)


@pytest.mark.slow
@pytest.mark.parametrize("experiment, only", [("grafting", "resnet2-deit6,resnet3-deit3"),
                                              ("cvt-ablations", "base,linear-proj")])
def test_grafting_and_cvt_ablations_end_to_end(experiment, only, small_folder, tmp_path):
    """One epoch of two variants (the smallest), on a small folder: every row is what its model does."""
    out = tmp_path / experiment
    done = subprocess.run(cli("experiment", experiment, "--data", str(small_folder), "--only", only, "--output",
                              str(out), *TINY), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = _check_rows(experiment, out, only.split(","), small_folder)
    assert {r["recipe"] for r in rows} == {"tiny"} and not any(r["distilled"] for r in rows)
    assert (out / "results.png").stat().st_size > 10_000


@pytest.mark.slow
def test_jobs_train_variants_in_parallel_processes(tmp_path):
    out = tmp_path / "jobs"
    done = subprocess.run(cli("experiment", "levit-ablations", "--only", "A1,A2", "--jobs", "2", "--output", str(out),
                              *TINY), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["A1", "A2"]
    assert all((out / r["variant"] / "model" / "model.safetensors").exists() for r in rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_under_torchrun(tmp_path):
    out = tmp_path / "ddp"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_free_port()}", "-m", "hybridvit", "experiment", "levit-ablations",
                           "--only", "A1,A7", "--output", str(out), *TINY],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "x 2 process(es)" in done.stdout + done.stderr
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["A1", "A7"]
    assert (out / "results.md").read_text().count("| A") == 2
