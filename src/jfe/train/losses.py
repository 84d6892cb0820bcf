"""Contrastive losses as ``nn.Module`` s, in the sentence-transformers style.

* :class:`InfoNCELoss` works on embeddings: symmetric InfoNCE over in-batch negatives plus optional
  explicit hard-negative columns, with a fixed or learnable (log-parameterised, clamped) temperature and
  an optional mask that removes false negatives (a column that is also a positive of the row).
* :class:`ContrastiveObjective` holds the encoder (like ``MultipleNegativesRankingLoss`` holds its
  model): it embeds a :class:`ContrastiveBatch` and returns the loss. With ``chunk_size > 0`` it runs
  GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
  Setup"): embed in chunks without a graph, compute the loss and its gradient w.r.t. the embeddings,
  then on ``loss.backward()`` re-embed each chunk with a graph (replaying its RNG state, so dropout
  matches) and backpropagate the cached gradient. In a distributed run embeddings are gathered from
  every rank so the negatives span the global batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from jfe.data.items import Item
from jfe.train.distributed import DistContext, gather_with_grad

if TYPE_CHECKING:  # only for the annotation: the losses need no model code at import time
    from jfe.models.base import Encoder


class InfoNCELoss(nn.Module):
    """InfoNCE with in-batch negatives.

    Rows are queries; columns are the batch's positives followed by any hard negatives (shared by all
    rows, as in UniIR/E5). ``symmetric`` adds the candidate->query direction over the positives (so
    image->caption and caption->image are both trained from one pair). The temperature is stored as
    ``log(1/T)`` and clamped to ``[min_temperature, max_temperature]`` in the forward pass.
    """

    def __init__(self, temperature: float = 0.05, learnable: bool = True, min_temperature: float = 0.01,
                 max_temperature: float = 1.0, symmetric: bool = True) -> None:
        super().__init__()
        if not 0 < min_temperature <= temperature <= max_temperature:
            raise ValueError(f"need 0 < min_temperature <= temperature <= max_temperature, got "
                             f"{min_temperature}, {temperature}, {max_temperature}")
        log_scale = torch.tensor(math.log(1.0 / temperature), dtype=torch.float32)
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.min_log_scale = math.log(1.0 / max_temperature)
        self.max_log_scale = math.log(1.0 / min_temperature)
        self.symmetric = symmetric

    def scale(self) -> torch.Tensor:
        """``1 / T`` (clamped; the clamp stops the learnable temperature collapsing)."""
        return self.log_scale.clamp(self.min_log_scale, self.max_log_scale).exp()

    @property
    def temperature(self) -> float:
        return float(1.0 / self.scale().detach())

    def forward(self, queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss of ``B`` rows. ``queries``/``positives``: ``[B, d]``; ``negatives``: ``[M, d]`` extra
        columns; ``mask``: bool ``[B, B + M]``, True where a column must not count as a negative (the
        diagonal target is never masked)."""
        if queries.shape != positives.shape:
            raise ValueError(f"queries {tuple(queries.shape)} and positives {tuple(positives.shape)} differ")
        n = queries.shape[0]
        # float32 logits even under autocast: softmax over thousands of columns needs the range.
        q, p = queries.float(), positives.float()
        columns = p if negatives is None or negatives.numel() == 0 else torch.cat([p, negatives.float()])
        scale = self.scale()
        logits = scale * q @ columns.T
        targets = torch.arange(n, device=q.device)
        if mask is not None:
            mask = mask.to(q.device)
            if mask.shape != logits.shape:
                raise ValueError(f"mask {tuple(mask.shape)} does not match logits {tuple(logits.shape)}")
            mask = mask.clone()
            mask[targets, targets] = False
            logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
        loss = F.cross_entropy(logits, targets)
        if self.symmetric:
            back = scale * p @ q.T
            if mask is not None:
                back = back.masked_fill(mask[:, :n].T, torch.finfo(back.dtype).min)
            loss = (loss + F.cross_entropy(back, targets)) / 2
        return loss


class MatryoshkaLoss(nn.Module):
    """``loss`` averaged over prefixes of the vectors (each prefix renormalised), so that the first ``d``
    coordinates of an embedding are an embedding too (Kusupati et al., 2022; sentence-transformers'
    MatryoshkaLoss). ``dims``: the prefix lengths, the full dimension always among them. The temperature is the
    wrapped loss's, shared by every prefix."""

    def __init__(self, loss: InfoNCELoss, dims: Sequence[int]) -> None:
        super().__init__()
        if not dims or any(d < 1 for d in dims):
            raise ValueError(f"matryoshka dims must be positive, got {list(dims)}")
        self.loss = loss
        self.dims = sorted(set(dims))

    def scale(self) -> torch.Tensor:
        return self.loss.scale()

    @property
    def temperature(self) -> float:
        return self.loss.temperature

    def forward(self, queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        full = queries.shape[-1]
        total = queries.new_zeros((), dtype=torch.float32)
        dims = [d for d in self.dims if d < full] + [full]
        for d in dims:
            negative = None if negatives is None else F.normalize(negatives[..., :d].float(), dim=-1)
            total = total + self.loss(F.normalize(queries[..., :d].float(), dim=-1),
                                      F.normalize(positives[..., :d].float(), dim=-1), negative, mask)
        return total / len(dims)


def false_negative_mask(positive_sets: Sequence[set[str] | frozenset[str]], column_ids: Sequence[str]) -> torch.Tensor:
    """``mask[i, j]`` is True when column ``j`` is a positive of row ``i`` other than its own target.

    Grouped batches put several queries about one base item together; a candidate that answers two of
    them must not be pushed away from either.
    """
    columns: dict[str, list[int]] = {}
    for j, cid in enumerate(column_ids):
        columns.setdefault(cid, []).append(j)
    mask = torch.zeros(len(positive_sets), len(column_ids), dtype=torch.bool)
    for i, pos in enumerate(positive_sets):  # O(rows x positives), not O(rows x columns)
        for did in pos:
            for j in columns.get(did, ()):
                if j != i:
                    mask[i, j] = True
    return mask


@dataclass
class ContrastiveBatch:
    """This process's share of one training batch.

    ``negatives`` is flat (``k`` per query, in query order). ``mask`` covers the *global* batch:
    ``[B_global, B_global + M_global]``.
    """

    queries: list[Item]
    positives: list[Item]
    negatives: list[Item] = field(default_factory=list)
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.queries)


class _RandState:
    """The RNG state before a chunk's first forward, replayed for its second (GradCache)."""

    def __init__(self, devices: list[int]) -> None:
        self.devices = devices
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in devices]

    def replay(self) -> AbstractContextManager[Any]:
        ctx = torch.random.fork_rng(devices=self.devices)
        ctx.__enter__()
        torch.set_rng_state(self.cpu)
        for d, state in zip(self.devices, self.cuda, strict=True):
            torch.cuda.set_rng_state(state, d)
        return ctx


class ContrastiveObjective(nn.Module):
    """Embed a batch with ``model`` and score it with ``loss`` (optionally GradCache, optionally gathered).

    ``forward`` returns a scalar whose ``.backward()`` fills the gradients of the model and of the loss's
    own parameters; in GradCache mode the model's gradients are produced inside that call.
    """

    def __init__(self, model: Encoder, loss: InfoNCELoss | MatryoshkaLoss, chunk_size: int = 0,
                 dist: DistContext | None = None, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.chunk_size = chunk_size
        self.dist = dist
        self.autocast_dtype = autocast_dtype

    def _embed(self, items: Sequence[Item]) -> torch.Tensor:
        # one call for the whole mixed-modality list (splitting it by modality to save padding was not faster
        # for jfe-mini on CPU when measured)
        if self.autocast_dtype is not None:
            with torch.autocast(device_type=self.model.device.type, dtype=self.autocast_dtype):
                return self.model.embed(items)
        return self.model.embed(items)

    def _loss_from_reps(self, reps: torch.Tensor, batch: ContrastiveBatch) -> torch.Tensor:
        nq, npos = len(batch.queries), len(batch.positives)
        q, p = gather_with_grad(reps[:nq], self.dist), gather_with_grad(reps[nq:nq + npos], self.dist)
        neg = gather_with_grad(reps[nq + npos:], self.dist) if len(batch.negatives) else None
        return self.loss(q, p, neg, batch.mask)

    def forward(self, batch: ContrastiveBatch) -> torch.Tensor:
        if len(batch.queries) != len(batch.positives):
            raise ValueError("a contrastive batch needs one positive per query")
        items = [*batch.queries, *batch.positives, *batch.negatives]
        if self.chunk_size <= 0:
            return self._loss_from_reps(self._embed(items), batch)
        return self._grad_cache_forward(items, batch)

    def _grad_cache_forward(self, items: list[Item], batch: ContrastiveBatch) -> torch.Tensor:
        chunks = [items[i:i + self.chunk_size] for i in range(0, len(items), self.chunk_size)]
        device = self.model.device
        devices = [device.index or 0] if device.type == "cuda" else []
        states: list[_RandState] = []
        with torch.no_grad():
            parts = []
            for chunk in chunks:
                states.append(_RandState(devices))
                parts.append(self._embed(chunk))
        reps = torch.cat(parts).detach().requires_grad_(True)
        loss_params = [p for p in self.loss.parameters() if p.requires_grad]
        with torch.enable_grad():
            loss = self._loss_from_reps(reps, batch)
            grads = torch.autograd.grad(loss, [reps, *loss_params])
        rep_grad, param_grads = grads[0], grads[1:]
        out = loss.detach().requires_grad_(True)

        def second_pass(upstream: torch.Tensor) -> None:
            # Runs inside out.backward(): the cached gradients, scaled by whatever multiplied the loss.
            for param, g in zip(loss_params, param_grads, strict=True):
                g = g * upstream
                param.grad = g if param.grad is None else param.grad + g
            offset = 0
            for chunk, state in zip(chunks, states, strict=True):
                ctx = state.replay()
                try:
                    with torch.enable_grad():
                        emb = self._embed(chunk)
                        emb.backward(rep_grad[offset:offset + len(chunk)].to(emb.dtype) * upstream)
                finally:
                    ctx.__exit__(None, None, None)
                offset += len(chunk)

        out.register_hook(second_pass)
        return out
