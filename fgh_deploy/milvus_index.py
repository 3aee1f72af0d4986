"""The Milvus backend: fgh codes in a Milvus collection, searched by exact Hamming distance.

For what fgh's own index cannot do on one machine: billions of images, replicas and failover,
encoding spread over many workers. Named ``milvus://HOST[:PORT]/COLLECTION``,
``milvus+https://…`` or, for Milvus Lite, ``FILE.db#COLLECTION`` (see :mod:`fgh_deploy.index_uri`).

The collection holds one row per image::

    id        INT64, primary key: the first 63 bits of blake2b(relative path bytes), see :func:`path_key`
    path      VARCHAR: the image's path relative to the encoded folder (UTF-8)
    size      INT64: the file's size in bytes   } so a rerun re-encodes modified images only
    mtime_ns  INT64: its st_mtime_ns           }
    code      BINARY_VECTOR, dim = bits rounded up to a multiple of 8 (Milvus's rule): fgh's packed
              code as is (LSB-first bytes, :mod:`fgh_deploy.bits`), whose unused high bits of the
              last byte are zero; Milvus xors the raw bytes, so those bits change no distance

and the collection's description holds fgh's metadata as JSON: ``format`` ("fgh-milvus"),
``format_version``, ``bits``, ``bit_order``, ``code_size``, ``fingerprint``, ``model``,
``preprocess``, ``engine``, ``root`` (the folder the first writer encoded; workers on other
machines may mount it elsewhere) and ``milvus_index`` (the vector index and its parameters).
The description, not collection properties, because Milvus Lite does not keep properties.

Why the primary key is derived from the path: a rerun (or a killed and restarted shard)
upserts the same rows instead of duplicating them, and ``N`` workers can split a folder by that
key (``--shard K/N``: the rows whose key is ``K - 1`` modulo ``N``) without talking to each other.
Two paths whose keys collide are refused with both names (about one chance in 20 at a billion
images).

Search is exact with the default ``BIN_FLAT`` index. Results are sorted on the client by
(distance, path bytes): for an index encoded from a folder that is the order of fgh's local
index too (it appends in path order), so both backends return the same hits in the same order.
Milvus ranks ties within a segment only, so the k-th distance's whole tie group is fetched
before the list is cut to k. Milvus returns at most :data:`MILVUS_MAX_LIMIT` hits per call; more
come from range windows (``range_filter <= d < radius``), split by distance and then by primary
key range until each window fits — never from the search iterator, which drops rows when one
distance holds more rows than its batch. ``BIN_IVF_FLAT`` (``--milvus-index bin_ivf_flat``) is
approximate: results say so.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bits import BIT_ORDER, packed_width
from .errors import FghError
from .index import check_codes
from .index_uri import MILVUS_TOKEN_ENV, MilvusLocation
from .utils import check_int, terminal_safe

log = logging.getLogger(__name__)

MILVUS_FORMAT = "fgh-milvus"
MILVUS_FORMAT_VERSION = 1
MILVUS_TIE_RULE = "distance, then path"
#: The most hits one Milvus search returns (its cap on ``limit``).
MILVUS_MAX_LIMIT = 16384
#: What to install when pymilvus or Milvus Lite is missing.
INSTALL_HINT = "pip install 'fgh[milvus]'"
#: The vector indexes fgh creates: BIN_FLAT is exact, BIN_IVF_FLAT approximate (Milvus Lite has BIN_FLAT only).
MILVUS_INDEX_TYPES = ("bin_flat", "bin_ivf_flat")
#: Longest relative path stored, in UTF-8 bytes (Linux's PATH_MAX).
MAX_PATH_BYTES = 4096
CONNECT_TIMEOUT_S = 10.0
# Rows per upsert or get: well under Milvus's 64 MB message limit at any code length.
_ROWS_PER_CALL = 4096
_KEY_SPACE = 1 << 63


@dataclass(frozen=True)
class MilvusIndexOptions:
    """The vector index a new collection gets (an existing collection keeps its own)."""

    #: ``bin_flat`` (exact) or ``bin_ivf_flat`` (approximate: ``nprobe`` of ``nlist`` clusters scanned).
    index_type: str = "bin_flat"
    nlist: int = 1024
    nprobe: int = 16
    #: Milvus shards of the collection (write parallelism on a cluster).
    shards: int = 1

    def __post_init__(self) -> None:
        if self.index_type not in MILVUS_INDEX_TYPES:
            raise FghError(f"--milvus-index must be one of {', '.join(MILVUS_INDEX_TYPES)}, got "
                           f"'{terminal_safe(self.index_type)}'")
        for name in ("nlist", "nprobe", "shards"):
            check_int(getattr(self, name), name, minimum=1)


def path_key(rel_path: str) -> int:
    """The primary key of an image: the first 63 bits of blake2b of its relative path's bytes."""
    digest = hashlib.blake2b(os.fsencode(rel_path), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _KEY_SPACE


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → ``(K, N)`` with ``1 <= K <= N``.

    Raises:
        FghError: anything else.
    """
    match = re.fullmatch(r"\s*(\d{1,6})\s*/\s*(\d{1,6})\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise FghError(f"--shard expects K/N with 1 <= K <= N (e.g. 2/4), got '{terminal_safe(text)}'")
    return int(match[1]), int(match[2])


def in_shard(rel_path: str, shard: tuple[int, int]) -> bool:
    """Whether shard ``K/N`` encodes ``rel_path``: its key is ``K - 1`` modulo ``N``."""
    k, n = shard
    return path_key(rel_path) % n == k - 1


def unstorable_path(rel_path: str) -> str | None:
    """Why Milvus cannot store ``rel_path`` (not UTF-8, or too long), or None."""
    try:
        size = len(rel_path.encode("utf-8"))
    except UnicodeEncodeError:
        return "file name is not UTF-8 (Milvus stores paths as UTF-8 text)"
    if size > MAX_PATH_BYTES:
        return f"path longer than {MAX_PATH_BYTES} bytes (Milvus's limit here)"
    return None


def _pymilvus() -> Any:
    """pymilvus, imported on first use; a one-line error naming the extra when it is missing."""
    try:
        import pymilvus
    except ImportError:
        raise FghError(f"Milvus indexes need pymilvus: {INSTALL_HINT}") from None
    return pymilvus


@contextlib.contextmanager
def _milvus_errors(location: MilvusLocation, doing: str) -> Iterator[None]:
    """A Milvus or connection failure as one line naming the index and what was being done."""
    pymilvus = _pymilvus()
    try:
        yield
    except pymilvus.MilvusException as exc:
        message = " ".join(str(getattr(exc, "message", "") or exc).split())
        raise FghError(f"{location.name}: {doing} failed: {terminal_safe(message)}") from None


def _connect(location: MilvusLocation, *, dedicated: bool = False) -> Any:
    """A connected ``MilvusClient`` (``dedicated``: on its own channel, not one shared in this process)."""
    pymilvus = _pymilvus()
    if location.is_lite:
        try:
            with warnings.catch_warnings():
                # milvus-lite 2.5.1 imports pkg_resources, which warns on every import.
                warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
                import milvus_lite  # noqa: F401
        except ImportError:
            raise FghError(f"{location.name}: Milvus Lite files need milvus-lite 2.5.1: {INSTALL_HINT} "
                           "(Linux x86-64 and macOS only)") from None
    # Milvus Lite (a file or its server) has no MVCC timestamps; pymilvus warns about that on every
    # query iterator, and the iterator then uses the client's clock, which is what fgh needs.
    logging.getLogger("pymilvus.client.iterator.query_iterator").setLevel(logging.ERROR)
    # pymilvus logs every failed call with its traceback; fgh reports each failure in one line itself.
    logging.getLogger("pymilvus.decorators").setLevel(logging.CRITICAL)
    with _milvus_errors(location, f"connecting to {location.uri}"), \
            (_lite_lock if location.is_lite else contextlib.nullcontext()):
        client = pymilvus.MilvusClient(location.uri, token=os.environ.get(MILVUS_TOKEN_ENV, ""),
                                       timeout=CONNECT_TIMEOUT_S, **({"dedicated": True} if dedicated else {}))
        if location.is_lite:
            file = _lite_file(location)
            _lite_clients[file] = _lite_clients.get(file, 0) + 1
        return client


# pymilvus starts a Milvus Lite server for a .db file on first use and keeps it until told to stop,
# holding the file until then, so no other process can open it. Stopped when the last client of the file
# closes, so `fgh bench serve` (which reads a collection, then starts `fgh serve` on it) works.
_lite_lock = threading.Lock()
_lite_clients: dict[str, int] = {}


def _lite_file(location: MilvusLocation) -> str:
    return str(Path(location.uri).resolve())


def _disconnect(location: MilvusLocation, client: Any) -> None:
    """Close ``client``; the last client of a Milvus Lite file stops that file's server."""
    try:
        client.close()
    finally:
        if location.is_lite:
            file = _lite_file(location)
            with _lite_lock:
                _lite_clients[file] = _lite_clients.get(file, 1) - 1
                if _lite_clients[file] <= 0:
                    del _lite_clients[file]
                    from milvus_lite.server_manager import server_manager_instance

                    server_manager_instance.release_server(file)


class MilvusIndex:
    """An fgh index in a Milvus collection; implements :class:`~fgh_deploy.index_uri.SearchIndex`.

    Get one with :meth:`open` or :meth:`open_or_create`. Rows are upserted by :meth:`append`
    and visible to searches at once (the collection's consistency level is Strong), so
    :meth:`commit` has nothing left to do; any number of writers may append at the same time.

    Reads (searches, row counts, path look-ups) that fail in Milvus or in the connection are
    retried once on a new connection: a long-lived reader such as ``fgh serve`` outlives a
    server that drops idle clients (Milvus Lite's does after about two minutes, "too_many_pings").
    A second failure is reported as usual. Writes are not retried.
    """

    tie_rule = MILVUS_TIE_RULE

    def __init__(self, client: Any, location: MilvusLocation, meta: dict[str, Any]) -> None:
        """Wrap a connected client; use :meth:`open` or :meth:`open_or_create` instead."""
        self._client = client
        self._reconnect_lock = threading.Lock()
        self._location = location
        self._meta = meta
        options = meta["milvus_index"]
        self._search_params: dict[str, Any] = {"nprobe": options["nprobe"]} \
            if options["index_type"] == "bin_ivf_flat" else {}
        self.label = location.name
        self.approximate: str | None = (
            f"BIN_IVF_FLAT: {options['nprobe']} of {options['nlist']} clusters scanned per query"
            if options["index_type"] == "bin_ivf_flat" else None)

    # ----------------------------------------------------------------- opening

    @classmethod
    def exists(cls, location: MilvusLocation) -> bool:
        """Whether the collection exists (fgh's or not: :meth:`open` checks)."""
        client = _connect(location)
        try:
            with _milvus_errors(location, "listing collections"):
                return bool(client.has_collection(location.collection))
        finally:
            _disconnect(location, client)

    @classmethod
    def open(cls, location: MilvusLocation) -> MilvusIndex:
        """Open an existing fgh collection and load it for searching.

        Raises:
            FghError: pymilvus missing, the server unreachable, no such collection, or one not written by fgh.
        """
        client = _connect(location)
        try:
            with _milvus_errors(location, "opening the collection"):
                if not client.has_collection(location.collection):
                    raise FghError(f"{location.name}: no collection '{location.collection}' at {location.uri}")
                description = client.describe_collection(location.collection).get("description", "")
                client.load_collection(location.collection)
            return cls(client, location, _read_meta(location, description))
        except BaseException:
            _disconnect(location, client)
            raise

    @classmethod
    def open_or_create(cls, location: MilvusLocation, *, bits: int, fingerprint: str, model: Any,
                       preprocess: Any, engine: dict[str, Any], root: str,
                       options: MilvusIndexOptions | None = None, hint: str = "") -> MilvusIndex:
        """Open the collection for writing, creating it when absent; refuse one built by another model.

        Many workers may call this at once: whoever loses the race to create opens the winner's
        collection and checks it like any other.

        Args:
            location: the collection.
            bits, fingerprint, model, preprocess, engine, root: what the local index's manifest records.
            options: the vector index of a new collection (ignored when it exists).
            hint: appended to a model-mismatch error (what the user can do).

        Raises:
            FghError: pymilvus missing, server unreachable, a collection not written by fgh or
                written with another model or bit length, or Milvus refusing the index (Milvus Lite
                has BIN_FLAT only).
        """
        given = options
        options = options or MilvusIndexOptions()
        bits = check_int(bits, "bits", minimum=1)
        client = _connect(location)
        try:
            with _milvus_errors(location, "creating the collection"):
                if not client.has_collection(location.collection):
                    meta = {"format": MILVUS_FORMAT, "format_version": MILVUS_FORMAT_VERSION, "bits": bits,
                            "bit_order": BIT_ORDER, "code_size": packed_width(bits), "fingerprint": fingerprint,
                            "model": model, "preprocess": preprocess, "engine": engine, "root": str(root),
                            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                            "milvus_index": asdict(options)}
                    try:
                        _create_collection(client, location, meta, options)
                        log.info("%s: created (%s, %d bits)", location.name, options.index_type, bits)
                    except _pymilvus().MilvusException:
                        # Another worker created it first (check theirs like any existing
                        # collection), unless what failed was the index of this one.
                        if not client.has_collection(location.collection) or \
                                not _index_appears(client, location.collection):
                            raise
            index = cls.open(location)
        finally:
            _disconnect(location, client)
        try:
            index.check_compatible(bits, fingerprint, hint=hint)
        except FghError:
            index.close()
            raise
        if given is not None and given != index.options:
            log.warning("%s: exists with %s; the Milvus index options given apply to new collections only",
                        location.name, index.options)
        return index

    # -------------------------------------------------------------- properties

    @property
    def location(self) -> MilvusLocation:
        return self._location

    @property
    def bits(self) -> int:
        return int(self._meta["bits"])

    @property
    def code_size(self) -> int:
        """Bytes per packed fgh code (the stored vector may carry zero padding past it)."""
        return packed_width(self.bits)

    @property
    def fingerprint(self) -> str:
        return str(self._meta["fingerprint"])

    @property
    def model(self) -> dict[str, Any]:
        return dict(self._meta["model"])

    @property
    def preprocess(self) -> dict[str, Any]:
        return dict(self._meta["preprocess"])

    @property
    def engine(self) -> dict[str, Any]:
        return dict(self._meta["engine"])

    @property
    def root(self) -> str:
        return str(self._meta["root"])

    @property
    def options(self) -> MilvusIndexOptions:
        return MilvusIndexOptions(**self._meta["milvus_index"])

    def __len__(self) -> int:
        return self._count("")

    @property
    def ntotal(self) -> int:
        return len(self)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored codes (Milvus's own overhead not counted)."""
        return len(self) * self.code_size

    def paths(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """The relative paths of primary keys ``rows`` (the ``I`` of :meth:`search`), in that order."""
        ids = [int(i) for i in np.asarray(rows, dtype=np.int64).ravel()]
        found = {int(r["id"]): r["path"] for r in self._get(ids, ["path"])}
        missing = next((i for i in ids if i not in found), None)
        if missing is not None:
            raise FghError(f"{self.label}: no row with id {missing}")
        return [found[i] for i in ids]

    def sample_paths(self, count: int) -> list[str]:
        """Relative paths of up to ``count`` rows, in path order: whichever rows Milvus returns
        first, which are a random sample of the paths (keys are hashes of the paths)."""
        count = check_int(count, "count", minimum=0)
        if not count:
            return []
        rows = self._read("reading rows", lambda client: client.query(
            self._location.collection, filter="", output_fields=["path"], limit=min(count, MILVUS_MAX_LIMIT)))
        return sorted((str(row["path"]) for row in rows), key=os.fsencode)

    def path_of_key(self, key: int) -> str | None:
        """The relative path of the row with primary key ``key`` (a search's ``I``), or None if there is none."""
        key = int(key)
        if not 0 <= key < _KEY_SPACE:
            return None
        rows = self._read("reading a row", lambda client: client.query(
            self._location.collection, filter=f"id == {key}", output_fields=["path"]))
        return str(rows[0]["path"]) if rows else None

    def stored_stats(self, rel_paths: Sequence[str]) -> dict[str, tuple[int, int]]:
        """``{path: (size, mtime_ns)}`` of the ``rel_paths`` already stored.

        Raises:
            FghError: a stored row holds another path with the same key (a key collision).
        """
        by_key = {path_key(p): p for p in rel_paths}
        stored = {}
        for row in self._get(list(by_key), ["path", "size", "mtime_ns"]):
            path = by_key[int(row["id"])]
            _refuse_collision(self.label, path, row["path"])
            stored[path] = (int(row["size"]), int(row["mtime_ns"]))
        return stored

    # ----------------------------------------------------------------- writing

    def append(self, codes_packed: Any, rel_paths: Sequence[str], stats: Any) -> None:
        """Upsert rows, keyed by :func:`path_key`: a path already stored is replaced, not duplicated.

        Args:
            codes_packed: uint8 ``(n, code_size)`` codes from :func:`~fgh_deploy.bits.pack_codes`;
                checked here, because Milvus accepts vectors of the wrong byte length silently
                and they corrupt the neighbouring rows.
            rel_paths: ``n`` paths relative to :attr:`root`, UTF-8, at most :data:`MAX_PATH_BYTES` bytes.
            stats: integer ``(n, 2)``: each file's size and ``st_mtime_ns``.

        Raises:
            FghError: bad shapes or dtypes, set padding bits, an unstorable or empty path, a key
                collision with a stored path, or Milvus refusing the write. Nothing of a refused
                batch is written.
        """
        codes = check_codes(codes_packed, self.bits, self.code_size)
        if isinstance(rel_paths, (str, bytes)):
            raise FghError("rel_paths must be a sequence of paths, not one string")
        rel_paths = list(rel_paths)
        n = len(codes)
        if len(rel_paths) != n:
            raise FghError(f"got {n} codes but {len(rel_paths)} paths")
        stats_arr = np.asarray(stats)
        if stats_arr.shape != (n, 2) or stats_arr.dtype.kind not in "iu":
            raise FghError(f"stats must be integer (n, 2) = (size, mtime_ns) per row, n = {n}; got "
                           f"{stats_arr.dtype} {stats_arr.shape}")
        for path in rel_paths:
            problem = "empty path" if not path else unstorable_path(path)
            if problem:
                raise FghError(f"{self.label}: cannot store '{terminal_safe(path)}': {problem}")
        keys = [path_key(p) for p in rel_paths]
        batch: dict[int, str] = {}
        for key, path in zip(keys, rel_paths):
            _refuse_collision(self.label, path, batch.setdefault(key, path))
        self.stored_stats(rel_paths)  # refuses a collision with a stored row before anything is written
        vectors = _vectors(codes)
        rows = [{"id": key, "path": path, "size": int(size), "mtime_ns": int(mtime), "code": vector}
                for key, path, (size, mtime), vector in zip(keys, rel_paths, stats_arr.tolist(), vectors)]
        with self._errors("writing rows"):
            for start in range(0, n, _ROWS_PER_CALL):
                self._client.upsert(self._location.collection, rows[start:start + _ROWS_PER_CALL])

    def commit(self) -> None:
        """Nothing to do: Milvus acknowledges an upsert once it is in its write-ahead log."""

    def remove_unlisted(self, rel_paths: Sequence[str], shard: tuple[int, int] | None = None) -> int:
        """Delete the rows (of ``shard``, or all) whose path is not in ``rel_paths``; returns how many."""
        listed = {path_key(p) for p in rel_paths}
        filter_ = _shard_filter(shard)
        gone = [int(row["id"]) for batch in self._batches(filter_, ["id"]) for row in batch
                if int(row["id"]) not in listed]
        with self._errors("deleting rows"):
            for start in range(0, len(gone), _ROWS_PER_CALL):
                self._client.delete(self._location.collection, ids=gone[start:start + _ROWS_PER_CALL])
        return len(gone)

    def repair_duplicates(self, expected: int, shard: tuple[int, int] | None = None) -> int:
        """Leave one row per key (of ``shard``, or all) where writers left several; returns the keys repaired.

        Milvus enforces no unique key, and Milvus Lite does not order concurrent upserts: two
        writers of the same new path at the same moment (a shard started twice) can both insert
        it. Measured here: 2 × 2,000 concurrent upserts left 4,000 rows in 1 run of 3, and a
        search for 2,000 hits then returned 1,170, because Milvus drops a duplicate key only
        after cutting its results to the limit. An upsert of the key replaces all its copies.

        Args:
            expected: the distinct keys the caller knows of; the exact check (one pass over the
                keys, then row counts over halving key ranges) runs only when Milvus counts more rows.
            shard: only this shard's rows.
        """
        filter_ = _shard_filter(shard)
        if self._count(filter_) <= expected:
            return 0
        keys = np.sort(np.array([int(row["id"]) for batch in self._batches(filter_, ["id"]) for row in batch],
                                np.int64))
        duplicated = self._duplicated_keys(keys, filter_, 0, _KEY_SPACE)
        rows = self._get(duplicated, ["id", "path", "size", "mtime_ns", "code"])
        with self._errors("repairing duplicate rows"):
            for start in range(0, len(rows), _ROWS_PER_CALL):
                self._client.upsert(self._location.collection, [
                    {**row, "code": _vector_bytes(row["code"])} for row in rows[start:start + _ROWS_PER_CALL]])
        return len(duplicated)

    def _duplicated_keys(self, keys: np.ndarray, filter_: str, low: int, high: int) -> list[int]:
        """The keys in ``[low, high)`` (of sorted distinct ``keys``) stored more than once, by halving the range.

        A range with as many surplus rows as keys is returned whole: re-writing a single row is harmless.
        """
        inside = keys[np.searchsorted(keys, low):np.searchsorted(keys, high)]
        surplus = self._count(" and ".join(filter(None, [filter_, f"id >= {low} and id < {high}"]))) - len(inside)
        if surplus <= 0 or len(inside) == 0:
            return []
        if surplus >= len(inside) or len(inside) == 1:
            return inside.tolist()
        middle = int(inside[len(inside) // 2])
        return self._duplicated_keys(keys, filter_, low, middle) + self._duplicated_keys(keys, filter_, middle, high)

    def all_rows(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """Every row as ``(codes uint8 (n, code_size), paths, stats int64 (n, 2))``, in path order."""
        paths: list[str] = []
        codes: list[bytes] = []
        stats: list[tuple[int, int]] = []
        for batch in self._batches("", ["path", "size", "mtime_ns", "code"]):
            for row in batch:
                paths.append(row["path"])
                codes.append(_vector_bytes(row["code"])[:self.code_size])
                stats.append((int(row["size"]), int(row["mtime_ns"])))
        order = sorted(range(len(paths)), key=lambda i: os.fsencode(paths[i]))
        packed = np.frombuffer(b"".join(codes[i] for i in order), np.uint8).reshape(len(order), self.code_size)
        return packed, [paths[i] for i in order], np.array([stats[i] for i in order], np.int64).reshape(-1, 2)

    # --------------------------------------------------------------- searching

    def search(self, queries: Any, k: int, *, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest codes, ``(D int32, I int64)`` of shape ``(nq, k)`` like faiss; ``I`` are primary keys.

        Each row is sorted by (distance, path); slots past the collection's size hold -1.
        ``device`` is accepted for the contract's sake: Milvus searches on its own machines.
        """
        k = check_int(k, "k", minimum=1)
        vectors = self._query_vectors(queries)
        hits = self._knn_exact_ties(vectors, k) if k <= MILVUS_MAX_LIMIT else self._knn_by_windows(vectors, k)
        distances = np.full((len(vectors), k), -1, dtype=np.int32)
        ids = np.full((len(vectors), k), -1, dtype=np.int64)
        for i, found in enumerate(hits):
            found = sorted(found, key=_tie_order)[:k]
            distances[i, :len(found)] = [h[0] for h in found]
            ids[i, :len(found)] = [h[2] for h in found]
        return distances, ids

    def range_search(self, queries: Any, radius: int, *,
                     device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every code within ``radius`` (inclusive), ``(lims, D, I)`` like faiss, each query's hits by (distance, path)."""
        radius = check_int(radius, "radius", minimum=0)
        vectors = self._query_vectors(queries)
        found = [sorted(h, key=_tie_order) for h in self._within(vectors, 0, min(radius, self.bits) + 1)]
        lims = np.zeros(len(vectors) + 1, dtype=np.int64)
        np.cumsum([len(h) for h in found], out=lims[1:])
        distances = np.array([h[0] for hits in found for h in hits], dtype=np.int32)
        ids = np.array([h[2] for hits in found for h in hits], dtype=np.int64)
        return lims, distances, ids

    def _knn_exact_ties(self, vectors: list[bytes], k: int) -> list[list[tuple[int, str, int]]]:
        """k-NN: Milvus's top ``k``, with the k-th distance's whole tie group fetched by a range window."""
        first = self._search(vectors, k)
        hits: list[list[tuple[int, str, int]]] = []
        at_boundary: dict[int, list[int]] = {}
        for i, found in enumerate(first):
            if len(found) < k:  # the whole collection
                hits.append(found)
                continue
            kth = max(h[0] for h in found)
            hits.append([h for h in found if h[0] < kth])
            at_boundary.setdefault(kth, []).append(i)
        for kth, queries in at_boundary.items():
            for i, ties in zip(queries, self._within([vectors[i] for i in queries], kth, kth + 1)):
                hits[i].extend(ties)
        return hits

    def _knn_by_windows(self, vectors: list[bytes], k: int) -> list[list[tuple[int, str, int]]]:
        """k-NN past Milvus's limit: whole distances, nearest first, until each query has ``k``."""
        hits: list[list[tuple[int, str, int]]] = [[] for _ in vectors]
        pending = list(range(len(vectors)))
        for distance in range(self.bits + 1):
            if not pending:
                break
            for i, found in zip(pending, self._within([vectors[i] for i in pending], distance, distance + 1)):
                hits[i].extend(found)
            pending = [i for i in pending if len(hits[i]) < k]
        return hits

    def _within(self, vectors: list[bytes], low: int, high: int,
                keys: tuple[int, int] | None = None) -> list[list[tuple[int, str, int]]]:
        """Every row at distance ``low <= d < high`` (and key in ``keys``, half-open), exactly.

        A window that fills Milvus's limit may have been cut: it is split, by distance while it
        spans several, then by key range, until every part fits.
        """
        found = self._search(vectors, MILVUS_MAX_LIMIT, window=(low, high), keys=keys)
        for i, hits in enumerate(found):
            if len(hits) < MILVUS_MAX_LIMIT:
                continue
            if high - low > 1:
                middle = (low + high) // 2
                parts = [((low, middle), keys), ((middle, high), keys)]
            else:
                first, last = keys or (0, _KEY_SPACE)
                middle = (first + last) // 2
                parts = [((low, high), (first, middle)), ((low, high), (middle, last))]
            found[i] = [h for (lo, hi), part in parts for h in self._within([vectors[i]], lo, hi, part)[0]]
        return found

    def _search(self, vectors: list[bytes], limit: int, *, window: tuple[int, int] | None = None,
                keys: tuple[int, int] | None = None) -> list[list[tuple[int, str, int]]]:
        """One Milvus search: per query, ``(distance, path, id)`` of up to ``limit`` hits."""
        if not vectors:
            return []
        params = dict(self._search_params)
        if window is not None:
            params.update(range_filter=window[0], radius=window[1])  # range_filter <= d < radius
        filter_ = f"id >= {keys[0]} and id <= {keys[1] - 1}" if keys else ""
        result = self._read("searching", lambda client: client.search(
            self._location.collection, data=vectors, anns_field="code", limit=limit, filter=filter_,
            output_fields=["path"], search_params={"metric_type": "HAMMING", "params": params}))
        return [[(int(h["distance"]), h["entity"]["path"], int(h["id"])) for h in hits] for hits in result]

    # ---------------------------------------------------------------- checking

    def check_compatible(self, bits: int, fingerprint: str, *, hint: str = "") -> None:
        """Refuse codes of another model or bit length, with the local index's message."""
        if bits != self.bits or fingerprint != self.fingerprint:
            raise FghError(
                f"{self.label}: built with model {self.fingerprint[:12]} at {self.bits} bits; "
                f"this model is {str(fingerprint)[:12]} at {bits} bits" + (f" — {hint}" if hint else ""))

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Close the connection (a second call does nothing)."""
        client, self._client = self._client, None
        if client is not None:
            _disconnect(self._location, client)

    def __enter__(self) -> MilvusIndex:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MilvusIndex({self.label!r}, bits={self.bits})"

    # ----------------------------------------------------------------- helpers

    def _errors(self, doing: str) -> contextlib.AbstractContextManager[None]:
        return _milvus_errors(self._location, doing)

    def _query_vectors(self, queries: Any) -> list[bytes]:
        codes = np.asarray(queries)
        if codes.ndim == 1:
            codes = codes.reshape(1, -1)
        return _vectors(check_codes(codes, self.bits, self.code_size))

    def _read(self, doing: str, call: Any) -> Any:
        """``call(client)``, retried once on a new connection when Milvus or the connection fails.

        Reads are idempotent, so a retry is safe; the retry's failure is the one reported.
        """
        pymilvus = _pymilvus()
        import grpc

        client = self._client
        try:
            return call(client)
        except (pymilvus.MilvusException, grpc.RpcError) as exc:
            message = " ".join(str(getattr(exc, "message", "") or exc).split())
            log.debug("%s: %s failed (%s); reconnecting and retrying once", self.label, doing, terminal_safe(message))
            self._reconnect(client)
        with self._errors(doing):
            try:
                return call(self._client)
            except grpc.RpcError as exc:
                raise FghError(f"{self.label}: {doing} failed: {terminal_safe(' '.join(str(exc).split()))}") from None

    def _reconnect(self, failed: Any) -> None:
        """Replace the client ``failed`` by a new connection (unless another thread already did)."""
        with self._reconnect_lock:
            if self._client is not failed:
                return
            # Connected before the old client closes: the last client of a Lite file stops its server.
            client = _connect(self._location, dedicated=True)
            try:
                with self._errors("reopening the collection"):
                    client.load_collection(self._location.collection)
            except BaseException:
                _disconnect(self._location, client)
                raise
            self._client = client
            with contextlib.suppress(Exception):
                _disconnect(self._location, failed)

    def _count(self, filter_: str) -> int:
        rows = self._read("counting rows", lambda client: client.query(
            self._location.collection, filter=filter_, output_fields=["count(*)"]))
        return int(rows[0]["count(*)"])

    def _get(self, ids: list[int], fields: list[str]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for start in range(0, len(ids), _ROWS_PER_CALL):
            part = ids[start:start + _ROWS_PER_CALL]
            rows.extend(self._read("reading rows", lambda client: client.get(
                self._location.collection, ids=part, output_fields=fields)))
        return rows

    def _batches(self, filter_: str, fields: list[str]) -> Iterator[list[dict[str, Any]]]:
        """Every row matching ``filter_``, in batches (the query iterator is exact; only the search one drops rows)."""
        with self._errors("reading rows"):
            iterator = self._client.query_iterator(self._location.collection, batch_size=_ROWS_PER_CALL,
                                                   filter=filter_, output_fields=fields)
            try:
                while batch := iterator.next():
                    yield batch
            finally:
                iterator.close()


def _vectors(codes: np.ndarray) -> list[bytes]:
    """Checked packed codes (:func:`~fgh_deploy.index.check_codes`) as Milvus vectors: ``code_size`` bytes each."""
    return [row.tobytes() for row in np.ascontiguousarray(codes)]


def _shard_filter(shard: tuple[int, int] | None) -> str:
    """The Milvus filter selecting shard ``K/N``'s rows (see :func:`in_shard`), or every row."""
    return f"id % {shard[1]} == {shard[0] - 1}" if shard else ""


def _tie_order(hit: tuple[int, str, int]) -> tuple[int, bytes]:
    """fgh's order for Milvus hits: distance, then path bytes (the order ``fgh encode`` appends in)."""
    return hit[0], os.fsencode(hit[1])


def _refuse_collision(label: str, path: str, other: str) -> None:
    if path != other:
        raise FghError(f"{label}: '{terminal_safe(path)}' and '{terminal_safe(other)}' have the same key "
                       "(a 63-bit hash collision); rename one of them")


def _vector_bytes(value: Any) -> bytes:
    """A BINARY_VECTOR as pymilvus returns it (bytes, or a one-element list of bytes)."""
    return bytes(value[0] if isinstance(value, list) else value)


def _create_collection(client: Any, location: MilvusLocation, meta: dict[str, Any],
                       options: MilvusIndexOptions) -> None:
    from pymilvus import DataType, MilvusClient

    if location.is_lite and options.index_type != "bin_flat":
        # Lite would create the collection, then fail on the index, leaving one no search can use.
        raise FghError(f"{location.name}: Milvus Lite has bin_flat only, not {options.index_type}")
    collection = location.collection

    schema = MilvusClient.create_schema(auto_id=False, description=json.dumps(meta, sort_keys=True))
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("path", DataType.VARCHAR, max_length=MAX_PATH_BYTES)
    schema.add_field("size", DataType.INT64)
    schema.add_field("mtime_ns", DataType.INT64)
    schema.add_field("code", DataType.BINARY_VECTOR, dim=8 * meta["code_size"])  # Milvus: a multiple of 8
    index_params = client.prepare_index_params()
    extra = {"nlist": options.nlist} if options.index_type == "bin_ivf_flat" else {}
    index_params.add_index("code", index_type=options.index_type.upper(), metric_type="HAMMING", params=extra)
    client.create_collection(collection, schema=schema, index_params=index_params, consistency_level="Strong",
                             num_shards=options.shards)


def _index_appears(client: Any, collection: str, seconds: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether the vector index of ``collection`` exists within ``seconds`` (another worker may be creating it)."""
    deadline = time.monotonic() + seconds
    while not client.list_indexes(collection, field_name="code"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _read_meta(location: MilvusLocation, description: str) -> dict[str, Any]:
    """fgh's metadata from a collection's description; a collection fgh did not write is refused."""
    try:
        meta = json.loads(description)
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != MILVUS_FORMAT:
        raise FghError(f"{location.name}: not an fgh collection (its description holds no fgh metadata)")
    if meta.get("format_version") != MILVUS_FORMAT_VERSION:
        raise FghError(f"{location.name}: fgh collection format {meta.get('format_version')}; this fgh reads "
                       f"{MILVUS_FORMAT_VERSION}")
    return meta


def push_index(local: str | os.PathLike[str], location: MilvusLocation,
               options: MilvusIndexOptions | None = None) -> int:
    """Copy a local index into a Milvus collection (created when absent); returns the rows copied.

    Rows are upserted by path, so a rerun (after a kill, or into a collection other workers
    fill) copies again without duplicating. The collection must have been built by the same model.

    Raises:
        FghError: a damaged local index, a path Milvus cannot store, a model mismatch, Milvus unreachable.
    """
    from .index import CodeIndex

    with CodeIndex.open(local) as source, MilvusIndex.open_or_create(
            location, bits=source.bits, fingerprint=source.fingerprint, model=source.model,
            preprocess=source.preprocess, engine=source.engine, root=source.root, options=options,
            hint="push into another collection") as target:
        n = len(source)
        for start in range(0, n, _ROWS_PER_CALL):
            stop = min(start + _ROWS_PER_CALL, n)
            target.append(source.codes[start:stop], source.paths(range(start, stop)), source.stats[start:stop])
        log.info("%s: pushed %d rows from %s", location.name, n, source.label)
        return n


def pull_index(location: MilvusLocation, local: str | os.PathLike[str]) -> int:
    """Copy a Milvus collection into a new local index, rows in path order; returns the rows copied.

    Path order is Milvus's tie order, so the local index answers queries in the same order, and
    a collection pushed from a freshly encoded index (whose rows are in path order) comes back
    byte for byte in its codes, paths and stats.

    Raises:
        FghError: an index already at ``local``, Milvus unreachable, not an fgh collection.
    """
    from .index import CodeIndex

    with MilvusIndex.open(location) as source:
        codes, paths, stats = source.all_rows()
        with CodeIndex.create(local, bits=source.bits, fingerprint=source.fingerprint, model=source.model,
                              preprocess=source.preprocess, engine=source.engine, root=source.root) as target:
            target.append(codes, paths, stats)
        log.info("%s: pulled %d rows into %s", location.name, len(paths), local)
        return len(paths)
