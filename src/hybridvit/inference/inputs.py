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

import codecs
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
            with _open_text(source) as f:
                yield from _named_errors(source, _lines(f, os.path.dirname(source)))
        elif os.path.isfile(source) and source.lower().endswith(MANIFEST_TABLES):
            yield from _table(source)
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


def _open_text(manifest: str) -> TextIO:
    """A text manifest, UTF-8 with or without a byte-order mark (a spreadsheet's CSV export has one)."""
    return open(manifest, newline="", encoding="utf-8-sig")


def _named_errors(manifest: str, rows: Iterator[str]) -> Iterator[str]:
    """``rows`` of ``manifest``, a manifest that is not UTF-8 text refused with its name."""
    try:
        yield from rows
    except UnicodeDecodeError:
        raise ValueError(f"{manifest}: not UTF-8 text: save the manifest as UTF-8") from None


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
    if manifest.lower().endswith(".parquet"):
        yield from _parquet(manifest)
        return
    with _open_text(manifest) as f:
        yield from _named_errors(manifest, _csv_rows(manifest, f))


def _csv_rows(manifest: str, f: TextIO) -> Iterator[str]:
    folder = os.path.dirname(manifest)
    reader = csv_reader(f, delimiter="\t" if manifest.lower().endswith(".tsv") else ",")
    header = next(reader, None)
    if header is None:
        return
    index = header.index(path_column(header, manifest))
    for row in reader:
        if len(row) > index and row[index]:
            yield relative_to(folder, row[index])


def csv_reader(f: TextIO, delimiter: str = ",") -> Iterator[list[str]]:
    """``csv.reader`` without its 128 KiB field limit: a long field is a bad path (an error row),
    not a reason to stop reading."""
    csv.field_size_limit(2**31 - 1)
    return csv.reader(f, delimiter=delimiter)


def _parquet(manifest: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(manifest)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{manifest}: not a Parquet file ({e})") from None
    column = path_column(table.schema_arrow.names, manifest)
    kind = table.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):  # null: empty
        raise ValueError(f"{manifest}: the column {column!r} holds {kind}, not paths (strings)")
    folder = os.path.dirname(manifest)
    for batch in table.iter_batches(columns=[column], batch_size=65536):
        for path in batch.column(0).to_pylist():
            if path:
                yield relative_to(folder, path)


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
            _check_utf8(source)
        if source.lower().endswith(MANIFEST_TABLES):
            next(iter(_table(source)), None)
    if not sources:
        raise ValueError("no images given: name files, folders, glob patterns, a manifest, or - for standard input")


def _check_utf8(manifest: str) -> None:
    """``ValueError`` naming the line of the first byte that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = 1
    with open(manifest, "rb") as f:
        while block := f.read(1 << 20):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                line = lines + block.count(b"\n", 0, max(e.start, 0))
                raise ValueError(f"{manifest}: line {line} is not UTF-8 text (byte 0x{e.object[e.start]:02x}): "
                                 "save the manifest as UTF-8") from None
            lines += block.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(f"{manifest}: ends inside a UTF-8 character: save the manifest as UTF-8") from None
