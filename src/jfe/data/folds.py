"""Folds of a query split, for cross-fitting: a model trained without fold ``i`` can rank fold ``i``'s queries as
it would rank unseen ones.

Hard negatives mined by a retriever that trained on the very queries it ranks are not the lists it will face at
test time: it has memorised them (the shipped two-tower ranks its training queries' positives first far more
often than its test queries'). Cross-fitting splits the training queries into ``folds``; the retriever of fold
``i`` trains on every other fold and mines fold ``i`` (``held_out_fold`` in a training config, ``jfe mine`` with
one ``--model`` per fold).

A query's fold is a hash of its **base item** (MiniBEIR's ``query_src_content.base``, the qid where there is none),
as the splits themselves are cut by base: an emoji and all its skin-tone and style variants fall in one fold, so
nothing of a held-out query's item is seen in training.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jfe.data.records import Query


def base_of(query: Query) -> str:
    """The base item a query is about (MiniBEIR's ``query_src_content.base``); the qid otherwise."""
    base = query.src.get("base")
    return str(base) if base not in (None, "") else query.qid


def fold_of(query: Query, folds: int) -> int:
    """The query's fold in ``0 .. folds - 1``: a stable hash of its base item (the same on every machine)."""
    digest = hashlib.sha1(base_of(query).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % folds


class HeldOutFold(BaseModel):
    """Fold ``fold`` of ``folds`` of query split ``split``: left out of a training run, recorded in the model it
    saves (so that ``jfe mine`` knows which queries that model never saw)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    fold: int = Field(ge=0, description="the fold left out, 0 .. folds - 1")
    folds: int = Field(ge=2, description="how many folds the split is cut into (by base item)")
    split: str = Field(default="train", description="the query split the folds cut")

    @model_validator(mode="after")
    def _fold_in_range(self) -> HeldOutFold:
        if self.fold >= self.folds:
            raise ValueError(f"fold {self.fold} is not one of 0 .. {self.folds - 1}")
        return self

    def holds(self, query: Query) -> bool:
        """Whether ``query`` (of :attr:`split`) lies in the held-out fold."""
        return fold_of(query, self.folds) == self.fold

    def __str__(self) -> str:
        return f"fold {self.fold}/{self.folds} of {self.split!r}"


def declared_fold(model: Any, split: str) -> HeldOutFold | None:
    """The fold of ``split`` that ``model`` declares it never trained on (``config.held_out_fold``; None: no fold of
    this split)."""
    declared = getattr(getattr(model, "config", None), "held_out_fold", None)
    return declared if isinstance(declared, HeldOutFold) and declared.split == split else None
