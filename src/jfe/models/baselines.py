"""Baselines on the same towers as ``jfe-mini`` (MobileNetV2 frozen + MiniLM), for a like-for-like comparison.

* ``two-tower-mini`` (CLIP-style): image = MobileNetV2 global pool -> linear projection; text = MiniLM mean
  pool -> linear projection. A two-tower model has no way to *fuse*; an image+text input is embedded as
  ``normalise(normalise(image) + normalise(text))``, the most it can do.
* ``late-fusion-sf-mini`` (UniIR score fusion): the same unimodal embeddings combined by a *learned*
  weighted sum ``normalise(w_i * image + w_t * text)``; the inner product then sums weighted unimodal scores.
* ``late-fusion-ff-mini`` (UniIR feature fusion): the towers' output tokens (projected visual grid tokens
  and MiniLM token states, each with a modality embedding) go through a small transformer (2 layers) that
  is the only place where the two modalities meet; mean-pooled over real tokens.

Every model handles text, image and image+text inputs, and a batch gives the vectors of one-by-one encoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import nn

from jfe.data.items import Item
from jfe.errors import ConfigError
from jfe.hardware import ComputePrecision
from jfe.models.base import l2_normalize
from jfe.models.packing import gather_rows
from jfe.models.text import HIDDEN, mean_pool
from jfe.models.towers import TowerConfig, TowerEncoder
from jfe.models.vision import FEATURE_DIM, grid_tokens


def _linear(din: int, dout: int, gen: torch.Generator, identity: bool = False) -> nn.Linear:
    """A projection head; ``identity`` starts a square head as the identity (keeps MiniLM's space at step 0)."""
    layer = nn.Linear(din, dout)
    if identity and din == dout:
        nn.init.eye_(layer.weight)
    else:
        nn.init.normal_(layer.weight, std=(1.0 / din) ** 0.5, generator=gen)
    nn.init.zeros_(layer.bias)
    return layer


class TwoTowerConfig(TowerConfig):
    arch: str = "two-tower-mini"
    embed_dim: int = HIDDEN


class TwoTowerMini(TowerEncoder):
    """CLIP-style two-tower model; image+text inputs are the normalised sum of both embeddings."""

    arch = "two-tower-mini"
    fusion_role = "two-tower"
    config_class = TwoTowerConfig
    fusion_kind = "towers"

    def __init__(self, config: TwoTowerConfig | None = None) -> None:
        config = config or self.config_class()
        super().__init__(config)
        gen = self._generator()
        self.image_proj = _linear(FEATURE_DIM, config.embed_dim, gen)
        self.text_proj = _linear(HIDDEN, config.embed_dim, gen, identity=True)

    def glue_modules(self) -> list[nn.Module | nn.Parameter]:
        return [self.image_proj, self.text_proj]

    def unimodal(self, items: Sequence[Item], vision: ComputePrecision = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image and text embeddings ``[n, d]`` (zero rows where an item lacks the modality)."""
        features, inputs = self.fusion_inputs(items, vision)
        return self._unimodal(features, **inputs)

    def _unimodal(self, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  image_of: torch.Tensor, text_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = l2_normalize(self.image_proj(features.mean((2, 3)))).float()  # (autocast may give bf16)
        states = self.text.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        text = l2_normalize(self.text_proj(mean_pool(states, attention_mask))).float()
        return gather_rows(image, image_of), gather_rows(text, text_of)

    def combine(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return image + text

    def fuse(self, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,  # type: ignore[override]
             image_of: torch.Tensor, text_of: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.combine(*self._unimodal(features, input_ids, attention_mask, image_of, text_of)))


class ScoreFusionConfig(TwoTowerConfig):
    arch: str = "late-fusion-sf-mini"


class ScoreFusionMini(TwoTowerMini):
    """UniIR SF: ``normalise(w_image * image + w_text * text)`` with learned weights (start at 1, 1).

    For a unimodal input only one term is non-zero, so the weights matter only for image+text inputs.
    """

    arch = "late-fusion-sf-mini"
    fusion_role = "late-fusion"
    config_class = ScoreFusionConfig

    def __init__(self, config: ScoreFusionConfig | None = None) -> None:
        super().__init__(config or ScoreFusionConfig())
        self.fusion_weights = nn.Parameter(torch.ones(2))

    def glue_modules(self) -> list[nn.Module | nn.Parameter]:
        return [*super().glue_modules(), self.fusion_weights]

    def combine(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.fusion_weights[0] * image + self.fusion_weights[1] * text


class FeatureFusionConfig(TowerConfig):
    arch: str = "late-fusion-ff-mini"
    embed_dim: int = HIDDEN
    fusion_layers: int = Field(2, ge=1, le=12)
    fusion_heads: int = Field(6, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


class FeatureFusionMini(TowerEncoder):
    """UniIR FF: a small transformer fuses the two towers' *output* tokens (late fusion of features)."""

    arch = "late-fusion-ff-mini"
    fusion_role = "late-fusion"
    config_class = FeatureFusionConfig
    config: FeatureFusionConfig
    fusion_kind = "features"

    def __init__(self, config: FeatureFusionConfig | None = None) -> None:
        config = config or FeatureFusionConfig()
        super().__init__(config)
        if config.embed_dim % config.fusion_heads:
            raise ConfigError(f"embed_dim {config.embed_dim} is not divisible by fusion_heads {config.fusion_heads}")
        gen = self._generator()
        dim = config.embed_dim
        self.image_proj = _linear(FEATURE_DIM, dim, gen)
        self.text_proj = _linear(HIDDEN, dim, gen, identity=True)
        self.modality = nn.Parameter(torch.randn(2, dim, generator=gen) * 0.02)  # 0: visual, 1: text
        self.visual_position = nn.Parameter(torch.randn(config.n_visual, dim, generator=gen) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, config.fusion_heads, 4 * dim, config.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.fusion = nn.TransformerEncoder(layer, config.fusion_layers, norm=nn.LayerNorm(dim),
                                            enable_nested_tensor=False)
        with torch.no_grad():  # deterministic fusion init from the model seed
            for param in self.fusion.parameters():
                if param.ndim >= 2:
                    nn.init.xavier_uniform_(param, generator=gen)

    def glue_modules(self) -> list[nn.Module | nn.Parameter]:
        return [self.image_proj, self.text_proj, self.modality, self.visual_position, self.fusion]

    def fuse(self, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,  # type: ignore[override]
             image_of: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        tokens = grid_tokens(features, cfg.grid, cfg.global_token)
        visual = self.image_proj(tokens) + self.visual_position + self.modality[0]
        states = self.text.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        words = self.text_proj(states) + self.modality[1]
        # each slot takes its row of [visual tokens; text token states] (row-major), padding slots zeros
        table = torch.cat([visual.reshape(-1, cfg.embed_dim), words.reshape(-1, cfg.embed_dim).to(visual.dtype)])
        seq = gather_rows(table, source)
        mask = (source >= 0).long()
        fused = self.fusion(seq, src_key_padding_mask=source < 0)
        return l2_normalize(mean_pool(fused, mask))
