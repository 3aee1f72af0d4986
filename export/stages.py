"""The staged export log (Ultralytics style): ``<Stage>: starting ...``, then ``<Stage>: export success``.

Every stage of ``fgh export`` (PyTorch, ONNX, ONNX FP16, TensorRT) logs through :func:`stage`,
so each starts with one line and, when it wrote a file, ends with one line giving the time, the
file and its size. Detail lines inside a stage and verdicts (``Parity: ...``) use :func:`note`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fgh_deploy.utils import display_path

log = logging.getLogger(__name__)


def file_size(path: Path) -> str:
    """A file's size as the log shows it, e.g. ``12.3 MB``."""
    return f"{path.stat().st_size / 1e6:.1f} MB"


def note(label: str, message: str) -> None:
    """Log one ``<label>: <message>`` line."""
    log.info("%s: %s", label, message)


@dataclass
class Stage:
    """A running stage; the block sets ``saved`` to the file it wrote, and ``checked`` to what it verified."""

    label: str
    saved: Path | None = None
    #: Shown in the success line, e.g. ``checker passed``.
    checked: str = ""


@contextmanager
def stage(label: str, starting: str) -> Iterator[Stage]:
    """Log ``<label>: <starting>``, run the block, then ``<label>: export success Xs, saved as 'F' (N MB)``.

    The success line needs the block to set ``saved``; a stage that writes no file (PyTorch, which
    only loads the checkpoint) ends without one. An error ends the stage without a line of its
    own: the error is the line the CLI prints last.
    """
    current = Stage(label)
    note(label, starting)
    started = time.perf_counter()
    yield current
    if current.saved is not None:
        checked = f"{current.checked}, " if current.checked else ""
        note(label, f"export success {time.perf_counter() - started:.1f}s, {checked}saved as "
                    f"'{display_path(current.saved)}' ({file_size(current.saved)})")
