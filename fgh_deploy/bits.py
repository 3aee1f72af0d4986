"""Turn tanh hash codes into packed bits and back.

Rule: a code value ``u >= 0`` becomes bit 1 and ``u < 0`` becomes bit 0, so an exact
``0.0`` is a 1 (it matches ``sign`` with the tie sent to +1, the convention the training
loss uses). NaN has no sign and is refused.

Order: bits are packed LSB-first within each byte (``np.packbits(..., bitorder="little")``),
the layout of FAISS ``fvec2bitvec``/``IndexBinary*``. Bit ``j`` of a code is
``(byte[j // 8] >> (j % 8)) & 1``. A code of ``bits`` bits takes ``ceil(bits / 8)`` bytes and
the unused high bits of its last byte are zero, which keeps Hamming distances between
packed codes exact.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from fgh_deploy.errors import FghError

BIT_ORDER = "little"


def packed_width(bits: int) -> int:
    """Bytes one packed code of ``bits`` bits takes.

    Args:
        bits: Code length in bits, at least 1.

    Returns:
        ``ceil(bits / 8)``.

    Raises:
        FghError: ``bits`` is not an integer ≥ 1.
    """
    return (_check_bits(bits) + 7) // 8


def pack_codes(codes: Any, *, bits: int | None = None) -> np.ndarray:
    """Pack real-valued (tanh) codes into bits, ``u >= 0`` → 1, LSB-first.

    Args:
        codes: ``(n, bits)`` float or signed-int array, a single ``(bits,)`` code, or a
            torch tensor (moved to the CPU; torch is not imported here).
        bits: Expected code length; when given, a ``codes`` width that differs is an error.

    Returns:
        ``uint8`` array of shape ``(n, ceil(bits / 8))``; a 1-D code gives ``n = 1``.

    Raises:
        FghError: Wrong ndim, empty code length, a width other than ``bits``, a dtype that
            is not real-valued (bool, unsigned ints — e.g. codes that are already packed —,
            complex, object), or a NaN.
    """
    if hasattr(codes, "detach"):
        codes = codes.detach().cpu().numpy()
    arr = np.asarray(codes)
    if arr.ndim == 1:
        arr = arr[np.newaxis, :]
    elif arr.ndim != 2:
        raise FghError(f"codes must be 2-D (n, bits) or one 1-D code, got shape {arr.shape}")
    if arr.shape[1] < 1:
        raise FghError("codes have 0 bits; a code needs at least 1 bit")
    if bits is not None and arr.shape[1] != _check_bits(bits):
        raise FghError(f"bits mismatch: codes have {arr.shape[1]} bits per row, expected {bits}")
    # Unsigned ints are always >= 0 and would silently pack to all ones: that is almost
    # always a call on codes that were packed already.
    if arr.dtype.kind not in "fi":
        raise FghError(
            f"codes must be real-valued (float or signed int) tanh codes, got dtype {arr.dtype}"
            + (" (already packed?)" if arr.dtype == np.uint8 else "")
        )
    if arr.dtype.kind == "f":
        nan_rows = np.flatnonzero(np.isnan(arr).any(axis=1))
        if nan_rows.size:
            raise FghError(
                f"codes contain NaN in {nan_rows.size} row(s) (first: row {nan_rows[0]}); "
                "NaN has no sign bit"
            )
    return np.packbits(arr >= 0, axis=1, bitorder=BIT_ORDER)


def unpack_codes(packed: Any, bits: int) -> np.ndarray:
    """Unpack codes made by :func:`pack_codes` into one 0/1 value per bit.

    Args:
        packed: ``uint8`` array ``(n, ceil(bits / 8))``, or one 1-D packed code.
        bits: Code length in bits.

    Returns:
        ``uint8`` array of shape ``(n, bits)`` holding 0 and 1; a 1-D code gives ``n = 1``.

    Raises:
        FghError: ``bits`` < 1, ``packed`` not ``uint8``, wrong ndim, a width other than
            ``ceil(bits / 8)``, or set bits past ``bits`` (the codes were packed with a
            different length).
    """
    bits = _check_bits(bits)
    arr = np.asarray(packed)
    if arr.dtype != np.uint8:
        raise FghError(f"packed codes must be uint8, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[np.newaxis, :]
    elif arr.ndim != 2:
        raise FghError(
            f"packed codes must be 2-D (n, bytes) or one 1-D code, got shape {arr.shape}"
        )
    width = packed_width(bits)
    if arr.shape[1] != width:
        raise FghError(
            f"packed codes are {arr.shape[1]} bytes wide, but {bits} bits pack into {width} bytes"
        )
    tail = bits % 8
    if tail:
        # pack_codes zeroes the padding; set padding bits mean another bit length was used.
        bad_rows = np.flatnonzero(arr[:, -1] >> tail)
        if bad_rows.size:
            raise FghError(
                f"bits mismatch: row {bad_rows[0]} has bits set past bit {bits} "
                "(packed with a different bit length?)"
            )
    return np.unpackbits(arr, axis=1, count=bits, bitorder=BIT_ORDER)


def _check_bits(bits: Any) -> int:
    """Return ``bits`` as an int ≥ 1, or raise FghError."""
    try:
        value = operator.index(bits)
    except TypeError:
        raise FghError(f"bits must be an integer, got {bits!r}") from None
    if value < 1:
        raise FghError(f"bits must be at least 1, got {value}")
    return value
