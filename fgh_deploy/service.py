"""The parts of ``fgh serve`` that need no HTTP stack: options, the dynamic batcher, the live index, metrics.

:mod:`fgh_deploy.serve` (the entry points) and :mod:`fgh_deploy.serve_http` (the FastAPI routes)
both build on these; see :mod:`fgh_deploy.serve` for how they work together.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .encode import engine_cuda_device, padded_batch
from .errors import ConfigError, FghError
from .index import MANIFEST, CodeIndex
from .index_uri import MilvusLocation, SearchIndex, parse_index_name
from .query import check_engine_matches, open_index
from .utils import check_int, display_path

if TYPE_CHECKING:
    from fgh_deploy.engines.base import Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """How the service batches, bounds and protects requests (``fgh serve``'s options)."""

    #: Most images per engine call; 1 turns dynamic batching off.
    max_batch: int = 16
    #: How long the engine thread waits for more images after the first of a batch arrived.
    max_wait_ms: float = 5.0
    #: Bearer token every search, image and metrics request must carry (None: no authentication).
    token: str | None = None
    #: Largest request body; larger ones get 413 before they are read.
    max_upload_bytes: int = 32 * 2**20
    #: Largest ``k`` a request may ask for (422 above).
    max_k: int = 1000
    #: Most images in one ``POST /search/batch`` or codes in one ``POST /search/codes``.
    max_batch_images: int = 64
    #: Seconds to receive a request body (408 after) and then to answer it (504 after).
    request_timeout_s: float = 30.0
    #: How often the index's manifest is checked for a new commit.
    reload_seconds: float = 1.0
    #: Threads decoding uploads and searching (None: up to 4, one per CPU).
    decode_threads: int | None = None
    #: Where the Hamming search runs: ``cpu`` or ``cuda[:N]``.
    search_device: str = "cpu"

    def __post_init__(self) -> None:
        check_int(self.max_batch, "max_batch", minimum=1, error=ConfigError)
        check_int(self.max_upload_bytes, "max_upload_bytes", minimum=1, error=ConfigError)
        check_int(self.max_k, "max_k", minimum=1, error=ConfigError)
        check_int(self.max_batch_images, "max_batch_images", minimum=1, error=ConfigError)
        if self.decode_threads is not None:
            check_int(self.decode_threads, "decode_threads", minimum=1, error=ConfigError)
        for name in ("max_wait_ms", "request_timeout_s", "reload_seconds"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.request_timeout_s == 0 or self.reload_seconds == 0:
            raise ConfigError("request_timeout_s and reload_seconds must be above 0")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ConfigError("the bearer token must be a non-empty string without spaces")


class DynamicBatcher:
    """One thread owns the engine; images submitted from any thread are encoded in shared batches.

    The engine thread takes the images waiting, and while more are on their way (requests inside
    :meth:`incoming`, still decoding) it waits for them up to ``max_wait_ms``, up to ``max_batch``
    images, then encodes them in one call. Unlike Triton's dynamic batcher it does not wait when
    nothing else is coming, so a lone request pays no delay. Images are encoded in arrival order;
    a cancelled request's image is dropped before the call.

    Args:
        engine: an opened engine (used only by the engine thread from :meth:`start` to :meth:`close`).
        max_batch: most images per call (1: every image alone).
        max_wait_ms: how long to wait for images on their way once one arrived.
        pad_to: pad each batch with black images to this many rows (CUDA: one shape, one plan).
        on_batch: called with (images, seconds) after each engine call, from the engine thread.
    """

    def __init__(self, engine: Engine, *, max_batch: int, max_wait_ms: float, pad_to: int = 0,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self._engine = engine
        self._max_batch = check_int(max_batch, "max_batch", minimum=1)
        self._max_wait = max_wait_ms / 1e3
        self._pad_to = pad_to
        self._on_batch = on_batch
        self._changed = threading.Condition()
        self._waiting: deque[tuple[torch.Tensor, Future[np.ndarray]]] = deque()
        self._incoming = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fgh-engine", daemon=True)

    def start(self) -> None:
        """Start the engine thread."""
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running."""
        return self._thread.is_alive()

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Announce images to come: inside this block a request decodes, then :meth:`submit`\ s them."""
        with self._changed:
            self._incoming += 1
        try:
            yield
        finally:
            with self._changed:
                self._incoming -= 1
                self._changed.notify()

    def submit(self, image: torch.Tensor) -> Future[np.ndarray]:
        """Queue one uint8 ``(3, S, S)`` image; the future holds its float code row.

        Raises:
            FghError: the batcher is closed.
        """
        future: Future[np.ndarray] = Future()
        with self._changed:
            if self._closed:
                raise FghError("the engine is shutting down")
            self._waiting.append((image, future))
            self._changed.notify()
        return future

    def close(self) -> None:
        """Encode what is queued, then stop the engine thread."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._waiting or self._closed)
                if not self._waiting:
                    return  # closed, and everything queued was encoded
                deadline = time.monotonic() + self._max_wait
                while len(self._waiting) < self._max_batch and self._incoming and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._changed.wait(left)
                batch = [self._waiting.popleft() for _ in range(min(len(self._waiting), self._max_batch))]
            self._encode([(image, future) for image, future in batch if future.set_running_or_notify_cancel()])

    def _encode(self, batch: list[tuple[torch.Tensor, Future[np.ndarray]]]) -> None:
        if not batch:
            return
        started = time.perf_counter()
        try:
            pixels = padded_batch(torch.stack([image for image, _ in batch]), self._pad_to)
            codes = self._engine.encode(pixels)[: len(batch)]
        except Exception as exc:  # every waiting request gets the engine's error, the thread goes on
            for _, future in batch:
                future.set_exception(exc)
            return
        if self._on_batch is not None:
            self._on_batch(len(batch), time.perf_counter() - started)
        for (_, future), code in zip(batch, codes):
            future.set_result(code)


def _manifest_signature(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime_ns, size) of the manifest: a commit replaces the file, so any commit changes it."""
    try:
        st = os.stat(path / MANIFEST)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class LiveIndex:
    """The served index, reopened at each new commit; the last good one keeps serving on failure.

    Read :attr:`current` once per request and use that handle for everything the request does:
    handles are never closed while the service runs (an old one is released when its last
    request drops it), so a request never sees a reload half-way.

    A Milvus index (``milvus://…``, ``FILE.db#COLLECTION``) is held as is: Milvus serves rows as
    soon as they are inserted, so there is no manifest to watch and :meth:`refresh` does nothing
    (:attr:`watched` is False).

    Args:
        name: the index: a local index directory, or a Milvus name (a ``Path`` is always a directory).
        engine: the engine queries are encoded with; a reloaded index must match it.
        search_device: where searches run (the searcher is built before the switch; Milvus searches on its server).

    Raises:
        FghError: the index cannot be opened or does not match the engine (at start only).
    """

    def __init__(self, name: str | os.PathLike[str], engine: Engine, *, search_device: str = "cpu") -> None:
        location = parse_index_name(name)
        #: Whether new commits are watched for (a local index) or not (Milvus).
        self.watched = not isinstance(location, MilvusLocation)
        self.path = Path(location) if self.watched else None
        self.name = str(name)
        self._engine = engine
        self._search_device = search_device
        self._signature = _manifest_signature(self.path) if self.path is not None else None
        self.current: SearchIndex = self._open()
        #: Why the last reload failed (the last good index is serving), or None.
        self.reload_error: str | None = None
        self.reloads = 0
        self.reload_failures = 0
        self.loaded_at = time.time()

    def _open(self) -> SearchIndex:
        index = open_index(self.path if self.path is not None else self.name)
        try:
            check_engine_matches(index, self._engine)
            if isinstance(index, CodeIndex):
                index.searcher(self._search_device)  # built before the switch, not by the first request
        except BaseException:
            index.close()
            raise
        return index

    def refresh(self) -> bool:
        """Reopen the index if its manifest changed (or the last reload failed); nothing for Milvus.

        Returns:
            Whether a new index is now being served.
        """
        if self.path is None:
            return False
        signature = _manifest_signature(self.path)
        if signature == self._signature and self.reload_error is None:
            return False
        try:
            index = self._open()
        except (FghError, OSError) as exc:
            message = str(exc)
            if message != self.reload_error:  # logged once per distinct failure, not once per poll
                log.warning("%s: reload failed, still serving the last good index (%d rows): %s",
                            display_path(self.path), len(self.current), message)
                self.reload_failures += 1
            self.reload_error, self._signature = message, signature
            return False
        before = len(self.current)
        self.current, self._signature, self.reload_error = index, signature, None
        self.reloads += 1
        self.loaded_at = time.time()
        log.info("%s: reloaded, %d rows (was %d)", display_path(self.path), len(index), before)
        return True

    def row_path(self, current: SearchIndex, row: int) -> str | None:
        """The relative path of ``row`` of ``current`` (a row number, or Milvus's primary key), or None."""
        if isinstance(current, CodeIndex):
            return current.path_of(row) if 0 <= row < len(current) else None
        return current.path_of_key(row)  # type: ignore[attr-defined]


#: Request latency buckets in seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += value


def _labels(**labels: str) -> str:
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{key}="{escape(str(value))}"' for key, value in labels.items()) + "}" if labels else ""


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Metrics:
    """Counters and histograms of the service, rendered in the Prometheus text format (version 0.0.4).

    Thread-safe: requests are observed on the event loop, batches on the engine thread.
    """

    def __init__(self, max_batch: int) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, int], int] = defaultdict(int)
        self._latency: dict[str, _Histogram] = {}
        batch_buckets = sorted({1, *(2**i for i in range(max_batch.bit_length())), max_batch})
        self._batch_sizes = _Histogram(batch_buckets)
        self._engine_seconds = _Histogram(LATENCY_BUCKETS)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request of ``route`` (its path template) and time it."""
        with self._lock:
            self._requests[(route, status)] += 1
            self._latency.setdefault(route, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, images: int, seconds: float) -> None:
        """Count one engine call of ``images`` images that took ``seconds``."""
        with self._lock:
            self._batch_sizes.observe(images)
            self._engine_seconds.observe(seconds)

    def render(self, gauges: Sequence[tuple[str, str, dict[str, str], float]]) -> str:
        """The exposition text: the counters and histograms, then ``gauges`` (name, help, labels, value)."""
        lines: list[str] = []

        def header(name: str, kind: str, text: str) -> None:
            lines.extend((f"# HELP {name} {text}", f"# TYPE {name} {kind}"))

        def histogram(name: str, hist: _Histogram, **labels: str) -> None:
            for bound, count in zip(hist.buckets, hist.counts):
                lines.append(f"{name}_bucket{_labels(**labels, le=_number(bound))} {count}")
            lines.append(f"{name}_bucket{_labels(**labels, le='+Inf')} {hist.total}")
            lines.append(f"{name}_sum{_labels(**labels)} {_number(hist.sum)}")
            lines.append(f"{name}_count{_labels(**labels)} {hist.total}")

        with self._lock:
            header("fgh_http_requests_total", "counter", "HTTP requests answered, by route and status code.")
            for (route, status), count in sorted(self._requests.items()):
                lines.append(f"fgh_http_requests_total{_labels(route=route, status=str(status))} {count}")
            header("fgh_http_request_errors_total", "counter", "HTTP requests answered with a status of 400 or above.")
            errors: dict[str, int] = defaultdict(int)
            for (route, status), count in self._requests.items():
                if status >= 400:
                    errors[route] += count
            for route, count in sorted(errors.items()):
                lines.append(f"fgh_http_request_errors_total{_labels(route=route)} {count}")
            header("fgh_http_request_duration_seconds", "histogram", "Time from request to response, by route.")
            for route, hist in sorted(self._latency.items()):
                histogram("fgh_http_request_duration_seconds", hist, route=route)
            header("fgh_engine_batch_size", "histogram", "Images per engine call (dynamic batching).")
            histogram("fgh_engine_batch_size", self._batch_sizes)
            header("fgh_engine_batch_seconds", "histogram", "Time of one engine call.")
            histogram("fgh_engine_batch_seconds", self._engine_seconds)
        for name, text, labels, value in gauges:
            header(name, "gauge", text)
            lines.append(f"{name}{_labels(**labels)} {_number(value)}")
        return "\n".join(lines) + "\n"


def engine_provider(engine: Engine) -> str:
    """Where the engine runs, for ``/metrics`` and ``/readyz``: the ONNX Runtime provider or the torch device."""
    described = engine.describe()
    providers = described.get("providers") or []
    return str(providers[0] if providers else described.get("device") or engine.kind)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def batch_padding(engine: Engine, max_batch: int) -> int:
    """Rows each engine call is padded to: ``max_batch`` on CUDA (as ``fgh encode`` pads), else none."""
    return max_batch if engine_cuda_device(engine) is not None else 0
