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

One contract, two implementations, as FAISS has ``IndexBinaryFlat`` and a GPU index:
:class:`HammingSearcher` checks every input once and orders range results; the distances
come from :class:`CpuHammingSearcher` (below) or, for ``device="cuda"``,
:class:`TorchHammingSearcher` (which imports torch on first use, so the CPU search needs numpy
alone). ``HammingSearcher(database, device=...)`` builds the one the device needs.

How the CPU search is fast (measurements: README, "Measured here → Engines, search and
encode"; ``python benchmarks/search_kernels.py`` and ``fgh bench search`` reproduce them):

* **A fused kernel.** ``fgh_deploy/_hamming.c``, built at install when a C compiler is there,
  does a step's xor, popcount and sum in one pass over L1-sized tiles (AVX-512 VPOPCNTDQ,
  else AVX2, else scalar popcnt, picked at import). numpy needs three passes per 64-bit word,
  which at 128 bits cost more than reading the codes. Without the compiled kernel, or for
  codes over ``FUSED_MAX_BITS``, the same steps run as numpy passes (below), with the same
  results.

Around it, with numpy:

* **Layout.** The database is stored word-per-column: one contiguous array per 64-bit word
  of the code, the last one narrowed to the smallest unsigned type that holds the leftover
  bytes (a 32-bit code is one ``uint32`` column, 96 bits are ``uint64`` + ``uint32``). A
  distance is then a few whole-column ``xor`` + ``bitwise_count`` (+ add) ufunc calls, never
  a row-wise reduction. ``bitwise_count`` costs the same per element whatever its width, so
  leftovers of 5–7 bytes are padded to one ``uint64`` rather than split into two columns
  (one popcount per code instead of two), while 1–4 leftover bytes stay narrow (less
  memory to read).
* **Blocking.** Up to 32 queries share each step: one broadcast ``xor`` computes a
  (queries × rows) block, so a database slice is read from memory once per query group and
  the Python cost of a step is spread over half a million distances.
* **Top-k by threshold.** Distances are small integers, so each query keeps a bound (one less
  than its current k-th distance: a later row at that distance loses the tie). One ``min``
  reduction per 1024-row block tells which blocks hold a row within the bound; only those
  few are compared element-wise. The bound comes from a per-query histogram of the
  candidates kept, and the final order is one stable (radix) sort of a few candidates per
  query.
* **Threads.** The compiled kernel and numpy's ufuncs release the GIL, so query groups (or,
  for few queries, database slices) run on a small thread pool; results are merged in row
  order, so they are the same for every thread count.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np

from fgh_deploy.errors import BackendUnavailableError, FghError
from fgh_deploy.utils import check_int

if TYPE_CHECKING:
    import torch

try:
    from fgh_deploy import _hamming
except ImportError:  # installed without a C compiler: the numpy passes do the same work, slower
    _hamming = None

log = logging.getLogger(__name__)

KERNELS = ("auto", "compiled", "numpy")
"""CPU distance kernels: the compiled fused loop, numpy's ufunc passes, or the best available."""
FUSED_MAX_BITS = 8 * 31
"""Longest codes the compiled kernel takes: its distances are uint8."""

DEFAULT_CHUNK_SIZE = 131072
"""Most database rows per scan step: one query's uint64 xor temporary (1 MiB) stays in L2."""
# More threads stop paying once the cores share memory bandwidth, and past about 8 threads
# they cost (`fgh bench search --threads T`; README, "On a GPU").
DEFAULT_MAX_THREADS = 8
MAX_RESULT_SLOTS = 1 << 28
"""Most ``queries × k`` one search may return: 3 GiB of int32 distances and int64 rows."""

# Query-row distances per numpy step. A 64-bit comparison is a few ns of ufunc time, so what
# is left to win is the Python cost per step: large steps (a 4 MiB uint64 xor temporary, in
# L3), sized so that with 32 queries per slice the popcount, not the cache, is the limit.
_STEP_ELEMENTS = 1 << 19
# Queries per group. A broadcast xor over short rows runs at a fraction of its speed
# (`benchmarks/search_kernels.py`), so a group stays small enough that a step spans 16384 rows.
_GROUP_QUERIES = 32
# Below this many query-row-column products a call is too short for threads to pay off.
_MIN_PARALLEL_WORK = 1 << 21
# A query without k candidates yet bounds a step by the k-th smallest distance of the step's
# first rows: looser than the whole step's k-th but a fraction of its cost.
_PREFIX_ROWS = 1024
_PREFIX_ROWS_PER_K = 16
# Rows per block whose minimum is checked against a query's bound: the uint8 min reduction is
# many times faster over long blocks than over short ones (`benchmarks/search_kernels.py`),
# and only blocks whose minimum is within the bound are compared element-wise.
_BLOCK_ROWS = 1024

_CUDA_DEVICE = re.compile(r"cuda(:[0-9]{1,4})?")

_T = TypeVar("_T")


class HammingSearcher(ABC):
    """Exact Hamming k-NN and range search over a fixed database of packed codes.

    The contract every implementation keeps (checks, shapes, dtypes, tie rule); calling
    ``HammingSearcher(database, device=...)`` builds :class:`CpuHammingSearcher` for
    ``"cpu"`` and :class:`TorchHammingSearcher` for CUDA. The public
    methods check their inputs here, once, and call the implementation's ``_*_impl`` hooks
    with 2-D queries of the right width.

    Attributes:
        ntotal: Number of database codes.
        code_size: Bytes per packed code.
        threads: Threads a large CPU search uses (1 = only the calling thread).
        device: ``"cpu"`` or the CUDA device the torch search runs on.
    """

    def __new__(cls, database: Any = None, *, device: str = "cpu", **options: Any) -> HammingSearcher:
        # Called as the contract, build the implementation the device needs; called as an
        # implementation (or by pickle, with no arguments), build that one.
        if cls is HammingSearcher:
            cls = CpuHammingSearcher if _check_device(device) == "cpu" else TorchHammingSearcher
        return super().__new__(cls)

    def __init__(
        self,
        database: Any,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        threads: int | None = None,
        device: str = "cpu",
        kernel: str = "auto",
    ) -> None:
        """Prepare ``database`` for searching.

        Args:
            database: ``uint8`` array ``(n, code_size)`` of packed codes; ``n`` may be 0.
            chunk_size: Most database rows scanned per CPU step; the default suits typical caches.
            threads: Threads for large CPU searches; default: the CPUs this process may run
                on, at most ``DEFAULT_MAX_THREADS``.
            device: ``"cpu"`` for the CPU kernels, or ``"cuda"`` / ``"cuda:N"`` to search
                on a GPU with torch (the database is then held on the GPU as ±1 values).
            kernel: CPU distance kernel: ``"compiled"`` (the fused C loop built at install,
                codes up to ``FUSED_MAX_BITS``), ``"numpy"``, or ``"auto"`` (compiled when it
                is built and takes the codes). Results are the same; see :attr:`kernel`.

        Raises:
            FghError: ``database`` is not a 2-D ``uint8`` array with ``code_size >= 1``,
                ``chunk_size`` or ``threads`` < 1, an unknown ``device`` or ``kernel``, or
                ``kernel="compiled"`` for codes longer than ``FUSED_MAX_BITS`` or on CUDA.
            BackendUnavailableError: a CUDA device was asked for but torch CUDA is unusable,
                or ``kernel="compiled"`` but the compiled kernel is not built.
        """
        db = _as_packed(database, "database", allow_single=False)
        self._chunk_size = check_int(chunk_size, "chunk_size", minimum=1)
        self.threads = (min(_available_cpus(), DEFAULT_MAX_THREADS) if threads is None
                        else check_int(threads, "threads", minimum=1))
        self.ntotal, self.code_size = db.shape
        self._max_distance = 8 * self.code_size
        self.device = _check_device(device)
        if kernel not in KERNELS:
            raise FghError(f"unknown search kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        self._kernel_option = kernel
        self._build(db)

    @abstractmethod
    def _build(self, database: np.ndarray) -> None:
        """Make this implementation's search layout of the checked ``database``."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the search layout holds (on the GPU for a CUDA searcher)."""

    @property
    @abstractmethod
    def kernel(self) -> str:
        """What computes the distances: ``"compiled/<isa>"`` (e.g. ``compiled/avx512-vpopcntdq``),
        ``"numpy"``, or ``"torch"`` on CUDA."""

    @property
    def layout(self) -> list[str]:
        """Dtype names of the CPU word columns, e.g. ``["uint64", "uint32"]`` for 96 bits;
        empty where the codes are not held as words (torch)."""
        return []

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact k nearest neighbours of each query.

        Args:
            queries: ``uint8`` array ``(nq, code_size)``, or one 1-D query.
            k: Neighbours per query, at least 1; may exceed ``ntotal``.

        Returns:
            ``(D, I)``: ``int32`` distances and ``int64`` database rows, both ``(nq, k)``,
            each row sorted by ``(distance, database row)``; slots past ``ntotal`` hold -1.

        Raises:
            FghError: Bad ``queries`` (dtype, ndim, width), ``k`` < 1, or more than
                ``MAX_RESULT_SLOTS`` results.
        """
        k = check_int(k, "k", minimum=1)
        queries = self._check_queries(queries)
        nq = len(queries)
        if nq * k > MAX_RESULT_SLOTS:
            raise FghError(f"k = {k:,} for {nq:,} queries asks for {nq * k:,} results, more than "
                           f"{MAX_RESULT_SLOTS:,}; ask for fewer (this index holds {self.ntotal:,} codes)")
        if nq == 0 or self.ntotal == 0:
            return _no_neighbours(nq, k)
        return self._search_impl(queries, k)

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
        radius = check_int(radius, "radius", minimum=0)
        queries = self._check_queries(queries)
        nq = len(queries)
        # Every distance is <= max_distance; clamping keeps the bound in the accumulator dtype.
        limit = min(radius, self._max_distance)
        found = self._within_impl(queries, limit) if nq and self.ntotal else _concat([])
        qi, dist, rows, _ = _order_candidates(*found, nq, self._max_distance, None)
        lims = np.zeros(nq + 1, dtype=np.int64)
        np.cumsum(np.bincount(qi, minlength=nq), out=lims[1:])
        return lims, dist.astype(np.int32), rows

    def distances(self, queries: Any) -> np.ndarray:
        """Every query-to-database Hamming distance (a dense matrix: small inputs only).

        Args:
            queries: ``uint8`` array ``(nq, code_size)``, or one 1-D query.

        Returns:
            ``int32`` array ``(nq, ntotal)``.

        Raises:
            FghError: Bad ``queries`` (dtype, ndim, width).
        """
        queries = self._check_queries(queries)
        if len(queries) == 0 or self.ntotal == 0:
            return np.empty((len(queries), self.ntotal), dtype=np.int32)
        return self._distances_impl(queries)

    @abstractmethod
    def _search_impl(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` for checked, non-empty queries over a non-empty database."""

    @abstractmethod
    def _within_impl(self, queries: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every ``(query, distance, row)`` with distance <= ``limit`` as ``int64`` arrays, each
        query's rows ascending among equal distances (checked, non-empty inputs)."""

    @abstractmethod
    def _distances_impl(self, queries: np.ndarray) -> np.ndarray:
        """:meth:`distances` for checked, non-empty queries over a non-empty database."""

    def _check_queries(self, queries: Any) -> np.ndarray:
        """Validate queries against this database; return them as 2-D packed codes."""
        q = _as_packed(queries, "queries", allow_single=True)
        if q.shape[1] != self.code_size:
            raise FghError(
                f"queries are {q.shape[1]} bytes per code but the database is {self.code_size} "
                f"bytes per code ({q.shape[1] * 8} vs {self.code_size * 8} bits max)"
            )
        return q


class CpuHammingSearcher(HammingSearcher):
    """:class:`HammingSearcher` on the CPU: the compiled kernel or numpy passes, on a thread pool.

    The database is copied once into a word-per-column layout (see the module docstring);
    it holds :attr:`nbytes` bytes, at most ``ntotal * 8 * ceil(code_size / 8)``.
    """

    def _build(self, database: np.ndarray) -> None:
        """Split ``database`` into word columns and pick the distance kernel.

        Raises:
            FghError: ``device`` is not ``"cpu"``, or ``kernel="compiled"`` for codes longer
                than ``FUSED_MAX_BITS``.
            BackendUnavailableError: ``kernel="compiled"`` but the compiled kernel is not built.
        """
        if self.device != "cpu":
            raise FghError(f"the CPU searcher runs on 'cpu', not {self.device!r}; "
                           f"HammingSearcher(device={self.device!r}) searches there with torch")
        # The narrowest accumulator no distance overflows: uint8 up to 255 bits halves the
        # traffic of the adds, compares and min reductions.
        self._acc_dtype = next(
            dt for dt in (np.uint8, np.uint16, np.uint32) if self._max_distance <= np.iinfo(dt).max
        )
        self._fused = _use_compiled_kernel(self._kernel_option, self._max_distance)
        self._columns = _to_columns(database)

    @property
    def nbytes(self) -> int:
        """Bytes of the word columns."""
        return sum(col.nbytes for col in self._columns)

    @property
    def kernel(self) -> str:
        """``"compiled/<isa>"`` or ``"numpy"``."""
        return cpu_kernel() if self._fused else "numpy"

    @property
    def layout(self) -> list[str]:
        """Dtype names of the word columns, e.g. ``["uint64", "uint32"]`` for 96 bits."""
        return [col.dtype.name for col in self._columns]

    def _search_impl(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        nq = len(queries)
        distances, labels = _no_neighbours(nq, k)
        query_columns = _to_columns(queries)
        found = self._run(lambda task: self._knn_task(query_columns, task, k), self._plan(nq))
        qi, dist, rows, rank = _order_candidates(*_concat(found), nq, self._max_distance, k)
        distances[qi, rank] = dist
        labels[qi, rank] = rows
        return distances, labels

    def _within_impl(self, queries: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        query_columns = _to_columns(queries)
        return _concat(self._run(lambda task: self._range_task(query_columns, task, limit),
                                 self._plan(len(queries))))

    def _distances_impl(self, queries: np.ndarray) -> np.ndarray:
        out = np.empty((len(queries), self.ntotal), dtype=np.int32)
        query_columns = _to_columns(queries)

        def fill(task: tuple[int, int, int, int]) -> None:
            q_lo, q_hi = task[:2]
            for step in self._steps(query_columns, task):
                out[q_lo:q_hi, step.start : step.start + step.dist.shape[1]] = step.dist

        self._run(fill, self._plan(len(queries)))
        return out

    def _plan(self, nq: int) -> list[tuple[int, int, int, int]]:
        """Split a search into ``(query_lo, query_hi, row_lo, row_hi)`` tasks, group-major.

        With enough queries every thread gets whole query groups; with few, every thread
        scans its own slice of the database. Tasks of one group stay in row order, which the
        merge relies on for the tie rule.
        """
        work = nq * self.ntotal * len(self._columns)
        threads = self.threads if work >= _MIN_PARALLEL_WORK else 1
        groups = -(-nq // _GROUP_QUERIES)
        parts = 1
        if threads > 1 and nq >= 2 * threads:
            groups = -(-groups // threads) * threads
        else:
            parts = min(threads, self.ntotal)
        log.debug("searching %d queries in %d group(s) x %d slice(s) on %d thread(s)", nq, groups, parts, threads)
        q_bounds = [nq * g // groups for g in range(groups + 1)]
        r_bounds = [self.ntotal * p // parts for p in range(parts + 1)]
        return [
            (q_lo, q_hi, r_lo, r_hi)
            for q_lo, q_hi in zip(q_bounds, q_bounds[1:])
            for r_lo, r_hi in zip(r_bounds, r_bounds[1:])
            if q_hi > q_lo and r_hi > r_lo
        ]

    def _run(self, fn: Callable[[tuple[int, int, int, int]], _T], tasks: list[tuple[int, int, int, int]]) -> list[_T]:
        """``[fn(task) for task in tasks]``, on up to ``threads`` threads, results in task order."""
        threads = min(self.threads, len(tasks))
        if threads <= 1:
            return [fn(task) for task in tasks]
        # Contiguous shares, the first run by the calling thread: one hand-off per helper
        # thread, and the caller works instead of waiting (a wake-up is slower than a small task).
        shares = [tasks[len(tasks) * t // threads : len(tasks) * (t + 1) // threads] for t in range(threads)]
        futures = [_executor(threads - 1).submit(lambda share=share: [fn(task) for task in share]) for share in shares[1:]]
        results = [fn(task) for task in shares[0]]
        for future in futures:
            results.extend(future.result())
        return results

    def _steps(
        self, query_columns: list[np.ndarray], task: tuple[int, int, int, int], first_rows: int = 0
    ) -> Iterator[_Step]:
        """Distances of the task's queries to its rows, one cache-sized step at a time.

        Each step's array lives in a buffer that the next step overwrites: callers copy what
        they keep. ``first_rows`` (when smaller than a step) makes the first step that short.
        """
        q_lo, q_hi, r_lo, r_hi = task
        group = q_hi - q_lo
        rows = max(1, min(self._chunk_size, _STEP_ELEMENTS // group, r_hi - r_lo))
        block = min(_BLOCK_ROWS, rows)
        rows -= rows % block
        acc_buf = _scratch("acc", self._acc_dtype, group * rows)
        never = np.iinfo(self._acc_dtype).max
        fill = self._step_filler(query_columns, q_lo, q_hi, group * rows)
        edges = [r_lo]
        if 0 < first_rows < rows:
            edges.append(min(r_lo + first_rows, r_hi))
        while edges[-1] < r_hi:
            edges.append(min(edges[-1] + rows, r_hi))
        for start, stop in zip(edges, edges[1:]):
            padded = -(-(stop - start) // block) * block
            acc = acc_buf[: group * padded].reshape(group, padded)
            if padded > stop - start:
                # The last step, padded to whole blocks with the largest value: never a hit.
                acc[:, stop - start :] = never
            dist = acc[:, : stop - start]
            fill(acc, start, stop)
            yield _Step(start, dist, acc.reshape(group, -1, block))

    def _step_filler(
        self, query_columns: list[np.ndarray], q_lo: int, q_hi: int, size: int
    ) -> Callable[[np.ndarray, int, int], None]:
        """``fill(acc, start, stop)``: distances of queries ``q_lo:q_hi`` to rows ``start:stop``
        into the first ``stop - start`` columns of ``acc`` (steps of at most ``size`` distances)."""
        if self._fused:
            # Each query's words, zero-extended to uint64, query-major: the kernel's layout.
            words = np.stack([col[q_lo:q_hi] for col in query_columns], axis=1).astype(np.uint64)

            def fused_fill(acc: np.ndarray, start: int, stop: int) -> None:
                _hamming.step_distances(acc, acc.shape[1], self._columns, start, stop, words)

            return fused_fill

        # (group, 1) operands broadcast against a (rows,) slice: an xor, a popcount and an add
        # pass per word column.
        query = [col[q_lo:q_hi, np.newaxis] for col in query_columns]
        xor_bufs = {col.dtype: _scratch("xor", col.dtype, size) for col in self._columns}
        count_buf = _scratch("count", np.uint8, size)

        def numpy_fill(acc: np.ndarray, start: int, stop: int) -> None:
            dist = acc[:, : stop - start]
            group, step_size = dist.shape[0], dist.size
            count = count_buf[:step_size].reshape(group, -1)
            for i, (col, words) in enumerate(zip(self._columns, query)):
                xor = xor_bufs[col.dtype][:step_size].reshape(group, -1)
                np.bitwise_xor(col[start:stop], words, out=xor)
                if i == 0:
                    np.bitwise_count(xor, out=dist)
                else:
                    np.bitwise_count(xor, out=count)
                    np.add(dist, count, out=dist)

        return numpy_fill

    def _knn_task(
        self, query_columns: list[np.ndarray], task: tuple[int, int, int, int], k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidates ``(query, distance, row)`` holding each query's top k over the task's rows."""
        q_lo, q_hi = task[:2]
        group = q_hi - q_lo
        if group == 1:
            return self._knn_one(query_columns, task, k)
        bins = self._max_distance + 1
        found = _Candidates()
        # Per query: how many candidates sit at each distance, and the largest distance a
        # later row may have and still enter the top k (-1: none can).
        hist = np.zeros((group, bins), dtype=np.int64)
        limit = np.full(group, self._max_distance, dtype=np.int64)
        short = True
        for step in self._steps(query_columns, task, _first_step_rows(k)):
            bound = limit
            if short:
                missing = limit == self._max_distance
                bound = limit.copy()
                bound[missing] = _prefix_bound(step.dist, missing, k, self._max_distance)
            added = found.add(step, bound)
            if added is None:
                continue
            hist += np.bincount(added[0] * bins + added[1], minlength=group * bins).reshape(group, bins)
            # k or more candidates at distance <= t (all from earlier rows) beat any later
            # row at t, so later rows must be strictly closer than the k-th distance t. With
            # fewer than k candidates every count is < k and the limit is max_distance.
            # (Array methods, not np.* wrappers: this runs every step; the wrappers' Python
            # overhead showed in profiles of single-query searches.)
            limit = (hist.cumsum(axis=1) < k).sum(axis=1) - 1
            short = limit.max() == self._max_distance
            if found.size > 4 * group * k + _STEP_ELEMENTS:
                qi, dist, rows, _ = _order_candidates(*found.arrays(), group, self._max_distance, k)
                found = _Candidates([qi], [dist], [rows])
                hist = np.bincount(qi * bins + dist, minlength=group * bins).reshape(group, bins)
        qi, dist, rows = found.arrays()
        return qi + q_lo, dist, rows

    def _knn_one(
        self, query_columns: list[np.ndarray], task: tuple[int, int, int, int], k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`_knn_task` for a one-query task, with scalar bookkeeping.

        Same bounds and candidates, but a single query needs no per-query histogram: keeping
        its k smallest distances with ``partition`` takes a third of the array calls per
        step, and per-step calls are what a single-query search spends its Python time on.
        """
        found_d: list[np.ndarray] = []
        found_r: list[np.ndarray] = []
        held = 0
        smallest = np.empty(0, dtype=self._acc_dtype)  # the k smallest distances so far
        limit = self._max_distance
        for step in self._steps(query_columns, task, _first_step_rows(k)):
            row = step.dist[0]
            bound = limit
            if len(smallest) < k:
                bound = int(_prefix_bound(step.dist, slice(None), k, self._max_distance)[0])
            if row.min() > bound:
                continue
            flat = (row <= bound).nonzero()[0]
            dist = row[flat]
            found_d.append(dist)
            found_r.append(flat + step.start)
            held += len(flat)
            smallest = np.concatenate((smallest, dist))
            if len(smallest) >= k:
                smallest = np.partition(smallest, k - 1)[:k]
                # As in _knn_task: a later row must be strictly closer than the k-th distance.
                limit = int(smallest[k - 1]) - 1
            if held > 4 * k + _STEP_ELEMENTS:
                kept = _order_candidates(
                    np.zeros(held, dtype=np.int64), np.concatenate(found_d).astype(np.int64),
                    np.concatenate(found_r), 1, self._max_distance, k,
                )
                found_d, found_r, held = [kept[1]], [kept[2]], len(kept[1])
        # The first step always keeps a row (its bound is at least its own minimum).
        dist = np.concatenate(found_d).astype(np.int64)
        return np.full(held, task[0], dtype=np.int64), dist, np.concatenate(found_r)

    def _range_task(
        self, query_columns: list[np.ndarray], task: tuple[int, int, int, int], limit: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every ``(query, distance, row)`` with distance <= ``limit`` among the task's rows."""
        q_lo, q_hi = task[:2]
        bound = np.full(q_hi - q_lo, limit, dtype=np.int64)
        found = _Candidates()
        for step in self._steps(query_columns, task):
            found.add(step, bound)
        qi, dist, rows = found.arrays()
        return qi + q_lo, dist, rows


class _Step(NamedTuple):
    """One scan step: distances of a query group to rows ``start:start + dist.shape[1]``.

    ``blocks`` views the same distances as ``(group, blocks, block_rows)``, padded past the
    last row with the dtype's largest value.
    """

    start: int
    dist: np.ndarray
    blocks: np.ndarray


class _Candidates:
    """Growing ``(query, distance, row)`` triples; each query's rows stay in ascending order."""

    def __init__(
        self,
        qi: list[np.ndarray] | None = None,
        dist: list[np.ndarray] | None = None,
        rows: list[np.ndarray] | None = None,
    ) -> None:
        self._qi = qi or []
        self._dist = dist or []
        self._rows = rows or []
        self.size = sum(len(part) for part in self._qi)

    def add(self, step: _Step, bound: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Keep the step's distances ``<= bound`` (one bound per query, each >= -1).

        Returns:
            ``(query, distance)`` of what was kept, or None when nothing was.
        """
        # A block whose minimum misses the bound is skipped after one cheap reduction; only
        # the rare blocks holding a candidate are compared element-wise.
        qb, bb = (np.minimum.reduce(step.blocks, axis=2) <= bound[:, np.newaxis]).nonzero()
        if qb.size == 0:
            return None
        hits = step.blocks[qb, bb]
        width = hits.shape[1]
        # bound >= a block minimum >= 0 here, so it fits the distance dtype (a mixed-dtype
        # compare would cast every element to int64).
        flat = (hits <= bound[qb].astype(hits.dtype)[:, np.newaxis]).reshape(-1).nonzero()[0]
        hi = flat // width
        qi = qb[hi]
        dist = hits.reshape(-1)[flat]
        self._qi.append(qi)
        self._dist.append(dist)
        self._rows.append(bb[hi] * width + (flat % width + step.start))
        self.size += len(qi)
        return qi, dist

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All triples as three ``int64`` arrays."""
        return _concat([(q, d, r) for q, d, r in zip(self._qi, self._dist, self._rows)])


def _concat(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate ``(query, distance, row)`` parts in order into three ``int64`` arrays."""
    if not parts:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    return tuple(np.concatenate([p[i] for p in parts]).astype(np.int64, copy=False) for i in range(3))


def _order_candidates(
    qi: np.ndarray, dist: np.ndarray, rows: np.ndarray, nq: int, max_distance: int, k: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sort candidates by ``(query, distance, row)`` and keep the first ``k`` of each query.

    Among equal ``(query, distance)`` pairs, rows must arrive in ascending order (scans append
    in row order, and a compacted buffer is itself sorted so), so a stable sort on
    ``(query, distance)`` alone settles ties by the lower row.

    Returns:
        ``(query, distance, row, rank)``, rank being the position within the query's list.
    """
    key = qi * (max_distance + 1) + dist
    # Radix sort (numpy's stable sort of 16-bit keys) when the key fits.
    if len(key) and key.max() <= np.iinfo(np.uint16).max:
        key = key.astype(np.uint16)
    order = np.argsort(key, kind="stable")
    qi, dist, rows = qi[order], dist[order], rows[order]
    starts = np.zeros(nq + 1, dtype=np.int64)
    np.cumsum(np.bincount(qi, minlength=nq), out=starts[1:])
    rank = np.arange(len(qi)) - starts[qi]
    if k is not None:
        keep = rank < k
        qi, dist, rows, rank = qi[keep], dist[keep], rows[keep], rank[keep]
    return qi, dist, rows, rank


def _first_step_rows(k: int) -> int:
    """Rows of a k-NN scan's first step: twice the prefix its bound is read from.

    The first bound (a prefix's k-th distance) is loose, and with short codes many rows tie
    at it; a short first step keeps those few, and from the second step on the bound is the
    k-th distance of every row seen so far.
    """
    return 2 * max(_PREFIX_ROWS, _PREFIX_ROWS_PER_K * k)


def _prefix_bound(dist: np.ndarray, rows: np.ndarray | slice, k: int, max_distance: int) -> np.ndarray:
    """For each of ``dist[rows]``, a bound every top-k entry of that row is ``<=`` to.

    Reads a histogram of a prefix of each row: the k-th smallest of a subset holding at
    least k entries is at least the k-th smallest of the whole row. Only the prefix is
    copied out of ``dist``.
    """
    width = min(dist.shape[1], max(_PREFIX_ROWS, _PREFIX_ROWS_PER_K * k))
    prefix = dist[rows, :width]
    if width < k:
        return np.full(len(prefix), max_distance, dtype=np.int64)
    bins = max_distance + 1
    offsets = np.arange(len(prefix), dtype=np.int64)[:, np.newaxis] * bins
    hist = np.bincount((prefix + offsets).reshape(-1), minlength=len(prefix) * bins)
    return (hist.reshape(len(prefix), bins).cumsum(axis=1) < k).sum(axis=1)


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


def _to_columns(codes: np.ndarray) -> list[np.ndarray]:
    """Split ``(n, code_size)`` uint8 codes into contiguous word columns.

    Every full 8 bytes become a ``uint64`` column; leftover bytes go into one column of the
    narrowest of ``uint8``/``uint16``/``uint32``/``uint64`` that holds them, zero-padded:
    zero XOR zero adds nothing to a distance, as long as queries and database are split alike.
    """
    columns = []
    for lo in range(0, codes.shape[1], 8):
        width = min(8, codes.shape[1] - lo)
        dtype = next(dt for dt in (np.uint8, np.uint16, np.uint32, np.uint64) if np.dtype(dt).itemsize >= width)
        size = np.dtype(dtype).itemsize
        word = np.zeros((codes.shape[0], size), dtype=np.uint8)
        word[:, :width] = codes[:, lo : lo + width]
        columns.append(word.view(dtype).reshape(-1))
    return columns


_SCRATCH = threading.local()


def _scratch(role: str, dtype: Any, size: int) -> np.ndarray:
    """This thread's reusable buffer for ``role``: ``size`` elements of ``dtype``.

    Fresh multi-MiB arrays come from ``mmap`` and fault in on first touch, which costs more
    than a whole search of a small database (``benchmarks/search_kernels.py``); scans run one
    at a time per thread, so each thread keeps its buffers between calls.
    """
    buffers: dict[tuple[str, np.dtype], np.ndarray] = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (role, np.dtype(dtype))
    buf = buffers.get(key)
    if buf is None or buf.size < size:
        buf = buffers[key] = np.empty(size, dtype=dtype)
    return buf[:size]


_EXECUTORS: dict[int, ThreadPoolExecutor] = {}
_EXECUTORS_LOCK = threading.Lock()


def _executor(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool of exactly ``threads`` workers (created once, reused by every search)."""
    with _EXECUTORS_LOCK:
        pool = _EXECUTORS.get(threads)
        if pool is None:
            pool = _EXECUTORS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="fgh-search")
        return pool


def _forget_executors() -> None:
    """In a forked child (a DataLoader worker, say): the pools' threads did not come along."""
    global _EXECUTORS_LOCK
    _EXECUTORS.clear()
    _EXECUTORS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_executors)


def _available_cpus() -> int:
    """CPUs this process may run on (respects ``taskset`` and container CPU sets)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def cpu_kernel() -> str:
    """The CPU distance kernel ``kernel="auto"`` uses for codes up to ``FUSED_MAX_BITS``:
    ``"compiled/<isa>"`` (the instruction set the fused loop picked for this CPU) or ``"numpy"``."""
    return "numpy" if _hamming is None else f"compiled/{_hamming.KERNEL}"


def _use_compiled_kernel(kernel: str, max_distance: int) -> bool:
    """Whether the compiled kernel computes a CPU searcher's distances; refuse what it cannot do."""
    takes_codes = max_distance <= FUSED_MAX_BITS
    if kernel == "compiled":
        if not takes_codes:
            raise FghError(f"kernel='compiled' takes codes up to {FUSED_MAX_BITS} bits ({FUSED_MAX_BITS // 8} "
                           f"bytes), not {max_distance // 8} bytes")
        if _hamming is None:
            raise BackendUnavailableError(
                "the compiled search kernel fgh_deploy._hamming is not built (the install found no C "
                "compiler): reinstall fgh with one, or use kernel='numpy'"
            )
    return kernel != "numpy" and takes_codes and _hamming is not None


def _check_device(device: Any) -> str:
    """``device`` when it is ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; raise otherwise.

    Not :func:`fgh_deploy.utils.check_device`: a search runs where its codes are, so there is
    no ``auto``.
    """
    if device == "cpu" or (isinstance(device, str) and _CUDA_DEVICE.fullmatch(device)):
        return device
    raise FghError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


# fp16 sums of ±1 products are exact integers up to 2048 terms (its 11-bit significand).
_HALF_MAX_BITS = 2048
# Packed codes unpacked per slice: the uint8 temporaries stay small next to the ±1 result.
_UNPACK_BITS = 1 << 24


class TorchHammingSearcher(HammingSearcher):
    """:class:`HammingSearcher` on a torch device (a CUDA GPU), with torch imported on first use.

    torch has no popcount, so bits become ±1 values and ``q·d = bits − 2·distance``: one matrix
    product per block of rows gives every distance of the block. Built with ``device="cpu"`` it
    runs the same code in fp32 on the CPU (the tests check it there on machines without a GPU).

    The database is held on the device as ``(ntotal, bits)`` ±1 values: fp16 up to 2048 bits
    on CUDA, fp32 otherwise. Ties are settled by ``topk`` on the unique key
    ``distance * ntotal + row``, which orders by ``(distance, row)``.
    """

    # Query-row pairs per block: the int64 keys of one block take 256 MiB.
    _BLOCK_ELEMENTS = 1 << 25

    def _build(self, database: np.ndarray) -> None:
        """Copy ``database`` to the device as ±1 values.

        Raises:
            BackendUnavailableError: a CUDA device, but CUDA is unusable here.
            FghError: ``kernel="compiled"`` (a CPU kernel).
        """
        import torch

        if self.device != "cpu" and not torch.cuda.is_available():
            raise BackendUnavailableError(f"device {self.device!r} requested but CUDA is not available here")
        if self._kernel_option == "compiled":
            raise FghError(f"kernel='compiled' is a CPU kernel; the {self.device} search uses torch")
        self._device = torch.device(self.device)
        self._bits = 8 * self.code_size
        fast_half = self._device.type == "cuda" and self._bits <= _HALF_MAX_BITS
        self._dtype = torch.float16 if fast_half else torch.float32
        self._db = self._signs(database)

    @property
    def nbytes(self) -> int:
        """Bytes of the ±1 database on the device."""
        return self._db.numel() * self._db.element_size()

    @property
    def kernel(self) -> str:
        """``"torch"``: matrix products on the device."""
        return "torch"

    def _search_impl(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        n = self.ntotal
        distances, labels = _no_neighbours(len(queries), k)
        best = torch.empty((len(queries), 0), dtype=torch.int64, device=self._device)
        for start, dist in self._blocks(queries):
            rows = torch.arange(start, start + dist.shape[1], device=self._device)
            keys = torch.cat((best, dist.to(torch.int64) * n + rows), dim=1)
            best = torch.topk(keys, min(k, keys.shape[1]), dim=1, largest=False, sorted=True).values
        found = best.cpu().numpy()
        distances[:, : found.shape[1]] = found // n
        labels[:, : found.shape[1]] = found % n
        return distances, labels

    def _within_impl(self, queries: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import torch

        parts = []
        for start, dist in self._blocks(queries):
            qi, col = torch.nonzero(dist <= limit, as_tuple=True)
            parts.append((qi.cpu().numpy(), dist[qi, col].cpu().numpy(), (col + start).cpu().numpy()))
        return _concat(parts)

    def _distances_impl(self, queries: np.ndarray) -> np.ndarray:
        out = np.empty((len(queries), self.ntotal), dtype=np.int32)
        for start, dist in self._blocks(queries):
            out[:, start : start + dist.shape[1]] = dist.cpu().numpy()
        return out

    def _blocks(self, queries: np.ndarray) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(row_start, int32 distances (nq, rows))`` block by block, rows ascending."""
        import torch

        q = self._signs(queries)
        rows = max(1, self._BLOCK_ELEMENTS // len(queries))
        for start in range(0, self.ntotal, rows):
            dots = q @ self._db[start : start + rows].T
            yield start, (self._bits - dots.to(torch.int32)) // 2

    def _signs(self, codes: np.ndarray) -> torch.Tensor:
        """Packed codes → ``(n, bits)`` ±1 tensor on the device (zero padding → -1 on both sides)."""
        import torch

        shifts = torch.arange(8, dtype=torch.uint8, device=self._device)
        out = torch.empty((len(codes), self._bits), dtype=self._dtype, device=self._device)
        step = max(1, _UNPACK_BITS // self._bits)
        for start in range(0, len(codes), step):
            packed = torch.from_numpy(np.array(codes[start : start + step])).to(self._device)  # a writable copy
            bits = (packed.unsqueeze(-1) >> shifts) & 1
            out[start : start + step] = bits.reshape(len(packed), -1).to(self._dtype) * 2 - 1
        return out


def _no_neighbours(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(D, I)`` of shape ``(nq, k)`` with every slot -1 ("no neighbour"), to fill in."""
    return np.full((nq, k), -1, dtype=np.int32), np.full((nq, k), -1, dtype=np.int64)


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
