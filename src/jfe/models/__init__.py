"""Encoders: every model maps text, images and image+text items to one L2-normalised vector.

``load_model(name_or_path)`` builds a registered model (``jfe-mini``, ``two-tower-mini``,
``late-fusion-sf-mini``, ``late-fusion-ff-mini``), an ``hf:<path>`` MLLM, or a saved folder;
``list_models()`` lists the registered names; ``preprocess(model)`` is its image preparation as a DataLoader
transform. Exports are resolved lazily, so that importing
``jfe.models.commands`` (for ``jfe --help``) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jfe.models.base import Encoder, EncoderConfig
    from jfe.models.registry import ModelInfo, list_models, load_model, register_model
    from jfe.models.transforms import preprocess

_LAZY = {
    "Encoder": "jfe.models.base",
    "EncoderConfig": "jfe.models.base",
    "ModelInfo": "jfe.models.registry",
    "list_models": "jfe.models.registry",
    "load_model": "jfe.models.registry",
    "register_model": "jfe.models.registry",
    "preprocess": "jfe.models.transforms",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jfe.models' has no attribute {name!r}")


__all__ = ["Encoder", "EncoderConfig", "ModelInfo", "list_models", "load_model", "preprocess", "register_model"]
