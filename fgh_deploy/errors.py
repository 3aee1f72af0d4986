"""The exceptions users see as one line (the CLI turns every one into a message and an exit code).

Library entry points raise :class:`FghError` or a subclass for anything the user can fix: bad
input, a damaged file, a missing optional backend, an invalid name or value. Programming errors
keep their own exception types, and their tracebacks.
"""

from __future__ import annotations


class FghError(Exception):
    """A user-facing error: bad input, a damaged file, a missing optional backend.

    The message is one line and names the file and the reason. Programming errors keep
    their own exception types (and their tracebacks).
    """

    exit_code = 1


class ConfigError(FghError, ValueError):
    """An invalid value: an unknown model or backbone name, a bad model option, a metric's bad argument.

    Also a :class:`ValueError`, because that is what Python callers expect from a bad argument
    (and what code written before this class existed catches).
    """


class BackendUnavailableError(FghError):
    """An optional runtime (TensorRT, CUDA) is not installed or not usable here."""

    exit_code = 3


class IncompatibleEngineError(FghError):
    """An engine file was built for another TensorRT version or GPU: rebuild it."""

    exit_code = 4
