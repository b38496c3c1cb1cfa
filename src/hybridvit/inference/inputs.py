"""What ``predict`` runs over: image files, folders, glob patterns, manifests and standard input,
listed lazily so that a collection of ten million files never sits in one list.

Each source given on the command line is, in this order of checks:

- ``-``: paths on standard input, one per line;
- a folder: every file under it with an image extension Pillow opens, recursively, each folder's
  entries in sorted order;
- a manifest: a ``.txt``/``.lst`` file (one path per line; blank lines and ``#`` comments
  skipped) or a ``.csv``/``.tsv``/``.parquet`` table with a ``path`` column (or ``image``,
  ``file``, ``filepath``, or its only column). Relative paths are relative to the manifest's folder;
- any other existing file: itself;
- a glob pattern (``*``, ``?``, ``[``; ``**`` spans folders): its matches, in the file system's order.

A path that names nothing is passed on as it is, so that it becomes an error row of its own
("no such file") rather than ending the run.
"""

from __future__ import annotations

import csv
import glob
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

from ..data.datasets import image_extensions

MANIFEST_LINES = (".txt", ".lst")
MANIFEST_TABLES = (".csv", ".tsv", ".parquet")
PATH_COLUMNS = ("path", "image", "file", "filepath")


def iter_inputs(sources: Iterable[str | Path], stdin: TextIO | None = None) -> Iterator[str]:
    """Every image path the ``sources`` name, one at a time (see the module docstring)."""
    extensions = image_extensions()
    for source in sources:
        source = str(source)
        if source == "-":
            yield from _lines(stdin or sys.stdin, None)
        elif os.path.isdir(source):
            yield from _walk(source, extensions)
        elif os.path.isfile(source) and source.lower().endswith(MANIFEST_LINES):
            with open(source, encoding="utf-8") as f:
                yield from _lines(f, os.path.dirname(source))
        elif os.path.isfile(source) and source.lower().endswith(MANIFEST_TABLES):
            yield from _table(source)
        elif os.path.exists(source) or not glob.has_magic(source):
            yield source
        else:
            yield from glob.iglob(source, recursive=True)


def _walk(folder: str, extensions: set[str]) -> Iterator[str]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in extensions:
                yield os.path.join(root, name)


def relative_to(folder: str | None, path: str) -> str:
    """A manifest's ``path`` read from ``folder`` (absolute paths and standard input as they are)."""
    return path if folder is None or os.path.isabs(path) else os.path.join(folder, path)


def _lines(f: TextIO, folder: str | None) -> Iterator[str]:
    for line in f:
        path = line.rstrip("\r\n")
        if path.strip() and not path.lstrip().startswith("#"):
            yield relative_to(folder, path)


def path_column(columns: list[str], manifest: str) -> str:
    """The manifest column that holds the image paths; ``ValueError`` naming the columns if none."""
    for name in PATH_COLUMNS:
        if name in columns:
            return name
    if len(columns) == 1:
        return columns[0]
    raise ValueError(f"{manifest}: no column of image paths (named one of {', '.join(PATH_COLUMNS)}); "
                     f"its columns are {columns}")


def _table(manifest: str) -> Iterator[str]:
    folder = os.path.dirname(manifest)
    if manifest.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.ParquetFile(manifest)
        column = path_column(table.schema_arrow.names, manifest)
        for batch in table.iter_batches(columns=[column], batch_size=65536):
            for path in batch.column(0).to_pylist():
                if path:
                    yield relative_to(folder, path)
        return
    with open(manifest, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t" if manifest.lower().endswith(".tsv") else ",")
        header = next(reader, None)
        if header is None:
            return
        index = header.index(path_column(header, manifest))
        for row in reader:
            if len(row) > index and row[index]:
                yield relative_to(folder, row[index])


def check_sources(sources: Iterable[str | Path]) -> None:
    """Refuse, before any model loads, what cannot be listed: a manifest without a path column,
    or ``-`` given twice."""
    sources = [str(s) for s in sources]
    if sources.count("-") > 1:
        raise ValueError("'-' (paths on standard input) can be given once")
    for source in sources:
        if os.path.isfile(source) and source.lower().endswith(MANIFEST_TABLES):
            next(iter(_table(source)), None)
    if not sources:
        raise ValueError("no images given: name files, folders, glob patterns, a manifest, or - for standard input")
