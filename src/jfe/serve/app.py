"""The HTTP search service: ``create_app(model, index, settings) -> FastAPI``.

Endpoints (``/docs`` has the OpenAPI page):

* ``POST /v1/embeddings`` — OpenAI-style embeddings of text, image or image+text inputs (JSON or multipart);
  ``GET /v1/models`` — the served model, as OpenAI lists models.
* ``POST /search`` — rank the index's candidates for a text / image / image+text query (JSON or multipart);
  ``rerank`` names a reranker the service was started with, which reorders the first ``rerank_k`` hits.
* ``GET /images/{did}`` — a candidate's image (only ids in the index; never outside the data root).
* ``GET /instructions`` — the dataset's instruction choices; ``GET /health``; ``GET /`` — the web page.

Every error is OpenAI's JSON ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for bad input.

The pieces: :mod:`jfe.serve.inputs` checks and parses requests, :mod:`jfe.serve.routes` holds the endpoints
(which read what they serve from ``app.state``), :mod:`jfe.serve.errors` the error body. This module only
puts them together.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from jfe.errors import ConfigError
from jfe.models.tokens import tokenizer_of
from jfe.serve.batching import EncodeBatcher, RerankBatcher
from jfe.serve.errors import add_error_handlers
from jfe.serve.inputs import BodyLimitMiddleware
from jfe.serve.routes import ROUTERS, STATIC_DIR
from jfe.serve.schemas import EmbeddingsRequest, RerankRequest, SearchRequest, ServeSettings

__all__ = ["STATIC_DIR", "create_app"]


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    for batcher in app.state.rerank_batchers.values():
        await batcher.aclose()
    await app.state.batcher.aclose()  # flush and stop the micro-batching workers and the model thread


def _served_model_name(model: Any, index: Any, settings: ServeSettings) -> str:
    """The name /health and embedding responses report: the settings' own, else what the index was built with."""
    if settings.model_name != "model":
        return settings.model_name
    return str(index.meta.get("model") or getattr(model, "arch", "") or "model")


def _set_state(app: FastAPI, model: Any, index: Any, settings: ServeSettings, rerankers: dict[str, Any]) -> None:
    """Everything the routes read (``request.app.state``)."""
    state = app.state
    state.settings, state.model, state.index = settings, model, index
    state.rerankers = rerankers  # name -> Reranker: the ones /search and /v1/rerank may name
    state.started = int(time.time())  # the "created" of GET /v1/models
    state.model_name = _served_model_name(model, index, settings)
    state.batcher = EncodeBatcher(model, enabled=settings.batching, max_batch=settings.max_batch,
                                  max_wait_ms=settings.max_wait_ms)
    # reranking shares the encoder's model thread; a batch holds up to max_rerank_pairs (query, candidate) pairs
    state.rerank_batchers = {
        name: RerankBatcher(reranker, enabled=settings.batching, max_batch=settings.max_rerank_pairs,
                            max_wait_ms=settings.max_wait_ms, thread=state.batcher.thread)
        for name, reranker in rerankers.items()}
    state.data_root = Path(index.meta["data_root"]).resolve() if index.meta.get("data_root") else None
    state.tokenizer = tokenizer_of(model)  # None: token-array inputs are refused and usage counts words
    state.instruction_choices = None  # read from the data root on the first /instructions request


def _add_middleware(app: FastAPI, settings: ServeSettings) -> None:
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, api_key=settings.api_key)
    if settings.cors_origins:  # added last, so it answers preflights before the body limit sees them
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "X-API-Key", "Authorization"])


def create_app(model: Any, index: Any, settings: ServeSettings | None = None,
               rerankers: dict[str, Any] | None = None) -> FastAPI:
    """Build the service around an encoder (``encode``/``dim``) and a :class:`~jfe.index.VectorIndex`;
    ``rerankers`` (name -> :class:`jfe.models.rerankers.Reranker`) are those ``/search`` and ``/v1/rerank`` may
    name."""
    settings = settings or ServeSettings()
    if settings.image_min_side is None:  # uploads decode like indexed files, so one photo embeds the same
        settings = settings.model_copy(update={"image_min_side": getattr(model, "image_input_size", None)})
    if int(model.dim) != int(index.dim):
        raise ConfigError(f"the model embeds in {model.dim} dimensions but the index holds {index.dim}: "
                          "serve the model the index was built with")
    app = FastAPI(title="JFE search", version="0.1.0", lifespan=_lifespan,
                  description="Universal multimodal retrieval with a joint fusion encoder: embeddings and search.")
    _set_state(app, model, index, settings, dict(rerankers or {}))
    add_error_handlers(app)
    _add_middleware(app, settings)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for router in ROUTERS:
        app.include_router(router)
    _add_request_schemas(app)
    return app


def _add_request_schemas(app: FastAPI) -> None:
    """Put the JSON request models into the OpenAPI components (the routes read the raw request)."""
    from pydantic.json_schema import models_json_schema

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, defs = models_json_schema([(EmbeddingsRequest, "validation"), (SearchRequest, "validation"),
                                       (RerankRequest, "validation")],
                                     ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
