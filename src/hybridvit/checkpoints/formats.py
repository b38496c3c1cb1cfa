"""Checkpoint formats: detection, conversion to hybridvit keys, and strict loading.

Each family module registers one ``CheckpointFormat`` per foreign layout it understands
(official release, timm, Hugging Face) plus hybridvit's own. ``load_checkpoint`` detects the
format from the keys (or the folder's config), converts, and loads strictly with one
readable error listing every problem.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import reprlib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from ..layers import AttentionBias, resize_bias_table
from ..registry import architecture, family_model_class
from .errors import CheckpointError
from .io import Checkpoint, read_checkpoint

StateDict = dict[str, torch.Tensor]
NATIVE = "hybridvit"
# The version of hybridvit's config.json this code writes and the newest it reads: a newer file may
# hold settings this code would silently ignore or misread.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CheckpointFormat:
    """How to recognise one layout and turn it into hybridvit's keys."""

    name: str
    family: str
    marker_key: str  # a key only this layout has
    convert: Callable[[StateDict, nn.Module], StateDict]
    # For model folders: the folder's config.json (and weights) -> the family's config dataclass.
    config_from_folder: Callable[[Checkpoint], Any] | None = None
    # The other way (formats other libraries load): a model -> (the folder's config.json, state dict).
    to_folder: Callable[[nn.Module], tuple[dict[str, Any], StateDict]] | None = None

    def matches(self, ckpt: Checkpoint) -> bool:
        folder = ckpt.folder_config or {}
        if self.name == NATIVE and folder.get("format") == NATIVE:  # a hybridvit folder says its family
            return folder.get("family") == self.family
        return self.marker_key in ckpt.state_dict


_FORMATS: list[CheckpointFormat] = []


def register_format(fmt: CheckpointFormat) -> CheckpointFormat:
    _FORMATS.append(fmt)
    return fmt


def registered_formats() -> list[CheckpointFormat]:
    return list(_FORMATS)


def detect_format(ckpt: Checkpoint) -> CheckpointFormat:
    """The registered format whose marker key the checkpoint holds (a hybridvit folder: its family)."""
    if (ckpt.folder_config or {}).get("format") == NATIVE:
        _check_native_header(ckpt)
    for fmt in _FORMATS:
        if fmt.matches(ckpt):
            return fmt
    sample = ", ".join(list(ckpt.state_dict)[:5])
    known = ", ".join(dict.fromkeys(f.name for f in _FORMATS))
    raise CheckpointError(f"{ckpt.path}: unrecognised checkpoint layout (first keys: {sample}); known formats: {known}")


def rename_keys(state: StateDict, prefixes: list[tuple[str, str]]) -> StateDict:
    """Replace the longest matching prefix of every key; keys with no match are kept as they are."""
    ordered = sorted(prefixes, key=lambda p: len(p[0]), reverse=True)
    out: StateDict = {}
    for key, value in state.items():
        for old, new in ordered:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def remap_bias_tables(state: StateDict, model: nn.Module, index_suffix: str = ".index") -> StateDict:
    """Reorder attention-bias tables that come with their own index buffers into hybridvit's order.

    A foreign table ``T`` with index ``I`` gives the bias ``T[:, I]``; we pick, for each of
    our columns, the foreign column at any position where our index points to it, then
    check that the whole gathered bias is reproduced, so a permuted table cannot load silently.
    """
    out = {k: v for k, v in state.items() if not k.endswith(index_suffix)}
    for key in (k for k in state if k.endswith(index_suffix)):
        prefix = key[: -len(index_suffix)]
        table_key = prefix + ".table"
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            continue  # reported as unexpected by the strict load
        if not isinstance(module, AttentionBias) or table_key not in out:
            continue
        src_index, dst_index = state[key].long(), module.index
        table = out[table_key]
        if src_index.shape != dst_index.shape:
            continue  # a grid change: handled by resampling in load_state_dict
        first = torch.full((module.table.shape[1],), -1, dtype=torch.long)
        first.scatter_(0, dst_index.flatten(), src_index.flatten())
        if (first < 0).any() or not torch.equal(table[:, first][:, dst_index], table[:, src_index]):
            raise CheckpointError(f"{prefix}: the checkpoint's attention-bias index does not describe "
                                  f"LeViT's |dy|,|dx| offsets; refusing to load a permuted bias table")
        out[table_key] = table[:, first]
    return out


def learnt_grids(family: str, config: Any) -> dict[str, tuple[int, int]]:
    """The grids the model ``config`` describes learns its tables on (built on meta): every
    attention-bias table's key grid and every position embedding's grid, by module name."""
    with torch.device("meta"):
        model = family_model_class(family)(config)
    grids = {name: m.key_grid for name, m in model.named_modules() if isinstance(m, AttentionBias)}
    grids.update({name: tuple(m.pos_grid) for name, m in model.named_modules() if isinstance(getattr(m, "pos_embed", None), nn.Parameter)})
    return grids


def _resize_pos_embeds(model: nn.Module, state: StateDict, source_grids: dict[str, tuple[int, int]] | None) -> None:
    """Resample position embeddings trained at another input size, in place (bicubic, as the
    models do at run time); the prefix tokens (class, distillation) are kept as they are."""
    for name, module in model.named_modules():
        ours = getattr(module, "pos_embed", None)
        key = f"{name}.pos_embed" if name else "pos_embed"
        if not isinstance(ours, nn.Parameter) or key not in state or state[key].shape == ours.shape:
            continue
        theirs, prefix = state[key], getattr(module, "num_prefix_tokens", 0)
        if theirs.ndim != 3 or theirs.shape[-1] != ours.shape[-1]:
            continue  # reported by the strict load
        grid = (source_grids or {}).get(name) or _square_grid(theirs.shape[1] - prefix, key)
        state[key] = resample_abs_pos_embed(theirs, list(module.pos_grid), list(grid), num_prefix_tokens=prefix)


def _square_grid(cells: int, key: str) -> tuple[int, int]:
    """The grid of a table from a bare state dict, which only tells its size: square, or an error."""
    side = math.isqrt(cells)
    if side * side != cells:
        raise CheckpointError(f"{key}: the checkpoint's {cells}-cell table comes from a non-square grid that a bare "
                              f"state dict does not name; load its model folder or training checkpoint (they store img_size)")
    return side, side


def _resize_bias_tables(model: nn.Module, state: StateDict, source_grids: dict[str, tuple[int, int]] | None) -> None:
    """Resample attention-bias tables trained on another key grid, in place.

    The checkpoint's grids come from its config when it has one (any shape, square or not);
    a bare state dict only tells how many entries a table has, so its grid must be square.
    """
    for name, module in model.named_modules():
        key = f"{name}.table"
        if not isinstance(module, AttentionBias) or key not in state or state[key].shape[0] != module.table.shape[0]:
            continue  # a head-count mismatch is reported by the strict load
        table = state[key]
        grid = (source_grids or {}).get(name)
        if grid is None:
            if table.shape == module.table.shape:
                continue
            grid = _square_grid(table.shape[1], key)
        if grid != module.key_grid:
            state[key] = resize_bias_table(table, grid, module.key_grid)


def load_state_dict(model: nn.Module, state: StateDict, exclude_head: bool = False,
                    source_grids: dict[str, tuple[int, int]] | None = None) -> None:
    """Load hybridvit-keyed ``state`` strictly; one ``CheckpointError`` lists every problem.

    ``source_grids`` (from ``learnt_grids``) names the grids ``state``'s attention biases and position
    embeddings were trained on; without it a table must come from a square grid.
    """
    state = dict(state)
    _resize_bias_tables(model, state, source_grids)
    _resize_pos_embeds(model, state, source_grids)
    expected = model.state_dict()
    head_names: tuple[str, ...] = getattr(model, "head_names", ())

    def is_head(key: str) -> bool:
        return any(key.startswith(h + ".") for h in head_names)

    if exclude_head:
        state = {k: v for k, v in state.items() if not is_head(k)}
        expected = {k: v for k, v in expected.items() if not is_head(k)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint does not fit {getattr(model, 'describe', lambda: type(model).__name__)()}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}")
        for k in mismatched[:20]:
            lines.append(f"  shape mismatch {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}")
        problems = missing + unexpected + mismatched
        if problems and all(is_head(k) for k in problems):
            ckpt_classes = next((state[k].shape[0] for k in state if is_head(k) and k.endswith("linear.weight")), None)
            lines.append(
                f"  only the classifier differs: create the model with num_classes={ckpt_classes} "
                f"(and distillation matching the checkpoint), or load with exclude_head=True and then "
                f"call model.reset_classifier(num_classes)"
            )
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=not exclude_head)


def _check_native_header(ckpt: Checkpoint) -> None:
    """A hybridvit ``config.json`` must name a known family and a format version this code reads."""
    folder, where = ckpt.folder_config or {}, ckpt.path / "config.json"
    version = folder.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f'{where}: "format_version" must be a whole number from 1, got {version!r}')
    if version > FORMAT_VERSION:
        raise CheckpointError(f'{where}: "format_version" {version} is newer than this hybridvit reads (up to '
                              f'{FORMAT_VERSION}); upgrade hybridvit to load it')
    try:
        family_model_class(folder.get("family"))
    except ValueError as e:
        raise CheckpointError(f'{where}: "family": {e}') from None


def native_folder_config(ckpt: Checkpoint) -> Any:
    """The config dataclass a hybridvit ``config.json`` describes (its header checked by ``detect_format``)."""
    folder_config = ckpt.folder_config or {}
    model_class = family_model_class(folder_config["family"])
    return config_from_values(model_class.config_class, folder_config.get("config"), ckpt.path / "config.json")


def config_from_values(config_class: type, values: Any, where: str | Path) -> Any:
    """The ``config_class`` instance stored ``values`` describe (a ``config.json``'s ``"config"``, a
    training checkpoint's), each field checked against the dataclass's annotations first, so a
    wrong value is named with the file instead of failing deep inside the model's construction.
    Sizes, counts, ratios and rates are never negative."""
    name = config_class.__name__
    if not isinstance(values, dict):
        raise CheckpointError(f'{where}: "config" must be an object of {name} fields, got {reprlib.repr(values)}')
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise CheckpointError(f"{where}: {name} has no field(s) {', '.join(unknown)}; its fields: {', '.join(fields)}")
    missing = [n for n, f in fields.items() if n not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise CheckpointError(f"{where}: {name} field(s) missing: {', '.join(missing)}")
    hints = typing.get_type_hints(config_class)
    for key, value in values.items():
        if not _fits(value, hints[key]):
            raise CheckpointError(f'{where}: "config.{key}" is {reprlib.repr(value)}, expected {_type_name(hints[key])}')
        if any(number < 0 for number in _numbers(value)):
            raise CheckpointError(f'{where}: "config.{key}" is {reprlib.repr(value)}; it cannot be negative')
    try:
        return config_class(**values)
    except (TypeError, ValueError) as e:  # the config's own checks (choices, lengths)
        raise CheckpointError(f"{where}: {e}") from e


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value can stand for a field annotated ``hint`` (a list for a tuple, an int for a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, arm) for arm in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(map(_fits, value, args))
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, numbers.Integral if hint is int else numbers.Real) and not isinstance(value, bool)
    if hint is type(None):
        return value is None
    return hint is Any or not isinstance(hint, type) or isinstance(value, hint)  # str (other annotations: unchecked)


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("NoneType", "None")


def _numbers(value: Any) -> list[float]:
    """Every number in a (possibly nested) value, booleans excepted."""
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _numbers(v)]
    return [value] if isinstance(value, numbers.Real) and not isinstance(value, bool) else []


def hf_image_size(preprocessor: dict[str, Any] | None) -> int | tuple[int, int] | None:
    """The input size a Hugging Face image processor config names (crop, else resize target), if any."""
    pre = preprocessor or {}
    for key in ("crop_size", "size"):
        value = pre.get(key)
        if isinstance(value, int):
            return value
        if isinstance(value, dict) and "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        if isinstance(value, dict) and "shortest_edge" in value:
            return int(value["shortest_edge"])
    return None


def native_format(family: str, marker_key: str) -> CheckpointFormat:
    """hybridvit's own keys for one family: nothing to convert."""
    return CheckpointFormat(NATIVE, family, marker_key, lambda state, model: state, native_folder_config)


def load_checkpoint(model: nn.Module, source: str | Path | Checkpoint, exclude_head: bool = False) -> str:
    """Load any supported checkpoint file or folder into ``model``; returns the detected format name.

    ``exclude_head=True`` loads everything but the classifier (fine-tuning to new classes).
    """
    ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    path = ckpt.path
    fmt = detect_format(ckpt)
    family = getattr(model, "family", None)
    if fmt.family != family:
        raise CheckpointError(f"{path}: this is a {fmt.family} checkpoint ({fmt.name}); the model is {family}")
    source_grids = None
    if ckpt.folder_config is not None and fmt.config_from_folder is not None:
        source_config = fmt.config_from_folder(ckpt)
        _check_same_architecture(model, source_config, path)
        source_grids = learnt_grids(fmt.family, source_config)
    state = fmt.convert(ckpt.state_dict, model)
    load_state_dict(model, state, exclude_head=exclude_head, source_grids=source_grids)
    return fmt.name


def _check_same_architecture(model: nn.Module, folder_config: Any, path: str | Path) -> None:
    """A folder says what it holds: refuse a different architecture before comparing keys."""
    ours, theirs = architecture(model.config), architecture(folder_config)  # type: ignore[attr-defined]
    diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
    if diff:
        details = ", ".join(f"{k}: folder {a} vs model {b}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{path}: the folder holds a different architecture ({details}); "
                              f"use hybridvit.load_model(path) to build the model it describes")
