"""Benchmarks behind ``fgh bench``: Hamming search (against FAISS), engine latency, encoding, ``fgh serve``.

Every function returns a JSON-serialisable dict (``schema_version`` 1) and logs progress to
stderr through :mod:`logging`; none prints. Timings are wall-clock medians or percentiles of
repeated calls; the dicts also record what they ran on (CPU count, load average, versions),
since numbers from a shared or busy machine are not comparable with quiet ones.

``smoke=True`` shrinks every benchmark to a run of about a second, for tests: the structure
and the exactness flags are the same, the timings mean nothing.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np

from .errors import FghError
from .index_uri import SearchIndex, absolute_index_name
from .search import HammingSearcher
from .utils import display_path

if TYPE_CHECKING:
    from fgh_deploy.engines.base import Engine

log = logging.getLogger(__name__)

_T = TypeVar("_T")

SCHEMA_VERSION = 1
# Rows per slice of the independent reference check: bounds its temporaries (~16 bytes a row).
_REFERENCE_ROWS = 1 << 20


def _available_memory() -> int | None:
    """Bytes of physical memory free now (Linux), or in total elsewhere; None when unknown."""
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            continue
    return None


def bench_search(
    n: int,
    bits: int,
    *,
    queries: Sequence[int] = (1, 64),
    k: int = 10,
    repeats: int = 5,
    seed: int = 0,
    compare_faiss: bool = True,
    threads: int | None = None,
    device: str = "cpu",
    kernel: str = "auto",
    smoke: bool = False,
) -> dict[str, Any]:
    """Time exact k-NN over ``n`` random ``bits``-bit codes, ours against FAISS ``IndexBinaryFlat``.

    Both search the same packed codes with the same queries in the same process. For each
    query batch size the result records the median time per call, per query and the codes
    compared per second (``n * nq / time``), and whether FAISS returned the same distances and,
    away from ties at the k-th distance (whose order FAISS leaves unspecified), the same
    neighbours. Our results for the first queries are also checked against an independent
    brute force (row-wise popcount, then a ``(distance, row)`` lexsort).

    Args:
        n: Database codes.
        bits: Code length; codes are packed LSB-first into ``ceil(bits / 8)`` bytes with the
            unused high bits zero, as :func:`fgh_deploy.bits.pack_codes` makes them.
        queries: Query batch sizes to time (one search call per batch).
        k: Neighbours per query.
        repeats: Timed calls per batch size, after one untimed warm-up call.
        seed: Seed of the random codes.
        compare_faiss: Also time FAISS when ``import faiss`` works (``faiss-cpu``).
        threads: Threads for both libraries; None leaves each at its default (ours: the CPUs
            this process may use, at most 8; FAISS: its OpenMP default).
        device: Where ours searches: ``cpu``, or ``cuda[:N]`` (timed to the results on the
            host, as a caller gets them). FAISS always runs on the CPU.
        kernel: Our CPU distance kernel (``auto``, ``compiled``, ``numpy``; see
            :class:`~fgh_deploy.search.HammingSearcher`).
        smoke: At most 10,000 codes, batches of at most 8 queries, one timed call.

    Returns:
        ``{"schema_version", "benchmark": "search", "n", "bits", "code_size", "k", "repeats",
        "seed", "machine", "ours", "faiss", "results"}``; ``ours`` holds ``device``, ``kernel``,
        ``threads``, ``layout`` (column dtypes), ``build_seconds``, ``index_bytes``, ``bytes_per_code``;
        ``faiss`` holds ``available``, ``version``, ``threads``, ``build_seconds`` (or
        ``reason`` when unavailable or not asked for); each entry of ``results`` holds
        ``queries``, ``ours`` and ``faiss`` (``seconds_per_call``, ``seconds_per_query``,
        ``codes_per_second``, ``runs``), ``speedup_vs_faiss``, ``same_distances``,
        ``same_neighbours`` and ``matches_reference``.

    Raises:
        FghError: ``n``, ``bits``, ``k``, ``repeats`` or a batch size below 1.
    """
    for name, value in (("n", n), ("bits", bits), ("k", k), ("repeats", repeats)):
        if value < 1:
            raise FghError(f"{name} must be at least 1, got {value}")
    if not queries or min(queries) < 1:
        raise FghError(f"query batch sizes must be at least 1, got {list(queries)}")
    if smoke:
        n, repeats = min(n, 10_000), 1
        queries = sorted({min(q, 8) for q in queries})
    # The codes live three times at most: generated, in our searcher's columns, in FAISS's index.
    needed, available = 3 * n * ((bits + 7) // 8), _available_memory()
    if available is not None and needed > available:
        raise FghError(f"n = {n:,} codes of {bits} bits need about {needed / 2**30:,.1f} GiB here; "
                       f"{available / 2**30:.1f} GiB of memory is available")
    rng = np.random.default_rng(seed)
    database = _random_codes(rng, n, bits)
    query_codes = _random_codes(rng, max(queries), bits)
    log.info("search benchmark: %d codes of %d bits, batches %s, k=%d", n, bits, list(queries), k)

    build_seconds, searcher = _clocked(
        lambda: HammingSearcher(database, threads=threads, device=device, kernel=kernel))
    ours_info = {
        "device": searcher.device,
        "kernel": searcher.kernel,
        "threads": searcher.threads,
        "layout": searcher.layout,
        "build_seconds": build_seconds,
        "index_bytes": searcher.nbytes,
        "bytes_per_code": searcher.nbytes / n,
    }
    faiss = _import_faiss() if compare_faiss else None
    faiss_info: dict[str, Any] = {"available": False, "reason": "not asked for"}
    if compare_faiss and faiss is None:
        faiss_info["reason"] = "import faiss failed (pip install faiss-cpu)"
    faiss_default_threads = faiss.omp_get_max_threads() if faiss is not None else None
    results = []
    try:
        faiss_index = None
        if faiss is not None:
            if threads is not None:
                faiss.omp_set_num_threads(threads)
            build_seconds, faiss_index = _clocked(lambda: _faiss_index(faiss, database))
            faiss_info = {
                "available": True,
                "version": faiss.__version__,
                "index": "IndexBinaryFlat",
                "threads": faiss.omp_get_max_threads(),
                "build_seconds": build_seconds,
            }
        for nq in queries:
            results.append(_search_entry(searcher, faiss_index, database, query_codes[:nq], k, repeats))
    finally:
        # FAISS threads are process-wide: leave them as found.
        if faiss is not None:
            faiss.omp_set_num_threads(faiss_default_threads)
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "search",
        "n": n,
        "bits": bits,
        "code_size": database.shape[1],
        "k": k,
        "repeats": repeats,
        "seed": seed,
        "machine": _machine(),
        "ours": ours_info,
        "faiss": faiss_info,
        "results": results,
    }


def bench_engine(
    engine: Engine,
    *,
    batch_sizes: Sequence[int] = (1, 8, 32),
    warmup: int = 3,
    iterations: int = 20,
    seed: int = 0,
    smoke: bool = False,
) -> dict[str, Any]:
    """Latency and throughput of ``engine.encode`` on random uint8 images of its input size.

    On CUDA the clock stops only after the device is done (see :func:`_clocked`).

    Args:
        engine: Any opened :class:`engines.base.Engine`.
        batch_sizes: Images per call to time.
        warmup: Untimed calls per batch size first (allocator, autotuning, lazy init).
        iterations: Timed calls per batch size.
        seed: Seed of the random images.
        smoke: Batches of at most 2 images, one warm-up and two timed calls.

    Returns:
        ``{"schema_version", "benchmark": "engine", "engine" (its describe()), "bits",
        "input_size", "machine", "results"}``; each result holds ``batch_size``,
        ``iterations``, ``latency_ms`` (``p50``, ``p95``, ``p99``, ``mean``, ``min``) and
        ``images_per_second`` (images over the summed latencies).

    Raises:
        FghError: a batch size or ``iterations`` below 1, or ``warmup`` below 0.
    """
    if not batch_sizes or min(batch_sizes) < 1:
        raise FghError(f"batch sizes must be at least 1, got {list(batch_sizes)}")
    if iterations < 1 or warmup < 0:
        raise FghError(f"need iterations >= 1 and warmup >= 0, got {iterations} and {warmup}")
    if smoke:
        batch_sizes = sorted({min(b, 2) for b in batch_sizes})
        warmup, iterations = 1, 2
    rng = np.random.default_rng(seed)
    size = engine.input_size
    results = []
    for batch_size in batch_sizes:
        images = rng.integers(0, 256, (batch_size, 3, size, size), dtype=np.uint8)
        latencies, _ = _time_calls(lambda: engine.encode(images), iterations, warmup=warmup)
        ms = np.array(latencies) * 1e3
        results.append({
            "batch_size": batch_size,
            "iterations": iterations,
            "latency_ms": {
                "p50": float(np.percentile(ms, 50)),
                "p95": float(np.percentile(ms, 95)),
                "p99": float(np.percentile(ms, 99)),
                "mean": float(ms.mean()),
                "min": float(ms.min()),
            },
            "images_per_second": batch_size * iterations / float(np.sum(latencies)),
        })
        log.info("  batch %3d: p50 %.2f ms, %.1f images/s", batch_size, results[-1]["latency_ms"]["p50"],
                 results[-1]["images_per_second"])
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "engine",
        "engine": engine.describe(),
        "bits": engine.bits,
        "input_size": size,
        "machine": _machine(),
        "results": results,
    }


def bench_encode(
    folder: str | os.PathLike[str],
    engine: Engine,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    limit: int | None = None,
    gpu_decode: bool | None = None,
    warmup: bool = True,
    smoke: bool = False,
) -> dict[str, Any]:
    """End-to-end ``fgh encode`` speed: images → decoded → encoded → packed → written index.

    Runs :func:`fgh_deploy.encode.encode_folder` into a temporary index (removed afterwards),
    so it measures exactly what ``fgh encode`` does, decoding workers included.

    Args:
        folder: Image folder (recursive).
        engine: An opened :class:`engines.base.Engine`.
        batch_size: Images per engine call.
        workers: Decoding processes (default as ``fgh encode``; 0 decodes in this process).
        limit: Encode only the first ``limit`` images (in listing order), via a temporary
            folder of symbolic links.
        gpu_decode: As :func:`fgh_deploy.encode.encode_folder`.
        warmup: Encode the first batch once, untimed, before the timed run.
        smoke: At most 8 images, batches of 4, decoding in this process.

    Returns:
        ``{"schema_version", "benchmark": "encode", "folder", "engine", "bits", "batch_size",
        "workers", "machine", "warmup_seconds", "images", "encoded", "skipped", "seconds",
        "images_per_second", "timings", "timing_fractions", "image_seconds", "index_bytes",
        "bytes_per_image"}``; ``timings`` are this process's wall seconds spent waiting for
        decoded batches (``decode_wait``), decoding on the GPU, in the engine, packing,
        writing, and ``other`` (listing, index setup); ``timing_fractions`` divide them by
        ``seconds``. ``image_seconds`` sums each image's decode and resize time over the
        decoding workers, which run in parallel.

    Raises:
        FghError: a missing folder, ``batch_size`` < 1 or ``limit`` < 1.
    """
    from .encode import _default_workers, encode_folder
    from .images import list_images

    if batch_size < 1:
        raise FghError(f"batch size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise FghError(f"limit must be at least 1, got {limit}")
    if smoke:
        limit, batch_size, workers = min(limit or 8, 8), min(batch_size, 4), 0
    workers = _default_workers() if workers is None else workers
    root = Path(folder)
    with tempfile.TemporaryDirectory(prefix="fgh-bench-") as tmp:
        names = list_images(root) if limit is not None or warmup else []
        source = root if limit is None else _linked_subset(root, names[:limit], Path(tmp) / "images")
        warmup_seconds = 0.0
        if warmup and names:
            # First calls pay once for CUDA context, kernel loading, cuDNN and nvJPEG handles
            # (seconds on a GPU): one batch first, untimed, so the numbers are the steady state.
            warmup_seconds, _ = _clocked(lambda: encode_folder(
                _linked_subset(root, names[:batch_size], Path(tmp) / "warmup"), engine,
                Path(tmp) / "warmup-index", batch_size=batch_size, workers=0, progress=False,
                gpu_decode=gpu_decode))
        log.info("encode benchmark: %s, batch %d, %d worker(s)", root, batch_size, workers)
        summary = encode_folder(source, engine, Path(tmp) / "index", batch_size=batch_size,
                                workers=workers, rebuild=True, progress=False, gpu_decode=gpu_decode)
    timings = dict(summary.timings)
    timings["other"] = max(0.0, summary.seconds - sum(timings.values()))
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "encode",
        "folder": str(root.resolve()),
        "engine": engine.describe(),
        "bits": engine.bits,
        "batch_size": batch_size,
        "workers": workers,
        "machine": _machine(),
        "warmup_seconds": warmup_seconds,
        "images": summary.images,
        "encoded": summary.encoded,
        "skipped": len(summary.skipped),
        "seconds": summary.seconds,
        "images_per_second": summary.images_per_second,
        "timings": timings,
        "timing_fractions": {key: value / summary.seconds if summary.seconds > 0 else 0.0
                             for key, value in timings.items()},
        "image_seconds": summary.image_seconds,
        "index_bytes": summary.index_bytes,
        "bytes_per_image": summary.index_bytes / summary.encoded if summary.encoded else None,
    }


#: Bounds of ``bench_serve``: the seconds of one run and the concurrent clients.
SERVE_SECONDS = (1.0, 600.0)
SERVE_CLIENTS = (1, 256)
# How long a started server may take to load the engine and the index (a cold torch import included).
_SERVER_START_SECONDS = 300.0


def bench_serve(
    index: str | os.PathLike[str],
    engine: str | os.PathLike[str] | None = None,
    *,
    clients: Sequence[int] = (1, 4, 16),
    seconds: float = 10.0,
    max_batch: int = 16,
    max_wait_ms: float = 5.0,
    top_k: int = 10,
    queries: int = 32,
    url: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """``fgh serve`` under load over loopback: N concurrent clients posting images for T seconds.

    Each client is a thread with one keep-alive HTTP connection, posting the query images in
    turn to ``/search`` and timing each answer. Unless ``url`` is given, the server is started
    here (``fgh serve`` in a subprocess), once with dynamic batching (``max_batch``) and once
    without (``--max-batch 1``), so both are measured in the same run on the same machine.

    Args:
        index: the index (any name, see :mod:`fgh_deploy.index_uri`); up to ``queries`` of its images
            (:meth:`~fgh_deploy.index_uri.SearchIndex.sample_paths`) are the queries.
        engine: the engine for the started servers (default: the one the index records).
        clients: concurrent client counts, each run for ``seconds``.
        seconds: duration of each run (1 to 600).
        max_batch: the batched server's ``--max-batch``.
        max_wait_ms: the batched server's ``--max-wait-ms``.
        top_k: ``k`` of every request.
        queries: how many distinct images the clients post.
        url: measure this running server as it is configured instead (one mode, "as configured").
        token: bearer token for ``url``.

    Returns:
        ``{"schema_version", "benchmark": "serve", "index", "queries", "seconds", "machine",
        "results"}``; each result holds ``mode``, ``max_batch``, ``clients``, ``requests``,
        ``errors`` (failed or non-200 answers), ``error_examples``, ``seconds``,
        ``requests_per_second`` (answered with 200), ``latency_ms`` (``p50``, ``p95``, ``p99``,
        ``mean``; None without a success) and ``mean_batch_size`` (images per engine call during
        the run, from the server's ``/metrics``).

    Raises:
        FghError: out-of-bounds ``seconds`` or ``clients``, an index without readable images, or a
            server that does not start (with the end of its log).
    """
    from urllib.parse import urlsplit

    from .query import open_index

    if not SERVE_SECONDS[0] <= seconds <= SERVE_SECONDS[1]:
        raise FghError(f"seconds must be between {SERVE_SECONDS[0]:g} and {SERVE_SECONDS[1]:g}, got {seconds:g}")
    if not clients or not all(SERVE_CLIENTS[0] <= c <= SERVE_CLIENTS[1] for c in clients):
        raise FghError(f"clients must be between {SERVE_CLIENTS[0]} and {SERVE_CLIENTS[1]}, got {list(clients)}")
    # Closed before a server starts: a Milvus Lite file admits one process at a time.
    with open_index(index, verify=False) as idx:
        images = _query_images(idx, queries)
    runs: list[tuple[str, int | None]] = [("batched", max_batch), ("unbatched", 1)]
    results = []
    for mode, batch in [("as configured", None)] if url else runs:
        with contextlib.ExitStack() as stack:
            if url is None:
                base = stack.enter_context(_serve_process(index, engine, max_batch=batch, max_wait_ms=max_wait_ms))
            else:
                base = url.rstrip("/")
            parts = urlsplit(base)
            if parts.scheme != "http" or not parts.hostname:
                raise FghError(f"--url must be an http:// address, got {base!r}")
            target = _Target(parts.hostname, parts.port or 80, parts.path, token)
            _load(target, images, clients=1, seconds=1.0, top_k=top_k)  # warm-up: first calls, allocators
            for count in clients:
                log.info("serve benchmark: %s, %d client(s), %g s", mode, count, seconds)
                before = _batch_totals(target)
                result = _load(target, images, clients=count, seconds=seconds, top_k=top_k)
                after = _batch_totals(target)
                batches = after[1] - before[1]
                result["mean_batch_size"] = (after[0] - before[0]) / batches if batches else None
                results.append({"mode": mode, "max_batch": batch, "clients": count, **result})
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "serve",
        "index": str(index),
        "queries": len(images),
        "seconds": seconds,
        "top_k": top_k,
        "max_wait_ms": max_wait_ms,
        "machine": _machine(),
        "results": results,
    }


class _Target(NamedTuple):
    host: str
    port: int
    prefix: str
    token: str | None

    def request(self, conn: http.client.HTTPConnection, method: str, path: str,
                body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn.request(method, self.prefix + path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()


def _query_images(index: SearchIndex, count: int) -> list[tuple[str, bytes]]:
    """(path, bytes) of up to ``count`` readable images of the index (:meth:`SearchIndex.sample_paths`)."""
    images = []
    for rel in index.sample_paths(count):
        try:
            images.append((rel, (Path(index.root) / rel).read_bytes()))
        except OSError:
            continue
    if not images:
        raise FghError(f"{index.label}: none of its images can be read from {display_path(index.root)}")
    return images


def _load(target: _Target, images: Sequence[tuple[str, bytes]], *, clients: int, seconds: float,
          top_k: int) -> dict[str, Any]:
    """``clients`` threads posting ``images`` for ``seconds``; latencies of the 200 answers, errors counted."""
    from urllib.parse import quote

    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[list[str]] = [[] for _ in range(clients)]
    start = time.perf_counter()
    deadline = start + seconds

    def client(slot: int) -> None:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=120)
        turn = slot
        while time.perf_counter() < deadline:
            name, body = images[turn % len(images)]
            turn += clients
            sent = time.perf_counter()
            try:
                status, answer = target.request(conn, "POST", f"/search?k={top_k}&name={quote(name)}", body)
            except (OSError, http.client.HTTPException) as exc:
                errors[slot].append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection(target.host, target.port, timeout=120)
                continue
            if status == 200:
                latencies[slot].append(time.perf_counter() - sent)
            else:
                errors[slot].append(f"{status}: {answer[:200].decode('utf-8', 'replace')}")
        conn.close()

    threads = [threading.Thread(target=client, args=(slot,), daemon=True) for slot in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    ms = np.array([t for per_client in latencies for t in per_client]) * 1e3
    failed = [e for per_client in errors for e in per_client]
    pct = (lambda q: float(np.percentile(ms, q))) if len(ms) else (lambda q: None)
    return {
        "requests": len(ms) + len(failed),
        "errors": len(failed),
        "error_examples": sorted(set(failed))[:5],
        "seconds": elapsed,
        "requests_per_second": len(ms) / elapsed,
        "latency_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99), "mean": float(ms.mean()) if len(ms) else None},
    }


def _batch_totals(target: _Target) -> tuple[float, float]:
    """(images, engine calls) so far, from the server's ``fgh_engine_batch_size`` histogram."""
    conn = http.client.HTTPConnection(target.host, target.port, timeout=30)
    try:
        status, text = target.request(conn, "GET", "/metrics")
    finally:
        conn.close()
    if status != 200:
        raise FghError(f"GET /metrics answered {status}: {text[:200].decode('utf-8', 'replace')}")
    values = {}
    for line in text.decode().splitlines():
        name, _, value = line.partition(" ")
        if name in ("fgh_engine_batch_size_sum", "fgh_engine_batch_size_count"):
            values[name] = float(value)
    return values.get("fgh_engine_batch_size_sum", 0.0), values.get("fgh_engine_batch_size_count", 0.0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve_process(index: str | os.PathLike[str], engine: str | os.PathLike[str] | None, *, max_batch: int,
                   max_wait_ms: float) -> Iterator[str]:
    """``fgh serve`` on a free loopback port in a subprocess; yields its base URL once /readyz says ready."""
    port = _free_port()
    command = [sys.executable, "-m", "fgh_deploy.cli", "serve", "--index", absolute_index_name(index),
               "--port", str(port), "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
    if engine is not None:
        command += ["--engine", str(Path(engine).resolve())]
    with tempfile.TemporaryDirectory(prefix="fgh-bench-serve-") as tmp, open(Path(tmp) / "log", "w+b") as server_log:
        # Started outside the checkout: `python -m` would put the current folder first on sys.path.
        process = subprocess.Popen(command, cwd=tmp, stdout=server_log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            started = time.monotonic()
            while not _ready(port):
                if process.poll() is not None or time.monotonic() - started > _SERVER_START_SECONDS:
                    server_log.seek(0)
                    tail = server_log.read().decode("utf-8", "replace").strip().splitlines()[-3:]
                    raise FghError(f"fgh serve did not start: {' | '.join(tail) or 'no output'}")
                time.sleep(0.2)
            log.info("serve benchmark: server ready at %s (max batch %d)", base, max_batch)
            yield base
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _ready(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _linked_subset(root: Path, names: Sequence[str], dest: Path) -> Path:
    """A folder of symbolic links to ``names`` under ``root`` (an empty one for no names)."""
    for rel in names:
        link = dest / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to((root / rel).resolve())
    dest.mkdir(exist_ok=True)
    return dest


def _search_entry(
    searcher: HammingSearcher, faiss_index: Any, database: np.ndarray, batch: np.ndarray, k: int, repeats: int
) -> dict[str, Any]:
    """Time one query batch on ours (and FAISS) and compare the results."""
    n, nq = len(database), len(batch)
    ours_time, (distances, labels) = _time_calls(lambda: searcher.search(batch, k), repeats)
    entry: dict[str, Any] = {
        "queries": nq,
        "ours": _throughput(ours_time, n, nq),
        "faiss": None,
        "speedup_vs_faiss": None,
        "same_distances": None,
        "same_neighbours": None,
        # The reference is a full brute force per query: two queries keep it cheap at 10M codes.
        "matches_reference": _matches_reference(batch[:2], database, distances[:2], labels[:2]),
    }
    if faiss_index is not None:
        faiss_time, (faiss_d, faiss_l) = _time_calls(lambda: faiss_index.search(batch, k), repeats)
        entry["faiss"] = _throughput(faiss_time, n, nq)
        entry["speedup_vs_faiss"] = statistics.median(faiss_time) / statistics.median(ours_time)
        entry["same_distances"] = bool(np.array_equal(faiss_d, distances))
        entry["same_neighbours"] = _same_neighbours(distances, labels, faiss_d, faiss_l)
    log.info("  %3d queries: ours %.3g codes/s%s", nq, entry["ours"]["codes_per_second"],
             f", FAISS {entry['faiss']['codes_per_second']:.3g} codes/s" if entry["faiss"] else "")
    return entry


def _random_codes(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    """``n`` random packed codes of ``bits`` bits, the unused high bits of the last byte zero."""
    codes = rng.integers(0, 256, (n, (bits + 7) // 8), dtype=np.uint8)
    if bits % 8:
        codes[:, -1] &= (1 << (bits % 8)) - 1
    return codes


def _faiss_index(faiss: Any, database: np.ndarray) -> Any:
    """A FAISS ``IndexBinaryFlat`` holding ``database``."""
    index = faiss.IndexBinaryFlat(database.shape[1] * 8)
    index.add(database)
    return index


def _clocked(call: Callable[[], _T]) -> tuple[float, _T]:
    """Wall seconds of one call and its result; the clock stops only when the device is done.

    torch's CUDA queue is synchronised on both sides when torch has initialised CUDA (looked
    up per call: the call being timed may be what initialises it), so queued GPU work is
    neither billed to this call nor left out of it.
    """
    sync = _cuda_sync()
    sync()
    start = time.perf_counter()
    result = call()
    sync()
    return time.perf_counter() - start, result


def _time_calls(call: Callable[[], _T], repeats: int, *, warmup: int = 1) -> tuple[list[float], _T]:
    """``warmup`` untimed calls (allocators, autotuning, lazy initialisation), then ``repeats``
    timed ones (``repeats`` >= 1); returns (seconds of each timed call, the last result)."""
    for _ in range(warmup):
        call()
    runs = [_clocked(call) for _ in range(repeats)]
    return [seconds for seconds, _ in runs], runs[-1][1]


def _throughput(seconds: list[float], n: int, nq: int) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {
        "seconds_per_call": median,
        "seconds_per_query": median / nq,
        "codes_per_second": n * nq / median,
        "runs": seconds,
    }


def _same_neighbours(distances: np.ndarray, labels: np.ndarray, faiss_d: np.ndarray, faiss_l: np.ndarray) -> bool:
    """Same neighbour sets at every distance below each query's k-th (FAISS orders ties freely).

    Rows at the k-th distance itself are a free choice among the tied ones for FAISS, so
    only their distances (compared separately) must agree.
    """
    if not np.array_equal(distances, faiss_d):
        return False
    for d, ours, theirs in zip(distances, labels, faiss_l):
        inside = d < d[-1]
        if sorted(zip(d[inside], ours[inside])) != sorted(zip(d[inside], theirs[inside])):
            return False
    return True


def _matches_reference(queries: np.ndarray, database: np.ndarray, distances: np.ndarray, labels: np.ndarray) -> bool:
    """Our top k equals an independent brute force under the (distance, row) tie rule."""
    k = distances.shape[1]
    for query, d, i in zip(queries, distances, labels):
        full = np.concatenate([
            np.bitwise_count(database[lo : lo + _REFERENCE_ROWS] ^ query).sum(axis=1, dtype=np.int32)
            for lo in range(0, len(database), _REFERENCE_ROWS)
        ])
        order = np.lexsort((np.arange(len(full)), full))[:k]
        if not (np.array_equal(i[: len(order)], order) and np.array_equal(d[: len(order)], full[order])):
            return False
    return True


def _import_faiss() -> Any:
    """The ``faiss`` module, or None (logged) where it is not installed."""
    try:
        import faiss
    except ImportError as exc:
        log.warning("FAISS not available (%s); timing ours only (pip install faiss-cpu to compare)", exc)
        return None
    return faiss


def _cuda_sync() -> Callable[[], None]:
    """``torch.cuda.synchronize`` when torch has initialised CUDA here, else a no-op."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.synchronize
    return lambda: None


def _machine() -> dict[str, Any]:
    """What the timings ran on: CPUs, load, library versions."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "numpy": np.__version__,
    }
    if hasattr(os, "getloadavg"):
        info["load_average"] = list(os.getloadavg())
    return info
