"""Retrieval metrics for hash codes: Hamming ranking, mAP with an explicit tie rule, precision.

Protocol (DeepHash-pytorch ``CalcTopMap``, SEMICON ``mean_average_precision``):

* Relevance: a database item is relevant to a query when they share at least one label
  (class ids ``(n,)`` or multi-hot ``(n, C)``).
* Each query ranks the whole database by Hamming distance; the list is cut at ``topk``
  (``None`` = all). ``AP@k`` is the mean, over the relevant items in the top ``k``, of
  ``(relevant items so far) / position``. Its denominator is the number of relevant items
  *retrieved in the top k*, not all relevant items. A query with no relevant item in the top
  ``k`` scores 0 and still counts in the mean over queries.

Ties. Hamming distances take only ``bits + 1`` values, so most of the ranking is decided by
how ties are broken; at 12 bits that moves mAP by many points (``docs/deploy.md`` §D6). The
public code uses an unstable ``argsort``, so its tie order depends on the library and device.
Every function here takes ``ties``, one of :data:`TIE_RULES`:

* ``"index"`` (default): stable sort by ``(distance, database row)``, deterministic. If the
  database is sorted by class, this favours some classes over others.
* ``"random"``: the database is shuffled once with ``np.random.default_rng(seed)``, then sorted
  stably. Each query's tie order is uniformly random, and one shuffle serves all queries.
* ``"expected"``: tie-aware AP, the exact expectation of AP over all orderings inside each
  tie group (He et al., "Hashing as Tie-Aware Learning to Rank", CVPR 2018). It is computed
  in closed form from per-distance counts; see :func:`mean_average_precision`.
* ``"best"`` / ``"worst"``: relevant items first / last inside each tie group. For mAP@all and
  precision@k these are the largest and smallest scores that tie order alone can produce.
  For AP@k they are only the "relevant first/last" orders, not the true extremes: AP@k
  divides by the number of hits in the top k, so one more hit with a low precision can lower
  it.

Inputs: codes are real-valued ``(n, bits)`` arrays (±1 or tanh outputs, packed with
:func:`fgh_deploy.bits.pack_codes`, ``u >= 0`` → 1) or already-packed ``uint8`` ``(n, bytes)``.
Queries and database may mix the two forms. All work runs over chunks of queries, so memory
stays bounded for any database size.

Bad arguments (shapes, dtypes, labels, tie rules, cut-offs) raise
:class:`~fgh_deploy.errors.ConfigError`, a :class:`ValueError` that the CLI shows as one line.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np

from fgh_deploy.bits import pack_codes
from fgh_deploy.errors import ConfigError, FghError
from fgh_deploy.search import HammingSearcher
from fgh_deploy.utils import check_int

TIE_RULES = ("index", "random", "expected", "best", "worst")
"""Ways to order database items at equal Hamming distance (see the module docstring)."""

# Query rows per chunk = this / database size. The largest temporary per element is an
# int64 (a sort index or a bincount key), so one chunk needs a few tens of MiB, and chunks
# still hold hundreds of queries at the fine-grained database sizes (6k to 76k items).
_CHUNK_ELEMENTS = 1 << 21


class RadiusPrecision(NamedTuple):
    """Precision of Hamming-ball lookup (:func:`precision_within_radius`).

    Attributes:
        precision: Mean over queries of the share of relevant items among those within the
            radius. A query that retrieves nothing counts as 0.
        empty_fraction: Share of queries that retrieve nothing within the radius.
    """

    precision: float
    empty_fraction: float


def hamming_rank(query_codes: Any, db_codes: Any) -> np.ndarray:
    """Hamming distances from every query to every database item.

    Args:
        query_codes: ``(nq, bits)`` real-valued codes or ``(nq, bytes)`` packed ``uint8`` codes.
        db_codes: ``(nd, bits)`` or ``(nd, bytes)``, in either form.

    Returns:
        ``(nq, nd)`` array of the smallest unsigned dtype that holds ``8 * bytes``
        (``uint8`` up to 255 bits). A stable sort of a row ranks the database by
        ``(distance, row)``.

    Raises:
        ConfigError: Bad shapes or dtypes, or queries and database of different code lengths.
    """
    queries, searcher = _prepare_codes(query_codes, db_codes)
    dtype = _distance_dtype(searcher.code_size)
    out = np.empty((len(queries), searcher.ntotal), dtype=dtype)
    for start, stop in _chunk_bounds(len(queries), searcher.ntotal):
        out[start:stop] = searcher.distances(queries[start:stop])
    return out


def mean_average_precision(
    q_codes: Any,
    q_labels: Any,
    db_codes: Any,
    db_labels: Any,
    *,
    topk: int | None = None,
    ties: str = "index",
    seed: int = 0,
    legacy_drop_last: bool = False,
) -> float:
    """mAP@k of Hamming ranking, as the hashing papers compute it, with an explicit tie rule.

    Tie-aware AP (``ties="expected"``). Per query, let distance group ``d`` hold ``n_d`` items,
    ``r_d`` of them relevant, with ``N_d`` items and ``R_d`` relevant ranked before it. Inside
    the group, a relevant item sits at each position ``p = 1..n_d`` with probability ``1/n_d``,
    and given ``p`` it expects ``1 + (p - 1)(r_d - 1)/(n_d - 1)`` relevant items at or before
    it there (hypergeometric). Summing its precision over the group's relevant items gives::

        F_d = (r_d / n_d) * sum_{p=1..n_d} (R_d + 1 + b_d (p - 1)) / (N_d + p),
              b_d = (r_d - 1) / (n_d - 1)        (0 when n_d = 1)
            = r_d b_d + (r_d / n_d) (R_d + 1 - b_d (1 + N_d)) (H[N_d + n_d] - H[N_d])

    where ``H`` are harmonic numbers. Groups are shuffled independently, so for mAP@all
    ``E[AP] = sum_d F_d / R_total``, exactly as in He et al.

    For mAP@k, the group ``s`` that holds position ``k`` is cut after ``m = k - N_s`` of its
    items, so the number ``X`` of its relevant items inside the cut is random
    (hypergeometric: ``r_s`` relevant of ``n_s`` items, ``m`` drawn), and so is AP@k's
    denominator ``R_s + X``. Groups before ``s`` are independent of ``X``, so the exact
    expectation is::

        E[AP@k] = sum_x P(X = x) * (sum_{d<s} F_d + F(N_s, R_s, m, x)) / (R_s + x)

    where ``F(N, R, m, x)`` is ``F_d`` for a group of ``m`` items with ``x`` relevant: given
    ``X = x``, the ``x`` hits are uniformly placed among the first ``m`` positions. A term with
    ``R_s + x = 0`` is 0 (no hit). This is exact, not an approximation; with ``k >= nd``
    it reduces to the mAP@all formula.

    Args:
        q_codes: Query codes, real-valued ``(nq, bits)`` or packed ``uint8`` ``(nq, bytes)``.
        q_labels: Query class ids ``(nq,)`` or multi-hot ``(nq, C)`` 0/1 labels.
        db_codes: Database codes, in either form, of the same code length as ``q_codes``.
        db_labels: Database labels, in the same form as ``q_labels``.
        topk: Cut the ranking after this many items; ``None`` (or any ``topk >= nd``) is
            mAP@all.
        ties: One of :data:`TIE_RULES`.
        seed: Seed of the database shuffle for ``ties="random"``; ignored otherwise.
        legacy_drop_last: Reproduce the public code's mAP@all, which passes ``topk=-1`` and so
            slices ``[:-1]``, dropping the last-ranked database item (under ``ties``). Only
            with ``topk=None``. Use it for parity with published numbers, not as a metric.

    Returns:
        mAP in ``[0, 1]``.

    Raises:
        ConfigError: Bad codes or labels, mismatched lengths, an unknown tie rule, ``topk`` < 1,
            or ``legacy_drop_last`` with a ``topk``.
    """
    _check_ties(ties)
    ctx = _Context(q_codes, q_labels, db_codes, db_labels, seed=seed)
    if legacy_drop_last:
        if topk is not None:
            raise ConfigError(
                "legacy_drop_last reproduces topk=-1 (mAP@all minus the last item); "
                f"it cannot be combined with topk={topk!r}"
            )
        cutoff = ctx.num_database - 1
    else:
        cutoff = ctx.cutoff(topk)
    total = sum(chunk.average_precision(cutoff, ties).sum() for chunk in ctx.chunks())
    return float(total / ctx.num_queries)


def precision_at_k(
    q_codes: Any,
    q_labels: Any,
    db_codes: Any,
    db_labels: Any,
    *,
    k: int,
    ties: str = "index",
    seed: int = 0,
) -> float:
    """Mean over queries of the share of relevant items among the top ``k``.

    Under ``ties="expected"`` the cut group contributes its expected hits ``m * r_s / n_s``
    (exact, precision is linear in the hits).

    Args:
        q_codes: Query codes, real-valued ``(nq, bits)`` or packed ``uint8`` ``(nq, bytes)``.
        q_labels: Query class ids ``(nq,)`` or multi-hot ``(nq, C)``.
        db_codes: Database codes, in either form.
        db_labels: Database labels, in the same form as ``q_labels``.
        k: Items retrieved per query, at least 1; ``k > nd`` is treated as ``nd``.
        ties: One of :data:`TIE_RULES`.
        seed: Seed of the database shuffle for ``ties="random"``.

    Returns:
        Precision@k in ``[0, 1]``.

    Raises:
        ConfigError: Bad inputs, an unknown tie rule or ``k`` < 1.
    """
    _check_ties(ties)
    ctx = _Context(q_codes, q_labels, db_codes, db_labels, seed=seed)
    cutoff = ctx.cutoff(k)
    hits = sum(chunk.hits(cutoff, ties).sum() for chunk in ctx.chunks())
    return float(hits / (cutoff * ctx.num_queries))


def recall_at_k(
    q_codes: Any,
    q_labels: Any,
    db_codes: Any,
    db_labels: Any,
    *,
    k: int,
    ties: str = "index",
    seed: int = 0,
) -> float:
    """Mean over queries of the share of their relevant database items found in the top ``k``.

    Recall is undefined for a query with no relevant item in the database; such queries are
    left out of the mean (unlike AP, where they count as 0). If no query has one, returns 0.

    Args:
        q_codes: Query codes, real-valued ``(nq, bits)`` or packed ``uint8`` ``(nq, bytes)``.
        q_labels: Query class ids ``(nq,)`` or multi-hot ``(nq, C)``.
        db_codes: Database codes, in either form.
        db_labels: Database labels, in the same form as ``q_labels``.
        k: Items retrieved per query, at least 1; ``k > nd`` is treated as ``nd``.
        ties: One of :data:`TIE_RULES`.
        seed: Seed of the database shuffle for ``ties="random"``.

    Returns:
        Recall@k in ``[0, 1]``.

    Raises:
        ConfigError: Bad inputs, an unknown tie rule or ``k`` < 1.
    """
    _check_ties(ties)
    ctx = _Context(q_codes, q_labels, db_codes, db_labels, seed=seed)
    cutoff = ctx.cutoff(k)
    total, counted = 0.0, 0
    for chunk in ctx.chunks():
        recall, has_relevant = chunk.recall(cutoff, ties)
        total += recall.sum()
        counted += int(has_relevant.sum())
    return float(total / counted) if counted else 0.0


def precision_within_radius(
    q_codes: Any, q_labels: Any, db_codes: Any, db_labels: Any, *, radius: int = 2
) -> RadiusPrecision:
    """Precision of hash lookup: items within Hamming distance ``radius`` (inclusive).

    Tie order does not matter here: the whole ball is retrieved.

    Args:
        q_codes: Query codes, real-valued ``(nq, bits)`` or packed ``uint8`` ``(nq, bytes)``.
        q_labels: Query class ids ``(nq,)`` or multi-hot ``(nq, C)``.
        db_codes: Database codes, in either form.
        db_labels: Database labels, in the same form as ``q_labels``.
        radius: Largest distance retrieved, at least 0.

    Returns:
        ``RadiusPrecision(precision, empty_fraction)``; queries retrieving nothing count as
        precision 0 and make up ``empty_fraction``.

    Raises:
        ConfigError: Bad inputs or ``radius`` < 0.
    """
    ctx = _Context(q_codes, q_labels, db_codes, db_labels)
    radius = check_int(radius, "radius", minimum=0, error=ConfigError)
    precision, empty = 0.0, 0
    for chunk in ctx.chunks():
        chunk_precision, chunk_empty = chunk.radius_precision(radius)
        precision += chunk_precision.sum()
        empty += int(chunk_empty.sum())
    return RadiusPrecision(float(precision / ctx.num_queries), empty / ctx.num_queries)


def ranked_list_metrics(relevant: Any, cutoffs: Sequence[int], database_size: int) -> dict[str, float]:
    """mAP@k and precision@k of rankings a search has already made (e.g. ``fgh query``'s hits).

    The same definitions as :func:`mean_average_precision` and :func:`precision_at_k` with the
    ranking as given: its tie order is whatever the search returned.

    Args:
        relevant: ``(nq, K)`` booleans, query ``i``'s hits in rank order (``K >= max(cutoffs)``
            unless the database is smaller; missing hits are False).
        cutoffs: the ``k`` of each metric, at least 1.
        database_size: items each query could retrieve (``k > database_size`` counts as ``database_size``).

    Returns:
        ``{"map@k": …, "precision@k": …}`` for every ``k`` in ``cutoffs``.
    """
    relevant = np.asarray(relevant, dtype=bool)
    if relevant.ndim != 2 or not len(relevant):
        raise ConfigError(f"relevant must be a non-empty (queries, ranks) array, got shape {relevant.shape}")
    if not cutoffs or min(cutoffs) < 1 or database_size < 1:
        raise ConfigError(f"cutoffs and database_size must be at least 1, got {list(cutoffs)} and {database_size}")
    # Ranks as distances: a stable sort leaves the given order as it is.
    ranked = _Ranked(np.broadcast_to(np.arange(relevant.shape[1]), relevant.shape), relevant)
    metrics = {}
    for k in cutoffs:
        cutoff = min(k, database_size)
        metrics[f"map@{k}"] = float(ranked.average_precision(cutoff).mean())
        metrics[f"precision@{k}"] = float(ranked.hits(cutoff).sum() / (cutoff * len(relevant)))
    return metrics


def evaluate_retrieval(
    q_codes: Any,
    q_labels: Any,
    db_codes: Any,
    db_labels: Any,
    *,
    topks: Sequence[int] = (100, 1000),
    radius: int = 2,
    ties: str = "index",
    seed: int = 0,
) -> dict[str, Any]:
    """Every retrieval metric ``fgh eval`` reports, in one pass over the queries.

    Args:
        q_codes: Query codes, real-valued ``(nq, bits)`` or packed ``uint8`` ``(nq, bytes)``.
        q_labels: Query class ids ``(nq,)`` or multi-hot ``(nq, C)``.
        db_codes: Database codes, in either form.
        db_labels: Database labels, in the same form as ``q_labels``.
        topks: Cut-offs for mAP@k, precision@k and recall@k (each at least 1; a cut-off over
            ``nd`` is treated as ``nd`` but keeps its name).
        radius: Hamming radius for lookup precision.
        ties: Tie rule for the @k metrics, one of :data:`TIE_RULES`.
        seed: Seed of the database shuffle for ``ties="random"``.

    Returns:
        A JSON-serialisable flat dict:

        * ``tie_rule``, ``num_queries``, ``num_database``;
        * ``distinct_distances``: how many Hamming distance values occur over all pairs;
        * ``map@all/index``, ``map@all/expected``, ``map@all/best``, ``map@all/worst``
          (and ``map@all/random`` when ``ties="random"``): mAP@all under each tie rule;
          best and worst bound what tie order alone can do;
        * ``map@K``, ``precision@K``, ``recall@K`` for each ``K`` in ``topks``, under ``ties``;
        * ``precision@r{radius}``, ``empty@r{radius}``: see :func:`precision_within_radius`;
        * ``chance_map@all``, ``chance_map@K``: the exact expected mAP of a uniformly random
          ranking of the database (tie-aware AP with every item in one tie group);
        * ``chance_precision``: mean over queries of the share of relevant items in the
          database, the expected precision@k of a random ranking for any k.

    Raises:
        ConfigError: Bad inputs, an unknown tie rule, a cut-off < 1 or ``radius`` < 0.
    """
    _check_ties(ties)
    ctx = _Context(q_codes, q_labels, db_codes, db_labels, seed=seed)
    radius = check_int(radius, "radius", minimum=0, error=ConfigError)
    cutoffs = {k: ctx.cutoff(k) for k in topks}
    all_rules = ["index", "expected", "best", "worst"] + (["random"] if ties == "random" else [])

    sums: dict[str, float] = {}

    def add(key: str, values: np.ndarray) -> None:
        sums[key] = sums.get(key, 0.0) + float(values.sum())

    recall_counted = 0
    seen_distances = np.zeros(ctx.num_groups, dtype=bool)
    for chunk in ctx.chunks():
        seen_distances |= chunk.group_sizes.sum(axis=0) > 0
        for rule in all_rules:
            add(f"map@all/{rule}", chunk.average_precision(ctx.num_database, rule))
        recall_counted += int(np.count_nonzero(chunk.relevant_total))
        for name, cutoff in cutoffs.items():
            add(f"map@{name}", chunk.average_precision(cutoff, ties))
            add(f"precision@{name}", chunk.hits(cutoff, ties) / cutoff)
            add(f"recall@{name}", chunk.recall(cutoff, ties)[0])
        precision, empty = chunk.radius_precision(radius)
        add(f"precision@r{radius}", precision)
        add(f"empty@r{radius}", empty)
        chance = chunk.chance()
        add("chance_map@all", chance.average_precision(ctx.num_database, "expected"))
        for name, cutoff in cutoffs.items():
            add(f"chance_map@{name}", chance.average_precision(cutoff, "expected"))
        add("chance_precision", chunk.relevant_total / ctx.num_database)

    result: dict[str, Any] = {
        "tie_rule": ties,
        "num_queries": ctx.num_queries,
        "num_database": ctx.num_database,
        "distinct_distances": int(seen_distances.sum()),
    }
    for key, total in sums.items():
        # Recall averages over the queries that have a relevant item; the rest over all.
        denominator = recall_counted if key.startswith("recall@") else ctx.num_queries
        result[key] = total / denominator if denominator else 0.0
    return result


class _Context:
    """Validated codes and labels, and the tables every chunk shares."""

    def __init__(
        self, q_codes: Any, q_labels: Any, db_codes: Any, db_labels: Any, *, seed: int = 0
    ) -> None:
        self.queries, self.searcher = _prepare_codes(q_codes, db_codes)
        self.num_queries = len(self.queries)
        self.num_database = self.searcher.ntotal
        if self.num_queries == 0:
            raise ConfigError("no query codes: metrics average over queries")
        if self.num_database == 0:
            raise ConfigError("the database is empty")
        self.q_labels, self.db_labels, self.multi_label = _prepare_labels(
            q_labels, db_labels, self.num_queries, self.num_database
        )
        self.num_groups = 8 * self.searcher.code_size + 1
        self.seed = check_int(seed, "seed", minimum=0, error=ConfigError)
        counts = np.arange(1, self.num_database + 1, dtype=np.float64)
        # H[i] = 1 + 1/2 + ... + 1/i and log(i!) for i = 0..nd: every closed form below
        # indexes them with item counts, which never exceed nd.
        self.harmonic = np.concatenate(([0.0], np.cumsum(1.0 / counts)))
        self.log_factorial = np.concatenate(([0.0], np.cumsum(np.log(counts))))

    @cached_property
    def shuffle(self) -> np.ndarray:
        """The seeded database permutation behind ``ties="random"``."""
        return np.random.default_rng(self.seed).permutation(self.num_database)

    def cutoff(self, topk: int | None) -> int:
        """Items kept per ranking: ``topk`` clamped to the database size, ``None`` = all."""
        if topk is None:
            return self.num_database
        return min(check_int(topk, "topk", minimum=1, error=ConfigError), self.num_database)

    def chunks(self) -> Iterator[_Chunk]:
        """Distances and relevance for consecutive blocks of queries."""
        dtype = _distance_dtype(self.searcher.code_size)
        for start, stop in _chunk_bounds(self.num_queries, self.num_database):
            distances = self.searcher.distances(self.queries[start:stop]).astype(dtype)
            yield _Chunk(self, distances, self._relevance(start, stop))

    def _relevance(self, start: int, stop: int) -> np.ndarray:
        """``(stop - start, nd)`` bool: the query and the item share at least one label."""
        if self.multi_label:
            # float32 matmul is exact for label counts below 2**24 and runs on BLAS.
            return (self.q_labels[start:stop] @ self.db_labels.T) > 0
        return self.q_labels[start:stop, np.newaxis] == self.db_labels[np.newaxis, :]


class _Chunk:
    """Per-query metrics for one block of queries (each method returns one value per query)."""

    def __init__(self, ctx: _Context, distances: np.ndarray, relevant: np.ndarray) -> None:
        self.ctx = ctx
        self.distances = distances
        self.relevant = relevant
        self.rows = len(relevant)
        self._ranked_by_rule: dict[str, _Ranked] = {}

    @cached_property
    def _counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Items and relevant items per (query, distance): the tie groups, in rank order."""
        groups = self.ctx.num_groups
        # One bincount over (row, distance) keys histograms every row at once.
        keys = self.distances + (np.arange(self.rows) * groups)[:, np.newaxis]
        size = self.rows * groups
        sizes = np.bincount(keys.ravel(), minlength=size).reshape(self.rows, groups)
        relevant = np.bincount(keys[self.relevant], minlength=size).reshape(self.rows, groups)
        return sizes, relevant

    @property
    def group_sizes(self) -> np.ndarray:
        """``(rows, groups)`` number of database items at each distance."""
        return self._counts[0]

    @cached_property
    def relevant_total(self) -> np.ndarray:
        """``(rows,)`` relevant items in the whole database."""
        return self._counts[1].sum(axis=1)

    def chance(self) -> _Groups:
        """The tie groups of a random ranking: the whole database is one group."""
        return _Groups(
            self.ctx, self.group_sizes.sum(axis=1, keepdims=True), self.relevant_total[:, None]
        )

    @cached_property
    def _groups(self) -> _Groups:
        return _Groups(self.ctx, *self._counts)

    def _ranked(self, rule: str) -> _Ranked:
        """The relevant items' ranks under ``"index"`` or ``"random"``, cached per rule."""
        if rule not in self._ranked_by_rule:
            distances, relevant = self.distances, self.relevant
            if rule == "random":
                # Reordering the database columns, then sorting stably, breaks ties by
                # shuffled position; AP only reads positions, never the original rows.
                shuffle = self.ctx.shuffle
                distances, relevant = distances[:, shuffle], relevant[:, shuffle]
            self._ranked_by_rule[rule] = _Ranked(distances, relevant)
        return self._ranked_by_rule[rule]

    def average_precision(self, cutoff: int, rule: str) -> np.ndarray:
        """``(rows,)`` AP@cutoff under tie rule ``rule``."""
        if cutoff == 0:
            return np.zeros(self.rows)
        if rule in ("index", "random"):
            return self._ranked(rule).average_precision(cutoff)
        return self._groups.average_precision(cutoff, rule)

    def hits(self, cutoff: int, rule: str) -> np.ndarray:
        """``(rows,)`` relevant items in the top ``cutoff`` (expected value for "expected")."""
        if rule in ("index", "random"):
            return self._ranked(rule).hits(cutoff)
        return self._groups.hits(cutoff, rule)

    def recall(self, cutoff: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
        """``(recall, has_relevant)``: recall is 0 where the query has no relevant item."""
        total = self.relevant_total
        has_relevant = total > 0
        recall = np.divide(
            self.hits(cutoff, rule), total, out=np.zeros(self.rows), where=has_relevant
        )
        return recall, has_relevant

    def radius_precision(self, radius: int) -> tuple[np.ndarray, np.ndarray]:
        """``(precision, empty)`` of the Hamming ball of ``radius`` around each query."""
        sizes, relevant = self._counts
        inside = sizes[:, : radius + 1].sum(axis=1)
        hits = relevant[:, : radius + 1].sum(axis=1)
        empty = inside == 0
        return np.divide(hits, inside, out=np.zeros(self.rows), where=~empty), empty


class _Ranked:
    """Ranks of the relevant items after a stable sort of each row by distance."""

    def __init__(self, distances: np.ndarray, relevant: np.ndarray) -> None:
        # Stable argsort of uint8/uint16 keys is a radix sort in numpy: (distance, column)
        # order in linear time, no lexsort needed.
        order = np.argsort(distances, axis=1, kind="stable")
        ranked = np.take_along_axis(relevant, order, axis=1)
        # Only relevant positions matter to AP, and they are few: keep them as a sparse list
        # (row-major, so positions ascend within each row).
        self.rows_count = len(relevant)
        self.row, position = np.nonzero(ranked)
        per_row = np.bincount(self.row, minlength=self.rows_count)
        first = np.cumsum(per_row) - per_row
        hits_so_far = np.arange(len(self.row)) - first[self.row] + 1
        self.position = position + 1
        self.precision = hits_so_far / self.position

    def hits(self, cutoff: int) -> np.ndarray:
        """``(rows,)`` relevant items among the first ``cutoff`` positions."""
        inside = self.position <= cutoff
        return np.bincount(self.row[inside], minlength=self.rows_count).astype(np.float64)

    def average_precision(self, cutoff: int) -> np.ndarray:
        """``(rows,)`` mean precision at the relevant positions up to ``cutoff``; 0 if none."""
        inside = self.position <= cutoff
        total = np.bincount(
            self.row[inside], weights=self.precision[inside], minlength=self.rows_count
        )
        count = np.bincount(self.row[inside], minlength=self.rows_count)
        return np.divide(total, count, out=np.zeros(self.rows_count), where=count > 0)


class _Groups:
    """Closed-form metrics from tie-group counts (rules "expected", "best", "worst").

    ``sizes`` and ``relevant`` are ``(rows, groups)`` counts in rank order (group ``d`` holds
    the items at the ``d``-th smallest distance; empty groups are allowed).
    """

    def __init__(self, ctx: _Context, sizes: np.ndarray, relevant: np.ndarray) -> None:
        self.ctx = ctx
        self.sizes = sizes
        self.relevant = relevant
        self.rows_count = len(sizes)
        self.sizes_through = np.cumsum(sizes, axis=1)
        self.relevant_through = np.cumsum(relevant, axis=1)
        # Items / relevant items ranked before each group.
        self.before = self.sizes_through - sizes
        self.relevant_before = self.relevant_through - relevant

    def _cut(self, cutoff: int) -> tuple[np.ndarray, ...]:
        """The group holding position ``cutoff`` per row: index, N, R, n, r and kept ``m``."""
        # Cumulative sizes ascend, so counting those below the cut-off finds its group.
        group = np.count_nonzero(self.sizes_through < cutoff, axis=1)
        rows = np.arange(self.rows_count)
        before = self.before[rows, group]
        return (
            group,
            before,
            self.relevant_before[rows, group],
            self.sizes[rows, group],
            self.relevant[rows, group],
            cutoff - before,
        )

    def hits(self, cutoff: int, rule: str) -> np.ndarray:
        """``(rows,)`` hits in the top ``cutoff``; "expected" is linear, so it is exact."""
        _, _, relevant_before, size, relevant, kept = self._cut(cutoff)
        if rule == "expected":
            return relevant_before + kept * relevant / size
        return relevant_before + self._kept_relevant(rule, size, relevant, kept)

    def average_precision(self, cutoff: int, rule: str) -> np.ndarray:
        """``(rows,)`` AP@cutoff: exact expectation ("expected") or the best/worst order."""
        group, before, relevant_before, size, relevant, kept = self._cut(cutoff)
        harmonic = self.ctx.harmonic
        whole = {
            "expected": _expected_precision_sum,
            "best": _best_precision_sum,
            "worst": _worst_precision_sum,
        }[rule](self.before, self.relevant_before, self.sizes, self.relevant, harmonic)
        # Precision summed over the whole groups ranked before the cut group.
        before_cut = (np.cumsum(whole, axis=1) - whole)[np.arange(self.rows_count), group]
        if rule == "expected":
            return self._expected_cut(before_cut, before, relevant_before, size, relevant, kept)
        inside = self._kept_relevant(rule, size, relevant, kept)
        if rule == "best":
            partial = _best_precision_sum(before, relevant_before, inside, inside, harmonic)
        else:
            # The cut keeps the first m items; under "worst" these are the group's irrelevant
            # items then `inside` relevant ones: the worst-order sum of a group whose
            # irrelevant part is the same and whose relevant part is truncated to `inside`.
            partial = _worst_precision_sum(
                before, relevant_before, size - relevant + inside, inside, harmonic
            )
        hits = relevant_before + inside
        return np.divide(
            before_cut + partial, hits, out=np.zeros(self.rows_count), where=hits > 0
        )

    @staticmethod
    def _kept_relevant(
        rule: str, size: np.ndarray, relevant: np.ndarray, kept: np.ndarray
    ) -> np.ndarray:
        """Relevant items among the first ``kept`` of the cut group, relevant-first or -last."""
        if rule == "best":
            return np.minimum(relevant, kept)
        return np.maximum(0, kept - (size - relevant))

    def _expected_cut(
        self,
        before_cut: np.ndarray,
        before: np.ndarray,
        relevant_before: np.ndarray,
        size: np.ndarray,
        relevant: np.ndarray,
        kept: np.ndarray,
    ) -> np.ndarray:
        """E[AP@k]: sum over x of P(X = x) (before_cut + F(N, R, m, x)) / (R + x)."""
        low = np.maximum(0, kept - (size - relevant))
        high = np.minimum(relevant, kept)
        width = high - low + 1
        # One flat (row, x) list for every row's support of X: vectorised over ragged ranges.
        owner = np.repeat(np.arange(self.rows_count), width)
        offset = np.cumsum(width) - width
        x = low[owner] + np.arange(owner.size) - offset[owner]
        n, r, m = size[owner], relevant[owner], kept[owner]
        log_pmf = (
            self._log_comb(r, x) + self._log_comb(n - r, m - x) - self._log_comb(n, m)
        )
        partial = _expected_precision_sum(
            before[owner], relevant_before[owner], m, x, self.ctx.harmonic
        )
        hits = relevant_before[owner] + x
        ap = np.divide(
            before_cut[owner] + partial, hits, out=np.zeros(owner.size), where=hits > 0
        )
        return np.bincount(owner, weights=np.exp(log_pmf) * ap, minlength=self.rows_count)

    def _log_comb(self, n: np.ndarray, k: np.ndarray) -> np.ndarray:
        """``log(n choose k)`` from the log-factorial table (exact 0 for k = 0 or k = n)."""
        log_factorial = self.ctx.log_factorial
        return log_factorial[n] - log_factorial[k] - log_factorial[n - k]


def _expected_precision_sum(
    before: np.ndarray,
    relevant_before: np.ndarray,
    size: np.ndarray,
    relevant: np.ndarray,
    harmonic: np.ndarray,
) -> np.ndarray:
    """Expected sum of precisions at a tie group's relevant items over its orderings.

    ``r b + (r / n) (R + 1 - b (1 + N)) (H[N + n] - H[N])`` with ``b = (r - 1) / (n - 1)``:
    the closed form of ``(r / n) sum_{p=1..n} (R + 1 + b (p - 1)) / (N + p)``, found by
    writing the numerator as ``b (N + p) + (R + 1 - b (1 + N))``.
    """
    shape = np.broadcast(size, relevant).shape
    slope = np.divide(relevant - 1, size - 1, out=np.zeros(shape), where=size > 1)
    share = np.divide(relevant, size, out=np.zeros(shape), where=size > 0)
    spread = harmonic[before + size] - harmonic[before]
    return relevant * slope + share * (relevant_before + 1 - slope * (1 + before)) * spread


def _best_precision_sum(
    before: np.ndarray,
    relevant_before: np.ndarray,
    size: np.ndarray,
    relevant: np.ndarray,
    harmonic: np.ndarray,
) -> np.ndarray:
    """Sum of precisions at a group's relevant items placed first: ``sum_j (R+j)/(N+j)``.

    Equals ``r + (R - N) (H[N + r] - H[N])``; ``size`` is unused but kept for a uniform call.
    """
    del size
    return relevant + (relevant_before - before) * (
        harmonic[before + relevant] - harmonic[before]
    )


def _worst_precision_sum(
    before: np.ndarray,
    relevant_before: np.ndarray,
    size: np.ndarray,
    relevant: np.ndarray,
    harmonic: np.ndarray,
) -> np.ndarray:
    """Sum of precisions at a group's relevant items placed last: ``sum_j (R+j)/(N+n-r+j)``.

    Equals ``r + (R - N - n + r) (H[N + n] - H[N + n - r])``.
    """
    start = before + size - relevant
    return relevant + (relevant_before - start) * (harmonic[start + relevant] - harmonic[start])


def _prepare_codes(query_codes: Any, db_codes: Any) -> tuple[np.ndarray, HammingSearcher]:
    """Pack both code sets as needed, check they match, and index the database."""
    queries, query_bits = _as_packed(query_codes, "query codes")
    database, db_bits = _as_packed(db_codes, "database codes")
    if query_bits is not None and db_bits is not None and query_bits != db_bits:
        raise ConfigError(
            f"code length mismatch: queries have {query_bits} bits, database {db_bits}"
        )
    if queries.shape[1] != database.shape[1]:
        raise ConfigError(
            f"code length mismatch: queries pack into {queries.shape[1]} bytes per code, "
            f"database into {database.shape[1]}"
        )
    return queries, HammingSearcher(database)


def _as_packed(codes: Any, name: str) -> tuple[np.ndarray, int | None]:
    """Return ``(packed uint8 codes, bits or None if they came packed)``."""
    if hasattr(codes, "detach"):
        codes = codes.detach().cpu().numpy()
    arr = np.asarray(codes)
    if arr.ndim != 2:
        raise ConfigError(
            f"{name} must be 2-D (n, bits) or packed (n, bytes), got shape {arr.shape}"
        )
    if arr.shape[1] == 0:
        raise ConfigError(f"{name} have 0 bits per code")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr), None
    if arr.dtype.kind not in "fi":
        raise ConfigError(
            f"{name} must be real-valued (±1 or tanh) or packed uint8, got dtype {arr.dtype}"
        )
    try:
        return pack_codes(arr), arr.shape[1]
    except FghError as exc:  # NaN codes: named here, as a bad argument like the others
        raise ConfigError(f"{name}: {exc}") from None


def _prepare_labels(
    q_labels: Any, db_labels: Any, num_queries: int, num_database: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validate labels; return ``(query, database, multi_label)``.

    Class ids come back as int64 ``(n,)``; multi-hot labels as float32 ``(n, C)`` for a BLAS
    matmul, unless every row holds exactly one label, in which case they are turned into
    class ids (the one-hot labels of the fine-grained sets), whose equality test is cheaper.
    """
    query = _as_labels(q_labels, "query labels", num_queries)
    database = _as_labels(db_labels, "database labels", num_database)
    if query.ndim != database.ndim:
        raise ConfigError(
            "query and database labels must both be class ids (n,) or both multi-hot (n, C), "
            f"got shapes {query.shape} and {database.shape}"
        )
    if query.ndim == 1:
        return query.astype(np.int64), database.astype(np.int64), False
    if query.shape[1] != database.shape[1]:
        raise ConfigError(
            f"multi-hot labels disagree on the class count: queries {query.shape[1]}, "
            f"database {database.shape[1]}"
        )
    one_hot = bool((query.sum(axis=1) == 1).all() and (database.sum(axis=1) == 1).all())
    if one_hot:
        return query.argmax(axis=1), database.argmax(axis=1), False
    return query.astype(np.float32), database.astype(np.float32), True


def _as_labels(labels: Any, name: str, expected_rows: int) -> np.ndarray:
    """Check one label array: integer ids ``(n,)`` or 0/1 multi-hot ``(n, C)`` of ``n`` rows."""
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim not in (1, 2):
        raise ConfigError(
            f"{name} must be class ids (n,) or multi-hot (n, C), got shape {arr.shape}"
        )
    if len(arr) != expected_rows:
        raise ConfigError(f"{name} have {len(arr)} rows but there are {expected_rows} codes")
    if arr.ndim == 1:
        if arr.dtype.kind not in "iu":
            raise ConfigError(f"{name} as class ids must be integers, got dtype {arr.dtype}")
        return arr
    if arr.dtype.kind not in "biuf":
        raise ConfigError(f"{name} must be numeric or bool, got dtype {arr.dtype}")
    if not np.isin(arr, (0, 1)).all():
        raise ConfigError(
            f"{name} are 2-D, so they are read as multi-hot and must hold only 0 and 1; "
            "pass class ids as a 1-D array"
        )
    return arr.astype(np.int8)


def _distance_dtype(code_size: int) -> np.dtype:
    """Smallest unsigned dtype for distances up to ``8 * code_size`` (radix-sortable)."""
    return np.min_scalar_type(8 * code_size)


def _chunk_bounds(num_queries: int, num_database: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` query blocks of about ``_CHUNK_ELEMENTS`` distances each."""
    step = max(1, _CHUNK_ELEMENTS // max(1, num_database))
    for start in range(0, num_queries, step):
        yield start, min(start + step, num_queries)


def _check_ties(ties: str) -> None:
    """Raise :class:`ConfigError` unless ``ties`` is one of :data:`TIE_RULES`."""
    if ties not in TIE_RULES:
        raise ConfigError(f"unknown tie rule {ties!r}; choose one of {', '.join(TIE_RULES)}")
