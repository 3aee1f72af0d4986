"""Small helpers every layer shares: terminal-safe text, files written durably, checked values.

Each is written once here (the modules above import them; this one imports only errors):

* text shown on a terminal: :func:`display_path` and :func:`terminal_safe`. A file name can hold
  anything but ``/`` and NUL: escape sequences that retitle or clear the terminal, a tab or newline
  that forges a line of a log, bytes that are not UTF-8. Rich output additionally uses
  ``markup=False`` so that ``[...]`` in a name is shown as written;
* files: :func:`atomic_write`, :func:`fsync_dir`, :func:`sha256_file`;
* values from users and files: :func:`check_int`, :func:`check_device`, :func:`resolve_device`,
  :func:`parse_int_list`;
* stage times: :func:`timed`.
"""

from __future__ import annotations

import hashlib
import operator
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .errors import BackendUnavailableError, FghError

if TYPE_CHECKING:
    import torch


# C0 controls (tab and newline included), DEL, C1 controls, and the Unicode format characters
# that reorder or hide text (bidi overrides and isolates, zero-width joiners, BOM).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal_safe(text: str) -> str:
    """``text`` with every control or invisible formatting character written as ``\\xNN``/``\\uNNNN``.

    Also turns lone surrogates (from undecodable bytes, see :func:`os.fsdecode`) into
    ``\\xNN`` escapes of the original bytes, so the result always encodes as UTF-8.
    """
    if any("\udc80" <= ch <= "\udcff" for ch in text):
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _UNSAFE.sub(_escape, text)


def display_path(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """A path as one printable line: undecodable bytes as ``\\xNN``, control characters escaped."""
    return terminal_safe(os.fsencode(path).decode("utf-8", "backslashreplace"))


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the names in a folder (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync, then rename over ``path``.

    A reader sees the old file or the new one, never half of one, and a crash leaves no partial file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error_in_chain(exc)
        if cause is None:
            raise
        # torch.save reports a full disk as "unexpected pos …" with the OSError only as context.
        raise FghError(f"cannot write {display_path(path)}: {cause.strerror or cause}") from exc
    fsync_dir(path.parent)  # make the rename itself durable


def _os_error_in_chain(exc: BaseException) -> OSError | None:
    """The OSError that ``exc`` is, or was raised while handling (a full disk, a file-size limit)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def check_int(value: Any, name: str, *, minimum: int, error: type[Exception] = FghError) -> int:
    """Return ``value`` (an int or numpy integer) as an int >= ``minimum``, or raise ``error``."""
    try:
        number = operator.index(value)
    except TypeError:
        raise error(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise error(f"{name} must be at least {minimum}, got {number}")
    return number


def parse_int_list(text: str, option: str, *, minimum: int = 1) -> tuple[int, ...]:
    """``"1,8,32"`` → ``(1, 8, 32)``; anything else is one line naming ``option``."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < minimum:
        kind = "positive integers" if minimum == 1 else f"integers ≥ {minimum}"
        raise FghError(f"{option} expects {kind} separated by commas, got '{terminal_safe(text)}'")
    return values


_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]{1,4})?")


def check_device(device: str) -> str:
    """``device`` when it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, the forms every command accepts.

    Raises:
        FghError: anything else, in one line naming ``--device``.
    """
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise FghError(f"--device: expected auto, cpu or cuda[:N], got {terminal_safe(repr(device))[:80]}")
    return device


def resolve_device(device: str) -> torch.device:
    """The torch device for a ``--device`` value: ``auto`` → CUDA when available, else CPU.

    The one place device strings are checked; an explicit CUDA request must be satisfiable here.

    Raises:
        FghError: not one of :func:`check_device`'s forms, or a CUDA index this machine lacks.
        BackendUnavailableError: CUDA requested but not available.
    """
    import torch

    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(f"--device {device}: CUDA is not available here")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise FghError(f"--device {device}: no such CUDA device ({torch.cuda.device_count()} visible)")
    return resolved


@contextmanager
def timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall time of the ``with`` block to ``seconds[stage]`` (0 when absent)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - started
