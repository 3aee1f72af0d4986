"""The one image preprocessing path: file → RGB → resized, center-cropped uint8 tensor.

Training evaluation, ``fgh encode`` and ``fgh query`` all go through :func:`load_image`
(or :class:`ImageBatchLoader`, which calls it in worker processes), so a database and
its queries are always preprocessed identically. Normalisation is not done here: it
lives inside the model graph, which takes raw uint8 pixels.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import struct
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from functools import partial
from typing import NamedTuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from fgh_deploy.config import PreprocessConfig
from fgh_deploy.errors import FghError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DecodeFailure",
    "ImageBatch",
    "ImageBatchLoader",
    "ImageDecodeError",
    "ImageFileDataset",
    "decode_image",
    "has_image_extension",
    "list_images",
    "load_image",
]

StrPath = Union[str, os.PathLike[str]]

logger = logging.getLogger(__name__)

#: Lower-case file extensions (with the dot) treated as images; matching is case-insensitive.
IMAGE_EXTENSIONS: tuple[str, ...] = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")

# Interpolations torchvision can apply to a uint8 tensor (box/hamming/lanczos are PIL-only).
_TENSOR_INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")

# Pillow's format plugins raise any of these on malformed data, not only OSError.
_PIL_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, ZeroDivisionError,
)

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_BOMB_MESSAGE = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+)")


def _display(path: StrPath | bytes) -> str:
    """Printable form of a path: undecodable bytes become ``\\xNN`` escapes, never a crash."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class ImageDecodeError(FghError):
    """An image file that cannot be turned into pixels.

    The message is one line, ``"<path>: <reason>"``; the parts are kept as ``path``
    and ``reason`` (the batch loader reports ``reason`` next to the index).
    """

    def __init__(self, path: StrPath | bytes, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{_display(path)}: {reason}")

    def __reduce__(self) -> tuple[type[ImageDecodeError], tuple[str | bytes, str]]:
        # The default reduce would call __init__ with the formatted message only.
        return type(self), (self.path, self.reason)


def has_image_extension(name: StrPath) -> bool:
    """Whether ``name`` ends in one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.fspath(name).lower().endswith(IMAGE_EXTENSIONS)


def _check_readable_file(path: StrPath) -> None:
    """Fail early, with a precise reason, on paths Pillow would misreport or block on.

    Raises:
        ImageDecodeError: missing file, broken symlink, directory, FIFO/device, empty file.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        reason = "broken symlink" if os.path.islink(path) else "no such file"
        raise ImageDecodeError(path, reason) from None
    except PermissionError:
        raise ImageDecodeError(path, "permission denied") from None
    except OSError as exc:
        reason = "symlink loop" if exc.errno == errno.ELOOP else f"cannot access ({exc.strerror or exc})"
        raise ImageDecodeError(path, reason) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageDecodeError(path, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        # Opening a FIFO would block forever; a device file is never an image.
        raise ImageDecodeError(path, "not a regular file")
    if st.st_size == 0:
        raise ImageDecodeError(path, "empty file (0 bytes)")


def _bomb_reason(exc: Exception) -> str:
    match = _BOMB_MESSAGE.search(str(exc))
    if match is None:
        return f"refused: {exc} (decompression bomb)"
    pixels, limit = match.groups()
    return f"refused: {pixels} pixels exceeds the {limit} limit (decompression bomb)"


def _decode_reason(exc: BaseException) -> str:
    message = " ".join(str(exc).split())  # one line, whatever the plugin wrote
    if isinstance(exc, EOFError) or "truncated" in message:
        return "truncated image"
    return f"corrupt image ({message or type(exc).__name__})"


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB."""
    if im.mode in _SIXTEEN_BIT_MODES:
        # Pillow's I;16 → L conversion clips at 255 instead of scaling, which would turn
        # nearly every 16-bit image white; map 0..65535 onto 0..255 instead.
        levels = np.asarray(im).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((levels + 128) // 257).astype(np.uint8)).convert("RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        # Composite on white: dropping alpha would expose whatever colour the transparent
        # pixels happen to store (usually black) and change the image's content.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


def decode_image(path: StrPath, min_size: int | None = None) -> Image.Image:
    """Decode an image file into an upright 8-bit RGB Pillow image.

    Handles every format Pillow reads (JPEG, PNG, WebP, BMP, GIF and TIFF use their first
    frame), applies the EXIF orientation, and converts grayscale, CMYK, palette, 16-bit
    and alpha images (composited on white) to RGB. The whole image is decoded here, so a
    truncated file fails here rather than later.

    Args:
        path: the image file.
        min_size: if given, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (much faster
            for large photos) as long as its short side stays >= ``min_size``.

    Returns:
        The decoded image, mode ``"RGB"``.

    Raises:
        ImageDecodeError: the file is missing, unreadable, empty, not an image, truncated,
            corrupt, or over Pillow's ``MAX_IMAGE_PIXELS`` (a possible decompression bomb).
        ValueError: ``min_size`` < 1.
    """
    if min_size is not None and min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    _check_readable_file(path)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open(path, "rb") as fp:
                # Not closing `im` on purpose: Image.close() would discard the pixel data.
                im = Image.open(fp)
                if min_size is not None and isinstance(im, JpegImagePlugin.JpegImageFile):
                    im.draft("RGB", (min_size, min_size))
                im.load()
                ImageOps.exif_transpose(im, in_place=True)
                return _to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(path, _bomb_reason(exc)) from None
    except PermissionError:
        raise ImageDecodeError(path, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image (cannot identify image file)") from None
    except _PIL_DECODE_ERRORS as exc:
        raise ImageDecodeError(path, _decode_reason(exc)) from exc


def _interpolation(name: str) -> InterpolationMode:
    if name not in _TENSOR_INTERPOLATIONS:
        choices = ", ".join(_TENSOR_INTERPOLATIONS)
        raise FghError(f"interpolation {name!r} is not supported; use one of {choices}")
    return InterpolationMode(name)


def load_image(path: StrPath, cfg: PreprocessConfig) -> torch.Tensor:
    """Decode, resize the short side to ``cfg.resize_size`` and center-crop ``cfg.input_size``.

    Args:
        path: the image file.
        cfg: the preprocessing settings stored with the model.

    Returns:
        A uint8 tensor of shape ``(3, cfg.input_size, cfg.input_size)`` (not normalised).

    Raises:
        ImageDecodeError: the file cannot be decoded (see :func:`decode_image`).
        FghError: ``cfg.interpolation`` is not one torchvision applies to tensors.
    """
    interpolation = _interpolation(cfg.interpolation)
    pixels = TF.pil_to_tensor(decode_image(path, min_size=cfg.resize_size))
    pixels = TF.resize(pixels, [cfg.resize_size], interpolation=interpolation, antialias=True)
    return TF.center_crop(pixels, [cfg.input_size, cfg.input_size])


def list_images(root: StrPath) -> list[str]:
    """List the image files under ``root``.

    Recurses into subfolders and follows directory symlinks, visiting each directory once
    (so symlink loops end); a directory reachable without symlinks is listed under that
    path, a symlink only adds directories found nowhere else. Hidden files and folders
    (``.name``) are skipped. A broken symlink with an image extension is listed so the
    caller can report it. Undecodable (non-UTF-8) names come back as ``os.fsdecode`` does
    them (surrogate escapes), so ``os.path.join(root, name)`` opens the file.

    Args:
        root: the folder to scan.

    Returns:
        Relative POSIX paths, sorted by their file-system bytes.

    Raises:
        FghError: ``root`` does not exist, is not a directory or cannot be read.
    """
    root = os.fsdecode(root)
    if not os.path.exists(root):
        raise FghError(f"{_display(root)}: no such directory")
    if not os.path.isdir(root):
        raise FghError(f"{_display(root)}: not a directory")

    found: list[str] = []
    # (st_dev, st_ino) identifies a directory whatever path reached it (symlink, bind mount).
    visited = {_dir_key(root)}
    plain: deque[str] = deque([""])  # dirs reached without symlinks: always walked first
    linked: deque[str] = deque()
    while plain or linked:
        if plain:
            rel = plain.popleft()
        else:
            rel = linked.popleft()
            key = _dir_key(os.path.join(root, rel))
            if key is None or key in visited:
                continue
            visited.add(key)
        for entry in _scan(root, rel):
            child = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError:  # e.g. a symlink loop on itself: handled like a broken link
                is_dir = is_file = False
            if is_dir and entry.is_symlink():
                linked.append(child)
            elif is_dir:
                key = _dir_key(entry.path)
                if key is not None and key not in visited:
                    visited.add(key)
                    plain.append(child)
            elif has_image_extension(entry.name) and (is_file or not os.path.exists(entry.path)):
                found.append(child)
    return sorted(found, key=os.fsencode)


def _dir_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _scan(root: str, rel: str) -> list[os.DirEntry[str]]:
    """Non-hidden entries of ``root/rel``; an unreadable subfolder is logged and skipped."""
    path = os.path.join(root, rel) if rel else root
    try:
        with os.scandir(path) as it:
            entries = [entry for entry in it if not entry.name.startswith(".")]
        # Sorted so that which symlink wins for a shared target does not depend on disk order.
        return sorted(entries, key=lambda entry: os.fsencode(entry.name))
    except PermissionError:
        if not rel:
            raise FghError(f"{_display(root)}: permission denied") from None
        logger.warning("%s: permission denied, folder skipped", _display(path))
    except OSError as exc:
        if not rel:
            raise FghError(f"{_display(root)}: cannot read ({exc.strerror or exc})") from None
        logger.warning("%s: cannot read (%s), folder skipped", _display(path), exc.strerror or exc)
    return []


class DecodeFailure(NamedTuple):
    """An image the batch loader dropped: its index in the input list and why."""

    index: int
    reason: str


class ImageBatch(NamedTuple):
    """One batch from :class:`ImageBatchLoader`.

    ``images[k]`` is the image of input ``indices[k]``; inputs that failed to decode are
    in ``failures`` instead. A batch may have no images (all failed) but is still yielded.
    """

    indices: list[int]
    images: torch.Tensor
    failures: list[DecodeFailure]


class ImageFileDataset(Dataset):
    """Map-style dataset over image files that reports failures instead of raising.

    Defined at module level so it pickles into 'spawn'/'forkserver' worker processes.

    Args:
        paths: image paths, relative to ``root`` when it is given.
        cfg: preprocessing settings.
        root: folder the paths are relative to (``None``: use paths as they are).
    """

    def __init__(self, paths: Sequence[StrPath], cfg: PreprocessConfig, root: StrPath | None = None) -> None:
        self.paths = [os.fspath(p) for p in paths]
        self.cfg = cfg
        self.root = None if root is None else os.fspath(root)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        """Return ``(index, image, None)``, or ``(index, None, reason)`` if it failed."""
        path = self.paths[index] if self.root is None else os.path.join(self.root, self.paths[index])
        try:
            return index, load_image(path, self.cfg), None
        except ImageDecodeError as exc:
            return index, None, exc.reason
        except Exception as exc:  # noqa: BLE001 - one odd file must not end a long encode run
            return index, None, f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())}"


def _collate(samples: list[tuple[int, torch.Tensor | None, str | None]], input_size: int) -> ImageBatch:
    indices = [index for index, image, _ in samples if image is not None]
    images = [image for _, image, _ in samples if image is not None]
    failures = [DecodeFailure(index, reason) for index, image, reason in samples if image is None]
    if images:
        stacked = torch.stack(images)
    else:  # keep the batch shape well-defined when every image failed
        stacked = torch.empty((0, 3, input_size, input_size), dtype=torch.uint8)
    return ImageBatch(indices, stacked, failures)


class ImageBatchLoader:
    """Decode images in parallel worker processes and yield them in input order.

    Built on :class:`torch.utils.data.DataLoader`: with ``num_workers > 0`` images are
    decoded in worker processes while the caller runs the model on the previous batch.
    Files that fail are dropped from their batch and reported in ``failures``; they never
    stop the iteration.

    Args:
        paths: image paths, relative to ``root`` when it is given (e.g. from :func:`list_images`).
        cfg: preprocessing settings.
        root: folder the paths are relative to (``None``: use paths as they are).
        batch_size: number of inputs per batch (before failures are removed).
        num_workers: decoding processes; 0 decodes in the calling process.
        pin_memory: return page-locked tensors for faster host-to-GPU copies (ignored
            without CUDA).
        multiprocessing_context: worker start method (``"fork"``, ``"spawn"``,
            ``"forkserver"``) or ``None`` for the platform default.

    Raises:
        ValueError: ``batch_size`` < 1 or ``num_workers`` < 0.
        FghError: ``cfg.interpolation`` is not supported.
    """

    def __init__(
        self,
        paths: Sequence[StrPath],
        cfg: PreprocessConfig,
        *,
        root: StrPath | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        multiprocessing_context: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        _interpolation(cfg.interpolation)  # fail once here, not once per image in the workers
        self.dataset = ImageFileDataset(paths, cfg, root)
        self._loader = DataLoader(
            self.dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=partial(_collate, input_size=cfg.input_size),
            # DataLoader warns on every iteration when asked to pin without an accelerator.
            pin_memory=pin_memory and torch.cuda.is_available(),
            # DataLoader rejects a start method when there are no worker processes.
            multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
        )

    def __len__(self) -> int:
        """Number of batches."""
        return len(self._loader)

    def __iter__(self) -> Iterator[ImageBatch]:
        return iter(self._loader)
