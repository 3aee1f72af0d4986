"""Exact Hamming search against an independent brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from fgh_deploy.errors import FghError
from fgh_deploy.search import (
    HammingSearcher,
    hamming_distances,
    knn_hamming,
    range_search_hamming,
)


def random_packed(
    rng: np.random.Generator, n: int, bits: int, pool: int | None = None
) -> np.ndarray:
    """Packed codes (LSB-first, zero padding); from ``pool`` distinct codes when given, for ties."""
    base = rng.integers(0, 2, size=(pool or n, bits), dtype=np.uint8)
    if pool is not None:
        base = base[rng.integers(0, pool, size=n)]
    return np.packbits(base, axis=1, bitorder="little")


def ref_distances(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    uq = np.unpackbits(np.atleast_2d(queries), axis=1)
    ud = np.unpackbits(database, axis=1)
    return (uq[:, None, :] != ud[None, :, :]).sum(axis=2)


def ref_knn(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    dist = ref_distances(queries, database)
    rows = np.arange(len(database))
    D = np.full((len(dist), k), -1, dtype=np.int64)
    I = np.full((len(dist), k), -1, dtype=np.int64)
    for qi, d in enumerate(dist):
        order = np.lexsort((rows, d))[:k]  # primary key distance, then row
        D[qi, : len(order)] = d[order]
        I[qi, : len(order)] = order
    return D, I


def ref_range(
    queries: np.ndarray, database: np.ndarray, radius: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for d in ref_distances(queries, database):
        sel = np.flatnonzero(d <= radius)
        order = np.lexsort((sel, d[sel]))
        out.append((d[sel][order], sel[order]))
    return out


def assert_knn_matches(searcher_out: tuple[np.ndarray, np.ndarray], queries, database, k) -> None:
    D, I = searcher_out
    assert D.dtype == np.int32 and I.dtype == np.int64
    ref_D, ref_I = ref_knn(queries, database, k)
    np.testing.assert_array_equal(D, ref_D)
    np.testing.assert_array_equal(I, ref_I)


def assert_range_matches(searcher_out, queries, database, radius) -> None:
    lims, D, I = searcher_out
    assert lims.dtype == np.int64 and D.dtype == np.int32 and I.dtype == np.int64
    expected = ref_range(queries, database, radius)
    assert lims.shape == (len(expected) + 1,) and lims[0] == 0 and lims[-1] == len(D) == len(I)
    for qi, (ref_d, ref_i) in enumerate(expected):
        np.testing.assert_array_equal(D[lims[qi] : lims[qi + 1]], ref_d)
        np.testing.assert_array_equal(I[lims[qi] : lims[qi + 1]], ref_i)


@pytest.fixture(scope="module")
def tied() -> tuple[np.ndarray, np.ndarray]:
    """12-bit codes from a pool of 40: exact duplicates and heavy distance ties."""
    rng = np.random.default_rng(12)
    database = random_packed(rng, 5000, 12, pool=40)
    queries = np.concatenate([database[:3], random_packed(rng, 5, 12)])
    return queries, database


@pytest.mark.parametrize("chunk_size", [131072, 4999, 1000, 333])
@pytest.mark.parametrize("k", [1, 10, 257, 5000, 5003])
def test_knn_with_ties(tied, chunk_size: int, k: int) -> None:
    queries, database = tied
    out = HammingSearcher(database, chunk_size=chunk_size).search(queries, k)
    assert_knn_matches(out, queries, database, k)


@pytest.mark.parametrize("chunk_size", [131072, 1000, 333])
@pytest.mark.parametrize("radius", [0, 1, 3, 12, 50])
def test_range_with_ties(tied, chunk_size: int, radius: int) -> None:
    queries, database = tied
    out = HammingSearcher(database, chunk_size=chunk_size).range_search(queries, radius)
    assert_range_matches(out, queries, database, radius)


def test_radius_zero_finds_exact_duplicates(tied) -> None:
    queries, database = tied
    lims, D, I = range_search_hamming(queries[:1], database, 0)
    assert (D == 0).all()
    np.testing.assert_array_equal(I, np.flatnonzero((database == queries[0]).all(axis=1)))
    assert lims[1] > 1  # the pool guarantees duplicates


@pytest.mark.parametrize("bits", [12, 64, 100, 128, 300])  # 300: uint16 accumulator, 5 words
@pytest.mark.parametrize("chunk_size", [131072, 97])
def test_bit_lengths(bits: int, chunk_size: int) -> None:
    rng = np.random.default_rng(bits)
    database = random_packed(rng, 700, bits, pool=300)
    queries = random_packed(rng, 4, bits)
    searcher = HammingSearcher(database, chunk_size=chunk_size)
    assert searcher.ntotal == 700 and searcher.code_size == (bits + 7) // 8
    np.testing.assert_array_equal(searcher.distances(queries), ref_distances(queries, database))
    for k in (1, 16, 701):
        assert_knn_matches(searcher.search(queries, k), queries, database, k)
    assert_range_matches(searcher.range_search(queries, bits // 2), queries, database, bits // 2)


def test_chunk_size_one(tied) -> None:
    queries, database = tied[0][:2], tied[1][:300]
    searcher = HammingSearcher(database, chunk_size=1)
    assert_knn_matches(searcher.search(queries, 7), queries, database, 7)
    assert_range_matches(searcher.range_search(queries, 2), queries, database, 2)


def test_far_rows_first_in_a_large_chunk() -> None:
    # The first rows (all at maximal distance) feed the seed histogram; the true
    # neighbours come later in the same chunk and must still all be found.
    rng = np.random.default_rng(0)
    near = random_packed(rng, 10000, 12, pool=30)
    database = np.concatenate([np.full((10000, 2), [0xFF, 0x0F], np.uint8), near])
    queries = np.zeros((2, 2), np.uint8)
    assert_knn_matches(knn_hamming(queries, database, 20), queries, database, 20)


def test_k_larger_than_database_pads_with_minus_one() -> None:
    database = np.array([[0b1], [0b0], [0b1]], np.uint8)
    D, I = knn_hamming(database[:1], database, 5)
    np.testing.assert_array_equal(D, [[0, 0, 1, -1, -1]])
    np.testing.assert_array_equal(I, [[0, 2, 1, -1, -1]])


def test_ties_go_to_the_lower_row() -> None:
    database = np.zeros((50, 3), np.uint8)
    D, I = HammingSearcher(database, chunk_size=8).search(np.zeros(3, np.uint8), 10)
    np.testing.assert_array_equal(I, [np.arange(10)])
    np.testing.assert_array_equal(D, np.zeros((1, 10)))


def test_single_query_is_one_row(tied) -> None:
    queries, database = tied
    D, I = knn_hamming(queries[0], database, 4)
    assert D.shape == I.shape == (1, 4)
    lims, _, _ = range_search_hamming(queries[0], database, 1)
    assert lims.shape == (2,)
    assert hamming_distances(queries[0], database).shape == (1, len(database))


def test_empty_database_and_no_queries() -> None:
    searcher = HammingSearcher(np.empty((0, 8), np.uint8))
    D, I = searcher.search(np.zeros((2, 8), np.uint8), 3)
    assert (D == -1).all() and (I == -1).all() and D.shape == (2, 3)
    lims, D, I = searcher.range_search(np.zeros((2, 8), np.uint8), 64)
    np.testing.assert_array_equal(lims, [0, 0, 0])
    assert D.shape == I.shape == (0,)

    D, I = HammingSearcher(np.zeros((4, 8), np.uint8)).search(np.empty((0, 8), np.uint8), 3)
    assert D.shape == I.shape == (0, 3)


@pytest.mark.parametrize(
    ("queries", "database", "match"),
    [
        (np.zeros((2, 3), np.uint8), np.zeros((5, 2), np.uint8), "3 bytes per code.*2"),
        (np.zeros((2, 2), np.int32), np.zeros((5, 2), np.uint8), "queries must be uint8"),
        (np.zeros((2, 2), np.uint8), np.zeros((5, 2), np.float32), "database must be uint8"),
        (np.zeros((2, 2, 2), np.uint8), np.zeros((5, 2), np.uint8), "queries must be 2-D"),
        (np.zeros((2, 2), np.uint8), np.zeros(2, np.uint8), "database must be 2-D"),
        (np.zeros((2, 0), np.uint8), np.zeros((5, 0), np.uint8), "0 bytes"),
    ],
)
def test_bad_codes_are_refused(queries, database, match: str) -> None:
    with pytest.raises(FghError, match=match):
        knn_hamming(queries, database, 1)


def test_bad_parameters_are_refused() -> None:
    database = np.zeros((5, 2), np.uint8)
    with pytest.raises(FghError, match="k must be at least 1"):
        knn_hamming(database, database, 0)
    with pytest.raises(FghError, match="k must be an integer"):
        knn_hamming(database, database, 2.5)
    with pytest.raises(FghError, match="radius must be at least 0"):
        range_search_hamming(database, database, -1)
    with pytest.raises(FghError, match="chunk_size must be at least 1"):
        HammingSearcher(database, chunk_size=0)
