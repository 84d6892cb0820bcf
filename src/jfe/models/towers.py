"""The base classes of every model built on the two pretrained towers (MobileNetV2 + MiniLM-L6):
``jfe-mini`` and the baselines (two-tower, late-fusion SF and FF) share their config fields, the towers,
the frozen-vision feature cache and the ``align``/``full`` trainable switch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from jfe.data.items import Item
from jfe.errors import ConfigError
from jfe.hardware import ComputePrecision
from jfe.models.base import WEIGHTS_NAME, Encoder, EncoderConfig
from jfe.models.compact import COMPACT_FORMAT, compact_state, is_compact
from jfe.models.feature_cache import feature_maps
from jfe.models.packing import check_items, pack
from jfe.models.phases import check_phase
from jfe.models.text import TextTower
from jfe.models.vision import FEATURE_DIM, TRUNK_MODULES, VisionTower

TEXT_ASSETS_DIR = "text"
__all__ = ["TEXT_ASSETS_DIR", "TowerConfig", "TowerEncoder", "check_items"]


class TowerConfig(EncoderConfig):
    """Settings shared by every model built on the MobileNetV2 + MiniLM towers."""

    arch: str = ""
    image_size: int = Field(224, description="input side in pixels (multiple of 32; the feature map is size/32)")
    grid: int = Field(4, description="visual tokens per side, pooled from the feature map (7 = the full map at 224)")
    global_token: bool = Field(True, description="add one global (mean-pooled) visual token after the grid")
    freeze_vision: bool = Field(True, description="keep MobileNetV2 frozen (and its features cached); False "
                                "trains the whole trunk")
    vision_trainable_modules: int = Field(
        0, ge=0, le=TRUNK_MODULES,
        description=f"with freeze_vision, still train MobileNetV2's top N of its {TRUNK_MODULES} trunk modules "
                    "in the 'full' phase (the trunk below them stays frozen and cached); 0 = all frozen")
    max_text_tokens: int = Field(64, description="WordPiece tokens kept per text (instruction included)")
    pretrained: bool = Field(True, description="load the pretrained towers (False: random, for tests, or "
                             "overwritten by a checkpoint)")
    text_dir: str | None = Field(None, exclude=True, description="MiniLM config + tokenizer folder (a saved "
                                 "model's text/; default the asset); never saved")
    from_checkpoint: bool = Field(False, exclude=True, description="built to be filled from a checkpoint at once "
                                  "(load_model of a saved folder); never saved")
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

    @model_validator(mode="after")
    def _vision_modules(self) -> TowerConfig:
        if not self.freeze_vision and self.vision_trainable_modules not in (0, TRUNK_MODULES):
            raise ValueError("freeze_vision = false trains the whole vision trunk; to train only its top, keep "
                             "freeze_vision = true and set vision_trainable_modules")
        return self

    @property
    def trained_vision_modules(self) -> int:
        """How many trunk modules the 'full' phase trains (all of them when freeze_vision is off)."""
        return TRUNK_MODULES if not self.freeze_vision else self.vision_trainable_modules

    @property
    def n_visual(self) -> int:
        return self.grid * self.grid + int(self.global_token)


class TowerEncoder(Encoder):
    """Base for models on the shared towers: ``self.vision`` (MobileNetV2) and ``self.text`` (MiniLM).

    Subclasses list their new weights in :meth:`glue_modules`; ``set_trainable("align")`` trains only those,
    ``"align+vision"`` those and the trainable top of the vision tower (``vision_trainable_modules``), the
    text tower frozen; ``"full"`` everything except the frozen part of the vision tower (all of it by default).
    """

    config: TowerConfig

    def __init__(self, config: TowerConfig) -> None:
        super().__init__(config)
        self.vision = VisionTower(config.image_size, pretrained=config.pretrained)
        if config.from_checkpoint and not config.pretrained:
            # every weight comes from the checkpoint: draw MiniLM's throw-away init without moving the global RNG,
            # as the pretrained build (a copy) never did, so training that starts from a saved model goes on
            # exactly as before (dropout masks, sampling)
            with torch.random.fork_rng(devices=[]):
                self.text = TextTower(config.max_text_tokens, pretrained=False, path=config.text_dir)
        else:
            self.text = TextTower(config.max_text_tokens, pretrained=config.pretrained, path=config.text_dir)
        self.vision.set_trainable_top(config.trained_vision_modules)

    @property
    def image_input_size(self) -> int | None:
        return self.config.image_size

    #: the state-dict prefixes of the pretrained towers: what a compact checkpoint stores as deltas
    tower_prefixes: ClassVar[tuple[str, ...]] = ("vision.", "text.")

    @classmethod
    def checkpoint_overrides(cls, directory: Path) -> dict[str, Any]:
        """A checkpoint holds every weight of both towers: build them unpretrained (nothing read from the asset
        cache) and, where the folder keeps MiniLM's config and tokenizer in ``text/``, read those from there.
        A compact checkpoint (:mod:`jfe.models.compact`) holds only what training changed: build it on the
        pretrained towers of the verified asset cache."""
        if is_compact(directory / WEIGHTS_NAME):
            return {"pretrained": True}
        text = directory / TEXT_ASSETS_DIR
        return {"pretrained": False, "from_checkpoint": True,
                **({"text_dir": str(text)} if (text / "tokenizer.json").is_file() else {})}

    def _save_extra(self, directory: Path) -> None:
        """``text/``: MiniLM's config and tokenizer, so the folder loads with nothing from the asset cache
        (``model.safetensors`` holds every weight, MobileNetV2's and MiniLM's included)."""
        self.text.save_assets(directory / TEXT_ASSETS_DIR)

    def glue_modules(self) -> list[nn.Module | nn.Parameter]:
        raise NotImplementedError

    def save_compact(self, directory: str | Path, rank: int = 64, *, overwrite: bool = False) -> Path:
        """Save what training changed in the pretrained towers (:mod:`jfe.models.compact`): the glue whole, the
        changed tower tensors whole or as rank-``rank`` deltas, all fp16; ``load_model`` rebuilds the model on
        the pretrained towers of the asset cache. Returns the folder."""
        base = type(self)(self.config.model_copy(update={"pretrained": True, "from_checkpoint": False,
                                                         "text_dir": None}))
        state = compact_state(self.state_dict(), base.state_dict(), self.tower_prefixes, rank)
        return self._save(Path(directory), overwrite, state, metadata={"format": COMPACT_FORMAT, "rank": str(rank)})

    def set_trainable(self, phase: str) -> None:
        check_phase(phase)
        top = self.config.trained_vision_modules
        if phase == "align+vision" and not top:
            raise ConfigError("phase 'align+vision' trains the top of the vision tower, but this model keeps it "
                              "all frozen: set vision_trainable_modules (e.g. --set "
                              "model_overrides.vision_trainable_modules=5) or use phase 'align'")
        self.requires_grad_(phase == "full")
        self.vision.set_trainable_top(top if phase in ("full", "align+vision") else 0)
        for glue in self.glue_modules():
            glue.requires_grad_(True)

    #: how :func:`jfe.models.packing.pack` lays out this model's inputs ("joint", "towers" or "features")
    fusion_kind: ClassVar[str] = ""

    def embed(self, items: Sequence[Item], vision: ComputePrecision = "fp32") -> torch.Tensor:
        """Differentiable embeddings, the vision tower computing in ``vision`` (``"fp32"`` unless an encode in
        bf16 asked it to follow: :meth:`Encoder.embed_in`): :func:`~jfe.models.packing.pack`, the vision tower
        on the packed images, then :meth:`fuse`."""
        features, inputs = self.fusion_inputs(items, vision)
        return self.fuse(features, **inputs)

    def fusion_inputs(self, items: Sequence[Item], vision: ComputePrecision = "fp32"
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """What :meth:`fuse` reads for ``items``: the packed images' feature maps (a placeholder when there are
        none) and the packed inputs, on the model's device."""
        packed = pack(self.fusion_kind, items, self.config, self.text.path)
        features = self.image_features(packed.images, vision) if packed.images else self.placeholder_features()
        return features, {name: value.to(features.device) for name, value in packed.inputs.items()}

    def fuse(self, features: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """``[n, d]`` unit vectors from the image items' feature maps ``[m, 1280, h, w]`` and the packed inputs
        (:data:`jfe.models.packing.FUSION_INPUTS`); tensor arithmetic only, so it exports to ONNX as it is."""
        raise NotImplementedError

    def placeholder_features(self) -> torch.Tensor:
        """One all-zero feature map: what :meth:`fuse` gets for a batch without images (no index points at it)."""
        side = self.vision.grid_size
        return torch.zeros(1, FEATURE_DIM, side, side, device=self.device)

    def embed_in(self, items: Sequence[Item], vision: ComputePrecision) -> torch.Tensor:
        return self.embed(items, vision)

    def image_features(self, items: Sequence[Item], vision: ComputePrecision = "fp32") -> torch.Tensor:
        """Feature maps ``[n, 1280, h, w]`` of the items' images (cached when the tower is frozen), computed in
        ``vision``."""
        return feature_maps(self.vision, [item.required_image for item in items], [item.id for item in items],
                            compute=vision)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed)
