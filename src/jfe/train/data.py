"""Training and validation data from an M-BEIR-layout split.

:class:`TrainingData` reads the training queries of the chosen tasks and only the candidates they refer
to (pools are streamed, so a large union pool is never held whole). :class:`BatchSampler` draws global
batches from it: tasks by weight, each task's queries in a fresh seeded permutation per epoch, optional
grouping by base item, a random instruction variant and random hard negatives per draw. All randomness
comes from one numpy generator whose state is checkpointed, so a resumed run draws the very batches the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jfe.data.folds import HeldOutFold, base_of
from jfe.data.instructions import TextMode, instruction_key, instruction_set_for
from jfe.data.items import candidate_item, query_item
from jfe.data.mbeir import MBEIRLayout, iter_candidates, iter_queries
from jfe.data.records import Candidate, InstructionSet, Query
from jfe.errors import ConfigError, DataError
from jfe.train.losses import ContrastiveBatch, false_negative_mask


def _task_id_of(query: Query) -> int:
    """A training query's task id: :meth:`TrainingData.load` refuses queries without one, so only a
    ``TrainingData`` built by hand can hold a query that fails here."""
    if query.task_id is None:
        raise DataError("training queries need a task_id", record_id=query.qid)
    return int(query.task_id)


def stream_candidates(layout: MBEIRLayout, wanted: set[str], pool_files: list[Path] | None = None
                       ) -> dict[str, Candidate]:
    found: dict[str, Candidate] = {}
    for pool in pool_files or [*layout.local_pool_files(), *layout.global_pool_files()]:
        for cand in iter_candidates(pool):
            if cand.did in wanted and cand.did not in found:
                found[cand.did] = cand
        if len(found) == len(wanted):
            break
    return found


@dataclass
class TrainingData:
    """The training queries of the selected tasks, with the candidates they name."""

    root: Path
    queries: list[Query]
    candidates: dict[str, Candidate]
    instructions: dict[tuple[str, str, str], InstructionSet] = field(default_factory=dict)
    text_mode: TextMode = "jfe"
    by_task: dict[int, list[int]] = field(default_factory=dict)
    by_base: dict[str, list[int]] = field(default_factory=dict)
    # per task: dids usable as random negatives when a query has too few hard ones
    task_pools: dict[int, list[str]] = field(default_factory=dict)
    # qid -> hard negatives mined by a retriever (`jfe mine`), best first: they replace the query's neg_cand_list
    mined: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def load(cls, root: str | Path, split: str = "train", tasks: set[int] | None = None,
             instructions: bool = False, hard_negatives: bool = False,
             max_queries: int | None = None, pool_files: Sequence[str | Path] | None = None,
             text_mode: TextMode = "jfe", held_out: HeldOutFold | None = None,
             mined: dict[str, list[str]] | None = None) -> TrainingData:
        """``pool_files`` (relative to ``root``) name the pools holding the training candidates, e.g.
        ``cand_pool/global/mbeir_union_train_cand_pool.jsonl`` for M-BEIR's union training split
        (``split="union_train"``); by default every local, then every global pool is searched. ``held_out``
        leaves one fold of the split's queries out (cross-fitting, :mod:`jfe.data.folds`). ``mined`` (qid ->
        negatives, from ``jfe mine`` on this split) replaces those queries' ``neg_cand_list``."""
        if held_out is not None and held_out.split != split:
            raise ConfigError(f"held_out_fold cuts split {held_out.split!r}, but this run trains on {split!r}")
        layout = MBEIRLayout(root)
        pools = [layout.root / f for f in pool_files] if pool_files else None
        for pool in pools or []:
            if not pool.is_file():
                raise DataError("training pool file not found", path=str(pool))
        files = layout.query_files(split)
        if not files:
            raise DataError(f"no query files for split {split!r} (expected query/{split}/*.jsonl)",
                            path=str(layout.root / "query" / split))
        queries: list[Query] = []
        origin: dict[str, Path] = {}
        for path in files:
            for query in iter_queries(path):
                if query.task_id is None:
                    raise DataError("training queries need a task_id", path=str(path), record_id=query.qid)
                if tasks is not None and query.task_id not in tasks:
                    continue
                if held_out is not None and held_out.holds(query):
                    continue
                if not query.pos_cand_list:
                    raise DataError("training query has no positive candidate", path=str(path),
                                    record_id=query.qid)
                queries.append(query)
                origin[query.qid] = path
        if max_queries is not None and len(queries) > max_queries:
            # a stable subset (by qid hash), not the first files' queries
            queries = sorted(queries, key=lambda q: hashlib.sha1(q.qid.encode()).digest())[:max_queries]
        if not queries:
            wanted = sorted(tasks) if tasks is not None else "any"
            outside = f" outside {held_out}" if held_out is not None else ""
            raise DataError(f"split {split!r} has no queries of tasks {wanted}{outside}", path=str(layout.root))
        mined = {q.qid: list(mined[q.qid]) for q in queries if q.qid in mined} if mined else {}
        wanted_dids = {d for q in queries for d in q.pos_cand_list}
        if hard_negatives:
            wanted_dids |= {d for q in queries for d in mined.get(q.qid, q.neg_cand_list)}
        candidates = stream_candidates(layout, wanted_dids, pools)
        for query in queries:
            if not any(d in candidates for d in query.pos_cand_list):
                raise DataError(f"none of the positives {query.pos_cand_list[:3]} is in any candidate pool",
                                path=str(origin[query.qid]), record_id=query.qid)
        data = cls(root=layout.root, queries=queries, candidates=candidates,
                   instructions=layout.required_instructions() if instructions else {}, text_mode=text_mode,
                   mined=mined)
        data._index()
        return data

    def _index(self) -> None:
        by_task: dict[int, list[int]] = defaultdict(list)
        by_base: dict[str, list[int]] = defaultdict(list)
        pools: dict[int, set[str]] = defaultdict(set)
        for i, query in enumerate(self.queries):
            by_task[_task_id_of(query)].append(i)
            by_base[base_of(query)].append(i)
            pools[_task_id_of(query)].update(d for d in query.pos_cand_list if d in self.candidates)
        self.by_task = dict(sorted(by_task.items()))
        self.by_base = dict(by_base)
        self.task_pools = {t: sorted(p) for t, p in pools.items()}

    def hard_negatives_of(self, query: Query) -> list[str]:
        """The query's hard negatives: its mined list when one was given, else its ``neg_cand_list``."""
        return self.mined.get(query.qid, query.neg_cand_list)

    def instruction_set(self, query: Query) -> InstructionSet | None:
        """The query's instruction set, by :func:`jfe.data.instructions.instruction_key` (the same key for
        every draw of the query, whichever positive is drawn)."""
        return instruction_set_for(self.instructions, instruction_key(query, self.candidates))


@dataclass(frozen=True)
class Draw:
    """One sampled training example: a query, one positive, its negatives and its instruction."""

    index: int
    positive: str
    negatives: tuple[str, ...]
    instruction: str | None


class BatchSampler:
    """Deterministic, resumable global-batch sampler (see the module docstring)."""

    def __init__(self, data: TrainingData, batch_size: int, task_weights: dict[int, float] | None = None,
                 group_size: int = 1, hard_negatives: int = 0, instructions: bool = False, seed: int = 0,
                 single_task: bool = False) -> None:
        self.data = data
        self.single_task = single_task
        self.batch_size = batch_size
        self.group_size = group_size
        self.hard_negatives = hard_negatives
        self.use_instructions = instructions
        weights = dict(task_weights or {})
        if not weights:
            weights = {t: 1.0 for t in data.by_task}
        unknown = [t for t, w in weights.items() if w > 0 and t not in data.by_task]
        if unknown:
            raise ConfigError(f"task_weights name tasks {unknown} that have no training queries "
                              f"(tasks present: {sorted(data.by_task)})")
        self.tasks = [t for t in sorted(weights) if weights[t] > 0]
        total = sum(weights[t] for t in self.tasks)
        self.probs = np.array([weights[t] / total for t in self.tasks])
        available = sum(len(data.by_task[t]) for t in self.tasks)
        if available < batch_size:
            raise ConfigError(f"batch_size {batch_size} exceeds the {available} training queries of tasks "
                              f"{self.tasks}")
        if single_task:
            small = [t for t in self.tasks if len(data.by_task[t]) < batch_size]
            if small:
                raise ConfigError(f"single_task batches need at least batch_size={batch_size} training queries "
                                  f"per task; tasks {small} have fewer (lower batch_size or drop them)")
        task_of = {i: t for t in self.tasks for i in data.by_task[t]}
        # grouping only pairs examples that belong to the active tasks (and, with single_task, the same task)
        self.mates = {b: [i for i in idx if i in task_of] for b, idx in data.by_base.items()}
        self._task_of = task_of
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.cursors = {t: 0 for t in self.tasks}
        self.epochs = {t: 0 for t in self.tasks}
        self.perms = {t: self.rng.permutation(len(data.by_task[t])) for t in self.tasks}
        self.batches_drawn = 0

    # --- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "cursors": dict(self.cursors), "epochs": dict(self.epochs),
                "perms": {t: p.tolist() for t, p in self.perms.items()}, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if sorted(int(t) for t in state["cursors"]) != self.tasks:
            raise ConfigError("the checkpoint's data position does not match this config's tasks")
        self.rng.bit_generator.state = state["rng"]
        self.cursors = {int(t): int(c) for t, c in state["cursors"].items()}
        self.epochs = {int(t): int(e) for t, e in state["epochs"].items()}
        self.perms = {int(t): np.asarray(p, dtype=np.int64) for t, p in state["perms"].items()}
        self.batches_drawn = int(state["batches_drawn"])

    # --- drawing -----------------------------------------------------------------------------------
    def _next_of_task(self, task: int) -> int:
        members = self.data.by_task[task]
        if self.cursors[task] >= len(members):
            self.perms[task] = self.rng.permutation(len(members))
            self.cursors[task] = 0
            self.epochs[task] += 1
        index = members[int(self.perms[task][self.cursors[task]])]
        self.cursors[task] += 1
        return index

    def _draw(self, index: int) -> Draw:
        query = self.data.queries[index]
        positives = [d for d in query.pos_cand_list if d in self.data.candidates]
        positive = positives[int(self.rng.integers(len(positives)))] if len(positives) > 1 else positives[0]
        negatives: list[str] = []
        if self.hard_negatives:
            own = set(query.pos_cand_list)
            hard = [d for d in self.data.hard_negatives_of(query) if d in self.data.candidates and d not in own]
            if hard:
                take = min(self.hard_negatives, len(hard))
                negatives = [hard[int(i)] for i in self.rng.choice(len(hard), size=take, replace=False)]
            pool = self.data.task_pools[_task_id_of(query)]
            # pad with random candidates of the same task so every query has exactly k negatives
            # (fixed shapes keep the cross-process gather simple)
            for _ in range(4 * self.hard_negatives):
                if len(negatives) >= self.hard_negatives:
                    break
                did = pool[int(self.rng.integers(len(pool)))]
                if did not in own and did not in negatives:
                    negatives.append(did)
            while len(negatives) < self.hard_negatives:  # degenerate tiny pools: any candidate at all
                negatives.append(pool[int(self.rng.integers(len(pool)))])
        instruction = None
        if self.use_instructions:
            inst = self.data.instruction_set(query)
            if inst is not None and inst.prompts:
                instruction = inst.prompts[int(self.rng.integers(len(inst.prompts)))]
        return Draw(index=index, positive=positive, negatives=tuple(negatives), instruction=instruction)

    def next_batch(self) -> list[Draw]:
        """The next global batch (identical on every rank)."""
        chosen: list[int] = []
        seen: set[int] = set()
        batch_task = self.tasks[int(self.rng.choice(len(self.tasks), p=self.probs))] if self.single_task else None
        while len(chosen) < self.batch_size:
            task = batch_task if batch_task is not None else self.tasks[
                int(self.rng.choice(len(self.tasks), p=self.probs))]
            index = self._next_of_task(task)
            if index in seen:
                continue
            chosen.append(index)
            seen.add(index)
            if self.group_size > 1:
                mates = [j for j in self.mates[base_of(self.data.queries[index])]
                         if j not in seen and (batch_task is None or self._task_of[j] == batch_task)]
                take = min(self.group_size - 1, len(mates), self.batch_size - len(chosen))
                if take > 0:
                    for k in self.rng.choice(len(mates), size=take, replace=False):
                        chosen.append(mates[int(k)])
                        seen.add(mates[int(k)])
        self.batches_drawn += 1
        return [self._draw(i) for i in chosen]

    # --- turning draws into model inputs -----------------------------------------------------------
    def to_batch(self, draws: list[Draw], rank: int = 0, world_size: int = 1) -> ContrastiveBatch:
        """The items of this rank's contiguous shard, with the false-negative mask of the global batch."""
        if len(draws) % world_size:
            raise ConfigError(f"batch_size {len(draws)} is not divisible by the {world_size} processes")
        data = self.data
        column_ids = [d.positive for d in draws] + [n for d in draws for n in d.negatives]
        mask = false_negative_mask([set(data.queries[d.index].pos_cand_list) for d in draws], column_ids)
        per = len(draws) // world_size
        shard = draws[rank * per:(rank + 1) * per]
        return ContrastiveBatch(
            queries=[query_item(data.queries[d.index], data.root, d.instruction, data.text_mode) for d in shard],
            positives=[candidate_item(data.candidates[d.positive], data.root, data.text_mode) for d in shard],
            negatives=[candidate_item(data.candidates[n], data.root, data.text_mode)
                       for d in shard for n in d.negatives],
            mask=mask if mask.any() else None,
        )
