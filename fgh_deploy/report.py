"""A self-contained HTML page that shows what a hash index retrieves and what its bits mean.

:func:`write_html_report` writes one file that opens anywhere, offline: thumbnails are inline
``data:`` JPEG URIs, the CSS is inline and there is no JavaScript. It has three parts:

* a header: the index, its code length and size, the model and the tie rule of the ranking;
* one row per query: the query image, then its hits in rank order, each with its rank,
  Hamming distance and path. Hits at equal distance (a tie group) share a shaded band. When
  the classes are known, a correct hit gets a green frame and a wrong one a red frame, with
  precision@k for each query and their mean;
* a per-bit view, after A²-Net (Fig. 4): for the most balanced bits, the database images
  most typical of the bit being set and of it being unset, so one can see what a bit encodes.
  It reads every code, so it is drawn for a local index only (a note says so for Milvus).

Labels default to folder names (:func:`label_from_path` for database images, the parent
folder for a query), the layout of ImageFolder datasets and of the demo dataset.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from .bits import unpack_codes
from .errors import ConfigError, FghError
from .images import ImageDecodeError, decode_image
from .index import CodeIndex
from .index_uri import SearchIndex
from .query import Hit, QueryResult, label_from_path
from .utils import atomic_write, display_path
from .version import __version__

__all__ = ["query_label", "report_css", "thumbnail_jpeg", "write_html_report"]

StrPath = Union[str, os.PathLike[str]]

# Rows per step when scoring how typical a code is: bounds the temporaries for big indexes.
_CHUNK_ROWS = 1 << 16

_CSS = """
:root { --thumb: %(thumb)dpx; --ok: #1f9d55; --bad: #d3312b; --none: #b8bcc4; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
       color: #1d232b; background: #f4f5f7; }
h1 { margin: 0 0 8px; font-size: 22px; }
h2 { margin: 28px 0 6px; font-size: 18px; }
p.note { margin: 0 0 12px; color: #525c69; max-width: 72em; }
header dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
header dt { color: #525c69; }
header dd { margin: 0; overflow-wrap: anywhere; }
.score { font-weight: 600; }
code, .path { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.query { display: grid; grid-template-columns: calc(var(--thumb) + 28px) 1fr; gap: 14px;
         background: #fff; border: 1px solid #dde1e6; border-radius: 8px; padding: 12px; margin: 10px 0; }
.query > .probe { border-right: 1px solid #e3e6ea; padding-right: 12px; }
.hits, .examples { display: flex; flex-wrap: wrap; gap: 6px 0; margin: 0; padding: 0; list-style: none; }
.hits li { padding: 4px 3px; }
.hits li.band { background: #eceff3; }
figure { margin: 0; width: calc(var(--thumb) + 8px); }
.frame { width: calc(var(--thumb) + 8px); height: calc(var(--thumb) + 8px); border: 4px solid var(--none);
         border-radius: 4px; background: #fff; display: flex; align-items: center; justify-content: center;
         overflow: hidden; }
.frame img { display: block; max-width: 100%%; max-height: 100%%; }
.probe .frame { border-color: #2f6fd6; }
.ok .frame { border-color: var(--ok); }
.bad .frame { border-color: var(--bad); }
.missing { font-size: 11px; color: #8a1f1a; text-align: center; padding: 4px; overflow-wrap: anywhere; }
figcaption { font-size: 11px; line-height: 1.3; margin-top: 3px; }
figcaption .rank { font-weight: 600; }
figcaption .path { display: block; color: #525c69; font-size: 10px; overflow-wrap: anywhere; }
.label { display: block; font-size: 11px; overflow-wrap: anywhere; }
.bad .label { color: var(--bad); }
.ok .label { color: var(--ok); }
.pk { margin-top: 6px; font-size: 13px; }
.bit { background: #fff; border: 1px solid #dde1e6; border-radius: 8px; padding: 10px 12px; margin: 10px 0; }
.bit h3 { margin: 0 0 6px; font-size: 14px; }
.bit .row { display: grid; grid-template-columns: 5.5em 1fr; align-items: start; margin: 4px 0; }
.bit .value { font-weight: 600; padding-top: 4px; }
.examples figure { margin-right: 6px; }
footer { margin-top: 28px; color: #6b7480; font-size: 12px; }
"""


def query_label(query_path: str) -> str | None:
    """The class of a query image from its path: its parent folder's name (``None`` if none)."""
    return Path(query_path).parent.name or None


def _text(value: object) -> str:
    """HTML-escaped printable text; undecodable path bytes become ``\\xNN``, never a crash."""
    text = value if isinstance(value, str) else str(value)
    return html.escape(display_path(text), quote=True)


class _Thumbnails:
    """Decodes each image once and renders it as an inline ``<img>`` (or a placeholder)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._cache: dict[Path, str] = {}

    def frame(self, path: Path, alt: str) -> str:
        """The image at ``path`` as a framed ``<img>``, or the reason it cannot be shown."""
        if path not in self._cache:
            self._cache[path] = self._render(path)
        body = self._cache[path]
        if body.startswith("data:"):
            body = f'<img src="{body}" alt="{_text(alt)}">'
        return f'<div class="frame">{body}</div>'

    def _render(self, path: Path) -> str:
        """A ``data:`` URI of the thumbnail, or a placeholder ``<div>`` naming the decoding error."""
        try:
            jpeg = thumbnail_jpeg(path, self.size)
        except ImageDecodeError as exc:
            # One missing or broken file must not cost the whole report.
            return f'<div class="missing" title="{_text(exc)}">unreadable<br>{_text(exc.reason)}</div>'
        return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def thumbnail_jpeg(path: Path, size: int) -> bytes:
    """The image at ``path`` as a JPEG whose longest side is at most ``size`` pixels.

    Raises:
        ImageDecodeError: the file cannot be decoded (see :func:`fgh_deploy.images.decode_image`).
    """
    image = decode_image(path, min_size=size)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def report_css(thumb_size: int) -> str:
    """The report's style sheet for thumbnails of ``thumb_size`` pixels (``fgh serve``'s page shares it)."""
    return _CSS % {"thumb": thumb_size}


class _Labels:
    """Class labels: the caller's mapping first, folder names otherwise."""

    def __init__(self, overrides: Mapping[str, str] | None) -> None:
        self.overrides = dict(overrides or {})

    def database(self, rel_path: str) -> str | None:
        """The class of a database image (by its path in the index)."""
        return self.overrides.get(rel_path, label_from_path(rel_path))

    def query(self, query: str) -> str | None:
        """The class of a query image (by the path it was given as)."""
        return self.overrides.get(query, query_label(query))


def _precision(query_class: str | None, hits: Sequence[Hit], labels: _Labels) -> float | None:
    """Share of the hits in the query's class (hits without a label count as wrong)."""
    if query_class is None or not hits:
        return None
    return sum(labels.database(hit.path) == query_class for hit in hits) / len(hits)


def _query_html(result: QueryResult, index_root: Path, query_root: Path | None, labels: _Labels,
                thumbs: _Thumbnails) -> tuple[str, float | None]:
    """One query's row (its image, then its hits with rank, distance and class frame) and its precision."""
    query_path = Path(result.query)
    if query_root is not None and not query_path.is_absolute():
        query_path = query_root / query_path
    query_class = labels.query(result.query)
    precision = _precision(query_class, result.hits, labels)
    label = f'<span class="label">class {_text(query_class)}</span>' if query_class else ""
    pk = ""
    if precision is not None:
        pk = f'<div class="pk">P@{len(result.hits)} <span class="score">{precision:.2f}</span></div>'
    probe = (
        f'<div class="probe"><figure>{thumbs.frame(query_path, result.query)}'
        f'<figcaption><span class="rank">query</span><span class="path">{_text(result.query)}</span>'
        f"{label}</figcaption></figure>{pk}</div>"
    )
    items = []
    for hit in result.hits:
        hit_class = labels.database(hit.path)
        if query_class is None or hit_class is None:
            verdict = ""
        else:
            verdict = "ok" if hit_class == query_class else "bad"
        # Shade every other tie group: a band marks hits the ranking cannot separate.
        classes = " ".join(c for c in (verdict, "band" if hit.tie_group % 2 else "") if c)
        # The class is printed only when the path does not already show it (a mapping gave it).
        shown = hit_class and hit_class != label_from_path(hit.path)
        hit_label = f'<span class="label">{_text(hit_class)}</span>' if shown else ""
        items.append(
            f'<li class="{classes}" title="row {hit.row}, tie group {hit.tie_group}"><figure>'
            f"{thumbs.frame(index_root / hit.path, hit.path)}"
            f'<figcaption><span class="rank">#{hit.rank}</span> · d={hit.distance}'
            f'<span class="path">{_text(hit.path)}</span>{hit_label}</figcaption></figure></li>'
        )
    hits = f'<ol class="hits">{"".join(items)}</ol>' if items else '<p class="note">no hits</p>'
    return f'<article class="query">{probe}{hits}</article>', precision


def _typical_rows(bits: np.ndarray, members: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` member rows whose codes are closest, in total, to every other member's.

    The summed Hamming distance of code ``x`` to the group is ``Σ_j c_j + Σ_j x_j (n - 2 c_j)``
    (``c_j`` = members with bit ``j`` set, ``n`` = members), linear in ``x``: one matrix-vector
    product ranks them all. A stable sort breaks ties by row, so the choice is deterministic.
    """
    n = len(members)
    if n == 0:  # a bit that is the same in every code
        return members
    counts = np.zeros(bits.shape[1], dtype=np.int64)
    for start in range(0, n, _CHUNK_ROWS):
        counts += bits[members[start:start + _CHUNK_ROWS]].sum(axis=0, dtype=np.int64)
    weights = n - 2 * counts
    scores = np.concatenate([
        bits[members[start:start + _CHUNK_ROWS]].astype(np.int64) @ weights for start in range(0, n, _CHUNK_ROWS)
    ])
    return members[np.argsort(scores, kind="stable")[:count]]


def _bits_html(index: SearchIndex, labels: _Labels, thumbs: _Thumbnails, bits_shown: int, examples: int) -> str:
    """The per-bit view: for the most balanced bits, the images most typical of the bit set and unset."""
    if not isinstance(index, CodeIndex):
        return ('<section class="bits"><h2>What the bits capture</h2><p class="note">This view reads every '
                f"code; for {_text(index.label)} run it on a local copy (fgh index pull).</p></section>")
    total = len(index)
    if total == 0 or bits_shown == 0 or examples == 0:
        return ""
    bits = unpack_codes(np.asarray(index.codes), index.bits)
    counts = bits.sum(axis=0, dtype=np.int64)
    # Balanced bits split the database in halves; those are the ones worth looking at.
    # Integer imbalance, so equally balanced bits tie exactly and keep their bit order.
    chosen = np.argsort(np.abs(2 * counts - total), kind="stable")[:bits_shown]
    root = Path(index.root)
    blocks = []
    for bit in chosen.tolist():
        rows_html = []
        for value in (1, 0):
            members = np.flatnonzero(bits[:, bit] == value)
            figures = []
            for row in _typical_rows(bits, members, examples).tolist():
                rel = index.path_of(row)
                row_class = labels.database(rel)
                caption = f'<span class="path">{_text(rel)}</span>'
                if row_class and row_class != label_from_path(rel):
                    caption = f'<span class="label">{_text(row_class)}</span>' + caption
                figures.append(f"<figure>{thumbs.frame(root / rel, rel)}<figcaption>{caption}</figcaption></figure>")
            content = "".join(figures) or '<p class="note">no image</p>'
            rows_html.append(
                f'<div class="row"><span class="value">bit = {value}<br><small>{len(members)} images</small>'
                f'</span><div class="examples">{content}</div></div>'
            )
        heading = f"bit {bit} · set in {counts[bit] / total:.0%} of the database"
        blocks.append(f'<div class="bit"><h3>{heading}</h3>{"".join(rows_html)}</div>')
    return (
        '<section class="bits"><h2>What the bits capture</h2>'
        f'<p class="note">The {len(chosen)} most balanced of the {index.bits} bits. For each, the database '
        f"images whose codes are most typical of the images with the bit set (first row) and unset "
        f"(second row): what the rows differ in is what the bit encodes.</p>{''.join(blocks)}</section>"
    )


def write_html_report(
    path: StrPath,
    results: Sequence[QueryResult],
    *,
    index: SearchIndex,
    query_root: StrPath | None = None,
    labels: Mapping[str, str] | None = None,
    title: str = "fgh retrieval report",
    bit_examples: int = 6,
    thumb_size: int = 96,
    bits_shown: int = 8,
) -> Path:
    """Write a self-contained HTML retrieval report (see the module docstring).

    Args:
        path: the HTML file to write (atomically: a reader never sees half a report).
        results: the queries and their hits, e.g. from :func:`fgh_deploy.query.search_images`.
        index: the index the hits come from; database images are read from its ``root``.
        query_root: the folder relative query paths are relative to (default: the current
            directory).
        labels: class labels by path, database paths as stored in the index and queries as in
            :attr:`QueryResult.query`; paths missing from it fall back to their folder names.
        title: the page title.
        bit_examples: images per row of the per-bit view (0 leaves the view out).
        thumb_size: the longest side of a thumbnail, in pixels.
        bits_shown: how many bits the per-bit view shows (0 leaves it out).

    Returns:
        The written file's path.

    Raises:
        ConfigError: ``thumb_size`` < 16, or a negative ``bit_examples`` or ``bits_shown``.
        FghError: ``path`` is a folder or cannot be written.
    """
    if thumb_size < 16:
        raise ConfigError(f"thumb_size must be >= 16, got {thumb_size}")
    if bit_examples < 0 or bits_shown < 0:
        raise ConfigError(f"bit_examples and bits_shown must be >= 0, got {bit_examples} and {bits_shown}")
    thumbs = _Thumbnails(thumb_size)
    label_source = _Labels(labels)
    root = Path(index.root)
    query_base = Path(query_root) if query_root is not None else None

    articles, precisions = [], []
    for result in results:
        article, precision = _query_html(result, root, query_base, label_source, thumbs)
        articles.append(article)
        if precision is not None:
            precisions.append(precision)

    model = index.model
    model_name = " / ".join(str(model[key]) for key in ("model", "backbone") if model.get(key))
    ks = sorted({len(r.hits) for r in results})
    k_text = f"{ks[0]}–{ks[-1]}" if len(ks) > 1 else str(ks[0] if ks else 0)
    if precisions:
        mean = f'<span class="score">{float(np.mean(precisions)):.3f}</span>'
        summary = f"{mean} mean P@k over {len(precisions)} labelled queries"
    else:
        summary = "no class labels (correctness not shown)"
    facts = [
        ("index", _text(index.label)),
        ("images from", _text(root)),
        ("database", f"{len(index)} images · {index.bits}-bit codes"),
        ("model", _text(model_name) if model_name else "unknown"),
        ("queries", f"{len(results)} · top {k_text} hits each"),
        ("ranking", f"Hamming {_text(index.tie_rule)} (shaded bands group hits at equal distance)"),
        ("precision", summary),
    ]
    header = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in facts)
    document = "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_text(title)}</title>",
        f"<style>{report_css(thumb_size)}</style></head><body>",
        f"<header><h1>{_text(title)}</h1><dl>{header}</dl></header>",
        '<section class="results"><h2>Queries</h2>'
        '<p class="note">Each row: the query (blue frame), then its hits in rank order with rank, '
        "Hamming distance d and path. When classes are known, a green frame marks a hit of the query's "
        "class and a red frame a hit of another class.</p>",
        *articles,
        "</section>",
        _bits_html(index, label_source, thumbs, bits_shown, bit_examples),
        f"<footer>fgh {_text(__version__)} · fine-grained image hashing</footer>",
        "</body></html>",
        "",
    ])
    out = Path(path)
    if out.is_dir():
        raise FghError(f"{display_path(out)}: is a folder; name the HTML file to write")
    try:
        atomic_write(out, lambda f: f.write(document.encode("utf-8")))
    except OSError as exc:
        raise FghError(f"{display_path(out)}: cannot write the report ({exc.strerror or exc})") from None
    return out
