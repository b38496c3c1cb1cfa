"""Prediction files written as a run goes, and finished by ``--resume`` after any kill.

- ``.csv``: ``path, error, class_1, probability_1, ... class_k, probability_k`` (and ``embedding``,
  a JSON list). ``.jsonl``: one object per image, ``{"path", "top": [{"class", "probability"}],
  "embedding"}`` or ``{"path", "error"}``. Both are flushed after every batch; a kill can leave
  at most a partial last line, which ``--resume`` cuts off.
- ``.parquet`` (through pyarrow): ``path``, ``error``, ``classes`` and ``probabilities`` (lists,
  best first) and ``embedding`` (a fixed-size list of float32; NaNs in error rows). A Parquet file is only readable
  once its footer is written, so the run writes complete part files into ``FILE.parts/``
  (each renamed into place whole) and joins them into ``FILE`` at the end; ``--resume`` reads the
  parts, and a kill after the join leaves a finished file.

Resuming skips each listed path as many times as it already has a row, error rows included,
so the finished file has the rows of one uninterrupted run, each once. A path is matched however
it was spelled (``photos/a.jpg``, ``./photos/a.jpg``, its absolute path). Resuming a finished file
appends the rows of images it does not hold yet, in every format. The file records ``--top`` and
``--embeddings``; a resume with other values is refused.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..checks import check_output_file
from ..data.manifests import csv_reader
from .pipeline import Prediction

SUFFIXES = (".csv", ".jsonl", ".parquet")
ROWS_PER_PART = 1024  # rows a kill can cost a Parquet run (recomputed on --resume)


def as_dict(row: Prediction) -> dict[str, Any]:
    """A row as JSON: what ``--json`` prints and ``.jsonl`` holds."""
    if row.error is not None:
        return {"path": row.path, "error": row.error}
    out: dict[str, Any] = {"path": row.path, "top": [{"class": c, "probability": p} for c, p in row.top]}
    if row.embedding is not None:
        out["embedding"] = [float(v) for v in row.embedding]
    return out


def _parts(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def image_key(path: str) -> str:
    """What identifies an image between runs: its path however it was spelled (relative, with
    ``./`` or ``..``, absolute), not following links."""
    return os.path.abspath(path)


def check_output(path: str | Path, resume: str = "no", sources: Sequence[str | Path] = ()) -> bool:
    """Check, before any work, that ``path`` can take predictions and is none of the run's
    ``sources`` (a manifest or image it reads); return whether a run should finish it. ``resume``:
    ``no`` (an existing file is replaced, as other outputs are), ``yes`` (it must exist) or
    ``auto`` (finish it if it exists)."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{path}: the output must end in {', '.join(SUFFIXES)}")
    if resume not in ("no", "yes", "auto"):
        raise ValueError(f"--resume must be one of no, yes, auto; got {resume!r}")
    for source in map(str, sources):
        if source != "-" and path.exists() and os.path.exists(source) and os.path.samefile(source, path):
            raise ValueError(f"--output {path} is one of the run's inputs ({source}): writing it would destroy "
                             "it; name another file")
    check_output_file(path)
    exists = path.exists() or _parts(path).exists()
    if resume == "yes" and not exists:
        raise FileNotFoundError(f"nothing to resume: {path} does not exist (leave out --resume to start)")
    return resume != "no" and exists


def parquet_schema(embedding_dim: int | None, k: int | None = None) -> Any:
    """The Parquet columns of a run (``embedding`` only with an embedding size); ``k``, the
    classes per row, is kept in the schema's metadata (``top``) for a resume to check."""
    import pyarrow as pa

    fields = [("path", pa.string()), ("error", pa.string()), ("classes", pa.list_(pa.string())),
              ("probabilities", pa.list_(pa.float32()))]
    if embedding_dim is not None:
        fields.append(("embedding", pa.list_(pa.float32(), embedding_dim)))
    return pa.schema(fields, metadata=None if k is None else {"top": str(k)})


def parquet_table(rows: Sequence[Prediction], embedding_dim: int | None, k: int | None = None) -> Any:
    """``rows`` as a pyarrow table of ``parquet_schema``."""
    import pyarrow as pa

    columns: dict[str, Any] = {
        "path": [r.path for r in rows], "error": [r.error for r in rows],
        "classes": [[c for c, _ in r.top] for r in rows], "probabilities": [[p for _, p in r.top] for r in rows]}
    if embedding_dim is not None:  # error rows: NaNs, since pyarrow 25 cannot read back a null fixed-size list
        nan = [float("nan")] * embedding_dim
        columns["embedding"] = [nan if r.embedding is None else r.embedding.tolist() for r in rows]
    return pa.table(columns, schema=parquet_schema(embedding_dim, k))


class PredictionWriter:
    """Appends rows to one output file; ``done`` counts the images it already holds (``resume``;
    by ``image_key``), ``failed`` the error rows among them."""

    def __init__(self, path: str | Path, k: int, embedding_dim: int | None = None, resume: bool = False,
                 sources: Sequence[str | Path] = (), threshold: float | None = None) -> None:
        self.path = Path(path)
        exists = check_output(self.path, "auto" if resume else "no", sources)
        self.k, self.embedding_dim, self.embeddings = k, embedding_dim, embedding_dim is not None
        self.threshold = threshold  # a multi-label model's rows hold at most k classes
        self.done: Counter[str] = Counter()
        self.failed = 0
        if not exists:
            self.path.unlink(missing_ok=True)
            shutil.rmtree(self._parts(), ignore_errors=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.suffix.lower() == ".parquet":
            self._open_parquet(exists)
        else:
            self._open_text(exists)

    # -- text formats --------------------------------------------------------------------------

    def _open_text(self, exists: bool) -> None:
        if exists:
            self._cut_partial_line()
            with open(self.path, newline="", encoding="utf-8") as f:
                if self.path.suffix.lower() == ".csv":
                    reader = csv_reader(f)
                    header = next(reader, None)
                    if header is not None and header != self._csv_header():
                        raise ValueError(f"{self.path} was written with other options (its columns: "
                                         f"{', '.join(header)}): resume with the same --top and --embeddings")
                    for row in reader:
                        self._count(row[0], bool(row[1]))
                    exists = header is not None
                else:
                    for line in f:
                        row = json.loads(line)
                        self._check_json_row(row)
                        self._count(row["path"], "error" in row)
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        if self.path.suffix.lower() == ".csv":
            self._csv = csv.writer(self._file)
            if not exists:
                self._csv.writerow(self._csv_header())
                self._file.flush()

    def _count(self, path: str, failed: bool) -> None:
        self.done[image_key(path)] += 1
        self.failed += failed

    def _cut_partial_line(self) -> None:
        """Drop what follows the last newline: the line a kill interrupted."""
        with open(self.path, "rb+") as f:
            size = f.seek(0, io.SEEK_END)
            end = size
            while end > 0:
                f.seek(max(0, end - 65536))
                chunk = f.read(end - max(0, end - 65536))
                newline = chunk.rfind(b"\n")
                if newline >= 0:
                    end = max(0, end - 65536) + newline + 1
                    break
                end = max(0, end - 65536)
            if end != size:
                f.truncate(end)

    def _csv_header(self) -> list[str]:
        header = ["path", "error"]
        for i in range(1, self.k + 1):
            header += [f"class_{i}", f"probability_{i}"]
        return header + (["embedding"] if self.embeddings else [])

    def _check_json_row(self, row: dict[str, Any]) -> None:
        if "error" in row:
            return
        if len(row["top"]) > self.k or not self.threshold and len(row["top"]) != self.k or \
                ("embedding" in row) != self.embeddings:
            raise ValueError(f"{self.path} was written with other options ({len(row['top'])} classes per row, "
                             f"{'with' if 'embedding' in row else 'without'} embeddings): resume with the same "
                             f"--top and --embeddings")

    def _csv_row(self, row: Prediction) -> list[Any]:
        out: list[Any] = [row.path, row.error or ""]
        top = list(row.top) + [("", "")] * (self.k - len(row.top))
        for name, p in top:
            out += [name, p]
        if self.embeddings:
            out.append("" if row.embedding is None else json.dumps([float(v) for v in row.embedding]))
        return out

    # -- Parquet -------------------------------------------------------------------------------

    def _parts(self) -> Path:
        return _parts(self.path)

    def _open_parquet(self, exists: bool) -> None:
        self._pending: list[Prediction] = []
        parts = self._parts()
        if exists and self.path.exists():  # a finished file: the join completed before a kill
            self._read_parquet(self.path)
            shutil.rmtree(parts, ignore_errors=True)
            self._finished = True  # reopened (``_reopen``) only if rows come
            return
        self._finished = False
        parts.mkdir(exist_ok=True)
        for part in sorted(parts.glob("part-*.parquet")):
            self._read_parquet(part)
        for stale in parts.glob("*.tmp"):
            stale.unlink()
        self._next_part = len(list(parts.glob("part-*.parquet")))

    def _read_parquet(self, path: Path) -> None:
        import pyarrow.parquet as pq

        self._check_schema(pq.read_schema(path), path)
        table = pq.read_table(path, columns=["path", "error"])
        for name, error in zip(table.column(0).to_pylist(), table.column(1).to_pylist()):
            self._count(name, error is not None)

    def _reopen(self) -> None:
        """A finished file gets more rows: it becomes the first part again."""
        parts = self._parts()
        parts.mkdir(exist_ok=True)
        os.replace(self.path, parts / "part-00000000.parquet")
        self._next_part, self._finished = 1, False

    def _schema(self) -> Any:
        return parquet_schema(self.embedding_dim, self.k)

    def _check_schema(self, schema: Any, path: Path) -> None:
        top = (schema.metadata or {}).get(b"top")
        if not schema.equals(self._schema()) or (top is not None and int(top) != self.k):
            written = f"--top {int(top)}, " if top is not None else ""
            raise ValueError(f"{path} was written with other options ({written}columns {schema.names}): resume "
                             f"with the same --top and --embeddings")

    def _write_part(self) -> None:
        import pyarrow.parquet as pq

        rows, self._pending = self._pending, []
        name = self._parts() / f"part-{self._next_part:08d}.parquet"
        pq.write_table(parquet_table(rows, self.embedding_dim, self.k), str(name) + ".tmp")
        os.replace(str(name) + ".tmp", name)  # a part is there whole or not at all
        self._next_part += 1

    def _join_parts(self) -> None:
        import pyarrow.parquet as pq

        parts = sorted(self._parts().glob("part-*.parquet"))
        tmp = self.path.with_name(self.path.name + ".tmp")
        with pq.ParquetWriter(tmp, self._schema()) as writer:
            for part in parts:
                writer.write_table(pq.read_table(part))
        os.replace(tmp, self.path)
        shutil.rmtree(self._parts())

    # -- both ----------------------------------------------------------------------------------

    def write(self, rows: Sequence[Prediction]) -> None:
        """Append ``rows``; they are on disk (text) or in a part file (Parquet, every few thousand rows)."""
        if self.path.suffix.lower() == ".parquet":
            if self._finished and rows:
                self._reopen()
            self._pending.extend(rows)
            if len(self._pending) >= ROWS_PER_PART:
                self._write_part()
            return
        if self.path.suffix.lower() == ".csv":
            self._csv.writerows(self._csv_row(r) for r in rows)
        else:
            self._file.write("".join(json.dumps(as_dict(r)) + "\n" for r in rows))
        self._file.flush()

    def flush(self) -> None:
        """Put every row written so far on disk (an interrupted run keeps them for ``--resume``)."""
        if self.path.suffix.lower() != ".parquet":
            self._file.flush()
        elif self._pending:
            self._write_part()

    def close(self) -> None:
        """Finish the file (Parquet: join the parts). Call it only when every row is written."""
        if self.path.suffix.lower() != ".parquet":
            self._file.close()
        elif not self._finished:
            self.flush()
            self._join_parts()
            self._finished = True
