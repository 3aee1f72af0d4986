"""The one exception type users see as a one-line message (the CLI turns it into exit code 1)."""

from __future__ import annotations

import operator
from typing import Any


class FghError(Exception):
    """A user-facing error: bad input, a damaged file, a missing optional backend.

    The message is one line and names the file and the reason. Programming errors keep
    their own exception types (and their tracebacks).
    """

    exit_code = 1


class BackendUnavailableError(FghError):
    """An optional runtime (TensorRT, CUDA) is not installed or not usable here."""

    exit_code = 3


class IncompatibleEngineError(FghError):
    """An engine file was built for another TensorRT version or GPU: rebuild it."""

    exit_code = 4


def check_int(value: Any, name: str, *, minimum: int, error: type[Exception] = FghError) -> int:
    """Return ``value`` (an int or numpy integer) as an int >= ``minimum``, or raise ``error``."""
    try:
        number = operator.index(value)
    except TypeError:
        raise error(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise error(f"{name} must be at least {minimum}, got {number}")
    return number
