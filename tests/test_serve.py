"""fgh serve end to end: real server processes on loopback, real HTTP, a real browser for the page."""

from __future__ import annotations

import http.client
import io
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
import torch
from PIL import Image

import fgh_deploy as fgh
from fgh_deploy.bench import bench_serve
from fgh_deploy.encode import encode_folder
from fgh_deploy.engines import load_engine
from fgh_deploy.index import MANIFEST, CodeIndex
from fgh_deploy.query import search_codes

pytest.importorskip("fastapi", reason="fgh serve needs the serve extra: pip install '.[serve]'")

BITS = 24
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-pipe"]


def _noise_jpeg(path: Path, seed: int, size: tuple[int, int] = (90, 72)) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``fgh serve`` in a subprocess on a free loopback port."""

    def __init__(self, index: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.log = index.parent / f"serve-{self.port}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fgh_deploy.cli", "serve", "--index", str(index), "--port", str(self.port), *args],
                stdout=log, stderr=subprocess.STDOUT, cwd=index.parent, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 120
        while True:
            try:
                if self.request("GET", "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert self.process.poll() is None, f"fgh serve exited: {self.log.read_text()}"
            assert time.monotonic() < deadline, f"fgh serve not ready: {self.log.read_text()}"
            time.sleep(0.2)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read(), dict(response.getheaders())
        finally:
            conn.close()

    def json(self, method: str, path: str, body: bytes | None = None, **kwargs: Any) -> tuple[int, Any]:
        status, data, _ = self.request(method, path, body, **kwargs)
        return status, json.loads(data)

    def stop(self, *, signalled: bool = False) -> None:
        """SIGTERM (unless ``signalled``), then a graceful shutdown (uvicorn re-raises the signal once done)."""
        if not signalled:
            self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) in (0, -signal.SIGTERM)
        log = self.log.read_text()
        assert "Application shutdown complete" in log and "Traceback" not in log, log


def _multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, dict[str, str]]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A 24-bit random-weight model, an index of 18 noise photos, and ``fgh serve`` over it."""
    tmp = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = fgh.save_checkpoint(fgh.build_model("adsh", BITS, backbone="resnet18", input_size=64), tmp / "m.pt")
    images = tmp / "images"
    for i in range(18):
        _noise_jpeg(images / f"class{i % 3}" / f"{i:02d}.jpg", seed=i)
    with load_engine(model) as engine:
        encode_folder(images, engine, tmp / "idx", progress=False, workers=0)
    server = Server(tmp / "idx", "--max-upload-mb", "1", "--max-wait-ms", "20", "--reload-seconds", "0.2",
                    "--max-k", "50")
    yield {"tmp": tmp, "model": model, "images": images, "index": tmp / "idx", "server": server}
    server.stop()


def _query(server: Server, path: Path, k: int = 5, radius: int | None = None) -> tuple[int, Any]:
    extra = f"&radius={radius}" if radius is not None else ""
    return server.json("POST", f"/search?k={k}{extra}&name={quote(path.name)}", path.read_bytes())


def test_search_equals_fgh_query_json(served) -> None:
    server, images = served["server"], served["images"]
    queries = [images / "class0" / "00.jpg", images / "class2" / "05.jpg", _noise_jpeg(served["tmp"] / "new.jpg", 99)]
    cli = subprocess.run([sys.executable, "-m", "fgh_deploy.cli", "query", *map(str, queries), "--index",
                          str(served["index"]), "-k", "5", "--json"], capture_output=True, check=True, cwd=served["tmp"])
    expected = json.loads(cli.stdout)
    for path, want in zip(queries, expected["queries"]):
        status, got = _query(server, path)
        assert status == 200
        assert {key: got[key] for key in ("schema_version", "bits", "ntotal", "top_k", "radius", "tie_rule")} == {
            key: expected[key] for key in ("schema_version", "bits", "ntotal", "top_k", "radius", "tie_rule")}
        assert got["queries"] == [{"query": path.name, "results": want["results"]}]
        body, headers = _multipart([(path.name, path.read_bytes())])  # the same image as a multipart upload
        assert server.json("POST", "/search?k=5", body, headers=headers) == (200, got)
    body, headers = _multipart([(p.name, p.read_bytes()) for p in queries])
    status, batch = server.json("POST", "/search/batch?k=5", body, headers=headers)
    assert status == 200 and [q["results"] for q in batch["queries"]] == [q["results"] for q in expected["queries"]]
    # Radius search, and packed codes: the same results as the library's search.
    status, within = _query(server, queries[0], k=50, radius=8)
    with CodeIndex.open(served["index"]) as index:
        code = np.asarray(index.codes[3:4])
        assert within["queries"][0]["results"] == [
            vars(h) for h in search_codes(index, np.asarray(index.codes[0:1]), top_k=50, radius=8)[0]]
        status, by_code = server.json("POST", "/search/codes?k=4", json.dumps({"codes": [code.tobytes().hex()]}).encode())
        assert status == 200 and by_code["queries"][0]["results"] == [vars(h) for h in search_codes(index, code, top_k=4)[0]]


def test_200_concurrent_requests_from_16_clients_are_batched(served) -> None:
    server, images = served["server"], served["images"]
    paths = sorted(images.glob("*/*.jpg"))[:8]
    expected = {p.name: _query(server, p)[1] for p in paths}
    metrics_before = _batch_histogram(server)
    answers: list[tuple[str, int, Any]] = []
    lock = threading.Lock()

    def client(slot: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        for turn in range(slot, 200, 16):  # 200 requests over 16 clients
            path = paths[turn % len(paths)]
            conn.request("POST", f"/search?k=5&name={path.name}", body=path.read_bytes())
            response = conn.getresponse()
            with lock:
                answers.append((path.name, response.status, json.loads(response.read())))
        conn.close()

    threads = [threading.Thread(target=client, args=(slot,)) for slot in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 200 and all(status == 200 for _, status, _ in answers)
    assert all(body == expected[name] for name, _, body in answers)  # batching changes no result
    ones, total = (after - before for after, before in zip(_batch_histogram(server), metrics_before))
    assert total < 200 and ones < total, f"{total} engine calls, {ones} of one image"


def _batch_histogram(server: Server) -> tuple[int, int]:
    """(engine calls of one image, all engine calls) from /metrics."""
    status, text, headers = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    values = dict(line.rsplit(" ", 1) for line in text.decode().splitlines() if not line.startswith("#"))
    return int(values['fgh_engine_batch_size_bucket{le="1"}']), int(values["fgh_engine_batch_size_count"])


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_bad_requests_get_their_status_codes(served) -> None:
    server = served["server"]
    photo = (served["images"] / "class0" / "00.jpg").read_bytes()
    big = photo + bytes(2**20)
    assert server.json("POST", "/search", big)[0] == 413  # declared length over --max-upload-mb 1

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield bytes(2**16)

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/search", body=chunked(), encode_chunked=True)
    assert conn.getresponse().status == 413
    conn.close()
    for body, reason in [(b"hello", "upload: not an image (cannot identify image file)"),
                         (b"", "upload: empty file (0 bytes)"),
                         (photo[: len(photo) // 3], "upload: truncated image"),
                         (_png_header_only(20000, 20000), "exceeds the")]:
        status, answer = server.json("POST", "/search", body)
        assert status == 400 and reason in answer["detail"], answer
    assert "decompression bomb" in server.json("POST", "/search", _png_header_only(20000, 20000))[1]["detail"]
    for params in ("k=0", "k=51", "k=abc", "radius=-1", f"radius={BITS + 1}", "radius=x"):
        assert server.json("POST", f"/search?{params}", photo)[0] == 422, params
    assert server.json("POST", "/search/batch", photo)[0] == 400  # several images need multipart
    for body in (b"{}", b"not json", b'{"codes": ["zz0000"]}', b'{"codes": ["00"]}', b'{"codes": []}'):
        assert server.json("POST", "/search/codes", body)[0] == 422, body
    assert server.request("GET", "/search")[0] == 405


def test_images_serves_only_rows_of_the_index(served) -> None:
    server = served["server"]
    with CodeIndex.open(served["index"]) as index:
        rows, first = len(index), index.path_of(0)
    status, data, headers = server.request("GET", "/images/0")
    assert status == 200 and data == (served["images"] / first).read_bytes() and headers["content-type"] == "image/jpeg"
    status, data, headers = server.request("GET", "/images/0?size=32")
    assert status == 200 and headers["content-type"] == "image/jpeg" and max(Image.open(io.BytesIO(data)).size) <= 32
    for path in (f"/images/{rows}", "/images/-1", "/images/..%2F..%2Fetc%2Fpasswd", "/images/../../etc/passwd",
                 "/images/%2Fetc%2Fpasswd", "/images/0/../../m.pt", "/images/1e3"):
        status, data, _ = server.request("GET", path)
        assert status in (404, 422) and b"root:" not in data, path
    assert server.request("GET", "/images/0?size=8")[0] == 422
    assert server.request("GET", "/images/0?size=5000")[0] == 422


def test_health_readiness_and_metrics(served) -> None:
    server = served["server"]
    assert server.json("GET", "/healthz") == (200, {"status": "ok"})
    status, ready = server.json("GET", "/readyz")
    assert status == 200 and ready["ready"] and ready["index"]["rows"] >= 18 and ready["engine"]["kind"] == "pytorch"
    text = server.request("GET", "/metrics")[1].decode()
    for name in ("fgh_http_requests_total{", "fgh_http_request_errors_total{", "fgh_http_request_duration_seconds_bucket{",
                 "fgh_engine_batch_size_count", "fgh_index_rows", 'fgh_engine_info{kind="pytorch",provider="cpu"'):
        assert name in text, name
    status, page, headers = server.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"http://" not in page and b"https://" not in page  # self-contained: no external assets


def _wait_for(server: Server, condition, what: str, seconds: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        ready = server.json("GET", "/readyz")[1]
        if condition(ready):
            return ready
        assert time.monotonic() < deadline, f"{what}: {ready}"
        time.sleep(0.1)


def test_live_index_appends_compactions_and_damage(served) -> None:
    server, images, index_dir = served["server"], served["images"], served["index"]
    rows = server.json("GET", "/readyz")[1]["index"]["rows"]
    added = _noise_jpeg(images / "class9" / "added.jpg", seed=1234)
    with load_engine(served["model"]) as engine:
        encode_folder(images, engine, index_dir, progress=False, workers=0)
    _wait_for(server, lambda r: r["index"]["rows"] == rows + 1, "append not visible")
    status, found = _query(server, added, k=50)
    assert status == 200 and found["ntotal"] == rows + 1
    assert {"path": "class9/added.jpg", "distance": 0} in [{k: h[k] for k in ("path", "distance")}
                                                           for h in found["queries"][0]["results"]]

    manifest = (index_dir / MANIFEST).read_bytes()
    (index_dir / MANIFEST).write_text("{ damaged")
    damaged = _wait_for(server, lambda r: r["index"]["reload_error"] is not None, "damage not reported")
    assert damaged["ready"] and "manifest.json" in damaged["index"]["reload_error"]
    assert "reload failed" in server.log.read_text()
    status, still = _query(server, added, k=50)
    assert status == 200 and still["ntotal"] == rows + 1  # the last good index keeps serving
    (index_dir / MANIFEST).write_bytes(manifest)
    _wait_for(server, lambda r: r["index"]["reload_error"] is None, "repair not picked up")

    added.unlink()  # fgh encode drops its row: a compaction to a new generation
    with load_engine(served["model"]) as engine:
        encode_folder(images, engine, index_dir, progress=False, workers=0)
    _wait_for(server, lambda r: r["index"]["rows"] == rows, "compaction not visible")
    status, after = _query(server, added.parent.parent / "class0" / "00.jpg", k=50)
    assert status == 200 and "class9/added.jpg" not in [h["path"] for h in after["queries"][0]["results"]]


def test_token_timeouts_and_graceful_shutdown(served) -> None:
    server = Server(served["index"], "--timeout", "2", env={"FGH_SERVE_TOKEN": "s3cret"})
    photo = (served["images"] / "class0" / "00.jpg").read_bytes()
    # A client that sends half its body and stalls holds only its own request, which times out.
    slow = socket.create_connection(("127.0.0.1", server.port))
    slow.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nContent-Length: 1000\r\n\r\n" + bytes(10))
    gone = socket.create_connection(("127.0.0.1", server.port))  # and one that disconnects mid-body
    gone.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + bytes(10))
    gone.close()
    started = time.monotonic()
    assert server.request("GET", "/healthz")[0] == 200 and time.monotonic() - started < 1
    slow.settimeout(10)
    assert slow.recv(100).startswith(b"HTTP/1.1 408 ")
    slow.close()
    assert server.request("POST", "/search", photo)[0] == 401
    assert server.request("POST", "/search", photo, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert server.request("GET", "/metrics")[0] == 401 and server.request("GET", "/images/0")[0] == 401
    assert server.request("GET", "/healthz")[0] == 200 and server.request("GET", "/readyz")[0] == 200
    auth = {"Authorization": "Bearer s3cret"}
    assert server.request("POST", "/search", photo, headers=auth)[0] == 200
    # A request in flight when SIGTERM arrives (its body half sent) is still answered.
    in_flight = socket.create_connection(("127.0.0.1", server.port))
    in_flight.sendall(f"POST /search HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                      f"Content-Length: {len(photo)}\r\n\r\n".encode() + photo[: len(photo) // 2])
    time.sleep(0.2)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    in_flight.sendall(photo[len(photo) // 2:])
    in_flight.settimeout(30)
    assert in_flight.recv(100).startswith(b"HTTP/1.1 200 ")
    in_flight.close()
    server.stop(signalled=True)


def test_serve_without_the_extra_is_one_line(served) -> None:
    code = ("import sys; sys.modules['fastapi'] = None; from fgh_deploy.cli import main; "
            "main(['serve', '--index', sys.argv[1]])")
    result = subprocess.run([sys.executable, "-c", code, str(served["index"])], capture_output=True, text=True)
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    assert "pip install 'fgh[serve]'" in result.stderr


def test_bench_serve_starts_batched_and_unbatched_servers(served) -> None:
    result = subprocess.run([sys.executable, "-m", "fgh_deploy.cli", "bench", "serve", "--index", str(served["index"]),
                             "--clients", "3", "--seconds", "1", "--json"], capture_output=True, check=True,
                            cwd=served["tmp"])
    report = json.loads(result.stdout)
    assert [(r["mode"], r["max_batch"], r["clients"]) for r in report["results"]] == [("batched", 16, 3),
                                                                                     ("unbatched", 1, 3)]
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in report["results"])
    assert report["results"][1]["mean_batch_size"] == 1


def test_bench_serve_against_a_running_server(served) -> None:
    server = served["server"]
    report = bench_serve(served["index"], url=f"http://127.0.0.1:{server.port}", clients=(2,), seconds=1)
    (result,) = report["results"]
    assert result["mode"] == "as configured" and result["errors"] == 0 and result["requests"] > 0
    assert result["latency_ms"]["p50"] > 0 and result["mean_batch_size"] >= 1


class _DevTools:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (fd 3 in, fd 4 out)."""

    def __init__(self, chromium: str, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Chromium reads commands from fd 3 and answers on fd 4: a tiny launcher puts the pipes there.
        launcher = ("import os, sys; r, w = map(int, sys.argv[1:3]); os.dup2(r, 100); os.dup2(w, 101); "
                    "os.dup2(100, 3); os.dup2(101, 4); os.execv(sys.argv[3], sys.argv[3:])")
        self.process = subprocess.Popen(
            [sys.executable, "-c", launcher, str(to_browser_r), str(from_browser_w), chromium, *CHROMIUM_FLAGS,
             f"--user-data-dir={profile}"],
            pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._id = 0
        self.session: str | None = None

    def call(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                assert left > 0 and select.select([self._from_browser], [], [], left)[0], f"{method}: no answer"
                chunk = os.read(self._from_browser, 1 << 16)
                assert chunk, "chromium closed the pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, reply
                return reply["result"]

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)["result"].get("value")

    def close(self) -> None:
        os.close(self._to_browser)
        os.close(self._from_browser)
        self.process.kill()
        self.process.wait()


def test_page_in_headless_chromium(served, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run installs it)")
    server, query = served["server"], served["images"] / "class1" / "04.jpg"
    expected = _query(server, query, k=10)[1]["queries"][0]["results"]
    browser = _DevTools(chromium, tmp_path / "profile")
    try:
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        browser.session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        browser.call("Page.navigate", url=f"http://127.0.0.1:{server.port}/")
        deadline = time.monotonic() + 30
        while browser.evaluate("document.readyState") != "complete" or not browser.evaluate("!!document.getElementById('file')"):
            assert time.monotonic() < deadline, "the page did not load"
            time.sleep(0.1)
        root = browser.call("DOM.getDocument")["root"]["nodeId"]
        node = browser.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        browser.call("DOM.setFileInputFiles", files=[str(query)], nodeId=node)
        rows_js = ("[...document.querySelectorAll('.hits li')].map(li => [li.querySelector('.path').textContent, "
                   "li.querySelector('figcaption').textContent, li.querySelector('img').complete && "
                   "li.querySelector('img').naturalWidth > 0])")
        while True:
            rows = browser.evaluate(rows_js) or []
            if len(rows) == len(expected) and all(loaded for _, _, loaded in rows):
                break
            status = browser.evaluate("document.getElementById('status').textContent")
            assert time.monotonic() < deadline + 30, f"results not shown: {rows} (status: {status})"
            time.sleep(0.2)
        assert [path for path, _, _ in rows] == [hit["path"] for hit in expected]
        assert [caption.split(" · ")[0] for _, caption, _ in rows] == [f"#{hit['rank']}" for hit in expected]
        assert [f"d={hit['distance']}" in caption for (_, caption, _), hit in zip(rows, expected)] == [True] * len(rows)
        assert browser.evaluate("document.querySelector('.probe img').naturalWidth") > 0  # the query itself
    finally:
        browser.close()
