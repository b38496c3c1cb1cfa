"""Shared test helpers: randomised weights and statistics, relative error, image folders, waiting
on a running process, and a check that no test leaves process-wide state changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

# Imported before the first test because importing them writes os.environ once, which is no
# test's leak: scikit-learn (KMP_*), torch._dynamo (TORCHINDUCTOR_CACHE_DIR; timm and export import it).
import sklearn  # noqa: E402,F401  isort: skip
import torch._dynamo  # noqa: E402,F401  isort: skip


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


def _global_state() -> dict[str, object]:
    return {"torch.get_num_threads()": torch.get_num_threads(),
            "torch.get_num_interop_threads()": torch.get_num_interop_threads(),
            "torch.get_default_dtype()": torch.get_default_dtype(),
            "torch.is_grad_enabled()": torch.is_grad_enabled(),
            "torch.is_inference_mode_enabled()": torch.is_inference_mode_enabled()}


@pytest.fixture(autouse=True)
def global_state_is_restored():
    """Fail a test that leaves torch's thread counts, default dtype, grad mode or the environment
    changed (every later in-process test would run under them), after putting them back.

    ``no_hub_network`` requests this fixture, so it is set up before any ``monkeypatch`` and checks
    after monkeypatch has undone its own changes."""
    before, environ = _global_state(), dict(os.environ)
    yield
    after = _global_state()
    leaked = [f"{name}: {before[name]} -> {after[name]}" for name in before if after[name] != before[name]]
    leaked += [f"os.environ[{key!r}]: {environ.get(key)!r} -> {os.environ.get(key)!r}"
               for key in sorted(set(environ) | set(os.environ))
               if environ.get(key) != os.environ.get(key) and key != "PYTEST_CURRENT_TEST"]  # pytest's own
    if leaked:
        torch.set_num_threads(before["torch.get_num_threads()"])  # interop threads cannot be set twice
        torch.set_default_dtype(before["torch.get_default_dtype()"])
        torch.set_grad_enabled(before["torch.is_grad_enabled()"])
        os.environ.clear()
        os.environ.update(environ)
        pytest.fail("the test left process-wide state changed (restored now): " + "; ".join(leaked), pytrace=False)


@pytest.fixture(autouse=True)
def no_hub_network(global_state_is_restored, tmp_path, monkeypatch):
    """No test reaches the real Hugging Face Hub: a dead endpoint and an empty, private cache
    (the environment reaches subprocesses, the constant this process's huggingface_hub)."""
    from huggingface_hub import constants

    cache = str(tmp_path / "hf-cache")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # without it huggingface_hub fetches a registry for its user agent once a process, from the endpoint it
    # read at import (the real Hub), whatever HF_ENDPOINT says later
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    # datasets' own cache (Parquet shards converted to Arrow): private too
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    if "datasets" in sys.modules:
        monkeypatch.setattr(sys.modules["datasets"].config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture
def torch_hub_dir(tmp_path):
    """A private torch.hub cache (where official releases are downloaded to)."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch-hub"))
    yield tmp_path / "torch-hub"
    torch.hub.set_dir(old)


def with_sources(info, *sources):
    """A registry entry whose default published weights come from ``sources`` instead."""
    import dataclasses

    return dataclasses.replace(info, pretrained=(dataclasses.replace(info.pretrained[0], sources=sources),))


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance of 2 CPUs for one test module (started before any test's state check)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A 3-epoch levit_128s digits run (32x32): trained weights for resume, export and agreement tests."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("digits") / "run"
    subprocess.run([sys.executable, "-m", "hybridvit", "train", "--epochs", "3", "--workers", "0", "--amp", "none", "--no-channels-last",
                    "--input-size", "32",
                    "--batch-size", "32", "--output", str(out)], check=True, capture_output=True)
    return out


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 1200.0) -> None:
    """Poll until ``predicate()`` holds (a condition the process makes observable, never a delay).
    Fails if the process ends first or after ``timeout`` seconds, a guard against a hang long
    enough for a machine whose every core is busy (the process is then stopped)."""
    start = time.monotonic()
    while not predicate():
        ended = proc.poll() is not None
        if ended or time.monotonic() - start > timeout:
            if not ended:
                proc.terminate()
            try:
                parts = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                parts = proc.communicate()
            output = "".join(part or "" for part in parts)[-3000:]
            pytest.fail(f"process ended (exit {proc.returncode}) first: {output}" if ended else
                        f"timed out after {timeout:.0f} s waiting for the process: {output}")
        time.sleep(0.05)


def read_progress(run: Path) -> dict:
    """A run's ``progress.json`` (an empty dict before its first write)."""
    path = run / "progress.json"
    return json.loads(path.read_text()) if path.exists() else {}


def reached(run: Path, epoch: int, step: int) -> Callable[[], bool]:
    """A ``wait_for`` condition: the run has done ``step`` steps of epoch ``epoch`` (or more)."""
    def check() -> bool:
        progress = read_progress(run)
        return (progress.get("epoch", -1), progress.get("step", -1)) >= (epoch, step)
    return check


def make_image_folder(root: Path, classes=("cat", "dog"), per_class=6, size=40, val_per_class: int | None = None,
                      corrupt: tuple[str, ...] = ()) -> Path:
    """An ImageNet-layout folder of small images whose class shows in the pixels (stripe direction
    and colour), in several modes and formats; ``corrupt`` names files (relative to ``root``) to
    write as garbage."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", per_class if val_per_class is None else val_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                w = size + i % 7
                yy, xx = np.mgrid[0:size, 0:w]
                stripes = ((xx if c % 2 else yy) // (2 + c)) % 2
                pixels = stripes[..., None] * np.array([60 + 60 * c, 200 - 50 * c, 90 + 20 * c])
                pixels = np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)
                mode = ["RGB", "L", "RGBA"][i % 3]
                ext = "png" if mode == "RGBA" or i % 2 else "jpg"
                Image.fromarray(pixels).convert(mode).save(folder / f"{i}.{ext}")
    for relative in corrupt:
        (root / relative).write_bytes(b"\xff\xd8 not really a jpeg")
    return root


@pytest.fixture(scope="session")
def recipe_folder(tmp_path_factory) -> Path:
    """211 training files (one corrupt) in 3 classes, 31 validation images (an odd last batch)."""
    root = tmp_path_factory.mktemp("recipe") / "data"
    make_image_folder(root, classes=("a", "b", "c"), per_class=70, val_per_class=10, corrupt=("train/b/bad.jpg",))
    Image.new("RGB", (40, 40), (10, 200, 30)).save(root / "val" / "c" / "extra.png")
    return root


def digits_folder(root: Path, count: int) -> Path:
    """ImageNet layout with ``count`` 8x8 training digits as PNGs (upscaled by the model's
    own preprocessing) and one file that is not an image."""
    from hybridvit.data.datasets import digits_split

    images, targets, train_idx, _ = digits_split()
    for i in train_idx[:count]:
        folder = root / "train" / str(targets[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((images[i] * 255 / 16).astype(np.uint8), mode="L").save(folder / f"{i}.png")
    (root / "train" / "3" / "broken.png").write_bytes(b"not a png")
    (root / "val").mkdir()  # never calibrated on
    return root
