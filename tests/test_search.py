"""Exact Hamming search against an independent brute-force reference."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest

from fgh_deploy import search
from fgh_deploy.errors import BackendUnavailableError, FghError
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


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def cpu_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on both CPU distance kernels: ``kernel="auto"`` picks the one under test."""
    if request.param == "numpy":
        monkeypatch.setattr(search, "_hamming", None)
    elif search._hamming is None:
        pytest.skip("fgh_deploy._hamming is not built (no C compiler at install); see test_compiled_kernel_is_built")
    return request.param


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


# ------------------------------------------------------------ layouts, blocking, threads


@pytest.mark.parametrize(
    ("bits", "column_dtypes"),
    [
        (8, ["uint8"]),
        (16, ["uint16"]),
        (24, ["uint32"]),
        (32, ["uint32"]),
        (33, ["uint64"]),  # 5 bytes: one padded uint64 word, not uint32 + uint8
        (48, ["uint64"]),
        (64, ["uint64"]),
        (96, ["uint64", "uint32"]),
        (128, ["uint64", "uint64"]),
        (136, ["uint64", "uint64", "uint8"]),
    ],
)
def test_word_layout_and_exactness(bits: int, column_dtypes: list[str]) -> None:
    rng = np.random.default_rng(1000 + bits)
    database = random_packed(rng, 3000, bits, pool=200)
    queries = np.concatenate([database[:5], random_packed(rng, 32, bits)])  # 37: not a group multiple
    searcher = HammingSearcher(database, chunk_size=1500)
    assert searcher.layout == column_dtypes
    assert searcher.nbytes == 3000 * sum(np.dtype(dt).itemsize for dt in column_dtypes)
    np.testing.assert_array_equal(searcher.distances(queries), ref_distances(queries, database))
    for k in (1, 10, 100):
        assert_knn_matches(searcher.search(queries, k), queries, database, k)
    for radius in (0, bits // 4):
        assert_range_matches(searcher.range_search(queries, radius), queries, database, radius)


@pytest.fixture
def always_parallel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the threaded path even for test-sized searches."""
    monkeypatch.setattr(search, "_MIN_PARALLEL_WORK", 0)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("nq", [1, 2, 5, 33, 70])  # few queries split rows; many split groups
@pytest.mark.parametrize("bits", [32, 48, 128])
def test_threads_and_batches_with_many_ties(always_parallel, threads: int, nq: int, bits: int) -> None:
    rng = np.random.default_rng(nq * bits + threads)
    database = random_packed(rng, 4001, bits, pool=7)  # ~570 copies of each code
    queries = np.concatenate([database[: nq // 2], random_packed(rng, nq - nq // 2, bits)])
    searcher = HammingSearcher(database, threads=threads, chunk_size=700)
    for k in (1, 9, 600, 4001, 4010):
        assert_knn_matches(searcher.search(queries, k), queries, database, k)
    assert_range_matches(searcher.range_search(queries, 3), queries, database, 3)
    np.testing.assert_array_equal(searcher.distances(queries), ref_distances(queries, database))


def test_small_steps_and_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Steps narrower than a block, groups of 3 and blocks of 4 rows: padding at every step end.
    monkeypatch.setattr(search, "_STEP_ELEMENTS", 30)
    monkeypatch.setattr(search, "_GROUP_QUERIES", 3)
    monkeypatch.setattr(search, "_BLOCK_ROWS", 4)
    rng = np.random.default_rng(5)
    database = random_packed(rng, 203, 20, pool=25)
    queries = random_packed(rng, 8, 20)
    searcher = HammingSearcher(database)
    for k in (1, 7, 203, 210):
        assert_knn_matches(searcher.search(queries, k), queries, database, k)
    assert_range_matches(searcher.range_search(queries, 6), queries, database, 6)


@pytest.mark.parametrize("chunk_size", [131072, 777, 50])
@pytest.mark.parametrize("k", [1, 10, 4999, 5001])
def test_single_queries_with_ties(tied, chunk_size: int, k: int) -> None:
    # One query per call takes the scalar-bookkeeping path.
    queries, database = tied
    searcher = HammingSearcher(database, chunk_size=chunk_size, threads=1)
    for query in queries:
        assert_knn_matches(searcher.search(query, k), query[np.newaxis], database, k)


@pytest.mark.parametrize("nq", [1, 2])
def test_candidates_are_compacted_when_every_row_improves(monkeypatch: pytest.MonkeyPatch, nq: int) -> None:
    # Rows come in order of decreasing distance, so every step brings new nearest rows and the
    # candidate buffer must be trimmed to the top k on the way.
    monkeypatch.setattr(search, "_STEP_ELEMENTS", 64)
    bits = 64
    rows = np.zeros((bits + 1, bits), np.uint8)
    for d in range(bits + 1):
        rows[d, :d] = 1
    database = np.packbits(np.repeat(rows[::-1], 40, axis=0), axis=1, bitorder="little")
    queries = np.zeros((nq, 8), np.uint8)
    compactions = []
    order = search._order_candidates

    def counting(*args):
        compactions.append(len(args[0]))
        return order(*args)

    monkeypatch.setattr(search, "_order_candidates", counting)
    out = HammingSearcher(database).search(queries, 5)
    assert len(compactions) > 2  # compacted during the scan, not only at the end
    assert_knn_matches(out, queries, database, 5)


def test_threads_give_identical_results(always_parallel) -> None:
    rng = np.random.default_rng(9)
    database = random_packed(rng, 20000, 64, pool=3000)
    queries = random_packed(rng, 40, 64)
    one = HammingSearcher(database, threads=1)
    two = HammingSearcher(database, threads=2)
    for a, b in zip(one.search(queries, 25), two.search(queries, 25)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(one.range_search(queries, 20), two.range_search(queries, 20)):
        np.testing.assert_array_equal(a, b)


def test_memory_mapped_database(tmp_path) -> None:
    rng = np.random.default_rng(3)
    database = random_packed(rng, 500, 48, pool=50)
    path = tmp_path / "codes.u8"
    database.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r", shape=database.shape)
    assert_knn_matches(HammingSearcher(mapped).search(database[:4], 12), database[:4], database, 12)


def test_bad_threads_and_device_are_refused() -> None:
    database = np.zeros((5, 2), np.uint8)
    with pytest.raises(FghError, match="threads must be at least 1"):
        HammingSearcher(database, threads=0)
    with pytest.raises(FghError, match="device must be"):
        HammingSearcher(database, device="tpu")


# ------------------------------------------------------------------------ CPU kernels


def test_kernel_reports_what_runs(cpu_kernel: str) -> None:
    database = random_packed(np.random.default_rng(3), 50, 64)
    kernel = HammingSearcher(database).kernel
    assert kernel == "numpy" if cpu_kernel == "numpy" else kernel.startswith("compiled/")
    assert HammingSearcher(database, kernel="numpy").kernel == "numpy"
    # Codes too long for uint8 distances always take numpy's passes.
    assert HammingSearcher(random_packed(np.random.default_rng(3), 5, 300)).kernel == "numpy"


def test_bad_kernel_requests_are_refused(cpu_kernel: str) -> None:
    database = np.zeros((5, 2), np.uint8)
    with pytest.raises(FghError, match="unknown search kernel 'fast'"):
        HammingSearcher(database, kernel="fast")
    with pytest.raises(FghError, match=r"up to 248 bits \(31 bytes\), not 32 bytes"):
        HammingSearcher(np.zeros((5, 32), np.uint8), kernel="compiled")
    if cpu_kernel == "numpy":
        with pytest.raises(BackendUnavailableError, match="not built"):
            HammingSearcher(database, kernel="compiled")
    else:
        assert HammingSearcher(database, kernel="compiled").kernel.startswith("compiled/")


# ------------------------------------------------------------------------ torch / CUDA


def test_torch_kernel_matches_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ±1 matrix-product kernel, run by torch on the CPU (fp32) behind the same wrapper."""
    from fgh_deploy.search import TorchHammingSearcher

    monkeypatch.setattr(TorchHammingSearcher, "_BLOCK_ELEMENTS", 9 * 200)  # blocks of 200 rows
    rng = np.random.default_rng(21)
    database = random_packed(rng, 1500, 48, pool=60)
    queries = np.concatenate([database[:3], random_packed(rng, 6, 48)])
    # No CUDA needed to check the torch code: it is device-agnostic, so run it on the CPU.
    searcher = TorchHammingSearcher(database, device="cpu")
    assert searcher.nbytes == 1500 * 48 * 4
    for k in (1, 10, 1500, 1503):
        assert_knn_matches(searcher.search(queries, k), queries, database, k)
    assert_range_matches(searcher.range_search(queries, 5), queries, database, 5)
    np.testing.assert_array_equal(searcher.distances(queries), ref_distances(queries, database))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda_available(), reason="needs torch with a CUDA device")
@pytest.mark.parametrize("bits", [32, 48, 64, 128, 300])
def test_cuda_matches_cpu(bits: int) -> None:
    rng = np.random.default_rng(bits)
    database = random_packed(rng, 50000, bits, pool=5000)
    queries = np.concatenate([database[:8], random_packed(rng, 56, bits)])
    cpu = HammingSearcher(database)
    gpu = HammingSearcher(database, device="cuda")
    assert gpu.device == "cuda"
    for k in (1, 10, 100):
        for a, b in zip(cpu.search(queries, k), gpu.search(queries, k)):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(cpu.range_search(queries, bits // 4), gpu.range_search(queries, bits // 4)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(cpu.distances(queries[:4]), gpu.distances(queries[:4]))


@pytest.mark.skipif(_cuda_available(), reason="checks the error on machines without CUDA")
def test_cuda_unavailable_is_a_clear_error() -> None:
    with pytest.raises(BackendUnavailableError, match="CUDA is not available"):
        HammingSearcher(np.zeros((5, 2), np.uint8), device="cuda")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_threaded_search_works_in_a_forked_child(always_parallel) -> None:
    rng = np.random.default_rng(4)
    database = random_packed(rng, 3000, 64)
    queries = random_packed(rng, 8, 64)
    searcher = HammingSearcher(database, threads=2)
    expected = searcher.search(queries, 5)  # the parent's pool now exists
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(searcher.search, (queries, 5)).get(timeout=60)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_default_threads_are_the_cpus_up_to_a_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    database = np.zeros((10, 4), np.uint8)
    monkeypatch.setattr(search, "_available_cpus", lambda: 16)
    assert HammingSearcher(database).threads == search.DEFAULT_MAX_THREADS == 8
    assert HammingSearcher(database, threads=16).threads == 16  # asked for explicitly
    monkeypatch.setattr(search, "_available_cpus", lambda: 2)
    assert HammingSearcher(database).threads == 2
