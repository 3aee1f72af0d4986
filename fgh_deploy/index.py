"""The on-disk code index: what ``fgh encode`` writes and ``fgh query`` searches.

An index is a directory::

    manifest.json        small JSON, rewritten atomically on every commit (see below)
    lock                 flock'ed by the one writer; holds its pid
    skipped.tsv          (optional) what ``fgh encode`` could not read; travels with the index
    codes.<gen>.bin      N × code_size bytes: the packed codes, row after row (uint8)
    paths.<gen>.bin      every image's relative path, os.fsencode'd, concatenated
    offsets.<gen>.bin    N little-endian int64: the end of row i's path in paths.<gen>.bin
    stats.<gen>.bin      N × 2 little-endian int64: (file size, mtime_ns) per image

Size on disk: ``N × (code_size + 24)`` bytes plus the path bytes (8 bytes per row of
offsets and 16 of stats; the stats let a re-run spot modified images without decoding them).

``manifest.json`` holds ``format`` ("fgh-index"), ``format_version``, ``bits``, ``bit_order``
(:data:`fgh_deploy.bits.BIT_ORDER`), ``code_size`` (``ceil(bits / 8)``), ``fingerprint`` (the
model's sha256), ``model`` (its config dict), ``preprocess`` (``PreprocessConfig.to_dict()``),
``engine`` (free-form: what produced the codes), ``root`` (the image folder), ``created``,
``generation``, ``ntotal`` (committed rows) and ``files``: per data file kind, the committed
``bytes`` and the ``crc32`` of those bytes.

Loading is near-instant: the data files are memory-mapped (no per-row parsing) and a path
is decoded only when asked for. Opening with ``verify=True`` (the default) reads every
committed byte once to check the CRCs, a cost that grows with the index; ``verify=False``
skips that and checks sizes only.

Resuming: :meth:`CodeIndex.plan_resume` compares the stored (size, mtime_ns) of each row with
the image folder as it is now and says which rows to keep (file unchanged), which to drop
(file changed or gone) and which images still need encoding; ``fgh encode`` acts on that.

Crash safety (a kill -9 at any moment leaves the last committed state):

* Rows are only ever appended past the committed bytes; committed bytes are never rewritten.
* :meth:`CodeIndex.commit` fsyncs the data files *before* it atomically replaces the
  manifest (temporary file, fsync, rename), so a manifest never names bytes that are not on
  disk, and the manifest on disk is always a complete old or new one.
* Bytes past the manifest's lengths belong to an interrupted append: read-only opens ignore
  them, writable opens truncate them. Files shorter than the manifest, or a CRC mismatch,
  are damage and raise :class:`~fgh_deploy.errors.FghError`.
* :meth:`CodeIndex.compact` writes the kept rows to generation ``gen + 1``, fsyncs it, then
  switches the manifest; until the switch the old generation is untouched, after it the
  old files are deleted. Files of a generation the manifest does not name are leftovers of a
  crash, ignored by readers and deleted by the next writer.

* A replacement (:meth:`CodeIndex.create` with ``overwrite=True`` over an existing index) is
  built in the sibling folder ``.<name>.fgh-rebuild`` while the old index stays in place,
  locked. Only when the new one is complete (:meth:`CodeIndex.publish`, or a clean exit of its
  ``with`` block) are the folders switched: old → ``.<name>.fgh-replaced``, new → ``<name>``,
  then the old one is deleted. A crash before the first rename leaves the old index (the half-built
  sibling is deleted by the next writer); a crash between the renames leaves the old index in
  ``.<name>.fgh-replaced``, which the next writer renames back; after the second rename the
  new index is in place.

Hostile folders: every file of an index is opened without following symbolic links and must
be a regular file, or the open fails with one line; nothing is truncated or deleted before the
whole index has been checked. Running out of disk space (``ENOSPC``, ``EFBIG``, ``EDQUOT``)
is an :class:`~fgh_deploy.errors.FghError` that leaves the last commit in place.

POSIX only (``fcntl.flock``, ``O_NOFOLLOW`` and directory fsync), like the checkpoint writer.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import errno
import fcntl
import itertools
import json
import logging
import operator
import os
import re
import stat
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from .bits import BIT_ORDER, packed_width
from .config import parse_json_object
from .errors import FghError
from .search import HammingSearcher
from .utils import atomic_write, check_int, display_path, fsync_dir, terminal_safe

log = logging.getLogger(__name__)

FORMAT = "fgh-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = "lock"
#: What ``fgh encode`` could not read; the one file besides the index's own that its folder holds.
SKIPPED_LOG = "skipped.tsv"

_KINDS = ("codes", "paths", "offsets", "stats")
_DATA_FILE = re.compile(r"(codes|paths|offsets|stats)\.(\d+)\.bin")
# atomic_write's temporary manifest, left behind when a commit is killed before its rename.
_MANIFEST_TMP = re.compile(re.escape(f".{MANIFEST}.") + r".+\.tmp")
# Every name an index folder may hold: a replacement may move and delete exactly these.
_INDEX_ENTRY = re.compile(
    r"(codes|paths|offsets|stats)\.\d+\.bin|"
    + "|".join(re.escape(name) for name in (MANIFEST, LOCK, SKIPPED_LOG))
    + "|" + "|".join(re.escape(f".{name}.") + r".+\.tmp" for name in (MANIFEST, SKIPPED_LOG))
)
# Sibling folders of a replacement in progress (see the module docstring).
_REBUILD_SUFFIX = ".fgh-rebuild"
_REPLACED_SUFFIX = ".fgh-replaced"
# fgh writes manifests of a few KB; a bigger one is not fgh's and is not read into memory.
_MAX_MANIFEST_BYTES = 1 << 20
# Errors that mean the disk (or the file size or quota allowed) is full.
_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_INT64 = np.dtype("<i8")
_CRC_CHUNK = 1 << 24
# Rows per step when compacting: bounds the temporaries to tens of MB for any index size.
_COMPACT_ROWS = 1 << 20
#: The order of hits at equal distance: rows in the order they were appended (path order after a fresh encode).
TIE_RULE = "distance, then database order"


@dataclass(frozen=True)
class ResumePlan:
    """How an index catches up with its image folder (from :meth:`CodeIndex.plan_resume`).

    Apply it with ``index.compact(plan.keep)`` (when :attr:`dropped`), then encode and
    append :attr:`encode`.
    """

    #: One bool per committed row: true when its file is still listed with the same size and mtime.
    keep: np.ndarray
    #: Listed paths without a kept row (new or changed images), in listing order.
    encode: list[str]

    @property
    def dropped(self) -> int:
        """Committed rows whose file changed or is gone."""
        return int(np.count_nonzero(~self.keep))


class CodeIndex:
    """Packed codes, image paths and file stats of one image folder, on disk.

    Get one with :meth:`create` or :meth:`open`, not the constructor. Rows are appended
    with :meth:`append` and become visible (to ``len``, :attr:`codes`, searches and other
    processes) at :meth:`commit`. Used as a context manager, a writable index commits on a
    clean exit and discards uncommitted rows when the block raises; either way it closes.

    Only one writer at a time (an exclusive ``flock`` on ``lock``); any number of readers,
    which never take the lock and see the last commit made before they opened.

    Implements :class:`~fgh_deploy.index_uri.SearchIndex`, like the Milvus backend.
    """

    tie_rule = TIE_RULE
    #: Search here is always exact.
    approximate: str | None = None

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        files: dict[str, IO[bytes]],
        lock: IO[bytes] | None,
    ) -> None:
        """Wrap opened data files; use :meth:`create` or :meth:`open` instead."""
        self._path = path
        self._manifest = manifest
        self._files: dict[str, IO[bytes]] | None = files
        self._lock = lock
        # (bytes, crc32) per kind: as committed, and as written (committed + pending rows).
        self._committed = _file_state(manifest)
        self._written = dict(self._committed)
        self._pending = 0
        self._views: dict[str, np.ndarray] = {}
        self._searcher: HammingSearcher | None = None
        # A replacement being built: the index it replaces and that index's held writer lock.
        self._replaces: tuple[Path, IO[bytes]] | None = None

    # ----------------------------------------------------------------- opening

    @staticmethod
    def exists(path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` holds an index: a ``manifest.json`` entry (:meth:`open` checks the rest),
        or the old index of a replacement interrupted between its renames (a writer restores it)."""
        path = Path(path)
        return os.path.lexists(path / MANIFEST) or (
            not os.path.lexists(path) and os.path.lexists(_sibling(path, _REPLACED_SUFFIX) / MANIFEST)
        )

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        bits: int,
        fingerprint: str,
        model: Any,
        preprocess: Any,
        engine: dict[str, Any],
        root: str | os.PathLike[str],
        overwrite: bool = False,
    ) -> CodeIndex:
        """Create an empty index and open it for writing.

        Args:
            path: The index directory; created if missing. It may exist only empty, as a
                leftover of an interrupted create, or (with ``overwrite``) as an index.
            bits: Code length in bits.
            fingerprint: The model's sha256 (64 lowercase hex digits).
            model: The model's config, a dict or a :class:`~fgh_deploy.config.HashConfig`.
            preprocess: A dict or a :class:`~fgh_deploy.config.PreprocessConfig`.
            engine: JSON-serialisable description of what produces the codes,
                e.g. ``{"kind": "pytorch", "path": "m.pt", "precision": "fp32"}``.
            root: The image folder the relative paths are relative to.
            overwrite: Replace an existing index (or the data files of one whose manifest is
                gone). The new index is built beside the old one, which stays searchable and
                locked until :meth:`publish` (or a clean exit of the ``with`` block) switches
                them; closing before that, or a crash, leaves the old index.

        Returns:
            The new, writable, empty index.

        Raises:
            FghError: Bad arguments, ``path`` is a file or a foreign non-empty directory,
                an index (or its data files) exists there and ``overwrite`` is false, or
                another writer holds it.
        """
        manifest = _new_manifest(bits, fingerprint, model, preprocess, engine, root)
        path = Path(path)
        shown = display_path(path)
        _restore_interrupted_replacement(path)
        if os.path.lexists(path) and not path.is_dir():
            raise FghError(f"{shown}: exists and is not a directory")
        names = os.listdir(path) if path.exists() else []
        data_files = sorted(filter(_DATA_FILE.fullmatch, names))
        # An index folder may hold other files (encode's skipped.tsv), but a folder without
        # data files must hold nothing but a crashed create's: never write into, say, the
        # image folder. Checked before the lock file is made, so a refused folder stays as it was.
        if not data_files:
            foreign = sorted(n for n in names if n != LOCK and not _MANIFEST_TMP.fullmatch(n))
            if foreign:
                raise FghError(
                    f"{shown}: not empty and not an fgh index (holds {display_path(foreign[0])!r}); "
                    "refusing to write into it"
                )
        has_manifest = MANIFEST in names
        if data_files and not has_manifest and not overwrite and not _only_empty_files(path, data_files):
            # Index data without a manifest is not a crashed create (whose data files are empty):
            # someone deleted the manifest. Replacing the data must be asked for.
            raise FghError(
                f"{shown}: holds fgh index data ({', '.join(data_files[:4])}) but no {MANIFEST}; "
                "refusing to replace it: replace it with --rebuild (overwrite=True) or choose another --out"
            )
        if data_files and overwrite:
            return cls._create_replacement(path, manifest)
        path.mkdir(parents=True, exist_ok=True)
        lock = _acquire_lock(path)
        try:
            if has_manifest:
                raise FghError(
                    f"{shown}: already holds an fgh index; replace it with --rebuild "
                    "(overwrite=True) or choose another --out"
                )
            _remove_rebuild_leftovers(path)
            return cls._create_in(path, manifest, lock)
        except BaseException:
            lock.close()
            raise

    @classmethod
    def _create_in(cls, path: Path, manifest: dict[str, Any], lock: IO[bytes]) -> CodeIndex:
        """Write an empty index into ``path`` (locked by ``lock``, which the index then owns)."""
        files: dict[str, IO[bytes]] = {}
        try:
            # Above every generation on disk, so the files of a crashed compaction or create
            # are never reused.
            manifest["generation"] = 1 + max(_generations_on_disk(path), default=-1)
            for kind in _KINDS:
                files[kind] = _open_file(path, _file_name(kind, manifest["generation"]), "new")
                os.fsync(files[kind].fileno())
            fsync_dir(path)
            _write_manifest(path, manifest)
            index = cls(path, manifest, files, lock)
            index._remove_leftovers()
        except OSError as exc:
            _close_all(files.values())
            if exc.errno in _NO_SPACE:
                raise FghError(f"{display_path(path)}: no space left on device while creating the index") from None
            raise
        except BaseException:
            _close_all(files.values())
            raise
        log.info("%s: created an empty %d-bit index", path, manifest["bits"])
        return index

    @classmethod
    def _create_replacement(cls, path: Path, manifest: dict[str, Any]) -> CodeIndex:
        """An empty index in ``.<name>.fgh-rebuild`` that :meth:`publish` moves to ``path``."""
        names = os.listdir(path)
        foreign = sorted(n for n in names if not _INDEX_ENTRY.fullmatch(n) or os.path.isdir(path / n))
        if foreign:
            # The replacement takes the folder's place: anything else in it would vanish with the old index.
            raise FghError(
                f"{display_path(path)}: holds {display_path(foreign[0])!r}, which is not part of an fgh "
                "index; move it away before replacing the index"
            )
        old_lock = _acquire_lock(path)
        try:
            _remove_rebuild_leftovers(path)
            staging = _sibling(path, _REBUILD_SUFFIX)
            staging.mkdir()
            index = cls._create_in(staging, manifest, _acquire_lock(staging))
        except BaseException:
            old_lock.close()
            raise
        index._replaces = (path, old_lock)
        return index

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, writable: bool = False, verify: bool = True
    ) -> CodeIndex:
        """Open an existing index at its last commit.

        Args:
            path: The index directory.
            writable: Take the writer lock, drop the bytes of an interrupted append and
                delete a crashed compaction's or replacement's leftovers (and move back an
                old index a crashed replacement left beside it). Read-only opens write nothing.
            verify: Check the CRC of every committed byte (see the module docstring for
                the cost); sizes are always checked.

        Returns:
            The index.

        Raises:
            FghError: Not an index, a newer format, a damaged manifest or data file, a link
                or a non-regular file among its files, or (``writable``) another writer
                holds it. The message says which and why.
        """
        path = Path(path)
        if writable:
            _restore_interrupted_replacement(path)
        _read_manifest(path)  # "not an index" before taking a lock in a foreign folder
        lock = _acquire_lock(path) if writable else None
        files: dict[str, IO[bytes]] = {}
        try:
            # A reader racing a compaction may find the generation it read deleted: it
            # then reads the new manifest and tries again.
            for attempt in range(3):
                manifest = _read_manifest(path)
                gen = manifest["generation"]
                try:
                    for kind in _KINDS:
                        files[kind] = _open_file(path, _file_name(kind, gen), "update" if writable else "read")
                    break
                except FileNotFoundError as exc:
                    _close_all(files.values())
                    files = {}
                    if writable or attempt == 2 or _read_manifest(path)["generation"] == gen:
                        name = Path(exc.filename).name
                        raise FghError(f"{display_path(path)}: damaged: {name} is missing") from None
            index = cls(path, manifest, files, lock)
            index._check_data(verify)
            if writable:
                index._remove_leftovers()
                _remove_rebuild_leftovers(path)
        except BaseException:
            _close_all(files.values())
            if lock is not None:
                lock.close()
            raise
        return index

    # -------------------------------------------------------------- properties

    @property
    def path(self) -> Path:
        """The index directory."""
        return self._path

    @property
    def label(self) -> str:
        """How messages name this index: its folder."""
        return display_path(self._path)

    @property
    def writable(self) -> bool:
        """Whether this handle holds the writer lock."""
        return self._lock is not None

    @property
    def bits(self) -> int:
        """Code length in bits."""
        return self._manifest["bits"]

    @property
    def code_size(self) -> int:
        """Bytes per packed code, ``ceil(bits / 8)``."""
        return self._manifest["code_size"]

    @property
    def ntotal(self) -> int:
        """Committed rows (appended rows count from the next :meth:`commit`)."""
        return self._manifest["ntotal"]

    def __len__(self) -> int:
        return self.ntotal

    @property
    def nbytes(self) -> int:
        """Bytes of committed data on disk: codes, paths, offsets and stats (not the manifest)."""
        return sum(size for size, _ in self._committed.values())

    @property
    def fingerprint(self) -> str:
        """sha256 of the model that made the codes."""
        return self._manifest["fingerprint"]

    @property
    def model(self) -> dict[str, Any]:
        """The model's config dict (a copy)."""
        return copy.deepcopy(self._manifest["model"])

    @property
    def preprocess(self) -> dict[str, Any]:
        """The preprocessing dict (a copy); ``PreprocessConfig.from_dict`` rebuilds it."""
        return copy.deepcopy(self._manifest["preprocess"])

    @property
    def engine(self) -> dict[str, Any]:
        """What produced the codes (a copy)."""
        return copy.deepcopy(self._manifest["engine"])

    @property
    def root(self) -> str:
        """The image folder the paths are relative to."""
        return self._manifest["root"]

    @property
    def codes(self) -> np.ndarray:
        """Read-only ``(ntotal, code_size)`` uint8 view of the committed codes (memory-mapped)."""
        return self._view("codes")

    @property
    def stats(self) -> np.ndarray:
        """Read-only ``(ntotal, 2)`` int64: each image's file size and mtime_ns."""
        return self._view("stats")

    # ------------------------------------------------------------------- paths

    def path_of(self, i: int) -> str:
        """Relative path of row ``i``.

        Raises:
            IndexError: ``i`` is not in ``0..ntotal - 1``.
        """
        return self.paths([operator.index(i)])[0]

    def paths(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """Relative paths of ``rows``, in that order; only these rows are decoded.

        Raises:
            IndexError: A row is not in ``0..ntotal - 1`` (the -1 of a missing search
                neighbour included: it is not "the last row" here).
        """
        rows = self._check_rows(rows)
        ends = self._view("offsets")
        blob = self._view("paths")
        starts = np.where(rows > 0, ends[np.maximum(rows - 1, 0)], 0)
        return [os.fsdecode(blob[s:e].tobytes()) for s, e in zip(starts.tolist(), ends[rows].tolist())]

    def sample_paths(self, count: int) -> list[str]:
        """Relative paths of up to ``count`` rows spread evenly over the index (first and last included)."""
        count = min(check_int(count, "count", minimum=0), len(self))
        return self.paths(sorted({int(r) for r in np.linspace(0, len(self) - 1, count)})) if count else []

    def all_paths(self) -> list[str]:
        """Relative paths of every committed row."""
        blob = self._view("paths").tobytes()
        ends = self._view("offsets").tolist()
        return [os.fsdecode(blob[s:e]) for s, e in zip([0, *ends[:-1]], ends)]

    # ----------------------------------------------------------------- resuming

    def plan_resume(self, listing: Mapping[str, tuple[int, int]]) -> ResumePlan:
        """Compare the committed rows with the image folder as it is now.

        The stored (size, mtime_ns) stand in for the file's content: a row is kept when its
        path is listed with exactly those stats, so an unchanged image is never decoded again,
        and a modified or deleted one is dropped (and a modified one encoded anew).

        Args:
            listing: Every image path under :attr:`root` now, in the order to encode them,
                with its ``(size, mtime_ns)`` (``(-1, -1)`` for a file that cannot be stat'ed:
                it matches no row).

        Returns:
            The rows to keep (the others to drop) and the paths still to encode.
        """
        paths = self.all_paths()
        keep = np.fromiter(
            (listing.get(path) == (size, mtime) for path, (size, mtime) in zip(paths, self.stats.tolist())),
            dtype=bool,
            count=len(paths),
        )
        kept = set(itertools.compress(paths, keep))
        return ResumePlan(keep=keep, encode=[path for path in listing if path not in kept])

    # ------------------------------------------------------------------ writing

    def append(self, codes_packed: Any, rel_paths: Sequence[str], stats: Any) -> None:
        """Append rows; they are written now and become part of the index at :meth:`commit`.

        Args:
            codes_packed: uint8 ``(n, code_size)`` codes from :func:`~fgh_deploy.bits.pack_codes`.
            rel_paths: ``n`` paths relative to :attr:`root`; ``str`` that may carry
                surrogate escapes (stored as ``os.fsencode`` bytes, so they round-trip).
            stats: Integer ``(n, 2)``: each file's size in bytes and ``st_mtime_ns``.

        Raises:
            FghError: Bad shapes or dtypes, set padding bits (another bit length), an
                empty path, or the index is read-only. Nothing is written then.
        """
        self._require_writable("append to")
        codes = check_codes(codes_packed, self.bits, self.code_size)
        n = len(codes)
        if isinstance(rel_paths, (str, bytes)):
            raise FghError("rel_paths must be a sequence of paths, not one string")
        encoded = [os.fsencode(p) for p in rel_paths]
        if len(encoded) != n:
            raise FghError(f"got {n} codes but {len(encoded)} paths")
        if not all(encoded):
            raise FghError(f"rel_paths[{encoded.index(b'')}] is an empty path")
        stats_arr = np.asarray(stats)
        if stats_arr.shape != (n, 2) or stats_arr.dtype.kind not in "iu":
            raise FghError(
                f"stats must be integer (n, 2) = (size, mtime_ns) per row, n = {n}; got "
                f"{stats_arr.dtype} {stats_arr.shape}"
            )
        if n == 0:
            return
        ends = self._written["paths"][0] + np.cumsum([len(p) for p in encoded], dtype=np.int64)
        chunks = {
            "codes": np.ascontiguousarray(codes).tobytes(),
            "paths": b"".join(encoded),
            "offsets": ends.astype(_INT64).tobytes(),
            "stats": stats_arr.astype(_INT64).tobytes(),
        }
        before = dict(self._written)
        try:
            for kind, data in chunks.items():
                self._write(kind, data)
        except BaseException:
            # Keep the files row-aligned: a half-written batch would misalign later rows.
            self._truncate(before)
            raise
        self._pending += n

    def commit(self) -> None:
        """Make the appended rows durable and visible: fsync the data, then switch the manifest.

        Raises:
            FghError: The index is read-only, or the disk is full (the rows stay uncommitted).
        """
        self._require_writable("commit")
        if self._pending == 0:
            return
        gen = self._manifest["generation"]
        for kind, f in self._open_files().items():
            with self._no_space_is_an_error(_file_name(kind, gen)):
                os.fsync(f.fileno())
        manifest = dict(
            self._manifest,
            ntotal=self.ntotal + self._pending,
            files=_files_field(self._written),
        )
        with self._no_space_is_an_error(MANIFEST):
            _write_manifest(self._path, manifest)
        log.debug("%s: committed %d rows (%d in all)", self._path, self._pending, manifest["ntotal"])
        self._set_committed(manifest)

    def compact(self, keep_mask: Any) -> None:
        """Keep only the rows where ``keep_mask`` is true, in order, renumbering them 0..

        Writes the kept rows to a new generation of data files and switches the manifest
        to it atomically: a crash leaves either the old or the new index, never a mix.

        Args:
            keep_mask: bool array of :attr:`ntotal` entries.

        Raises:
            FghError: Read-only index, uncommitted rows, a mask of the wrong shape/dtype, or
                the disk is full (the index stays as it was).
        """
        self._require_writable("compact")
        n = self.ntotal
        if self._pending:
            raise FghError(f"{display_path(self._path)}: commit() the {self._pending} appended rows before compacting")
        keep = np.asarray(keep_mask)
        if keep.dtype != np.bool_ or keep.shape != (n,):
            raise FghError(f"keep_mask must be a bool array of {n} entries, got {keep.dtype} {keep.shape}")
        if keep.all():
            return
        gen = self._manifest["generation"] + 1
        new_files: dict[str, IO[bytes]] = {}
        try:
            with self._no_space_is_an_error(f"generation {gen} of its data files (compacting)"):
                for kind in _KINDS:
                    new_files[kind] = _open_file(self._path, _file_name(kind, gen), "new")
                state = self._copy_rows(keep, new_files)
                for f in new_files.values():
                    os.fsync(f.fileno())
                fsync_dir(self._path)  # the new names must be durable before a manifest names them
        except BaseException:
            _close_all(new_files.values())
            for kind in new_files:  # only the files this call created
                (self._path / _file_name(kind, gen)).unlink(missing_ok=True)
            raise
        manifest = dict(
            self._manifest,
            generation=gen,
            ntotal=int(keep.sum()),
            files=_files_field(state),
        )
        try:
            with self._no_space_is_an_error(MANIFEST):
                _write_manifest(self._path, manifest)  # the switch
        except BaseException:
            # Not switched: the new files are leftovers the next writable open deletes.
            _close_all(new_files.values())
            raise
        _close_all(self._open_files().values())
        self._files = new_files
        self._set_committed(manifest)
        log.info("%s: compacted %d rows to %d", self._path, n, manifest["ntotal"])
        self._remove_leftovers()

    def remove(self, rows: Sequence[int] | np.ndarray) -> None:
        """Delete ``rows`` (committed row numbers); the rest keep their order (see :meth:`compact`)."""
        keep = np.ones(self.ntotal, dtype=bool)
        keep[self._check_rows(rows)] = False
        self.compact(keep)

    def check_compatible(self, bits: int, fingerprint: str, *, hint: str = "") -> None:
        """Refuse to mix codes of another model or bit length into this index.

        Args:
            bits: The model's code length.
            fingerprint: The model's sha256.
            hint: What the caller's user can do about a mismatch, appended after " — ".

        Raises:
            FghError: ``bits`` or ``fingerprint`` differ from the index's.
        """
        if bits != self.bits or fingerprint != self.fingerprint:
            raise FghError(
                f"{display_path(self._path)}: built with model {self.fingerprint[:12]} at {self.bits} bits; "
                f"this model is {str(fingerprint)[:12]} at {bits} bits" + (f" — {hint}" if hint else "")
            )

    # --------------------------------------------------------------- searching

    def searcher(self, device: str = "cpu") -> HammingSearcher:
        """A :class:`~fgh_deploy.search.HammingSearcher` over the committed codes on ``device``.

        Cached until the next commit; asking for another device builds a new one.
        """
        if self._searcher is None or self._searcher.device != device:
            self._searcher = HammingSearcher(self.codes, device=device)
        return self._searcher

    def search(self, queries: Any, k: int, *, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
        """Exact Hamming k-NN, ``(D, I)`` as in :meth:`HammingSearcher.search`; ``I`` are rows."""
        return self.searcher(device).search(queries, k)

    def range_search(self, queries: Any, radius: int, *,
                     device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Codes within ``radius``, ``(lims, D, I)`` as in :meth:`HammingSearcher.range_search`."""
        return self.searcher(device).range_search(queries, radius)

    # ------------------------------------------------------------------ closing

    def publish(self) -> None:
        """Commit, and put a replacement (``create(..., overwrite=True)``) in the old index's place.

        The switch is two renames in the parent folder (see the module docstring): old →
        ``.<name>.fgh-replaced``, this one → ``<name>``; then the old index is deleted. For
        an index that replaces nothing this is :meth:`commit`.

        Raises:
            FghError: The index is read-only or the disk is full; or the switch failed, with
                the old index kept (what to do is in the message).
        """
        self.commit()
        if self._replaces is None:
            return
        target, old_lock = self._replaces
        staging = self._path
        real = Path(os.path.realpath(target))  # a linked folder is replaced where it points
        replaced = _sibling(target, _REPLACED_SUFFIX)
        try:
            os.rename(real, replaced)
        except OSError as exc:
            raise FghError(f"{display_path(target)}: cannot move the old index aside ({exc.strerror})") from None
        try:
            os.rename(staging, real)
        except OSError as exc:
            os.rename(replaced, real)
            raise FghError(f"{display_path(target)}: cannot move the new index in place ({exc.strerror})") from None
        fsync_dir(real.parent)
        self._path = target
        self._replaces = None
        old_lock.close()
        _remove_index_folder(replaced)
        log.info("%s: replaced by a new index of %d rows", target, self.ntotal)

    def close(self) -> None:
        """Release the files and the writer lock; uncommitted rows are discarded.

        A replacement that was not published is deleted, and the old index stays.
        """
        if self._files is None:
            return
        try:
            if self._pending and self._replaces is None:
                log.warning("%s: discarding %d uncommitted rows", self._path, self._pending)
                self._truncate(self._committed)
                self._pending = 0
        finally:
            _close_all(self._files.values())
            self._files = None
            if self._lock is not None:
                self._lock.close()  # closing the descriptor releases the flock
            if self._replaces is not None:
                target, old_lock = self._replaces
                log.warning("%s: replacement not completed; the old index stays", target)
                _remove_index_folder(self._path)
                old_lock.close()

    def __enter__(self) -> CodeIndex:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None and self.writable and self._files is not None:
                self.publish()
        finally:
            self.close()

    def __repr__(self) -> str:
        mode = "writable" if self.writable else "read-only"
        return f"CodeIndex({str(self._path)!r}, ntotal={self.ntotal}, bits={self.bits}, {mode})"

    # ---------------------------------------------------------------- internals

    def _open_files(self) -> dict[str, IO[bytes]]:
        if self._files is None:
            raise ValueError(f"{display_path(self._path)}: the index is closed")
        return self._files

    def _require_writable(self, action: str) -> None:
        self._open_files()
        if self._lock is None:
            raise FghError(f"{display_path(self._path)}: opened read-only; cannot {action} it")

    def _check_rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        bad = (rows < 0) | (rows >= self.ntotal)
        if bad.any():
            raise IndexError(f"row {rows[bad][0]} is out of range for an index of {self.ntotal} rows")
        return rows

    def _view(self, kind: str) -> np.ndarray:
        """Memory-map the committed part of a data file (cached until the next commit)."""
        view = self._views.get(kind)
        if view is None:
            n, size = self.ntotal, self._committed[kind][0]
            dtype, shape = {
                "codes": (np.uint8, (n, self.code_size)),
                "paths": (np.uint8, (size,)),
                "offsets": (_INT64, (n,)),
                "stats": (_INT64, (n, 2)),
            }[kind]
            if size == 0:  # mmap cannot map 0 bytes
                view = np.zeros(shape, dtype)
                view.flags.writeable = False
            else:
                # Maps the committed prefix only: bytes a writer appends later stay invisible.
                view = np.memmap(self._open_files()[kind], dtype=dtype, mode="r", shape=shape)
            self._views[kind] = view
        return view

    def _check_data(self, verify: bool) -> None:
        """Compare each data file with the manifest; drop an interrupted append if writable."""
        gen = self._manifest["generation"]
        shown = display_path(self._path)
        sizes = {}
        for kind, f in self._open_files().items():
            name = _file_name(kind, gen)
            want, want_crc = self._committed[kind]
            sizes[kind] = os.fstat(f.fileno()).st_size
            if sizes[kind] < want:
                raise FghError(
                    f"{shown}: damaged: {name} is {sizes[kind]} bytes, the manifest says {want} (truncated?)"
                )
            if verify and _crc32(f, want) != want_crc:
                raise FghError(f"{shown}: damaged: {name} checksum mismatch (edited or corrupt)")
        # Offsets index into the path blob: bad ones would decode wrong paths, not fail.
        ends = self._view("offsets")
        paths_size = self._committed["paths"][0]
        last = int(ends[-1]) if len(ends) else 0
        if last != paths_size or (verify and len(ends) and (ends[0] < 0 or (np.diff(ends) < 0).any())):
            raise FghError(
                f"{shown}: damaged: {_file_name('offsets', gen)} does not match "
                f"{_file_name('paths', gen)} ({paths_size} bytes)"
            )
        if not self.writable:
            return
        # Only now, with every file checked, is anything cut.
        for kind, f in self._open_files().items():
            want = self._committed[kind][0]
            if sizes[kind] > want:
                log.info("%s: dropping %d bytes of an interrupted append from %s",
                         self._path, sizes[kind] - want, _file_name(kind, gen))
                f.truncate(want)

    def _write(self, kind: str, data: bytes) -> None:
        size, crc = self._written[kind]
        f = self._open_files()[kind]
        f.seek(size)
        # The files are unbuffered: pending rows wait in the OS page cache, never in a Python
        # buffer that a later truncate or close could write out of order (or fail to flush).
        with self._no_space_is_an_error(_file_name(kind, self._manifest["generation"])):
            _write_all(f, data)
        # crc32 continues from the previous value: a commit never re-reads the file.
        self._written[kind] = (size + len(data), zlib.crc32(data, crc))

    def _truncate(self, state: dict[str, tuple[int, int]]) -> None:
        for kind, f in self._open_files().items():
            f.truncate(state[kind][0])
        self._written = dict(state)

    @contextlib.contextmanager
    def _no_space_is_an_error(self, writing: str) -> Iterator[None]:
        """Turn a full disk (or file size limit, or quota) while writing ``writing`` into one line."""
        try:
            yield
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise
            reason = os.strerror(exc.errno).lower()
            if self._replaces is not None:
                raise FghError(
                    f"{display_path(self._replaces[0])}: {reason} while writing its replacement "
                    f"({writing}); the old index is kept as it was"
                ) from None
            raise FghError(
                f"{display_path(self._path)}: {reason} while writing {writing}; the index keeps the "
                f"{self.ntotal} images encoded before (run again with more space: it resumes)"
            ) from None

    def _set_committed(self, manifest: dict[str, Any]) -> None:
        self._manifest = manifest
        self._committed = _file_state(manifest)
        self._written = dict(self._committed)
        self._pending = 0
        self._views = {}
        self._searcher = None

    def _copy_rows(self, keep: np.ndarray, files: dict[str, IO[bytes]]) -> dict[str, tuple[int, int]]:
        """Write the kept committed rows to ``files``; return each file's (bytes, crc32)."""
        codes, ends, blob, stats = (self._view(k) for k in ("codes", "offsets", "paths", "stats"))
        state = {kind: (0, 0) for kind in _KINDS}

        def write(kind: str, data: bytes) -> None:
            size, crc = state[kind]
            _write_all(files[kind], data)
            state[kind] = (size + len(data), zlib.crc32(data, crc))

        for start in range(0, len(keep), _COMPACT_ROWS):
            stop = min(start + _COMPACT_ROWS, len(keep))
            mask = keep[start:stop]
            first = int(ends[start - 1]) if start else 0
            chunk_ends = np.asarray(ends[start:stop])
            lengths = np.diff(chunk_ends, prepend=first)
            # One bool per path byte selects the kept paths' bytes without a Python loop.
            kept_blob = np.asarray(blob[first : chunk_ends[-1]])[np.repeat(mask, lengths)]
            new_ends = state["paths"][0] + np.cumsum(lengths[mask], dtype=np.int64)
            write("codes", np.asarray(codes[start:stop])[mask].tobytes())
            write("paths", kept_blob.tobytes())
            write("offsets", new_ends.astype(_INT64).tobytes())
            write("stats", np.asarray(stats[start:stop])[mask].astype(_INT64).tobytes())
        return state

    def _remove_leftovers(self) -> None:
        """Delete other generations' data files and stray temporary manifests (writer only)."""
        gen = self._manifest["generation"]
        for name in os.listdir(self._path):
            match = _DATA_FILE.fullmatch(name)
            if (match and int(match[2]) != gen) or _MANIFEST_TMP.fullmatch(name):
                log.info("%s: removing leftover %s", self._path, name)
                try:
                    os.unlink(self._path / name)  # a symlink goes, never what it points to
                except IsADirectoryError:
                    raise FghError(
                        f"{display_path(self._path)}: {display_path(name)} is a directory where fgh keeps its "
                        "files; move it away"
                    ) from None


# ------------------------------------------------------------------- helpers


def _file_name(kind: str, generation: int) -> str:
    return f"{kind}.{generation}.bin"


def _file_state(manifest: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(bytes, crc32) per data file kind, as the manifest's ``files`` records them."""
    return {kind: (manifest["files"][kind]["bytes"], manifest["files"][kind]["crc32"]) for kind in _KINDS}


def _files_field(state: dict[str, tuple[int, int]]) -> dict[str, dict[str, int]]:
    """The manifest's ``files`` for (bytes, crc32) per kind: the inverse of :func:`_file_state`."""
    return {kind: {"bytes": size, "crc32": crc} for kind, (size, crc) in state.items()}


def _generations_on_disk(path: Path) -> list[int]:
    return [int(m[2]) for m in map(_DATA_FILE.fullmatch, os.listdir(path)) if m]


def _new_manifest(bits: int, fingerprint: str, model: Any, preprocess: Any, engine: dict[str, Any],
                  root: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of an empty index; bad arguments fail here, before anything is written."""
    code_size = packed_width(bits)
    if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
        raise FghError(f"fingerprint must be a sha256 hex string, got {fingerprint!r}")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bits": operator.index(bits),
        "bit_order": BIT_ORDER,
        "code_size": code_size,
        "fingerprint": fingerprint,
        "model": _as_dict(model, "model"),
        "preprocess": _as_dict(preprocess, "preprocess"),
        "engine": _as_dict(engine, "engine"),
        "root": os.fsdecode(root),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "generation": 0,
        "ntotal": 0,
        "files": _files_field({kind: (0, 0) for kind in _KINDS}),
    }
    _encode_manifest(manifest)  # a value JSON cannot hold fails here
    return manifest


def _as_dict(value: Any, name: str) -> dict[str, Any]:
    """A config object's ``to_dict()``, or a dict copied as is."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if not isinstance(value, dict):
        raise FghError(f"{name} must be a dict, got {type(value).__name__}")
    return copy.deepcopy(value)


def check_codes(codes_packed: Any, bits: int, code_size: int) -> np.ndarray:
    """``codes_packed`` as a uint8 ``(n, code_size)`` array of ``bits``-bit packed codes, or a one-line FghError."""
    codes = np.asarray(codes_packed)
    if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != code_size:
        raise FghError(
            f"codes must be uint8 (n, {code_size}) packed {bits}-bit codes (see pack_codes), "
            f"got {codes.dtype} {codes.shape}"
        )
    tail = bits % 8
    if tail and len(codes) and (codes[:, -1] >> tail).any():
        raise FghError(f"codes have bits set past bit {bits} (packed with a different bit length?)")
    return codes


_OPEN_FLAGS = {
    "read": os.O_RDONLY,
    "update": os.O_RDWR,
    "new": os.O_RDWR | os.O_CREAT | os.O_EXCL,
    "lock": os.O_RDWR | os.O_CREAT,
}


def _open_file(folder: Path, name: str, how: str) -> IO[bytes]:
    """Open ``folder / name`` unbuffered, refusing a symlink or anything but a regular file.

    ``how``: ``"read"``, ``"update"`` (read and write), ``"new"`` (create; it must not exist)
    or ``"lock"`` (read and write, created if missing). O_NOFOLLOW makes a link planted in
    the folder fail instead of redirecting a write; O_NONBLOCK keeps a FIFO from blocking
    the open, and the fstat refuses it (and directories, devices) before any byte is read.

    Raises:
        FileNotFoundError: ``name`` does not exist (and ``how`` does not create it).
        FghError: ``name`` is a link, not a regular file, or cannot be opened.
    """
    shown = display_path(folder)
    flags = _OPEN_FLAGS[how] | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(folder / name, flags, 0o666)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FghError(f"{shown}: {name} is a symbolic link; fgh does not follow links inside an "
                           "index folder (remove it)") from None
        if exc.errno == errno.EISDIR:
            raise FghError(f"{shown}: {name} is a directory, not a regular file") from None
        if exc.errno == errno.EEXIST:
            raise FghError(f"{shown}: {name} already exists (move it away)") from None
        if exc.errno in _NO_SPACE:
            raise
        raise FghError(f"{shown}: cannot open {name} ({exc.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise FghError(f"{shown}: {name} is a {_file_kind(mode)}, not a regular file")
    return os.fdopen(fd, "rb" if how == "read" else "r+b", buffering=0)


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
             (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))
    return next((name for is_kind, name in kinds if is_kind(mode)), "special file")


def _write_all(f: IO[bytes], data: bytes) -> None:
    """Write all of ``data``: an unbuffered write may write less (e.g. up to a size limit)."""
    view = memoryview(data)
    while view:
        view = view[f.write(view):]


def _acquire_lock(path: Path) -> IO[bytes]:
    """Take the exclusive writer lock of ``path``, or say who holds it."""
    lock = _open_file(path, LOCK, "lock")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(lock.fileno(), 32, 0).decode(errors="replace").strip() or "unknown"
        lock.close()
        raise FghError(f"{display_path(path)}: locked by another fgh encode (pid {terminal_safe(owner)})") from None
    except BaseException:
        lock.close()
        raise
    lock.truncate(0)
    os.pwrite(lock.fileno(), str(os.getpid()).encode(), 0)
    return lock


def _sibling(path: Path, suffix: str) -> Path:
    """``.<name><suffix>`` next to the folder ``path`` resolves to (a linked --out stays linked)."""
    real = Path(os.path.realpath(path))
    if not real.name:
        raise FghError(f"{display_path(path)}: cannot replace the root folder")
    return real.parent / f".{real.name}{suffix}"


def _restore_interrupted_replacement(path: Path) -> None:
    """Move back an old index that a replacement killed between its two renames left aside."""
    replaced = _sibling(path, _REPLACED_SUFFIX)
    if os.path.lexists(path) or not os.path.isdir(replaced) or os.path.islink(replaced):
        return
    # Its writer still holding the lock means it is between the renames right now.
    _acquire_lock(replaced).close()
    log.warning("%s: restoring the index an interrupted replacement left in %s", path, replaced)
    with contextlib.suppress(FileNotFoundError):  # another process restored it first
        os.rename(replaced, Path(os.path.realpath(path)))


def _remove_rebuild_leftovers(path: Path) -> None:
    """Delete what a crashed replacement of ``path`` left beside it (caller holds ``path``'s lock)."""
    for suffix in (_REBUILD_SUFFIX, _REPLACED_SUFFIX):
        leftover = _sibling(path, suffix)
        if os.path.isdir(leftover) and not os.path.islink(leftover):
            log.info("%s: removing %s, left by an interrupted replacement", path, leftover)
            _remove_index_folder(leftover)


def _remove_index_folder(path: Path) -> None:
    """Delete an index folder: only the names an index holds, then the folder if that emptied it."""
    for name in os.listdir(path):
        if _INDEX_ENTRY.fullmatch(name):
            with contextlib.suppress(IsADirectoryError):
                os.unlink(path / name)  # a symlink goes, never what it points to
    try:
        os.rmdir(path)
    except OSError:
        log.warning("%s: left in place: it holds files that are not part of an fgh index", path)


def _only_empty_files(path: Path, names: list[str]) -> bool:
    """Whether every name is an empty regular file (not a link): what a crashed create leaves."""
    for name in names:
        st = os.lstat(path / name)
        if not stat.S_ISREG(st.st_mode) or st.st_size:
            return False
    return True


def _encode_manifest(manifest: dict[str, Any]) -> bytes:
    # ensure_ascii escapes surrogates (root or engine paths from undecodable names), so they
    # round-trip through json.loads instead of failing to encode.
    return json.dumps(manifest, indent=1, ensure_ascii=True).encode("ascii") + b"\n"


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    data = _encode_manifest(manifest)
    atomic_write(path / MANIFEST, lambda f: f.write(data))


def _read_manifest(path: Path) -> dict[str, Any]:
    """Read and validate ``manifest.json``; every problem is an FghError naming the index."""
    shown = display_path(path)
    if not path.is_dir():
        raise FghError(f"{shown}: no such index directory" if not path.exists() else f"{shown}: not a directory")
    try:
        f = _open_file(path, MANIFEST, "read")
    except FileNotFoundError:
        raise FghError(f"{shown}: not an fgh index (no {MANIFEST})") from None
    with f:
        raw = f.read(_MAX_MANIFEST_BYTES + 1)
    if len(raw) > _MAX_MANIFEST_BYTES:
        raise FghError(f"{shown}: {MANIFEST} is over {_MAX_MANIFEST_BYTES} bytes; fgh writes a few KB")
    try:
        manifest = parse_json_object(raw, MANIFEST)
    except FghError as exc:
        raise FghError(f"{shown}: {exc}") from None
    if manifest.get("format") != FORMAT:
        found = terminal_safe(repr(manifest.get("format")))[:80]
        raise FghError(f"{shown}: not an fgh index ({MANIFEST} has format {found}, not {FORMAT!r})")
    version = manifest.get("format_version")
    if _is_int(version) and version > FORMAT_VERSION:
        raise FghError(
            f"{shown}: index format {version} is newer than this fgh understands ({FORMAT_VERSION}); upgrade fgh"
        )

    def damaged(what: str) -> FghError:
        return FghError(f"{shown}: damaged: {MANIFEST} {terminal_safe(what)[:200]}")

    for key, check in (
        ("format_version", lambda v: _is_int(v) and v >= 1),
        ("bits", lambda v: _is_int(v) and v >= 1),
        ("code_size", _is_int),
        ("generation", lambda v: _is_int(v) and v >= 0),
        ("ntotal", lambda v: _is_int(v) and v >= 0),
        ("fingerprint", lambda v: isinstance(v, str)),
        ("bit_order", lambda v: isinstance(v, str)),
        ("root", lambda v: isinstance(v, str)),
        ("model", lambda v: isinstance(v, dict)),
        ("preprocess", lambda v: isinstance(v, dict)),
        ("engine", lambda v: isinstance(v, dict)),
        ("files", lambda v: isinstance(v, dict)),
    ):
        if key not in manifest:
            raise damaged(f"lacks the field {key!r}")
        if not check(manifest[key]):
            raise damaged(f"has a bad {key!r}: {manifest[key]!r}")
    if manifest["bit_order"] != BIT_ORDER:
        raise damaged(f"says bit order {manifest['bit_order']!r}; fgh packs {BIT_ORDER!r}")
    if manifest["code_size"] != packed_width(manifest["bits"]):
        raise damaged(f"says code_size {manifest['code_size']} for {manifest['bits']} bits")
    files = manifest["files"]
    for kind in _KINDS:
        entry = files.get(kind)
        if not (
            isinstance(entry, dict)
            and _is_int(entry.get("bytes"))
            and entry["bytes"] >= 0
            and _is_int(entry.get("crc32"))
            and 0 <= entry["crc32"] < 2**32
        ):
            raise damaged(f"has no valid entry for {kind} in 'files'")
    n = manifest["ntotal"]
    expected = {"codes": n * manifest["code_size"], "offsets": 8 * n, "stats": 16 * n}
    for kind, size in expected.items():
        if files[kind]["bytes"] != size:
            raise damaged(f"is inconsistent: {files[kind]['bytes']} bytes of {kind} for {n} rows (expected {size})")
    return manifest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _crc32(f: IO[bytes], length: int) -> int:
    """CRC-32 of the first ``length`` bytes of ``f``, read in large chunks."""
    f.seek(0)
    crc, left = 0, length
    while left:
        chunk = f.read(min(_CRC_CHUNK, left))
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
        left -= len(chunk)
    return crc


def _close_all(files: Any) -> None:
    for f in list(files):
        f.close()
