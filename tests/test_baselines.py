"""Baselines of fgh eval --baselines: LSH, ITQ and float cosine on pretrained features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fgh_deploy.train.baselines import cosine_retrieval, evaluate_baselines, itq_projection, lsh_projection, project_codes
from fgh_deploy.train.dcc import sign_plus
from fgh_deploy.train.metrics import evaluate_retrieval


def _clusters(classes: int = 8, per_class: int = 30, dim: int = 64, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Class clusters on a shared positive offset, like pooled ReLU features: labels (n,)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen) * 1.5
    labels = np.repeat(np.arange(classes), per_class)
    features = 5.0 + centres[labels] + torch.randn(len(labels), dim, generator=gen)
    return features, labels


def test_itq_rotation_is_orthogonal_and_lowers_the_quantization_error() -> None:
    features, _ = _clusters()
    mean, projection = itq_projection(features, 16)
    centred = features.double() - mean
    # projection = PCA (d × 16, orthonormal columns) @ R (16 × 16, orthogonal).
    torch.testing.assert_close(projection.T @ projection, torch.eye(16, dtype=torch.float64), atol=1e-8, rtol=0)
    v = centred @ projection
    mean0, pca_only = itq_projection(features, 16, iterations=0)
    v0 = centred @ pca_only
    error = lambda x: float(((sign_plus(x) - x) ** 2).sum())  # noqa: E731
    assert error(v) < error(v0)


def test_itq_beats_lsh_and_cosine_beats_both_on_clustered_features() -> None:
    features, labels = _clusters()
    query, q_labels = features[::3], labels[::3]
    database, db_labels = features, labels
    results = evaluate_baselines(query, q_labels, database, db_labels, 16, topks=(10,))
    lsh, itq, cosine = (results[k]["map@all/expected"] for k in ("lsh", "itq", "cosine"))
    chance = results["lsh"]["chance_map@all"]
    assert chance < lsh < itq <= cosine + 1e-9
    assert results["cosine"]["chance_map@all"] == chance


def test_lsh_projection_is_seeded() -> None:
    features, _ = _clusters()
    assert torch.equal(lsh_projection(features, 8, seed=1)[1], lsh_projection(features, 8, seed=1)[1])
    assert not torch.equal(lsh_projection(features, 8, seed=1)[1], lsh_projection(features, 8, seed=2)[1])


def test_cosine_of_binary_codes_ranks_like_hamming_distance() -> None:
    # For ±1 codes cosine = 1 − 2·Hamming/bits: both rankings (and tie rule: database order) agree.
    # 16 bits: the normalised entries are ±1/4, so equal distances give exactly equal similarities.
    rng = np.random.default_rng(0)
    codes = np.where(rng.random((120, 16)) > 0.5, 1.0, -1.0)
    labels = rng.integers(0, 5, 120)
    hamming = evaluate_retrieval(codes[:30], labels[:30], codes, labels, topks=(7, 50), ties="index")
    cosine = cosine_retrieval(torch.tensor(codes[:30]), labels[:30], torch.tensor(codes), labels, topks=(7, 50))
    for key in ("map@all/index", "map@7", "precision@7", "recall@7", "map@50", "precision@50", "recall@50"):
        assert cosine[key] == pytest.approx(hamming[key], abs=1e-12), key


def test_itq_with_more_bits_than_dimensions_is_reported_unavailable() -> None:
    features, labels = _clusters(dim=8)
    results = evaluate_baselines(features, labels, features, labels, 16, topks=(5,))
    assert "bits ≤" in results["itq"]["unavailable"]
    assert "map@all/expected" in results["lsh"]


def test_project_codes_maps_zero_to_plus_one() -> None:
    codes = project_codes(torch.zeros(2, 3), torch.zeros(3), torch.eye(3, dtype=torch.float64))
    assert (codes == 1.0).all()
