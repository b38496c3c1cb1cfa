"""Checks of user-given values and output paths, run before any work is done.

Each raises one error whose message names the option and the value (or the path), so that the
command line can print it as one line (``ValueError`` for values; for paths the ``OSError``
subclass that says what is wrong: ``IsADirectoryError``, ``NotADirectoryError``,
``PermissionError``). Output files that exist are replaced, as ``torch.save``,
``torch.onnx.export`` and ``savefig`` do; a folder is never replaced by a file.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path


class BindError(OSError):
    """A server's address cannot be bound: a port in use, an address not on this machine (its own
    exit code on the command line, apart from bad values)."""


def check_range(option: str, value: float | None, low: float, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """``ValueError`` unless ``low <= value <= high`` (``<`` where open; no upper bound without
    ``high``); ``None`` (not given) passes. ``option`` is the command-line name, e.g. ``"lr"``."""
    if value is None:
        return
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high or (isinstance(value, float) and math.isnan(value)):
        if high is None:
            wanted = f"greater than {low:g}" if low_open else f"at least {low:g}"
        else:
            wanted = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        flag = "--" + "-".join(option.replace("_", " ").split())  # "max body mb" -> --max-body-mb
        raise ValueError(f"{flag} must be {wanted}; got {value:g}")


def _nearest_existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())


def _check_can_create_in(target: Path, folder: Path) -> None:
    """``target`` (absent) can be created below ``folder``: its nearest existing ancestor is a
    folder this process can write in (tried, not inferred from permission bits: root, read-only mounts)."""
    ancestor = _nearest_existing(folder.absolute())
    if not ancestor.is_dir():
        raise NotADirectoryError(f"cannot write {target}: {ancestor} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise PermissionError(f"cannot write {target}: {ancestor} is not writable ({e.strerror})") from None


def check_output_file(path: str | Path) -> Path:
    """``path`` as a file that can be written (created with its folders, or replaced)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name for the output")
    if path.exists():
        try:
            with path.open("ab"):  # opens for writing without changing it
                pass
        except OSError as e:
            raise PermissionError(f"cannot write {path} ({e.strerror})") from None
    else:
        _check_can_create_in(path, path.parent)
    return path


def check_output_folder(path: str | Path) -> Path:
    """``path`` as a folder that can be written into (created with its parents if absent)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; give a folder for the output")
    _check_can_create_in(path, path)
    return path
