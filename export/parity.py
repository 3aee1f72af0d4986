"""Parity between two code sets: what matters for hashing is the bits, not the logits."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_MIN_AGREEMENT = 0.995


@dataclass(frozen=True)
class ParityReport:
    """How closely ``candidate`` codes follow the ``reference`` (PyTorch FP32) codes.

    Attributes:
        name: what was compared, e.g. "ONNX Runtime FP16 vs PyTorch".
        runtime: the candidate's runtime and provider.
        images: number of images compared.
        max_abs_diff: largest |Δ| between tanh codes.
        bit_agreement: fraction of bits (u ≥ 0) that agree.
        mean_hamming: mean per-image Hamming distance between the two code sets.
        near_zero: fraction of reference codes with |u| < 1e-2: the bits a lower precision can flip.
        min_agreement: the threshold the check applies.
    """

    name: str
    runtime: str
    images: int
    max_abs_diff: float
    bit_agreement: float
    mean_hamming: float
    near_zero: float
    min_agreement: float

    @property
    def passed(self) -> bool:
        return self.bit_agreement >= self.min_agreement

    def summary(self) -> str:
        verdict = "ok" if self.passed else f"BELOW the {self.min_agreement:.2%} threshold"
        return (f"{self.name} on {self.images} images ({self.runtime}): max |Δ| {self.max_abs_diff:.2e}, "
                f"bit agreement {self.bit_agreement:.3%}, mean Hamming {self.mean_hamming:.3f} bits/image, "
                f"{self.near_zero:.2%} of codes near 0 — {verdict}")

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def compare_codes(reference: np.ndarray, candidate: np.ndarray, *, name: str, runtime: str,
                  min_agreement: float = DEFAULT_MIN_AGREEMENT) -> ParityReport:
    """Compare two (N, bits) float code arrays with fgh's sign rule (u ≥ 0 → 1)."""
    reference = np.asarray(reference, dtype=np.float32)
    candidate = np.asarray(candidate, dtype=np.float32)
    if reference.shape != candidate.shape:
        raise ValueError(f"{name}: code shapes differ: {reference.shape} vs {candidate.shape}")
    disagree = (reference >= 0) != (candidate >= 0)
    return ParityReport(
        name=name, runtime=runtime, images=len(reference),
        max_abs_diff=float(np.abs(reference - candidate).max()) if reference.size else 0.0,
        bit_agreement=float(1.0 - disagree.mean()) if reference.size else 1.0,
        mean_hamming=float(disagree.sum(axis=1).mean()) if reference.size else 0.0,
        near_zero=float((np.abs(reference) < 1e-2).mean()) if reference.size else 0.0,
        min_agreement=min_agreement,
    )
