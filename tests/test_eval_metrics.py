"""M-BEIR Recall@k (hit rate) on hand-made runs, and its conventions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jfe.eval.metrics import first_hit_rank, hit_rate_at_k, hits_at_k, missing_positives, recall_at_ks

RANKED = [
    ["a", "b", "c", "d"],  # positive at rank 1
    ["c", "a", "b", "d"],  # two positives, first at rank 2
    ["x", "y", "z", "w"],  # no positives at all
    ["b", "a", "c", "d"],  # positive missing from the pool
    ["d", "c", "b", "a"],  # positive at rank 4
]
POSITIVES = [{"a"}, {"a", "b"}, set(), {"q"}, ["a"]]


def test_hand_computed_recall() -> None:
    # hits per query at k=1: 1,0,0,0,0; k=2: 1,1,0,0,0; k=3: same; k=4: 1,1,0,0,1
    assert hit_rate_at_k(RANKED, POSITIVES, 1) == pytest.approx(1 / 5)
    assert hit_rate_at_k(RANKED, POSITIVES, 2) == pytest.approx(2 / 5)
    assert hit_rate_at_k(RANKED, POSITIVES, 3) == pytest.approx(2 / 5)
    assert hit_rate_at_k(RANKED, POSITIVES, 4) == pytest.approx(3 / 5)
    # k beyond the ranking length: the whole ranking is the top-k
    assert hit_rate_at_k(RANKED, POSITIVES, 50) == pytest.approx(3 / 5)
    assert recall_at_ks(RANKED, POSITIVES, (1, 4)) == {"R@1": pytest.approx(0.2), "R@4": pytest.approx(0.6)}
    assert hits_at_k(RANKED, POSITIVES, 2).tolist() == [1, 1, 0, 0, 0]


def test_several_positives_count_once() -> None:
    # a hit rate, not textbook recall: two positives in the top 2 still score 1, not 2 or 1/2
    assert hit_rate_at_k([["a", "b", "c"]], [{"a", "b", "z"}], 2) == 1.0


def test_conventions() -> None:
    assert hit_rate_at_k([], [], 5) == 0.0
    with pytest.raises(ValueError, match="k must be"):
        hit_rate_at_k(RANKED, POSITIVES, 0)
    with pytest.raises(ValueError, match="rankings"):
        hit_rate_at_k(RANKED, POSITIVES[:2], 1)
    assert first_hit_rank(RANKED[1], POSITIVES[1]) == 2
    assert first_hit_rank(RANKED[2], POSITIVES[2]) is None
    # query 2 has no positives and query 3's positive is not in the pool: both reported
    assert missing_positives(POSITIVES, {"a", "b", "c", "d"}) == [2, 3]


@given(st.lists(st.tuples(st.permutations(list("abcdefgh")), st.sets(st.sampled_from("abcdefghij"))),
                min_size=1, max_size=20))
def test_monotone_in_k_and_agrees_with_first_hit_rank(data) -> None:
    ranked = [list(r) for r, _ in data]
    positives = [p for _, p in data]
    rates = [hit_rate_at_k(ranked, positives, k) for k in range(1, 10)]
    assert rates == sorted(rates)
    for k in (1, 3, 8):
        ranks = [first_hit_rank(r, p) for r, p in zip(ranked, positives, strict=True)]
        assert rates[k - 1] == pytest.approx(sum(1 for x in ranks if x is not None and x <= k) / len(data))
