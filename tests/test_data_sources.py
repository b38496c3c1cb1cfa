"""Training data as users keep it: one class-folder tree with a recorded validation split, CSV/TSV/
Parquet manifests, Hugging Face datasets (save_to_disk folders and Parquet shards with image
bytes), WebDataset shards streamed in a fixed order; each read into the same samples, and every
bad layout one clear error."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_image_folder
from PIL import Image

from hybridvit.data import DataError, DataSpec, build_datasets
from hybridvit.data.shards import ShardStream, shard_urls


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """cat/dog/owl class folders (5, 7 and 9 images): the train split of an ImageNet-layout folder."""
    root = make_image_folder(tmp_path_factory.mktemp("data") / "data", classes=("cat", "dog", "owl"), per_class=9)
    for name, keep in (("cat", 5), ("dog", 7)):
        for extra in sorted((root / "train" / name).iterdir())[keep:]:
            extra.unlink()
    return root / "train"


def _samples(dataset) -> list[tuple[str, int]]:
    return [(str(item), target) for item, target in dataset.samples]


def test_a_class_tree_split_is_seeded_stratified_and_recorded(tree, tmp_path):
    record = tmp_path / "run" / "val_split.json"
    data = build_datasets(DataSpec(str(tree), val_split=0.3, seed=1), write=record)
    assert data.classes == ["cat", "dog", "owl"]
    assert Counter(data.val.targets) == {0: 2, 1: 2, 2: 3} and len(data.train) + len(data.val) == 21  # 30% per class
    assert not set(_samples(data.train)) & set(_samples(data.val))
    again = build_datasets(DataSpec(str(tree), val_split=0.3, seed=1))
    assert _samples(again.val) == _samples(data.val)  # the same seed, the same split
    other = build_datasets(DataSpec(str(tree), val_split=0.3, seed=2))
    assert _samples(other.val) != _samples(data.val)
    assert sorted(json.loads(record.read_text())["val"]) == sorted(
        str(Path(p).relative_to(tree)) for p, _ in _samples(data.val))
    # a resume (or eval) follows the record, even with new images in the folder and another seed
    Image.new("RGB", (40, 40)).save(tree / "cat" / "new.png")
    try:
        followed = build_datasets(DataSpec(str(tree), val_split=0.3, seed=7), follow=record)
        assert _samples(followed.val) == _samples(data.val) and len(followed.train) == len(data.train) + 1
        evaluated = build_datasets(DataSpec(str(tree)), with_train=False, follow=record)
        assert _samples(evaluated.val) == _samples(data.val)
    finally:
        (tree / "cat" / "new.png").unlink()


def _manifest_rows(tree: Path, base: Path) -> list[tuple[str, str]]:
    return [(str(p.relative_to(base)), p.parent.name) for p in sorted(tree.rglob("*.*"))]


def test_manifests_of_every_format_give_the_folder_samples(tree, tmp_path):
    rows = _manifest_rows(tree, tree.parent)
    folder = build_datasets(DataSpec(str(tree), val_split=0.3))
    (tree.parent / "m.csv").write_text("label,path\n" + "".join(f"{c},{p}\n" for p, c in rows), encoding="utf-8-sig")
    (tree.parent / "m.tsv").write_text("file\tclass\n" + "".join(f"{p}\t{c}\n" for p, c in rows))
    pq.write_table(pa.table({"img": [p for p, _ in rows], "y": [c for _, c in rows]}), tree.parent / "m.parquet")
    for name, columns in (("m.csv", {}), ("m.tsv", {}), ("m.parquet", {"path_column": "img", "label_column": "y"})):
        data = build_datasets(DataSpec(str(tree.parent / name), val_split=0.3, **columns))
        assert data.classes == folder.classes, name
        assert _samples(data.train) == _samples(folder.train) and _samples(data.val) == _samples(folder.val), name
    # numbers as labels sort as numbers; a row without a label is left out and named
    (tmp_path / "n.csv").write_text("path,label\n" + "".join(f"{tree.parent / p},{['2', '10', ''][i % 3]}\n"
                                                           for i, (p, _) in enumerate(rows)))
    data = build_datasets(DataSpec(str(tmp_path / "n.csv"), val_split=0.3))
    assert data.classes == ["2", "10"] and len(data.train.unlabelled) == 7 and "(no label)" in data.train.unlabelled[0]


def _hf_splits(tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)

    def image(v: int) -> Image.Image:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "PNG")
        return Image.open(io.BytesIO(buffer.getvalue()))

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["ant", "bee"])})
    train = datasets.Dataset.from_dict({"image": [image(i) for i in range(8)], "label": [0, 1] * 4}, features=features)
    val = datasets.Dataset.from_dict({"image": [image(i) for i in range(4)], "label": [1, 0, 1, -1]}, features=features)
    return datasets, train, val


def test_hugging_face_datasets_from_disk_and_as_parquet_shards(tmp_path):
    datasets, train, val = _hf_splits(tmp_path)
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    train.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    val.to_parquet(str(tmp_path / "hub" / "data" / "validation-00000-of-00001.parquet"))
    for source in (tmp_path / "disk", tmp_path / "hub"):
        data = build_datasets(DataSpec(str(source)))
        assert data.classes == ["ant", "bee"], source  # from the ClassLabel
        assert (len(data.train), len(data.val)) == (8, 3) and data.val.targets == [1, 0, 1], source  # -1: no label
        data.val.transform = np.asarray
        assert [data.val[i][0].shape for i in range(3)] == [(16, 16, 3)] * 3  # bytes decoded like files
    with pytest.raises(DataError, match="no validation split"):
        build_datasets(DataSpec(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")))
    one = build_datasets(DataSpec(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"), val_split=0.25))
    assert (len(one.train), len(one.val)) == (6, 2)


def write_shards(folder: Path, images: list[np.ndarray], labels: list[str], per_shard: int, prefix: str) -> str:
    """WebDataset tars of PNGs (``KEY.png`` + ``KEY.cls``); returns their brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    count = -(-len(images) // per_shard)
    for s in range(count):
        with tarfile.open(folder / f"{prefix}-{s:03d}.tar", "w") as tar:
            for i in range(s * per_shard, min(len(images), (s + 1) * per_shard)):
                buffer = io.BytesIO()
                Image.fromarray(images[i]).save(buffer, "PNG")
                for ext, data in (("png", buffer.getvalue()), ("cls", labels[i].encode())):
                    info = tarfile.TarInfo(f"s{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{prefix}-{{000..{count - 1:03d}}}.tar")


def test_shards_stream_in_a_fixed_order_split_over_workers_and_resume_exactly(tmp_path):
    images = [np.full((8, 8, 3), i, dtype=np.uint8) for i in range(50)]
    pattern = write_shards(tmp_path, images, [str(i % 3) for i in range(50)], 7, "train")
    val = write_shards(tmp_path, images[:6], ["0", "1", "2", "0", "1", "7"], 4, "val")
    with pytest.raises(DataError, match="labels that are not among the training classes: 7"):
        build_datasets(DataSpec(pattern, val_data=val))
    data = build_datasets(DataSpec(pattern, val_data=write_shards(tmp_path, images[:6], ["0", "1", "2"] * 2, 4, "v")))
    stream = data.train
    assert isinstance(stream, ShardStream) and data.classes == ["0", "1", "2"] and len(stream) == 50
    stream.transform = lambda image: int(np.asarray(image)[0, 0, 0])  # the image's number
    stream.configure(batch_size=4, rank=0, world=1)

    def epoch(e: int, workers: int, skip: int = 0) -> list[int]:
        stream.set_epoch(e, skip=skip * 4)
        out = []
        for worker in range(workers):  # as the loader interleaves its workers, batch by batch
            out.append([x for x, _ in _as_worker(stream, worker, workers)])
        batches = [[ws[i:i + 4] for i in range(0, len(ws), 4)] for ws in out]
        return [v for k in range(max(map(len, batches))) for b in batches if k < len(b) for v in b[k]]

    first = epoch(0, 1)
    assert len(first) == 48 and len(set(first)) == 48  # whole batches of 4, each image once
    assert epoch(0, 3) == first and epoch(0, 1) == first  # any number of workers, the same order
    assert epoch(1, 1) != first  # another epoch, another order
    assert epoch(0, 2, skip=5) == first[20:]  # resumed after 5 batches: exactly the rest


def _as_worker(stream, worker: int, workers: int):
    from unittest import mock

    info = mock.Mock(id=worker, num_workers=workers)
    with mock.patch("hybridvit.data.shards.get_worker_info", return_value=info):
        yield from iter(stream)


@pytest.mark.parametrize("case, message", [
    ("no_label_column", "no column of labels"),
    ("named_column_missing", "no column 'kind'"),
    ("split_empties_a_class", r"leaves class 'cat' \(1 image\(s\)\) with none to train on"),
    ("val_label_unknown", "labels that are not among the training classes: 'emu'"),
    ("no_shards", "the shard pattern matches no file"),
    ("split_and_val", "give one"),
    ("nothing", "not a folder, manifest"),
])
def test_bad_data_is_one_clear_error(tmp_path, case, message):
    (tmp_path / "a.png").write_bytes(b"")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.png,cat\na.png,dog\na.png,dog\na.png,owl\n")
    spec = {
        "no_label_column": DataSpec(str(tmp_path / "p.csv"), val_split=0.5),
        "named_column_missing": DataSpec(str(manifest), val_split=0.5, label_column="kind"),
        "split_empties_a_class": DataSpec(str(manifest), val_split=0.5),
        "val_label_unknown": DataSpec(str(manifest), val_data=str(tmp_path / "v.csv")),
        "no_shards": DataSpec(str(tmp_path / "none-{000..003}.tar"), val_data=str(tmp_path / "v-000.tar")),
        "split_and_val": DataSpec(str(manifest), val_data=str(manifest), val_split=0.5),
        "nothing": DataSpec(str(tmp_path / "nowhere"), val_split=0.5),
    }[case]
    (tmp_path / "p.csv").write_text("path\na.png\n")
    (tmp_path / "v.csv").write_text("path,label\na.png,emu\n")
    with pytest.raises((DataError, ValueError), match=message):
        build_datasets(spec)


def test_shard_patterns_expand_braces_and_name_missing_shards(tmp_path):
    for i in range(2):
        (tmp_path / f"t-{i}.tar").write_bytes(b"")
    assert shard_urls(str(tmp_path / "t-{0..1}.tar")) == [str(tmp_path / "t-0.tar"), str(tmp_path / "t-1.tar")]
    with pytest.raises(DataError, match="1 of its 3 shards do not exist"):
        shard_urls(str(tmp_path / "t-{0..2}.tar"))
    assert shard_urls("http://example.invalid/t-{0..1}.tar") == ["http://example.invalid/t-0.tar",
                                                                "http://example.invalid/t-1.tar"]


def test_several_labels_an_image_from_separated_cells_and_list_columns(tmp_path):
    for i in range(12):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    sets = [["sky"], ["sea", "sky"], ["tree", "sky"], ["sea"]] * 3
    (tmp_path / "m.csv").write_text("path,labels\n" + "".join(f"{i}.png,{';'.join(s)}\n" for i, s in enumerate(sets)))
    pq.write_table(pa.table({"path": [f"{i}.png" for i in range(12)], "labels": sets}), tmp_path / "m.parquet")
    for name in ("m.csv", "m.parquet"):
        data = build_datasets(DataSpec(str(tmp_path / name), val_split=0.25, multi_label=True))
        assert data.classes == ["sea", "sky", "tree"], name
        data.train.transform = lambda image: 0
        by_path = {Path(p).name: t for p, t in data.train.samples + data.val.samples}
        assert by_path["1.png"] == (0, 1) and by_path["2.png"] == (1, 2), name
        image, target = data.train[0]
        assert target.tolist() == [float(c in data.train.samples[0][1]) for c in range(3)]  # multi-hot
    with pytest.raises(DataError, match="name several classes: add --multi-label"):
        build_datasets(DataSpec(str(tmp_path / "m.csv"), val_split=0.25))
    (tmp_path / "one.csv").write_text("path,label\n" + "".join(f"{i}.png,{'ab'[i % 2]}\n" for i in range(12)))
    with pytest.raises(DataError, match="every image has a single label"):
        build_datasets(DataSpec(str(tmp_path / "one.csv"), val_split=0.25, multi_label=True))
