"""The short Python API: ``jfe.encode``, ``jfe.search``, ``jfe.rerank``, ``jfe.train``, ``jfe.evaluate``.

Thin conveniences over the layers (models, index, train, eval) for the common cases; each accepts a
model name (``"jfe-mini"``, ``"hf:/path"``), a saved model folder, or an already loaded encoder.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jfe.data.items import as_item
from jfe.errors import ConfigError
from jfe.models.base import Encoder

ModelLike = str | os.PathLike | Encoder

_LOADED: dict[tuple[str, str | None], Encoder] = {}
MAX_RERANK_K = 1000  # a reranker reads every pair: this bounds one query's cost


def _model(model: ModelLike, backend: str | None = None) -> Encoder:
    if isinstance(model, Encoder):
        return model
    from jfe.models import load_model

    key = (str(model), backend)
    if key not in _LOADED:
        _LOADED[key] = load_model(str(model), backend=backend)
    return _LOADED[key]


def encode(items: Sequence[Any], model: ModelLike = "jfe-mini", instruction: str | None = None,
           batch_size: int = 32, progress: bool = False, precision: str | None = None,
           backend: str | None = None) -> np.ndarray:
    """Embed texts, images (``Path``/PIL) and ``{"text", "image"}`` pairs as float32 ``[n, d]`` unit vectors.

    ``backend``: ``"torch"``, ``"onnx"`` (ONNX Runtime; a PyTorch model is exported once into the cache) or
    ``"openvino"`` (OpenVINO Runtime on that fp32 export; bf16 where the CPU multiplies it natively); None runs what
    ``model`` is (an ONNX export folder on ONNX Runtime)."""
    return _model(model, backend).encode(items, instruction=instruction, batch_size=batch_size, progress=progress,
                                         precision=precision)


def search(index: str | os.PathLike | Any, query: Any, model: ModelLike | None = None, k: int = 10,
           instruction: str | None = None, exclude: Collection[str] | None = None,
           precision: str | None = None, rerank: ModelLike | None = None, rerank_k: int = 50,
           backend: str | None = None) -> list[dict[str, Any]]:
    """Search an index (a saved folder, plain or sharded, or a loaded index) with one query item; returns
    ranked hits ``{"did", "score", "rank", "record", "first_stage_rank"}`` (``record``: the candidate's stored
    record, ``{}`` when the index holds none). The model defaults to the one the index was built with, the
    backend and precision to the ones its vectors were computed with. ``exclude``: ids never to return (e.g. the
    query's own reference image in composed search: "this, but green" should not find "this").

    ``rerank`` (a reranker name, folder or loaded one, e.g. ``"jfe-mini-rerank"``): the first ``rerank_k`` hits
    are reordered by it (it reads query and candidate together); ``first_stage_rank`` then says where the
    retriever had put each hit."""
    from jfe.index.shards import load_index
    from jfe.indexing import query_backend, query_precision, ranked_hits

    if rerank is not None and not 1 <= rerank_k <= MAX_RERANK_K:
        raise ConfigError(f"rerank_k must be in 1..{MAX_RERANK_K}, got {rerank_k}")
    saved = isinstance(index, str | os.PathLike)
    vector_index: Any = load_index(index) if saved else index  # anything with search/record/meta
    name = model if model is not None else vector_index.meta.get("model")
    if not name:
        raise ConfigError(f"the index{f' at {index}' if saved else ''} does not name its model; pass model=")
    meta = getattr(vector_index, "meta", {})
    encoder = _model(name, None if isinstance(name, Encoder) else query_backend(meta, str(name), backend))
    compute, _ = query_precision(meta, precision, encoder)
    item = as_item(query, 0)
    if instruction:
        item = item.with_instruction(instruction)
    vector = encoder.encode([item], precision=compute)
    hits = ranked_hits(vector_index, item, vector, k, exclude=exclude,
                       reranker=_reranker(rerank) if rerank is not None else None, rerank_k=rerank_k,
                       precision=precision)
    # one hit shape for the API, `jfe search` and POST /search: jfe.index.hits
    return [{"did": hit.did, "score": hit.score, "rank": hit.rank, "record": hit.record,
             "first_stage_rank": hit.first_stage_rank} for hit in hits]


def rerank(query: Any, candidates: Sequence[Any], model: ModelLike = "jfe-mini-rerank",
           scores: Sequence[float] | None = None, instruction: str | None = None, batch_size: int = 64,
           precision: str | None = None) -> np.ndarray:
    """Score ``candidates`` (texts, images, ``{"text", "image"}`` pairs) against ``query`` with a reranker that
    reads each pair in one sequence; returns float32 scores in the candidates' order, higher is better.
    ``scores``: the first stage's scores of the same candidates (None: the reranker's own retriever computes
    them). Sort with ``numpy.argsort(-scores)``."""
    if not candidates:
        return np.zeros(0, dtype=np.float32)
    from jfe.indexing import first_stage_retriever

    reranker = _reranker(model)
    retriever = first_stage_retriever(reranker) if scores is None else None
    return reranker.rerank([query], [list(candidates)], [list(scores)] if scores is not None else None,
                           retriever=retriever, instruction=instruction, batch_size=batch_size,
                           precision=precision)[0]


def _reranker(model: ModelLike) -> Any:
    from jfe.models.rerankers import require_reranker

    return require_reranker(_model(model), f"reranker {model if not isinstance(model, Encoder) else model.arch!r}")


def train(config: str | os.PathLike, overrides: dict[str, Any] | None = None, resume: bool = False,
          progress: bool = True) -> Path:
    """Run one training stage from a TOML config; returns the final checkpoint folder."""
    from jfe.train import train as run_training

    return run_training(config, overrides=overrides, resume=resume, progress=progress)


def evaluate(model: ModelLike, data_root: str | os.PathLike, split: str = "test", pool: str = "local",
             out_dir: str | os.PathLike | None = None, **kwargs: Any) -> Any:
    """M-BEIR evaluation (hit-based Recall@k per dataset/task and per category): the :class:`EvalResult` of
    ``jfe.eval.MBEIREvaluator(data_root, split=..., pool=..., out_dir=..., **kwargs)`` on the model."""
    from jfe.eval.evaluator import MBEIREvaluator

    return MBEIREvaluator(Path(data_root), split=split, pool=pool, out_dir=out_dir, **kwargs).result(_model(model))
