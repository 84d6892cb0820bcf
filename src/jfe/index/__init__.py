"""Vector index (faiss, inner product) with string ids and candidate records; building it from pools.

``VectorIndex`` is cheap to import; ``build_index`` (which needs torch through the encoder) loads lazily.
"""

from __future__ import annotations

from typing import Any

from jfe.index.shards import ShardedIndex, load_index
from jfe.index.vector_index import VectorIndex

__all__ = ["ShardedIndex", "VectorIndex", "build_index", "load_index", "read_pools", "write_index"]


def __getattr__(name: str) -> Any:
    if name in ("build_index", "read_pools", "write_index"):
        from jfe.index import build

        return getattr(build, name)
    raise AttributeError(f"module 'jfe.index' has no attribute {name!r}")
