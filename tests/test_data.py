"""Tests for train.data: layout detection, validation hold-out and the labelled image dataset."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fgh_deploy.config import PreprocessConfig
from fgh_deploy.errors import FghError
from fgh_deploy.images import ImageDecodeError, load_image
from fgh_deploy.train.data import (
    HashingDataset,
    LabeledImageDataset,
    Sample,
    hold_out_validation,
    load_dataset,
    one_hot,
)

SMALL = PreprocessConfig(input_size=32, resize_size=36)
CLASSES = ["beta", "alpha", "gamma"]  # deliberately unsorted: labels must follow sorted order


def _jpeg(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)


def _splits_tsv_dataset(root: Path, per_class: int = 4) -> list[tuple[str, str, str]]:
    """Images ``<class>/<k>.jpg``; the first half of each class is the database."""
    rows = []
    for c, name in enumerate(CLASSES):
        for k in range(per_class):
            rel = f"{name}/{k:03d}.jpg"
            _jpeg(root / rel, seed=10 * c + k)
            rows.append((rel, name, "database" if k < per_class // 2 else "query"))
    return rows


def _write_tsv(root: Path, rows: list[tuple[str, ...]], header: bool = False) -> Path:
    lines = ["relative_path\tclass\tsplit"] if header else []
    lines += ["\t".join(row) for row in rows]
    path = root / "splits.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cub_dataset(root: Path, with_classes_txt: bool = True) -> None:
    """A 3-class CUB-200-2011 tree: 5 images per class, ids 1..15, the first 3 of a class train."""
    names = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    images, labels, split = [], [], []
    image_id = 0
    for class_id, name in enumerate(names, start=1):
        for k in range(5):
            image_id += 1
            rel = f"{name}/{name.split('.')[1]}_{k:04d}.jpg"
            _jpeg(root / "images" / rel, seed=image_id)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {1 if k < 3 else 0}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    if with_classes_txt:
        (root / "classes.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(names, start=1)))


def _folder_dataset(root: Path) -> None:
    for c, name in enumerate(CLASSES):
        for k in range(3):
            _jpeg(root / "train" / name / f"{k}.jpg", seed=c * 10 + k)
        _jpeg(root / "test" / name / "q.jpg", seed=100 + c)
    _jpeg(root / "test" / "delta" / "q.jpg", seed=200)  # a query-only class is allowed


def _one_line_error(root: Path, *needles: str) -> str:
    with pytest.raises(FghError) as info:
        load_dataset(root)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


# --- layouts ------------------------------------------------------------------------------


def test_splits_tsv_layout(tmp_path: Path) -> None:
    rows = _splits_tsv_dataset(tmp_path)
    _write_tsv(tmp_path, rows)
    dataset = load_dataset(tmp_path)
    assert dataset.layout == "splits.tsv"
    assert dataset.root == tmp_path
    assert dataset.classes == ["alpha", "beta", "gamma"]
    assert len(dataset.database) == len(dataset.query) == 6
    assert dataset.database[0] == Sample("beta/000.jpg", 1)
    assert Sample("alpha/003.jpg", 0) in dataset.query
    for sample in (*dataset.database, *dataset.query):
        assert dataset.classes[sample.label] == sample.relpath.split("/")[0]
    assert dataset.summary() == {
        "root": str(tmp_path), "layout": "splits.tsv", "num_classes": 3, "database": 6, "query": 6,
    }
    json.dumps(dataset.summary())


def test_splits_tsv_tolerates_header_blank_lines_and_crlf(tmp_path: Path) -> None:
    rows = _splits_tsv_dataset(tmp_path)
    text = "relative_path\tclass\tsplit\r\n\r\n" + "".join("\t".join(r) + "\r\n\n" for r in rows)
    (tmp_path / "splits.tsv").write_bytes(b"\xef\xbb\xbf" + text.encode())  # with a byte-order mark
    dataset = load_dataset(tmp_path)
    assert (len(dataset.database), len(dataset.query)) == (6, 6)


def test_splits_tsv_wins_over_other_layouts(tmp_path: Path) -> None:
    _folder_dataset(tmp_path)
    _write_tsv(tmp_path, [("train/alpha/0.jpg", "alpha", "database"), ("train/beta/0.jpg", "beta", "query")])
    assert load_dataset(tmp_path).layout == "splits.tsv"


@pytest.mark.parametrize("with_classes_txt", [True, False])
def test_cub_layout(tmp_path: Path, with_classes_txt: bool) -> None:
    _cub_dataset(tmp_path, with_classes_txt)
    dataset = load_dataset(tmp_path)
    assert dataset.layout == "cub200"
    expected = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    assert dataset.classes == (expected if with_classes_txt else ["1", "2", "3"])
    assert (len(dataset.database), len(dataset.query)) == (9, 6)
    first = "images/001.Black_footed_Albatross/Black_footed_Albatross_0000.jpg"
    assert dataset.database[0] == Sample(first, 0)
    assert Counter(s.label for s in dataset.query) == {0: 2, 1: 2, 2: 2}
    assert all((dataset.root / s.relpath).is_file() for s in dataset.database)


def test_cub_subfolder_and_unused_class_names(tmp_path: Path) -> None:
    cub = tmp_path / "CUB_200_2011"
    _cub_dataset(cub)
    with open(cub / "classes.txt", "a") as fp:
        fp.write("4 Passeriformes\n")  # a taxonomy node without images (as in NABirds)
    dataset = load_dataset(tmp_path)
    assert dataset.root == cub
    assert dataset.num_classes == 3


def test_train_test_folders_layout(tmp_path: Path) -> None:
    _folder_dataset(tmp_path)
    _jpeg(tmp_path / "train" / "stray.jpg", seed=300)  # outside a class folder: ignored
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    dataset = load_dataset(tmp_path)
    assert dataset.layout == "train-test folders"
    assert dataset.classes == ["alpha", "beta", "delta", "gamma"]
    assert (len(dataset.database), len(dataset.query)) == (9, 4)
    assert dataset.database[0] == Sample("train/alpha/0.jpg", 0)
    assert Sample("test/delta/q.jpg", 2) in dataset.query
    assert {s.label for s in dataset.database} == {0, 1, 3}


# --- errors -------------------------------------------------------------------------------


def test_missing_root(tmp_path: Path) -> None:
    message = _one_line_error(tmp_path / "nowhere", "no such directory")
    assert message == f"{tmp_path / 'nowhere'}: no such directory"


def test_root_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    _one_line_error(tmp_path / "file", "not a directory")


def test_unknown_layout(tmp_path: Path) -> None:
    _jpeg(tmp_path / "0.jpg", seed=0)  # images, but none in a class folder
    _one_line_error(tmp_path, str(tmp_path), "unrecognised dataset layout", "splits.tsv", "CUB-200-2011",
                    "train/ and test/", "one subfolder of images per class")


def _class_folders(root: Path, sizes: dict[str, int]) -> None:
    for c, (name, count) in enumerate(sizes.items()):
        for k in range(count):
            _jpeg(root / name / f"{k:02d}.jpg", seed=100 * c + k, size=(8, 8))


def test_class_folders_are_split_per_class_by_seed(tmp_path: Path) -> None:
    _class_folders(tmp_path, {"beta": 10, "alpha": 5, "gamma": 2, "solo": 1})
    _jpeg(tmp_path / "loose.jpg", seed=0)  # outside any class folder: ignored
    dataset = load_dataset(tmp_path, split_seed=3, query_fraction=0.2)
    assert dataset.layout == "class folders"
    assert dataset.classes == ["alpha", "beta", "gamma", "solo"]
    # round(0.2 n), at least one query, at least one database image; a single image stays in the database.
    assert Counter(dataset.classes[s.label] for s in dataset.query) == {"beta": 2, "alpha": 1, "gamma": 1}
    assert Counter(dataset.classes[s.label] for s in dataset.database) == {"beta": 8, "alpha": 4, "gamma": 1, "solo": 1}
    assert load_dataset(tmp_path, split_seed=3, query_fraction=0.2) == dataset
    assert {s.relpath for s in load_dataset(tmp_path, split_seed=4).query} != {s.relpath for s in dataset.query}


def test_class_folder_split_round_trips_through_splits_tsv(tmp_path: Path) -> None:
    from fgh_deploy.train.data import splits_tsv

    _class_folders(tmp_path / "data", {"a": 4, "b": 4})
    drawn = load_dataset(tmp_path / "data", split_seed=1, query_fraction=0.5)
    written = tmp_path / "run" / "splits.tsv"
    written.parent.mkdir()
    written.write_text(splits_tsv(drawn), encoding="utf-8")
    assert written.read_text().splitlines()[0] == "relative_path\tclass\tsplit"
    read = load_dataset(tmp_path / "data", splits=written)
    assert (read.root, read.classes, read.database, read.query) == (drawn.root, drawn.classes, drawn.database,
                                                                     drawn.query)
    written.unlink()
    _one_line_error_with(lambda: load_dataset(tmp_path / "data", splits=written), str(written), "missing")


def _one_line_error_with(call, *needles: str) -> None:
    with pytest.raises(FghError) as info:
        call()
    assert "\n" not in str(info.value)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize("relpath", ["a/tab\there.jpg", "a/line\nbreak.jpg", "a/next\x85line.jpg",
                                     "a/" + os.fsdecode(b"\xff.jpg"), "spaced /0.jpg"])
def test_class_folder_names_a_splits_tsv_cannot_hold_are_refused(tmp_path: Path, relpath: str) -> None:
    _class_folders(tmp_path, {"a": 2, "b": 2})
    _jpeg(tmp_path / relpath, seed=9)
    _one_line_error(tmp_path, "cannot be written to a splits.tsv; rename it")


def test_a_single_class_folder_is_not_a_hashing_dataset(tmp_path: Path) -> None:
    _class_folders(tmp_path, {"alpha": 3})
    _one_line_error(tmp_path, "needs at least 2 classes, found 1")


def test_train_without_test(tmp_path: Path) -> None:
    _jpeg(tmp_path / "train" / "alpha" / "0.jpg", seed=0)
    _one_line_error(tmp_path, "train/", "no test/")


def test_splits_tsv_missing_files_are_listed(tmp_path: Path) -> None:
    rows = _splits_tsv_dataset(tmp_path)
    rows += [(f"ghost/{k}.jpg", "alpha", "query") for k in range(7)]
    _write_tsv(tmp_path, rows)
    message = _one_line_error(
        tmp_path, f"{tmp_path / 'splits.tsv'}: 7 of 19 images are missing", "ghost/0.jpg", "ghost/4.jpg",
        "and 2 more",
    )
    assert "ghost/5.jpg" not in message


@pytest.mark.parametrize(
    ("bad_row", "needle"),
    [
        ("alpha/000.jpg\talpha\ttrain", "split must be 'database' or 'query', got 'train'"),
        ("alpha/000.jpg alpha query", "expected 3 tab-separated columns"),
        ("alpha/000.jpg\talpha\tquery\textra", "got 4"),
        ("\talpha\tquery", "empty relative_path"),
        ("/abs/x.jpg\talpha\tquery", "must be relative"),
        ("beta/000.jpg\tbeta\tquery", "already listed on line 1"),
    ],
)
def test_splits_tsv_malformed_line(tmp_path: Path, bad_row: str, needle: str) -> None:
    rows = _splits_tsv_dataset(tmp_path)
    path = _write_tsv(tmp_path, rows)
    with open(path, "a") as fp:
        fp.write(bad_row + "\n")
    _one_line_error(tmp_path, f"splits.tsv:{len(rows) + 1}:", needle)


def test_splits_tsv_needs_two_classes_and_both_splits(tmp_path: Path) -> None:
    rows = _splits_tsv_dataset(tmp_path)
    _write_tsv(tmp_path, [r for r in rows if r[1] == "alpha"])
    _one_line_error(tmp_path, "splits.tsv: a hashing dataset needs at least 2 classes, found 1")
    _write_tsv(tmp_path, [r for r in rows if r[2] == "database"])
    _one_line_error(tmp_path, "splits.tsv: the query split is empty")
    _write_tsv(tmp_path, [])
    _one_line_error(tmp_path, "splits.tsv: lists no images")


def test_splits_tsv_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "splits.tsv").write_bytes(b"a\xff.jpg\talpha\tquery\n")
    _one_line_error(tmp_path, "splits.tsv", "not UTF-8")


def test_cub_errors(tmp_path: Path) -> None:
    _cub_dataset(tmp_path)
    (tmp_path / "train_test_split.txt").rename(tmp_path / "split.bak")
    _one_line_error(tmp_path, "train_test_split.txt missing")

    (tmp_path / "split.bak").rename(tmp_path / "train_test_split.txt")
    with open(tmp_path / "train_test_split.txt", "a") as fp:
        fp.write("16 2\n")
    _one_line_error(tmp_path, "train_test_split.txt:16:", "expected 0 or 1, got '2'")

    _cub_dataset(tmp_path)  # rewrites the index files
    lines = (tmp_path / "image_class_labels.txt").read_text().splitlines()
    (tmp_path / "image_class_labels.txt").write_text("\n".join(lines[:-1]) + "\n")
    _one_line_error(tmp_path, "image_class_labels.txt", "no entry for 1 image ids", "15")

    _cub_dataset(tmp_path)
    (tmp_path / "images" / "002.Laysan_Albatross" / "Laysan_Albatross_0001.jpg").unlink()
    missing = "images/002.Laysan_Albatross/Laysan_Albatross_0001.jpg"
    _one_line_error(tmp_path, "images.txt: 1 of 15 images", missing)


def test_folders_broken_symlink_is_reported(tmp_path: Path) -> None:
    _folder_dataset(tmp_path)
    (tmp_path / "train" / "alpha" / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    _one_line_error(tmp_path, "train/alpha/broken.jpg")


# --- hold-out -----------------------------------------------------------------------------


def _database() -> list[Sample]:
    # Class sizes 1, 2, 10 and 25 (interleaved to check the input order is kept).
    sizes = {0: 1, 1: 2, 2: 10, 3: 25}
    samples = [Sample(f"c{label}/{k:02d}.jpg", label) for label, n in sizes.items() for k in range(n)]
    return samples[::2] + samples[1::2]


def test_hold_out_is_stratified_disjoint_and_complete() -> None:
    samples = _database()
    train, val = hold_out_validation(samples, fraction=0.1, seed=0)
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(samples)
    # round(0.1 n) raised to 1, capped at n - 1; a single-image class stays in training.
    assert Counter(s.label for s in val) == {1: 1, 2: 1, 3: 3}
    assert {s.label for s in train} == {0, 1, 2, 3}
    # Both parts keep the input order.
    assert train == [s for s in samples if s in set(train)]
    assert val == [s for s in samples if s in set(val)]


def test_hold_out_is_deterministic_and_order_independent() -> None:
    samples = _database()
    first = hold_out_validation(samples, fraction=0.3, seed=5)
    assert hold_out_validation(samples, fraction=0.3, seed=5) == first
    _, val_reversed = hold_out_validation(samples[::-1], fraction=0.3, seed=5)
    assert set(val_reversed) == set(first[1])
    _, val_other = hold_out_validation(samples, fraction=0.3, seed=6)
    assert set(val_other) != set(first[1])


def test_hold_out_min_per_class_and_arguments() -> None:
    samples = _database()
    _, val = hold_out_validation(samples, fraction=0.01, min_per_class=4)
    assert Counter(s.label for s in val) == {1: 1, 2: 4, 3: 4}
    _, val = hold_out_validation(samples, fraction=0.01, min_per_class=0)
    assert val == []
    for kwargs in ({"fraction": 0.0}, {"fraction": 1.0}, {"min_per_class": -1}):
        with pytest.raises(ValueError):
            hold_out_validation(samples, **kwargs)


# --- LabeledImageDataset ------------------------------------------------------------------


@pytest.fixture
def tsv_dataset(tmp_path: Path) -> HashingDataset:
    _write_tsv(tmp_path, _splits_tsv_dataset(tmp_path))
    return load_dataset(tmp_path)


def test_eval_mode_equals_load_image(tsv_dataset: HashingDataset) -> None:
    ds = LabeledImageDataset(tsv_dataset.query, tsv_dataset.root, SMALL, train=False)
    assert len(ds) == len(tsv_dataset.query)
    for i, sample in enumerate(tsv_dataset.query):
        image, label, index = ds[i]
        assert torch.equal(image, load_image(tsv_dataset.root / sample.relpath, SMALL))
        assert (label, index) == (sample.label, i)


def test_train_mode_is_random_augmentation(tsv_dataset: HashingDataset) -> None:
    ds = LabeledImageDataset(tsv_dataset.database, tsv_dataset.root, SMALL, train=True)
    torch.manual_seed(0)
    first, label, index = ds[1]
    assert first.shape == (3, 32, 32) and first.dtype == torch.uint8
    assert (label, index) == (tsv_dataset.database[1].label, 1)
    torch.manual_seed(0)
    assert torch.equal(ds[1][0], first)
    torch.manual_seed(1)
    assert not torch.equal(ds[1][0], first)


def test_crop_scale_one_covers_the_whole_image(tmp_path: Path) -> None:
    # A square image with scale=(1, 1) and ratio 1 is resized whole: no randomness but the flip.
    _jpeg(tmp_path / "sq.jpg", seed=0, size=(40, 40))
    ds = LabeledImageDataset([Sample("sq.jpg", 0)], tmp_path, SMALL, train=True, crop_scale=(1.0, 1.0))
    outputs = set()
    for seed in range(8):
        torch.manual_seed(seed)
        outputs.add(ds[0][0].numpy().tobytes())
    assert len(outputs) == 2  # the image and its mirror


def test_dataset_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="crop_scale"):
        LabeledImageDataset([], tmp_path, SMALL, train=True, crop_scale=(0.5, 0.2))
    with pytest.raises(FghError, match="interpolation"):
        LabeledImageDataset([], tmp_path, PreprocessConfig(interpolation="lanczos"), train=True)


@pytest.mark.parametrize("train", [False, True])
def test_decode_failure_raises(tmp_path: Path, train: bool) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg at all")
    ds = LabeledImageDataset([Sample("bad.jpg", 0)], tmp_path, SMALL, train=train)
    with pytest.raises(ImageDecodeError, match="bad.jpg"):
        ds[0]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers(tsv_dataset: HashingDataset, context: str) -> None:
    if context not in multiprocessing.get_all_start_methods():
        pytest.skip(f"start method {context!r} unavailable")
    ds = LabeledImageDataset(tsv_dataset.database, tsv_dataset.root, SMALL, train=True)
    pickle.loads(pickle.dumps(ds))
    loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=context)
    images, labels, indices = zip(*loader)
    assert torch.cat(images).shape == (6, 3, 32, 32)
    assert torch.cat(indices).tolist() == list(range(6))
    assert torch.cat(labels).tolist() == [s.label for s in tsv_dataset.database]


def test_one_hot() -> None:
    encoded = one_hot([2, 0, 1], 4)
    assert encoded.dtype == torch.float32
    assert encoded.tolist() == [[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0]]
    assert one_hot(torch.tensor([3]), 4).shape == (1, 4)
    with pytest.raises(ValueError):
        one_hot([4], 4)


# --- real data ----------------------------------------------------------------------------


def test_cub100(cub100: Path) -> None:
    dataset = load_dataset(cub100)
    assert dataset.layout == "splits.tsv"
    assert dataset.num_classes == 100
    assert (len(dataset.database), len(dataset.query)) == (2958, 2944)
    assert dataset.classes == sorted(dataset.classes)
    train, val = hold_out_validation(dataset.database)
    assert len(train) + len(val) == 2958
    assert {s.label for s in val} == set(range(100))
    image, label, _ = LabeledImageDataset(dataset.query, dataset.root, PreprocessConfig(), train=False)[0]
    assert image.shape == (3, 224, 224) and label == dataset.query[0].label
