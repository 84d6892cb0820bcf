"""A Hugging Face multimodal LM as a pointwise reranker (arch ``hf-mllm-rerank``: ``load_model("hf-rerank:<path>")``).

The query and one candidate go into one chat prompt, both images and both texts, so every layer of the LM reads
them together::

    user: Query: [<image>] query text
          Candidate: [<image>] candidate text
          Does the candidate match the query? Answer yes or no.
    assistant:

and the score is how much the LM prefers ``yes_token`` to ``no_token`` as its first answer token: the difference
of the two logits at the last prompt token, as LamRA-Rank scores pointwise. Only those two rows of the LM head are
kept (``answer_head``, ``[2, hidden]``, trained with the reranker); the rest of the head is dropped as the encoder
drops it. A final-logit soft cap (Gemma's) is not applied: it changes the margin, not which answer leads.

Like the built-in rerankers the score is ``prior_weight * first_stage + (yes - no)``. ``prior_scale`` starts at 0
and ``retriever`` is None: the MLLM scores alone, and needs no first stage (a pretrained instruct model answers
yes/no zero-shot); set them to let training weigh the retriever's score in. Training is the rerankers' own (``jfe
train rerank``, ``stage = "rerank"``, ``model = "hf-rerank:<path>"``) with LoRA through peft (``lora_r``); the
adapter is saved in peft's files beside the two answer rows, as for the HF encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from jfe.data.items import Item
from jfe.errors import ConfigError
from jfe.hardware import ComputePrecision
from jfe.models.base import Encoder
from jfe.models.hf import HFConfig, HFEncoder, last_token_states
from jfe.models.rerankers import Reranker

ANSWER_ROWS = ("answer_head", "prior_weight")


class HFRerankConfig(HFConfig):
    """:class:`HFConfig` plus the pair prompt and the answer tokens."""

    arch: str = "hf-mllm-rerank"
    retriever: str | None = Field(None, description="the first stage whose scores are weighed in (prior_scale); "
                                  "None: the MLLM scores alone")
    prior_scale: float = Field(0.0, ge=0, description="initial weight of the first-stage score")
    rerank_prompt: str = "Does the candidate match the query? Answer yes or no."
    query_label: str = "Query:"
    candidate_label: str = "Candidate:"
    yes_token: str = "yes"
    no_token: str = "no"


class HFReranker(Reranker, HFEncoder):
    """Pointwise yes/no reranker over a ``transformers`` MLLM (module docstring)."""

    arch = "hf-mllm-rerank"
    fusion_role = "one-tower"
    config_class = HFRerankConfig
    config: HFRerankConfig
    starts_from = HFEncoder
    answer_head: nn.Parameter

    def __init__(self, config: HFRerankConfig, device: str | torch.device | None = None, **kwargs: Any) -> None:
        super().__init__(config, device, **kwargs)
        # frozen like every parameter of an HF model until training calls set_trainable
        self.prior_weight = nn.Parameter(torch.tensor(float(config.prior_scale), device=self.device),
                                         requires_grad=False)
        self._touched |= set(ANSWER_ROWS)  # always saved: the two rows are not in the base model's files as such

    @classmethod
    def from_encoder(cls, encoder: Encoder, **overrides: Any) -> Reranker:
        raise ConfigError("an HF reranker starts from the MLLM itself: model = \"hf-rerank:<path>\" (no rerank_from)")

    def _answer_id(self, token: str) -> int:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ConfigError(f"answer token {token!r} is {len(ids)} tokens for the tokenizer of "
                              f"{self.config.model_path}: choose yes_token / no_token that are one token each")
        return int(ids[0])

    def _keep_from_lm_head(self, full: nn.Module) -> None:
        """The LM head's rows of the two answer tokens (the input embeddings' where the head is absent or tied)."""
        config = self.config
        assert isinstance(config, HFRerankConfig)
        rows = [self._answer_id(config.yes_token), self._answer_id(config.no_token)]
        # transformers' PreTrainedModel methods (torch's Module.__getattr__ would type them as Tensor | Module)
        model: Any = full
        head = model.get_output_embeddings()
        weight = head.weight if isinstance(head, nn.Linear) else model.get_input_embeddings().weight
        self.answer_head = nn.Parameter(weight.detach()[rows].float().clone(), requires_grad=False)

    def glue_modules(self) -> list[nn.Module | nn.Parameter]:
        return [self.answer_head, self.prior_weight]

    def set_trainable(self, phase: str) -> None:
        """The encoder's phases (LoRA, the projector, or everything), and always the answer rows and prior weight."""
        super().set_trainable(phase)
        for name in ANSWER_ROWS:
            getattr(self, name).requires_grad_(True)

    # --- the pair prompt --------------------------------------------------------------------------
    def pair_prompt(self, query: Item, candidate: Item) -> str:
        """The chat-template prompt reading ``query`` and ``candidate`` together (placeholders not yet expanded)."""
        cfg = self.config
        content = [*self.item_content(query, cfg.query_label),
                   *self.item_content(candidate, "\n" + cfg.candidate_label),
                   {"type": "text", "text": "\n" + cfg.rerank_prompt}]
        return self.render_prompt(content, add_generation_prompt=True)  # the answer token comes next

    # --- scoring ----------------------------------------------------------------------------------
    def score_pairs(self, queries: Sequence[Item], candidates: Sequence[Item], query_of: Sequence[int],
                    prior: torch.Tensor, vision: ComputePrecision = "fp32") -> torch.Tensor:
        if len(query_of) != len(candidates):
            raise ConfigError(f"{len(candidates)} candidates but {len(query_of)} query indices")
        has_image = [queries[q].image is not None or c.image is not None for q, c in zip(query_of, candidates,
                                                                                         strict=True)]
        if self.adapter.image_required and not all(has_image):
            j = has_image.index(False)
            raise ConfigError(f"pair ({queries[query_of[j]].id}, {candidates[j].id}) has no image, and "
                              f"{self.config.model_path} ({self.adapter.name}) takes an image with every prompt")
        groups = [list(range(len(candidates)))]
        if self.adapter.text_apart and 0 < sum(has_image) < len(has_image):  # mllama: see ModelAdapter.text_apart
            groups = [[j for j, h in enumerate(has_image) if not h], [j for j, h in enumerate(has_image) if h]]
        margin = torch.empty(len(candidates), device=self.device)
        for rows in groups:
            margin[rows] = self._answer_margin(queries, [candidates[j] for j in rows], [query_of[j] for j in rows])
        return self.prior_weight * prior.float() + margin

    def _answer_margin(self, queries: Sequence[Item], candidates: Sequence[Item], query_of: Sequence[int]
                       ) -> torch.Tensor:
        """``logit(yes) - logit(no)`` after each pair's prompt."""
        prompts = [self.pair_prompt(queries[q], c) for q, c in zip(query_of, candidates, strict=True)]
        query_images = {q: queries[q].load_image() for q in sorted(set(query_of)) if queries[q].image is not None}
        images: list[tuple[int, Any]] = []
        for j, (q, candidate) in enumerate(zip(query_of, candidates, strict=True)):
            if q in query_images:
                images.append((j, query_images[q]))
            if candidate.image is not None:
                images.append((j, candidate.load_image()))
        names = [f"{queries[q].id or '(query)'} / {c.id or '(candidate)'}" for q, c in zip(query_of, candidates,
                                                                                           strict=True)]
        batch = self.model_inputs(names, prompts, images)
        hidden = self.hidden_states(batch)
        logits = last_token_states(hidden, batch["attention_mask"]) @ self.answer_head.t()
        return (logits[:, 0] - logits[:, 1]).float()
