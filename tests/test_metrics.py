"""Retrieval metrics against hand-computed values and brute force over tie orders."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

import fgh_deploy.train.metrics as metrics
from fgh_deploy.bits import pack_codes
from fgh_deploy.errors import ConfigError
from fgh_deploy.train.metrics import (
    TIE_RULES,
    evaluate_retrieval,
    hamming_rank,
    mean_average_precision,
    precision_at_k,
    precision_within_radius,
    recall_at_k,
)


def codes_at(distances: list[int] | np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """One all-ones query and a database whose item i sits at Hamming distance distances[i]."""
    query = np.ones((1, bits), dtype=np.float32)
    database = np.ones((len(distances), bits), dtype=np.float32)
    for row, d in enumerate(distances):
        database[row, :d] = -1
    return query, database


def ap_of(relevance: list[int] | np.ndarray, k: int | None = None) -> float:
    """AP of one ranked 0/1 list, the DeepHash CalcTopMap way (hits in the top k as denominator)."""
    ranked = list(relevance)[:k]
    hits, total = 0, 0.0
    for position, rel in enumerate(ranked, start=1):
        if rel:
            hits += 1
            total += hits / position
    return total / hits if hits else 0.0


def ref_map(
    q: np.ndarray, ql: np.ndarray, db: np.ndarray, dbl: np.ndarray, topk: int | None
) -> float:
    """SEMICON's mean_average_precision in numpy, with a stable argsort for the tie order."""
    total = 0.0
    for i in range(len(q)):
        retrieval = (ql[i] @ dbl.T > 0).astype(float)
        distance = 0.5 * (db.shape[1] - q[i] @ db.T)
        retrieval = retrieval[np.argsort(distance, kind="stable")][:topk]
        count = int(retrieval.sum())
        if count == 0:
            continue
        score = np.linspace(1, count, count)
        index = np.flatnonzero(retrieval == 1) + 1.0
        total += (score / index).mean()
    return total / len(q)


def tie_orders(distances: np.ndarray) -> list[np.ndarray]:
    """Every ranking of the database that sorts by distance, i.e. all orders within ties."""
    groups = [np.flatnonzero(distances == d) for d in np.unique(distances)]
    return [
        np.concatenate(parts)
        for parts in itertools.product(*(itertools.permutations(g) for g in groups))
    ]


def random_tied_case(
    rng: np.random.Generator, max_group: int = 6, max_orders: int = 3000
) -> tuple[np.ndarray, np.ndarray]:
    """Distances with ties (groups of 1..max_group items) and 0/1 relevance, small enough to
    enumerate every tie order."""
    while True:
        sizes = rng.integers(1, max_group + 1, size=rng.integers(1, 5))
        if math.prod(math.factorial(int(s)) for s in sizes) > max_orders:
            continue
        distances = np.repeat(np.arange(len(sizes)), sizes)
        # Shuffle rows so that database order is not distance order.
        distances = distances[rng.permutation(len(distances))]
        relevant = (rng.random(len(distances)) < rng.uniform(0.2, 0.8)).astype(int)
        return distances, relevant


def single_query(distances: np.ndarray, relevant: np.ndarray) -> tuple[np.ndarray, ...]:
    """Codes and labels for one query whose relevant items are those marked 1."""
    bits = int(distances.max()) + 1
    query, database = codes_at(distances, bits)
    return query, np.array([1]), database, np.where(relevant == 1, 1, 0)


def assert_same_results(got: dict, want: dict) -> None:
    """Same keys and values; floats may differ by summation order only."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == (pytest.approx(value, abs=1e-12) if isinstance(value, float) else value)


# --- hand-computed values -------------------------------------------------------------


@pytest.fixture
def tiny() -> tuple[np.ndarray, ...]:
    """Two queries over 5 items at distances 0..4 from query 0.

    Query 0 (class 1): relevance in rank order 1 0 1 0 1. Query 1 (class 7) has no relevant item.
    """
    query, database = codes_at([0, 1, 2, 3, 4], bits=4)
    queries = np.concatenate([query, query])
    return queries, np.array([1, 7]), database, np.array([1, 0, 1, 2, 1])


def test_hand_computed_map(tiny: tuple[np.ndarray, ...]) -> None:
    q, ql, db, dbl = tiny
    ap0 = (1 / 1 + 2 / 3 + 3 / 5) / 3
    # The query without relevant items scores 0 but still counts.
    assert mean_average_precision(q, ql, db, dbl) == pytest.approx(ap0 / 2)
    assert mean_average_precision(q, ql, db, dbl, topk=2) == pytest.approx(1 / 2)
    assert mean_average_precision(q, ql, db, dbl, topk=3) == pytest.approx((1 + 2 / 3) / 2 / 2)
    assert mean_average_precision(q, ql, db, dbl, topk=99) == pytest.approx(ap0 / 2)
    # topk=-1 in the public code slices [:-1]: the last-ranked (relevant) item is dropped.
    legacy = mean_average_precision(q, ql, db, dbl, legacy_drop_last=True)
    assert legacy == pytest.approx((1 + 2 / 3) / 2 / 2)
    # Distinct distances: every tie rule agrees.
    for ties in TIE_RULES:
        assert mean_average_precision(q, ql, db, dbl, ties=ties) == pytest.approx(ap0 / 2)


def test_multi_label_relevance() -> None:
    query, db = codes_at([0, 1, 2, 3], bits=3)
    q_labels = np.array([[1, 0, 1, 0]])
    # Shares class 0, nothing, class 2, classes 0 and 2 -> relevance 1 0 1 1.
    db_labels = np.array([[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 1], [1, 0, 1, 0]])
    expected = (1 + 2 / 3 + 3 / 4) / 3
    assert mean_average_precision(query, q_labels, db, db_labels) == pytest.approx(expected)
    assert precision_at_k(query, q_labels, db, db_labels, k=2) == pytest.approx(0.5)
    assert recall_at_k(query, q_labels, db, db_labels, k=3) == pytest.approx(2 / 3)


def test_precision_recall_radius(tiny: tuple[np.ndarray, ...]) -> None:
    q, ql, db, dbl = tiny
    assert precision_at_k(q, ql, db, dbl, k=3) == pytest.approx((2 / 3 + 0) / 2)
    assert precision_at_k(q, ql, db, dbl, k=50) == pytest.approx((3 / 5) / 2)  # k clamped to 5
    # Query 1 has no relevant item: left out of recall.
    assert recall_at_k(q, ql, db, dbl, k=3) == pytest.approx(2 / 3)
    result = precision_within_radius(q, ql, db, dbl, radius=1)
    assert result.precision == pytest.approx((1 / 2 + 0) / 2)
    assert result.empty_fraction == 0.0
    # A query unlike every item retrieves nothing within radius 0: precision 0, counted.
    far = np.array([[1.0, -1.0, 1.0, 1.0]], dtype=np.float32)  # no database code
    both = np.concatenate([q[:1], far])
    result = precision_within_radius(both, ql, db, dbl, radius=0)
    assert result.precision == pytest.approx(0.5)
    assert result.empty_fraction == pytest.approx(0.5)


def test_matches_semicon_reference_with_stable_order() -> None:
    rng = np.random.default_rng(3)
    q = rng.choice([-1.0, 1.0], size=(40, 8))
    db = rng.choice([-1.0, 1.0], size=(300, 8))
    ql = np.eye(5)[rng.integers(0, 5, 40)]
    dbl = np.eye(5)[rng.integers(0, 5, 300)]
    for topk in (None, 1, 17, 100):
        ours = mean_average_precision(q, ql, db, dbl, topk=topk)
        assert ours == pytest.approx(ref_map(q, ql, db, dbl, topk), abs=1e-12)
    legacy = mean_average_precision(q, ql, db, dbl, legacy_drop_last=True)
    assert legacy == pytest.approx(ref_map(q, ql, db, dbl, -1), abs=1e-12)


# --- tie rules ----------------------------------------------------------------------


def test_expected_equals_brute_force_over_all_tie_orders() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        distances, relevant = random_tied_case(rng)
        q, ql, db, dbl = single_query(distances, relevant)
        orders = tie_orders(distances)
        nd = len(distances)
        for topk in sorted({min(k, nd) for k in (1, 2, 3, nd // 2 or 1, nd - 1 or 1, nd)}):
            scores = [ap_of(relevant[order], topk) for order in orders]
            expected = mean_average_precision(q, ql, db, dbl, topk=topk, ties="expected")
            assert expected == pytest.approx(np.mean(scores), abs=1e-12), (distances, relevant)
            hits = [relevant[order][:topk].sum() / topk for order in orders]
            precision = precision_at_k(q, ql, db, dbl, k=topk, ties="expected")
            assert precision == pytest.approx(np.mean(hits), abs=1e-12)
            for rule, extreme in (("best", max), ("worst", min)):
                assert precision_at_k(q, ql, db, dbl, k=topk, ties=rule) == pytest.approx(
                    extreme(hits), abs=1e-12
                )
        # For mAP@all, relevant-first / -last are the extremes over tie orders.
        all_scores = [ap_of(relevant[order]) for order in orders]
        best = mean_average_precision(q, ql, db, dbl, ties="best")
        worst = mean_average_precision(q, ql, db, dbl, ties="worst")
        assert best == pytest.approx(max(all_scores), abs=1e-12)
        assert worst == pytest.approx(min(all_scores), abs=1e-12)
        legacy = mean_average_precision(q, ql, db, dbl, ties="expected", legacy_drop_last=True)
        assert legacy == pytest.approx(np.mean([ap_of(relevant[o], nd - 1) for o in orders]))


def test_best_worst_at_k_follow_relevant_first_and_last_orders() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        distances, relevant = random_tied_case(rng)
        q, ql, db, dbl = single_query(distances, relevant)
        rows = np.arange(len(distances))
        best_order = np.lexsort((rows, -relevant, distances))
        worst_order = np.lexsort((rows, relevant, distances))
        for topk in (1, 2, 4):
            best = mean_average_precision(q, ql, db, dbl, topk=topk, ties="best")
            worst = mean_average_precision(q, ql, db, dbl, topk=topk, ties="worst")
            assert best == pytest.approx(ap_of(relevant[best_order], topk), abs=1e-12)
            assert worst == pytest.approx(ap_of(relevant[worst_order], topk), abs=1e-12)


def test_no_ties_every_rule_equals_index_order() -> None:
    rng = np.random.default_rng(2)
    distances = rng.permutation(12)
    relevant = rng.integers(0, 2, 12)
    q, ql, db, dbl = single_query(distances, relevant)
    for topk in (None, 1, 5, 11):
        index = mean_average_precision(q, ql, db, dbl, topk=topk)
        assert index == pytest.approx(ap_of(relevant[np.argsort(distances)], topk), abs=1e-12)
        for ties in TIE_RULES:
            assert mean_average_precision(q, ql, db, dbl, topk=topk, ties=ties) == pytest.approx(
                index, abs=1e-12
            )


def clustered_codes(
    rng: np.random.Generator,
    bits: int,
    classes: int,
    per_class_db: int,
    per_class_q: int,
    flip: float,
) -> tuple[np.ndarray, ...]:
    """Noisy copies of one random code per class; the database is sorted by class."""
    centers = rng.choice([-1.0, 1.0], size=(classes, bits))

    def draw(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(classes), per_class)
        signs = np.where(rng.random((len(labels), bits)) < flip, -1.0, 1.0)
        return centers[labels] * signs, labels

    q, ql = draw(per_class_q)
    db, dbl = draw(per_class_db)
    return q, ql, db, dbl


def test_rule_ordering_and_random_determinism() -> None:
    rng = np.random.default_rng(4)
    q, ql, db, dbl = clustered_codes(
        rng, bits=8, classes=6, per_class_db=40, per_class_q=8, flip=0.2
    )
    scores = {t: mean_average_precision(q, ql, db, dbl, ties=t) for t in TIE_RULES}
    assert scores["best"] >= scores["expected"] >= scores["worst"]
    for rule in ("index", "random"):
        assert scores["best"] >= scores[rule] >= scores["worst"]
    for k in (5, 50):
        precision = {t: precision_at_k(q, ql, db, dbl, k=k, ties=t) for t in TIE_RULES}
        middle = [precision[t] for t in ("index", "random", "expected")]
        assert precision["best"] >= max(middle)
        assert precision["worst"] <= min(middle)
    first = mean_average_precision(q, ql, db, dbl, ties="random", seed=7)
    assert mean_average_precision(q, ql, db, dbl, ties="random", seed=7) == first
    assert evaluate_retrieval(q, ql, db, dbl, ties="random", seed=7)["map@all/random"] == first


def test_deploy_tie_experiment_shape() -> None:
    """docs/deploy.md §D6: 12 bits, 20 classes, database sorted by class."""
    rng = np.random.default_rng(5)
    q, ql, db, dbl = clustered_codes(
        rng, bits=12, classes=20, per_class_db=50, per_class_q=10, flip=0.2
    )
    result = evaluate_retrieval(q, ql, db, dbl, topks=(100,))
    best, worst = result["map@all/best"], result["map@all/worst"]
    for middle in (result["map@all/index"], result["map@all/expected"]):
        assert best > middle > worst
    # Ties move the score by points at this length, and there are at most 13 distances.
    assert best - worst > 0.02
    assert result["distinct_distances"] <= 13
    # Tie-aware AP is the mean over random tie orders.
    randoms = [mean_average_precision(q, ql, db, dbl, ties="random", seed=s) for s in range(8)]
    assert np.mean(randoms) == pytest.approx(result["map@all/expected"], abs=0.01)


# --- inputs, outputs, chance level ---------------------------------------------------


def test_packed_and_unpacked_inputs_agree() -> None:
    rng = np.random.default_rng(6)
    q, ql, db, dbl = clustered_codes(
        rng, bits=12, classes=5, per_class_db=20, per_class_q=4, flip=0.25
    )
    tanh_q = q * rng.uniform(0.1, 1.0, q.shape)  # real-valued, same signs
    reference = evaluate_retrieval(tanh_q, ql, db, dbl, topks=(10, 1000))
    for q_in, db_in in ((pack_codes(q), pack_codes(db)), (pack_codes(q), db), (q, pack_codes(db))):
        assert evaluate_retrieval(q_in, ql, db_in, dbl, topks=(10, 1000)) == reference
    assert np.array_equal(hamming_rank(q, db), hamming_rank(pack_codes(q), pack_codes(db)))


def test_hamming_rank_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    q = rng.choice([-1.0, 1.0], size=(9, 20))
    db = rng.choice([-1.0, 1.0], size=(30, 20))
    distances = hamming_rank(q, db)
    assert distances.dtype == np.uint8
    assert np.array_equal(distances, (q[:, None, :] != db[None, :, :]).sum(axis=2))
    ql = rng.integers(0, 3, 9)
    dbl = rng.integers(0, 3, 30)
    whole = evaluate_retrieval(q, ql, db, dbl, topks=(5,), ties="random")
    # Blocks of one query must give the same numbers (up to summation order).
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 1)
    chunked = evaluate_retrieval(q, ql, db, dbl, topks=(5,), ties="random")
    assert np.array_equal(hamming_rank(q, db), distances)
    assert_same_results(chunked, whole)


def test_one_hot_multi_hot_and_ids_agree() -> None:
    rng = np.random.default_rng(8)
    q = rng.choice([-1.0, 1.0], size=(10, 6))
    db = rng.choice([-1.0, 1.0], size=(50, 6))
    ql, dbl = rng.integers(0, 4, 10), rng.integers(0, 4, 50)
    eye = np.eye(4, dtype=bool)
    by_ids = evaluate_retrieval(q, ql, db, dbl, topks=(7,))
    assert evaluate_retrieval(q, eye[ql], db, eye[dbl], topks=(7,)) == by_ids
    # An extra always-off class forces the general multi-hot (matmul) path.
    pad = np.zeros((1, 1), dtype=bool)
    ml_q = np.hstack([eye[ql], np.repeat(pad, 10, 0)])
    ml_q[0, 4] = True  # query 0 also has class 4, which no database item has
    ml_db = np.hstack([eye[dbl], np.repeat(pad, 50, 0)])
    multi = evaluate_retrieval(q, ml_q, db, ml_db, topks=(7,))
    assert_same_results(multi, by_ids)


def test_chance_level_matches_random_rankings() -> None:
    rng = np.random.default_rng(9)
    nd = 40
    labels_db = rng.integers(0, 4, nd)
    labels_q = np.array([0, 1, 2, 3, 9])  # the last has no relevant item
    q = rng.choice([-1.0, 1.0], size=(5, 8))
    db = rng.choice([-1.0, 1.0], size=(nd, 8))
    result = evaluate_retrieval(q, labels_q, db, labels_db, topks=(10,))
    relevant = labels_q[:, None] == labels_db[None, :]
    assert result["chance_precision"] == pytest.approx(relevant.mean(axis=1).mean())
    trials = 4000
    ap_all = np.empty(trials)
    ap_10 = np.empty(trials)
    for t in range(trials):
        order = rng.permutation(nd)
        ap_all[t] = np.mean([ap_of(row[order]) for row in relevant])
        ap_10[t] = np.mean([ap_of(row[order], 10) for row in relevant])
    for key, samples in (("chance_map@all", ap_all), ("chance_map@10", ap_10)):
        tolerance = 4 * samples.std() / math.sqrt(trials)
        assert result[key] == pytest.approx(samples.mean(), abs=tolerance)
    # With every database code equal, the whole ranking is one tie group: tie-aware = chance.
    flat_db = np.ones_like(db)
    tie_aware = mean_average_precision(q, labels_q, flat_db, labels_db, ties="expected")
    assert tie_aware == pytest.approx(result["chance_map@all"], abs=1e-12)


def test_evaluate_retrieval_keys_and_json() -> None:
    rng = np.random.default_rng(10)
    q, ql, db, dbl = clustered_codes(
        rng, bits=16, classes=4, per_class_db=10, per_class_q=3, flip=0.2
    )
    result = evaluate_retrieval(q, ql, db, dbl, topks=(5, 100), radius=2)
    json.dumps(result)
    assert result["tie_rule"] == "index"
    assert (result["num_queries"], result["num_database"]) == (12, 40)
    for key in (
        "map@all/index", "map@all/expected", "map@all/best", "map@all/worst",
        "map@5", "map@100", "precision@5", "recall@100", "precision@r2", "empty@r2",
        "chance_map@all", "chance_map@5", "chance_precision", "distinct_distances",
    ):  # fmt: skip
        assert key in result
    assert "map@all/random" not in result
    assert result["map@100"] == pytest.approx(mean_average_precision(q, ql, db, dbl, topk=100))
    assert result["map@all/index"] == pytest.approx(mean_average_precision(q, ql, db, dbl))
    expected5 = evaluate_retrieval(q, ql, db, dbl, topks=(5,), ties="expected")["map@5"]
    direct = mean_average_precision(q, ql, db, dbl, topk=5, ties="expected")
    assert expected5 == pytest.approx(direct)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ties": "stable"}, "unknown tie rule"),
        ({"topk": 0}, "topk must be at least 1"),
        ({"topk": 10, "legacy_drop_last": True}, "legacy_drop_last"),
    ],
)
def test_bad_options(tiny: tuple[np.ndarray, ...], kwargs: dict, message: str) -> None:
    q, ql, db, dbl = tiny
    with pytest.raises(ConfigError, match=message):
        mean_average_precision(q, ql, db, dbl, **kwargs)


def test_bad_inputs(tiny: tuple[np.ndarray, ...]) -> None:
    q, ql, db, dbl = tiny
    with pytest.raises(ConfigError, match="rows"):
        mean_average_precision(q, ql[:1], db, dbl)
    with pytest.raises(ConfigError, match="rows"):
        mean_average_precision(q, ql, db, dbl[:-1])
    with pytest.raises(ConfigError, match="code length"):
        mean_average_precision(q, ql, db[:, :3], dbl)
    with pytest.raises(ConfigError, match="code length"):
        mean_average_precision(pack_codes(q), ql, np.zeros((5, 2), np.uint8), dbl)
    with pytest.raises(ConfigError, match="both be class ids"):
        mean_average_precision(q, ql, db, np.eye(8)[dbl])
    with pytest.raises(ConfigError, match="only 0 and 1"):
        mean_average_precision(q, ql[:, None] * 3, db, dbl[:, None] * 3)
    with pytest.raises(ConfigError, match="NaN"):
        mean_average_precision(np.full_like(q, np.nan), ql, db, dbl)
    with pytest.raises(ConfigError, match="radius"):
        precision_within_radius(q, ql, db, dbl, radius=-1)
    with pytest.raises(ConfigError, match="no query"):
        mean_average_precision(q[:0], ql[:0], db, dbl)


def test_ranked_list_metrics_equal_the_code_metrics_on_the_same_ranking() -> None:
    rng = np.random.default_rng(3)
    q_codes, db_codes = rng.integers(0, 256, (40, 2), dtype=np.uint8), rng.integers(0, 256, (300, 2), dtype=np.uint8)
    q_labels, db_labels = rng.integers(0, 5, 40), rng.integers(0, 5, 300)
    distances = np.unpackbits(q_codes[:, None, :] ^ db_codes[None, :, :], axis=2).sum(axis=2)
    order = np.argsort(distances, axis=1, kind="stable")  # ties: database order, as ties="index"
    relevant = (db_labels[order] == q_labels[:, None])[:, :120]
    got = metrics.ranked_list_metrics(relevant, (1, 7, 120), database_size=300)
    for k in (1, 7, 120):
        assert got[f"map@{k}"] == pytest.approx(
            mean_average_precision(q_codes, q_labels, db_codes, db_labels, topk=k), abs=1e-12)
        assert got[f"precision@{k}"] == pytest.approx(
            precision_at_k(q_codes, q_labels, db_codes, db_labels, k=k), abs=1e-12)
    # Fewer items than k: k counts as the database size, missing ranks are not relevant.
    short = metrics.ranked_list_metrics(relevant[:, :5], (10,), database_size=5)
    assert short["precision@10"] == pytest.approx(relevant[:, :5].mean())
    with pytest.raises(ConfigError):
        metrics.ranked_list_metrics(relevant, (0,), database_size=300)
