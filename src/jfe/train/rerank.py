"""Training a reranker (``jfe train rerank``, ``stage = "rerank"``) with the encoders' trainer.

Everything the :class:`~jfe.train.trainer.Trainer` does stays: phases, AdamW groups, the schedule, checkpoints
and an exact ``--resume``, bf16 autocast, gradients summed across processes. What differs:

* the model: ``model`` names a reranker arch started from the trained encoder ``rerank_from``
  (:meth:`jfe.models.rerankers.Reranker.from_encoder`), or a saved reranker folder to go on training;
* the data: each draw is a training query with one positive and ``hard_negatives`` negatives drawn from its
  list in ``mined`` (``jfe mine`` on ``train_split``; lists mined on another split are refused), each with the
  retriever's score, which the reranker corrects;
* the loss: listwise softmax cross-entropy over ``[positive, negatives]`` (LamRA-Rank, RankGPT-style distillation
  use this shape), or pointwise binary cross-entropy; ``grad_cache_chunk`` > 0 back-propagates that many
  queries at a time (the loss is a mean over queries, so the gradient is the same, in less memory).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from jfe.data.items import Item, candidate_item, query_item
from jfe.errors import ConfigError
from jfe.models.base import Encoder
from jfe.models.rerankers import Reranker, reranker_from
from jfe.train.data import BatchSampler, Draw, TrainingData, stream_candidates
from jfe.train.mine import MinedLists, read_mined
from jfe.train.trainer import Trainer


@dataclass
class RerankBatch:
    """This rank's queries, their candidate groups flattened (each query: its positive, then its negatives),
    the query of each candidate, and the retriever's score of each pair."""

    queries: list[Item]
    candidates: list[Item]
    query_of: list[int]
    prior: torch.Tensor
    group: int

    def __len__(self) -> int:
        return len(self.queries)


class RerankSampler(BatchSampler):
    """The encoders' sampler (tasks by weight, seeded permutations, instruction variants, checkpointed state)
    with negatives drawn from each query's mined list instead of ``neg_cand_list``."""

    def __init__(self, data: TrainingData, mined: MinedLists, batch_size: int, negatives: int,
                 depth: int | None = None, **kwargs: Any) -> None:
        super().__init__(data, batch_size, hard_negatives=0, **kwargs)
        self.mined = mined
        self.negatives = negatives
        self.depth = depth

    def _draw(self, index: int) -> Draw:
        draw = super()._draw(index)
        entry = self.mined.queries[self.data.queries[index].qid]
        positive = draw.positive
        if positive not in entry.positives:  # a positive outside the mined pool: one that was scored
            positive = sorted(entry.positives)[int(self.rng.integers(len(entry.positives)))]
        pool = entry.negatives[:self.depth]  # [:None]: the whole list
        picks = self.rng.choice(len(pool), size=self.negatives, replace=False)
        return Draw(index=index, positive=positive, negatives=tuple(pool[int(i)][0] for i in sorted(picks)),
                    instruction=draw.instruction)

    def to_batch(self, draws: list[Draw], rank: int = 0, world_size: int = 1) -> RerankBatch:  # type: ignore[override]
        if len(draws) % world_size:
            raise ConfigError(f"batch_size {len(draws)} is not divisible by the {world_size} processes")
        per = len(draws) // world_size
        data = self.data
        queries, candidates, query_of, prior = [], [], [], []
        for i, d in enumerate(draws[rank * per:(rank + 1) * per]):
            query = data.queries[d.index]
            entry = self.mined.queries[query.qid]
            scores = dict(entry.negatives)
            queries.append(query_item(query, data.root, d.instruction, data.text_mode))
            for did in (d.positive, *d.negatives):
                candidates.append(candidate_item(data.candidates[did], data.root, data.text_mode))
                query_of.append(i)
                prior.append(entry.positives[did] if did == d.positive else scores[did])
        return RerankBatch(queries, candidates, query_of, torch.tensor(prior, dtype=torch.float32),
                           group=1 + self.negatives)


class RerankLoss(nn.Module):
    """Listwise softmax cross-entropy (the positive is column 0 of each group) or pointwise BCE; no parameters."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores [n_queries, group]`` -> the mean loss over queries."""
        if self.kind == "listwise":
            target = torch.zeros(len(scores), dtype=torch.long, device=scores.device)
            return nn.functional.cross_entropy(scores, target)
        labels = torch.zeros_like(scores)
        labels[:, 0] = 1.0
        return nn.functional.binary_cross_entropy_with_logits(scores, labels, reduction="none").sum(1).mean()


class RerankObjective:
    """Scores a :class:`RerankBatch` and returns its loss, scaled so that gradients summed over processes are
    the gradient of the global batch's mean; with ``chunk`` > 0, back-propagates ``chunk`` queries at a time
    and returns a scalar whose ``backward()`` adds the last chunk's gradient (the earlier ones are in)."""

    def __init__(self, model: Reranker, loss: RerankLoss, chunk: int, world_size: int,
                 autocast_dtype: torch.dtype | None) -> None:
        self.model, self.loss, self.chunk, self.world_size = model, loss, chunk, world_size
        self.autocast_dtype = autocast_dtype

    def _chunk_loss(self, batch: RerankBatch, rows: Sequence[int]) -> torch.Tensor:
        first, last = rows[0] * batch.group, (rows[-1] + 1) * batch.group
        device = self.model.device
        with torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext():
            scores = self.model.score_pairs(batch.queries[rows[0]:rows[-1] + 1], batch.candidates[first:last],
                                            [q - rows[0] for q in batch.query_of[first:last]],
                                            batch.prior[first:last].to(device))
        # the mean over this chunk, weighted by its share of the global batch
        share = len(rows) / (len(batch) * self.world_size)
        return self.loss(scores.float().view(len(rows), batch.group)) * share

    def __call__(self, batch: RerankBatch) -> torch.Tensor:
        rows = list(range(len(batch)))
        if not self.chunk or self.chunk >= len(rows):
            return self._chunk_loss(batch, rows)
        chunks = [rows[i:i + self.chunk] for i in range(0, len(rows), self.chunk)]
        done = torch.zeros((), device=self.model.device)
        for part in chunks[:-1]:
            loss = self._chunk_loss(batch, part)
            loss.backward()
            done = done + loss.detach()
        return self._chunk_loss(batch, chunks[-1]) + done


class RerankTrainer(Trainer):
    """:class:`Trainer` for ``stage = "rerank"`` (module docstring)."""

    model: Reranker

    def _build_model(self, device: torch.device) -> Encoder:
        from jfe.models.registry import load_model, load_reranker

        cfg = self.cfg
        if cfg.rerank_from:
            encoder = load_model(cfg.rerank_from, device=device)
            return reranker_from(cfg.model, encoder, **cfg.model_overrides)
        return load_reranker(cfg.model, f"model {cfg.model!r}", device=device, pretrained=False,
                             **cfg.model_overrides)

    def _setup_data(self) -> None:
        cfg = self.cfg
        assert cfg.mined is not None  # the config's validator requires it for stage rerank
        mined = read_mined(cfg.mined, split=cfg.train_split)
        tasks = set(cfg.task_weights) if cfg.task_weights else None
        data = TrainingData.load(cfg.data, cfg.train_split, tasks=tasks, instructions=cfg.instructions,
                                 max_queries=cfg.max_train_queries, pool_files=cfg.train_pool, text_mode=cfg.text_mode,
                                 held_out=cfg.held_out_fold)
        depth = cfg.mined_depth
        entries = {q.qid: mined.queries[q.qid] for q in data.queries if q.qid in mined.queries}
        if cfg.shortlisted_only and depth:
            # a reranker reading the retriever's top `depth` only ever sees queries whose positive is there: train on
            # those (on the others it would learn to lift candidates the retriever scored far below the shortlist)
            entries = {qid: e.shortlisted(depth) for qid, e in entries.items()}
        usable = [q for q in data.queries if q.qid in entries and entries[q.qid].positives
                  and len(entries[q.qid].negatives[:depth]) >= cfg.hard_negatives]  # [:None]: the whole list
        mined = MinedLists(mined.meta, entries)
        if len(usable) < len(data.queries):
            why = f", or no positive in the retriever's top {depth}" if cfg.shortlisted_only and depth else ""
            warnings.warn(f"{len(data.queries) - len(usable)} of {len(data.queries)} training queries are left out: "
                          f"not in {cfg.mined}, fewer than {cfg.hard_negatives} mined negatives{why}", stacklevel=2)
        if not usable:
            raise ConfigError(f"no training query of {cfg.train_split!r} has a usable list in {cfg.mined}")
        wanted = {d for q in usable for d in (*mined.queries[q.qid].positives,
                                              *(n for n, _ in mined.queries[q.qid].negatives))}
        missing = wanted - set(data.candidates)
        if missing:
            from jfe.data.mbeir import MBEIRLayout

            layout = MBEIRLayout(data.root)
            data.candidates.update(stream_candidates(layout, missing,
                                                      [layout.root / f for f in cfg.train_pool] or None))
        unknown = sorted(wanted - set(data.candidates))
        if unknown:
            raise ConfigError(f"{cfg.mined} names candidates that are in no pool of {cfg.data}: {unknown[:3]}")
        data.queries = usable
        data._index()
        self.data = data
        self.sampler = RerankSampler(data, mined, cfg.batch_size, cfg.hard_negatives, depth,
                                     task_weights=cfg.task_weights, instructions=cfg.instructions, seed=cfg.seed)

    def _setup_objective(self, autocast_dtype: torch.dtype | None) -> None:
        self.loss = RerankLoss(self.cfg.rerank_loss)
        self.objective = RerankObjective(self.model, self.loss, self.cfg.grad_cache_chunk, self.ctx.world_size,
                                         autocast_dtype)

    def _loss_value(self, loss: torch.Tensor) -> float:
        # each process computed its shard's share of the global mean: the logged loss is their sum
        return float(sum(self.ctx.all_gather_object(float(loss.detach()))))

    def validate(self) -> dict[str, float]:
        """Rerankers are measured by ``jfe eval --rerank`` (the whole first stage, not a capped sample)."""
        return {}

