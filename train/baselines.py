"""What training buys: untrained codes and float search on the backbone's pretrained features.

``fgh eval --baselines`` reports, next to a trained model and at the same code length:

* **LSH**: the signs of random Gaussian projections of the centred features (sign random
  projections, Charikar, STOC 2002), the floor any learned hash must clear;
* **ITQ**: PCA to ``bits`` dimensions, then the rotation that minimises the quantization error
  (Gong & Lazebnik, "Iterative Quantization", CVPR 2011; 50 iterations), the standard
  unsupervised hash;
* **cosine**: the float features ranked by cosine similarity, no hashing at all.

All three use the *same backbone's* pretrained global-pooled features (what ADSH's hash layer
reads at initialisation), from the eval preprocessing, and are fitted on the database split
only: the queries are never seen before they are searched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fgh_deploy.config import PreprocessConfig
from fgh_deploy.errors import ConfigError
from fgh_deploy.models import build_model

from .data import LabeledImageDataset, Sample
from .dcc import sign_plus
from .metrics import evaluate_retrieval
from .trunk_cache import trunk_maps

#: ITQ's alternating iterations (the paper's 50).
ITQ_ITERATIONS = 50


@torch.no_grad()
def pretrained_features(backbone: str, pretrained: bool | str, preprocess: PreprocessConfig,
                        samples: Sequence[Sample], root: Any, *, device: torch.device,
                        workers: int) -> torch.Tensor:
    """(n, C) global-pooled features of the backbone with its pretrained weights, eval preprocessing."""
    model = build_model("adsh", 8, backbone=backbone, pretrained=pretrained,
                        input_size=preprocess.input_size).to(device).eval()
    model = model.to(memory_format=torch.channels_last)
    images = LabeledImageDataset(list(samples), root, preprocess, train=False)
    features = torch.empty(len(samples), 0)
    for items, maps in trunk_maps(model, images, device=device, workers=workers, label="pretrained features"):
        pooled = model.global_features(maps.to(device).contiguous(memory_format=torch.channels_last)).float().cpu()
        if features.shape[1] == 0:
            features = torch.empty(len(samples), pooled.shape[1])
        features[items] = pooled
    return features


def lsh_projection(database: torch.Tensor, bits: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, projection): codes are ``sign((x − mean) @ projection)``, a Gaussian ``projection``."""
    x = database.double()
    gen = torch.Generator().manual_seed(seed)
    return x.mean(0), torch.randn(x.shape[1], bits, generator=gen, dtype=torch.float64)


def itq_projection(database: torch.Tensor, bits: int, iterations: int = ITQ_ITERATIONS,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, projection) of ITQ fitted on ``database`` (n, d): PCA to ``bits``, then a rotation.

    The rotation R alternates ``B = sign(V R)`` with the orthogonal Procrustes solution
    ``R = U Wᵀ`` of ``Vᵀ B = U Σ Wᵀ``, from a random orthogonal start (V = the PCA projections).

    Raises:
        ConfigError: ``bits`` exceeds what PCA of ``database`` can give (its rank bound).
    """
    x = database.double()
    n, d = x.shape
    if bits > min(n, d):
        raise ConfigError(f"ITQ needs bits ≤ min(images, feature dimension) = {min(n, d)}, got {bits}")
    mean = x.mean(0)
    centred = x - mean
    _, eigenvectors = torch.linalg.eigh(centred.T @ centred)
    pca = eigenvectors[:, -bits:].flip(1)  # the top `bits` principal directions
    v = centred @ pca
    gen = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(bits, bits, generator=gen, dtype=torch.float64))
    for _ in range(iterations):
        u, _, wt = torch.linalg.svd(v.T @ sign_plus(v @ rotation))
        rotation = u @ wt
    return mean, pca @ rotation


def project_codes(features: torch.Tensor, mean: torch.Tensor, projection: torch.Tensor) -> np.ndarray:
    """±1 codes (sign(0) = +1) of ``features`` under a fitted (mean, projection)."""
    return sign_plus((features.double() - mean) @ projection).float().numpy()


def cosine_retrieval(query: torch.Tensor, q_labels: np.ndarray, database: torch.Tensor, db_labels: np.ndarray,
                     *, topks: Sequence[int] = (100, 1000), chunk: int = 256) -> dict[str, Any]:
    """mAP@all, mAP@k, precision@k and recall@k of float features ranked by cosine similarity.

    The definitions are those of :func:`~train.metrics.evaluate_retrieval` (relevance = a shared
    label; AP@k averages precision over the relevant items in the top k); equal similarities
    keep database order, which for float features almost never matters.
    """
    q = torch.nn.functional.normalize(query.double(), dim=1)
    db = torch.nn.functional.normalize(database.double(), dim=1)
    nd = len(db)
    cutoffs = {k: min(k, nd) for k in topks}
    sums: dict[str, float] = {}
    with_relevant = 0
    for start in range(0, len(q), chunk):
        order = torch.argsort(-(q[start:start + chunk] @ db.T), dim=1, stable=True).numpy()
        relevant = _relevance(q_labels[start:start + chunk], db_labels)
        ranked = np.take_along_axis(relevant, order, axis=1)
        hits = np.cumsum(ranked, axis=1)
        precision = hits / np.arange(1, nd + 1)
        total = ranked.sum(1)
        with_relevant += int(np.count_nonzero(total))
        for name, cut in [("all", nd), *cutoffs.items()]:
            found = hits[:, cut - 1]
            ap = np.where(found > 0, (precision[:, :cut] * ranked[:, :cut]).sum(1) / np.maximum(found, 1), 0.0)
            sums[f"map@{name}"] = sums.get(f"map@{name}", 0.0) + float(ap.sum())
            if name != "all":
                sums[f"precision@{name}"] = sums.get(f"precision@{name}", 0.0) + float((found / cut).sum())
                recall = np.where(total > 0, found / np.maximum(total, 1), 0.0)
                sums[f"recall@{name}"] = sums.get(f"recall@{name}", 0.0) + float(recall.sum())
    result: dict[str, Any] = {"num_queries": len(q), "num_database": nd}
    for key, value in sums.items():
        result[key] = value / (with_relevant if key.startswith("recall@") else len(q)) if len(q) else 0.0
    # No tie groups: every tie rule gives the same mAP@all.
    map_all = result.pop("map@all")
    for rule in ("index", "expected", "best", "worst"):
        result[f"map@all/{rule}"] = map_all
    return result


def _relevance(q_labels: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    """(nq, nd) bool: a query and a database item share a label (class ids or multi-hot)."""
    if q_labels.ndim == 1:
        return q_labels[:, None] == db_labels[None, :]
    return (q_labels.astype(np.float64) @ db_labels.astype(np.float64).T) > 0


def evaluate_baselines(query: torch.Tensor, q_labels: np.ndarray, database: torch.Tensor, db_labels: np.ndarray,
                       bits: int, *, topks: Sequence[int] = (100, 1000), radius: int = 2,
                       seed: int = 0) -> dict[str, Any]:
    """``{"lsh": metrics, "itq": metrics, "cosine": metrics}`` for pretrained features.

    LSH and ITQ report every metric of :func:`~train.metrics.evaluate_retrieval`; cosine the
    ranking metrics of :func:`cosine_retrieval`. An ITQ that cannot be fitted (more bits than
    the features have dimensions) is reported as ``{"unavailable": reason}``.
    """
    results: dict[str, Any] = {}
    for name, fit in (("lsh", lsh_projection), ("itq", itq_projection)):
        try:
            mean, projection = fit(database, bits, seed=seed)
        except ConfigError as exc:
            results[name] = {"unavailable": str(exc)}
            continue
        results[name] = evaluate_retrieval(project_codes(query, mean, projection), q_labels,
                                           project_codes(database, mean, projection), db_labels,
                                           topks=tuple(topks), radius=radius)
    results["cosine"] = cosine_retrieval(query, q_labels, database, db_labels, topks=topks)
    chance = next((r for r in results.values() if "chance_map@all" in r), {})
    results["cosine"].update({k: v for k, v in chance.items() if k.startswith("chance_")})
    return results
