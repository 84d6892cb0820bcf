"""HTTP search service and web page: ``create_app(model, index, settings)``; ``jfe serve`` runs it.

Importing this package is cheap; ``create_app`` and friends load FastAPI on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EncodeBatcher", "ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from jfe.serve.app import create_app

        return create_app
    if name == "ServeSettings":
        from jfe.serve.schemas import ServeSettings

        return ServeSettings
    if name == "EncodeBatcher":
        from jfe.serve.batching import EncodeBatcher

        return EncodeBatcher
    raise AttributeError(f"module 'jfe.serve' has no attribute {name!r}")
