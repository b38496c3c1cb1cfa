"""hybridvit's own format: a folder with ``model.safetensors`` and ``config.json``.

The config names the family and every architecture hyper-parameter, so ``load_model``
rebuilds the model without being told what it is. ``load_model`` also accepts any other
model folder a format knows how to describe (Hugging Face ``config.json``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from ..registry import family_model_class, find_variant
from .errors import CheckpointError
from .formats import NATIVE, detect_format, load_checkpoint
from .io import read_checkpoint

FORMAT_VERSION = 1


def save_model(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to folder ``path`` (weights as safetensors, architecture as JSON).

    ``extra`` (e.g. class names) is stored in ``config.json`` under ``"extra"``.
    """
    if getattr(model, "is_fused", False):
        raise ValueError("save the model before hybridvit.fuse(): a fused model has no BatchNorm "
                         "to restore, so it cannot be rebuilt for training or loaded as a checkpoint")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = {
        "format": NATIVE,
        "format_version": FORMAT_VERSION,
        "family": model.family,
        "model_name": getattr(model, "model_name", None),
        "config": model.config_dict(),
        "extra": extra or {},
    }
    # Write to temporary names and rename, so an interrupted save never leaves a torn folder.
    for name, write in (("model.safetensors", lambda f: save_file(state, f)),
                        ("config.json", lambda f: Path(f).write_text(json.dumps(config, indent=2)))):
        fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{name}.")
        os.close(fd)
        write(tmp)
        os.replace(tmp, path / name)
    return path


def load_model(path: str | Path) -> nn.Module:
    """Rebuild a model from a hybridvit folder (or a Hugging Face LeViT/CvT folder) and load its weights."""
    ckpt = read_checkpoint(path)
    if ckpt.folder_config is None:
        raise CheckpointError(f"{path}: load_model needs a model folder with config.json; for a bare "
                              f"weights file use hybridvit.create_model(name, checkpoint_path=path)")
    fmt = detect_format(ckpt)
    if fmt.config_from_folder is None:
        raise CheckpointError(f"{path}: {fmt.name} folders do not describe their architecture")
    model_class = family_model_class(fmt.family)
    config = fmt.config_from_folder(ckpt.folder_config, ckpt.state_dict)
    model = model_class(config)
    model.model_name = ckpt.folder_config.get("model_name") or find_variant(model_class, config)
    load_checkpoint(model, ckpt)
    return model.eval()


def read_extra(path: str | Path) -> dict[str, Any]:
    """The ``extra`` dict (e.g. class names) stored by ``save_model``."""
    config = json.loads((Path(path) / "config.json").read_text())
    return config.get("extra", {}) if config.get("format") == NATIVE else {}




def load_trained(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A model and its stored extras (class names, input size) from a model folder, a training
    run folder (its ``model/``) or a training ``checkpoint.pt``."""
    import torch

    path = Path(path)
    if path.is_dir() and not (path / "config.json").exists() and (path / "model" / "config.json").exists():
        path = path / "model"
    if path.is_dir():
        return load_model(path), read_extra(path)
    if not path.is_file():
        raise CheckpointError(f"no model at {path} (expected a model folder, a run folder or checkpoint.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable weights-only checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "model_config" not in state:
        raise CheckpointError(f"{path} is not a hybridvit training checkpoint; pass a model folder instead")
    model_class = family_model_class(state["model_family"])
    model = model_class(model_class.config_class(**state["model_config"]))
    model.model_name = state["model_name"]
    model.load_state_dict(state["model"])
    return model.eval(), state.get("extra", {})
