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

**Cross-fitting** (:func:`mine_cross_fitted`, ``jfe mine`` with one ``--model`` per fold): a retriever mining
queries it trained on has memorised them, so its lists are not the lists it will face at test time. Each model
that declares a held-out fold (trained with ``held_out_fold``, :mod:`jfe.data.folds`) mines only that fold's
queries; one model per fold together cover the split, each query ranked by the model that never saw it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jfe.data.folds import declared_fold
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
    """Mine ``k`` negatives per query of ``split`` with ``model`` (module docstring); a model that declares a
    held-out fold of ``split`` mines only that fold's queries (the ones it never trained on)."""
    from jfe.models.registry import model_name_of

    held_out = declared_fold(model, split)
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if margin is not None and margin < 0:
        raise ConfigError(f"margin must be >= 0, got {margin}")
    if getattr(model, "kind", "encoder") != "encoder":
        raise ConfigError(f"mining needs a retriever (an encoder); {model.arch} is a {model.kind}")
    root = Path(data_root).resolve()
    # deeper than k, so that k negatives remain once positives (and false negatives) are removed
    stage = first_stage(model, root, split=split, pool=pool, k=k + EXTRA_DEPTH, instructions=instructions,
                        batch_size=batch_size, progress=progress, max_queries=max_queries,
                        keep=held_out.holds if held_out is not None else None)
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
    if held_out is not None:
        meta["held_out_fold"] = held_out.model_dump()
    return MinedLists(meta, out)


def mine_cross_fitted(models: Sequence[Encoder], data_root: str | os.PathLike, *, split: str = "train",
                      model_names: Sequence[str] | None = None, **options: Any) -> MinedLists:
    """Cross-fitted lists (module docstring): ``models`` hold out folds ``0 .. n-1`` of ``split`` (``n`` =
    ``len(models)``), and each mines the fold it never saw. ``options`` are :func:`mine`'s."""
    from jfe.models.registry import model_name_of

    names = list(model_names) if model_names is not None else [model_name_of(m) for m in models]
    folds: dict[int, int] = {}
    for i, (model, name) in enumerate(zip(models, names, strict=True)):
        held = declared_fold(model, split)
        if held is None:
            raise ConfigError(f"{name} declares no held-out fold of split {split!r}: cross-fitted mining needs one "
                              f"model per fold, each trained with held_out_fold = {{ fold = ..., folds = "
                              f"{len(models)}, split = {split!r} }}")
        if held.folds != len(models):
            raise ConfigError(f"{name} holds out {held}, but {len(models)} models were given: one per fold")
        if held.fold in folds:
            raise ConfigError(f"{name} and {names[folds[held.fold]]} both hold out fold {held.fold}: each fold "
                              "needs its own model")
        folds[held.fold] = i
    parts = [mine(models[folds[f]], data_root, split=split, model_name=names[folds[f]], **options)
             for f in sorted(folds)]
    queries: dict[str, MinedQuery] = {}
    for part in parts:
        queries.update(part.queries)
    meta = {**parts[0].meta, "retriever": " + ".join(p.meta["retriever"] for p in parts), "queries": len(queries),
            "dropped_as_false_negatives": sum(p.meta["dropped_as_false_negatives"] for p in parts),
            "cross_fit": [{"retriever": p.meta["retriever"], **p.meta["held_out_fold"],
                           "queries": p.meta["queries"]} for p in parts]}
    meta.pop("held_out_fold")
    return MinedLists(meta, queries)


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


def mined_negatives(path: str | os.PathLike, split: str, depth: int | None = None) -> dict[str, list[str]]:
    """qid -> the first ``depth`` (None: all) mined negatives of each query, best first, from a file
    :func:`write_mined` wrote on ``split`` (lists of another split are refused): what an encoder stage trains on
    as hard negatives (``mined`` in its config), sentence-transformers' ``mine_hard_negatives`` in JFE's shape."""
    lists = read_mined(path, split=split).queries
    return {qid: [did for did, _ in entry.negatives[:depth]] for qid, entry in lists.items()}
