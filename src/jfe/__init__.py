"""JFE: universal multimodal retrieval with a joint fusion encoder.

Data flows one way: records (``jfe.data``) -> model inputs (``jfe.data.items``) -> vectors
(``jfe.models``) -> index (``jfe.index``) -> rankings -> metrics (``jfe.eval``). Heavy modules are
imported lazily so that ``import jfe`` stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Item": ("jfe.data.items", "Item"),
    "load_model": ("jfe.models.registry", "load_model"),
    "list_models": ("jfe.models.registry", "list_models"),
    "VectorIndex": ("jfe.index.vector_index", "VectorIndex"),
    "encode": ("jfe.api", "encode"),
    "search": ("jfe.api", "search"),
    "rerank": ("jfe.api", "rerank"),
    "train": ("jfe.api", "train"),
    "evaluate": ("jfe.api", "evaluate"),
    "tune_allocator": ("jfe.hardware", "tune_allocator"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'jfe' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
