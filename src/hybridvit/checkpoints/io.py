"""Reading checkpoint files safely, whatever wrapper they come in.

Never unpickles arbitrary objects: ``.safetensors`` files are read with safetensors and
everything else with ``torch.load(weights_only=True)``, which refuses pickles that would run code.
"""

from __future__ import annotations

import json
import pickle
import reprlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .errors import CheckpointError

_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class Checkpoint:
    """A state dict plus, for model folders, the folder's ``config.json`` (and Hugging Face's
    ``preprocessor_config.json``, which alone says the input size a CvT folder was trained at)."""

    state_dict: dict[str, torch.Tensor]
    path: Path
    folder_config: dict[str, Any] | None = None
    preprocessor_config: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def read_tensor_file(path: Path) -> Any:
    """The object in a safetensors or PyTorch file, read without running code; ``CheckpointError`` otherwise."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from e
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):  # neither torch.save's zip nor a pickle
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (nor safetensors): expected a .pth/.pt file "
                              f"written by torch.save, a .safetensors file or a model folder")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: not a weights-only PyTorch checkpoint. Either the file is corrupt, or "
            f"it holds pickled objects other than tensors and plain containers, and unpickling those "
            f"could run arbitrary code. Re-save just the state dict, or use safetensors."
        ) from e
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e


def unwrap_state_dict(obj: Any, path: Path | str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Strip ``{'model': ...}`` / ``{'state_dict': ...}`` wrappers and ``module.`` prefixes."""
    while isinstance(obj, dict):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: expected a state dict of tensors; these entries are not tensors: {not_tensors[:10]}")
    state = dict(obj)
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object {{...}}, found {type(value).__name__} {reprlib.repr(value)}")
    return value


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint file, or a model folder holding ``config.json`` and its weights."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        config_file = path / "config.json"
        weights = next((path / n for n in _WEIGHT_FILES if (path / n).exists()), None)
        if not config_file.exists() or weights is None:
            raise CheckpointError(
                f"{path}: a model folder needs config.json and one of {', '.join(_WEIGHT_FILES)}; "
                f"found {sorted(p.name for p in path.iterdir())}"
            )
        config = _read_json(config_file)
        preprocessor = path / "preprocessor_config.json"
        return Checkpoint(unwrap_state_dict(read_tensor_file(weights), weights), path, config,
                          _read_json(preprocessor) if preprocessor.exists() else None)
    return Checkpoint(unwrap_state_dict(read_tensor_file(path), path), path)
