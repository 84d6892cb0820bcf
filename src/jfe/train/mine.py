"""Hard-negative mining: each query's top-k candidates from a retriever, its positives removed.

``jfe mine --model two-tower-mini --data runs/minibeir --split train --k 50 --out mined.jsonl`` writes one JSON
line per query (after a first ``{"jfe_mined": {...}}`` line that records how the lists were made)::

    {"qid": "...", "task_id": 7, "positives": {"90:4": 0.71}, "negatives": [["90:12", 0.69], ...]}

``positives`` holds the retriever's score of every positive (qrels and ``pos_cand_list``, which are never
listed as negatives); ``negatives`` the rest of the top k, best first, with their scores. ``margin`` drops
likely false negatives as NV-Retriever, UniME and U-MARVEL do: a candidate scoring above ``best positive -
margin`` is left out. The same file trains a reranker (``jfe train rerank``) and can feed stage 2 as hard
negatives. Mining reads only ``query/<split>``, ``qrels/<split>`` and the pools those queries search, so mining
the training split never touches validation or test queries; :func:`read_mined` lets training refuse lists
mined on another split.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jfe.data.mbeir import iter_json_lines
from jfe.errors import ConfigError, DataError
from jfe.eval.protocol import first_stage
from jfe.models.base import Encoder
from jfe.paths import atomic_write, check_writable_path

HEADER_KEY = "jfe_mined"
FORMAT_VERSION = 1
EXTRA_DEPTH = 64  # ranked beyond k to make room for the positives and filtered candidates removed


@dataclass
class MinedQuery:
    """One query's mined list: its positives' scores and its negatives, best first."""

    qid: str
    task_id: int | None
    positives: dict[str, float]
    negatives: list[tuple[str, float]] = field(default_factory=list)

    def shortlisted(self, depth: int) -> MinedQuery:
        """This entry with only the positives the retriever ranks within its top ``depth`` (none: no positive)."""
        kept = {d: s for d, s in self.positives.items()
                if 1 + sum(score > s for _, score in self.negatives) <= depth}
        return MinedQuery(self.qid, self.task_id, kept, self.negatives)

    def to_json(self) -> dict[str, Any]:
        return {"qid": self.qid, "task_id": self.task_id, "positives": self.positives,
                "negatives": [[d, round(s, 6)] for d, s in self.negatives]}


@dataclass
class MinedLists:
    meta: dict[str, Any]
    queries: dict[str, MinedQuery]


def mine(model: Encoder, data_root: str | os.PathLike, *, split: str = "train", k: int = 50, pool: str = "local",
         margin: float | None = None, instructions: str = "default", batch_size: int = 64, progress: bool = True,
         max_queries: int | None = None, model_name: str | None = None) -> MinedLists:
    """Mine ``k`` negatives per query of ``split`` with ``model`` (module docstring)."""
    from jfe.models.registry import model_name_of

    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if margin is not None and margin < 0:
        raise ConfigError(f"margin must be >= 0, got {margin}")
    if getattr(model, "kind", "encoder") != "encoder":
        raise ConfigError(f"mining needs a retriever (an encoder); {model.arch} is a {model.kind}")
    root = Path(data_root).resolve()
    # deeper than k, so that k negatives remain once positives (and false negatives) are removed
    stage = first_stage(model, root, split=split, pool=pool, k=k + EXTRA_DEPTH, instructions=instructions,
                        batch_size=batch_size, progress=progress, max_queries=max_queries)
    out: dict[str, MinedQuery] = {}
    dropped = 0
    for f, qf in enumerate(stage.files):
        ranked, scores = stage.rankings[f]
        for i, query in enumerate(qf.queries):
            positives = set(qf.positives[i]) | set(query.pos_cand_list)
            qvec = stage.query_vecs[f][i]
            pos_scores = {d: float(stage.cand_vecs[stage.cand_row[d]] @ qvec) for d in sorted(positives)
                          if d in stage.cand_row}
            ceiling = max(pos_scores.values()) - margin if margin is not None and pos_scores else None
            negatives = []
            for did, score in zip(ranked[i], scores[i].tolist(), strict=False):
                if did in positives:
                    continue
                if ceiling is not None and score > ceiling:
                    dropped += 1
                    continue
                negatives.append((did, float(score)))
            out[query.qid] = MinedQuery(query.qid, query.task_id, pos_scores, negatives[:k])
    meta = {"version": FORMAT_VERSION, "retriever": model_name or model_name_of(model), "data": str(root),
            "split": split, "pool": pool, "k": k, "margin": margin, "instructions": instructions,
            "queries": len(out), "dropped_as_false_negatives": dropped}
    return MinedLists(meta, out)


def write_mined(path: str | os.PathLike, mined: MinedLists) -> Path:
    """Write the lists atomically (a crash leaves no half file). Replaces only a file `jfe mine` wrote: any
    other existing file (or a folder) at ``path`` is refused, never overwritten."""
    path = Path(path)
    check_writable_path(path, folder=False)
    if path.is_file() and not _is_mined_file(path):
        raise ConfigError(f"--out {path} exists and is not a mined-negatives file; choose another path")
    with atomic_write(path) as handle:
        handle.write(json.dumps({HEADER_KEY: mined.meta}) + "\n")
        for entry in mined.queries.values():
            handle.write(json.dumps(entry.to_json(), ensure_ascii=False) + "\n")
    return path


def _is_mined_file(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as handle:
            first = json.loads(handle.readline() or "null")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(first, dict) and HEADER_KEY in first


def read_mined(path: str | os.PathLike, split: str | None = None) -> MinedLists:
    """Read a file :func:`write_mined` wrote; ``split`` (when given) must be the split it was mined on, so a
    training run can never learn from lists mined on validation or test queries."""
    path = Path(path)
    if not path.is_file():
        raise DataError("mined negatives file not found", path=str(path))
    meta: dict[str, Any] | None = None
    queries: dict[str, MinedQuery] = {}
    for line, obj in iter_json_lines(path):
        if meta is None:
            if not isinstance(obj.get(HEADER_KEY), dict):
                raise DataError(f"not a file `jfe mine` wrote (its first line lacks {HEADER_KEY!r})", path=str(path))
            meta = obj[HEADER_KEY]
            continue
        try:
            entry = MinedQuery(str(obj["qid"]), obj.get("task_id"),
                               {str(d): float(s) for d, s in obj["positives"].items()},
                               [(str(d), float(s)) for d, s in obj["negatives"]])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"malformed mined entry ({exc!r})", path=str(path), line=line,
                            record_id=str(obj.get("qid", "?"))) from None
        overlap = set(entry.positives) & {d for d, _ in entry.negatives}
        if overlap:
            raise DataError(f"negatives include positives {sorted(overlap)[:3]}", path=str(path), line=line,
                            record_id=entry.qid)
        queries[entry.qid] = entry
    if meta is None:
        raise DataError("empty mined negatives file", path=str(path))
    if split is not None and meta.get("split") != split:
        raise ConfigError(f"{path} was mined on split {meta.get('split')!r}, but this run trains on {split!r}: "
                          f"mine the training split (jfe mine --split {split})")
    return MinedLists(meta, queries)


def score_spread(mined: MinedLists) -> dict[str, float]:
    """Summary figures for the CLI: mean negatives per query and the mean gap best positive - best negative."""
    gaps = [max(q.positives.values()) - q.negatives[0][1] for q in mined.queries.values()
            if q.positives and q.negatives]
    counts = [len(q.negatives) for q in mined.queries.values()]
    return {"queries": float(len(counts)), "negatives_per_query": float(np.mean(counts)) if counts else 0.0,
            "mean_gap": float(np.mean(gaps)) if gaps else 0.0}
