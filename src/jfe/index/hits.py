"""Search hits: the one place that turns an index's ranked ids and scores into hits with their records.

Used by ``jfe.search`` (the Python API), ``jfe search`` (the CLI) and ``POST /search`` (the service), all through
:func:`jfe.indexing.ranked_hits` (which reranks first when asked).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Hit:
    """One ranked candidate: ``rank`` starts at 1; ``record`` is the candidate's stored record (may be empty);
    ``first_stage_rank``: where the retriever ranked it, when a reranker reordered the list (else None)."""

    did: str
    score: float
    rank: int
    record: dict[str, Any] = field(default_factory=dict)
    first_stage_rank: int | None = None


def hits_from(index: Any, ids: Sequence[str], scores: Sequence[float],
              first_stage_ranks: Sequence[int] | None = None) -> list[Hit]:
    """Hits for one query's row of ``index.search`` results (``ids[0]``, ``scores[0]``), best first."""
    firsts: Sequence[int | None] = first_stage_ranks if first_stage_ranks is not None else [None] * len(ids)
    return [Hit(did=did, score=float(score), rank=rank, record=index.record(did) or {}, first_stage_rank=first)
            for rank, (did, score, first) in enumerate(zip(ids, scores, firsts, strict=False), start=1)]
