"""``fgh query``: images → codes → exact Hamming search in an index.

Results are ordered by Hamming distance, then by database order (the order images were added to
the index), so the same query always gives the same list. Library entry points:

* :func:`search_images` — by image files (decoded exactly like ``fgh encode`` does);
* :func:`search_codes` — by float or packed codes;
* :func:`fgh_deploy.search.knn_hamming` — code-to-code without an index.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from .bits import pack_codes
from .config import PreprocessConfig
from .errors import FghError
from .images import load_image
from .index import CodeIndex
from .index_uri import MilvusLocation, SearchIndex, parse_index_name
from .utils import check_int, display_path

if TYPE_CHECKING:
    from fgh_deploy.engines.base import Engine



@dataclass
class Hit:
    rank: int
    distance: int
    row: int
    path: str
    tie_group: int  # hits with the same distance share a tie group (0 = the nearest distance)


@dataclass
class QueryResult:
    query: str
    hits: list[Hit] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "results": [vars(h) for h in self.hits]}


def _hits(index: SearchIndex, distances: np.ndarray, rows: np.ndarray) -> list[Hit]:
    valid = rows >= 0
    distances, rows = distances[valid], rows[valid]
    paths = index.paths(rows.tolist())
    groups = np.concatenate([[0], np.cumsum(np.diff(distances) != 0)]) if len(distances) else []
    return [Hit(rank + 1, int(d), int(r), p, int(g))
            for rank, (d, r, p, g) in enumerate(zip(distances, rows, paths, groups))]


def label_from_path(rel_path: str) -> str | None:
    """The class of a database image from its path in the index: its first folder.

    Args:
        rel_path: the path relative to the index root (``/`` or the OS separator).

    Returns:
        The first path component, or ``None`` for an image directly in the root.
    """
    parts = [p for p in PurePosixPath(rel_path.replace(os.sep, "/")).parts if p not in (".", "/")]
    return parts[0] if len(parts) > 1 else None


def search_codes(index: SearchIndex, codes: np.ndarray, *, top_k: int = 10,
                 radius: int | None = None, device: str = "cpu") -> list[list[Hit]]:
    """Search the index with float codes (signed with u ≥ 0 → 1) or packed uint8 codes.

    Args:
        index: an opened :class:`SearchIndex`.
        codes: (nq, bits) float codes or (nq, code_size) packed uint8 codes.
        top_k: neighbours per query; with ``radius``, the cap on hits per query (None: no cap
            is not allowed for k-NN).
        radius: if given, return every item with distance ≤ radius (sorted), capped at ``top_k``.
        device: where the search runs: ``cpu``, or ``cuda[:N]`` (the codes are copied to the GPU).

    Returns:
        One list of :class:`Hit` per query.
    """
    codes = np.asarray(codes)
    packed = codes if codes.dtype == np.uint8 else pack_codes(codes, bits=index.bits)
    # No query has more hits than the index has images: a huge --top-k means "all of them".
    top_k = min(check_int(top_k, "top_k", minimum=1), max(len(index), 1))
    if radius is None:
        distances, rows = index.search(packed, top_k, device=device)
        return [_hits(index, distances[i], rows[i]) for i in range(len(packed))]
    lims, distances, rows = index.range_search(packed, radius, device=device)
    return [_hits(index, distances[lims[i]:lims[i + 1]][:top_k], rows[lims[i]:lims[i + 1]][:top_k])
            for i in range(len(packed))]


def check_engine_matches(index: SearchIndex, engine: Engine) -> None:
    """Refuse to search an index with codes from another model or preprocessing."""
    index.check_compatible(engine.bits, engine.fingerprint, hint="query with the engine that built it (the default without --engine)")
    if PreprocessConfig.from_dict(index.preprocess) != engine.preprocess:
        raise FghError(f"{index.label}: built with preprocessing {index.preprocess}, "
                       f"but {display_path(engine.path.name)} uses {engine.preprocess.to_dict()}")


#: Query images decoded and encoded per engine call: memory stays that of one batch (a
#: 224-pixel image takes about 18.6 MB through the engine) whatever the number of queries.
QUERY_BATCH_SIZE = 32


def search_images(index: SearchIndex, engine: Engine, images: Sequence[str | os.PathLike], *,
                  top_k: int = 10, radius: int | None = None, search_device: str = "cpu",
                  batch_size: int = QUERY_BATCH_SIZE) -> list[QueryResult]:
    """Encode query images with ``engine`` and search ``index`` on ``search_device`` (see :func:`search_codes`).

    Images are decoded (exactly as ``fgh encode`` does), encoded and searched ``batch_size``
    at a time; the results are those of one query at a time, in input order.

    Raises:
        FghError: an unreadable query image (named), an engine that does not match the index,
            or ``batch_size`` < 1.
    """
    check_engine_matches(index, engine)
    check_int(batch_size, "batch_size", minimum=1)
    results: list[QueryResult] = []
    for start in range(0, len(images), batch_size):
        paths = images[start:start + batch_size]
        pixels = torch.stack([load_image(path, engine.preprocess) for path in paths])
        hits = search_codes(index, engine.encode(pixels), top_k=top_k, radius=radius, device=search_device)
        results.extend(QueryResult(str(path), h) for path, h in zip(paths, hits))
    return results


def results_json(index_name: str, index: SearchIndex, results: Sequence[QueryResult], *, top_k: int,
                 radius: int | None) -> dict[str, Any]:
    """The JSON document of ``fgh query --json`` (and of ``fgh serve``'s searches), schema version 1.

    Args:
        index_name: the index as the caller named it (printed as given).
        index: the index searched; ``bits`` and ``ntotal`` are read from this handle, the snapshot
            the hits come from.
        results: the queries' hits, in query order.
        top_k: the ``top_k`` asked for.
        radius: the ``radius`` asked for, or ``None`` for k-NN.
    """
    payload = {"schema_version": 1, "index": index_name, "bits": index.bits, "ntotal": len(index), "top_k": top_k,
               "radius": radius, "tie_rule": index.tie_rule, "queries": [r.to_dict() for r in results]}
    if index.approximate:
        payload["approximate"] = index.approximate  # only approximate searches carry the key
    return payload


def default_engine_path(index: SearchIndex) -> Path:
    """The engine file recorded in the index (what produced its codes)."""
    recorded = index.engine.get("path")
    if not recorded:
        raise FghError(f"{index.label}: records no engine; pass --engine")
    path = Path(recorded)
    if not path.is_file():
        raise FghError(f"{index.label}: its engine {display_path(path)} is gone; pass --engine")
    return path


def open_index(name: str | os.PathLike[str], *, verify: bool = True) -> SearchIndex:
    """Open the index ``name`` names, read-only, for searching.

    Args:
        name: a folder or a Milvus name (see the module docstring).
        verify: local index only: check the CRC of every committed byte (see :mod:`fgh_deploy.index`).

    Raises:
        FghError: no index there, a damaged one, pymilvus missing, or a Milvus server that cannot be reached.
    """
    location = parse_index_name(name)
    if isinstance(location, MilvusLocation):
        from .milvus_index import MilvusIndex  # pymilvus only when a Milvus index is named

        return MilvusIndex.open(location)
    return CodeIndex.open(location, verify=verify)
