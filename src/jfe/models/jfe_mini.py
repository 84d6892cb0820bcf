"""``jfe-mini``: the built-in joint fusion encoder, a small MLLM assembled from two pretrained towers.

MobileNetV2 visual tokens -> LLaVA-style MLP projector (1280 -> 384) -> MiniLM-L6 (BERT, 384). An item
becomes ONE sequence read by every BERT layer from the first (early fusion)::

    [CLS] v_1 ... v_K  t_1 ... t_T [SEP]      (image+text; instruction already prefixed to the text)
    [CLS] v_1 ... v_K [SEP]                   (image only: no text tokens)
    [CLS] t_1 ... t_T [SEP]                   (text only: no visual tokens)

Visual tokens are ``projector(feature) + grid position embedding + modality embedding`` fed through
``inputs_embeds`` (BERT then adds its 1-D positions and LayerNorm like for words); text tokens use BERT's
word embeddings. Sequences are right-padded and masked, and pooling (mean over real tokens, CLS, or a learned
attention pooling that starts as the mean) ignores padding, so a batch gives the vectors of one-by-one
encoding. With mean (or untrained attention) pooling, a text-only input gives exactly all-MiniLM-L6-v2's
sentence embedding before any training.

The parts shared with the baselines (:class:`TowerConfig`, :class:`TowerEncoder`) live in :mod:`jfe.models.towers`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from jfe.data.items import Item
from jfe.hardware import ComputePrecision
from jfe.models.base import l2_normalize
from jfe.models.packing import gather_rows
from jfe.models.text import HIDDEN, mean_pool
from jfe.models.towers import TowerConfig, TowerEncoder
from jfe.models.vision import FEATURE_DIM, grid_tokens


class Projector(nn.Sequential):
    """LLaVA-1.5's projector: Linear -> GELU -> Linear (``"mlp"``), or one Linear (``"linear"``)."""

    def __init__(self, kind: str, din: int, dout: int) -> None:
        if kind == "linear":
            super().__init__(nn.Linear(din, dout))
        else:
            super().__init__(nn.Linear(din, dout), nn.GELU(), nn.Linear(dout, dout))


class AttentionPool(nn.Module):
    """Learned-query attention pooling over the fused sequence that starts out as exactly mean pooling.

    Each of ``heads`` heads weighs its own slice of the hidden width: ``pooled_h = sum_i softmax_i(q_h . k_ih) x_ih``
    with ``k = W_k x``. The queries start at zero, so the weights start uniform over the real tokens (padding gets
    none) and the output is :func:`mean_pool`'s: training starts from the sentence embedding MiniLM was trained to
    give, then learns which tokens to stress (e.g. the global visual token of an image-only input, which a
    mean over 17 visual tokens dilutes).
    """

    def __init__(self, dim: int, heads: int, generator: torch.Generator) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(heads, dim // heads))
        self.key = nn.Linear(dim, dim)
        nn.init.normal_(self.key.weight, std=dim ** -0.5, generator=generator)
        nn.init.zeros_(self.key.bias)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, length, dim = hidden.shape
        head_dim = dim // self.heads
        keys = self.key(hidden).view(n, length, self.heads, head_dim)
        scores = torch.einsum("nlhd,hd->nhl", keys, self.query.to(keys.dtype)) * head_dim ** -0.5
        scores = scores.float().masked_fill(~mask.bool().unsqueeze(1), float("-inf"))
        weights = scores.softmax(-1).to(hidden.dtype)
        values = hidden.view(n, length, self.heads, head_dim)
        return torch.einsum("nhl,nlhd->nhd", weights, values).reshape(n, dim)


class JFEMiniConfig(TowerConfig):
    arch: str = "jfe-mini"
    embed_dim: int = HIDDEN
    pooling: Literal["mean", "cls", "attention"] = Field(
        "mean", description="mean over real tokens, the [CLS] state, or learned attention pooling (starts as the "
                            "mean; trained with the glue)")
    pool_heads: int = Field(8, description="heads of the attention pooling (must divide 384)")
    projector: Literal["mlp", "linear"] = "mlp"

    @field_validator("pool_heads")
    @classmethod
    def _pool_heads(cls, value: int) -> int:
        if value < 1 or HIDDEN % value:
            raise ValueError(f"pool_heads must divide MiniLM's width {HIDDEN}, got {value}")
        return value

    @field_validator("embed_dim")
    @classmethod
    def _dim(cls, value: int) -> int:
        if value != HIDDEN:
            raise ValueError(f"jfe-mini's embed_dim is MiniLM's width {HIDDEN}, got {value}")
        return value


class JFEMini(TowerEncoder):
    """The one-tower joint fusion encoder (see the module docstring)."""

    arch = "jfe-mini"
    fusion_role = "one-tower"
    config_class = JFEMiniConfig
    config: JFEMiniConfig
    fusion_kind = "joint"

    def __init__(self, config: JFEMiniConfig | None = None) -> None:
        config = config or JFEMiniConfig()
        super().__init__(config)
        gen = self._generator()
        self.projector = Projector(config.projector, FEATURE_DIM, HIDDEN)
        for layer in self.projector:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=(1.0 / layer.in_features) ** 0.5, generator=gen)
                nn.init.zeros_(layer.bias)
        # where a visual token sits in the grid (the global token has its own slot) and that it is visual
        self.visual_position = nn.Parameter(torch.randn(config.n_visual, HIDDEN, generator=gen) * 0.02)
        self.visual_modality = nn.Parameter(torch.randn(HIDDEN, generator=gen) * 0.02)
        self.pool = AttentionPool(HIDDEN, config.pool_heads, gen) if config.pooling == "attention" else None

    def glue_modules(self) -> list[nn.Module | nn.Parameter]:
        glue: list[nn.Module | nn.Parameter] = [self.projector, self.visual_position, self.visual_modality]
        return glue + ([self.pool] if self.pool is not None else [])

    def visual_tokens(self, items: Sequence[Item], vision: ComputePrecision = "fp32") -> torch.Tensor:
        """``[n, K, 384]`` input embeddings of the items' visual tokens."""
        tokens = grid_tokens(self.image_features(items, vision), self.config.grid, self.config.global_token)
        return self.projector(tokens) + self.visual_position + self.visual_modality

    def fuse(self, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,  # type: ignore[override]
             visual_index: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        embeds = self.text.bert.get_input_embeddings()(input_ids)
        tokens = grid_tokens(features, cfg.grid, cfg.global_token)
        visual = (self.projector(tokens) + self.visual_position + self.visual_modality).reshape(-1, HIDDEN)
        # visual slots take their token (row-major over the image items), every other slot its word embedding
        embeds = gather_rows(visual.to(embeds.dtype), visual_index, fill=embeds)
        states = self.text.bert(inputs_embeds=embeds, attention_mask=attention_mask,
                                token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        if self.pool is not None:
            pooled = self.pool(states, attention_mask)
        else:
            pooled = states[:, 0] if cfg.pooling == "cls" else mean_pool(states, attention_mask)
        return l2_normalize(pooled)
