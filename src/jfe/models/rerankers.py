"""Rerankers: score a query and a candidate *together*, after a retriever has shortlisted candidates.

A retriever compares two vectors computed apart; a reranker reads the pair. Every reranker here scores

    score(q, c) = prior_weight * first_stage(q, c) + correction(q, c)

where ``first_stage`` is the retriever's score (a cosine) and ``correction`` is the reranker's own reading of
the pair, whose last layer starts at zero. An untrained reranker therefore returns exactly the retriever's
order, and training only has to learn where the retriever is wrong (a cross-encoder trained from scratch at
this budget *lowered* composed-retrieval R@5 from 59.8 to 24-28: it forgot what the retriever knew).
``prior_weight`` starts at 1 / the retriever's temperature (20 for 0.05), so the listwise softmax starts at the
retriever's own distribution.

* ``jfe-mini-rerank`` (:class:`JointReranker`): early fusion *across* query and candidate: one sequence
  ``[CLS] query visual tokens, query text [SEP] candidate visual tokens, candidate text [SEP]`` (token type 0
  for the query, 1 for the candidate) through jfe-mini's projector and MiniLM from the first layer, mean
  pooled, then an MLP head. Candidate image tokens attend to the reference image and the edit text directly.
  It is usually started from a trained jfe-mini (``JointReranker.from_encoder``); visual features go through
  the encoder's feature cache.
* ``late-fusion-rerank-mini`` (:class:`LateReranker`): the same budget with fusion left late: an MLP over the
  two-tower's query and candidate vectors ``[q, c, q*c, |q-c|]`` and the per-modality products.
* ``hf-rerank:<MLLM folder>`` (:class:`jfe.models.hf_rerank.HFReranker`): a transformers MLLM reading the pair in
  one chat prompt, scored by its yes/no answer logits.

``config.retriever`` names the first stage the reranker was trained on; given that retriever,
:meth:`Reranker.rerank` computes its scores when the caller has none (:func:`first_stage_scores`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from jfe.data.items import Item, as_item
from jfe.errors import ConfigError
from jfe.hardware import ComputePrecision
from jfe.models.base import Encoder, l2_normalize
from jfe.models.baselines import TwoTowerConfig, TwoTowerMini
from jfe.models.jfe_mini import JFEMini, JFEMiniConfig
from jfe.models.packing import gather_rows, pack_pairs
from jfe.models.text import HIDDEN, mean_pool


class RerankFields(BaseModel):
    """The settings every reranker has besides its towers'."""

    retriever: str | None = Field("two-tower-mini", description="the first stage whose scores the reranker "
                                  "corrects (a name or folder load_model takes); jfe.rerank and search compute "
                                  "them with it when they have none")
    prior_scale: float = Field(20.0, gt=0, description="initial weight of the first-stage score (1 / the "
                               "retriever's temperature): the untrained reranker ranks as the retriever")
    head_hidden: int = Field(384, ge=1, description="width of the score head's hidden layer")


def _zero_last(head: nn.Sequential) -> nn.Sequential:
    last = head[-1]
    assert isinstance(last, nn.Linear)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return head


class Reranker(Encoder):
    """Base of the rerankers: :meth:`score_pairs` (differentiable) and :meth:`rerank` (inference).

    A reranker is loaded like any model (``load_model("jfe-mini-rerank")``, a saved folder) but does not
    embed: :meth:`encode` refuses with a clear error.
    """

    kind: ClassVar[str] = "reranker"
    #: the trained encoder class a reranker of this arch starts from (:meth:`from_encoder`)
    starts_from: ClassVar[type[Encoder]]
    prior_weight: nn.Parameter
    head: nn.Sequential

    @classmethod
    def from_encoder(cls, encoder: Encoder, **overrides: Any) -> Reranker:
        """A reranker whose towers and glue are a copy of a trained ``encoder``'s. The score head is new and starts
        at zero, so until it is trained the reranker returns its first stage's order exactly."""
        if type(encoder) is not cls.starts_from:
            raise ConfigError(f"{cls.arch} starts from a trained {cls.starts_from.arch}, got arch {encoder.arch!r}")
        settings = {k: v for k, v in encoder.config.model_dump().items() if k != "arch"}
        reranker = cls(cls.config_class(**{**settings, "pretrained": False, "from_checkpoint": True, **overrides}))
        missing, unexpected = reranker.load_state_dict(encoder.state_dict(), strict=False)
        new = {"prior_weight"} | {f"head.{k}" for k in reranker.head.state_dict()}
        if unexpected or set(missing) - new:
            raise ConfigError(f"cannot start {cls.arch} from this {encoder.arch}: "
                              f"missing={sorted(set(missing) - new)[:5]}, unexpected={unexpected[:5]}")
        reranker.config = reranker.config.model_copy(
            update={"pretrained": getattr(encoder.config, "pretrained", True), "from_checkpoint": False})
        return reranker.to(encoder.device)

    @property
    def reads_first_stage(self) -> bool:
        """Whether scores need the first stage's (``config.retriever`` names one; an HF reranker may score alone)."""
        return bool(getattr(self.config, "retriever", None))

    def _init_prior(self, scale: float) -> None:
        self.prior_weight = nn.Parameter(torch.tensor(float(scale)))

    def score_pairs(self, queries: Sequence[Item], candidates: Sequence[Item], query_of: Sequence[int],
                    prior: torch.Tensor, vision: ComputePrecision = "fp32") -> torch.Tensor:
        """Scores ``[len(candidates)]`` of the pairs ``(queries[query_of[j]], candidates[j])`` given the first
        stage's scores ``prior`` ``[len(candidates)]``."""
        raise NotImplementedError

    def embed(self, items: Sequence[Item], vision: ComputePrecision = "fp32") -> torch.Tensor:
        raise ConfigError(f"{self.arch} is a reranker: it scores (query, candidate) pairs and has no embeddings; "
                          f"use jfe.rerank / search(rerank=...), and a retriever (e.g. two-tower-mini) to embed")

    # --- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def rerank(self, queries: Sequence[Any], candidates: Sequence[Sequence[Any]],
               first_stage: Sequence[Sequence[float]] | None = None, *, retriever: Encoder | None = None,
               instruction: str | None = None, batch_size: int = 64, precision: str | None = None,
               progress: bool = False) -> list[np.ndarray]:
        """Scores of each query's candidates (float32, one array per query, the candidates' order), higher is
        better. ``first_stage``: the retriever's scores of the same candidates; without them ``retriever`` (the
        one named by ``config.retriever``, loaded by the caller) computes them. ``instruction`` is prefixed to
        every query's text, as the retriever's queries were. Pairs are scored in batches of ``batch_size``."""
        from tqdm.auto import tqdm

        from jfe.models.precision import autocast, resolve_precision

        if len(queries) != len(candidates):
            raise ConfigError(f"{len(queries)} queries but {len(candidates)} candidate lists")
        q_items = [as_item(q, i) for i, q in enumerate(queries)]
        if instruction:
            q_items = [item.with_instruction(instruction) for item in q_items]
        c_items = [[as_item(c, j) for j, c in enumerate(group)] for group in candidates]
        if first_stage is None and not self.reads_first_stage:
            first_stage = [[0.0] * len(group) for group in c_items]  # a reranker that scores alone
        if first_stage is None:
            if retriever is None:
                raise ConfigError(f"{self.arch} corrects a first stage: pass its scores, or the retriever "
                                  f"({getattr(self.config, 'retriever', None)!r}, config.retriever) to compute them")
            first_stage = first_stage_scores(retriever, q_items, c_items, batch_size, precision)
        for i, (group, prior) in enumerate(zip(c_items, first_stage, strict=True)):
            if len(prior) != len(group):
                raise ConfigError(f"query #{i}: {len(group)} candidates but {len(prior)} first-stage scores")
        query_of = [i for i, group in enumerate(c_items) for _ in group]
        flat = [c for group in c_items for c in group]
        priors = torch.tensor([float(s) for p in first_stage for s in p], dtype=torch.float32)
        compute = resolve_precision(precision or self.precision, self.device)
        vision: ComputePrecision = "bf16" if self.vision_follows(compute) else "fp32"
        out = np.zeros(len(flat), dtype=np.float32)
        was_training = self.training
        self.eval()
        try:
            starts = range(0, len(flat), batch_size)
            for start in tqdm(starts, desc="rerank", unit="batch", disable=not progress or not flat):
                rows = slice(start, start + batch_size)
                used = sorted(set(query_of[rows]))
                local = {q: k for k, q in enumerate(used)}
                with autocast(compute, self.device):
                    scores = self.score_pairs([q_items[q] for q in used], flat[rows],
                                              [local[q] for q in query_of[rows]],
                                              priors[rows].to(self.device), vision)
                out[rows] = scores.float().cpu().numpy()
        finally:
            self.train(was_training)
        bounds = np.cumsum([0, *(len(g) for g in c_items)])
        return [out[bounds[i]:bounds[i + 1]] for i in range(len(c_items))]


def first_stage_scores(retriever: Encoder, queries: Sequence[Item], candidates: Sequence[Sequence[Item]],
                       batch_size: int = 64, precision: str | None = None) -> list[list[float]]:
    """The retriever's cosine of each query with each of its candidates."""
    q = retriever.encode(list(queries), batch_size=batch_size, precision=precision)
    flat = [c for group in candidates for c in group]
    c = retriever.encode(flat, batch_size=batch_size, precision=precision) if flat else np.zeros((0, q.shape[1]))
    bounds = np.cumsum([0, *(len(g) for g in candidates)])
    return [(c[bounds[i]:bounds[i + 1]] @ q[i]).tolist() for i in range(len(candidates))]


# --- early fusion across query and candidate -----------------------------------------------------------
class JointRerankConfig(JFEMiniConfig, RerankFields):
    arch: str = "jfe-mini-rerank"


class JointReranker(Reranker, JFEMini):
    """``jfe-mini-rerank``: query and candidate in one sequence through jfe-mini's towers (module docstring)."""

    arch = "jfe-mini-rerank"
    fusion_role = "one-tower"
    config_class = JointRerankConfig
    starts_from = JFEMini
    config: JointRerankConfig

    def __init__(self, config: JointRerankConfig | None = None) -> None:
        config = config or JointRerankConfig()
        super().__init__(config)
        gen = self._generator()
        self.head = nn.Sequential(nn.Linear(HIDDEN, config.head_hidden), nn.GELU(), nn.Linear(config.head_hidden, 1))
        first = self.head[0]
        assert isinstance(first, nn.Linear)
        nn.init.normal_(first.weight, std=HIDDEN ** -0.5, generator=gen)
        nn.init.zeros_(first.bias)
        _zero_last(self.head)
        self._init_prior(config.prior_scale)

    def glue_modules(self) -> list[nn.Module | nn.Parameter]:
        # the new weights only: the projector and visual embeddings come trained from jfe-mini, so they train
        # with the towers ("full") at the towers' learning rate, not the new head's
        return [self.head, self.prior_weight]

    def score_pairs(self, queries: Sequence[Item], candidates: Sequence[Item], query_of: Sequence[int],
                    prior: torch.Tensor, vision: ComputePrecision = "fp32") -> torch.Tensor:
        if len(query_of) != len(candidates):
            raise ConfigError(f"{len(candidates)} candidates but {len(query_of)} query indices")
        packed = pack_pairs(queries, candidates, query_of, self.config, self.text.path)
        device = self.visual_modality.device
        inputs = {name: value.to(device) for name, value in packed.inputs.items()}
        embeds = self.text.bert.get_input_embeddings()(inputs["input_ids"])
        if packed.images:  # each query image's tokens once, then the candidates': visual_index says where they go
            visual = self.visual_tokens(packed.images, vision).reshape(-1, HIDDEN)
            embeds = gather_rows(visual.to(embeds.dtype), inputs["visual_index"], fill=embeds)
        states = self.text.bert(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                                token_type_ids=inputs["token_type_ids"]).last_hidden_state
        correction = self.head(mean_pool(states, inputs["attention_mask"])).squeeze(-1).float()
        return self.prior_weight * prior.float() + correction


# --- late fusion at the same budget ------------------------------------------------------------------
class LateRerankConfig(TwoTowerConfig, RerankFields):
    arch: str = "late-fusion-rerank-mini"
    head_hidden: int = 256


class LateReranker(Reranker, TwoTowerMini):
    """``late-fusion-rerank-mini``: an MLP over the two-tower's vectors of query and candidate (module docstring)."""

    arch = "late-fusion-rerank-mini"
    fusion_role = "late-fusion"
    config_class = LateRerankConfig
    starts_from = TwoTowerMini
    config: LateRerankConfig
    #: [q, c, q*c, |q-c|] and the four image/text products of the unimodal parts
    n_features = 8

    def __init__(self, config: LateRerankConfig | None = None) -> None:
        config = config or LateRerankConfig()
        super().__init__(config)
        dim = config.embed_dim
        self.head = _zero_last(nn.Sequential(nn.Linear(self.n_features * dim, config.head_hidden), nn.GELU(),
                                             nn.Linear(config.head_hidden, 1)))
        self._init_prior(config.prior_scale)

    def glue_modules(self) -> list[nn.Module | nn.Parameter]:
        # only the head learns in "align": the vectors stay the retriever's, fusion stays late
        return [self.head, self.prior_weight]

    def _vectors(self, items: Sequence[Item], vision: ComputePrecision) -> tuple[torch.Tensor, ...]:
        image, text = self.unimodal(items, vision)
        return l2_normalize(self.combine(image, text)), image, text

    def score_pairs(self, queries: Sequence[Item], candidates: Sequence[Item], query_of: Sequence[int],
                    prior: torch.Tensor, vision: ComputePrecision = "fp32") -> torch.Tensor:
        if len(query_of) != len(candidates):
            raise ConfigError(f"{len(candidates)} candidates but {len(query_of)} query indices")
        pick = torch.tensor(list(query_of), device=self.prior_weight.device)
        q, q_img, q_txt = (t.index_select(0, pick) for t in self._vectors(queries, vision))
        c, c_img, c_txt = self._vectors(candidates, vision)
        features = torch.cat([q, c, q * c, (q - c).abs(), q_img * c_img, q_img * c_txt, q_txt * c_img,
                              q_txt * c_txt], dim=-1)
        correction = self.head(features).squeeze(-1).float()
        return self.prior_weight * prior.float() + correction


def reranker_from(arch: str, encoder: Encoder, **overrides: Any) -> Reranker:
    """The reranker of ``arch`` started from a trained ``encoder`` (what ``rerank_from`` in a training config
    does)."""
    klass = Encoder._registry.get(arch)
    if klass is None or not issubclass(klass, Reranker):
        known = sorted(a for a, k in Encoder._registry.items() if issubclass(k, Reranker))
        raise ConfigError(f"{arch!r} is not a reranker arch; known: {', '.join(known)}")
    return klass.from_encoder(encoder, **overrides)


def require_reranker(model: Encoder, what: str) -> Reranker:
    """``model`` as a :class:`Reranker`, or a clear error naming ``what`` it was loaded from."""
    if not isinstance(model, Reranker):
        raise ConfigError(f"{what} is not a reranker (arch {model.arch!r}); rerankers: jfe-mini-rerank, "
                          f"late-fusion-rerank-mini, hf-rerank:<MLLM folder> or a folder trained from one")
    return model

