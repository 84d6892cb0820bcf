"""The one evaluator object: configured once, called on any model (sentence-transformers' evaluator shape).

    evaluator = MBEIREvaluator("runs/minibeir", split="test", pool="local")
    scores = evaluator(model)                 # {"R@1": ..., "R@5": ..., "headline": ..., "R@5/conditional": ...}
    scores[evaluator.primary_metric]          # "R@5"
    evaluator.last_result                     # the full EvalResult (rows, categories, breakdowns)

``jfe eval``, the trainer's validation and the study all evaluate through it. Two ways to choose what it reads:

* the **full protocol** (default): every query of the split (``max_queries`` caps each file, for smoke runs)
  ranked in its local pool or the split's global pool (:func:`jfe.eval.protocol.evaluate`, which writes the
  run files when ``out_dir`` is given);
* a **sample** (:class:`Sample`, the trainer's validation): at most ``max_queries`` queries in all, spread over
  the query files, each file ranked in its local pool capped at ``max_pool`` candidates (every selected query's
  positives first, then a stable hash order). Deterministic, so learning curves compare step to step. Its
  scores are the mean over query files and, per task, ``R@5/task<N>``.

Either way ranking is :func:`jfe.eval.protocol.rank` (each query's ``excluded_dids`` removed from its own
ranking) and scoring is :mod:`jfe.eval.metrics`.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jfe.data.instructions import TextMode, instruction_key, instruction_set_for, pick_instruction
from jfe.data.items import Item, candidate_item, query_item
from jfe.data.mbeir import MBEIRLayout, iter_candidates, iter_queries
from jfe.data.records import Candidate, Query
from jfe.eval.metrics import DEFAULT_KS, PRIMARY_METRIC, recall_at_ks, recall_key
from jfe.eval.protocol import EvalResult, evaluate, pool_index, rank

if TYPE_CHECKING:
    from jfe.models.base import Encoder


@dataclass(frozen=True)
class Sample:
    """A small, deterministic slice of a split: ``max_queries`` queries in all, ``max_pool`` candidates per pool."""

    max_queries: int = 200
    max_pool: int = 1000


@dataclass
class SampleGroup:
    """The sampled queries of one query file and the capped local pool they are ranked in."""

    name: str
    task_ids: list[int]
    queries: list[Item]
    positives: list[set[str]]
    excluded: list[set[str]]
    pool_ids: list[str]
    pool: list[Item]


def _stable_order(ids: list[str]) -> list[int]:
    return sorted(range(len(ids)), key=lambda i: hashlib.sha1(ids[i].encode()).digest())


def _capped_pool(qs: list[Query], pool_files: list[Path], local: bool, max_pool: int) -> dict[str, Candidate]:
    """Every query's positives, then others in a stable hash order up to ``max_pool`` (local pool: any
    candidate; no local pool: only the queries' listed negatives)."""
    wanted = {d for q in qs for d in q.pos_cand_list}
    cands: dict[str, Candidate] = {}
    others: list[Candidate] = []
    for pf in pool_files:
        for cand in iter_candidates(pf):
            if cand.did in cands:
                continue
            if cand.did in wanted:
                cands[cand.did] = cand
            elif local or any(cand.did in q.neg_cand_list for q in qs):
                others.append(cand)
    room = max(0, max_pool - len(cands))
    for i in _stable_order([c.did for c in others])[:room]:
        cands[others[i].did] = others[i]
    return cands


def sample_groups(root: str | os.PathLike, split: str, sample: Sample, tasks: set[int] | None = None,
                  instructions: bool = False, text_mode: TextMode = "jfe") -> list[SampleGroup]:
    """The sampled queries and capped pools of ``split`` (module docstring); instructions picked by qid hash."""
    layout = MBEIRLayout(root)
    files = layout.query_files(split)
    inst = layout.required_instructions() if instructions and files else {}
    per_file: list[tuple[Path, list[Query]]] = []
    for path in files:
        qs = [q for q in iter_queries(path) if tasks is None or q.task_id in tasks]
        if qs:
            per_file.append((path, qs))
    if not per_file:
        return []
    cap = max(1, math.ceil(sample.max_queries / len(per_file)))
    groups = []
    for path, qs in per_file:
        qs = [qs[i] for i in _stable_order([q.qid for q in qs])[:cap]]
        local = layout.local_pool_for(path)
        pool_files = [local] if local is not None else layout.local_pool_files() + layout.global_pool_files()
        cands = _capped_pool(qs, pool_files, local is not None, sample.max_pool)
        if not cands:
            continue
        pool_ids = sorted(cands)
        query_items = []
        for q in qs:
            instruction = pick_instruction(q.qid, instruction_set_for(inst, instruction_key(q, cands))) \
                if instructions else None
            query_items.append(query_item(q, layout.root, instruction, text_mode))
        groups.append(SampleGroup(
            name=path.stem, task_ids=[int(q.task_id) if q.task_id is not None else -1 for q in qs],
            queries=query_items, positives=[set(q.pos_cand_list) for q in qs],
            excluded=[q.excluded_dids for q in qs],
            pool_ids=pool_ids, pool=[candidate_item(cands[d], layout.root, text_mode) for d in pool_ids]))
    return groups


class MBEIREvaluator:
    """M-BEIR retrieval evaluation of any :class:`~jfe.models.base.Encoder` (module docstring).

    ``instructions``: ``"default"``, ``"heldout"`` or ``"none"`` (see :func:`jfe.eval.protocol.evaluate`; a sample
    knows ``"default"`` and ``"none"``). ``sample`` switches to the capped sample; ``tasks`` keeps only those task
    ids (sample only). ``out_dir`` (full protocol) receives the run files; ``cache_dir`` keeps embeddings.
    ``reranker`` (full protocol): reorders each query's first-stage top ``rerank_k`` (a
    :class:`jfe.models.rerankers.Reranker`, named ``reranker_name`` in the results).
    """

    primary_metric: str = PRIMARY_METRIC

    def __init__(self, data_root: str | os.PathLike, *, split: str = "test", pool: str = "local",
                 ks: Sequence[int] = DEFAULT_KS, instructions: str = "default", max_queries: int | None = None,
                 sample: Sample | None = None, tasks: set[int] | None = None, batch_size: int = 64,
                 out_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                 instruction_mode: str = "hash", text_mode: TextMode = "jfe", run_name: str | None = None,
                 model_name: str | None = None, fusion_role: str | None = None, progress: bool = True,
                 reranker: Any = None, rerank_k: int = 50, reranker_name: str | None = None) -> None:
        from jfe.errors import ConfigError

        if reranker is not None and sample is not None:
            raise ConfigError("reranking is measured with the full protocol, not a capped sample")

        if sample is not None and (pool != "local" or instructions not in ("default", "none")):
            raise ConfigError("a sampled evaluation ranks in capped local pools with the default instructions or "
                              "none; use the full protocol for the global pool or held-out instructions")
        if tasks is not None and sample is None:
            raise ConfigError("tasks selects the queries of a sampled evaluation; the full protocol reads them all")
        self.data_root, self.split, self.pool, self.ks = Path(data_root), split, pool, tuple(ks)
        self.instructions, self.max_queries, self.sample, self.tasks = instructions, max_queries, sample, tasks
        self.batch_size, self.out_dir, self.cache_dir = batch_size, out_dir, cache_dir
        self.instruction_mode, self.text_mode, self.progress = instruction_mode, text_mode, progress
        self.run_name, self.model_name, self.fusion_role = run_name, model_name, fusion_role
        self.reranker, self.rerank_k, self.reranker_name = reranker, rerank_k, reranker_name
        self.last_result: EvalResult | None = None
        self._groups: list[SampleGroup] | None = None

    def __call__(self, model: Encoder) -> dict[str, float]:
        """The scores of ``model``: ``{metric: value}`` with :attr:`primary_metric` among them."""
        if self.sample is not None:
            return self._sampled(model)
        result = self.result(model)
        scores = dict(result.average)
        for category, values in result.categories.items():
            scores[f"{self.primary_metric}/{category}"] = float(values[self.primary_metric])
        return scores

    def result(self, model: Encoder) -> EvalResult:
        """The full protocol's :class:`EvalResult` (and its files in ``out_dir``); kept as :attr:`last_result`."""
        self.last_result = evaluate(
            model, self.data_root, split=self.split, pool=self.pool, out_dir=self.out_dir,
            instructions=self.instructions, ks=self.ks, batch_size=self.batch_size, run_name=self.run_name,
            model_name=self.model_name, cache_dir=self.cache_dir, progress=self.progress,
            instruction_mode=self.instruction_mode, max_queries=self.max_queries, text_mode=self.text_mode,
            fusion_role=self.fusion_role, reranker=self.reranker, rerank_k=self.rerank_k,
            reranker_name=self.reranker_name)
        return self.last_result

    def groups(self) -> list[SampleGroup]:
        """The sample (read once: every later call ranks the same queries in the same pools)."""
        if self.sample is None:
            return []
        if self._groups is None:
            self._groups = sample_groups(self.data_root, self.split, self.sample, self.tasks,
                                         self.instructions == "default", self.text_mode)
        return self._groups

    def _sampled(self, model: Encoder) -> dict[str, float]:
        groups = self.groups()
        if not groups:
            return {}
        # pools of different query files overlap (or are one file): embed every candidate once
        unique = {did: item for g in groups for did, item in zip(g.pool_ids, g.pool, strict=True)}
        cand_ids = list(unique)
        cand_vecs = model.encode([unique[d] for d in cand_ids], batch_size=self.batch_size)
        row = {d: i for i, d in enumerate(cand_ids)}
        per_file: dict[str, dict[str, float]] = {}
        by_task: dict[int, list[float]] = {}
        for group in groups:
            queries = model.encode(group.queries, batch_size=self.batch_size)
            index = pool_index(group.pool_ids, cand_vecs[[row[d] for d in group.pool_ids]], cand_vecs.shape[1])
            ranked, _ = rank(index, queries, max(self.ks), group.excluded)
            per_file[group.name] = recall_at_ks(ranked, group.positives, self.ks)
            task = max(set(group.task_ids), key=group.task_ids.count)
            by_task.setdefault(task, []).append(per_file[group.name][self.primary_metric])
        out = {recall_key(k): float(np.mean([v[recall_key(k)] for v in per_file.values()])) for k in self.ks}
        out.update({f"{self.primary_metric}/task{t}": float(np.mean(v)) for t, v in sorted(by_task.items())})
        return out
