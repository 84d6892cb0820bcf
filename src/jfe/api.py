"""The short Python API: ``jfe.encode``, ``jfe.search``, ``jfe.train``, ``jfe.evaluate``.

Thin conveniences over the layers (models, index, train, eval) for the common cases; each accepts a
model name (``"jfe-mini"``, ``"hf:/path"``), a saved model folder, or an already loaded encoder.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jfe.errors import ConfigError
from jfe.models.base import Encoder

ModelLike = str | os.PathLike | Encoder

_LOADED: dict[str, Encoder] = {}


def _model(model: ModelLike) -> Encoder:
    if isinstance(model, Encoder):
        return model
    from jfe.models import load_model

    key = str(model)
    if key not in _LOADED:
        _LOADED[key] = load_model(key)
    return _LOADED[key]


def encode(items: Sequence[Any], model: ModelLike = "jfe-mini", instruction: str | None = None,
           batch_size: int = 32, progress: bool = False) -> np.ndarray:
    """Embed texts, images (``Path``/PIL) and ``{"text", "image"}`` pairs as float32 ``[n, d]`` unit vectors."""
    return _model(model).encode(items, instruction=instruction, batch_size=batch_size, progress=progress)


def search(index: str | os.PathLike | Any, query: Any, model: ModelLike | None = None, k: int = 10,
           instruction: str | None = None, exclude: Collection[str] | None = None,
           precision: str | None = None) -> list[dict[str, Any]]:
    """Search an index (a saved folder, plain or sharded, or a loaded index) with one query item; returns
    ranked hits ``{"did", "score", "rank", "record"}`` (``record``: the candidate's stored record, ``{}`` when
    the index holds none). The model defaults to the one the index was built with, the precision to the one
    its vectors were computed in. ``exclude``: ids never to return (e.g. the query's own reference image in
    composed search: "this, but green" should not find "this")."""
    from jfe.index.hits import hits_from
    from jfe.index.shards import load_index
    from jfe.indexing import query_precision

    saved = isinstance(index, str | os.PathLike)
    vector_index: Any = load_index(index) if saved else index  # anything with search/record/meta
    name = model if model is not None else vector_index.meta.get("model")
    if not name:
        raise ConfigError(f"the index{f' at {index}' if saved else ''} does not name its model; pass model=")
    compute, _ = query_precision(getattr(vector_index, "meta", {}), precision)
    vector = _model(name).encode([query], instruction=instruction, precision=compute)
    ids, scores = vector_index.search(vector, k, exclude=[set(exclude)] if exclude else None)
    # one hit shape for the API, `jfe search` and POST /search: jfe.index.hits
    return [{"did": hit.did, "score": hit.score, "rank": hit.rank, "record": hit.record}
            for hit in hits_from(vector_index, ids[0], scores[0].tolist())]


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
