"""Vector indexes (faiss, inner product) with string ids and candidate records: store, search, shard.

Nothing here encodes: embedding candidate pools with a model and writing an index is :mod:`jfe.indexing`.
"""

from __future__ import annotations

from jfe.index.shards import ShardedIndex, load_index
from jfe.index.vector_index import VectorIndex

__all__ = ["ShardedIndex", "VectorIndex", "load_index"]
