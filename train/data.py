"""Training data: find a dataset's database/query splits on disk and serve labelled images.

Four on-disk layouts are recognised by :func:`load_dataset`, tried in this order:

1. ``splits.tsv`` at the root: ``relative_path<TAB>class<TAB>database|query`` per line
   (the format of the prepared ``cub100`` data).
2. The official CUB-200-2011 layout: ``images.txt``, ``image_class_labels.txt``,
   ``train_test_split.txt`` (and optionally ``classes.txt``) with the images under
   ``images/``; the root may also be the folder that contains ``CUB_200_2011/``.
3. ``train/`` and ``test/`` folders in ImageFolder layout (one subfolder per class).
4. Class folders (``root/<class>/*.jpg``) without a split: a seeded, stratified split is drawn
   (:func:`hold_out_validation`); :func:`splits_tsv` writes it down in the format of layout 1,
   and ``load_dataset(root, splits=that_file)`` reads it back.

Following the fine-grained hashing protocol, the *database* is the training split and the
*query* set is the test split. :func:`hold_out_validation` carves a validation set out of
the database so that checkpoint selection never looks at the queries.

:class:`LabeledImageDataset` decodes through :mod:`fgh_deploy.images`, so evaluation images
are preprocessed exactly as ``fgh encode`` and ``fgh query`` preprocess them.
"""

from __future__ import annotations

import logging
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Union

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from fgh_deploy.config import PreprocessConfig
from fgh_deploy.errors import FghError

# The private helpers are shared on purpose: the same printable paths and the same set of
# supported interpolations as the encode/query path.
from fgh_deploy.images import _interpolation, decode_image, list_images, load_image
from fgh_deploy.utils import display_path

__all__ = [
    "CLASS_FOLDERS",
    "LAYOUTS",
    "HashingDataset",
    "LabeledImageDataset",
    "Sample",
    "hold_out_validation",
    "load_dataset",
    "one_hot",
    "splits_tsv",
]

StrPath = Union[str, os.PathLike[str]]

logger = logging.getLogger(__name__)

#: The layout of a class-folder tree whose split :func:`load_dataset` drew.
CLASS_FOLDERS = "class folders"
#: Layout names, in detection order (the value of :attr:`HashingDataset.layout`).
LAYOUTS: tuple[str, ...] = ("splits.tsv", "cub200", "train-test folders", CLASS_FOLDERS)

_SPLITS = ("database", "query")
_SPLITS_HEADER = ("relative_path", "class", "split")
_CUB_SUBFOLDER = "CUB_200_2011"
_CUB_REQUIRED = ("images.txt", "image_class_labels.txt", "train_test_split.txt")
# How many offending entries an error message lists before summarising the rest.
_MAX_LISTED = 5


class Sample(NamedTuple):
    """One labelled image: its path relative to the dataset root (POSIX separators) and class index."""

    relpath: str
    label: int


@dataclass
class HashingDataset:
    """A dataset split into a database (training split) and queries (test split).

    Attributes:
        root: the folder every :attr:`Sample.relpath` is relative to.
        layout: how it was found on disk, one of :data:`LAYOUTS`.
        classes: class names, sorted; ``classes[label]`` names a sample's label.
        database: the training split (hash codes are learned for these images).
        query: the test split (encoded by the network and searched against the database).
    """

    root: Path
    layout: str
    classes: list[str]
    database: list[Sample]
    query: list[Sample]

    @property
    def num_classes(self) -> int:
        """Number of classes (the width of one-hot labels)."""
        return len(self.classes)

    def summary(self) -> dict[str, Any]:
        """A JSON-serialisable description for logs and run metadata."""
        return {
            "root": display_path(self.root),
            "layout": self.layout,
            "num_classes": self.num_classes,
            "database": len(self.database),
            "query": len(self.query),
        }


def load_dataset(root: StrPath, *, splits: StrPath | None = None, split_seed: int = 0,
                 query_fraction: float = 0.2) -> HashingDataset:
    """Find and validate the dataset under ``root``, detecting its layout.

    The layouts are tried in the order of :data:`LAYOUTS` (see the module docstring). Every
    listed image must exist, there must be at least two classes, and both splits must be
    non-empty. Images are not decoded here.

    Args:
        root: the dataset folder.
        splits: a file in the splits.tsv format, paths relative to ``root``, to use instead of
            detecting a layout (the split a run drew from a class-folder tree).
        split_seed: seed of the split drawn from a class-folder tree.
        query_fraction: the share of each class such a split makes queries (a class of two or
            more images gives at least one, and keeps at least one in the database).

    Returns:
        The dataset, with classes sorted by name and labels indexing them.

    Raises:
        FghError: ``root`` is missing or not a folder, matches none of the layouts, or its
            index files are malformed or list missing images (one-line message naming the
            file).
    """
    root = Path(os.fspath(root))
    if not root.exists():
        raise FghError(f"{display_path(root)}: no such directory")
    if not root.is_dir():
        raise FghError(f"{display_path(root)}: not a directory")

    # `source` is the file the dataset-level errors below are reported against.
    if splits is not None:
        source = Path(os.fspath(splits))
        if not source.is_file():
            raise FghError(f"{display_path(source)}: the split file of {display_path(root)} is missing")
        dataset = _load_splits_tsv(root, source)
    elif (root / "splits.tsv").is_file():
        source = root / "splits.tsv"
        dataset = _load_splits_tsv(root, source)
    elif (cub_root := _find_cub_root(root)) is not None:
        source = cub_root / "images.txt"
        dataset = _load_cub(cub_root)
    elif (root / "train").is_dir() and (root / "test").is_dir():
        source = root
        dataset = _load_train_test_folders(root)
    else:
        for present, absent in (("train", "test"), ("test", "train")):
            if (root / present).is_dir():
                raise FghError(f"{display_path(root)}: has a {present}/ folder but no {absent}/ folder")
        source = root
        dataset = _split_class_folders(root, split_seed, query_fraction)
    _check_dataset(dataset, source)
    return dataset


def _listing(items: Sequence[object]) -> str:
    """``a, b, c`` for the first few items, then ``(and N more)``."""
    shown = ", ".join(str(item) for item in items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f" (and {len(items) - _MAX_LISTED} more)"
    return shown


def _read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, without line endings.

    Raises:
        FghError: unreadable, or not UTF-8.
    """
    try:
        # utf-8-sig: spreadsheets and Windows editors often prepend a byte-order mark.
        with open(path, encoding="utf-8-sig") as fp:
            return fp.read().splitlines()
    except UnicodeDecodeError as exc:
        raise FghError(f"{display_path(path)}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    except OSError as exc:
        raise FghError(f"{display_path(path)}: cannot read ({exc.strerror or exc})") from None


def _build(root: Path, layout: str, entries: dict[str, list[tuple[str, str]]]) -> HashingDataset:
    """Turn ``{split: [(relpath, class name)]}`` into a dataset with sorted class indices."""
    classes = sorted({name for split in _SPLITS for _, name in entries[split]})
    index = {name: label for label, name in enumerate(classes)}
    database, query = ([Sample(rel, index[name]) for rel, name in entries[split]] for split in _SPLITS)
    return HashingDataset(root=root, layout=layout, classes=classes, database=database, query=query)


def _check_dataset(dataset: HashingDataset, source: Path) -> None:
    """Checks common to all layouts: files exist, >= 2 classes, both splits non-empty.

    Args:
        dataset: the dataset to check.
        source: the index file (or folder) the errors name.

    Raises:
        FghError: a check failed.
    """
    where = display_path(source)
    missing = [
        sample.relpath
        for sample in (*dataset.database, *dataset.query)
        if not os.path.isfile(os.path.join(dataset.root, sample.relpath))
    ]
    if missing:
        total = len(dataset.database) + len(dataset.query)
        raise FghError(
            f"{where}: {len(missing)} of {total} images are missing under {display_path(dataset.root)}: "
            f"{_listing([display_path(rel) for rel in missing])}"
        )
    if dataset.num_classes < 2:
        raise FghError(f"{where}: a hashing dataset needs at least 2 classes, found {dataset.num_classes}")
    for split in _SPLITS:
        if not getattr(dataset, split):
            raise FghError(f"{where}: the {split} split is empty")


# --- splits.tsv ---------------------------------------------------------------------------


def _load_splits_tsv(root: Path, tsv: Path) -> HashingDataset:
    entries: dict[str, list[tuple[str, str]]] = {split: [] for split in _SPLITS}
    first_line: dict[str, int] = {}
    seen_content = False
    for lineno, line in enumerate(_read_lines(tsv), start=1):
        if not line.strip():
            continue
        fields = tuple(field.strip() for field in line.split("\t"))
        if not seen_content:
            seen_content = True
            if fields == _SPLITS_HEADER:
                continue
        where = f"{display_path(tsv)}:{lineno}"
        if len(fields) != 3:
            raise FghError(
                f"{where}: expected 3 tab-separated columns (relative_path, class, split), got {len(fields)}"
            )
        relpath, name, split = fields
        if not relpath or not name:
            raise FghError(f"{where}: empty {'relative_path' if not relpath else 'class'} column")
        if split not in _SPLITS:
            raise FghError(f"{where}: split must be 'database' or 'query', got {split!r}")
        if os.path.isabs(relpath):
            raise FghError(f"{where}: {relpath!r} must be relative to {display_path(root)}")
        if relpath in first_line:
            # The same image in both splits would leak queries into training.
            raise FghError(f"{where}: {relpath!r} is already listed on line {first_line[relpath]}")
        first_line[relpath] = lineno
        entries[split].append((relpath, name))
    if not first_line:
        raise FghError(f"{display_path(tsv)}: lists no images")
    return _build(root, "splits.tsv", entries)


# --- CUB-200-2011 -------------------------------------------------------------------------


def _find_cub_root(root: Path) -> Path | None:
    """``root`` or ``root/CUB_200_2011`` when it has ``images.txt`` (the CUB marker file)."""
    for candidate in (root, root / _CUB_SUBFOLDER):
        if (candidate / "images.txt").is_file():
            return candidate
    return None


def _read_id_table(path: Path) -> dict[int, tuple[int, str]]:
    """Parse ``<id> <value>`` lines into ``{id: (line number, value)}``.

    The value is everything after the first run of whitespace, so it may contain spaces
    (NABirds class names do).

    Raises:
        FghError: a line without a value, a non-integer id, or a repeated id.
    """
    table: dict[int, tuple[int, str]] = {}
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        where = f"{display_path(path)}:{lineno}"
        if len(parts) != 2:
            raise FghError(f"{where}: expected '<id> <value>', got {line.strip()!r}")
        try:
            key = int(parts[0])
        except ValueError:
            raise FghError(f"{where}: id must be an integer, got {parts[0]!r}") from None
        if key in table:
            raise FghError(f"{where}: id {key} is already on line {table[key][0]}")
        table[key] = (lineno, parts[1].strip())
    return table


def _int_values(
    path: Path, table: dict[int, tuple[int, str]], allowed: set[int] | None = None
) -> dict[int, int]:
    """The values of an id table as integers in ``allowed``, or positive when it is ``None``."""
    expected = "a positive integer" if allowed is None else " or ".join(map(str, sorted(allowed)))
    values: dict[int, int] = {}
    for key, (lineno, text) in table.items():
        try:
            value: int | None = int(text)
        except ValueError:
            value = None
        if value is None or ((value not in allowed) if allowed is not None else value < 1):
            raise FghError(f"{display_path(path)}:{lineno}: expected {expected}, got {text!r}")
        values[key] = value
    return values


def _check_same_ids(images_txt: Path, other: Path, image_ids: set[int], other_ids: set[int]) -> None:
    if missing := sorted(image_ids - other_ids):
        raise FghError(
            f"{display_path(other)}: no entry for {len(missing)} image ids of images.txt: {_listing(missing)}"
        )
    if extra := sorted(other_ids - image_ids):
        raise FghError(
            f"{display_path(other)}: {len(extra)} ids not in {display_path(images_txt)}: {_listing(extra)}"
        )


def _load_cub(cub_root: Path) -> HashingDataset:
    missing_files = [name for name in _CUB_REQUIRED if not (cub_root / name).is_file()]
    if missing_files:
        raise FghError(
            f"{display_path(cub_root)}: looks like CUB-200-2011 (has images.txt) "
            f"but {', '.join(missing_files)} missing"
        )
    images_txt, labels_txt, split_txt = (cub_root / name for name in _CUB_REQUIRED)
    images = _read_id_table(images_txt)
    labels = _int_values(labels_txt, _read_id_table(labels_txt))
    is_train = _int_values(split_txt, _read_id_table(split_txt), allowed={0, 1})
    _check_same_ids(images_txt, labels_txt, set(images), set(labels))
    _check_same_ids(images_txt, split_txt, set(images), set(is_train))

    # Only classes that have images: NABirds' classes.txt also lists the inner nodes of its
    # taxonomy, which would otherwise become empty classes.
    used = sorted(set(labels.values()))
    classes_txt = cub_root / "classes.txt"
    if classes_txt.is_file():
        named = {key: name for key, (_, name) in _read_id_table(classes_txt).items()}
        if unnamed := [key for key in used if key not in named]:
            raise FghError(f"{display_path(classes_txt)}: no name for class ids {_listing(unnamed)}")
        names = {key: named[key] for key in used}
        by_name: dict[str, int] = {}
        for key, name in names.items():
            if name in by_name:
                raise FghError(
                    f"{display_path(classes_txt)}: class ids {by_name[name]} and {key} are both named {name!r}"
                )
            by_name[name] = key
    else:
        # Zero-padded ids sort as strings in numeric order, so label order = class id order.
        width = len(str(used[-1])) if used else 1
        names = {key: f"{key:0{width}d}" for key in used}

    entries: dict[str, list[tuple[str, str]]] = {split: [] for split in _SPLITS}
    seen: dict[str, int] = {}
    for key, (lineno, relpath) in sorted(images.items()):
        if relpath in seen:
            raise FghError(
                f"{display_path(images_txt)}:{lineno}: {relpath!r} is already listed for image id {seen[relpath]}"
            )
        seen[relpath] = key
        split = "database" if is_train[key] == 1 else "query"
        entries[split].append((f"images/{relpath}", names[labels[key]]))
    return _build(cub_root, "cub200", entries)


# --- train/ + test/ folders ---------------------------------------------------------------


def _load_train_test_folders(root: Path) -> HashingDataset:
    entries: dict[str, list[tuple[str, str]]] = {}
    for split, folder in zip(_SPLITS, ("train", "test")):
        entries[split] = []
        outside = 0
        for relpath in list_images(root / folder):
            name, sep, _ = relpath.partition("/")
            if not sep:
                # Like torchvision's ImageFolder: an image outside a class folder has no label.
                outside += 1
                continue
            entries[split].append((f"{folder}/{relpath}", name))
        if outside:
            logger.warning("%s: %d images outside any class folder ignored", display_path(root / folder), outside)
    return _build(root, "train-test folders", entries)


# --- class folders -----------------------------------------------------------------------


def _class_folder_entries(root: Path) -> list[tuple[str, str]]:
    """``(relpath, class)`` of the images in the subfolders of ``root``, by path."""
    entries, outside = [], 0
    for relpath in list_images(root):
        name, sep, _ = relpath.partition("/")
        if not sep:
            outside += 1  # an image outside a class folder has no label
            continue
        if not _recordable(relpath):
            raise FghError(f"{display_path(root / relpath)}: a name with a tab, line break, surrounding space or "
                           f"undecodable byte cannot be written to a splits.tsv; rename it")
        entries.append((relpath, name))
    if not entries:
        raise FghError(
            f"{display_path(root)}: unrecognised dataset layout; expected one of: "
            "splits.tsv (relative_path<TAB>class<TAB>database|query), "
            "CUB-200-2011 (images.txt, image_class_labels.txt, train_test_split.txt, images/), "
            "train/ and test/ folders with one subfolder per class, "
            "or one subfolder of images per class"
        )
    if outside:
        logger.warning("%s: %d images outside any class folder ignored", display_path(root), outside)
    return sorted(entries)


def _recordable(relpath: str) -> bool:
    """Whether ``relpath`` and its class survive a round trip through a splits.tsv line."""
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of the file name, kept as surrogates
        return False
    fields = (relpath, relpath.partition("/")[0])
    return all("\t" not in text and text.splitlines() == [text] and text == text.strip() for text in fields)


def _split_class_folders(root: Path, seed: int, query_fraction: float) -> HashingDataset:
    """A class-folder tree split per class into database and query (see :func:`hold_out_validation`)."""
    entries = _class_folder_entries(root)
    classes = sorted({name for _, name in entries})
    index = {name: label for label, name in enumerate(classes)}
    database, query = hold_out_validation([Sample(rel, index[name]) for rel, name in entries],
                                          query_fraction, seed=seed)
    return HashingDataset(root=root, layout=CLASS_FOLDERS, classes=classes, database=database, query=query)


def splits_tsv(dataset: HashingDataset) -> str:
    """The dataset's split in the splits.tsv format (header, then database, then query lines)."""
    lines = ["\t".join(_SPLITS_HEADER)]
    for split in _SPLITS:
        lines += [f"{sample.relpath}\t{dataset.classes[sample.label]}\t{split}" for sample in getattr(dataset, split)]
    return "\n".join(lines) + "\n"


# --- validation hold-out ------------------------------------------------------------------


def hold_out_validation(
    samples: Sequence[Sample], fraction: float = 0.1, seed: int = 0, min_per_class: int = 1
) -> tuple[list[Sample], list[Sample]]:
    """Split the database into training and validation samples, stratified by class.

    The validation part is for choosing the best checkpoint without looking at the query
    split (the official code selects on the queries, which flatters its numbers).

    Each class with ``n >= 2`` images gives ``round(fraction * n)`` of them to validation,
    raised to ``min_per_class`` but capped at ``n - 1``, so every such class keeps at least
    one training image; a class with a single image stays in training. Which images go is
    drawn with ``random.Random(seed)``, one generator for all classes visited in label
    order, each class's images sorted by path first: the result depends only on the set of
    samples and the seed, not on their order. Both returned lists keep the input order.

    Args:
        samples: the database samples.
        fraction: the share of each class to hold out, ``0 < fraction < 1``.
        seed: seed of the draw.
        min_per_class: the fewest validation images a class with ``>= 2`` images gets.

    Returns:
        ``(train_samples, val_samples)``, disjoint, together ``samples``.

    Raises:
        ValueError: ``fraction`` outside ``(0, 1)`` or ``min_per_class < 0``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if min_per_class < 0:
        raise ValueError(f"min_per_class must be >= 0, got {min_per_class}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for position, sample in enumerate(samples):
        by_class[sample.label].append(position)

    rng = random.Random(seed)
    held_out: set[int] = set()
    for label in sorted(by_class):
        positions = sorted(by_class[label], key=lambda p: (samples[p].relpath, p))
        count = len(positions)
        if count < 2:
            continue
        # int(x + 0.5) rounds halves up; round() would round them to even.
        n_val = min(max(int(fraction * count + 0.5), min_per_class), count - 1)
        rng.shuffle(positions)
        held_out.update(positions[:n_val])
    train = [sample for position, sample in enumerate(samples) if position not in held_out]
    val = [sample for position, sample in enumerate(samples) if position in held_out]
    return train, val


# --- images -------------------------------------------------------------------------------


class LabeledImageDataset(Dataset):
    """Map-style dataset of labelled images for training and evaluation.

    ``dataset[i]`` is ``(image, label, i)`` with ``image`` a uint8 tensor of shape
    ``(3, cfg.input_size, cfg.input_size)`` (not normalised: models normalise inside), and
    ``i`` the sample index (the trainer needs it to address rows of the database codes).

    * Eval mode is exactly :func:`fgh_deploy.images.load_image` (resize the short side to
      ``cfg.resize_size``, center-crop ``cfg.input_size``), the path ``fgh encode`` and
      ``fgh query`` use.
    * Train mode decodes with :func:`fgh_deploy.images.decode_image` at full resolution
      (as the reference code does), then applies ``RandomResizedCrop(cfg.input_size,
      scale=crop_scale)`` with antialiasing and ``RandomHorizontalFlip``. The randomness
      comes from torch's global generator, which DataLoader seeds per worker.

    Unlike :class:`fgh_deploy.images.ImageFileDataset`, a file that fails to decode raises
    :class:`~fgh_deploy.images.ImageDecodeError`: silently dropping a training image would
    shift the sample indices the database codes are addressed by, so the trainer reports
    the file and stops instead. Defined at module level and holding only picklable state,
    so it works in 'fork' and 'spawn' DataLoader workers.

    Args:
        samples: the samples to serve.
        root: the folder the sample paths are relative to.
        cfg: preprocessing settings (output size, eval resize, interpolation).
        train: random training augmentation instead of the deterministic eval transform.
        crop_scale: ``(min, max)`` area fraction of the random crop (train mode only).

    Raises:
        FghError: ``cfg.interpolation`` is not supported.
        ValueError: ``crop_scale`` is not ``0 < min <= max <= 1``.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        root: StrPath,
        cfg: PreprocessConfig,
        train: bool,
        crop_scale: tuple[float, float] = (0.08, 1.0),
    ) -> None:
        low, high = crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        interpolation = _interpolation(cfg.interpolation)  # fail here, not once per image in workers
        self.samples = [Sample(relpath, int(label)) for relpath, label in samples]
        self.root = os.fspath(root)
        self.cfg = cfg
        self.train = train
        self.crop_scale = (float(low), float(high))
        self.augment = v2.Compose([
            v2.RandomResizedCrop(
                cfg.input_size, scale=self.crop_scale, interpolation=interpolation, antialias=True
            ),
            v2.RandomHorizontalFlip(),
        ])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        """Return ``(image, label, index)``.

        Raises:
            ImageDecodeError: the file cannot be decoded.
        """
        relpath, label = self.samples[index]
        path = os.path.join(self.root, relpath)
        if not self.train:
            return load_image(path, self.cfg), label, index
        pixels = TF.pil_to_tensor(decode_image(path))
        return self.augment(pixels), label, index


def one_hot(labels: Sequence[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot encode class indices.

    Args:
        labels: class indices in ``[0, num_classes)``.
        num_classes: the number of classes (columns).

    Returns:
        A float32 tensor of shape ``(len(labels), num_classes)``.

    Raises:
        ValueError: a label outside ``[0, num_classes)``.
    """
    indices = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"labels must be in [0, {num_classes}), got values in [{low}, {high}]")
    return torch.nn.functional.one_hot(indices, num_classes).float()
