"""hybridvit's own format: a folder with ``model.safetensors`` and ``config.json``.

The config names the family and every architecture hyper-parameter, so ``load_model``
rebuilds the model without being told what it is. ``load_model`` also accepts any other
model folder a format knows how to describe (Hugging Face ``config.json``).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from ..registry import family_model_class, find_variant
from .errors import CheckpointError
from .formats import FORMAT_VERSION, NATIVE, config_from_values, detect_format, load_checkpoint, native_format, register_format
from .hf_folder import foreign_extra
from .hub import HUB_PREFIX, download_hub_folder, parse_hub_name
from .io import read_checkpoint, read_tensor_file

_FILES = ("model.safetensors", "config.json")


def save_model(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to folder ``path`` (weights as safetensors, architecture as JSON).

    ``extra`` (e.g. class names) is stored in ``config.json`` under ``"extra"``.
    """
    if getattr(model, "is_fused", False):
        raise ValueError("save the model before hybridvit.fuse(): a fused model has no BatchNorm "
                         "to restore, so it cannot be rebuilt for training or loaded as a checkpoint")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file; save_model writes a folder")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = {
        "format": NATIVE,
        "format_version": FORMAT_VERSION,
        "family": model.family,
        "model_name": getattr(model, "model_name", None),
        "config": model.config_dict(),
        "extra": extra or {},
    }
    # Written as a whole new folder, then swapped in: an interrupted save never leaves weights
    # and config.json from different models, nor a folder with one of them missing.
    path.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.new."))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(new, 0o777 & ~umask)  # mkdtemp's folder is private; the saved one gets the usual permissions
    try:
        save_file(state, str(new / "model.safetensors"))
        (new / "config.json").write_text(json.dumps(config, indent=2))
        for f in new.iterdir():
            _fsync(f)
        _swap_in(new, path)
    finally:
        shutil.rmtree(new, ignore_errors=True)  # after a swap: the previous folder
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2  # Linux renameat2 flag: swap two paths atomically


def _swap_in(new: Path, path: Path) -> None:
    """Put folder ``new`` at ``path``; an existing folder's other files (e.g. exports) are kept."""
    if not path.exists():
        os.rename(new, path)
        return
    for entry in path.iterdir():
        if entry.name not in _FILES and not entry.name.startswith("."):
            target = new / entry.name
            if entry.is_dir():
                shutil.copytree(entry, target)
            else:
                try:
                    os.link(entry, target)
                except OSError:
                    shutil.copy2(entry, target)
    libc = ctypes.CDLL(None, use_errno=True)
    at_cwd = -100
    if hasattr(libc, "renameat2") and libc.renameat2(at_cwd, os.fsencode(new), at_cwd, os.fsencode(path),
                                                      _RENAME_EXCHANGE) == 0:
        _fsync(path.parent)
        return
    # No atomic exchange here (not Linux, or the file system lacks it): two renames, old folder kept until then.
    old = new.with_name(new.name.replace(".new.", ".old."))
    os.rename(path, old)
    os.rename(new, path)
    os.rename(old, new)
    _fsync(path.parent)


def resolve_folder(source: str | Path) -> Path:
    """A local path, or the cached download of ``"hf-hub:ORG/NAME[@REVISION]"``."""
    if str(source).startswith(HUB_PREFIX):
        return download_hub_folder(*parse_hub_name(source))
    return Path(source)


def load_model(path: str | Path) -> nn.Module:
    """Rebuild a model from a model folder and load its weights: a hybridvit folder, a Hugging Face
    (transformers) or timm LeViT/CvT folder, or ``"hf-hub:ORG/NAME[@REVISION]"`` for one on the Hub."""
    ckpt = read_checkpoint(resolve_folder(path))
    if ckpt.folder_config is None:
        raise CheckpointError(f"{path}: load_model needs a model folder with config.json; for a bare "
                              f"weights file use hybridvit.create_model(name, checkpoint_path=path)")
    fmt = detect_format(ckpt)
    if fmt.config_from_folder is None:
        raise CheckpointError(f"{path}: {fmt.name} folders do not describe their architecture")
    model_class = family_model_class(fmt.family)
    config = fmt.config_from_folder(ckpt)
    try:
        model = model_class(config)
    except (ArithmeticError, RuntimeError, ValueError) as e:  # values each valid alone, e.g. key_dim 0
        raise CheckpointError(f"{path}: cannot build the model its config.json describes ({type(e).__name__}: {e})") from e
    pushed = ckpt.folder_config.get("hybridvit") or {}  # a transformers folder written by push_to_hub
    model.model_name = ckpt.folder_config.get("model_name") or pushed.get("model_name") or find_variant(model_class, config)
    load_checkpoint(model, ckpt)
    return model.eval()


def read_extra(path: str | Path) -> dict[str, Any]:
    """A model folder's class names and preprocessing: the ``extra`` dict ``save_model`` stored,
    or what a Hugging Face or timm folder says (``id2label``, its image processor or pretrained_cfg)."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if config.get("format") == NATIVE:
        return config.get("extra", {})
    if isinstance(config.get("hybridvit"), dict):  # a transformers folder written by push_to_hub
        return config["hybridvit"].get("extra", {})
    pre_file = path / "preprocessor_config.json"
    return foreign_extra(config, json.loads(pre_file.read_text()) if pre_file.exists() else {})


def load_trained(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A model and its stored extras (class names, input size) from a model folder (local or
    ``hf-hub:ORG/NAME``), a training run folder (its ``model/``) or a training ``checkpoint.pt``
    (its trained, not EMA, weights)."""
    path = resolve_folder(path)
    if path.is_dir() and not (path / "config.json").exists() and (path / "model" / "config.json").exists():
        path = path / "model"
    if path.is_dir():
        return load_model(path), read_extra(path)
    if not path.is_file():
        raise CheckpointError(f"no model at {path} (expected a model folder, a run folder or checkpoint.pt)")
    state = read_tensor_file(path)
    if not isinstance(state, dict) or "model_config" not in state:
        raise CheckpointError(f"{path} is not a hybridvit training checkpoint; pass a model folder instead")
    model_class = family_model_class(state["model_family"])
    model = model_class(config_from_values(model_class.config_class, state["model_config"], path))
    model.model_name = state["model_name"]
    model.load_state_dict(state["model"])
    return model.eval(), state.get("extra", {})


# The grafted models exist only in hybridvit's format: folders say their family; bare weight
# files are recognised by the ResNet trunk.
register_format(native_format("graft", "trunk.conv1.weight"))
