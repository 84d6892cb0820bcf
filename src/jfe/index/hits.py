"""Search hits: the one place that turns an index's ranked ids and scores into hits with their records.

Used by ``jfe.search`` (the Python API), ``jfe search`` (the CLI) and ``POST /search`` (the service).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Hit:
    """One ranked candidate: ``rank`` starts at 1; ``record`` is the candidate's stored record (may be empty)."""

    did: str
    score: float
    rank: int
    record: dict[str, Any] = field(default_factory=dict)


def hits_from(index: Any, ids: Sequence[str], scores: Sequence[float]) -> list[Hit]:
    """Hits for one query's row of ``index.search`` results (``ids[0]``, ``scores[0]``), best first."""
    return [Hit(did=did, score=float(score), rank=rank, record=index.record(did) or {})
            for rank, (did, score) in enumerate(zip(ids, scores, strict=False), start=1)]
