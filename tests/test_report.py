"""The HTML retrieval report: content, escaping, correctness marks, per-bit view, rendering."""

from __future__ import annotations

import base64
import html
import io
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fgh_deploy
from fgh_deploy.bits import pack_codes
from fgh_deploy.config import PreprocessConfig
from fgh_deploy.demo_data import generate_demo_dataset
from fgh_deploy.errors import ConfigError
from fgh_deploy.index import TIE_RULE, CodeIndex
from fgh_deploy.query import QueryResult, label_from_path, search_codes
from fgh_deploy.report import query_label, write_html_report
from fgh_deploy.train.data import load_dataset

BITS = 12
NASTY = 'we<i>rd & "quoted" \'name\'.jpg'
VOID_TAGS = {"meta", "img", "br", "link", "input", "hr"}


def class_codes(labels: list[int], seed: int) -> np.ndarray:
    """Codes that mostly encode the class (so searches are mostly right) plus noise."""
    centres = np.random.default_rng(123).choice([-1.0, 1.0], size=(16, BITS))
    noise = np.random.default_rng(seed).normal(0, 0.7, (len(labels), BITS))
    return centres[labels] + noise


def build_index(path: Path, root: Path, rel_paths: list[str], codes: np.ndarray) -> CodeIndex:
    stats = np.array([[os.stat(root / p).st_size, os.stat(root / p).st_mtime_ns] for p in rel_paths])
    with CodeIndex.create(
        path,
        bits=BITS,
        fingerprint="ab" * 32,
        model={"model": "semicon", "bits": BITS, "backbone": "resnet18", "options": {}},
        preprocess=PreprocessConfig().to_dict(),
        engine={"kind": "pytorch", "path": "m.pt", "precision": "fp32"},
        root=root,
    ) as index:
        index.append(pack_codes(codes), rel_paths, stats)
    return CodeIndex.open(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[CodeIndex, list[QueryResult], Path]:
    """A 4-class demo dataset, its database in an index, and searches for its queries."""
    base = tmp_path_factory.mktemp("report")
    root = generate_demo_dataset(base / "data", classes=4, per_class=5, size=64)
    dataset = load_dataset(root)
    rel_paths = [s.relpath for s in dataset.database]
    labels = [s.label for s in dataset.database]
    # One database image with every character HTML cares about in its name.
    nasty = f"{dataset.classes[0]}/{NASTY}"
    shutil.copy(root / rel_paths[0], root / nasty)
    rel_paths.append(nasty)
    labels.append(0)
    index = build_index(base / "index", root, rel_paths, class_codes(labels, seed=0))
    query_codes = class_codes([s.label for s in dataset.query], seed=1)
    hits = search_codes(index, query_codes, top_k=5)
    results = [QueryResult(str(root / s.relpath), h) for s, h in zip(dataset.query, hits)]
    # Make sure the nasty name is among the hits, whatever the search returned.
    results[0].hits[-1].path = nasty
    return index, results, base


class TagChecker(HTMLParser):
    """Fails on a closing tag that does not close the innermost open element."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in VOID_TAGS:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def test_label_helpers() -> None:
    assert label_from_path("sparrow/0001.jpg") == "sparrow"
    assert label_from_path("./sparrow/sub/0001.jpg") == "sparrow"
    assert label_from_path("0001.jpg") is None
    assert query_label("/data/queries/sparrow/q.jpg") == "sparrow"
    assert query_label("q.jpg") is None


def test_report_shows_every_query_and_hit(setup: tuple[CodeIndex, list[QueryResult], Path], tmp_path: Path) -> None:
    index, results, _ = setup
    out = write_html_report(tmp_path / "report.html", results, index=index)
    assert out == tmp_path / "report.html"
    assert os.listdir(tmp_path) == ["report.html"]  # written atomically, no temporary left
    text = out.read_text(encoding="utf-8")

    checker = TagChecker()
    checker.feed(text)
    checker.close()
    assert checker.stack == []

    for result in results:
        assert html.escape(result.query) in text
        for hit in result.hits:
            assert html.escape(hit.path) in text
    assert html.escape(NASTY) in text
    assert "we<i>rd" not in text and "&quot;quoted&quot;" in text

    # Self-contained: images are inline, nothing is fetched.
    assert not re.search(r'(src|href)="(?!data:)', text)
    uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', text)
    assert len(set(uris)) >= len(results)
    with Image.open(io.BytesIO(base64.b64decode(uris[0]))) as thumb:
        assert max(thumb.size) <= 96

    assert str(index.path) in text and f"{BITS}-bit codes" in text and f"{len(index)} images" in text
    assert TIE_RULE in text
    assert f"fgh {fgh_deploy.__version__}" in text


def test_correct_and_wrong_hits_are_marked(setup: tuple[CodeIndex, list[QueryResult], Path], tmp_path: Path) -> None:
    index, results, _ = setup
    text = write_html_report(tmp_path / "r.html", results, index=index).read_text(encoding="utf-8")
    verdicts = re.findall(r'<li class="(ok|bad)[ "]', text)
    expected = [
        "ok" if label_from_path(hit.path) == query_label(r.query) else "bad" for r in results for hit in r.hits
    ]
    assert verdicts == expected
    assert "ok" in verdicts and "bad" in verdicts
    precisions = [float(p) for p in re.findall(r'P@5 <span class="score">([0-9.]+)</span>', text)]
    wanted = [expected[i * 5:(i + 1) * 5].count("ok") / 5 for i in range(len(results))]
    assert precisions == pytest.approx(wanted, abs=0.005)
    assert f"{np.mean(wanted):.3f}</span> mean P@k over {len(results)} labelled queries" in text


def test_label_mapping_overrides_folders(setup: tuple[CodeIndex, list[QueryResult], Path], tmp_path: Path) -> None:
    index, results, _ = setup
    everything = {p: "bird" for p in index.all_paths()} | {r.query: "bird" for r in results}
    text = write_html_report(tmp_path / "r.html", results, index=index, labels=everything).read_text("utf-8")
    assert 'class="bad' not in text
    assert "1.000</span> mean P@k" in text


def test_per_bit_view(setup: tuple[CodeIndex, list[QueryResult], Path], tmp_path: Path) -> None:
    index, results, _ = setup
    text = write_html_report(tmp_path / "r.html", results, index=index, bit_examples=3, bits_shown=4).read_text("utf-8")
    assert "What the bits capture" in text
    blocks = re.findall(r'<div class="bit"><h3>bit (\d+) · set in (\d+)% of the database</h3>(.*?)</div></div></div>',
                        text)
    assert len(blocks) == 4 and len({b[0] for b in blocks}) == 4
    bits = np.unpackbits(np.asarray(index.codes), axis=1, bitorder="little")[:, :BITS]
    for bit, share, body in blocks:
        assert int(share) == round(100 * bits[:, int(bit)].mean())
        assert "bit = 1" in body and "bit = 0" in body
        assert body.count("<figure>") == 6

    without = write_html_report(tmp_path / "s.html", results, index=index, bit_examples=0).read_text("utf-8")
    assert "What the bits capture" not in without


def test_per_bit_examples_are_the_most_typical_codes(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    names = [f"{i}.png" for i in range(5)]
    for name in names:
        Image.new("RGB", (20, 20), "gray").save(root / name)
    # Bit 0 splits 3/2; among the bit-0 = 1 codes, row 1 is the median one (closest to all).
    codes = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=float) * 2 - 1
    index = CodeIndex.create(tmp_path / "idx", bits=4, fingerprint="cd" * 32, model={}, preprocess={},
                             engine={}, root=root)
    index.append(pack_codes(codes), names, np.ones((5, 2), dtype=np.int64))
    index.commit()
    text = write_html_report(tmp_path / "r.html", [], index=index, bit_examples=1, bits_shown=1).read_text("utf-8")
    assert re.search(r"bit 0 · set in 60%.*?bit = 1.*?<span class=\"path\">1\.png</span>", text, re.S)
    # No folders, no labels: nothing is marked right or wrong.
    assert "no class labels" in text and 'class="ok' not in text and 'class="bad' not in text
    index.close()


def test_unreadable_images_get_a_placeholder(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    for name in ("a/good.jpg", "a/broken.jpg", "a/gone.jpg"):
        Image.new("RGB", (30, 20), "teal").save(root / name)
    index = build_index(tmp_path / "idx", root, ["a/good.jpg", "a/broken.jpg", "a/gone.jpg"],
                        class_codes([0, 0, 0], seed=2))
    (root / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "a" / "gone.jpg").unlink()
    results = [QueryResult("a/good.jpg", h) for h in search_codes(index, class_codes([0], seed=3), top_k=3)]
    text = write_html_report(tmp_path / "r.html", results, index=index, query_root=root).read_text("utf-8")
    assert text.count('class="missing"') >= 2
    assert "no such file" in text and "not an image" in text
    assert text.count("data:image/jpeg;base64,") >= 2  # the query and its good hit
    index.close()


def test_bad_arguments(setup: tuple[CodeIndex, list[QueryResult], Path], tmp_path: Path) -> None:
    index, results, _ = setup
    with pytest.raises(ConfigError):
        write_html_report(tmp_path / "r.html", results, index=index, thumb_size=8)
    with pytest.raises(ConfigError):
        write_html_report(tmp_path / "r.html", results, index=index, bit_examples=-1)
    assert not (tmp_path / "r.html").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (apt-get install chromium)")
def test_renders_in_headless_chromium(setup: tuple[CodeIndex, list[QueryResult], Path], tmp_path: Path) -> None:
    index, results, _ = setup
    report = write_html_report(tmp_path / "report.html", results, index=index)
    png = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1200,1600",
            report.resolve().as_uri(),
        ],
        check=True, capture_output=True, timeout=120,
    )
    assert png.is_file()
    with Image.open(png) as shot:
        assert shot.size == (1200, 1600)
        pixels = np.asarray(shot.convert("RGB"))
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 200  # text, frames and thumbnails, not a blank page
    # The green and red frames are on screen.
    assert ((pixels == (0x1F, 0x9D, 0x55)).all(-1)).sum() > 100
    assert ((pixels == (0xD3, 0x31, 0x2B)).all(-1)).sum() > 100
