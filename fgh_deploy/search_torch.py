"""Exact Hamming search with torch, for CUDA devices: the GPU side of :mod:`fgh_deploy.search`.

torch has no popcount, so bits become ±1 values and ``q·d = bits − 2·distance``: one matrix
product per block of rows gives every distance of the block. Results and the tie rule are
those of the CPU searcher; :class:`~fgh_deploy.search.HammingSearcher` checks the inputs.

This module is imported only when a CUDA search is asked for, so the CPU search runs without
torch. The implementation itself is device-agnostic: built with ``device="cpu"`` it runs the
same code in fp32 on the CPU (the tests check it there on machines without a GPU).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from fgh_deploy.errors import BackendUnavailableError, FghError
from fgh_deploy.search import HammingSearcher, _concat, _no_neighbours

log = logging.getLogger(__name__)

# fp16 sums of ±1 products are exact integers up to 2048 terms (its 11-bit significand).
_HALF_MAX_BITS = 2048
# Packed codes unpacked per slice: the uint8 temporaries stay small next to the ±1 result.
_UNPACK_BITS = 1 << 24


class TorchHammingSearcher(HammingSearcher):
    """:class:`~fgh_deploy.search.HammingSearcher` on a torch device (a CUDA GPU).

    The database is held on the device as ``(ntotal, bits)`` ±1 values: fp16 up to 2048 bits
    on CUDA, fp32 otherwise. Ties are settled by ``topk`` on the unique key
    ``distance * ntotal + row``, which orders by ``(distance, row)``.
    """

    # Query-row pairs per block: the int64 keys of one block take 256 MiB.
    _BLOCK_ELEMENTS = 1 << 25

    def _build(self, database: np.ndarray) -> None:
        """Copy ``database`` to the device as ±1 values.

        Raises:
            BackendUnavailableError: a CUDA device, but CUDA is unusable here.
            FghError: ``kernel="compiled"`` (a CPU kernel).
        """
        if self.device != "cpu" and not torch.cuda.is_available():
            raise BackendUnavailableError(f"device {self.device!r} requested but CUDA is not available here")
        if self._kernel_option == "compiled":
            raise FghError(f"kernel='compiled' is a CPU kernel; the {self.device} search uses torch")
        self._device = torch.device(self.device)
        self._bits = 8 * self.code_size
        fast_half = self._device.type == "cuda" and self._bits <= _HALF_MAX_BITS
        self._dtype = torch.float16 if fast_half else torch.float32
        self._db = self._signs(database)

    @property
    def nbytes(self) -> int:
        """Bytes of the ±1 database on the device."""
        return self._db.numel() * self._db.element_size()

    @property
    def kernel(self) -> str:
        """``"torch"``: matrix products on the device."""
        return "torch"

    def _search_impl(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.ntotal
        distances, labels = _no_neighbours(len(queries), k)
        best = torch.empty((len(queries), 0), dtype=torch.int64, device=self._device)
        for start, dist in self._blocks(queries):
            rows = torch.arange(start, start + dist.shape[1], device=self._device)
            keys = torch.cat((best, dist.to(torch.int64) * n + rows), dim=1)
            best = torch.topk(keys, min(k, keys.shape[1]), dim=1, largest=False, sorted=True).values
        found = best.cpu().numpy()
        distances[:, : found.shape[1]] = found // n
        labels[:, : found.shape[1]] = found % n
        return distances, labels

    def _within_impl(self, queries: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts = []
        for start, dist in self._blocks(queries):
            qi, col = torch.nonzero(dist <= limit, as_tuple=True)
            parts.append((qi.cpu().numpy(), dist[qi, col].cpu().numpy(), (col + start).cpu().numpy()))
        return _concat(parts)

    def _distances_impl(self, queries: np.ndarray) -> np.ndarray:
        out = np.empty((len(queries), self.ntotal), dtype=np.int32)
        for start, dist in self._blocks(queries):
            out[:, start : start + dist.shape[1]] = dist.cpu().numpy()
        return out

    def _blocks(self, queries: np.ndarray) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(row_start, int32 distances (nq, rows))`` block by block, rows ascending."""
        q = self._signs(queries)
        rows = max(1, self._BLOCK_ELEMENTS // len(queries))
        for start in range(0, self.ntotal, rows):
            dots = q @ self._db[start : start + rows].T
            yield start, (self._bits - dots.to(torch.int32)) // 2

    def _signs(self, codes: np.ndarray) -> torch.Tensor:
        """Packed codes → ``(n, bits)`` ±1 tensor on the device (zero padding → -1 on both sides)."""
        shifts = torch.arange(8, dtype=torch.uint8, device=self._device)
        out = torch.empty((len(codes), self._bits), dtype=self._dtype, device=self._device)
        step = max(1, _UNPACK_BITS // self._bits)
        for start in range(0, len(codes), step):
            packed = torch.from_numpy(np.array(codes[start : start + step])).to(self._device)  # a writable copy
            bits = (packed.unsqueeze(-1) >> shifts) & 1
            out[start : start + step] = bits.reshape(len(packed), -1).to(self._dtype) * 2 - 1
        return out
