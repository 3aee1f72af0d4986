"""Text that is safe to show on a terminal: paths and user strings, escaped once, here.

A file name can hold anything but ``/`` and NUL: escape sequences that retitle or clear the
terminal, a tab or newline that forges a line of a log, bytes that are not UTF-8. Everything
fgh prints about a path or a user string goes through :func:`display_path` or
:func:`terminal_safe`; Rich output additionally uses ``markup=False`` or :class:`rich.text.Text`
so that ``[...]`` in a name is shown as written.
"""

from __future__ import annotations

import os
import re

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
