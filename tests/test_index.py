"""The on-disk code index: round trips, crash safety under real kill -9, damage, compaction."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fgh_deploy.index as index_module
from fgh_deploy.config import PreprocessConfig
from fgh_deploy.errors import FghError
from fgh_deploy.index import CodeIndex
from fgh_deploy.search import knn_hamming, range_search_hamming

BITS = 100
FP = hashlib.sha256(b"model a").hexdigest()
FP_OTHER = hashlib.sha256(b"model b").hexdigest()
ROOT = os.fsdecode(b"/data/imag\xe9s")  # an undecodable folder name: a surrogate escape
KINDS = ("codes", "paths", "offsets", "stats")


# ---------------------------------------------------------------- test data


def meta(bits: int = BITS) -> dict[str, Any]:
    return {
        "bits": bits,
        "fingerprint": FP,
        "model": {"model": "semicon", "bits": bits, "backbone": "resnet18", "options": {}},
        "preprocess": PreprocessConfig().to_dict(),
        "engine": {"kind": "pytorch", "path": "m.pt", "precision": "fp32"},
        "root": ROOT,
    }


def batch(b: int, bits: int = BITS) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Deterministic batch ``b``: 1–5 rows of codes, non-UTF-8 paths and stats."""
    rng = np.random.default_rng([bits, b])
    n = 1 + (b * 7) % 5
    codes = np.packbits(rng.integers(0, 2, (n, bits), dtype=np.uint8), axis=1, bitorder="little")
    paths = [os.fsdecode(f"d{b % 3}/".encode() + b"\xe9\xff" + f"_{b}_{j}é.jpg".encode()) for j in range(n)]
    stats = np.array([[1000 + 17 * b + j, 1_700_000_000_123_456_789 + 1000 * b + j] for j in range(n)])
    return codes, paths, stats


def expected(batches: range, bits: int = BITS) -> tuple[np.ndarray, list[str], np.ndarray]:
    parts = [batch(b, bits) for b in batches]
    if not parts:
        return np.zeros((0, (bits + 7) // 8), np.uint8), [], np.zeros((0, 2), np.int64)
    return (
        np.concatenate([p[0] for p in parts]),
        [path for p in parts for path in p[1]],
        np.concatenate([p[2] for p in parts]),
    )


def write_batches(path: Path, start: int, stop: int, *, create: bool, bits: int = BITS) -> None:
    """Append and commit batches ``start..stop`` one by one (what the kill -9 victim runs)."""
    index = CodeIndex.create(path, **meta(bits)) if create else CodeIndex.open(path, writable=True)
    with index:
        for b in range(start, stop):
            index.append(*batch(b, bits))
            index.commit()


def committed_batches(path: Path) -> int:
    """Check the index at ``path`` holds exactly batches ``0..c`` for some c, and return c."""
    with CodeIndex.open(path) as index:
        rows = np.cumsum([0] + [len(batch(b)[1]) for b in range(1000)])
        matches = np.flatnonzero(rows == len(index))
        assert matches.size, f"{len(index)} rows is not a whole number of batches"
        c = int(matches[0])
        codes, paths, stats = expected(range(c))
        np.testing.assert_array_equal(index.codes, codes)
        assert index.all_paths() == paths
        np.testing.assert_array_equal(index.stats, stats)
        return c


def data_files(path: Path) -> dict[str, bytes]:
    """The committed data files' bytes, keyed by kind."""
    manifest = json.loads((path / "manifest.json").read_text())
    gen = manifest["generation"]
    return {kind: (path / f"{kind}.{gen}.bin").read_bytes() for kind in KINDS}


def manifest_of(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text())


def err(path: Path, message: str) -> str:
    """A regex matching exactly ``"<path>: <message>"``."""
    return "^" + re.escape(f"{path}: {message}") + "$"


@pytest.fixture
def built(tmp_path: Path) -> Path:
    """An index of batches 0..5, committed."""
    path = tmp_path / "idx"
    write_batches(path, 0, 6, create=True)
    return path


# --------------------------------------------------- kill -9 victim process

# The victim forks from this "zygote", which pays for the fgh/torch import once: a fresh
# interpreter per kill would cost seconds each. A forked child is a real process, killed
# with a real SIGKILL; the zygote reaps it only when told, so its pid stays ours until then.
ZYGOTE = (
    "import importlib.util, sys, types\n"
    # fgh_deploy/__init__ imports the models (torchvision, seconds): the victim needs the index only.
    "package = types.ModuleType('fgh_deploy')\n"
    "package.__path__ = [sys.argv[2]]\n"
    "sys.modules['fgh_deploy'] = package\n"
    "spec = importlib.util.spec_from_file_location('_index_victim', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "module.zygote_main()\n"
)


def zygote_main() -> None:
    """Per stdin job line: fork a victim, print its pid, wait for "reap", print how it ended."""
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                run_victim(job)
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)  # no atexit handlers or inherited buffers in the victim
        print(json.dumps({"pid": pid}), flush=True)
        sys.stdin.readline()  # "reap"
        _, status = os.waitpid(pid, 0)
        signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        print(json.dumps({"signal": signum, "code": os.waitstatus_to_exitcode(status)}), flush=True)
    os._exit(0)  # stdin closed: skip the slow interpreter (torch) teardown


def run_victim(job: dict[str, Any]) -> None:
    if job.get("fault"):
        # SIGKILL ourselves on the n-th call of e.g. os.fsync: a kill at an exact point.
        target, n = job["fault"]
        module_name, attr = target.split(".")
        module = sys.modules[module_name]
        real = getattr(module, attr)
        calls = 0

        def hook(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        setattr(module, attr, hook)
    path = Path(job["path"])
    if job["op"] == "write":
        write_batches(path, job["start"], job["stop"], create=job["create"])
    elif job["op"] == "rebuild":
        with CodeIndex.create(path, **meta(REBUILD_BITS), overwrite=True) as index:
            for b in range(3):
                index.append(*batch(b, REBUILD_BITS))
                index.commit()
    else:
        with CodeIndex.open(path, writable=True) as index:
            index.compact(np.arange(len(index)) % 3 != 1)


class Zygote:
    def __init__(self, proc: subprocess.Popen[bytes], stderr: Path) -> None:
        self.proc = proc
        self.stderr = stderr
        self._buffer = b""

    def run(self, job: dict[str, Any], kill_when: Callable[[], None] | None = None) -> dict[str, Any]:
        """Run ``job`` in a victim; SIGKILL it as soon as ``kill_when()`` returns, if given."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()
        pid = self._read()["pid"]
        if kill_when is not None:
            kill_when()
            os.kill(pid, signal.SIGKILL)  # not reaped yet: pid is still our victim (or its zombie)
        self.proc.stdin.write(b"reap\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(fd, 4096) if ready else b""
            if not chunk:
                pytest.fail(f"victim process gave no answer; its stderr:\n{self.stderr.read_text()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory):
    stderr = tmp_path_factory.mktemp("zygote") / "stderr.txt"
    # The victim runs fgh_deploy from where this process got it (source tree or site-packages).
    package_dir = str(Path(index_module.__file__).resolve().parent)
    with open(stderr, "wb") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, __file__, package_dir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err_file,
        )
    yield Zygote(proc, stderr)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()  # the zygote exits at the end of its input
    proc.wait(timeout=30)
    proc.stdout.close()


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Data files of batches 0..N_BATCHES written in one uninterrupted run."""
    path = tmp_path_factory.mktemp("clean") / "idx"
    write_batches(path, 0, N_BATCHES, create=True)
    return data_files(path)


N_BATCHES = 60
# fsync calls: create makes 4 empty data files, fsyncs the folder, then atomic_write fsyncs
# the manifest and the folder; each commit fsyncs 4 data files, the manifest, the folder.
FSYNCS_CREATE = 7
FSYNCS_PER_COMMIT = 6


def finish_and_compare(path: Path, clean: dict[str, bytes]) -> int:
    """Check the crashed index is a committed prefix, finish it, compare with a clean run."""
    if not (path / "manifest.json").exists():
        # Killed inside create: only fgh's own files may be there, and create may start over.
        assert not path.exists() or all(n == "lock" or n.endswith((".bin", ".tmp")) for n in os.listdir(path))
        write_batches(path, 0, N_BATCHES, create=True)
        assert data_files(path) == clean
        return -1
    c = committed_batches(path)
    write_batches(path, c, N_BATCHES, create=False)
    assert data_files(path) == clean  # byte-identical codes, paths, offsets and stats
    assert sorted(os.listdir(path)) == sorted(["manifest.json", "lock", *(f"{k}.0.bin" for k in KINDS)])
    return c


# ------------------------------------------------------------------- tests


@pytest.mark.parametrize("bits", [12, 100])
def test_round_trip(tmp_path: Path, bits: int) -> None:
    path = tmp_path / "idx"
    index = CodeIndex.create(path, **meta(bits))
    index.append(*batch(0, bits))
    index.append(*batch(1, bits))
    index.commit()
    index.append(*batch(2, bits))
    index.commit()
    assert len(index) == index.ntotal == len(expected(range(3), bits)[1])
    index.close()

    with CodeIndex.open(path) as index:
        codes, paths, stats = expected(range(3), bits)
        assert (index.bits, index.code_size, index.fingerprint, index.root) == (bits, (bits + 7) // 8, FP, ROOT)
        assert index.model == meta(bits)["model"]
        assert PreprocessConfig.from_dict(index.preprocess) == PreprocessConfig()
        assert index.engine == {"kind": "pytorch", "path": "m.pt", "precision": "fp32"}
        assert not index.writable
        np.testing.assert_array_equal(index.codes, codes)
        assert index.codes.dtype == np.uint8 and not index.codes.flags.writeable
        assert index.all_paths() == paths
        assert index.paths([4, 0, len(paths) - 1]) == [paths[4], paths[0], paths[-1]]
        assert index.path_of(3) == paths[3] and "\udce9\udcff" in paths[3]
        np.testing.assert_array_equal(index.stats, stats)
        assert index.stats.dtype == np.int64
        for row in (len(paths), -1):  # -1 is a missing search neighbour, not the last row
            with pytest.raises(IndexError):
                index.path_of(row)
    m = manifest_of(path)
    assert (m["format"], m["format_version"], m["bit_order"], m["ntotal"]) == ("fgh-index", 1, "little", len(paths))
    assert os.path.getsize(path / "codes.0.bin") == len(paths) * ((bits + 7) // 8)
    assert os.path.getsize(path / "stats.0.bin") == 16 * len(paths)
    assert CodeIndex.exists(path) and not CodeIndex.exists(tmp_path)
    with CodeIndex.open(path) as index:
        assert index.nbytes == sum(os.path.getsize(path / f"{k}.0.bin") for k in KINDS)


def test_empty_index(tmp_path: Path) -> None:
    CodeIndex.create(tmp_path / "idx", **meta()).close()
    with CodeIndex.open(tmp_path / "idx") as index:
        assert len(index) == 0 and index.codes.shape == (0, 13) and index.all_paths() == []
        D, I = index.search(batch(0)[0], 3)
        assert (I == -1).all()


def test_uncommitted_rows_are_invisible_and_dropped(built: Path) -> None:
    committed = expected(range(6))
    writer = CodeIndex.open(built, writable=True)
    writer.append(*batch(6))
    assert len(writer) == len(committed[1])  # counted from the commit on
    with CodeIndex.open(built) as reader:
        assert reader.all_paths() == committed[1]
    writer.close()  # discards the appended rows
    assert data_files(built)["codes"] == committed[0].tobytes()

    # A torn append, as a crash leaves it: bytes past the manifest's lengths in every file.
    sizes = {kind: len(data) for kind, data in data_files(built).items()}
    for kind in KINDS:
        with open(built / f"{kind}.0.bin", "ab") as f:
            f.write(b"\x07" * 11)
    with CodeIndex.open(built) as reader:  # read-only: ignored, left alone
        np.testing.assert_array_equal(reader.codes, committed[0])
        assert reader.all_paths() == committed[1]
    assert os.path.getsize(built / "codes.0.bin") == sizes["codes"] + 11
    with CodeIndex.open(built, writable=True) as writer:  # writable: truncated
        assert {k: os.path.getsize(built / f"{k}.0.bin") for k in KINDS} == sizes
        writer.append(*batch(6))
    assert committed_batches(built) == 7


def test_context_manager_commits_or_discards(built: Path) -> None:
    with pytest.raises(RuntimeError):
        with CodeIndex.open(built, writable=True) as index:
            index.append(*batch(6))
            raise RuntimeError("encoder crashed")
    assert committed_batches(built) == 6
    with CodeIndex.open(built, writable=True) as index:
        index.append(*batch(6))
    assert committed_batches(built) == 7


def after_progress(path: Path, batches: int, delay: float) -> Callable[[], None]:
    """Wait until ``batches`` batches are committed at ``path``, then ``delay`` seconds more.

    Progress, not wall time, picks the moment: a loaded machine slows the victim down, and
    a kill that always landed inside create would prove little.
    """
    rows = sum(len(batch(b)[1]) for b in range(batches))

    def wait() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # on timeout the kill goes ahead; the checks catch it
            try:
                if json.loads((path / "manifest.json").read_bytes())["ntotal"] >= rows:
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.0002)
        time.sleep(delay)

    return wait


def test_kill9_at_random_moments(zygote: Zygote, clean_run: dict[str, bytes], tmp_path: Path) -> None:
    rng = random.Random(20240611)
    for trial in range(6):
        path = tmp_path / f"run{trial}"
        start = rng.randrange(1, N_BATCHES - 15)
        # A few ms later the victim is somewhere in the next batches: appending or committing.
        kill_when = after_progress(path, start, rng.uniform(0, 0.004))
        result = zygote.run({"op": "write", "path": str(path), "start": 0, "stop": N_BATCHES, "create": True},
                            kill_when)
        assert result["signal"] == signal.SIGKILL, result
        assert start <= finish_and_compare(path, clean_run) < N_BATCHES


@pytest.mark.parametrize(
    ("fault", "committed"),
    [
        (("os.fsync", 3), -1),  # inside create, before the first manifest
        (("os.replace", 4), 2),  # batch 2's commit: manifest written, not yet renamed
        (("os.fsync", FSYNCS_CREATE + 3 * FSYNCS_PER_COMMIT + 1), 3),  # batch 3's first data fsync
        (("os.fsync", FSYNCS_CREATE + 3 * FSYNCS_PER_COMMIT + 5), 3),  # batch 3's manifest fsync
        (("os.fsync", FSYNCS_CREATE + 3 * FSYNCS_PER_COMMIT + 6), 4),  # after batch 3's rename
        (("zlib.crc32", 4 * 5 + 2), 5),  # mid-append of batch 5: codes and paths written, not offsets
    ],
)
def test_kill9_at_exact_points(
    zygote: Zygote, clean_run: dict[str, bytes], tmp_path: Path, fault: tuple[str, int], committed: int
) -> None:
    path = tmp_path / "idx"
    result = zygote.run({"op": "write", "path": str(path), "start": 0, "stop": N_BATCHES, "create": True,
                         "fault": list(fault)})
    assert result["signal"] == signal.SIGKILL, result
    if fault[0] == "zlib.crc32":  # the torn append is really on disk
        m = manifest_of(path)
        assert os.path.getsize(path / "paths.0.bin") > m["files"]["paths"]["bytes"]
        assert os.path.getsize(path / "offsets.0.bin") == m["files"]["offsets"]["bytes"]
    assert finish_and_compare(path, clean_run) == committed


def test_plan_resume_keeps_unchanged_rows_and_lists_what_to_encode(built: Path) -> None:
    _, paths, stats = expected(range(6))
    listing = {path: (int(size), int(mtime)) for path, (size, mtime) in zip(paths, stats)}
    changed, gone, unreadable = paths[1], paths[2], paths[3]
    listing[changed] = (listing[changed][0] + 1, listing[changed][1])
    del listing[gone]
    listing[unreadable] = (-1, -1)
    listing["new.jpg"] = (5, 6)
    with CodeIndex.open(built) as index:
        plan = index.plan_resume(listing)
    assert plan.keep.dtype == np.bool_
    assert plan.keep.tolist() == [p not in (changed, gone, unreadable) for p in paths]
    assert plan.dropped == 3
    assert plan.encode == [p for p in listing if p in (changed, unreadable, "new.jpg")]
    with CodeIndex.open(built) as index:
        unchanged = index.plan_resume({p: (int(a), int(b)) for p, (a, b) in zip(paths, stats)})
    assert unchanged.keep.all() and unchanged.dropped == 0 and unchanged.encode == []


def test_compact_keeps_rows_in_order(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "_COMPACT_ROWS", 4)  # several chunks, straddling paths
    codes, paths, stats = expected(range(6))
    keep = np.arange(len(paths)) % 3 != 1
    with CodeIndex.open(built, writable=True) as index:
        index.compact(keep)
        np.testing.assert_array_equal(index.codes, codes[keep])
        index.append(*batch(6))
    with CodeIndex.open(built) as index:
        new = expected(range(6, 7))
        np.testing.assert_array_equal(index.codes, np.concatenate([codes[keep], new[0]]))
        assert index.all_paths() == [p for p, k in zip(paths, keep) if k] + new[1]
        np.testing.assert_array_equal(index.stats, np.concatenate([stats[keep], new[2]]))
    assert sorted(os.listdir(built)) == sorted(["manifest.json", "lock", *(f"{k}.1.bin" for k in KINDS)])

    with CodeIndex.open(built, writable=True) as index:
        n = len(index)
        index.remove([0, n - 1])
        assert len(index) == n - 2 and manifest_of(built)["generation"] == 2
        index.compact(np.zeros(len(index), bool))
        assert len(index) == 0 and index.all_paths() == []


def test_leftover_generation_is_ignored_then_removed(built: Path) -> None:
    before = data_files(built)
    for kind in KINDS:  # a compaction killed before its manifest switch
        (built / f"{kind}.1.bin").write_bytes(b"half-written")
    (built / ".manifest.json.x1y2.tmp").write_text("{")
    with CodeIndex.open(built) as index:
        assert len(index) == len(expected(range(6))[1])
    assert (built / "codes.1.bin").exists()  # read-only opens change nothing
    CodeIndex.open(built, writable=True).close()
    assert sorted(os.listdir(built)) == sorted(["manifest.json", "lock", *(f"{k}.0.bin" for k in KINDS)])
    assert data_files(built) == before


@pytest.mark.parametrize(
    ("fault", "switched"),
    [(("os.fsync", 2), False), (("os.replace", 1), False), (("os.unlink", 1), True)],
)
def test_kill9_during_compaction(zygote: Zygote, built: Path, fault: tuple[str, int], switched: bool) -> None:
    codes, paths, _ = expected(range(6))
    keep = np.arange(len(paths)) % 3 != 1
    result = zygote.run({"op": "compact", "path": str(built), "fault": list(fault)})
    assert result["signal"] == signal.SIGKILL, result
    assert {n for n in os.listdir(built) if n.endswith(".bin")} >= {"codes.0.bin", "codes.1.bin"}
    for writable in (False, True):
        with CodeIndex.open(built, writable=writable) as index:
            np.testing.assert_array_equal(index.codes, codes[keep] if switched else codes)
            assert index.all_paths() == ([p for p, k in zip(paths, keep) if k] if switched else paths)
    gen = 1 if switched else 0
    assert sorted(os.listdir(built)) == sorted(["manifest.json", "lock", *(f"{k}.{gen}.bin" for k in KINDS)])


REBUILD_BITS = 12


@pytest.mark.parametrize(
    ("fault", "left", "replaced"),
    [
        # The new index complete, the old one not yet moved aside.
        (("os.rename", 1), [".idx.fgh-rebuild", "idx"], False),
        # Between the renames: no idx at all, the old index aside.
        (("os.rename", 2), [".idx.fgh-rebuild", ".idx.fgh-replaced"], False),
        # Switched; deleting the old index's files, then its folder.
        (("os.unlink", 1), [".idx.fgh-replaced", "idx"], True),
        (("os.rmdir", 1), [".idx.fgh-replaced", "idx"], True),
    ],
)
def test_kill9_during_rebuild(
    zygote: Zygote, built: Path, fault: tuple[str, int], left: list[str], replaced: bool
) -> None:
    result = zygote.run({"op": "rebuild", "path": str(built), "fault": list(fault)})
    assert result["signal"] == signal.SIGKILL, result
    assert sorted(os.listdir(built.parent)) == left
    assert CodeIndex.exists(built)
    CodeIndex.open(built, writable=True).close()  # the next writer puts things in order
    assert sorted(os.listdir(built.parent)) == ["idx"]  # no sibling left
    if replaced:
        codes, paths, stats = expected(range(3), REBUILD_BITS)
        with CodeIndex.open(built) as index:
            assert index.bits == REBUILD_BITS and index.all_paths() == paths
            np.testing.assert_array_equal(index.codes, codes)
    else:
        assert committed_batches(built) == 6


def test_damage_is_reported_precisely(built: Path) -> None:
    good = {name: (built / name).read_bytes() for name in os.listdir(built)}

    def restore() -> None:
        for name, data in good.items():
            (built / name).write_bytes(data)

    codes_size = len(good["codes.0.bin"])
    with open(built / "codes.0.bin", "r+b") as f:
        f.truncate(codes_size - 3)
    for writable in (False, True):
        with pytest.raises(FghError, match=err(built, f"damaged: codes.0.bin is {codes_size - 3} bytes, "
                                                      f"the manifest says {codes_size} (truncated?)")):
            CodeIndex.open(built, writable=writable)
    restore()

    for name in ("codes.0.bin", "paths.0.bin", "stats.0.bin"):
        data = bytearray(good[name])
        data[len(data) // 2] ^= 0x10
        (built / name).write_bytes(data)
        with pytest.raises(FghError, match=err(built, f"damaged: {name} checksum mismatch (edited or corrupt)")):
            CodeIndex.open(built)
        restore()
    data = bytearray(good["codes.0.bin"])
    data[0] ^= 1
    (built / "codes.0.bin").write_bytes(data)
    with CodeIndex.open(built, verify=False) as index:  # verify=False checks sizes only
        assert index.codes[0, 0] == data[0]
    restore()

    (built / "stats.0.bin").unlink()
    with pytest.raises(FghError, match=err(built, "damaged: stats.0.bin is missing")):
        CodeIndex.open(built)
    restore()

    (built / "manifest.json").unlink()
    with pytest.raises(FghError, match=err(built, "not an fgh index (no manifest.json)")):
        CodeIndex.open(built)
    for text in ("{garbled", good["manifest.json"][:40].decode()):
        (built / "manifest.json").write_text(text)
        with pytest.raises(FghError, match="^" + re.escape(f"{built}: manifest.json is not valid JSON (")):
            CodeIndex.open(built)

    manifest = json.loads(good["manifest.json"])
    for change, message in [
        ({"format": "other-tool"}, "not an fgh index (manifest.json has format 'other-tool', not 'fgh-index')"),
        ({"format_version": 2}, "index format 2 is newer than this fgh understands (1); upgrade fgh"),
        ({"bits": None}, "damaged: manifest.json has a bad 'bits': None"),
        ({"ntotal": manifest["ntotal"] + 1}, "damaged: manifest.json is inconsistent: "
         f"{manifest['files']['codes']['bytes']} bytes of codes for {manifest['ntotal'] + 1} rows "
         f"(expected {13 * (manifest['ntotal'] + 1)})"),
    ]:
        (built / "manifest.json").write_text(json.dumps({**manifest, **change}))
        with pytest.raises(FghError, match=err(built, message)):
            CodeIndex.open(built)
    (built / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "root"}))
    with pytest.raises(FghError, match=err(built, "damaged: manifest.json lacks the field 'root'")):
        CodeIndex.open(built)
    restore()
    assert committed_batches(built) == 6

    with pytest.raises(FghError, match=err(built / "nope", "no such index directory")):
        CodeIndex.open(built / "nope")
    with pytest.raises(FghError, match=err(built / "lock", "not a directory")):
        CodeIndex.open(built / "lock")


def test_create_refuses_to_overwrite(built: Path, tmp_path: Path) -> None:
    with pytest.raises(FghError, match=err(built, "already holds an fgh index; replace it with --rebuild "
                                                  "(overwrite=True) or choose another --out")):
        CodeIndex.create(built, **meta())
    assert committed_batches(built) == 6
    (built / "skipped.tsv").write_text("bad.jpg\tnot an image\n")  # an index folder may hold more
    with CodeIndex.create(built, **meta(12), overwrite=True) as index:
        assert len(index) == 0 and index.bits == 12
        index.append(*batch(0, 12))
        index.commit()
        assert committed_batches(built) == 6  # built beside the old index, which stays until the switch
    with CodeIndex.open(built) as index:
        assert len(index) == len(batch(0, 12)[1]) and index.bits == 12
    # The old folder (its skipped.tsv included) went with the old index; no sibling is left.
    assert sorted(os.listdir(built)) == sorted(["manifest.json", "lock", *(f"{k}.0.bin" for k in KINDS)])
    assert sorted(os.listdir(tmp_path)) == ["idx"]

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"jpeg")
    with pytest.raises(FghError, match=err(foreign, "not empty and not an fgh index (holds 'cat.jpg'); "
                                                    "refusing to write into it")):
        CodeIndex.create(foreign, **meta(), overwrite=True)
    assert os.listdir(foreign) == ["cat.jpg"]
    (foreign / "cat.jpg").unlink()
    (foreign / "manifest.json").write_text("{}")  # some other tool's
    with pytest.raises(FghError, match="holds 'manifest.json'"):
        CodeIndex.create(foreign, **meta(), overwrite=True)
    (foreign / "manifest.json").unlink()
    (foreign / "cat.jpg").write_bytes(b"jpeg")
    with pytest.raises(FghError, match=err(foreign / "cat.jpg", "exists and is not a directory")):
        CodeIndex.create(foreign / "cat.jpg", **meta())
    with pytest.raises(FghError, match="fingerprint must be a sha256 hex string"):
        CodeIndex.create(tmp_path / "x", **{**meta(), "fingerprint": "abc"})


def test_append_validates_before_writing(built: Path) -> None:
    codes, paths, stats = batch(6)
    bad_padding = codes.copy()
    bad_padding[0, -1] |= 0x80  # bit 103 of a 100-bit code
    with CodeIndex.open(built, writable=True) as index:
        for args, message in [
            ((codes.astype(np.int8), paths, stats), "codes must be uint8"),
            ((codes[:, :-1], paths, stats), r"codes must be uint8 \(n, 13\)"),
            ((bad_padding, paths, stats), "bits set past bit 100"),
            ((codes, paths[:-1], stats), "paths"),
            ((codes[:1], "one/path.jpg", stats[:1]), "not one string"),
            ((codes[:1], [""], stats[:1]), "empty path"),
            ((codes, paths, stats.astype(float)), "stats must be integer"),
            ((codes, paths, stats[:, :1]), "stats must be integer"),
        ]:
            with pytest.raises(FghError, match=message):
                index.append(*args)
    assert committed_batches(built) == 6
    with CodeIndex.open(built) as reader, pytest.raises(FghError, match="opened read-only; cannot append to it"):
        reader.append(codes, paths, stats)


def test_check_compatible(built: Path) -> None:
    with CodeIndex.open(built) as index:
        index.check_compatible(BITS, FP)
        for bits, fp in [(48, FP), (BITS, FP_OTHER)]:
            message = f"built with model {FP[:12]} at {BITS} bits; this model is {fp[:12]} at {bits} bits"
            with pytest.raises(FghError, match=err(built, message)):
                index.check_compatible(bits, fp)
            with pytest.raises(FghError, match=err(built, message + " — do this")):
                index.check_compatible(bits, fp, hint="do this")


def test_one_writer_at_a_time(built: Path) -> None:
    locked = err(built, f"locked by another fgh encode (pid {os.getpid()})")
    with CodeIndex.open(built, writable=True) as writer:
        writer.append(*batch(6))
        with pytest.raises(FghError, match=locked):
            CodeIndex.open(built, writable=True)
        with pytest.raises(FghError, match=locked):
            CodeIndex.create(built, **meta(), overwrite=True)
        with CodeIndex.open(built) as reader:  # readers never wait
            assert len(reader) == len(expected(range(6))[1])
    with CodeIndex.open(built, writable=True) as writer:  # released on close
        assert len(writer) == len(expected(range(7))[1])


def test_search_matches_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    pool = np.packbits(rng.integers(0, 2, (40, BITS), dtype=np.uint8), axis=1, bitorder="little")
    codes = pool[rng.integers(0, 40, 500)]  # many exact ties
    queries = pool[:7]
    index = CodeIndex.create(tmp_path / "idx", **meta())
    index.append(codes[:300], [f"{i}.jpg" for i in range(300)], np.zeros((300, 2), np.int64))
    index.commit()
    first = index.searcher()
    assert index.searcher() is first and first.ntotal == 300
    index.append(codes[300:], [f"{i}.jpg" for i in range(300, 500)], np.zeros((200, 2), np.int64))
    index.commit()
    assert index.searcher() is not first and index.searcher().ntotal == 500
    index.close()

    with CodeIndex.open(tmp_path / "idx") as index:
        for got, want in zip(index.search(queries, 25), knn_hamming(queries, codes, 25)):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(index.range_search(queries, 30), range_search_hamming(queries, codes, 30)):
            np.testing.assert_array_equal(got, want)
        D, I = index.search(queries[0], 3)
        assert index.paths(I[0]) == [f"{i}.jpg" for i in I[0]]


def test_read_only_open_writes_nothing(built: Path) -> None:
    (built / "lock").unlink()
    before = sorted(os.listdir(built))
    with CodeIndex.open(built) as index:
        index.all_paths()
    assert sorted(os.listdir(built)) == before
