"""The CLI under hostile names and careless arguments: escaped output, one-line errors, nothing lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fgh_deploy as fgh
from fgh_deploy.encode import encode_folder
from fgh_deploy.engines import load_engine
from fgh_deploy.errors import FghError
from fgh_deploy.search import MAX_RESULT_SLOTS, HammingSearcher

ESCAPE_NAME = "retitle\x1b]0;PWNED\x07\x1b[2J.png"
MARKUP_NAMES = ("photo [copy].png", "[bold red]loud.png")
UNDECODABLE_NAME = b"caf\xe9.png"


def run_cli(*args: str | os.PathLike, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-c", "from fgh_deploy.cli import main; main()", *map(os.fspath, args)],
                          capture_output=True, timeout=300, cwd=cwd)


def assert_one_line_error(result: subprocess.CompletedProcess[bytes], *fragments: str) -> str:
    stderr = result.stderr.decode()
    assert result.returncode != 0, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fgh: error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def hostile_index(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(image folder, checkpoint, index) with file names that are markup, escape sequences, non-UTF-8."""
    tmp = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    checkpoint = fgh.save_checkpoint(fgh.build_model("adsh", 16, backbone="resnet18", input_size=64), tmp / "m.pt")
    folder = tmp / "images"
    (folder / "sub[").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [*MARKUP_NAMES, ESCAPE_NAME, "sub[/b]x.png"]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(folder / name)
    Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(
        os.path.join(os.fsencode(folder), UNDECODABLE_NAME).decode("utf-8", "surrogateescape"))
    index = tmp / "index"
    with load_engine(checkpoint, device="cpu") as engine:
        encode_folder(folder, engine, index, progress=False, workers=0)
    return folder, checkpoint, index


def test_query_prints_names_as_written_and_escapes_control_characters(hostile_index) -> None:
    folder, _, index = hostile_index
    result = run_cli("query", folder / "sub[/b]x.png", folder / ESCAPE_NAME, "--index", index, "-k", "5")
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    for name in (*MARKUP_NAMES, "sub[/b]x.png"):  # Rich markup would have eaten or choked on these
        assert name in out
    assert "caf\\xe9.png" in out
    assert "\x1b" not in out and "\x07" not in out
    assert "retitle\\x1b]0;PWNED\\x07\\x1b[2J.png" in out


def test_query_json_keeps_undecodable_names_lossless(hostile_index) -> None:
    folder, _, index = hostile_index
    result = run_cli("query", folder / MARKUP_NAMES[0], "--index", index, "-k", "5", "--json")
    assert result.returncode == 0, result.stderr.decode()
    stdout = result.stdout.decode("ascii")  # the JSON is plain ASCII whatever the names
    paths = {os.fsencode(hit["path"]) for q in json.loads(stdout)["queries"] for hit in q["results"]}
    assert UNDECODABLE_NAME in paths
    assert ESCAPE_NAME.encode() in paths


def test_errors_naming_hostile_files_stay_one_escaped_line(hostile_index, tmp_path: Path) -> None:
    folder, _, index = hostile_index
    broken = tmp_path / "broken\x1b[2J\nforged.png"
    broken.write_bytes(b"not a png")
    line = assert_one_line_error(run_cli("query", broken, "--index", index), "broken\\x1b[2J\\x0aforged.png")
    assert "\x1b" not in line


def test_huge_top_k_returns_every_image(hostile_index) -> None:
    folder, _, index = hostile_index
    result = run_cli("query", folder / MARKUP_NAMES[0], "--index", index, "-k", "10000000000000", "--json")
    assert result.returncode == 0, result.stderr.decode()
    assert len(json.loads(result.stdout)["queries"][0]["results"]) == 5


def test_search_refuses_a_result_larger_than_memory_can_hold() -> None:
    searcher = HammingSearcher(np.zeros((4, 2), np.uint8))
    with pytest.raises(FghError, match="asks for .* results, more than"):
        searcher.search(np.zeros((2, 2), np.uint8), MAX_RESULT_SLOTS // 2 + 1)


@pytest.mark.parametrize("target", ["directory", "parent_is_a_file", "read_only_parent"])
def test_html_report_on_a_bad_path_is_one_line(hostile_index, tmp_path: Path, target: str) -> None:
    folder, _, index = hostile_index
    if target == "read_only_parent" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    html = {"directory": tmp_path, "parent_is_a_file": tmp_path / "notes.txt" / "r.html",
            "read_only_parent": tmp_path / "ro" / "r.html"}[target]
    if target == "read_only_parent":
        html.parent.mkdir(mode=0o500)
    if target == "parent_is_a_file":
        html.parent.write_text("precious")
    before = sorted(os.listdir(tmp_path))
    result = run_cli("query", folder / MARKUP_NAMES[0], "--index", index, "--html", html)
    assert_one_line_error(result, str(html))
    assert sorted(os.listdir(tmp_path)) == before


def test_demo_refuses_a_file_or_a_symlink_as_its_folder(tmp_path: Path) -> None:
    keep = tmp_path / "m.pt"
    keep.write_bytes(b"precious")
    assert_one_line_error(run_cli("demo", "--out", keep), "m.pt", "not a folder")
    assert keep.read_bytes() == b"precious"

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "demo.json").write_text("{}")  # looks like an earlier demo: must still not be followed
    (victim / "work.txt").write_text("precious")
    (tmp_path / "link").symlink_to(victim)
    assert_one_line_error(run_cli("demo", "--out", tmp_path / "link"), "symbolic link")
    assert (victim / "work.txt").read_text() == "precious"


def test_bench_search_refuses_more_codes_than_memory() -> None:
    assert_one_line_error(run_cli("bench", "search", "--n", "10000000000000"), "GiB", "available")


def test_doctor_shows_the_install_extra_in_brackets() -> None:
    result = run_cli("doctor")
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    if "TensorRT is not" in out or "not available" in out:
        assert "fgh[trt-cu1" in out


def test_eval_with_a_bogus_device_is_one_line(hostile_index) -> None:
    _, checkpoint, _ = hostile_index
    assert_one_line_error(run_cli("eval", checkpoint, "--device", "bogus"), "--device", "bogus")


@pytest.mark.parametrize("verb", ["encode", "query", "export"])
def test_what_the_file_system_refuses_is_one_line_naming_the_path(verb: str, hostile_index, tmp_path: Path) -> None:
    """An OSError (here a name longer than the file system allows) is a line, not a traceback."""
    folder, checkpoint, _ = hostile_index
    too_long = tmp_path / ("n" * 300)
    args = {"encode": ["encode", folder, "--engine", checkpoint, "--out", too_long, "--workers", "0"],
            "query": ["query", folder / MARKUP_NAMES[0], "--index", too_long],
            "export": ["export", checkpoint, "--out-dir", too_long]}[verb]
    assert_one_line_error(run_cli(*args), f"{too_long}: File name too long")
    assert list(tmp_path.iterdir()) == []
