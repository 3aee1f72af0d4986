"""Bit packing: the >= 0 rule, LSB-first order, round trips and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from fgh_deploy.bits import BIT_ORDER, pack_codes, packed_width, unpack_codes
from fgh_deploy.errors import FghError

BIT_LENGTHS = [1, 7, 8, 12, 24, 48, 64, 100, 128]


@pytest.mark.parametrize("bits", BIT_LENGTHS)
def test_round_trip(bits: int) -> None:
    rng = np.random.default_rng(bits)
    codes = np.tanh(rng.normal(size=(37, bits))).astype(np.float32)
    packed = pack_codes(codes)
    assert packed.dtype == np.uint8
    assert packed.shape == (37, (bits + 7) // 8) == (37, packed_width(bits))
    unpacked = unpack_codes(packed, bits)
    assert unpacked.dtype == np.uint8
    np.testing.assert_array_equal(unpacked, (codes >= 0).astype(np.uint8))


@pytest.mark.parametrize("bits", BIT_LENGTHS)
def test_padding_bits_are_zero(bits: int) -> None:
    packed = pack_codes(np.ones((3, bits)))
    tail = bits % 8
    expected_last = (1 << tail) - 1 if tail else 0xFF
    np.testing.assert_array_equal(packed[:, -1], expected_last)
    np.testing.assert_array_equal(packed[:, :-1], 0xFF)


def test_zero_is_bit_one_and_negatives_are_zero() -> None:
    packed = pack_codes(np.array([[0.0, -0.0, -1e-30, 1e-30, -np.inf, np.inf, -0.5, 0.5]]))
    # -0.0 >= 0 is True in IEEE comparison, so it packs like 0.0.
    np.testing.assert_array_equal(unpack_codes(packed, 8), [[1, 1, 0, 1, 0, 1, 0, 1]])


def test_bit_order_is_lsb_first() -> None:
    assert BIT_ORDER == "little"
    code = -np.ones(12)
    code[[0, 3, 9]] = 0.7  # bit j lives at byte j // 8, position j % 8
    packed = pack_codes(code)
    np.testing.assert_array_equal(packed, [[0b0000_1001, 0b0000_0010]])
    j = np.arange(12)
    np.testing.assert_array_equal((packed[0, j // 8] >> (j % 8)) & 1, code >= 0)


def test_single_code_and_signed_ints() -> None:
    np.testing.assert_array_equal(pack_codes([1, -1, 1]), [[0b101]])
    np.testing.assert_array_equal(unpack_codes(np.array([0b101], np.uint8), 3), [[1, 0, 1]])


def test_empty_batch() -> None:
    packed = pack_codes(np.empty((0, 12), np.float32))
    assert packed.shape == (0, 2)
    assert unpack_codes(packed, 12).shape == (0, 12)


def test_tensor_like_input() -> None:
    class FakeTensor:  # what pack_codes relies on: .detach().cpu().numpy()
        def __init__(self, values: np.ndarray) -> None:
            self.values = values

        def detach(self) -> FakeTensor:
            return self

        def cpu(self) -> FakeTensor:
            return self

        def numpy(self) -> np.ndarray:
            return self.values

    values = np.array([[0.3, -0.2, 0.0]], np.float32)
    np.testing.assert_array_equal(pack_codes(FakeTensor(values)), pack_codes(values))


def test_nan_is_refused() -> None:
    codes = np.zeros((4, 16), np.float32)
    codes[2, 5] = np.nan
    with pytest.raises(FghError, match="NaN.*row 2"):
        pack_codes(codes)


@pytest.mark.parametrize(
    ("codes", "match"),
    [
        (np.zeros((2, 3, 4)), "2-D"),
        (np.zeros((3, 0)), "0 bits"),
        (np.zeros((2, 8), np.uint8), "already packed"),
        (np.zeros((2, 8), bool), "real-valued"),
        (np.zeros((2, 8), complex), "real-valued"),
    ],
)
def test_pack_refuses_bad_input(codes: np.ndarray, match: str) -> None:
    with pytest.raises(FghError, match=match):
        pack_codes(codes)


def test_pack_checks_expected_bits() -> None:
    assert pack_codes(np.zeros((2, 12)), bits=12).shape == (2, 2)
    with pytest.raises(FghError, match="bits mismatch"):
        pack_codes(np.zeros((2, 12)), bits=16)


@pytest.mark.parametrize(
    ("packed", "bits", "match"),
    [
        (np.zeros((2, 2), np.uint8), 24, "2 bytes wide.*3 bytes"),
        (np.zeros((2, 2), np.int64), 12, "uint8"),
        (np.zeros((2, 2, 2), np.uint8), 12, "2-D"),
        (np.zeros((2, 2), np.uint8), 0, "at least 1"),
        (np.zeros((2, 2), np.uint8), 1.5, "integer"),
        (np.array([[0, 0], [0, 0x10]], np.uint8), 12, "bits mismatch: row 1"),
    ],
)
def test_unpack_refuses_bad_input(packed: np.ndarray, bits: int, match: str) -> None:
    with pytest.raises(FghError, match=match):
        unpack_codes(packed, bits)
