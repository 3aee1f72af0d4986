"""The one exception type users see as a one-line message (the CLI turns it into exit code 1)."""

from __future__ import annotations


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
