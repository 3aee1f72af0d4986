"""Hostile and careless input around an index: planted links and directories, a deleted manifest,
an empty image folder, unforgeable skipped.tsv lines, non-UTF-8 names, a full disk."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fgh_deploy as fgh
from fgh_deploy.encode import SKIPPED_LOG, encode_folder
from fgh_deploy.engines import load_engine
from fgh_deploy.errors import FghError
from fgh_deploy.index import CodeIndex
from fgh_deploy.query import search_images

from test_index import batch, committed_batches, data_files, expected, meta, write_batches

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def built(tmp_path: Path) -> Path:
    """An index of batches 0..3, committed, and a victim file beside it."""
    path = tmp_path / "idx"
    write_batches(path, 0, 4, create=True)
    (tmp_path / "victim.txt").write_bytes(b"precious bytes\n" * 100)
    return path


def one_line(exc: pytest.ExceptionInfo[FghError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def folder_state(path: Path) -> dict[str, bytes | str]:
    """Every entry of a folder: a file's bytes, a link's target, or "dir"."""
    state: dict[str, bytes | str] = {}
    for name in os.listdir(path):
        entry = path / name
        if entry.is_symlink():
            state[name] = "-> " + os.readlink(entry)
        elif entry.is_dir():
            state[name] = "dir"
        else:
            state[name] = entry.read_bytes()
    return state


# ------------------------------------------------------- links and other planted entries


def test_a_linked_lock_is_refused_and_its_target_untouched(built: Path) -> None:
    victim = built.parent / "victim.txt"
    before = victim.read_bytes()
    (built / "lock").unlink()
    (built / "lock").symlink_to("../victim.txt")
    with pytest.raises(FghError) as exc:
        CodeIndex.open(built, writable=True)
    assert one_line(exc) == (f"{built}: lock is a symbolic link; fgh does not follow links inside an index "
                             "folder (remove it)")
    with pytest.raises(FghError, match="lock is a symbolic link"):
        CodeIndex.create(built, **meta(), overwrite=True)
    fresh = built.parent / "fresh"
    fresh.mkdir()
    (fresh / "lock").symlink_to("../victim.txt")
    with pytest.raises(FghError, match="lock is a symbolic link"):
        CodeIndex.create(fresh, **meta())
    assert victim.read_bytes() == before
    assert committed_batches(built) == 4  # readers never touch the lock


def test_a_linked_data_file_is_refused_before_anything_is_cut(built: Path) -> None:
    victim = built.parent / "victim.txt"
    # The victim starts like the real stats file and is longer, so a writer would "drop an
    # interrupted append" from it; codes.0.bin really has one, which must survive the refusal too.
    victim.write_bytes((built / "stats.0.bin").read_bytes() + b"precious tail")
    before = victim.read_bytes()
    (built / "stats.0.bin").unlink()
    (built / "stats.0.bin").symlink_to("../victim.txt")
    with open(built / "codes.0.bin", "ab") as f:
        f.write(b"torn append")
    codes_before = (built / "codes.0.bin").read_bytes()
    for writable in (True, False):
        with pytest.raises(FghError) as exc:
            CodeIndex.open(built, writable=writable)
        assert one_line(exc) == (f"{built}: stats.0.bin is a symbolic link; fgh does not follow links inside "
                                 "an index folder (remove it)")
    assert victim.read_bytes() == before
    assert (built / "codes.0.bin").read_bytes() == codes_before


def test_damage_in_a_later_file_is_reported_before_an_earlier_one_is_cut(built: Path) -> None:
    with open(built / "codes.0.bin", "ab") as f:
        f.write(b"torn append")
    codes_before = (built / "codes.0.bin").read_bytes()
    stats = bytearray((built / "stats.0.bin").read_bytes())
    stats[3] ^= 1
    (built / "stats.0.bin").write_bytes(stats)
    with pytest.raises(FghError, match="stats.0.bin checksum mismatch"):
        CodeIndex.open(built, writable=True)
    assert (built / "codes.0.bin").read_bytes() == codes_before


@pytest.mark.parametrize("name", ["manifest.json", "paths.0.bin", "lock"])
def test_a_directory_in_place_of_an_index_file_is_one_line(built: Path, name: str) -> None:
    (built / name).unlink()
    (built / name).mkdir()
    (built / name / "inside").write_bytes(b"kept")
    before = folder_state(built)
    assert CodeIndex.exists(built)
    for writable in ([True] if name == "lock" else [False, True]):
        with pytest.raises(FghError) as exc:
            CodeIndex.open(built, writable=writable)
        assert one_line(exc) == f"{built}: {name} is a directory, not a regular file"
    with pytest.raises(FghError, match=re.escape(f"holds '{name}', which is not part of an fgh index")):
        CodeIndex.create(built, **meta(), overwrite=True)
    assert folder_state(built) == before and (built / name / "inside").read_bytes() == b"kept"


def test_a_fifo_as_manifest_is_refused_without_blocking(built: Path) -> None:
    (built / "manifest.json").unlink()
    os.mkfifo(built / "manifest.json")
    with pytest.raises(FghError) as exc:
        CodeIndex.open(built)
    assert one_line(exc) == f"{built}: manifest.json is a FIFO, not a regular file"


def test_a_directory_named_like_a_leftover_generation_is_refused(built: Path) -> None:
    (built / "codes.7.bin").mkdir()
    with pytest.raises(FghError) as exc:
        CodeIndex.open(built, writable=True)
    assert one_line(exc) == f"{built}: codes.7.bin is a directory where fgh keeps its files; move it away"
    assert (built / "codes.7.bin").is_dir() and committed_batches(built) == 4


def test_deeply_nested_or_huge_manifests_are_one_line(built: Path) -> None:
    (built / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(FghError) as exc:
        CodeIndex.open(built)
    assert one_line(exc) == (f"{built}: manifest.json is nested 200000 levels deep (at most 32); "
                             "not written by fgh")
    (built / "manifest.json").write_bytes(b" " * (2 << 20))
    with pytest.raises(FghError, match="manifest.json is over 1048576 bytes"):
        CodeIndex.open(built)


# ---------------------------------------------------------------- replacing an index


def test_data_without_a_manifest_is_kept_unless_replacing_is_asked_for(built: Path) -> None:
    (built / "manifest.json").unlink()
    before = folder_state(built)
    assert not CodeIndex.exists(built)
    with pytest.raises(FghError) as exc:
        CodeIndex.create(built, **meta())
    assert one_line(exc) == (
        f"{built}: holds fgh index data (codes.0.bin, offsets.0.bin, paths.0.bin, stats.0.bin) but no "
        "manifest.json; refusing to replace it: replace it with --rebuild (overwrite=True) or choose another --out"
    )
    assert folder_state(built) == before
    with CodeIndex.create(built, **meta(), overwrite=True) as index:
        index.append(*batch(0))
    assert committed_batches(built) == 1


def test_a_failed_replacement_keeps_the_old_index(built: Path) -> None:
    before = data_files(built)
    with pytest.raises(RuntimeError, match="interrupted"):
        with CodeIndex.create(built, **meta(), overwrite=True) as index:
            index.append(*batch(9))
            index.commit()
            with CodeIndex.open(built) as reader:  # the old index stays searchable meanwhile
                assert len(reader) == len(expected(range(4))[1])
            raise RuntimeError("interrupted")
    assert data_files(built) == before
    assert sorted(os.listdir(built.parent)) == ["idx", "victim.txt"]
    # Not published: closing a replacement discards it.
    CodeIndex.create(built, **meta(), overwrite=True).close()
    assert data_files(built) == before


def test_a_replacement_refuses_a_folder_with_foreign_files(built: Path) -> None:
    (built / "notes.txt").write_text("mine")
    with pytest.raises(FghError) as exc:
        CodeIndex.create(built, **meta(), overwrite=True)
    assert one_line(exc) == (f"{built}: holds 'notes.txt', which is not part of an fgh index; move it away "
                             "before replacing the index")
    assert (built / "notes.txt").read_text() == "mine"


def test_a_linked_index_folder_stays_linked_when_replaced(built: Path) -> None:
    link = built.parent / "link"
    link.symlink_to("idx")
    with CodeIndex.create(link, **meta(), overwrite=True) as index:
        index.append(*batch(0))
    assert link.is_symlink() and committed_batches(built) == 1
    assert sorted(os.listdir(built.parent)) == ["idx", "link", "victim.txt"]


# ------------------------------------------------------------------------- full disk

DISK_FULL_VICTIM = textwrap.dedent("""
    import os, resource, signal, sys
    import numpy as np
    from fgh_deploy.errors import FghError
    from fgh_deploy.index import CodeIndex
    sys.path.insert(0, sys.argv[3])
    from test_index import batch
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        with CodeIndex.open(sys.argv[1], writable=True) as index:
            for b in range(4, 1000):
                index.append(*batch(b))
                index.commit()
    except FghError as exc:
        print(exc)
""")


def test_a_full_disk_is_one_line_and_keeps_the_committed_rows(built: Path) -> None:
    # Above the manifest's size: a data file (stats or paths, 16-odd bytes a row) reaches it first.
    limit = os.path.getsize(built / "manifest.json") + 300
    proc = subprocess.run([sys.executable, "-c", DISK_FULL_VICTIM, str(built), str(limit), str(Path(__file__).parent)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    committed = committed_batches(built)
    rows = len(expected(range(committed))[1])
    assert committed > 4
    message = re.fullmatch(re.escape(f"{built}: file too large while writing ") + r"(\w+\.0\.bin)"
                           + re.escape(f"; the index keeps the {rows} images encoded before (run again with more "
                                       "space: it resumes)"), proc.stdout.strip())
    assert message, proc.stdout
    assert os.path.getsize(built / message[1]) <= limit
    write_batches(built, committed, committed + 2, create=False)  # resumes where it stopped
    assert committed_batches(built) == committed + 2


# ------------------------------------------------------------- fgh encode and fgh query

CAFE = b"caf\xe9.jpg"  # not UTF-8: must come back byte for byte
FORGERS = [b"bad\tname.jpg", b"forged\tnot an image\nfake.jpg", b"back\\x41slash.jpg"]


def _checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return fgh.save_checkpoint(fgh.build_model("adsh", 24, backbone="resnet18", input_size=64), path)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "adsh24.pt", seed=0)


@pytest.fixture
def photos(tmp_path: Path, cub100: Path) -> Path:
    """4 real photos (one with a non-UTF-8 name), undecodable files named to forge log lines,
    a FIFO named like an image and a link to / (which must not be walked)."""
    root = tmp_path / "photos"
    root.mkdir()
    sources = sorted(cub100.glob("*/*.jpg"))[:4]
    for src, name in zip(sources, [CAFE, b"a.jpg", b"b.jpg", b"c.jpg"]):
        shutil.copy(src, os.path.join(os.fsencode(root), name))
    for name in FORGERS:
        Path(os.fsdecode(os.path.join(os.fsencode(root), name))).write_text("not an image")
    os.mkfifo(root / "pipe.jpg")
    (root / "everything").symlink_to("/")
    return root


def _encode(folder: Path, model: Path, out: Path, **kwargs):
    with load_engine(model, device="cpu") as engine:
        return encode_folder(folder, engine, out, progress=False, workers=0, **kwargs)


def _cli(*args: str | bytes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fgh_deploy.cli", *args], cwd=ROOT, capture_output=True,
                          timeout=300)


def _unescape(field: bytes) -> bytes:
    """Undo skipped.tsv's escapes (the format in fgh_deploy.encode's docstring)."""
    named = {b"t": b"\t", b"n": b"\n", b"r": b"\r", b"\\": b"\\"}

    def one(match: re.Match[bytes]) -> bytes:
        code = match[1]
        if code[:1] == b"x":
            return bytes([int(code[1:], 16)])
        if code[:1] == b"u":
            return chr(int(code[1:], 16)).encode()
        return named[code]

    return re.sub(rb"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|[tnr\\])", one, field)


def test_skipped_log_lines_cannot_be_forged_and_name_every_entry(photos: Path, model_path: Path,
                                                                 tmp_path: Path) -> None:
    summary = _encode(photos, model_path, tmp_path / "idx")
    assert summary.encoded == 4
    lines = (tmp_path / "idx" / SKIPPED_LOG).read_bytes().split(b"\n")
    assert lines[-1] == b""
    fields = [line.split(b"\t") for line in lines[:-1]]
    assert all(len(f) == 2 for f in fields)  # a name's tab or newline did not add a field or a line
    logged = {_unescape(path): _unescape(reason).decode() for path, reason in fields}
    assert set(logged) == {*FORGERS, b"pipe.jpg", b"everything"}
    assert logged[b"pipe.jpg"] == "not a regular file (FIFO)"
    assert logged[b"everything"] == "symlink to a directory: not followed (use --follow-links)"
    assert all("not an image" in logged[name] for name in FORGERS)
    with CodeIndex.open(tmp_path / "idx") as index:
        assert sorted(map(os.fsencode, index.all_paths())) == sorted([CAFE, b"a.jpg", b"b.jpg", b"c.jpg"])


def test_a_non_utf8_name_survives_query_json(photos: Path, model_path: Path, tmp_path: Path) -> None:
    _encode(photos, model_path, tmp_path / "idx")
    proc = _cli("query", os.path.join(os.fsencode(photos), CAFE), "--index", str(tmp_path / "idx"), "--json")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    payload = json.loads(proc.stdout)  # JSON text is ASCII: undecodable bytes travel as \udcXX escapes
    query = payload["queries"][0]
    assert os.fsencode(query["query"]) == os.path.join(os.fsencode(photos), CAFE)
    hits = query["results"]
    assert hits[0]["distance"] == 0 and os.fsencode(hits[0]["path"]) == CAFE


def test_an_empty_folder_leaves_the_index_untouched(built: Path, model_path: Path, tmp_path: Path) -> None:
    before = folder_state(built)
    empty = tmp_path / "unmounted"
    empty.mkdir()
    with pytest.raises(FghError) as exc:
        _encode(empty, model_path, built)
    assert one_line(exc) == (f"{empty}: no images found (.bmp/.gif/.jpeg/.jpg/.png/.tif/.tiff/.webp files, "
                             f"searched recursively); {built} was not touched")
    os.mkfifo(empty / "pipe.jpg")
    with pytest.raises(FghError, match=re.escape("1 entries left out, e.g. pipe.jpg: not a regular file (FIFO)")):
        _encode(empty, model_path, built, rebuild=True)
    assert folder_state(built) == before


def test_encode_refuses_index_data_without_a_manifest_unless_rebuild(photos: Path, model_path: Path,
                                                                     built: Path) -> None:
    (built / "manifest.json").unlink()
    before = folder_state(built)
    with pytest.raises(FghError, match=re.escape(f"{built}: holds fgh index data (codes.0.bin,")):
        _encode(photos, model_path, built)
    assert folder_state(built) == before
    assert _encode(photos, model_path, built, rebuild=True).encoded == 4


class _FailingEngine:
    """An engine that is interrupted (Ctrl-C) at its second batch."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self._calls = 0

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._calls += 1
        if self._calls == 2:
            raise KeyboardInterrupt
        return self._engine.encode(images)


def test_an_interrupted_rebuild_keeps_the_old_index(photos: Path, model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    _encode(photos, model_path, out)
    before = folder_state(out)
    other = _checkpoint(tmp_path / "other.pt", seed=1)
    with load_engine(other, device="cpu") as engine, pytest.raises(KeyboardInterrupt):
        encode_folder(photos, _FailingEngine(engine), out, rebuild=True, batch_size=2, workers=0,
                      progress=False, commit_seconds=0)
    assert folder_state(out) == before
    assert sorted(os.listdir(tmp_path)) == ["idx", "other.pt", "photos"]
    assert _encode(photos, other, out, rebuild=True).encoded == 4
    with CodeIndex.open(out) as index, load_engine(other) as engine:
        assert index.fingerprint == engine.fingerprint and len(index) == 4


def test_a_wrong_model_gets_a_hint_fit_for_each_command(photos: Path, model_path: Path, tmp_path: Path) -> None:
    _encode(photos, model_path, tmp_path / "idx")
    other = _checkpoint(tmp_path / "other.pt", seed=1)
    with pytest.raises(FghError, match=r" — use --rebuild to replace it, or another --out$"):
        _encode(photos, other, tmp_path / "idx")
    with CodeIndex.open(tmp_path / "idx") as index, load_engine(other) as engine:
        with pytest.raises(FghError) as exc:
            search_images(index, engine, [photos / "a.jpg"])
    assert one_line(exc).endswith(" — query with the engine that built it (the default without --engine)")


def test_encode_through_a_linked_lock_is_one_line_and_harms_nothing(photos: Path, model_path: Path,
                                                                    built: Path) -> None:
    victim = built.parent / "victim.txt"
    before = victim.read_bytes()
    (built / "lock").unlink()
    (built / "lock").symlink_to("../victim.txt")
    proc = _cli("encode", str(photos), "--engine", str(model_path), "--out", str(built), "--workers", "0")
    assert proc.returncode == 1
    assert proc.stderr.decode().strip().splitlines()[-1] == (
        f"fgh: error: {built}: lock is a symbolic link; fgh does not follow links inside an index folder "
        "(remove it)")
    assert victim.read_bytes() == before and committed_batches(built) == 4


DISK_FULL_ENCODE = textwrap.dedent("""
    import resource, signal, sys
    from fgh_deploy.cli import main
    import fgh_deploy.engines.torch_engine  # imported before the limit: nothing but the index is written under it
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    main(sys.argv[2:])
""")


def test_a_full_disk_during_encode_is_one_line_and_resumable(photos: Path, model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    _encode(photos, model_path, out)
    # 12 long names: the paths file outgrows the limit (just above the manifest's size) after a few.
    for i, src in enumerate(sorted(photos.glob("[abc].jpg")) * 4):
        shutil.copy(src, photos / f"{i:02d}{'x' * 240}.jpg")
    limit = os.path.getsize(out / "manifest.json") + 250
    args = ["encode", str(photos), "--engine", str(model_path), "--out", str(out), "--workers", "0",
            "--batch-size", "1"]
    proc = subprocess.run([sys.executable, "-c", DISK_FULL_ENCODE, str(limit), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    with CodeIndex.open(out) as index:
        kept = len(index)
    assert 4 <= kept < 16  # rows are committed every 2 s: the 4 of the first run, maybe more
    assert proc.stderr.strip().splitlines()[-1] == (
        f"fgh: error: {out}: file too large while writing paths.0.bin; the index keeps the {kept} images "
        "encoded before (run again with more space: it resumes)")
    again = _encode(photos, model_path, out)
    assert (again.reused, again.encoded) == (kept, 16 - kept)
