"""One way to name an index in every command, and the contract every index backend keeps.

An index name is one of:

* ``path/to/folder`` — fgh's own local index (:class:`~fgh_deploy.index.CodeIndex`), the default
  on one machine;
* ``milvus://HOST[:PORT]/COLLECTION`` — a collection on a Milvus server or cluster, over plain
  HTTP/2 (gRPC); the port defaults to 19530;
* ``milvus+https://HOST[:PORT]/COLLECTION`` — the same over TLS;
* ``FILE.db#COLLECTION`` — a collection in Milvus Lite, Milvus embedded in this process and stored
  in one local file (tests and laptops: one process at a time may open the file).

A Milvus token (``user:password`` or an API key) is read from the ``FGH_MILVUS_TOKEN`` environment
variable, never from the command line, where other users of the machine could read it.

Every backend implements :class:`SearchIndex`: the faiss-style ``search`` returning ``(D int32,
I int64)``, ``range_search`` returning ``(lims, D, I)``, ``append`` + ``commit``, and the
metadata that ties codes to the model that made them (bits, fingerprint, model, preprocessing,
engine, image root).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np

from .errors import FghError
from .utils import terminal_safe

#: The environment variable holding the Milvus token.
MILVUS_TOKEN_ENV = "FGH_MILVUS_TOKEN"
MILVUS_DEFAULT_PORT = 19530
# Milvus's own rule for collection names.
_COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_SCHEMES = {"milvus": "http", "milvus+http": "http", "milvus+https": "https"}


class SearchIndex(Protocol):
    """What ``fgh encode``, ``fgh query`` and ``fgh index push/pull`` need from an index backend."""

    #: How messages name the index (its folder, or its Milvus name as the user wrote it).
    label: str
    #: The order of hits at equal distance, as ``fgh query --json`` states it.
    tie_rule: str
    #: None for exact search; otherwise what makes it approximate (printed with the results).
    approximate: str | None

    @property
    def bits(self) -> int: ...
    @property
    def code_size(self) -> int: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def model(self) -> dict[str, Any]: ...
    @property
    def preprocess(self) -> dict[str, Any]: ...
    @property
    def engine(self) -> dict[str, Any]: ...
    @property
    def root(self) -> str: ...
    @property
    def nbytes(self) -> int: ...
    def __len__(self) -> int: ...
    def paths(self, rows: Sequence[int] | np.ndarray) -> list[str]: ...
    def sample_paths(self, count: int) -> list[str]: ...
    def search(self, queries: Any, k: int, *, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]: ...
    def range_search(self, queries: Any, radius: int, *,
                     device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
    def append(self, codes_packed: Any, rel_paths: Sequence[str], stats: Any) -> None: ...
    def commit(self) -> None: ...
    def check_compatible(self, bits: int, fingerprint: str, *, hint: str = "") -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> SearchIndex: ...
    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None: ...


@dataclass(frozen=True)
class MilvusLocation:
    """A Milvus collection, as named on the command line."""

    #: The name as the user wrote it (printed in messages and in ``--json``).
    name: str
    #: What ``pymilvus.MilvusClient`` connects to: ``http(s)://host:port``, or a Milvus Lite ``.db`` file.
    uri: str
    collection: str

    @property
    def is_lite(self) -> bool:
        """Whether this is an embedded Milvus Lite file rather than a server."""
        return not self.uri.startswith(("http://", "https://"))


def parse_index_name(name: str | os.PathLike[str]) -> Path | MilvusLocation:
    """A local index folder (``Path``) or a :class:`MilvusLocation` (the syntax is in the module docstring).

    Raises:
        FghError: a ``milvus…://`` name without a host or collection, or an invalid collection name.
    """
    if isinstance(name, os.PathLike):
        return Path(name)
    text = str(name)
    scheme = text.split("://", 1)[0] if "://" in text else ""
    if scheme in _SCHEMES:
        parts = urlsplit(text)
        collection = parts.path.strip("/")
        if not parts.hostname or not collection:
            raise FghError(f"'{terminal_safe(text)}': a Milvus index is named {scheme}://HOST[:PORT]/COLLECTION")
        try:
            port = parts.port or MILVUS_DEFAULT_PORT
        except ValueError:
            raise FghError(f"'{terminal_safe(text)}': the port is not a number from 0 to 65535") from None
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return MilvusLocation(text, f"{_SCHEMES[scheme]}://{host}:{port}", _check_collection(collection, text))
    if scheme.startswith("milvus"):
        raise FghError(f"'{terminal_safe(text)}': unknown scheme {terminal_safe(scheme)}://; use milvus://, "
                       "milvus+https:// or FILE.db#COLLECTION")
    file, sep, collection = text.rpartition("#")
    if sep and file.endswith(".db"):
        return MilvusLocation(text, file, _check_collection(collection, text))
    return Path(text)


def _check_collection(collection: str, name: str) -> str:
    if not _COLLECTION_NAME.fullmatch(collection):
        raise FghError(f"'{terminal_safe(name)}': collection name '{terminal_safe(collection)}' must be letters, "
                       "digits and underscores, not starting with a digit, at most 255 characters")
    return collection


def absolute_index_name(name: str | os.PathLike[str]) -> str:
    """``name`` as it reads from any working directory: a folder or Milvus Lite file made absolute."""
    location = parse_index_name(name)
    if isinstance(location, Path):
        return str(location.resolve())
    if location.is_lite:
        return f"{Path(location.uri).resolve()}#{location.collection}"
    return location.name


def is_milvus(name: str | os.PathLike[str]) -> bool:
    """Whether ``name`` names a Milvus collection (rather than a local index folder)."""
    return isinstance(parse_index_name(name), MilvusLocation)
