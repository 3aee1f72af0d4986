"""Exact Hamming search over packed binary codes, with a FAISS-like contract.

Codes are ``uint8`` arrays ``(n, code_size)`` as made by :func:`fgh_deploy.bits.pack_codes`.
Numpy in, numpy out:

* :meth:`HammingSearcher.search` / :func:`knn_hamming` return ``(D, I)``, ``int32`` distances
  and ``int64`` database rows, both ``(nq, k)``; missing neighbours (``k > ntotal``) are
  ``-1`` in both, as in FAISS.
* :meth:`HammingSearcher.range_search` / :func:`range_search_hamming` return
  ``(lims, D, I)`` in the FAISS ``range_search`` layout: query ``i`` owns
  ``D[lims[i]:lims[i + 1]]`` and ``I[lims[i]:lims[i + 1]]``.

Ordering is deterministic: results are sorted by ``(distance, database row)``, so among
equal distances the lower row comes first (FAISS leaves ties unspecified).

How it is fast with numpy alone: the database is stored word-per-column (one contiguous
``uint64`` array per 64-bit word of the code), so a distance is a few whole-column
``xor`` + ``bitwise_count`` + add ufunc calls into a small-int accumulator, never a
row-wise reduction. The database is scanned in chunks that stay in cache while every
query of a batch visits them. Distances are integers in ``[0, 8 * code_size]``, so top-k
selection is a threshold (the k-th distance, found with a histogram) plus a radix-sorted
handful of candidates, not an argsort of the database.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

import numpy as np

from fgh_deploy.errors import FghError

DEFAULT_CHUNK_SIZE = 131072
"""Database rows per scan chunk: the chunk's ``uint64`` temporaries (1 MiB) stay in L2."""

# The first k-th-distance bound of a query comes from a histogram of a chunk prefix; a
# prefix bound is looser than the whole chunk's but costs a fraction of it, and the few
# extra candidates it lets through are cut by the merge.
_SEED_ROWS = 8192
_SEED_ROWS_PER_K = 16


class HammingSearcher:
    """Exact Hamming k-NN and range search over a fixed database of packed codes.

    The database is copied once into a word-per-column layout (``ceil(code_size / 8)``
    contiguous ``uint64`` columns, zero-padded), so searching holds about
    ``ntotal * 8 * ceil(code_size / 8)`` bytes.

    Attributes:
        ntotal: Number of database codes.
        code_size: Bytes per packed code.
    """

    def __init__(self, database: Any, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        """Prepare ``database`` for searching.

        Args:
            database: ``uint8`` array ``(n, code_size)`` of packed codes; ``n`` may be 0.
            chunk_size: Database rows scanned per step; the default suits typical caches.

        Raises:
            FghError: ``database`` is not a 2-D ``uint8`` array with ``code_size >= 1``, or
                ``chunk_size`` < 1.
        """
        db = _as_packed(database, "database", allow_single=False)
        self._chunk_size = _check_int(chunk_size, "chunk_size", minimum=1)
        self.ntotal, self.code_size = db.shape
        self._max_distance = 8 * self.code_size
        # uint8 halves the accumulator traffic where no distance can overflow it.
        self._acc_dtype = np.uint8 if self._max_distance <= np.iinfo(np.uint8).max else np.uint16
        # (words, ntotal): row w is word w of every code, contiguous for whole-column ufuncs.
        self._columns = np.ascontiguousarray(_to_words(db).T)

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact k nearest neighbours of each query.

        Args:
            queries: ``uint8`` array ``(nq, code_size)``, or one 1-D query.
            k: Neighbours per query, at least 1; may exceed ``ntotal``.

        Returns:
            ``(D, I)``: ``int32`` distances and ``int64`` database rows, both ``(nq, k)``,
            each row sorted by ``(distance, database row)``; slots past ``ntotal`` hold -1.

        Raises:
            FghError: Bad ``queries`` (dtype, ndim, width) or ``k`` < 1.
        """
        k = _check_int(k, "k", minimum=1)
        query_words = self._query_words(queries)
        nq = len(query_words)
        empty_d = np.empty(0, self._acc_dtype)
        empty_i = np.empty(0, np.int64)
        best_d = [empty_d] * nq
        best_i = [empty_i] * nq
        for start, qi, dist in self._scan(query_words):
            kept_d = best_d[qi]
            if len(kept_d) == k:
                # A row tying the current k-th distance loses to the earlier row kept.
                limit = int(kept_d[-1]) - 1
                if limit < 0:
                    continue
            else:
                limit = _kth_distance_bound(dist, k, self._max_distance)
            cand = np.flatnonzero(dist <= limit)
            if cand.size == 0:
                continue
            # Kept rows all precede this chunk and are (distance, row)-sorted; new rows
            # are in row order. A stable sort on distance alone therefore yields
            # (distance, row) order, and on uint8/uint16 keys numpy makes it a radix sort.
            merged_d = np.concatenate((kept_d, dist[cand]))
            merged_i = np.concatenate((best_i[qi], cand + start))
            order = np.argsort(merged_d, kind="stable")[:k]
            best_d[qi] = merged_d[order]
            best_i[qi] = merged_i[order]

        distances = np.full((nq, k), -1, dtype=np.int32)
        labels = np.full((nq, k), -1, dtype=np.int64)
        for qi in range(nq):
            found = len(best_d[qi])
            distances[qi, :found] = best_d[qi]
            labels[qi, :found] = best_i[qi]
        return distances, labels

    def range_search(self, queries: Any, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All database codes within Hamming distance ``radius`` of each query, inclusive.

        Args:
            queries: ``uint8`` array ``(nq, code_size)``, or one 1-D query.
            radius: Largest distance kept (``distance <= radius``); 0 finds exact duplicates.

        Returns:
            ``(lims, D, I)``: ``lims`` is ``int64`` ``(nq + 1,)``; query ``i``'s results are
            ``D[lims[i]:lims[i + 1]]`` (``int32``) and ``I[lims[i]:lims[i + 1]]`` (``int64``),
            sorted by ``(distance, database row)``.

        Raises:
            FghError: Bad ``queries`` (dtype, ndim, width) or ``radius`` < 0.
        """
        radius = _check_int(radius, "radius", minimum=0)
        query_words = self._query_words(queries)
        nq = len(query_words)
        # Every distance is <= max_distance; clamping keeps the comparison in the acc dtype.
        limit = min(radius, self._max_distance)
        parts_d: list[list[np.ndarray]] = [[] for _ in range(nq)]
        parts_i: list[list[np.ndarray]] = [[] for _ in range(nq)]
        for start, qi, dist in self._scan(query_words):
            cand = np.flatnonzero(dist <= limit)
            if cand.size:
                parts_d[qi].append(dist[cand])
                parts_i[qi].append(cand + start)

        lims = np.zeros(nq + 1, dtype=np.int64)
        lims[1:] = np.cumsum([sum(len(p) for p in parts) for parts in parts_d])
        distances = np.empty(lims[-1], dtype=np.int32)
        labels = np.empty(lims[-1], dtype=np.int64)
        for qi in range(nq):
            if not parts_d[qi]:
                continue
            d = np.concatenate(parts_d[qi])
            # Chunks arrive in row order, so a stable sort on distance gives (distance, row).
            order = np.argsort(d, kind="stable")
            distances[lims[qi] : lims[qi + 1]] = d[order]
            labels[lims[qi] : lims[qi + 1]] = np.concatenate(parts_i[qi])[order]
        return lims, distances, labels

    def distances(self, queries: Any) -> np.ndarray:
        """Every query-to-database Hamming distance (a dense matrix: small inputs only).

        Args:
            queries: ``uint8`` array ``(nq, code_size)``, or one 1-D query.

        Returns:
            ``int32`` array ``(nq, ntotal)``.

        Raises:
            FghError: Bad ``queries`` (dtype, ndim, width).
        """
        query_words = self._query_words(queries)
        out = np.empty((len(query_words), self.ntotal), dtype=np.int32)
        for start, qi, dist in self._scan(query_words):
            out[qi, start : start + len(dist)] = dist
        return out

    def _query_words(self, queries: Any) -> np.ndarray:
        """Validate queries against this database and return them as ``(nq, words)`` uint64."""
        q = _as_packed(queries, "queries", allow_single=True)
        if q.shape[1] != self.code_size:
            raise FghError(
                f"queries are {q.shape[1]} bytes per code but the database is {self.code_size} "
                f"bytes per code ({q.shape[1] * 8} vs {self.code_size * 8} bits max)"
            )
        return _to_words(q)

    def _scan(self, query_words: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(chunk_start, query_index, distances)`` chunk by chunk, query by query.

        ``distances`` covers rows ``chunk_start:chunk_start + len(distances)`` and lives in a
        buffer that the next step overwrites: callers copy what they keep.
        """
        n = self.ntotal
        if n == 0 or len(query_words) == 0:
            return
        size = min(self._chunk_size, n)
        xor_buf = np.empty(size, dtype=np.uint64)
        acc_buf = np.empty(size, dtype=self._acc_dtype)
        count_buf = np.empty(size, dtype=np.uint8)
        # Scalars pulled out once; indexing a numpy row per word per chunk adds up.
        queries = [tuple(row) for row in query_words]
        for start in range(0, n, size):
            stop = min(start + size, n)
            m = stop - start
            columns = [col[start:stop] for col in self._columns]
            xor, acc, count = xor_buf[:m], acc_buf[:m], count_buf[:m]
            # Queries loop inside the chunk so its columns are read from cache, not memory.
            for qi, words in enumerate(queries):
                np.bitwise_xor(columns[0], words[0], out=xor)
                np.bitwise_count(xor, out=acc)
                for col, word in zip(columns[1:], words[1:]):
                    np.bitwise_xor(col, word, out=xor)
                    np.bitwise_count(xor, out=count)
                    np.add(acc, count, out=acc)
                yield start, qi, acc


def hamming_distances(queries: Any, database: Any) -> np.ndarray:
    """Dense exact Hamming distances between packed codes (reference use, small inputs).

    Args:
        queries: ``uint8`` array ``(nq, code_size)``, or one 1-D query.
        database: ``uint8`` array ``(n, code_size)``.

    Returns:
        ``int32`` array ``(nq, n)``.

    Raises:
        FghError: Bad dtype, ndim or mismatched code widths.
    """
    return HammingSearcher(database).distances(queries)


def knn_hamming(queries: Any, database: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact Hamming top-k, like FAISS ``IndexBinaryFlat.search`` with deterministic ties.

    Args:
        queries: ``uint8`` array ``(nq, code_size)``, or one 1-D query.
        database: ``uint8`` array ``(n, code_size)``.
        k: Neighbours per query, at least 1; ``k > n`` pads with -1.

    Returns:
        ``(D, I)``: ``int32`` distances and ``int64`` rows, ``(nq, k)``, sorted by
        ``(distance, database row)``.

    Raises:
        FghError: Bad dtype, ndim, mismatched code widths, or ``k`` < 1.
    """
    return HammingSearcher(database).search(queries, k)


def range_search_hamming(
    queries: Any, database: Any, radius: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All codes with Hamming distance ``<= radius`` (inclusive), FAISS ``range_search`` layout.

    Args:
        queries: ``uint8`` array ``(nq, code_size)``, or one 1-D query.
        database: ``uint8`` array ``(n, code_size)``.
        radius: Largest distance kept; 0 finds exact duplicates.

    Returns:
        ``(lims, D, I)``: ``int64`` ``(nq + 1,)`` offsets, ``int32`` distances and ``int64``
        rows; query ``i``'s results are at ``lims[i]:lims[i + 1]``, sorted by
        ``(distance, database row)``.

    Raises:
        FghError: Bad dtype, ndim, mismatched code widths, or ``radius`` < 0.
    """
    return HammingSearcher(database).range_search(queries, radius)


def _kth_distance_bound(dist: np.ndarray, k: int, max_distance: int) -> int:
    """An upper bound on the k-th smallest of ``dist``: every top-k row is ``<= bound``.

    Reads a histogram of a prefix of ``dist``: the k-th smallest of a subset holding at
    least k rows is at least the k-th smallest of the whole.
    """
    if len(dist) <= k:
        return max_distance
    prefix = dist[: max(_SEED_ROWS, _SEED_ROWS_PER_K * k)]
    cumulative = np.cumsum(np.bincount(prefix, minlength=max_distance + 1))
    return int(np.searchsorted(cumulative, k))


def _as_packed(codes: Any, name: str, *, allow_single: bool) -> np.ndarray:
    """Validate packed codes: a 2-D ``uint8`` array (1-D → one row if allowed), width ≥ 1."""
    arr = np.asarray(codes)
    if arr.dtype != np.uint8:
        raise FghError(f"{name} must be uint8 packed codes (see pack_codes), got dtype {arr.dtype}")
    if arr.ndim == 1 and allow_single:
        arr = arr[np.newaxis, :]
    if arr.ndim != 2:
        shapes = "2-D (n, code_size) or one 1-D code" if allow_single else "2-D (n, code_size)"
        raise FghError(f"{name} must be {shapes}, got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise FghError(f"{name} have 0 bytes per code")
    return arr


def _to_words(codes: np.ndarray) -> np.ndarray:
    """View ``(n, code_size)`` uint8 codes as ``(n, ceil(code_size / 8))`` uint64 words.

    Pads with zero bytes: zero XOR zero adds nothing to a distance, as long as queries and
    database are padded alike.
    """
    pad = -codes.shape[1] % 8
    padded = np.zeros((codes.shape[0], codes.shape[1] + pad), dtype=np.uint8)
    padded[:, : codes.shape[1]] = codes
    return padded.view(np.uint64)


def _check_int(value: Any, name: str, *, minimum: int) -> int:
    """Return ``value`` as an int ≥ ``minimum``, or raise FghError."""
    try:
        number = operator.index(value)
    except TypeError:
        raise FghError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise FghError(f"{name} must be at least {minimum}, got {number}")
    return number
