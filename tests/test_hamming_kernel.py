"""The compiled search kernel (fgh_deploy/_hamming.c) on its own: built, exact, and bounds-checked.

tests/test_search.py runs every search test on it and on numpy's passes.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil

import numpy as np
import pytest

from fgh_deploy.search import _to_columns
from test_search import random_packed, ref_distances


@pytest.fixture
def _hamming():
    try:
        return importlib.import_module("fgh_deploy._hamming")
    except ImportError:
        pytest.skip("fgh_deploy._hamming is not built (no C compiler at install); see test_compiled_kernel_is_built")


def test_compiled_kernel_is_built() -> None:
    """An install on a machine with a C compiler builds the fused kernel (else it falls back silently)."""
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler here: the numpy kernel is the expected one")
    assert importlib.util.find_spec("fgh_deploy._hamming") is not None, (
        "fgh_deploy._hamming was not built: check the C compiler output of `pip install -v .`"
    )


@pytest.mark.parametrize("bits", [5, 16, 24, 40, 64, 72, 128, 200, 248])
def test_every_variant_matches_the_reference(_hamming, bits: int) -> None:
    """Each instruction-set variant this CPU runs (the default one and the fallbacks other CPUs
    get, e.g. the plain loop that Jetson's compiler vectorises) gives the reference distances."""
    rng = np.random.default_rng(bits)
    database, queries = random_packed(rng, 1537, bits), random_packed(rng, 3, bits)  # 1537: partial tiles
    columns, words = _to_columns(database), _to_columns(queries)
    query_words = np.stack(words, axis=1).astype(np.uint64)
    expected = ref_distances(queries, database)
    for variant in _hamming.VARIANTS:
        out = np.full((3, 1600), 255, dtype=np.uint8)
        _hamming.step_distances(out, 1600, columns, 11, 1537, query_words, variant)
        np.testing.assert_array_equal(out[:, : 1537 - 11], expected[:, 11:], err_msg=variant)
        assert (out[:, 1537 - 11 :] == 255).all(), f"{variant} wrote past its rows"
    with pytest.raises(ValueError, match="does not run on this CPU"):
        _hamming.step_distances(out, 1600, columns, 0, 10, query_words, "sve2")


def test_compiled_kernel_checks_its_buffers(_hamming) -> None:
    """The C entry point refuses buffers that would make it read or write out of bounds."""
    step = _hamming.step_distances
    column = np.arange(100, dtype=np.uint64)
    words = np.zeros(2, dtype=np.uint64)  # two queries, one column
    out = np.zeros((2, 100), dtype=np.uint8)
    step(out, 100, [column], 0, 100, words)
    np.testing.assert_array_equal(out, np.bitwise_count(column)[np.newaxis].repeat(2, axis=0))
    with pytest.raises(ValueError, match="too small"):
        step(out, 100, [column], 0, 100, np.zeros(3, dtype=np.uint64))
    with pytest.raises(ValueError, match="outside 0:100"):
        step(out, 100, [column], 50, 101, words)
    with pytest.raises(ValueError, match="differ in length"):
        step(out, 100, [column, column[:99]], 0, 10, np.zeros(4, dtype=np.uint64))
    with pytest.raises(ValueError, match="itemsize"):
        step(out, 100, [column.view(np.complex128)], 0, 10, words)
    with pytest.raises(ValueError, match="out must be uint8"):
        step(out.view(np.uint16), 50, [column], 0, 10, words)
    with pytest.raises(ValueError, match="not a positive multiple"):
        step(out, 100, [column, column], 0, 10, np.zeros(3, dtype=np.uint64))
    with pytest.raises(ValueError, match="not C-contiguous"):
        step(out[:, ::2], 50, [column], 0, 10, words)
