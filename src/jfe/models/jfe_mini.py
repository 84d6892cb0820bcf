"""``jfe-mini``: the built-in joint fusion encoder, a small MLLM assembled from two pretrained towers.

MobileNetV2 visual tokens -> LLaVA-style MLP projector (1280 -> 384) -> MiniLM-L6 (BERT, 384). An item
becomes ONE sequence read by every BERT layer from the first (early fusion)::

    [CLS] v_1 ... v_K  t_1 ... t_T [SEP]      (image+text; instruction already prefixed to the text)
    [CLS] v_1 ... v_K [SEP]                   (image only: no text tokens)
    [CLS] t_1 ... t_T [SEP]                   (text only: no visual tokens)

Visual tokens are ``projector(feature) + grid position embedding + modality embedding`` fed through
``inputs_embeds`` (BERT then adds its 1-D positions and LayerNorm like for words); text tokens use BERT's
word embeddings. Sequences are right-padded and masked, and pooling (mean over real tokens, or CLS) ignores
padding, so a batch gives the vectors of one-by-one encoding. With mean pooling, a text-only input gives
exactly all-MiniLM-L6-v2's sentence embedding before any training.

This module also holds :class:`TowerConfig` / :class:`TowerEncoder`, the parts shared with the baselines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from jfe.data.items import Item
from jfe.errors import ConfigError, DataError
from jfe.models.base import Encoder, EncoderConfig, l2_normalize
from jfe.models.feature_cache import feature_maps
from jfe.models.text import HIDDEN, TextTower, mean_pool, tokenize
from jfe.models.vision import FEATURE_DIM, VisionTower, grid_tokens


class TowerConfig(EncoderConfig):
    """Settings shared by every model built on the MobileNetV2 + MiniLM towers."""

    arch: str = ""
    image_size: int = Field(224, description="input side in pixels (multiple of 32; the feature map is size/32)")
    grid: int = Field(4, description="visual tokens per side, pooled from the feature map (7 = the full map at 224)")
    global_token: bool = Field(True, description="add one global (mean-pooled) visual token after the grid")
    freeze_vision: bool = Field(True, description="keep MobileNetV2 frozen (and its features cached)")
    max_text_tokens: int = Field(64, description="WordPiece tokens kept per text (instruction included)")
    pretrained: bool = Field(True, description="load the pretrained towers (False: random, for tests)")
    seed: int = Field(0, description="seed for the new (glue) weights")

    @field_validator("image_size")
    @classmethod
    def _image_size(cls, value: int) -> int:
        if value < 32 or value % 32:
            raise ValueError(f"image_size must be a multiple of 32 and >= 32, got {value}")
        return value

    @model_validator(mode="after")
    def _grid(self) -> TowerConfig:
        side = self.image_size // 32
        if not 1 <= self.grid <= side:
            raise ValueError(f"grid must be between 1 and the feature map side {side} (image_size "
                             f"{self.image_size}), got {self.grid}")
        if not 1 <= self.max_text_tokens <= 500:
            raise ValueError(f"max_text_tokens must be in 1..500, got {self.max_text_tokens}")
        return self

    @property
    def n_visual(self) -> int:
        return self.grid * self.grid + int(self.global_token)


def check_items(items: Sequence[Item]) -> list[str]:
    """Each item's modality; a clear :class:`DataError` for wrong types and empty items."""
    modalities = []
    for i, item in enumerate(items):
        if not isinstance(item, Item):
            raise DataError(f"expected an Item, got {type(item).__name__} (use encode() for raw inputs)",
                            record_id=f"item #{i}")
        modalities.append(item.modality)  # raises DataError naming the item when it is empty
    if not items:
        raise DataError("no items to embed")
    return modalities


class TowerEncoder(Encoder):
    """Base for models on the shared towers: ``self.vision`` (MobileNetV2) and ``self.text`` (MiniLM).

    Subclasses list their new weights in :meth:`glue_modules`; ``set_trainable("align")`` trains only those,
    ``"full"`` everything except a frozen vision tower.
    """

    config: TowerConfig

    def __init__(self, config: TowerConfig) -> None:
        super().__init__(config)
        self.vision = VisionTower(config.image_size, pretrained=config.pretrained)
        self.text = TextTower(config.max_text_tokens, pretrained=config.pretrained)
        self.vision.requires_grad_(not config.freeze_vision)

    def glue_modules(self) -> list[nn.Module | nn.Parameter]:
        raise NotImplementedError

    def set_trainable(self, phase: str) -> None:
        if phase not in ("align", "full"):
            raise ConfigError(f"unknown training phase {phase!r} (expected 'align' or 'full')")
        self.requires_grad_(phase == "full")
        self.vision.requires_grad_(phase == "full" and not self.config.freeze_vision)
        for glue in self.glue_modules():
            glue.requires_grad_(True)

    def image_features(self, items: Sequence[Item]) -> torch.Tensor:
        """Feature maps ``[n, 1280, h, w]`` of the items' images (cached when the tower is frozen)."""
        return feature_maps(self.vision, [item.image for item in items], [item.id for item in items])

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed)


class Projector(nn.Sequential):
    """LLaVA-1.5's projector: Linear -> GELU -> Linear (``"mlp"``), or one Linear (``"linear"``)."""

    def __init__(self, kind: str, din: int, dout: int) -> None:
        if kind == "linear":
            super().__init__(nn.Linear(din, dout))
        else:
            super().__init__(nn.Linear(din, dout), nn.GELU(), nn.Linear(dout, dout))


class JFEMiniConfig(TowerConfig):
    arch: str = "jfe-mini"
    embed_dim: int = HIDDEN
    pooling: Literal["mean", "cls"] = Field("mean", description="mean over real tokens, or the [CLS] state")
    projector: Literal["mlp", "linear"] = "mlp"

    @field_validator("embed_dim")
    @classmethod
    def _dim(cls, value: int) -> int:
        if value != HIDDEN:
            raise ValueError(f"jfe-mini's embed_dim is MiniLM's width {HIDDEN}, got {value}")
        return value


class JFEMini(TowerEncoder):
    """The one-tower joint fusion encoder (see the module docstring)."""

    arch = "jfe-mini"
    config_class = JFEMiniConfig
    config: JFEMiniConfig

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

    def glue_modules(self) -> list[nn.Module | nn.Parameter]:
        return [self.projector, self.visual_position, self.visual_modality]

    def visual_tokens(self, items: Sequence[Item]) -> torch.Tensor:
        """``[n, K, 384]`` input embeddings of the items' visual tokens."""
        tokens = grid_tokens(self.image_features(items), self.config.grid, self.config.global_token)
        return self.projector(tokens) + self.visual_position + self.visual_modality

    def embed(self, items: Sequence[Item]) -> torch.Tensor:
        modalities = check_items(items)
        cfg = self.config
        cls, sep, pad = self.text.special_ids
        with_image = [item for item, m in zip(items, modalities, strict=True) if "image" in m]
        texts = [item.text for item, m in zip(items, modalities, strict=True) if "text" in m]
        text_ids = iter(tokenize(texts, cfg.max_text_tokens))
        rows, visual_rows = [], []
        for m in modalities:
            n_vis = cfg.n_visual if "image" in m else 0
            ids = next(text_ids) if "text" in m else []
            rows.append([cls, *([pad] * n_vis), *ids, sep])
            visual_rows.append(n_vis)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        is_visual = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (row, n_vis) in enumerate(zip(rows, visual_rows, strict=True)):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
            is_visual[i, 1:1 + n_vis] = True
        device = self.visual_modality.device
        ids, mask, is_visual = ids.to(device), mask.to(device), is_visual.to(device)
        embeds = self.text.bert.get_input_embeddings()(ids)
        if with_image:
            visual = self.visual_tokens(with_image).to(embeds.dtype)
            # row-major fill: image items in order, each its K tokens in order
            embeds = embeds.masked_scatter(is_visual.unsqueeze(-1), visual.reshape(-1, HIDDEN))
        states = self.text.bert(inputs_embeds=embeds, attention_mask=mask,
                                token_type_ids=torch.zeros_like(ids)).last_hidden_state
        pooled = states[:, 0] if cfg.pooling == "cls" else mean_pool(states, mask)
        return l2_normalize(pooled)
