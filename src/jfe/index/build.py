"""Fill a :class:`VectorIndex` from vectors: factory checks, default search parameters, measured recall.

Nothing here encodes: embedding candidate pools with a model is :mod:`jfe.indexing`, the layer above."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Protocol

import numpy as np

from jfe.errors import ConfigError
from jfe.index.exact import exact_topk, rescore
from jfe.index.vector_index import VectorIndex

# Search-time parameters applied when the user gives none: faiss's own defaults (efSearch 16, nprobe 1) give
# poor recall on 384-d embeddings. These are safer starting points, not guarantees (HNSW32 at efSearch 128
# reached only 0.82 recall@10 on the benchmark's clustered 1M pool): every build measures recall@10 against
# exact search and writes it to meta.json, which is the number to check on one's own data.
DEFAULT_SEARCH_PARAMS = {"HNSW": {"efSearch": 128}, "IVF": {"nprobe": 32}}
# Quantising indexes are trained on at most this many pool vectors (a seeded sample): k-means and PQ training
# cost grows with it and faiss recommends ~40-256 points per centroid, so 1024-4096 lists need far fewer.
TRAIN_SAMPLE = 131_072
RECALL_QUERIES = 200
RECALL_K = 10


class Searchable(Protocol):
    """What :func:`recall_at_k` measures: a faiss :class:`VectorIndex`, a sharded one, a LanceDB table."""

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Collection[str]] | None = None
               ) -> tuple[list[list[str]], np.ndarray]: ...


def parse_search_params(values: Sequence[str] | None) -> dict[str, float]:
    """``["efSearch=128", "nprobe=16"]`` -> ``{"efSearch": 128, "nprobe": 16}`` (ConfigError naming a bad one)."""
    params: dict[str, float] = {}
    for value in values or ():
        name, sep, raw = str(value).partition("=")
        try:
            number = float(raw)
        except ValueError:
            number = float("nan")
        if not sep or not name.strip() or not np.isfinite(number):
            raise ConfigError(f"--search-param must look like NAME=NUMBER (e.g. efSearch=128), got {value!r}")
        params[name.strip()] = int(number) if number.is_integer() else number
    return params


def default_search_params(factory: str) -> dict[str, float]:
    """The search parameters JFE applies for ``factory`` when none are given (see DEFAULT_SEARCH_PARAMS)."""
    params: dict[str, float] = {}
    for part in factory.replace(" ", "").split(","):
        for prefix, defaults in DEFAULT_SEARCH_PARAMS.items():
            if part.startswith(prefix):
                params.update(defaults)
    return params


def recall_at_k(index: Searchable, ids: Sequence[str], vectors: np.ndarray, *, k: int = RECALL_K,
                queries: int = RECALL_QUERIES, seed: int = 0) -> dict[str, Any]:
    """Recall@k of ``index`` against exact fp32 search, with a seeded sample of the pool's own vectors as queries.

    Self-matches are not removed: exact search finds them too, so both rankings are compared as they come.
    Tie-aware: a returned candidate counts when its exact score reaches the k-th exact score (less float32
    rounding), so among duplicate vectors any one is right - an exact index scores 1.0 on any pool.
    """
    n = len(vectors)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(queries, n), replace=False))
    sample = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    kk = min(k, n)
    truth_scores, _ = exact_topk(sample, vectors, kk, precision="fp32")
    got, _ = index.search(sample, kk)
    row_of = {did: i for i, did in enumerate(ids)}
    got_rows = np.full((len(sample), kk), -1, dtype=np.int64)
    for i, row in enumerate(got):
        got_rows[i, :len(row)] = [row_of.get(did, -1) for did in row]
    got_scores = rescore(sample, vectors, got_rows)
    # float32 rounding of the two score paths differs by a few ulps of a score <= 1
    kth = truth_scores[:, kk - 1:kk] - 1e-6
    hits = (got_scores >= kth).sum(axis=1)
    return {"k": kk, "value": round(float(np.mean(hits)) / kk, 4), "queries": len(rows), "seed": seed,
            "against": "exact fp32 inner product (ties count)"}


def index_vectors(ids: Sequence[str], vectors: np.ndarray, records: Sequence[dict] | None, *, factory: str = "Flat",
                  search_params: dict[str, float] | None = None, train_sample: int = TRAIN_SAMPLE, seed: int = 0,
                  recall_queries: int = RECALL_QUERIES, meta: dict[str, Any] | None = None) -> VectorIndex:
    """A trained, filled :class:`VectorIndex` over ``vectors``, with its search parameters and measured recall.

    Quantising indexes train on a seeded sample of at most ``train_sample`` vectors. ``search_params``
    (default: :func:`default_search_params`) are set before recall@10 is measured and go into meta.json.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    index = VectorIndex(vectors.shape[1], factory=factory, meta=meta)  # ConfigError on a rejected factory
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = vectors if len(vectors) <= train_sample else \
            vectors[np.sort(rng.choice(len(vectors), size=train_sample, replace=False))]
        index.train(sample)
        index.meta["trained_on"] = {"vectors": len(sample), "seed": seed}
    index.add(list(ids), vectors, records)
    params = default_search_params(factory) if search_params is None else dict(search_params)
    for name, value in params.items():
        index.set_search_param(name, value)
    if recall_queries > 0:
        index.meta["recall"] = recall_at_k(index, list(ids), vectors, queries=recall_queries, seed=seed)
    return index


def check_factory(factory: str) -> None:
    """Fail before any encoding when faiss rejects ``factory`` (probed at a dimension every PQ/OPQ m divides).

    Two kinds faiss accepts here but fails on later are refused by name: an ``IDMap`` prefix (JFE maps ids
    itself, so faiss's ``add`` fails after all the encoding) and a zero size (``HNSW0``, ``PQ0``, ``IVF0``:
    faiss asserts, and ``HNSW0`` aborts the whole process)."""
    import re

    import faiss

    parts = [part.strip() for part in factory.split(",")]
    if any(part.upper().startswith("IDMAP") for part in parts):
        rest = ",".join(p for p in parts if not p.upper().startswith("IDMAP"))
        raise ConfigError(f"invalid faiss factory string {factory!r}: drop the IDMap prefix (JFE maps string ids "
                          f"to faiss ids itself), e.g. {rest!r}")
    zero = next((part for part in parts if re.search(r"(?<![0-9.])0+(?![0-9.])", part)), None)
    if zero is not None:
        raise ConfigError(f"invalid faiss factory string {factory!r}: {zero!r} has a size of 0 (HNSW needs M >= 2, "
                          f"IVF at least one list, PQ at least one sub-quantiser)")

    for dim in (384, 768, 1024, 512, 256):
        try:
            faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
            return
        except RuntimeError as exc:
            last = str(exc).strip().splitlines()[-1]
    raise ConfigError(f"invalid faiss factory string {factory!r}: {last}")
