"""``fgh serve``: search by image over HTTP, with a warm engine, dynamic batching and a live index.

A CLI call pays for Python, torch and the engine on every query (seconds); the search itself
takes microseconds. The service loads them once and keeps them:

* :class:`~fgh_deploy.service.DynamicBatcher` — requests decode their images in worker threads, then hand the pixels
  to one engine thread, which groups what arrives within ``max_wait_ms`` (up to ``max_batch``)
  into one engine call, as Triton's dynamic batcher does — but waits only while other requests
  are still decoding. On CUDA the batch is padded to ``max_batch`` rows, as ``fgh encode`` pads
  its batches: every new shape costs new kernel plans.
* :class:`~fgh_deploy.service.LiveIndex` — the index is reopened when a writer (``fgh encode`` appending, compacting
  or rebuilding) commits: its ``manifest.json`` is replaced atomically on every commit, so a
  changed manifest is the switch point. The new index is opened, CRC-verified and checked against
  the engine before it replaces the old one; a request searches and names its hits from one
  snapshot, so a reload never tears a result. A damaged index keeps the last good one serving.
  A Milvus index (``milvus://…``, ``FILE.db#COLLECTION``) is held as is: Milvus serves rows as
  they are inserted, so nothing is watched; its reads reconnect once when the server dropped the
  connection (Milvus Lite drops idle clients after about two minutes).
* :class:`~fgh_deploy.service.Metrics` — Prometheus text-format counters and histograms, written by hand.

These parts need no HTTP stack and live in :mod:`fgh_deploy.service`. The HTTP layer (FastAPI,
uvicorn, python-multipart: ``pip install 'fgh[serve]'``) lives in :mod:`fgh_deploy.serve_http`
and is imported only by :func:`create_app` and :func:`serve`, so the rest of fgh works without
the extra; imports run one way: serve → serve_http → service.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .errors import BackendUnavailableError
from .service import ServeOptions, engine_provider, is_loopback
from .utils import display_path

__all__ = ["ServeOptions", "create_app", "serve"]

log = logging.getLogger(__name__)

SERVE_INSTALL_HINT = "pip install 'fgh[serve]'"
#: Environment variable ``fgh serve`` reads the bearer token from when ``--token`` is not given.
TOKEN_ENV = "FGH_SERVE_TOKEN"


def _import_http() -> Any:
    """:mod:`fgh_deploy.serve_http`, or one line naming the extra to install."""
    try:
        from . import serve_http
    except ImportError as exc:
        raise BackendUnavailableError(f"fgh serve needs FastAPI, uvicorn and python-multipart ({exc.name} is "
                                      f"missing): {SERVE_INSTALL_HINT}") from None
    return serve_http


def create_app(index: str | os.PathLike[str], engine: str | os.PathLike[str] | None = None, *,
               device: str = "auto", allow_other_gpu: bool = False, options: ServeOptions | None = None) -> Any:
    """The ASGI app of ``fgh serve``, for any ASGI server (``uvicorn module:app``, hypercorn, ...).

    The engine and the index are loaded here, so a bad path fails before anything binds; the
    engine thread, the decoding threads and the index watcher run between the app's lifespan
    startup and shutdown.

    Args:
        index: the index: a directory from ``fgh encode``, or a Milvus name (``milvus://HOST[:PORT]/COLLECTION``,
            ``FILE.db#COLLECTION``; a ``Path`` is always a directory). A Milvus index is searched on its
            server and serves new rows as they are inserted; there is nothing to reload.
        engine: engine or checkpoint file (default: the one the index records).
        device: ``auto``, ``cpu`` or ``cuda[:N]`` for the engine.
        allow_other_gpu: see :func:`fgh_deploy.engines.load_engine`.
        options: batching, limits and the token (default: :class:`ServeOptions`'s defaults).

    Returns:
        A FastAPI application.

    Raises:
        BackendUnavailableError: the ``serve`` extra is not installed.
        FghError: the index or engine cannot be opened, or they do not match.
    """
    return _import_http().build_app(index, None if engine is None else Path(engine), device=device,
                                    allow_other_gpu=allow_other_gpu, options=options or ServeOptions())


def serve(index: str | os.PathLike[str], engine: str | os.PathLike[str] | None = None, *, host: str = "127.0.0.1",
          port: int = 8000, device: str = "auto", allow_other_gpu: bool = False, options: ServeOptions | None = None,
          shutdown_timeout_s: float = 30.0, access_log: bool = False) -> None:
    """Run ``fgh serve`` in the foreground until SIGINT/SIGTERM (then in-flight requests finish first).

    Args:
        host: the address to bind (loopback by default; anything else without a token is warned about).
        port: the TCP port.
        shutdown_timeout_s: how long a graceful shutdown waits for in-flight requests.
        access_log: log one line per request.
        Others: see :func:`create_app`.
    """
    app = create_app(index, engine, device=device, allow_other_gpu=allow_other_gpu, options=options)
    import uvicorn

    service = app.state.service
    shown_host = f"[{host}]" if ":" in host else host
    log.info("fgh serve: %s (%d rows, %d bits) with %s on %s, batches of up to %d; search page at http://%s:%d/",
             display_path(str(index)), len(service.index.current), service.engine.bits, service.engine.shown_path,
             engine_provider(service.engine), service.options.max_batch, shown_host, port)
    if not is_loopback(host) and service.options.token is None:
        log.warning("WARNING: listening on %s without a token: anyone who can reach it can search the index and "
                    "read its images (set --token or %s)", host, TOKEN_ENV)
    # log_config=None: uvicorn's lines go through fgh's handler on stderr, not its own setup.
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout_s, server_header=False)
    uvicorn.Server(config).run()
