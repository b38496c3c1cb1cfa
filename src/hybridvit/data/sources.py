"""Training data as users keep it, each layout read into the same ``Datasets``:

- the built-in digits (``None`` or ``"digits"``);
- an ImageNet-layout folder (``ROOT/train/<class>/*``, ``ROOT/val/<class>/*``);
- one folder of class folders, split with ``val_split`` (seeded and stratified) or validated on
  ``val_data``;
- a CSV, TSV or Parquet manifest of image paths and labels (``path_column``/``label_column``, or
  the usual names), relative paths taken from the manifest's folder;
- a Hugging Face dataset: a ``save_to_disk`` folder, or Parquet shards whose image column holds
  the image bytes (the Hub's layout: ``data/train-00000-of-00004.parquet``), class names from
  the dataset's ``ClassLabel``;
- WebDataset tar shards, streamed (``data.shards``).

With ``multi_label`` a label cell holds several labels (``a;b``, or a list column) and a target
is the set of an image's class indices (``ImageFolderDataset`` gives it multi-hot).

Every layout problem raises ``DataError`` (one line, naming the file and what is wrong) before
any training starts.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .datasets import DataError, Datasets, DigitsDataset, ImageFolderDataset, digits_split, image_files, scan_split
from .manifests import is_table, label_column, path_column, read_table, relative_to, table_columns

VAL_SPLITS = ("validation", "valid", "val", "test")
SPLIT_RECORD = "val_split.json"  # in the run folder: the validation images a --val-split chose


@dataclass(frozen=True)
class DataSpec:
    """Where the images are and how to read them (one owner for the data options of ``train``
    and ``eval``)."""

    data: str | None = None  # see the module docstring
    val_data: str | None = None  # validation images in any layout (default: the data's own split)
    val_split: float | None = None  # hold out this fraction of the training images, per class
    path_column: str | None = None  # manifests and tables: the column of image paths or bytes
    label_column: str | None = None
    seed: int = 0  # of the validation split
    multi_label: bool = False  # several labels per image: "a;b" cells or list columns

    @property
    def name(self) -> str:
        """A short name for run folders."""
        if is_digits(self.data):
            return "digits"
        stem = re.split(r"[{*]", str(self.data).rstrip("/"))[0].rstrip("-_/")
        return Path(stem).stem or "data"


def is_digits(data: str | Path | None) -> bool:
    return data is None or str(data) == "digits"


def is_shards(data: str | Path | None) -> bool:
    """WebDataset shards: a ``.tar`` path or URL, brace patterns allowed (``train-{000..099}.tar``)."""
    return data is not None and bool(re.search(r"\.tar(\}|$|\s)", str(data)))


# -- labelled items of one layout ---------------------------------------------------------------


@dataclass
class Labelled:
    """Items (paths, or row numbers of ``table``) and their raw labels, before classes are indexed."""

    items: list[Any]
    labels: list[Any]
    source: str
    table: Any = None  # a Hugging Face dataset holding the images as bytes
    column: str | None = None
    names: list[str] | None = None  # class names the data declares (a ClassLabel), labels being their indices


class TableImages(ImageFolderDataset):
    """Images held in a Hugging Face dataset (``{bytes, path}`` rows), read by row number."""

    def __init__(self, samples: list[tuple[int, int]], table: Any, column: str, source: str) -> None:
        super().__init__(samples)
        self.table, self.column, self.source = table, column, source

    def _cell(self, index: int) -> Any:
        return self.table[self.samples[index][0]][self.column]

    def _name(self, index: int, cell: Any) -> str:
        name = cell.get("path") if isinstance(cell, dict) else None
        return f"{self.source}[{self.samples[index][0]}]" + (f" ({name})" if name else "")

    def describe(self, index: int) -> str:
        return self._name(index, self._cell(index))

    def open(self, index: int) -> Any:
        cell = self._cell(index)  # read once: this runs for every sample a worker loads
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if data is None and isinstance(cell, dict) and cell.get("path"):
            return cell["path"]
        stream = io.BytesIO(data or b"")
        stream.name = self._name(index, cell)  # named in decoding errors
        return stream


def _class_tree(root: Path) -> Labelled:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root} has no class folders (expected {root}/<class>/<image files>, or "
                        f"{root}/train and {root}/val)")
    items, labels = [], []
    for name in classes:
        files = image_files(root / name)
        if not files:
            raise DataError(f"{root}: class folder {name!r} has no images")
        items += [str(f) for f in files]
        labels += [name] * len(files)
    return Labelled(items, labels, str(root))


def _manifest(manifest: str, spec: DataSpec) -> Labelled:
    columns = table_columns(manifest)
    image = path_column(columns, manifest, spec.path_column)
    label = label_column(columns, manifest, spec.label_column)
    if manifest.lower().endswith(".parquet") and _holds_bytes(manifest, image):
        return next(iter(_hf_tables([manifest], spec).values()))
    folder = os.path.dirname(manifest)
    items, labels = [], []
    for path, value in read_table(manifest, [image, label]):
        if path:
            items.append(relative_to(folder, str(path)))
            labels.append(value)
    return Labelled(items, labels, manifest)


def _holds_bytes(parquet: str, column: str) -> bool:
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = pq.read_schema(parquet).field(column).type
    return pa.types.is_struct(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _hf_module() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f'Hugging Face datasets need the datasets library: pip install "hybridvit[data]" ({e})') from e
    return datasets


def _from_hf(table: Any, source: str, spec: DataSpec) -> Labelled:
    """Items and labels of a Hugging Face ``Dataset``: its image column undecoded (bytes), its labels
    with the names of a ``ClassLabel``."""
    datasets = _hf_module()
    columns = list(table.column_names)
    image = spec.path_column or next((c for c in columns if isinstance(table.features[c], datasets.Image)), None)
    image = path_column(columns, source, image)
    label = label_column(columns, source, spec.label_column)
    if isinstance(table.features[image], datasets.Image):
        table = table.cast_column(image, datasets.Image(decode=False))
    feature = table.features[label]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    labels = table[label]
    if names is not None:  # -1 (no label) and indices beyond the names are bad records
        labels = [v if isinstance(v, int) and 0 <= v < len(names) else None for v in labels]
    return Labelled(list(range(len(table))), labels, source, table.select_columns([image]), image, names)


def _hf_tables(files: Sequence[str], spec: DataSpec) -> dict[str, Labelled]:
    """Parquet shards with image bytes, a ``Labelled`` per split, by split name (file names as the Hub names
    them: ``train-00000-of-00002.parquet``, ``validation-...``; otherwise one split)."""
    datasets = _hf_module()
    splits: dict[str, list[str]] = {}
    for f in sorted(files):
        name = re.match(r"([A-Za-z]+)[-_]", os.path.basename(f))
        splits.setdefault(name.group(1).lower() if name else "train", []).append(f)
    loaded = datasets.load_dataset("parquet", data_files=splits)
    return {s: _from_hf(loaded[s], f"{os.path.commonpath(fs)} ({s})", spec) for s, fs in splits.items()}


def _hf_disk(folder: Path, spec: DataSpec) -> dict[str, Labelled]:
    table = _hf_module().load_from_disk(str(folder))
    if hasattr(table, "keys"):  # a DatasetDict: its splits
        return {name: _from_hf(table[name], f"{folder} ({name})", spec) for name in table.keys()}
    return {"train": _from_hf(table, str(folder), spec)}


def _layout(data: str, spec: DataSpec) -> dict[str, Labelled]:
    """The splits a source holds (``train``, a validation split, or one unnamed ``train``)."""
    path = Path(data)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            return _hf_disk(path, spec)
        # the Hub's layout: shards in the folder or its data/ (not a walk of a whole class-folder tree)
        shards = sorted(str(p) for pattern in ("*.parquet", "data/*.parquet") for p in path.glob(pattern))
        if shards:
            return _hf_tables(shards, spec)
        if (path / "train").is_dir():  # ImageNet layout without its val/: the training folder
            return {"train": _class_tree(path / "train")}
        return {"train": _class_tree(path)}
    if is_table(data) and path.is_file():
        return {"train": _manifest(data, spec)}
    matches = sorted(glob.glob(data, recursive=True))
    if matches and all(m.lower().endswith(".parquet") for m in matches):
        return _hf_tables(matches, spec)
    raise DataError(f"{data}: not a folder, manifest (.csv, .tsv, .parquet), Hugging Face dataset or WebDataset "
                    f"shards (.tar) that exists")


# -- classes, the split, the datasets ------------------------------------------------------------


def _sort_key(label: Any) -> tuple[int, Any]:
    text = str(label)
    return (0, int(text)) if text.lstrip("-").isdigit() else (1, text)


MULTI_SEPARATORS = re.compile(r"[;|]")


def _names(part: Labelled, label: Any, multi: bool) -> list[str]:
    """The class names one label cell holds (several with ``multi``: ``a;b``, ``a|b`` or a list)."""
    if label is None or label == "":
        return []
    values = (label if isinstance(label, (list, tuple)) else MULTI_SEPARATORS.split(str(label))) if multi else [label]
    return [part.names[v] if part.names is not None and isinstance(v, int) else str(v).strip() for v in values
            if v is not None and str(v).strip() != ""]


def _index(part: Labelled, classes: list[str], multi: bool = False
           ) -> tuple[list[tuple[Any, Any]], list[str], set[str]]:
    """(item, class index) samples, or (item, tuple of class indices) with ``multi``; the items whose
    label is missing or unknown are left out and named; and the unknown labels."""
    lookup = {name: i for i, name in enumerate(classes)}
    samples, bad, unknown_labels = [], [], set()
    for item, label in zip(part.items, part.labels):
        names = _names(part, label, multi)
        unknown = [n for n in names if n not in lookup]
        if names and not unknown:
            targets = tuple(sorted({lookup[n] for n in names}))
            samples.append((item, targets if multi else targets[0]))
        else:
            bad.append(f"{item} ({'no label' if not names else repr(unknown[0])})")
            unknown_labels.update(unknown)
    return samples, bad, unknown_labels


def _classes(part: Labelled, multi: bool = False) -> list[str]:
    if part.names is not None:
        return list(part.names)
    return sorted({n for label in part.labels for n in _names(part, label, multi)}, key=_sort_key)


def _dataset(part: Labelled, samples: list[tuple[Any, Any]], classes: list[str], multi: bool) -> ImageFolderDataset:
    dataset = TableImages(samples, part.table, part.column, part.source) if part.table is not None \
        else ImageFolderDataset(samples)
    dataset.multi_hot = len(classes) if multi else None
    return dataset


def split_validation(samples: list[tuple[Any, int]], fraction: float, seed: int, classes: list[str],
                     source: str) -> tuple[list[int], list[int]]:
    """Train and validation positions of ``samples``: ``fraction`` of each class (at least one),
    drawn with ``seed``; ``DataError`` for a class the split would leave empty on either side."""
    import numpy as np

    by_class: dict[int, list[int]] = {}
    for position, (_, target) in enumerate(samples):  # several labels: stratified by the first
        by_class.setdefault(target[0] if isinstance(target, tuple) else target, []).append(position)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for target in sorted(by_class):
        positions = by_class[target]
        held = max(1, round(fraction * len(positions)))
        if held >= len(positions):
            raise DataError(f"{source}: --val-split {fraction:g} leaves class {classes[target]!r} "
                            f"({len(positions)} image(s)) with none to train on; it needs at least 2 images")
        chosen = set(rng.choice(len(positions), held, replace=False).tolist())
        for n, position in enumerate(positions):
            (val if n in chosen else train).append(position)
    return sorted(train), sorted(val)


def _key(item: Any, base: str) -> str:
    """How a recorded split names an image: its path relative to the data (which may move), or its row."""
    return os.path.relpath(item, base) if isinstance(item, str) else str(item)


def _base(spec: DataSpec) -> str:
    data = str(spec.data)
    return data if os.path.isdir(data) else os.path.dirname(data)


def build_datasets(spec: DataSpec | str | Path | None = None, with_train: bool = True,
                   follow: Path | None = None, write: Path | None = None,
                   classes: list[str] | None = None) -> Datasets:
    """Train and validation datasets for ``spec`` (a ``DataSpec``, or a bare ``data`` value);
    without ``with_train`` (evaluation), data with no validation split of its own is all validation.

    ``follow``: a ``val_split.json`` to take the validation images from if it exists (the split a
    run made, so that its resume and ``eval`` see the same images); ``write``: where to record a
    split ``spec.val_split`` makes. ``classes``: index the labels by these (a trained model's
    classes, for ``eval``) rather than by the training labels found. Call ``Datasets.prepare``
    before reading samples.
    """
    record = follow if _has_record(follow) else None
    spec = spec if isinstance(spec, DataSpec) else DataSpec(None if spec is None else str(spec))
    if is_digits(spec.data):
        images, targets, train_idx, val_idx = digits_split()
        train = DigitsDataset(images, targets, train_idx) if with_train else None
        return Datasets(train, DigitsDataset(images, targets, val_idx), [str(d) for d in range(10)])
    root = Path(str(spec.data))
    if root.is_dir() and (root / "train").is_dir() and (root / "val").is_dir() and spec.val_data is None:
        return _imagenet(root, with_train)
    if is_shards(spec.data):
        from .shards import INDEX_FILE, shard_datasets

        folder = write or follow
        return shard_datasets(spec, with_train, folder.parent / INDEX_FILE if folder is not None else None, classes)
    splits = _layout(str(spec.data), spec)
    train_part = splits.get("train") or next(iter(splits.values()))
    given, multi = classes is not None, spec.multi_label
    classes = list(classes) if given else _classes(train_part, multi)
    samples, bad, _ = _index(train_part, classes, multi)
    if not multi and not given and any(len(_names(train_part, v, True)) > 1 for v in train_part.labels[:1000]):
        raise DataError(f"{train_part.source}: labels such as {train_part.labels[0]!r} name several classes: add "
                        f"--multi-label")
    if multi and samples and all(len(t) == 1 for _, t in samples):
        raise DataError(f"{train_part.source}: --multi-label, but every image has a single label: leave it out "
                        f"(a single-label classifier, softmax and top-1)")
    if len(classes) < 2:
        raise DataError(f"{train_part.source} has a single class ({classes[0] if classes else 'none'}): a "
                        f"classifier needs at least 2")
    val_part = _validation_part(spec, splits, record, with_train)
    if val_part is not None:
        val_samples, _, unknown = _index(val_part, classes, multi)
        if unknown:
            raise DataError(f"{val_part.source}: labels that are not among the training classes: "
                            f"{', '.join(map(repr, sorted(unknown)[:10]))}")
        train_ds, val_ds = _dataset(train_part, samples, classes, multi), _dataset(val_part, val_samples, classes, multi)
    else:
        train_idx, val_idx = _read_record(record, samples, spec) if record is not None else split_validation(
            samples, spec.val_split, spec.seed, classes, train_part.source)
        if write is not None:
            _write_record(write, spec, [samples[i][0] for i in val_idx])
        train_ds = _dataset(train_part, [samples[i] for i in train_idx], classes, multi)
        val_ds = _dataset(train_part, [samples[i] for i in val_idx], classes, multi)
    for dataset, skipped in ((train_ds, bad), (val_ds, [])):
        dataset.unlabelled = skipped
    if not given:
        _check_classes(train_ds, val_ds, classes, train_part.source)
    return Datasets(train_ds if with_train else None, val_ds, classes)


def _validation_part(spec: DataSpec, splits: dict[str, Labelled], record: Path | None,
                     with_train: bool) -> Labelled | None:
    """The validation images: ``val_data``, else the data's own validation split; None when a
    ``val_split`` (or a recorded one) is to be taken from the training images."""
    if spec.val_data is not None:
        if spec.val_split is not None:
            raise ValueError("--val-data and --val-split both name the validation images: give one")
        splits = _layout(spec.val_data, spec)
    elif spec.val_split is not None or _has_record(record):
        return None
    found = next((splits[s] for s in VAL_SPLITS if s in splits), None)
    if found is None and (spec.val_data is not None or not with_train):
        found = next(iter(splits.values()))
    if found is None:
        raise DataError(f"{spec.data} has no validation split: give --val-data (images to validate on) or "
                        f"--val-split FRACTION (hold out that share of each class)")
    return found


def _check_classes(train: ImageFolderDataset, val: ImageFolderDataset, classes: list[str], source: str) -> None:
    def counts(dataset: ImageFolderDataset) -> Counter[int]:
        return Counter(c for t in dataset.targets for c in (t if isinstance(t, tuple) else (t,)))

    missing = sorted(set(range(len(classes))) - set(counts(val)))
    if missing:
        raise DataError(f"{source}: training classes that are not in the validation set: "
                        f"{', '.join(classes[i] for i in missing[:10])}")
    in_train = counts(train)
    empty = [classes[i] for i in range(len(classes)) if not in_train[i]]
    if empty:
        raise DataError(f"{source}: classes with no training image: {', '.join(empty[:10])}")


def _has_record(record: Path | None) -> bool:
    return record is not None and record.exists()


def _write_record(record: Path, spec: DataSpec, val_items: list[Any]) -> None:
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps({"data": str(spec.data), "val_split": spec.val_split, "seed": spec.seed,
                               "val": sorted(_key(i, _base(spec)) for i in val_items)}, indent=0))
    os.replace(tmp, record)


def _read_record(record: Path, samples: list[tuple[Any, int]], spec: DataSpec) -> tuple[list[int], list[int]]:
    """The split ``record`` holds, applied to today's listing (images added since train)."""
    held = set(json.loads(record.read_text())["val"])
    val = [i for i, (item, _) in enumerate(samples) if _key(item, _base(spec)) in held]
    if not val:
        raise DataError(f"{record}: none of its validation images is in {spec.data}")
    chosen = set(val)
    return [i for i in range(len(samples)) if i not in chosen], val


def _imagenet(root: Path, with_train: bool) -> Datasets:
    val_classes, val_samples = scan_split(root, "val")
    train = None
    if with_train:
        train_classes, train_samples = scan_split(root, "train")
        if train_classes != val_classes:
            only_train = sorted(set(train_classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(train_classes))
            raise DataError(f"{root}: train and val have different classes (only in train: {only_train[:20]}, "
                            f"only in val: {only_val[:20]})")
        if len(train_classes) < 2:  # one class: every prediction is right, loss 0, nothing learnt
            raise DataError(f"{root / 'train'} has a single class ({train_classes[0]!r}): a classifier needs at "
                            f"least 2 class folders")
        train = ImageFolderDataset(train_samples)
    return Datasets(train, ImageFolderDataset(val_samples), val_classes)
