"""WebDataset tar shards (``train-{000000..000099}.tar``, local or ``http(s)://``), streamed
through the ``webdataset`` library without unpacking, with a deterministic order and an exact
mid-epoch resume.

A sample is the files of one key: the image (``jpg``, ``jpeg``, ``png``, ``webp``; or the
extension ``path_column`` names) and its label (``cls``; or ``label_column``), a class index or
name as text. One pass over the training shards counts the labelled samples and their classes
(kept in the run folder, ``shards.json``, so a resume does not read them again).

The order of an epoch is a function of ``(seed, epoch)``: the shards in a seeded order, then
a seeded shuffle buffer over their samples. Process ``rank`` of ``world`` takes every
``world``-th sample (each reads every shard: exact, at the cost of reading the shards ``world``
times), cut to whole batches so that every process takes the same number of steps. Data worker
``w`` of ``W`` decodes the samples of batches ``skip + w``, ``skip + w + W``... and skips the
others undecoded, so the loader hands out the batches in order whatever the number of workers,
and a run resumed at step ``skip`` continues with exactly the batches it would have seen. Each
sample is augmented with its own seed, as the folder datasets are (``sampling``).
"""

from __future__ import annotations

import io
import json
import os
import random
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .datasets import DataError, Datasets
from .sampling import derived_seed, seed_generators
from .transforms import load_image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LABEL_EXT = "cls"
SHUFFLE_BUFFER = 1000
INDEX_FILE = "shards.json"


def shard_urls(pattern: str) -> list[str]:
    """The shards a pattern names (braces expanded, ``::`` joining lists); local ones must exist."""
    from webdataset.shardlists import expand_urls

    urls = expand_urls(pattern)
    missing = [u for u in urls if "://" not in u and not os.path.isfile(u)]
    if not urls or len(missing) == len(urls):
        raise DataError(f"{pattern}: the shard pattern matches no file")
    if missing:
        raise DataError(f"{pattern}: {len(missing)} of its {len(urls)} shards do not exist, e.g. {missing[0]}")
    return urls


def _open(url: str) -> BinaryIO:
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=120)  # a stream: read once, front to back
    return open(url.removeprefix("file://"), "rb")


def raw_samples(url: str, only: tuple[str, ...] | None = None) -> Iterator[dict[str, Any]]:
    """The samples of one shard as ``{"__key__", ext: bytes}``, in the shard's order (``only``:
    read just these extensions; the others are skipped unread)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    select = None if only is None else (lambda name: name.rsplit(".", 1)[-1].lower() in only)
    try:
        with _open(url) as stream:
            files = ({**f, "__url__": url} for f in tar_file_iterator(stream, select_files=select))
            yield from group_by_keys(files)
    except (OSError, ValueError) as e:  # tarfile.ReadError is an OSError... and a cut HTTP stream too
        raise DataError(f"{url}: cannot read this shard ({e})") from e


def _label(sample: dict[str, Any], ext: str) -> str | None:
    value = sample.get(ext)
    if value is None:
        return None
    text = value.decode("utf-8", "replace").strip()
    return text or None


def _image_ext(sample: dict[str, Any], given: str | None) -> str | None:
    if given is not None:
        return given if given in sample else None
    return next((e for e in IMAGE_EXTS if e in sample), None)


def index_shards(urls: list[str], image_ext: str | None, label_ext: str) -> dict[str, Any]:
    """One pass: per shard, its labelled samples' count and labels (images skipped unread)."""
    shards = []
    for url in urls:
        labels: Counter[str] = Counter()
        unlabelled = []
        for sample in raw_samples(url, only=(label_ext, *((image_ext,) if image_ext else IMAGE_EXTS))):
            label = _label(sample, label_ext)
            if label is None or _image_ext(sample, image_ext) is None:
                unlabelled.append(f"{url}:{sample['__key__']}")
            else:
                labels[label] += 1
        shards.append({"url": url, "samples": sum(labels.values()), "labels": dict(labels),
                       "unlabelled": unlabelled[:5], "unlabelled_count": len(unlabelled)})
    return {"shards": shards}


def _index(urls: list[str], image_ext: str | None, label_ext: str, cache: Path | None) -> dict[str, Any]:
    if cache is not None and cache.exists():
        index = json.loads(cache.read_text())
        if [s["url"] for s in index["shards"]] == urls:
            return index
    index = index_shards(urls, image_ext, label_ext)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, cache)
    return index


def _class_order(label: str) -> tuple[int, Any]:
    return (0, int(label)) if label.lstrip("-").isdigit() else (1, label)


class ShardStream(IterableDataset):
    """The samples of some shards as ``(image, class index)``, in the epoch's order for one process
    (see the module docstring). ``shuffle``: training order (and whole batches); without it, the
    shards' own order, every sample once (evaluation)."""

    def __init__(self, urls: list[str], classes: list[str], counts: Counter[str], seed: int, shuffle: bool,
                 image_ext: str | None = None, label_ext: str = LABEL_EXT, source: str = "") -> None:
        self.urls, self.classes, self.seed, self.shuffle = urls, classes, seed, shuffle
        self.image_ext, self.label_ext, self.source = image_ext, label_ext, source
        self.lookup = {name: i for i, name in enumerate(classes)}
        self.targets = [self.lookup[name] for name, n in sorted(counts.items()) if name in self.lookup for _ in range(n)]
        self.images = sum(counts.values())
        self.transform: Any = None  # set by Datasets.prepare
        self.unlabelled: list[str] = []
        self.batch_size, self.rank, self.world = 1, 0, 1
        # shared with the (persistent) data workers, which read them each time an epoch starts
        self._epoch = torch.multiprocessing.Value("q", 0, lock=False)
        self._skip = torch.multiprocessing.Value("q", 0, lock=False)

    def configure(self, batch_size: int, rank: int, world: int) -> None:
        self.batch_size, self.rank, self.world = batch_size, rank, world

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next pass is epoch ``epoch``, starting after ``skip`` samples (whole batches) of it."""
        self._epoch.value, self._skip.value = epoch, skip // self.batch_size

    @property
    def steps(self) -> int:
        """Batches per epoch for each process (training: whole batches only)."""
        per_rank = self.images // self.world if self.shuffle else -(-(self.images - self.rank) // self.world)
        return per_rank // self.batch_size if self.shuffle else -(-per_rank // self.batch_size)

    def __len__(self) -> int:
        return self.images

    def describe(self, name: str) -> str:
        return name

    def _ordered(self, epoch: int) -> Iterator[dict[str, Any]]:
        """Every labelled sample of the epoch, in its order (raw bytes, nothing decoded)."""
        urls = list(self.urls)
        rng = random.Random(derived_seed(self.seed, epoch))
        if self.shuffle:
            rng.shuffle(urls)
        buffer: list[dict[str, Any]] = []
        for url in urls:
            for sample in raw_samples(url):
                if _label(sample, self.label_ext) is None or _image_ext(sample, self.image_ext) is None:
                    continue  # counted in the index
                if not self.shuffle:
                    yield sample
                    continue
                buffer.append(sample)
                if len(buffer) >= SHUFFLE_BUFFER:
                    yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        epoch, skip = self._epoch.value, self._skip.value if self.shuffle else 0
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        steps = self.steps
        for n, sample in enumerate(self._ordered(epoch)):
            if n % self.world != self.rank:
                continue
            position = n // self.world  # in this process's stream
            batch = position // self.batch_size
            if batch >= steps:
                return
            if batch < skip or (batch - skip) % workers != worker:
                continue
            yield self._decode(sample, epoch, position)

    def _decode(self, sample: dict[str, Any], epoch: int, position: int) -> tuple[Any, Any]:
        name = f"{sample.get('__url__', self.source)}:{sample['__key__']}"
        label = _label(sample, self.label_ext)
        target = self.lookup.get(label)
        if target is None:  # a validation label the training classes do not have
            return None, f"{name} (unknown label {label!r})"
        if self.shuffle:
            seed_generators(derived_seed(self.seed, epoch, position * self.world + self.rank))
        data = io.BytesIO(sample[_image_ext(sample, self.image_ext)])
        data.name = name
        read = getattr(self.transform, "read", None)
        try:
            image = read(data) if read else load_image(data)
        except ValueError:
            return None, name
        return (self.transform.after_read(image) if read else self.transform(image)), target


class StreamLoader(DataLoader):
    """A loader over a ``ShardStream``: its length is the batches left in the epoch."""

    def __len__(self) -> int:
        return self.dataset.steps - (self.dataset._skip.value if self.dataset.shuffle else 0)


def _counts(urls: list[str], image_ext: str | None, label_ext: str, cache: Path | None) -> tuple[Counter[str], list[str]]:
    index = _index(urls, image_ext, label_ext, cache)
    counts: Counter[str] = Counter()
    for shard in index["shards"]:
        counts.update(shard["labels"])
    return counts, [name for shard in index["shards"] for name in shard["unlabelled"]]


def shard_datasets(spec: Any, with_train: bool = True, index_file: Path | None = None,
                   classes: list[str] | None = None) -> Datasets:
    """Train and validation streams for WebDataset shards (``spec.val_data``: validation shards).
    Without ``with_train`` (evaluation), ``spec.data`` are the shards to evaluate, labelled with
    ``classes`` (a trained model's)."""
    image_ext, label_ext = spec.path_column, spec.label_column or LABEL_EXT
    if not with_train:
        urls = shard_urls(str(spec.data))
        counts, _ = _counts(urls, image_ext, label_ext, None)
        classes = classes or sorted(counts, key=_class_order)
        val = ShardStream(urls, classes, counts, spec.seed, shuffle=False, image_ext=image_ext, label_ext=label_ext,
                          source=str(spec.data))
        return Datasets(None, val, classes)
    if spec.val_split is not None:
        raise DataError(f"{spec.data}: --val-split needs random access to the images; streamed shards take "
                        f"validation shards with --val-data")
    if spec.val_data is None:
        raise DataError(f"{spec.data}: give the validation shards with --val-data")
    urls = shard_urls(str(spec.data))
    counts, unlabelled = _counts(urls, image_ext, label_ext, index_file)
    classes = sorted(counts, key=_class_order)
    if len(classes) < 2:
        raise DataError(f"{spec.data}: the shards hold {len(classes)} class(es) ({', '.join(classes)}); a classifier "
                        f"needs at least 2")
    train = ShardStream(urls, classes, counts, spec.seed, shuffle=True, image_ext=image_ext, label_ext=label_ext,
                        source=str(spec.data))
    train.unlabelled = unlabelled
    val_urls = shard_urls(str(spec.val_data))
    val_counts, _ = _counts(val_urls, image_ext, label_ext, None)
    unknown = sorted(set(val_counts) - set(classes))
    if unknown:
        raise DataError(f"{spec.val_data}: labels that are not among the training classes: {', '.join(unknown[:10])}")
    val = ShardStream(val_urls, classes, val_counts, spec.seed, shuffle=False, image_ext=image_ext,
                      label_ext=label_ext, source=str(spec.val_data))
    return Datasets(train if with_train else None, val, classes)
