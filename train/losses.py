"""Losses of the ADSH scheme and each paper's additions (models.md §1, §3, §4)."""

from __future__ import annotations

import itertools

import torch


def soft_similarity(sample_labels: torch.Tensor, database_labels: torch.Tensor) -> torch.Tensor:
    """ADSH's soft-constraint similarity S (ns × n) from multi-hot labels.

    Pairs sharing a label are +1; the others get −P/N, with P and N the counts of positive and
    negative pairs over the whole matrix, so both halves weigh the same in the loss.
    """
    positive = (sample_labels @ database_labels.T) > 0
    n_pos = positive.sum()
    n_neg = positive.numel() - n_pos
    ratio = n_pos.float() / n_neg.clamp(min=1).float()
    return torch.where(positive, 1.0, -ratio).to(torch.float32)


def adsh_loss(codes: torch.Tensor, similarity: torch.Tensor, database_codes: torch.Tensor,
              sampled_codes: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_hash, L_quant) for one batch.

    Args:
        codes: u, the batch's tanh outputs (bs × k).
        similarity: the batch's rows of S (bs × n).
        database_codes: B, the learned database codes (n × k).
        sampled_codes: B rows of the batch's own images (bs × k).
        gamma: weight of the quantization term.

    Both terms are divided by bs·n and scaled by 12/k, as in the fine-grained repos (the 12/k
    keeps the loss scale comparable across code lengths).
    """
    bs, k = codes.shape
    n = database_codes.shape[0]
    scale = 12.0 / (k * bs * n)
    hash_term = ((k * similarity - codes @ database_codes.T) ** 2).sum() * scale
    quant_term = gamma * ((codes - sampled_codes) ** 2).sum() * scale
    return hash_term, quant_term


def decorrelation_loss(codes: torch.Tensor) -> torch.Tensor:
    """A²-Net: mean((UᵀU − bs·I)²) / (bs·k), pushing the bits of a batch to be uncorrelated.

    bs is the number of rows of this batch: the public code uses the configured batch size,
    whose target bs·I is wrong for a short last batch (its ±1 codes have UᵀU diagonal = rows).
    """
    rows, k = codes.shape
    gram = codes.T @ codes
    eye = torch.eye(k, device=codes.device, dtype=codes.dtype)
    return ((gram - rows * eye) ** 2).mean() / (rows * k)


def reconstruction_loss(features: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """A²-Net: mean((v̂ − v)²), the tied decoder reconstructing the features from the codes."""
    return ((reconstruction - features) ** 2).mean()


def attention_dispersion_loss(attention: torch.Tensor) -> torch.Tensor:
    """AGMH's ADL: branches should attend to different positions.

    Args:
        attention: SIEA outputs (B, branches, C, H, W).

    Returns:
        Σ over branch pairs i<j of the batch-mean ⟨s_i, s_j⟩, divided by the number of pairs,
        where s_j is the softmax over positions of the channel-wise max of branch j.
    """
    b, branches = attention.shape[:2]
    spread = attention.flatten(3).amax(dim=2).float().softmax(dim=-1)  # (B, branches, HW)
    pairs = list(itertools.combinations(range(branches), 2))
    if not pairs:
        return attention.new_zeros(())
    total = sum((spread[:, i] * spread[:, j]).sum() for i, j in pairs)
    return total / (len(pairs) * b)


def wanted_outputs(*, use_reconstruction: bool, adl_weight: float) -> frozenset[str]:
    """The training-only model outputs that the active loss terms read (see :func:`training_losses`)."""
    return frozenset({"reconstruction"} if use_reconstruction else set()) | (
        {"attention"} if adl_weight > 0 else set())


def training_losses(out: dict[str, torch.Tensor], similarity: torch.Tensor, database_codes: torch.Tensor,
                    sampled_codes: torch.Tensor, *, gamma: float, use_reconstruction: bool,
                    adl_weight: float) -> dict[str, torch.Tensor]:
    """Every loss term of one batch, by name; their sum is the training loss.

    Args:
        out: ``model.forward_train(images)`` (``codes`` plus model-specific tensors).
        similarity, database_codes, sampled_codes, gamma: see :func:`adsh_loss`.
        use_reconstruction: add A²-Net's reconstruction + decorrelation terms (from half of training on).
        adl_weight: weight of AGMH's attention-dispersion loss (used when ``out`` has ``attention``).
    """
    codes = out["codes"].float()
    hash_term, quant_term = adsh_loss(codes, similarity, database_codes, sampled_codes, gamma)
    terms = {"hash": hash_term, "quant": quant_term}
    if use_reconstruction and "reconstruction" in out:
        terms["rec"] = reconstruction_loss(out["features"].float(), out["reconstruction"].float())
        terms["dec"] = decorrelation_loss(codes)
    if "attention" in out and adl_weight > 0:
        terms["adl"] = adl_weight * attention_dispersion_loss(out["attention"])
    return terms
