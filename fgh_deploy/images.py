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
import signal
import stat
import struct
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from functools import partial
from typing import NamedTuple, Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, JpegImagePlugin, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from fgh_deploy.config import INTERPOLATIONS, PreprocessConfig
from fgh_deploy.errors import FghError
from fgh_deploy.utils import display_path

__all__ = [
    "IMAGE_EXTENSIONS",
    "DecodeFailure",
    "ImageBatch",
    "ImageBatchLoader",
    "ImageDecodeError",
    "ImageFileDataset",
    "ImageScan",
    "LINK_NOT_FOLLOWED",
    "MAX_FULL_RESIZE_RATIO",
    "RawJpeg",
    "decode_image",
    "decode_jpegs",
    "has_image_extension",
    "list_images",
    "load_image",
    "long_side_crop_box",
    "preprocess_image",
    "read_plain_jpeg",
    "scan_images",
]

StrPath = Union[str, os.PathLike[str]]

logger = logging.getLogger(__name__)

#: Lower-case file extensions (with the dot) treated as images; matching is case-insensitive.
IMAGE_EXTENSIONS: tuple[str, ...] = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")

# Interpolations torchvision can apply to a uint8 tensor (box/hamming/lanczos are PIL-only).
# Pillow's format plugins raise any of these on malformed data, not only OSError.
_PIL_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, ZeroDivisionError,
)

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_BOMB_MESSAGE = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+)")


class ImageDecodeError(FghError):
    """An image file that cannot be turned into pixels.

    The message is one line, ``"<path>: <reason>"``; the parts are kept as ``path``
    and ``reason`` (the batch loader reports ``reason`` next to the index).
    """

    def __init__(self, path: StrPath | bytes, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{display_path(path)}: {reason}")

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
    if name not in INTERPOLATIONS:
        choices = ", ".join(INTERPOLATIONS)
        raise FghError(f"interpolation {name!r} is not supported; use one of {choices}")
    return InterpolationMode(name)


def load_image(path: StrPath, cfg: PreprocessConfig) -> torch.Tensor:
    """Decode, resize the short side to ``cfg.resize_size`` and center-crop ``cfg.input_size``.

    Memory and time stay bounded whatever the aspect ratio (see :func:`preprocess_image`).

    Args:
        path: the image file.
        cfg: the preprocessing settings stored with the model.

    Returns:
        A uint8 tensor of shape ``(3, cfg.input_size, cfg.input_size)`` (not normalised).

    Raises:
        ImageDecodeError: the file cannot be decoded (see :func:`decode_image`).
        FghError: ``cfg.interpolation`` is not one torchvision applies to tensors.
    """
    return preprocess_image(decode_image(path, min_size=cfg.resize_size), cfg)


# Up to this aspect ratio the whole image is resized, exactly as torchvision's Resize and
# CenterCrop do. Beyond it the resized long side would grow without bound (a 20000 x 1 image
# resized to a 256-pixel short side is 5 million pixels long), so only the part the crop keeps
# is resampled and the intermediate stays within this ratio x resize_size² pixels.
MAX_FULL_RESIZE_RATIO = 4

_PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def preprocess_image(image: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """Resize the short side of a decoded RGB image to ``cfg.resize_size``, center-crop ``cfg.input_size``.

    Past :data:`MAX_FULL_RESIZE_RATIO`, Pillow first resamples the long side straight to the
    crop (``Image.resize`` with a ``box``: the same sample positions as resizing the whole
    side and cropping, reading only the source pixels under the kernel); torchvision then
    resizes the short side as usual. With bilinear interpolation (the default) Pillow's and
    torchvision's filters agree to within one grey level, so such images differ from the
    whole-image resize by at most that; bicubic differs more where the kernel overshoots, and
    the nearest modes may pick the neighbouring source pixel where a sample lands exactly
    between two (Pillow computes positions in double precision, torchvision in single).

    Returns:
        A uint8 tensor of shape ``(3, cfg.input_size, cfg.input_size)``.

    Raises:
        FghError: ``cfg.interpolation`` is not one torchvision applies to tensors.
    """
    interpolation = _interpolation(cfg.interpolation)
    box = long_side_crop_box(image.width, image.height, cfg)
    if box is None:
        return _resize_crop(TF.pil_to_tensor(image), cfg)
    if image.width > image.height:
        narrowed = image.resize((cfg.input_size, image.height), _PIL_RESAMPLE[cfg.interpolation], box=box)
        size = [cfg.resize_size, cfg.input_size]
    else:
        narrowed = image.resize((image.width, cfg.input_size), _PIL_RESAMPLE[cfg.interpolation], box=box)
        size = [cfg.input_size, cfg.resize_size]
    pixels = TF.resize(TF.pil_to_tensor(narrowed), size, interpolation=interpolation, antialias=True)
    return TF.center_crop(pixels, [cfg.input_size, cfg.input_size])


def long_side_crop_box(width: int, height: int, cfg: PreprocessConfig) -> tuple[float, float, float, float] | None:
    """The source region (Pillow box: left, top, right, bottom) whose long side survives the center crop.

    ``None`` up to :data:`MAX_FULL_RESIZE_RATIO`, where the whole image is resized. The box
    spans the whole short side and, on the long side, the ``cfg.input_size`` resized pixels
    the crop keeps, in source coordinates.
    """
    short, long = sorted((width, height))
    resized_long = int(cfg.resize_size * long / short)  # torchvision's rule for resize([size])
    if resized_long <= MAX_FULL_RESIZE_RATIO * cfg.resize_size:
        return None
    scale = long / resized_long
    kept_from = int(round((resized_long - cfg.input_size) / 2.0))  # torchvision's center_crop offset
    # Pillow's nearest takes source pixel floor(start + (i + 0.5) * scale), torchvision's legacy
    # "nearest" floor(i * scale): start half a resized pixel earlier to pick the same pixels.
    if cfg.interpolation == "nearest":
        kept_from -= 0.5
    start, end = kept_from * scale, (kept_from + cfg.input_size) * scale
    return (start, 0.0, end, float(height)) if width > height else (0.0, start, float(width), end)


def _resize_crop(pixels: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """Resize the short side of a ``(3, H, W)`` uint8 image to ``cfg.resize_size``, center-crop ``cfg.input_size``."""
    pixels = TF.resize(pixels, [cfg.resize_size], interpolation=_interpolation(cfg.interpolation), antialias=True)
    return TF.center_crop(pixels, [cfg.input_size, cfg.input_size])


class RawJpeg(NamedTuple):
    """A JPEG file's bytes, read by a worker for decoding on the device (see :class:`ImageBatchLoader`)."""

    data: torch.Tensor
    orientation: int


# EXIF orientation → the tensor operation Pillow's exif_transpose applies ((C, H, W) layout).
_ORIENT = {
    2: lambda t: t.flip(-1),
    3: lambda t: t.flip(-2, -1),
    4: lambda t: t.flip(-2),
    5: lambda t: t.transpose(-2, -1),
    6: lambda t: t.rot90(-1, (-2, -1)),
    7: lambda t: t.transpose(-2, -1).flip(-2, -1),
    8: lambda t: t.rot90(1, (-2, -1)),
}


def read_plain_jpeg(path: StrPath, cfg: PreprocessConfig | None = None) -> RawJpeg | None:
    """The bytes and EXIF orientation of a JPEG that :func:`decode_jpeg` turns into the same
    RGB pixels as :func:`decode_image`; ``None`` for anything else (other formats, CMYK, files
    Pillow cannot even open), which then takes the Pillow path and its error messages.

    Only the header is parsed, so a decompression bomb is refused here without decoding. A
    file that does not end with the JPEG end marker takes the Pillow path too, and so, with
    ``cfg``, does an aspect ratio past :data:`MAX_FULL_RESIZE_RATIO` (the device path resizes
    whole images; :func:`preprocess_image` keeps those bounded).
    """
    try:
        _check_readable_file(path)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open(path, "rb") as fp, Image.open(fp) as im:
                if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                    return None
                if cfg is not None and long_side_crop_box(im.width, im.height, cfg) is not None:
                    return None
                orientation = int(im.getexif().get(ExifTags.Base.Orientation, 1))
                fp.seek(0)
                data = fp.read()
    except Exception:  # noqa: BLE001 - the Pillow path reports why
        return None
    if not data.endswith(b"\xff\xd9"):
        # Truncated (or trailing bytes): Pillow refuses a truncated file, where a device
        # decoder might return the part it got.
        return None
    return RawJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation)


def decode_jpegs(raw: Sequence[RawJpeg], device: torch.device | str) -> list[torch.Tensor | None]:
    """Decode JPEG bytes on ``device`` (nvJPEG on CUDA) into upright RGB ``(3, H, W)`` uint8 tensors.

    One batched call; if it fails (one bad file fails the whole call), each file is decoded
    alone and the ones that still fail come back as ``None``.
    """
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec (not a dependency
        # of ours); they still work as documented.
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
        try:
            images: list[torch.Tensor | None] = list(
                decode_jpeg([r.data for r in raw], mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            images = []
            for r in raw:
                try:
                    images.append(decode_jpeg(r.data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    images.append(None)
    return [None if image is None else _ORIENT.get(r.orientation, lambda t: t)(image)
            for image, r in zip(images, raw)]


class ImageScan(NamedTuple):
    """What :func:`scan_images` found under a folder.

    ``paths``: relative POSIX paths of the image files, sorted by their file-system bytes.
    ``skipped``: ``(relative path, reason)`` for what was left out that a user would expect
    in: entries with an image extension that are not regular files or cannot be reached,
    directory symlinks not followed, and subfolders that cannot be read; same order.
    """

    paths: list[str]
    skipped: list[tuple[str, str]]


LINK_NOT_FOLLOWED = "symlink to a directory: not followed (use --follow-links)"

# How a non-regular file is named in a skip reason; a FIFO is never opened (that would block).
_SPECIAL_FILE_KINDS = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def scan_images(root: StrPath, *, follow_links: bool = False) -> ImageScan:
    """Find the image files under ``root`` and say what was left out, and why.

    Recurses into subfolders (a folder named like an image, ``x.jpg/``, is walked as a
    folder). Hidden files and folders (``.name``) are ignored. Directory symlinks are not
    descended into unless ``follow_links``; then each directory is visited once (so symlink
    loops end), a directory reachable without symlinks is listed under that path and a
    symlink only adds directories found nowhere else. Symlinked files are listed when their
    target is a regular file. A broken symlink with an image extension is listed so the
    caller can report it when decoding. Every path is relative to ``root``, without ``..``.
    Undecodable (non-UTF-8) names come back as ``os.fsdecode`` does them (surrogate
    escapes), so ``os.path.join(root, name)`` opens the file.

    Args:
        root: the folder to scan.
        follow_links: descend into symlinked directories.

    Returns:
        The image paths and the skipped entries.

    Raises:
        FghError: ``root`` does not exist, is not a directory or cannot be read.
    """
    root = os.fsdecode(root)
    if not os.path.exists(root):
        raise FghError(f"{display_path(root)}: no such directory")
    if not os.path.isdir(root):
        raise FghError(f"{display_path(root)}: not a directory")

    found: list[str] = []
    skipped: list[tuple[str, str]] = []
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
        for entry in _scan(root, rel, skipped):
            child = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir()
            except OSError:  # e.g. a symlink loop on itself: handled like a broken link
                is_dir = False
            if is_dir and entry.is_symlink():
                if follow_links:
                    linked.append(child)
                else:
                    skipped.append((child, LINK_NOT_FOLLOWED))
            elif is_dir:
                key = _dir_key(entry.path)
                if key is None:
                    # Cannot be stat-ed (e.g. path too long): still tried, so that reading
                    # it fails and lands in ``skipped`` with the reason.
                    plain.append(child)
                elif key not in visited:
                    visited.add(key)
                    plain.append(child)
            elif has_image_extension(entry.name):
                reason = _not_an_image_file(entry)
                if reason is None:
                    found.append(child)
                else:
                    skipped.append((child, reason))
    return ImageScan(sorted(found, key=os.fsencode), sorted(skipped, key=lambda item: os.fsencode(item[0])))


def list_images(root: StrPath, *, follow_links: bool = False) -> list[str]:
    """The image paths of :func:`scan_images` (relative POSIX paths, sorted by file-system bytes)."""
    return scan_images(root, follow_links=follow_links).paths


def _not_an_image_file(entry: os.DirEntry[str]) -> str | None:
    """Why an entry with an image extension cannot be listed; ``None`` if it can."""
    try:
        st = entry.stat()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP):
            return None  # broken or looping symlink: decoding names it precisely
        if exc.errno == errno.ENAMETOOLONG:
            return "path too long for the file system (ENAMETOOLONG)"
        return f"cannot access ({exc.strerror or exc})"
    if stat.S_ISREG(st.st_mode):
        return None
    kind = next((name for is_kind, name in _SPECIAL_FILE_KINDS if is_kind(st.st_mode)), "unknown type")
    return f"not a regular file ({kind})"


def _dir_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _scan(root: str, rel: str, skipped: list[tuple[str, str]]) -> list[os.DirEntry[str]]:
    """Non-hidden entries of ``root/rel``; an unreadable subfolder is logged, added to ``skipped`` and left out."""
    path = os.path.join(root, rel) if rel else root
    try:
        with os.scandir(path) as it:
            entries = [entry for entry in it if not entry.name.startswith(".")]
        # Sorted so that which symlink wins for a shared target does not depend on disk order.
        return sorted(entries, key=lambda entry: os.fsencode(entry.name))
    except PermissionError:
        if not rel:
            raise FghError(f"{display_path(root)}: permission denied") from None
        reason = "permission denied"
    except OSError as exc:
        if not rel:
            raise FghError(f"{display_path(root)}: cannot read ({exc.strerror or exc})") from None
        reason = ("path too long for the file system (ENAMETOOLONG)" if exc.errno == errno.ENAMETOOLONG
                  else f"cannot read ({exc.strerror or exc})")
    logger.warning("%s: %s, folder skipped", display_path(path), reason)
    skipped.append((rel, f"folder skipped: {reason}"))
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
        raw_jpegs: return plain JPEGs undecoded, as :class:`RawJpeg`, for decoding on a device.
    """

    def __init__(self, paths: Sequence[StrPath], cfg: PreprocessConfig, root: StrPath | None = None,
                 raw_jpegs: bool = False) -> None:
        self.paths = [os.fspath(p) for p in paths]
        self.cfg = cfg
        self.root = None if root is None else os.fspath(root)
        self.raw_jpegs = raw_jpegs

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        return self.paths[index] if self.root is None else os.path.join(self.root, self.paths[index])

    def __getitem__(self, index: int) -> _Item:
        """The image (or :class:`RawJpeg`) at ``index``, or why it failed, with the time it took."""
        path = self.path(index)
        start = time.perf_counter()
        if self.raw_jpegs and (raw := read_plain_jpeg(path, self.cfg)) is not None:
            return _Item(index, raw, None, time.perf_counter() - start, 0.0)
        return _load_timed(index, path, self.cfg)


class _Item(NamedTuple):
    """One dataset entry: exactly one of ``image`` and ``reason`` is set."""

    index: int
    image: torch.Tensor | RawJpeg | None
    reason: str | None
    decode_seconds: float
    preprocess_seconds: float


def _load_timed(index: int, path: str, cfg: PreprocessConfig) -> _Item:
    """:func:`load_image` that reports a failure instead of raising, timing decode and resize apart."""
    start = time.perf_counter()
    try:
        decoded = decode_image(path, min_size=cfg.resize_size)
        middle = time.perf_counter()
        return _Item(index, preprocess_image(decoded, cfg), None, middle - start, time.perf_counter() - middle)
    except ImageDecodeError as exc:
        reason = exc.reason
    except Exception as exc:  # noqa: BLE001 - one odd file must not end a long encode run
        reason = f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())}"
    return _Item(index, None, reason, time.perf_counter() - start, 0.0)


def _stack(images: list[torch.Tensor], input_size: int) -> torch.Tensor:
    if images:
        return torch.stack(images)
    # Keep the batch shape well-defined when every image failed.
    return torch.empty((0, 3, input_size, input_size), dtype=torch.uint8)


def _collate(items: list[_Item], input_size: int) -> _Collated:
    decoded = [item for item in items if isinstance(item.image, torch.Tensor)]
    return _Collated(
        [item.index for item in decoded],
        _stack([item.image for item in decoded], input_size),
        [DecodeFailure(item.index, item.reason) for item in items if item.image is None],
        [(item.index, item.image) for item in items if isinstance(item.image, RawJpeg)],
        sum(item.decode_seconds for item in items),
        sum(item.preprocess_seconds for item in items),
    )


class _Collated(NamedTuple):
    """A worker's batch: decoded images, failures, and JPEGs left for the device."""

    indices: list[int]
    images: torch.Tensor
    failures: list[DecodeFailure]
    raw: list[tuple[int, RawJpeg]]
    decode_seconds: float
    preprocess_seconds: float


class ImageBatchLoader:
    """Decode images in parallel worker processes and yield them in input order.

    Built on :class:`torch.utils.data.DataLoader`: with ``num_workers > 0`` images are
    decoded in worker processes while the caller runs the model on the previous batch.
    Files that fail are dropped from their batch and reported in ``failures``; they never
    stop the iteration. A worker process that dies (killed by a signal, e.g. by the
    out-of-memory killer) ends it with a one-line :class:`FghError` naming its pid and signal.

    Workers hand their batches over through shared memory (``/dev/shm``). Where it cannot hold the
    batches in flight (a container's default is 64 MB), images are decoded in the calling process
    with a warning; if it fills up during a run, a batch that never comes ends the iteration with a
    one-line error after ``WORKER_BATCH_TIMEOUT_SECONDS`` instead of waiting forever (a worker that cannot
    hand a batch over stays alive, so DataLoader itself would wait forever).

    With ``jpeg_device`` set, workers only read plain JPEG files (RGB or grayscale) and
    their EXIF orientation; the calling process decodes each batch of them in one call on
    that device (nvJPEG on CUDA), then resizes and crops there. Other files, and JPEGs the
    device decoder rejects, take the Pillow path. Pillow may decode a large JPEG at a reduced
    DCT scale where nvJPEG decodes it whole, so the two paths can differ by a few pixel levels.

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
        jpeg_device: decode JPEGs on this device in the calling process; batches are then
            on that device. ``None``: every image is decoded by Pillow in the workers.

    Attributes:
        device_decode_seconds: time the calling process spent decoding and resizing on
            ``jpeg_device`` so far.
        worker_decode_seconds: decoding time summed over the images loaded so far (reading
            the bytes, for JPEGs left to the device), in whichever process decoded them.
        worker_preprocess_seconds: the same for resizing and cropping.

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
        jpeg_device: torch.device | str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        _interpolation(cfg.interpolation)  # fail once here, not once per image in the workers
        self.cfg = cfg
        self.jpeg_device = None if jpeg_device is None else torch.device(jpeg_device)
        self.device_decode_seconds = 0.0
        self.worker_decode_seconds = 0.0
        self.worker_preprocess_seconds = 0.0
        self.dataset = ImageFileDataset(paths, cfg, root, raw_jpegs=self.jpeg_device is not None)
        workers = worker_loader_kwargs(num_workers, batch_size * 3 * cfg.input_size ** 2)
        self._loader = DataLoader(
            self.dataset,
            batch_size=batch_size,
            shuffle=False,
            **workers,
            collate_fn=partial(_collate, input_size=cfg.input_size),
            # DataLoader warns on every iteration when asked to pin without an accelerator.
            pin_memory=pin_memory and torch.cuda.is_available(),
            # DataLoader rejects a start method when there are no worker processes.
            multiprocessing_context=multiprocessing_context if workers["num_workers"] else None,
        )

    def __len__(self) -> int:
        """Number of batches."""
        return len(self._loader)

    def __iter__(self) -> Iterator[ImageBatch]:
        batches = self._batches = iter(self._loader)
        try:
            for batch in batches:
                self.worker_decode_seconds += batch.decode_seconds
                self.worker_preprocess_seconds += batch.preprocess_seconds
                if self.jpeg_device is None:
                    yield ImageBatch(batch.indices, batch.images, batch.failures)
                else:
                    start = time.perf_counter()
                    merged = self._decode_on_device(batch)
                    self.device_decode_seconds += time.perf_counter() - start
                    yield merged
        except Exception as exc:
            death = _worker_death(batches)
            if death is not None:
                raise death from exc
            if isinstance(exc, RuntimeError) and "DataLoader timed out" in str(exc):
                raise FghError(f"no batch from the image decoding workers in {WORKER_BATCH_TIMEOUT_SECONDS:.0f} s: is "
                               f"{SHARED_MEMORY} full? ({_shared_memory_advice()})") from exc
            raise

    def worker_death(self) -> FghError | None:
        """The one-line error for a decoding worker that died, ``None`` if none did.

        For the consumer's own loop: DataLoader's SIGCHLD handler reports a dead worker as a
        ``RuntimeError`` wherever the main process happens to be, not only inside iteration.
        """
        batches = getattr(self, "_batches", None)
        return None if batches is None else _worker_death(batches)

    def _decode_on_device(self, batch: _Collated) -> ImageBatch:
        """Decode the batch's raw JPEGs on the device and merge them into input order."""
        device = self.jpeg_device
        done = {index: image.to(device, non_blocking=True) for index, image in zip(batch.indices, batch.images)}
        failures = list(batch.failures)
        if batch.raw:
            for (index, _), image in zip(batch.raw, decode_jpegs([raw for _, raw in batch.raw], device)):
                if image is not None:
                    done[index] = _resize_crop(image, self.cfg)
                    continue
                # The device decoder refused it: Pillow either decodes it or says why.
                item = _load_timed(index, self.dataset.path(index), self.cfg)
                if item.image is None:
                    failures.append(DecodeFailure(index, item.reason))
                else:
                    done[index] = item.image.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # so device_decode_seconds is the decode's, not the engine's
        indices = sorted(done)
        return ImageBatch(indices, _stack([done[i] for i in indices], self.cfg.input_size).to(device),
                          sorted(failures))


def _worker_death(batches: Iterator[_Collated]) -> FghError | None:
    """The one-line error for a decoding worker that died under ``batches``; ``None`` if none did.

    DataLoader reports a dead worker as a ``RuntimeError`` (or whatever broke while reading
    from it), with a traceback. Its worker processes are shut down here first: that also takes
    their pids out of DataLoader's SIGCHLD handler, which would otherwise raise again later in
    unrelated code.
    """
    workers = getattr(batches, "_workers", [])  # torch's worker processes; none without workers
    try:
        batches._shutdown_workers()  # type: ignore[attr-defined]
    except AttributeError:
        return None  # no worker processes: the error is the image code's own
    except RuntimeError:
        pass  # that SIGCHLD handler, reporting the same death while the workers were shut down
    for worker in workers:
        worker.join(_WORKER_EXIT_SECONDS)
        if worker.exitcode is not None and worker.exitcode < 0:
            name = signal.Signals(-worker.exitcode).name
            cause = "often the out-of-memory killer" if name == "SIGKILL" else "killed from outside"
            return FghError(f"image decoding worker (pid {worker.pid}) was killed by signal {name}: {cause}; "
                            f"{_WORKER_ADVICE}")
        if worker.exitcode:
            return FghError(f"image decoding worker (pid {worker.pid}) exited with code {worker.exitcode}; "
                            f"{_WORKER_ADVICE}")
    return None


_WORKER_ADVICE = "try fewer --workers or a smaller --batch-size (--workers 0 decodes in this process)"
#: Where torch's worker processes put the tensors they hand over (its "file_descriptor" strategy).
SHARED_MEMORY = "/dev/shm"
# DataLoader keeps 2 batches in flight per worker, plus the one the caller holds; each batch also
# brings small tensors, and shared-memory files are rounded up to pages.
_BATCHES_IN_FLIGHT_PER_WORKER = 2
_SHARED_MEMORY_OVERHEAD_BYTES = 1 << 20
#: DataLoader ``timeout`` for worker processes: far longer than any batch takes to decode, it only
#: bounds the wait for a batch lost on its way from a worker (shared memory filled up mid-run).
WORKER_BATCH_TIMEOUT_SECONDS = 600.0


def _shared_memory_advice() -> str:
    return "in a container, give it more: docker run --shm-size=1g; or --workers 0 decodes in this process"


def worker_loader_kwargs(num_workers: int, batch_bytes: int) -> dict[str, int | float]:
    """DataLoader's ``num_workers`` and ``timeout`` for batches of ``batch_bytes``, for every loader fgh makes.

    Workers only where shared memory holds their batches (:func:`shared_memory_workers`), and a
    timeout only with workers (DataLoader refuses one without).
    """
    workers = shared_memory_workers(num_workers, batch_bytes)
    return {"num_workers": workers, "timeout": WORKER_BATCH_TIMEOUT_SECONDS if workers else 0}


def shared_memory_workers(num_workers: int, batch_bytes: int) -> int:
    """``num_workers``, or 0 with a warning when shared memory cannot hold their batches in flight.

    For every DataLoader with worker processes: a worker that cannot put its batch into a full
    ``/dev/shm`` prints a traceback and stays alive, and the DataLoader waits for that batch forever.
    """
    try:
        fs = os.statvfs(SHARED_MEMORY)
    except OSError:
        return num_workers  # no /dev/shm (macOS): nothing to measure
    free = fs.f_bavail * fs.f_frsize
    needed = (_BATCHES_IN_FLIGHT_PER_WORKER * num_workers + 1) * batch_bytes + _SHARED_MEMORY_OVERHEAD_BYTES
    if free >= needed:
        return num_workers
    logger.warning("%s has %.1f MB free, and %d decoding workers need about %.1f MB for their batches: decoding "
                   "in this process instead (%s)", SHARED_MEMORY, free / 1e6, num_workers, needed / 1e6,
                   _shared_memory_advice())
    return 0
# A worker that was just told to stop exits at once; this only bounds a stuck one.
_WORKER_EXIT_SECONDS = 5.0
