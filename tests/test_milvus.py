"""Codes in Milvus: naming, exact search, sharded and killed encodes, push/pull, one-line errors.

Milvus runs as Milvus Lite (``milvus-lite==2.5.1``, the ``milvus`` extra): once as a server on a
loopback port, which several worker processes can write to at once, and once as a ``.db`` file
opened in this process. Tests that need it skip, saying why, where it cannot be imported.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from html import escape as html_escape
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CUB100

import fgh_deploy as fgh
import fgh_deploy.milvus_index as milvus_index
from fgh_deploy.demo_data import generate_demo_dataset
from fgh_deploy.encode import encode_folder
from fgh_deploy.engines import load_engine
from fgh_deploy.errors import FghError
from fgh_deploy.index import CodeIndex
from fgh_deploy.index_uri import MilvusLocation, parse_index_name
from fgh_deploy.milvus_index import MilvusIndex, in_shard, parse_shard, path_key, pull_index, push_index
from fgh_deploy.query import open_index, search_images
from fgh_deploy.search import HammingSearcher

# ------------------------------------------------------------ names (no Milvus needed)


def test_index_names() -> None:
    assert parse_index_name("runs/idx") == Path("runs/idx")
    assert parse_index_name(Path("a.db#x")) == Path("a.db#x")  # a Path is always a folder
    assert parse_index_name("milvus://db.example:19531/birds") == MilvusLocation(
        "milvus://db.example:19531/birds", "http://db.example:19531", "birds")
    assert parse_index_name("milvus+https://db.example/birds").uri == "https://db.example:19530"
    lite = parse_index_name("data/codes.db#birds_v2")
    assert lite == MilvusLocation("data/codes.db#birds_v2", "data/codes.db", "birds_v2") and lite.is_lite
    assert parse_index_name("folder#with-hash") == Path("folder#with-hash")  # not .db: a folder
    for bad in ("milvus://host", "milvus:///birds", "milvus://host/2birds", "milvus+grpc://host/x",
                "milvus://host:99999/x", "x.db#bad-name"):
        with pytest.raises(FghError) as info:
            parse_index_name(bad)
        assert "\n" not in str(info.value)


def test_shards_split_every_path_once() -> None:
    assert parse_shard("2/4") == (2, 4)
    for bad in ("0/4", "5/4", "4", "a/b", "1/0"):
        with pytest.raises(FghError, match="K/N"):
            parse_shard(bad)
    paths = [f"species_{i % 7}/{i:05d}.jpg" for i in range(2000)]
    owners = [[k for k in range(1, 5) if in_shard(p, (k, 4))] for p in paths]
    assert all(len(o) == 1 for o in owners)
    assert min(sum(o == [k] for o in owners) for k in range(1, 5)) > 400  # roughly even


# ----------------------------------------------------------------------- Milvus Lite


@pytest.fixture(scope="module")
def lite_server(tmp_path_factory) -> str:
    """A Milvus Lite server on a free loopback port: ``http://127.0.0.1:PORT``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # milvus-lite 2.5.1 imports the deprecated pkg_resources
        server_module = pytest.importorskip(
            "milvus_lite.server", reason="milvus-lite 2.5.1 (pip install 'fgh[milvus]') is not installable here")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_module.Server(str(tmp_path_factory.mktemp("milvus") / "server.db"), f"127.0.0.1:{port}")
    assert server.init() and server.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    yield f"milvus://127.0.0.1:{port}"
    server.stop()


def _checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return fgh.save_checkpoint(fgh.build_model("adsh", 24, backbone="resnet18", input_size=64), path)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "adsh24.pt", seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """24 real bird photos in 3 species folders; 24 demo-dataset JPEGs where the real data is absent.

    Not skipped without the real data: these tests are what shows Milvus works at all.
    """
    root = tmp_path_factory.mktemp("birds") / "images"
    if not CUB100.is_dir():
        generate_demo_dataset(root, classes=3, per_class=8, size=96)
        for extra in ("splits.tsv", "README.txt"):
            (root / extra).unlink()
        return root
    for species in sorted(p for p in CUB100.iterdir() if p.is_dir())[:3]:
        (root / species.name).mkdir(parents=True)
        for src in sorted(species.glob("*.jpg"))[:8]:
            shutil.copy(src, root / species.name / src.name)
    return root


@pytest.fixture(scope="module")
def local_index(folder: Path, model_path: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "idx"
    _encode(folder, model_path, out)
    return out


def _encode(folder: Path, model: Path, out: str | Path, **kwargs):
    with load_engine(model, device="cpu") as engine:
        return encode_folder(folder, engine, out, progress=False, workers=0, **kwargs)


def _rows(name: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    location = parse_index_name(name)
    with MilvusIndex.open(location) as index:
        return index.all_rows()


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from fgh_deploy.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout)


def _hits(payload: dict) -> list[list[tuple[int, str]]]:
    return [[(h["distance"], h["path"]) for h in q["results"]] for q in payload["queries"]]


def test_lite_file_and_local_index_give_the_same_codes_and_results(
        folder: Path, model_path: Path, local_index: Path, tmp_path: Path, lite_server: str) -> None:
    lite = f"{tmp_path / 'codes.db'}#birds"
    summary = _encode(folder, model_path, lite)
    assert summary.encoded == 24 and summary.index == lite
    codes, paths, stats = _rows(lite)
    with CodeIndex.open(local_index) as local:
        assert paths == local.all_paths()
        assert np.array_equal(codes, local.codes) and np.array_equal(stats, local.stats)
    queries = sorted(folder.glob("*/*.jpg"))[::5]
    with open_index(lite) as milvus, CodeIndex.open(local_index) as local, load_engine(model_path) as engine:
        for k in (1, 5, 24, 100):
            a = search_images(milvus, engine, queries, top_k=k)
            b = search_images(local, engine, queries, top_k=k)
            assert [[(h.distance, h.path) for h in r.hits] for r in a] == \
                   [[(h.distance, h.path) for h in r.hits] for r in b]
        a = search_images(milvus, engine, queries, top_k=24, radius=10)
        b = search_images(local, engine, queries, top_k=24, radius=10)
        assert [[(h.distance, h.path) for h in r.hits] for r in a] == [[(h.distance, h.path) for h in r.hits] for r in b]
    # fgh query --json against a Milvus server and the local folder: the same hits, same order.
    served = f"{lite_server}/birds_cli"
    push_index(local_index, parse_index_name(served))
    query_args = [*map(str, queries[:3]), "--top-k", "7", "--json"]
    from_milvus = _cli("query", *query_args, "--index", served)
    from_local = _cli("query", *query_args, "--index", str(local_index))
    assert from_milvus.returncode == 0 and from_local.returncode == 0, from_milvus.stderr + from_local.stderr
    milvus_json, local_json = json.loads(from_milvus.stdout), json.loads(from_local.stdout)
    assert _hits(milvus_json) == _hits(local_json) and len(_hits(local_json)[0]) == 7
    assert milvus_json["tie_rule"] == "distance, then path" and milvus_json["ntotal"] == 24
    assert "approximate" not in milvus_json


def test_four_shards_in_four_processes_equal_one_run(folder: Path, model_path: Path, lite_server: str) -> None:
    whole, sharded = f"{lite_server}/whole", f"{lite_server}/sharded"
    _encode(folder, model_path, whole)
    workers = [subprocess.Popen([sys.executable, "-c", "from fgh_deploy.cli import main; main()", "encode",
                                 str(folder), "-m", str(model_path), "--out", sharded, "--shard", f"{k}/4",
                                 "--workers", "0", "--device", "cpu", "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(1, 5)]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err for _, err in outputs]
    encoded = [json.loads(out)["encoded"] for out, _ in outputs]
    assert sum(encoded) == 24 and all(n < 24 for n in encoded)
    a, b = _rows(whole), _rows(sharded)
    assert a[1] == b[1] and np.array_equal(a[0], b[0]) and np.array_equal(a[2], b[2])
    # A finished shard is skipped on a rerun.
    assert _encode(folder, model_path, sharded, shard=(1, 4)).encoded == 0


def test_kill_9_mid_insert_then_rerun_leaves_no_duplicate_and_no_gap(
        folder: Path, model_path: Path, local_index: Path, lite_server: str) -> None:
    name = f"{lite_server}/killed"
    worker = subprocess.Popen([sys.executable, "-c", "from fgh_deploy.cli import main; main()", "encode",
                               str(folder), "-m", str(model_path), "--out", name, "--batch-size", "1",
                               "--workers", "0", "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    location = parse_index_name(name)
    try:
        deadline = time.monotonic() + 120
        rows = 0
        while time.monotonic() < deadline and worker.poll() is None:
            if MilvusIndex.exists(location):
                with MilvusIndex.open(location) as index:
                    rows = len(index)
                if rows >= 3:
                    break
            time.sleep(0.02)
        worker.send_signal(signal.SIGKILL)
    finally:
        worker.wait(timeout=60)
    assert worker.returncode == -signal.SIGKILL and 3 <= rows < 24, f"killed at {rows} rows"
    summary = _encode(folder, model_path, name)
    assert summary.reused >= rows and summary.encoded == 24 - summary.reused
    with MilvusIndex.open(location) as index:
        assert len(index) == 24
        codes, paths, _ = index.all_rows()
    assert paths == sorted(str(p.relative_to(folder)) for p in folder.glob("*/*.jpg"))
    with CodeIndex.open(local_index) as reference:
        assert np.array_equal(codes, reference.codes)


def test_push_then_pull_round_trips_bit_for_bit(local_index: Path, lite_server: str, tmp_path: Path) -> None:
    name = f"{lite_server}/round_trip"
    push_index(local_index, parse_index_name(name))
    push_index(local_index, parse_index_name(name))  # a rerun upserts: still one row per image
    pulled = tmp_path / "pulled"
    assert pull_index(parse_index_name(name), pulled) == 24
    for kind in ("codes", "paths", "offsets", "stats"):
        assert (pulled / f"{kind}.0.bin").read_bytes() == (local_index / f"{kind}.0.bin").read_bytes(), kind
    with CodeIndex.open(pulled) as a, CodeIndex.open(local_index) as b:
        assert (a.bits, a.fingerprint, a.model, a.preprocess, a.engine, a.root) == \
               (b.bits, b.fingerprint, b.model, b.preprocess, b.engine, b.root)


def test_append_replaces_stored_paths_and_rows_stored_twice_are_repaired(lite_server: str) -> None:
    location = parse_index_name(f"{lite_server}/replace")
    meta = dict(bits=16, fingerprint="f" * 64, model={}, preprocess={}, engine={}, root="/")
    with MilvusIndex.open_or_create(location, **meta) as index:
        index.append(np.array([[1, 0], [2, 0], [3, 0]], np.uint8), ["a.jpg", "b.jpg", "c.jpg"],
                     np.zeros((3, 2), np.int64))
        index.append(np.array([[255, 255], [4, 0]], np.uint8), ["b.jpg", "d.jpg"], np.ones((2, 2), np.int64))
        codes, paths, stats = index.all_rows()
        assert paths == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"] and len(index) == 4
        assert codes.tolist() == [[1, 0], [255, 255], [3, 0], [4, 0]] and stats[:, 0].tolist() == [0, 1, 0, 1]
    # What two writers of the same new paths at the same moment can leave (Milvus Lite does not
    # order concurrent upserts): every row stored twice. Searches come back short until repaired.
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (2000, 2), dtype=np.uint8)
    paths = [f"n/{i:04d}.jpg" for i in range(2000)]
    rows = [{"id": path_key(p), "path": p, "size": 0, "mtime_ns": 0, "code": c.tobytes()} for p, c in zip(paths, codes)]
    with MilvusIndex.open(location) as index:
        for copy in range(2):
            index._client.insert(location.collection, rows[:1000] if copy else rows)
        assert len(index) == 3004
        _, keys = index.search(np.array([[0, 0]], np.uint8), 2004)
        assert (keys < 0).any()  # fewer hits than rows
        assert index.repair_duplicates(2004) >= 1000
        assert len(index) == 2004 and index.repair_duplicates(2004) == 0
        _, keys = index.search(np.array([[0, 0]], np.uint8), 2004)
        assert (keys >= 0).all() and len(set(index.paths(keys[0]))) == 2004


def test_encode_repairs_rows_stored_twice(folder: Path, model_path: Path, lite_server: str, caplog) -> None:
    name = f"{lite_server}/twice"
    _encode(folder, model_path, name)
    location = parse_index_name(name)
    with MilvusIndex.open(location) as index:
        reference = index.all_rows()
        doubled = [row for batch in index._batches("", ["id", "path", "size", "mtime_ns", "code"]) for row in batch][:9]
        index._client.insert(location.collection, [{**r, "code": milvus_index._vector_bytes(r["code"])} for r in doubled])
        assert len(index) == 33
    with caplog.at_level("WARNING", logger="fgh_deploy.encode"):
        assert _encode(folder, model_path, name).encoded == 0
    assert "9 image(s) were stored more than once" in caplog.text
    with MilvusIndex.open(location) as index:
        assert len(index) == 24
        rows = index.all_rows()
    assert rows[1] == reference[1] and np.array_equal(rows[0], reference[0]) and np.array_equal(rows[2], reference[2])


def test_exact_search_past_milvus_limit_matches_brute_force(lite_server: str, monkeypatch) -> None:
    """Random 12-bit codes, so every distance holds hundreds of ties; a small limit forces range windows."""
    monkeypatch.setattr(milvus_index, "MILVUS_MAX_LIMIT", 64)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (3000, 2), dtype=np.uint8)
    codes[:, 1] &= 0x0F
    paths = [f"img/{i:05d}.jpg" for i in rng.permutation(3000)]  # path order is not insertion order
    location = parse_index_name(f"{lite_server}/random12")
    with MilvusIndex.open_or_create(location, bits=12, fingerprint="0" * 64, model={}, preprocess={},
                                    engine={}, root="/") as index:
        index.append(codes, paths, np.zeros((3000, 2), np.int64))
        order = np.argsort([os.fsencode(p) for p in paths], kind="stable")
        reference = HammingSearcher(codes[order])  # database order = path order: Milvus's tie rule
        queries = codes[:4]
        for k in (1, 10, 300):
            distances, ids = index.search(queries, k)
            want_d, want_rows = reference.search(queries, k)
            assert np.array_equal(distances, want_d)
            assert [index.paths(row) for row in ids] == [[paths[order[r]] for r in row] for row in want_rows]
        lims, distances, ids = index.range_search(queries, 4)
        want_lims, want_d, want_rows = reference.range_search(queries, 4)
        assert np.array_equal(lims, want_lims) and np.array_equal(distances, want_d)
        assert index.paths(ids) == [paths[order[r]] for r in want_rows]
        assert index.search(queries[:1], 4000)[1][0, 3000:].tolist() == [-1] * 1000


def test_wrong_length_code_model_mismatch_and_unreachable_server_are_one_line_errors(
        folder: Path, model_path: Path, lite_server: str, tmp_path: Path, monkeypatch) -> None:
    name = f"{lite_server}/errors"
    location = parse_index_name(name)
    with MilvusIndex.open_or_create(location, bits=24, fingerprint="1" * 64, model={}, preprocess={},
                                    engine={}, root="/") as index:
        for wrong in (np.zeros((2, 2), np.uint8), np.zeros((2, 4), np.uint8), np.zeros((2, 3), np.int64)):
            with pytest.raises(FghError, match="codes must be uint8") as info:
                index.append(wrong, ["a.jpg", "b.jpg"], np.zeros((2, 2), np.int64))
            assert "\n" not in str(info.value)
        assert len(index) == 0
    with pytest.raises(FghError, match="built with model 111111111111 at 24 bits") as info:
        _encode(folder, model_path, name)
    assert "\n" not in str(info.value)
    other = _checkpoint(tmp_path / "other.pt", seed=1)
    sharded = f"{lite_server}/sharded_mismatch"
    _encode(folder, model_path, sharded, shard=(1, 4))
    with pytest.raises(FghError, match="built with model"):
        _encode(folder, other, sharded, shard=(2, 4))
    monkeypatch.setattr(milvus_index, "CONNECT_TIMEOUT_S", 1.0)
    with pytest.raises(FghError, match="connecting to http://127.0.0.1:1 failed") as info:
        open_index("milvus://127.0.0.1:1/birds")
    assert "\n" not in str(info.value)
    result = _cli("encode", str(folder), "-m", str(model_path), "--out", str(tmp_path / "local"), "--shard", "1/2")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "needs a Milvus index" in result.stderr
    # Milvus Lite would create the collection and then fail on the index: refused before either.
    lite = f"{tmp_path / 'ivf.db'}#ivf"
    result = _cli("encode", str(folder), "-m", str(model_path), "--out", lite, "--milvus-index", "bin_ivf_flat",
                  "--device", "cpu", "--workers", "0")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "bin_flat only" in result.stderr
    assert not MilvusIndex.exists(parse_index_name(lite))
    # A failing Milvus call is one line too (pymilvus logs each failure with its traceback).
    from pymilvus import DataType, MilvusClient

    client = MilvusClient(parse_index_name(f"{lite_server}/x").uri)
    # fgh's metadata, so the collection opens; the model's own, so the query goes as far as searching.
    description = client.describe_collection("sharded_mismatch")["description"]
    schema = MilvusClient.create_schema(auto_id=False, description=description)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("code", DataType.BINARY_VECTOR, dim=24)
    client.create_collection("no_index", schema=schema)  # no vector index: Milvus cannot search it
    client.close()
    result = _cli("query", str(next(folder.glob("*/*.jpg"))), "-m", str(model_path), "--index",
                  f"{lite_server}/no_index")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "no_index: searching failed: " in result.stderr


def test_reads_reconnect_once_after_the_connection_is_lost(local_index: Path, lite_server: str) -> None:
    """A dropped client (Milvus Lite's server drops idle ones after ~2 minutes) costs one reconnect, not an error."""
    name = f"{lite_server}/reconnect"
    push_index(local_index, parse_index_name(name))
    with CodeIndex.open(local_index) as local, open_index(name) as index:
        query = np.asarray(local.codes[:2])
        want = index.search(query, 5)
        index._client.close()  # what the server's GOAWAY leaves behind: a client that cannot call
        got = index.search(query, 5)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        key = int(got[1][0, 0])
        index._client.close()
        assert index.path_of_key(key) == index.paths([key])[0] and len(index) == 24
        assert index.path_of_key(12345) is None and index.path_of_key(-1) is None


def test_fgh_serve_searches_a_milvus_index_like_fgh_query(
        folder: Path, local_index: Path, lite_server: str, tmp_path: Path) -> None:
    import http.client

    pytest.importorskip("fastapi", reason="fgh serve needs the serve extra: pip install '.[serve]'")
    name = f"{lite_server}/served"
    push_index(local_index, parse_index_name(name))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def request(method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.request(method, path, body=body)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-c", "from fgh_deploy.cli import main; main()", "serve",
                                   "--index", name, "--port", str(port), "--device", "cpu"],
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                status, body = request("GET", "/readyz")
                if status == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        ready = json.loads(body)["index"]
        assert ready["backend"] == "milvus" and ready["rows"] == 24 and ready["reloads"] == 0
        query = sorted(folder.glob("*/*.jpg"))[3]
        expected = _cli("query", str(query), "--top-k", "7", "--json", "--index", name)
        assert expected.returncode == 0, expected.stderr
        want = json.loads(expected.stdout)
        status, body = request("POST", f"/search?k=7&name={query.name}", query.read_bytes())
        assert status == 200, body
        got = json.loads(body)
        assert got["queries"] == [{"query": query.name, "results": want["queries"][0]["results"]}]
        assert {k: v for k, v in got.items() if k != "queries"} == {k: v for k, v in want.items() if k != "queries"}
        assert got["index"] == name and len(got["queries"][0]["results"]) == 7
        hit = got["queries"][0]["results"][2]
        assert request("GET", f"/images/{hit['row']}") == (200, (folder / hit["path"]).read_bytes())
        assert request("GET", "/images/12345")[0] == 404 and request("GET", "/images/-1")[0] == 404
        assert "(distance, then path)" in request("GET", "/")[1].decode()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    assert "Traceback" not in log.read_text(), log.read_text()


def test_fgh_bench_serve_loads_a_server_over_a_milvus_lite_file(local_index: Path, tmp_path: Path) -> None:
    pytest.importorskip("fastapi", reason="fgh serve needs the serve extra: pip install '.[serve]'")
    push_index(local_index, parse_index_name(f"{tmp_path / 'bench.db'}#birds"))
    with open_index(f"{tmp_path / 'bench.db'}#birds") as index, CodeIndex.open(local_index) as local:
        assert index.sample_paths(100) == local.all_paths() == local.sample_paths(100)
        assert local.sample_paths(3) == local.paths([0, 11, 23]) and len(index.sample_paths(5)) == 5
    # A relative Lite name, from the folder that holds it: the server starts elsewhere.
    result = subprocess.run([sys.executable, "-c", "from fgh_deploy.cli import main; main()", "bench", "serve",
                             "--index", "bench.db#birds", "--clients", "2", "--seconds", "1", "--json"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["queries"] == 24 and report["index"] == "bench.db#birds"
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in report["results"])


def test_fgh_query_html_report_over_milvus(folder: Path, local_index: Path, lite_server: str, tmp_path: Path) -> None:
    name = f"{lite_server}/report"
    push_index(local_index, parse_index_name(name))
    query = sorted(folder.glob("*/*.jpg"))[5]
    result = _cli("query", str(query), "--top-k", "4", "--index", name, "--html", str(tmp_path / "r.html"), "--json")
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "r.html").read_text()
    hits = json.loads(result.stdout)["queries"][0]["results"]
    assert all(html_escape(hit["path"]) in page for hit in hits) and page.count("<figure") >= 5
    assert "distance, then path" in page and "fgh index pull" in page and name in page


def test_fgh_eval_index_gives_the_same_numbers_for_milvus_and_the_local_index(
        folder: Path, local_index: Path, lite_server: str) -> None:
    from fgh_deploy.train.evaluate import evaluate_index
    from fgh_deploy.train.metrics import mean_average_precision, precision_at_k

    name = f"{lite_server}/evaluated"
    push_index(local_index, parse_index_name(name))
    local = evaluate_index(local_index, queries=24, topks=(5, 100), device="cpu")
    result = _cli("eval", "--index", name, "--queries", "24", "--top-k", "5", "--top-k", "100", "--device", "cpu",
                  "--json")
    assert result.returncode == 0, result.stderr
    remote = json.loads(result.stdout)
    assert local["tie_rule"] != remote["tie_rule"]  # database order vs path: the same order here
    for key in ("map@5", "precision@5", "map@100", "precision@100", "chance_precision", "self_at_distance_0",
                "queries", "classes", "database"):
        assert local[key] == pytest.approx(remote[key], abs=1e-12), key
    assert local["queries"] == 24 and local["classes"] == 3 and local["self_at_distance_0"] == 1.0
    assert local["chance_precision"] == pytest.approx(7 / 23)
    # Leave-one-out by brute force on the stored codes (the engine reproduces them: own code at d = 0).
    with CodeIndex.open(local_index) as index:
        codes = np.asarray(index.codes)
        labels = np.unique([p.split("/")[0] for p in index.all_paths()], return_inverse=True)[1]
    for k, cutoff in ((5, 5), (100, 23)):
        others = [np.arange(24) != i for i in range(24)]
        want_map = np.mean([mean_average_precision(codes[i:i + 1], labels[i:i + 1], codes[o], labels[o], topk=k)
                            for i, o in enumerate(others)])
        want_p = np.mean([precision_at_k(codes[i:i + 1], labels[i:i + 1], codes[o], labels[o], k=k)
                          for i, o in enumerate(others)])
        assert local[f"map@{k}"] == pytest.approx(want_map, abs=1e-12) and cutoff <= k
        assert local[f"precision@{k}"] == pytest.approx(want_p, abs=1e-12)
    flat = _cli("eval", "--index", str(local_index), "--data", str(folder))
    assert flat.returncode == 1 and flat.stderr.count("\n") == 1 and "brings its own images" in flat.stderr
