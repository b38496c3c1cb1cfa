"""Tables of images, read the same way by ``predict`` and ``train``: CSV, TSV and Parquet
manifests (a column of paths, and for training a column of labels), text lists of paths, and
Parquet shards as the Hugging Face Hub stores image datasets (an ``image`` column of
``{bytes, path}`` structs).

Relative paths are relative to the manifest's folder. Text is UTF-8, with or without a
byte-order mark (a spreadsheet's CSV export has one); a manifest that cannot be read is refused
by name (and line, for text) before any work.
"""

from __future__ import annotations

import codecs
import csv
import os
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

MANIFEST_LINES = (".txt", ".lst")
MANIFEST_TABLES = (".csv", ".tsv", ".parquet")
PATH_COLUMNS = ("path", "image", "file", "filepath", "img", "filename")
LABEL_COLUMNS = ("label", "labels", "class", "target", "category")


def is_table(path: str) -> bool:
    return path.lower().endswith(MANIFEST_TABLES)


def relative_to(folder: str | None, path: str) -> str:
    """A manifest's ``path`` read from ``folder`` (absolute paths and standard input as they are)."""
    return path if folder is None or os.path.isabs(path) else os.path.join(folder, path)


def open_text(manifest: str) -> TextIO:
    return open(manifest, newline="", encoding="utf-8-sig")


def named_errors(manifest: str, rows: Iterator[Any]) -> Iterator[Any]:
    """``rows`` of ``manifest``, a manifest that is not UTF-8 text refused with its name."""
    try:
        yield from rows
    except UnicodeDecodeError:
        raise ValueError(f"{manifest}: not UTF-8 text: save the manifest as UTF-8") from None


def check_utf8(manifest: str) -> None:
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


def csv_reader(f: TextIO, delimiter: str = ",") -> Iterator[list[str]]:
    """``csv.reader`` without its 128 KiB field limit: a long field is a bad path (an error row),
    not a reason to stop reading."""
    csv.field_size_limit(2**31 - 1)
    return csv.reader(f, delimiter=delimiter)


def text_lines(f: TextIO, folder: str | None) -> Iterator[str]:
    """Paths of a text list (blank lines and ``#`` comments skipped)."""
    for line in f:
        path = line.rstrip("\r\n")
        if path.strip() and not path.lstrip().startswith("#"):
            yield relative_to(folder, path)


def pick_column(columns: Sequence[str], manifest: str, what: str, known: Sequence[str], given: str | None = None,
                only: bool = False) -> str:
    """The column that holds ``what``: ``given`` (which must exist), else the first of ``known``
    present (or the only column, with ``only``); ``ValueError`` naming the columns if none."""
    if given is not None:
        if given not in columns:
            raise ValueError(f"{manifest}: no column {given!r}; its columns are {list(columns)}")
        return given
    for name in known:
        if name in columns:
            return name
    if only and len(columns) == 1:
        return columns[0]
    option = "--path-column" if what == "image paths" else "--label-column"
    raise ValueError(f"{manifest}: no column of {what} (named one of {', '.join(known)}; or name it with {option}); "
                     f"its columns are {list(columns)}")


def path_column(columns: Sequence[str], manifest: str, given: str | None = None) -> str:
    return pick_column(columns, manifest, "image paths", PATH_COLUMNS, given, only=True)


def label_column(columns: Sequence[str], manifest: str, given: str | None = None) -> str:
    return pick_column(columns, manifest, "labels", LABEL_COLUMNS, given)


def table_columns(manifest: str) -> list[str]:
    """A table's column names (a CSV/TSV header row, a Parquet schema)."""
    if manifest.lower().endswith(".parquet"):
        return list(parquet_file(manifest).schema_arrow.names)
    with open_text(manifest) as f:
        return next(named_errors(manifest, iter(csv_reader(f, _delimiter(manifest)))), [])


def read_table(manifest: str, columns: Sequence[str]) -> Iterator[tuple[Any, ...]]:
    """The values of ``columns`` (names ``table_columns`` gives) row by row: strings from text
    tables; from Parquet, what the column holds (strings, numbers, lists, image structs)."""
    if manifest.lower().endswith(".parquet"):
        table = parquet_file(manifest)
        for batch in table.iter_batches(columns=list(columns), batch_size=4096):
            yield from zip(*(batch.column(i).to_pylist() for i in range(len(columns))))
        return
    with open_text(manifest) as f:
        yield from named_errors(manifest, _csv_rows(manifest, f, columns))


def _delimiter(manifest: str) -> str:
    return "\t" if manifest.lower().endswith(".tsv") else ","


def _csv_rows(manifest: str, f: TextIO, columns: Sequence[str]) -> Iterator[tuple[str, ...]]:
    reader = csv_reader(f, _delimiter(manifest))
    header = next(reader, None)
    if header is None:
        return
    indices = [header.index(c) for c in columns]
    for row in reader:
        yield tuple(row[i] if i < len(row) else "" for i in indices)


def parquet_file(manifest: str) -> Any:
    """A ``pyarrow.parquet.ParquetFile``; ``ValueError`` naming a file that is not one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(manifest)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{manifest}: not a Parquet file ({e})") from None


def manifest_paths(manifest: str, column: str | None = None) -> Iterator[str]:
    """The image paths of a table, relative ones taken from its folder; ``ValueError`` for a
    Parquet column that does not hold paths."""
    name = path_column(table_columns(manifest), manifest, column)
    if manifest.lower().endswith(".parquet"):
        import pyarrow as pa

        kind = parquet_file(manifest).schema_arrow.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):  # null: empty
            raise ValueError(f"{manifest}: the column {name!r} holds {kind}, not paths (strings)")
    folder = os.path.dirname(manifest)
    for (path,) in read_table(manifest, [name]):
        if path:
            yield relative_to(folder, path)
