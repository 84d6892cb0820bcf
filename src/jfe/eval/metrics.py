"""Retrieval metrics of the M-BEIR protocol.

Recall@k in M-BEIR (and UniIR) is a *hit rate*: a query scores 1 when at least one of its positives is
among its top ``k`` ranked candidates, else 0; the score of a set of queries is the mean. This is not the
textbook recall (fraction of positives retrieved): a query with three positives and one of them at rank 1
scores 1.0 at every k.

Conventions (tested in ``tests/test_eval_metrics.py``):

* Rankings are taken as given: ``ranked_ids[i]`` is already ordered best first. Ties in score are the
  ranker's business; :class:`jfe.index.VectorIndex` breaks them by insertion order (the candidate added
  first ranks first), so results are deterministic.
* A query with no positives, or whose positives are all missing from the pool, can never hit: it counts
  as 0 and stays in the denominator (it is a miss of the benchmark, not of the model, so
  :func:`missing_positives` lets the caller report such queries).
* An empty set of queries has a hit rate of 0.0 (nothing was retrieved).
* A ranking may be shorter than ``k`` (a pool smaller than k); the top-k is then the whole ranking.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

import numpy as np

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20, 50)
RECALL_PREFIX = "R@"


def recall_key(k: int) -> str:
    """The name of M-BEIR Recall@k in every result, report, chart and training log: ``recall_key(5) == "R@5"``.
    The one place that spells it (a new metric is added here, not in every file that prints one)."""
    return f"{RECALL_PREFIX}{k}"


def recall_k(name: str) -> int | None:
    """The k of a :func:`recall_key` name (``"R@10"`` -> 10), None for any other name."""
    if name.startswith(RECALL_PREFIX) and name[len(RECALL_PREFIX):].isdigit():
        return int(name[len(RECALL_PREFIX):])
    return None


#: the score that decides (learning curves, plateaus, margins, model selection): Recall@5, as M-BEIR reports
PRIMARY_METRIC = recall_key(5)


def hits_at_k(ranked_ids: Sequence[Sequence[str]], positives: Sequence[Collection[str]], k: int) -> np.ndarray:
    """Per-query hit indicators (float32 0/1): 1 if any positive is within the first ``k`` ranked ids."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(ranked_ids) != len(positives):
        raise ValueError(f"{len(ranked_ids)} rankings but {len(positives)} positive sets")
    out = np.zeros(len(ranked_ids), dtype=np.float32)
    for i, (ranking, pos) in enumerate(zip(ranked_ids, positives, strict=True)):
        if not pos:
            continue
        pos_set = pos if isinstance(pos, (set, frozenset)) else set(pos)
        out[i] = any(did in pos_set for did in ranking[:k])
    return out


def hit_rate_at_k(ranked_ids: Sequence[Sequence[str]], positives: Sequence[Collection[str]], k: int) -> float:
    """M-BEIR Recall@k: the fraction of queries with at least one positive in their top ``k``."""
    hits = hits_at_k(ranked_ids, positives, k)
    return float(hits.mean()) if len(hits) else 0.0


def recall_at_ks(ranked_ids: Sequence[Sequence[str]], positives: Sequence[Collection[str]],
                 ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """``{"R@1": ..., "R@5": ...}`` for each k in ``ks``."""
    return {recall_key(k): hit_rate_at_k(ranked_ids, positives, k) for k in ks}


def first_hit_rank(ranking: Sequence[str], positives: Collection[str]) -> int | None:
    """1-based rank of the first positive in ``ranking`` (None when no positive was retrieved)."""
    for rank, did in enumerate(ranking, start=1):
        if did in positives:
            return rank
    return None


def missing_positives(positives: Sequence[Collection[str]], pool: Collection[str]) -> list[int]:
    """Indices of queries none of whose positives is in ``pool`` (they score 0 at every k)."""
    return [i for i, pos in enumerate(positives) if not any(did in pool for did in pos)]


# M-BEIR's headline metric per dataset (UniIR's configs and the paper's tables): Recall@10 for the two
# fashion datasets, whose many near-duplicate products make R@5 too strict, Recall@5 everywhere else.
HEADLINE_K: dict[str, int] = {"fashion200k": 10, "fashioniq": 10}
DEFAULT_HEADLINE_K = 5


def headline_k(dataset: str) -> int:
    """The k of a dataset's headline Recall@k (``"fashioniq"`` -> 10, anything else -> 5)."""
    return HEADLINE_K.get(dataset.lower(), DEFAULT_HEADLINE_K)


def headline_label(ks: Iterable[int]) -> str:
    """How to label a column of headline values: ``"R@5"`` when every row uses k=5, else ``"headline"``."""
    distinct = set(ks)
    return recall_key(distinct.pop()) if len(distinct) == 1 else "headline"
