"""ADSH's database-code update by discrete cyclic coordinate descent (models.md §1.6)."""

from __future__ import annotations

import torch


def sign_plus(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1, so every code entry is ±1 (0 would count as half a bit)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def update_database_codes(codes: torch.Tensor, sampled_outputs: torch.Tensor, similarity: torch.Tensor,
                          sampled_rows: torch.Tensor, gamma: float) -> torch.Tensor:
    """One DCC sweep over the bits of the database codes B.

    Minimises ‖k·S − U Bᵀ‖² + γ‖B_Ω − U‖² over B ∈ {±1}^{n×k} one bit column at a time:
    ``B[:, j] = sign(Q[:, j] − B_{−j} U_{−j}ᵀ U[:, j])`` with ``Q = k·SᵀU + γ·Ū``.

    The public code forms B_{−j} U_{−j}ᵀ (an n × ns temporary per bit); here the k × k Gram
    matrix G = UᵀU is computed once and ``B_{−j} U_{−j}ᵀ U[:, j] = B G[:, j] − B[:, j] G[j, j]``,
    so a sweep costs O(n·k²) with no n × ns temporaries.

    Args:
        codes: B (n × k), ±1 or (first sweep) real-valued; not modified.
        sampled_outputs: U (ns × k), the network outputs of the sampled images (last epoch).
        similarity: S (ns × n).
        sampled_rows: Ω, the database rows of the sampled images (ns,).
        gamma: quantization weight γ.

    Returns:
        The updated ±1 codes (n × k), float32.
    """
    u = sampled_outputs.double()
    k = u.shape[1]
    q = k * similarity.double().T @ u
    q[sampled_rows] += gamma * u
    gram = u.T @ u
    b = codes.double().clone()
    for j in range(k):
        others = b @ gram[:, j] - b[:, j] * gram[j, j]
        b[:, j] = sign_plus(q[:, j] - others)
    return b.float()
