"""The command line: tables and the demo forward pass."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from hybridvit import list_models
from hybridvit.cli import app
from hybridvit.cli.models import FIGURES_FILE, count_figures, figures_key, model_figures

runner = CliRunner()


def test_models_table():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.startswith("│")}
    assert list(rows)[:5] == ["levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"]
    assert "7.78M" in rows["levit_128s"] and "305M" in rows["levit_128s"] and "76.6" in rows["levit_128s"]
    assert "12,880" in rows["levit_128s"] and "131.1" in rows["levit_128s"] and "224x224" in rows["levit_128s"]
    assert list(rows)[5:] == ["cvt_13", "cvt_21", "cvt_w24", "graft_resnet50_deit_s"]
    assert "13.14M" in rows["graft_resnet50_deit_s"] and "80.9" in rows["graft_resnet50_deit_s"]
    assert "20.00M" in rows["cvt_13"] and "4,570M" in rows["cvt_13"] and "81.6" in rows["cvt_13"]
    assert "277.20M" in rows["cvt_w24"] and "384x384" in rows["cvt_w24"]


@pytest.mark.slow
def test_model_figures_file_matches_a_fresh_count():
    """The parameters and MACs ``models`` reads from model_figures.json (it lists without counting)
    are what counting on the meta device gives now; if not: python scripts/update_model_figures.py."""
    stored = json.loads(FIGURES_FILE.read_text())
    assert sorted(stored) == sorted(list_models())
    for name in list_models():
        assert stored[name]["key"] == figures_key(name), name
        assert {k: stored[name][k] for k in ("params", "macs")} == count_figures(name), name


def test_stored_figures_are_used_only_for_the_config_they_were_counted_for(monkeypatch):
    key = figures_key("levit_128s")
    monkeypatch.setattr("hybridvit.cli.models._stored_figures", lambda: {"levit_128s": {"key": key, "params": 1, "macs": 2}})
    assert model_figures("levit_128s") == {"params": 1, "macs": 2}
    other = {**key, "config": {**key["config"], "depth": [2, 3, 5]}}
    monkeypatch.setattr("hybridvit.cli.models._stored_figures", lambda: {"levit_128s": {"key": other, "params": 1, "macs": 2}})
    assert model_figures("levit_128s") == {"params": 7_777_058, "macs": 305_108_946}  # counted afresh (README: 305.1M)


def test_info_stages():
    result = runner.invoke(app, ["info", "levit_128s"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "(1, 128, 14, 14)" in out and "(1, 49, 256)" in out and "(1, 16, 384)" in out
    assert "7,777,058" in out and "305.1M" in out


def test_info_cvt_any_size():
    result = runner.invoke(app, ["info", "cvt_13", "--height", "160", "--width", "256"])
    assert result.exit_code == 0, result.output
    assert "(1, 2560, 64)" in result.output and "(1, 161, 384)" in result.output and "19,997,480" in result.output


def test_unknown_model_is_a_clear_error():
    result = runner.invoke(app, ["info", "levit_999"])
    assert result.exit_code != 0 and "unknown model 'levit_999'" in str(result.exception)


def test_forward_demo_on_grayscale_png(tmp_path):
    Image.new("L", (300, 200), color=90).save(tmp_path / "gray.png")
    result = runner.invoke(app, ["forward", "levit_128s", str(tmp_path / "gray.png")])
    assert result.exit_code == 0, result.output
    assert "input (1, 3, 224, 224)" in result.output and result.output.count("class ") == 5


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "hybridvit", "models", "levit_128s"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "levit_128s" in out.stdout
