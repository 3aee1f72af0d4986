"""The HTTP layer of ``fgh serve`` (FastAPI); see :mod:`fgh_deploy.serve` for the machinery.

Routes (``{…}`` JSON is the document of ``fgh query --json``, :func:`fgh_deploy.query.results_json`):

* ``POST /search?k=&radius=&name=`` — one image, as the raw body or a multipart file → ``{…}``;
* ``POST /search/batch?k=&radius=`` — several images as multipart files → ``{…}``, one query each;
* ``POST /search/codes?k=&radius=`` — ``{"codes": ["<hex>", …]}`` packed codes → ``{…}``;
* ``GET /images/{row}?size=`` — the image of an index row (a JPEG thumbnail with ``size``);
* ``GET /healthz``, ``GET /readyz``, ``GET /metrics``, ``GET /`` (the search page).

Status codes: 400 an undecodable image (the one-line reason ``fgh encode`` gives) or a bad
body, 401 a missing or wrong bearer token, 404 a row not in the index, 408 a body not received
within the request timeout, 413 a body over the upload limit, 422 a parameter out of bounds,
504 no answer within the request timeout.
"""

from __future__ import annotations

import asyncio
import binascii
import hmac
import json
import logging
import mimetypes
import os
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fgh_deploy.engines import load_engine

from .errors import FghError
from .images import ImageDecodeError, has_image_extension, load_image
from .index_uri import SearchIndex
from .query import QueryResult, default_engine_path, open_index, results_json, search_codes
from .report import thumbnail_jpeg
from .service import DynamicBatcher, LiveIndex, Metrics, ServeOptions, batch_padding, engine_provider
from .serve_page import page_html
from .version import __version__

_T = TypeVar("_T")

log = logging.getLogger(__name__)

#: Thumbnail sizes ``GET /images/{row}?size=`` accepts, in pixels.
THUMB_SIZES = (16, 1024)


class _Service:
    """What the routes share: the engine, the live index, the batcher, the thread pool, the metrics."""

    def __init__(self, index: str | os.PathLike[str], engine: Path | None, *, device: str, allow_other_gpu: bool,
                 options: ServeOptions) -> None:
        self.options = options
        with open_index(index, verify=False) as probe:
            engine_path = engine or default_engine_path(probe)
        self.engine = load_engine(engine_path, device=device, allow_other_gpu=allow_other_gpu)
        try:
            self.index = LiveIndex(index, self.engine, search_device=options.search_device)
        except BaseException:
            self.engine.close()
            raise
        self.index_name = str(index)
        self.metrics = Metrics(options.max_batch)
        self.batcher = DynamicBatcher(self.engine, max_batch=options.max_batch, max_wait_ms=options.max_wait_ms,
                                      pad_to=batch_padding(self.engine, options.max_batch),
                                      on_batch=self.metrics.observe_batch)
        self.pool: ThreadPoolExecutor | None = None
        self.started = False

    def start(self) -> None:
        threads = self.options.decode_threads or min(4, os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="fgh-decode")
        self.batcher.start()
        self.started = True

    def close(self) -> None:
        self.started = False
        self.batcher.close()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.engine.close()

    async def in_thread(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` in the decoding threads (never on the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def watch_index(self) -> None:
        """Check the index for a new commit every ``reload_seconds`` (the reload runs in a thread); Milvus: nothing to watch."""
        while self.index.watched:
            await asyncio.sleep(self.options.reload_seconds)
            try:
                await asyncio.to_thread(self.index.refresh)
            except Exception:  # a bug: logged with its traceback, and the last good index keeps serving
                log.exception("%s: reloading the index failed", self.index_name)


def _decode_upload(name: str, data: bytes, preprocess: Any) -> torch.Tensor:
    """Pixels of an uploaded image, decoded exactly as ``fgh encode`` and ``fgh query`` decode files."""
    suffix = PurePosixPath(name).suffix if has_image_extension(name) else ""
    # load_image reads files (its checks and one-line reasons come with it); an upload is one briefly.
    with tempfile.NamedTemporaryFile(prefix="fgh-upload-", suffix=suffix) as f:
        f.write(data)
        f.flush()
        try:
            return load_image(f.name, preprocess)
        except ImageDecodeError as exc:
            raise HTTPException(400, f"{name}: {exc.reason}") from None


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


class _ObserveRequests:
    """ASGI middleware: counts and times every HTTP request by its route template (``/images/{row}``)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the app fails before answering

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            # The router stores the matched route in the scope; unmatched paths share one label.
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe_request(route, status, time.perf_counter() - started)


def build_app(index: str | os.PathLike[str], engine: Path | None, *, device: str, allow_other_gpu: bool,
              options: ServeOptions) -> FastAPI:
    """See :func:`fgh_deploy.serve.create_app`."""
    service = _Service(index, engine, device=device, allow_other_gpu=allow_other_gpu, options=options)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        watcher = asyncio.create_task(service.watch_index())
        try:
            yield
        finally:
            watcher.cancel()
            await asyncio.to_thread(service.close)

    app = FastAPI(title="fgh serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service
    app.add_middleware(_ObserveRequests, metrics=service.metrics)
    limit = options.max_upload_bytes

    def authorized(request: Request) -> None:
        if options.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), options.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def timed(phase: Awaitable[_T], status: int, what: str) -> _T:
        try:
            return await asyncio.wait_for(phase, options.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(status, f"{what} took longer than {options.request_timeout_s:g} s") from None

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"the body is {int(declared)} bytes; the limit is {limit}")

        async def receive() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():  # a chunked body is counted as it arrives
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"the body is over the limit of {limit} bytes")
                chunks.append(chunk)
            return b"".join(chunks)

        return await timed(receive(), 408, "receiving the request body")

    async def read_images(request: Request, *, many: bool) -> list[tuple[str, bytes]]:
        """(name, bytes) of each uploaded image: multipart files, or the raw body as one image."""
        body = await read_body(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            if many:
                raise HTTPException(400, "send the images as multipart/form-data files")
            return [(request.query_params.get("name") or "upload", body)]
        try:
            form = await MultiPartParser(request.headers, _once(body), max_files=options.max_batch_images).parse()
        except MultiPartException as exc:
            raise HTTPException(400, f"bad multipart body: {exc.message}") from None
        files = [(value.filename or key, await value.read()) for key, value in form.multi_items()
                 if isinstance(value, UploadFile)]
        if not files:
            raise HTTPException(400, "the multipart body holds no file")
        if not many and len(files) > 1:
            raise HTTPException(400, f"{len(files)} files sent; POST /search/batch takes several")
        return files

    def check_radius(radius: int | None, current: SearchIndex) -> None:
        if radius is not None and radius > current.bits:
            raise HTTPException(422, f"radius must be at most {current.bits} (the code length), got {radius}")

    def search(current: SearchIndex, names: list[str], codes: np.ndarray, k: int, radius: int | None) -> dict[str, Any]:
        hits = search_codes(current, codes, top_k=k, radius=radius, device=options.search_device)
        results = [QueryResult(name, h) for name, h in zip(names, hits)]
        return results_json(service.index_name, current, results, top_k=k, radius=radius)

    async def search_uploads(uploads: list[tuple[str, bytes]], k: int, radius: int | None) -> dict[str, Any]:
        current = service.index.current  # one snapshot for the whole request
        check_radius(radius, current)
        preprocess = service.engine.preprocess
        with service.batcher.incoming():  # the engine thread waits for these while they decode
            pixels = await asyncio.gather(*(service.in_thread(_decode_upload, name, data, preprocess)
                                            for name, data in uploads))
            futures = [service.batcher.submit(p) for p in pixels]
        codes = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        return await service.in_thread(search, current, [name for name, _ in uploads], np.stack(codes), k, radius)

    k_query = Query(10, ge=1, le=options.max_k, description="Neighbours per query (the cap with radius).")
    radius_query = Query(None, ge=0, description="All hits within this Hamming distance (capped at k).")

    @app.post("/search", dependencies=[Depends(authorized)])
    async def search_image(request: Request, k: int = k_query, radius: int | None = radius_query) -> JSONResponse:
        uploads = await read_images(request, many=False)
        return JSONResponse(await timed(search_uploads(uploads, k, radius), 504, "the search"))

    @app.post("/search/batch", dependencies=[Depends(authorized)])
    async def search_batch(request: Request, k: int = k_query, radius: int | None = radius_query) -> JSONResponse:
        uploads = await read_images(request, many=True)
        return JSONResponse(await timed(search_uploads(uploads, k, radius), 504, "the search"))

    @app.post("/search/codes", dependencies=[Depends(authorized)])
    async def search_packed(request: Request, k: int = k_query, radius: int | None = radius_query) -> JSONResponse:
        current = service.index.current
        check_radius(radius, current)
        body = await read_body(request)
        try:
            hexes = json.loads(body)["codes"]
            if not isinstance(hexes, list) or not all(isinstance(h, str) for h in hexes):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise HTTPException(422, 'expected a JSON object {"codes": ["<hex>", ...]}') from None
        if not 1 <= len(hexes) <= options.max_batch_images:
            raise HTTPException(422, f"send 1 to {options.max_batch_images} codes, got {len(hexes)}")
        try:
            packed = [binascii.unhexlify(h) for h in hexes]
        except (binascii.Error, ValueError):
            raise HTTPException(422, "codes must be hexadecimal strings") from None
        wrong = next((h for h, p in zip(hexes, packed) if len(p) != current.code_size), None)
        if wrong is not None:
            raise HTTPException(422, f"a {current.bits}-bit code is {current.code_size} bytes "
                                     f"({2 * current.code_size} hex digits), got {len(wrong)} digits")
        codes = np.frombuffer(b"".join(packed), np.uint8).reshape(len(packed), current.code_size)
        return JSONResponse(await timed(service.in_thread(search, current, hexes, codes, k, radius), 504, "the search"))

    @app.get("/images/{row}", dependencies=[Depends(authorized)])
    async def image(row: int, size: int | None = Query(None, ge=THUMB_SIZES[0], le=THUMB_SIZES[1])) -> Response:
        current = service.index.current
        # A row number of a local index, a primary key of a Milvus one (the "row" of search results).
        rel = await service.in_thread(service.index.row_path, current, row)
        if rel is None:
            raise HTTPException(404, f"row {row} is not in the index")
        parts = PurePosixPath(rel.replace(os.sep, "/"))
        # Only the index's own relative paths, under its root; never a path from the request.
        if parts.is_absolute() or ".." in parts.parts:
            raise HTTPException(404, f"row {row} has a path outside the image root")
        path = Path(current.root) / rel
        try:
            if size is not None:
                jpeg = await service.in_thread(thumbnail_jpeg, path, size)
                return Response(jpeg, media_type="image/jpeg")
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise HTTPException(404, f"row {row}: not a regular file")
        except (ImageDecodeError, OSError) as exc:
            reason = exc.reason if isinstance(exc, ImageDecodeError) else (exc.strerror or str(exc))
            raise HTTPException(404, f"row {row}: {reason}") from None
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        live, engine = service.index, service.engine
        current = live.current
        ready = service.started and service.batcher.alive
        try:
            rows: int | None = await asyncio.to_thread(len, current)  # Milvus: a count on its server
            unreachable = None
        except FghError as exc:
            rows, unreachable, ready = None, str(exc), False
        body = {
            "ready": ready,
            "engine": {"kind": engine.kind, "path": str(engine.path), "provider": engine_provider(engine),
                       "bits": engine.bits, "input_size": engine.input_size},
            "index": {"path": service.index_name, "backend": "local" if live.watched else "milvus",
                      "rows": rows, "bits": current.bits,
                      "reload": "on commit" if live.watched else "none (Milvus serves rows as they are inserted)",
                      "reloads": live.reloads, "loaded_at": live.loaded_at,
                      "reload_error": live.reload_error if unreachable is None else unreachable},
            "batching": {"max_batch": options.max_batch, "max_wait_ms": options.max_wait_ms},
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def metrics() -> PlainTextResponse:
        live, engine = service.index, service.engine
        gauges = [
            ("fgh_index_rows", "Rows of the index being served.", {}, await asyncio.to_thread(len, live.current)),
            ("fgh_index_reloads_total", "Times a new commit of the index was loaded.", {}, live.reloads),
            ("fgh_index_reload_failures_total", "Failed reloads (the last good index kept serving); a failure "
                                                "repeated at each poll counts once.", {}, live.reload_failures),
            ("fgh_index_stale", "1 while the last reload failed and an older index is serving.", {},
             int(live.reload_error is not None)),
            ("fgh_engine_info", "The engine serving queries.",
             {"kind": engine.kind, "provider": engine_provider(engine), "path": str(engine.path)}, 1),
            ("fgh_ready", "1 when the engine thread runs and the index is loaded.", {},
             int(service.started and service.batcher.alive)),
        ]
        return PlainTextResponse(service.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html(max_k=options.max_k, token_required=options.token is not None,
                                      tie_rule=service.index.current.tie_rule))

    @app.exception_handler(FghError)
    async def fgh_error(request: Request, exc: FghError) -> JSONResponse:
        # An engine failure on one batch: the request fails, the service goes on.
        return JSONResponse({"detail": str(exc)}, status_code=500)

    return app
