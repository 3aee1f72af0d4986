"""The generated demo dataset: deterministic, well-formed, and fine-grained by construction."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgh_deploy import demo_data
from fgh_deploy.demo_data import (
    CREST_COLOURS,
    DEMO_CLASSES,
    DEMO_VERSION,
    TAIL_SHAPES,
    WING_PATTERNS,
    demo_dataset_path,
    generate_demo_dataset,
    render_bird,
)
from fgh_deploy.errors import FghError
from fgh_deploy.train.data import load_dataset

# Small enough to generate in well under a second, big enough to have both splits per class.
SMALL = {"classes": 6, "per_class": 6, "size": 96}


def file_hashes(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "data", **SMALL)


def test_same_seed_gives_byte_identical_files(small: Path, tmp_path: Path) -> None:
    again = generate_demo_dataset(tmp_path / "again", **SMALL)
    first, second = file_hashes(small), file_hashes(again)
    assert len(first) == SMALL["classes"] * SMALL["per_class"] + 2  # + splits.tsv, README.txt
    assert first == second


def test_another_seed_gives_other_images(small: Path, tmp_path: Path) -> None:
    other = generate_demo_dataset(tmp_path / "other", seed=1, **SMALL)
    first, second = file_hashes(small), file_hashes(other)
    assert first.keys() == second.keys()
    images = [name for name in first if name.endswith(".jpg")]
    assert all(first[name] != second[name] for name in images)
    assert first["splits.tsv"] != second["splits.tsv"]  # the split is drawn with the seed too


def test_folders_splits_and_readme(small: Path) -> None:
    names = [cls.name for cls in DEMO_CLASSES[: SMALL["classes"]]]
    assert sorted(p.name for p in small.iterdir() if p.is_dir()) == sorted(names)
    for name in names:
        files = sorted(p.name for p in (small / name).iterdir())
        assert files == [f"{i:04d}.jpg" for i in range(SMALL["per_class"])]
        with Image.open(small / name / "0000.jpg") as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (96, 96))

    lines = (small / "splits.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "relative_path\tclass\tsplit"
    rows = [line.split("\t") for line in lines[1:]]
    assert all(rel.split("/")[0] == cls for rel, cls, _ in rows)
    for name in names:  # stratified: round(0.25 * 6) = 2 queries in every class
        assert sum(cls == name and split == "query" for _, cls, split in rows) == 2

    dataset = load_dataset(small)
    assert dataset.layout == "splits.tsv"
    assert dataset.classes == sorted(names)
    assert (len(dataset.database), len(dataset.query)) == (24, 12)

    readme = (small / "README.txt").read_text(encoding="utf-8")
    assert DEMO_VERSION in readme and "CC0" in readme
    assert all(name in readme for name in names)


def test_class_names_describe_distinct_attribute_combinations() -> None:
    assert len(DEMO_CLASSES) == 20
    assert len({cls.name for cls in DEMO_CLASSES}) == 20
    for cls in DEMO_CLASSES:
        assert cls.crest in CREST_COLOURS and cls.wing in WING_PATTERNS and cls.tail in TAIL_SHAPES
        assert cls.name == f"{cls.crest}-crest_{cls.wing}-wing_{cls.tail}-tail"
        # Fine-grained: every class has a look-alike that differs in a single part.
        assert any(len(cls.differs_from(other)) == 1 for other in DEMO_CLASSES)
    # Even the smallest versions have a one-part pair for each part.
    first = DEMO_CLASSES[0]
    assert [first.differs_from(other) for other in DEMO_CLASSES[1:4]] == [["crest"], ["wing"], ["tail"]]


def changed(a: Image.Image, b: Image.Image) -> np.ndarray:
    diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max(axis=-1)
    return diff > 40


@pytest.mark.parametrize("seed", [0, 7])
def test_classes_differ_only_in_their_part(seed: int) -> None:
    base = render_bird("red", "plain", "fan", seed=seed)
    assert np.array_equal(np.asarray(base), np.asarray(render_bird("red", "plain", "fan", seed=seed)))
    masks = {
        "crest": changed(base, render_bird("blue", "plain", "fan", seed=seed)),
        "wing": changed(base, render_bird("red", "barred", "fan", seed=seed)),
        "tail": changed(base, render_bird("red", "plain", "fork", seed=seed)),
    }
    centres = {}
    for part, mask in masks.items():
        # A visible change, confined to a small part of the picture.
        assert 0.002 < mask.mean() < 0.05, part
        ys, xs = np.nonzero(mask)
        centres[part] = np.array([ys.mean(), xs.mean()])
        spread = np.hypot(ys - ys.mean(), xs - xs.mean()).mean()
        assert spread < 0.15 * base.width, part
    # ... and each part changes a different place.
    for first, second in (("crest", "wing"), ("crest", "tail"), ("wing", "tail")):
        assert np.linalg.norm(centres[first] - centres[second]) > 0.1 * base.width


def test_colour_histograms_do_not_separate_the_classes(small: Path) -> None:
    dataset = load_dataset(small)

    def histogram(relpath: str) -> np.ndarray:
        with Image.open(small / relpath) as image:
            levels = np.asarray(image.convert("RGB")) // 64
        counts = np.bincount((levels[..., 0] * 16 + levels[..., 1] * 4 + levels[..., 2]).ravel(), minlength=64)
        return np.sqrt(counts / counts.sum())

    database = np.array([histogram(s.relpath) for s in dataset.database])
    queries = np.array([histogram(s.relpath) for s in dataset.query])
    nearest = ((queries[:, None] - database[None]) ** 2).sum(-1).argmin(axis=1)
    accuracy = np.mean([dataset.database[n].label == q.label for n, q in zip(nearest, dataset.query)])
    assert accuracy < 0.5  # body colour, background and lighting vary inside every class


def test_bad_arguments_and_non_empty_folder(tmp_path: Path) -> None:
    for kwargs in ({"classes": 1}, {"classes": 21}, {"per_class": 1}, {"size": 16}, {"query_fraction": 1.0}):
        with pytest.raises(ValueError):
            generate_demo_dataset(tmp_path / "x", **kwargs)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FghError, match="not an empty folder"):
        generate_demo_dataset(tmp_path / "full", **SMALL)
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    with pytest.raises(ValueError, match="unknown attributes"):
        render_bird("green", "plain", "fan")


@pytest.fixture
def tiny_generator(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Make demo_dataset_path generate a 2×2 dataset; returns the folders it generated into."""
    real = demo_data.generate_demo_dataset
    calls: list[Path] = []

    def tiny(out_dir: Path) -> Path:
        calls.append(Path(out_dir))
        return real(out_dir, classes=2, per_class=2, size=48)

    monkeypatch.setattr(demo_data, "generate_demo_dataset", tiny)
    return calls


def test_demo_dataset_path_generates_once_into_the_cache(
    tiny_generator: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FGH_CACHE", str(tmp_path / "cache"))
    root = demo_dataset_path()
    assert root == tmp_path / "cache" / DEMO_VERSION
    assert load_dataset(root).num_classes == 2
    assert os.listdir(tmp_path / "cache") == [DEMO_VERSION]  # no staging folder left
    umask = os.umask(0)
    os.umask(umask)
    assert root.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir makes it, not mkdtemp's 0700
    assert demo_dataset_path() == root
    assert len(tiny_generator) == 1  # the second call found it

    explicit = demo_dataset_path(tmp_path / "elsewhere")
    assert explicit == tmp_path / "elsewhere" / DEMO_VERSION
    assert len(tiny_generator) == 2


def test_interrupted_generation_leaves_no_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(out_dir: Path) -> Path:
        (Path(out_dir) / "red-crest_plain-wing_fan-tail").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_data, "generate_demo_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo_dataset_path(tmp_path)
    assert os.listdir(tmp_path) == []
