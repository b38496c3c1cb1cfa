"""What ``predict`` runs over: image files, folders, glob patterns, manifests and standard input,
listed lazily so that a collection of ten million files never sits in one list.

Each source given on the command line is, in this order of checks:

- ``-``: paths on standard input, one per line;
- a folder: every file under it with an image extension Pillow opens, recursively, each folder's
  entries in sorted order; linked folders are followed, each real folder listed once (a link
  back up the tree is not followed again);
- a manifest: a ``.txt``/``.lst`` file (one path per line; blank lines and ``#`` comments
  skipped) or a ``.csv``/``.tsv``/``.parquet`` table with a ``path`` column (or ``image``,
  ``file``, ``filepath``, or its only column). Relative paths are relative to the manifest's folder.
  Text manifests are read as UTF-8 (a byte-order mark is skipped);
- any other existing file: itself;
- a glob pattern (``*``, ``?``, ``[``; ``**`` spans folders): its matches, in the file system's order.

A path that names nothing, and a pattern that matches nothing, is passed on as it is, so that it
becomes an error row of its own ("no such file") rather than ending the run or vanishing.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

from ..data.datasets import image_extensions
from ..data.manifests import MANIFEST_LINES, check_utf8, is_table, manifest_paths, named_errors, open_text, text_lines


def iter_inputs(sources: Iterable[str | Path], stdin: TextIO | None = None) -> Iterator[str]:
    """Every image path the ``sources`` name, one at a time (see the module docstring)."""
    extensions = image_extensions()
    for source in sources:
        source = str(source)
        if source == "-":
            yield from text_lines(stdin or sys.stdin, None)
        elif os.path.isdir(source):
            yield from _walk(source, extensions)
        elif os.path.isfile(source) and source.lower().endswith(MANIFEST_LINES):
            with open_text(source) as f:
                yield from named_errors(source, text_lines(f, os.path.dirname(source)))
        elif os.path.isfile(source) and is_table(source):
            yield from manifest_paths(source)
        elif os.path.exists(source) or not glob.has_magic(source):
            yield source
        else:
            yield from _matches(source)


def _matches(pattern: str) -> Iterator[str]:
    """A pattern's matches; the pattern itself (an error row) when it matches nothing."""
    matched = False
    for path in glob.iglob(pattern, recursive=True):
        matched = True
        yield path
    if not matched:
        yield pattern


def _walk(folder: str, extensions: set[str]) -> Iterator[str]:
    """Image files under ``folder``, following linked folders; a real folder is entered once."""
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        stat = os.stat(root)
        if (stat.st_dev, stat.st_ino) in seen:  # a loop, or a second link to a folder listed already
            dirs.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirs.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in extensions:
                yield os.path.join(root, name)


def check_sources(sources: Iterable[str | Path]) -> None:
    """Refuse, before any model loads, what cannot be listed: a manifest that is not UTF-8 text
    (read through once), a table that is not one or has no path column, or ``-`` given twice."""
    sources = [str(s) for s in sources]
    if sources.count("-") > 1:
        raise ValueError("'-' (paths on standard input) can be given once")
    for source in sources:
        if not os.path.isfile(source):
            continue
        if source.lower().endswith(MANIFEST_LINES + (".csv", ".tsv")):
            check_utf8(source)
        if is_table(source):
            next(iter(manifest_paths(source)), None)
    if not sources:
        raise ValueError("no images given: name files, folders, glob patterns, a manifest, or - for standard input")
