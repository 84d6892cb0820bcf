"""The service's endpoints, as routers that ``create_app`` includes.

Routes hold no state of their own: they read what they serve from ``request.app.state`` (``settings``,
``model``, ``model_name``, ``tokenizer``, ``index``, ``batcher``, ``data_root``), so one set of routes
serves every app ``create_app`` builds. Requests are parsed and checked by :mod:`jfe.serve.inputs`.
"""

from __future__ import annotations

import base64
import logging
import mimetypes
import time
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from jfe.data.items import Item
from jfe.errors import DataError
from jfe.index.hits import Hit, hits_from
from jfe.indexing import RerankJob, first_stage_hits, first_stage_retriever, ranked_hits, reordered, rerank_job
from jfe.models.base import compute_of
from jfe.serve.errors import ApiError
from jfe.serve.inputs import (
    AUTH_MESSAGE,
    check_model_name,
    key_matches,
    parse_embeddings,
    parse_rerank,
    parse_search,
)
from jfe.serve.schemas import (
    K_MAX,
    RERANK_K_MAX,
    EmbeddingData,
    EmbeddingsResponse,
    Health,
    InstructionChoice,
    InstructionsResponse,
    ModelCard,
    ModelList,
    RerankResponse,
    RerankResult,
    RerankUsage,
    SearchHit,
    SearchResponse,
    Usage,
)

log = logging.getLogger("jfe.serve")
STATIC_DIR = Path(__file__).parent / "static"

# ------------------------------------------------------------------------------------------ auth
# Declared through fastapi.security so /openapi.json lists both ways to send the key (either suffices);
# auto_error=False because the key is optional: require_key decides, with our JSON error body.
bearer_scheme = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY (when the server has a key)")
header_scheme = APIKeyHeader(name="X-API-Key", auto_error=False,
                             description="X-API-Key: KEY (when the server has a key)")


def require_key(request: Request, bearer: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
                header_key: str | None = Depends(header_scheme)) -> None:
    """Refuse (401) a request without the server's API key, when the server has one."""
    given = header_key if header_key is not None else (bearer.credentials.strip() if bearer else None)
    # BodyLimitMiddleware has refused a wrong key before reading the body; this keeps routes safe on their own
    if not key_matches(given, request.app.state.settings.api_key):
        raise ApiError(401, AUTH_MESSAGE, "authentication_error", {"WWW-Authenticate": "Bearer"})


AUTH = [Depends(require_key)]


def _multipart_doc(fields: dict[str, dict], ref: str) -> dict:
    """``openapi_extra`` for a route that reads JSON or multipart from the raw request."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}},
        "multipart/form-data": {"schema": {"type": "object", "properties": fields}},
    }}}


_FILE = {"type": "string", "format": "binary"}

# ------------------------------------------------------------------------------------------ page, health
service_router = APIRouter()


@service_router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@service_router.get("/health", response_model=Health, tags=["service"])
async def health(request: Request) -> dict:
    """Liveness and what is served (never needs the API key)."""
    state = request.app.state
    computed = compute_of(state.model)  # how queries are encoded
    return {"model": state.model_name, "index_size": len(state.index), "dim": int(state.index.dim),
            "backend": computed.get("backend"), "precision": computed.get("precision"),
            "batching": state.settings.batching, "max_batch": state.settings.max_batch,
            "auth": bool(state.settings.api_key), "stats": state.batcher.stats.as_dict(),
            "rerankers": list(state.rerankers)}


# ------------------------------------------------------------------------------------------ candidates
candidates_router = APIRouter()


@candidates_router.get("/instructions", response_model=InstructionsResponse, tags=["search"], dependencies=AUTH)
async def instructions(request: Request) -> dict:
    """Instruction choices from the dataset's ``instructions/query_instructions.tsv`` (empty if none)."""
    state = request.app.state
    if state.instruction_choices is None:  # read once, on first use
        state.instruction_choices = await run_in_threadpool(load_instructions, state.data_root)
    return {"instructions": state.instruction_choices}


@candidates_router.get("/images/{did}", tags=["search"], dependencies=AUTH, name="image",
                       responses={200: {"content": {"image/png": {}}}, 404: {"description": "no such image"}})
async def image(did: str, request: Request) -> FileResponse:
    """The image of candidate ``did``: only ids in the index, only files inside the data root."""
    path = candidate_image_path(request.app.state.index, request.app.state.data_root, did)
    media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media, headers={"Cache-Control": "public, max-age=3600",
                                                        "X-Content-Type-Options": "nosniff"})


def candidate_image_path(index: Any, data_root: Path | None, did: str) -> Path:
    """The image file of candidate ``did``; 404 unless it is in the index with a file, 403 outside the root."""
    record = index.record(did) if did in index else None
    if record is None:
        raise ApiError(404, f"no candidate {did!r} in the index", "not_found")
    if not record.get("img_path"):
        raise ApiError(404, f"candidate {did!r} has no image", "not_found")
    if data_root is None:
        raise ApiError(404, "the index records no data_root, so its images cannot be served", "not_found")
    path = (data_root / record["img_path"]).resolve()
    if not path.is_relative_to(data_root):
        log.warning("refusing image of %s: %s is outside %s", did, path, data_root)
        raise ApiError(403, f"the image path of candidate {did!r} leaves the data root", "forbidden")
    if not path.is_file():
        raise ApiError(404, f"the image file of candidate {did!r} is missing", "not_found")
    return path


def load_instructions(data_root: Path | None) -> list[InstructionChoice]:
    """The dataset's instruction choices; none without a data root or an instructions file."""
    if data_root is None:
        return []
    from jfe.data.mbeir import MBEIRLayout, read_instructions

    path = MBEIRLayout(data_root).instructions_file
    if not path.is_file():
        return []
    try:
        sets = read_instructions(path)
    except DataError as exc:  # a broken file must not take the service down; the page just offers none
        log.warning("cannot read instructions: %s", exc)
        return []
    return [InstructionChoice(dataset_id=s.dataset_id, dataset=s.dataset_name, query_modality=s.query_modality,
                              cand_modality=s.cand_modality, prompts=list(s.prompts)) for s in sets.values()]


# ------------------------------------------------------------------------------------------ embeddings
embeddings_router = APIRouter()


@embeddings_router.get("/v1/models", response_model=ModelList, tags=["embeddings"], dependencies=AUTH)
async def models(request: Request) -> dict:
    """OpenAI's model list: the one model this service serves (the name ``/v1/embeddings`` accepts)."""
    state = request.app.state
    return ModelList(data=[ModelCard(id=state.model_name, created=state.started)]).model_dump()


@embeddings_router.get("/v1/models/{model_id:path}", response_model=ModelCard, tags=["embeddings"],
                       dependencies=AUTH)
async def model(model_id: str, request: Request) -> dict:
    """OpenAI's model retrieval: the served model (its name may hold slashes: a folder); any other id is a 404
    ``model_not_found``."""
    state = request.app.state
    check_model_name(model_id, state.model_name)
    return ModelCard(id=state.model_name, created=state.started).model_dump()


@embeddings_router.post("/v1/embeddings", response_model=EmbeddingsResponse, tags=["embeddings"], dependencies=AUTH,
                        openapi_extra=_multipart_doc({"input": {"type": "string"}, "image": _FILE,
                                                      "instruction": {"type": "string"},
                                                      "model": {"type": "string"},
                                                      "encoding_format": {"type": "string",
                                                                          "enum": ["float", "base64"]}},
                                                     "EmbeddingsRequest"))
async def embeddings(request: Request) -> dict:
    """OpenAI-style embeddings. JSON ``input``: a string, or a list of strings and/or content-part lists
    (``{"type": "text", ...}``, ``{"type": "image_url", "image_url": {"url": "data:..."}}``); multipart:
    one item from the ``input`` text field and an ``image`` file."""
    state = request.app.state
    parsed = await parse_embeddings(request, state.settings, state.model, state.model_name, state.tokenizer)
    vectors = await state.batcher.encode([item.with_instruction(parsed.instruction) for item in parsed.items])
    if parsed.dimensions is not None and parsed.dimensions < vectors.shape[1]:  # Matryoshka: prefix, renormalised
        vectors = vectors[:, :parsed.dimensions]
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    tokens = count_tokens(parsed.items, parsed.id_counts, state.tokenizer)
    data = [EmbeddingData(index=i, embedding=encode_vector(vec, parsed.encoding_format))
            for i, vec in enumerate(vectors)]
    return EmbeddingsResponse(data=data, model=parsed.model or state.model_name, usage=Usage(
        prompt_tokens=tokens, total_tokens=tokens, images=sum(item.image is not None for item in parsed.items))
    ).model_dump()


def count_tokens(items: list[Item], id_counts: list[int | None], tokenizer: Any) -> int:
    """Prompt tokens: the ids sent for token-array inputs, else the tokenizer's count (words without one)."""
    texts = [item.text for item, ids in zip(items, id_counts, strict=True) if ids is None and item.text]
    given = sum(n for n in id_counts if n is not None)
    if tokenizer is None:
        return given + sum(len(text.split()) for text in texts)
    if not texts:
        return given
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return given + sum(len(ids) for ids in encoded)


def encode_vector(vec: np.ndarray, fmt: str) -> list[float] | str:
    """One embedding as OpenAI sends it: a list of floats, or base64 of little-endian float32 bytes."""
    if fmt == "base64":  # what OpenAI's client asks for by default
        return base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vec]


# ------------------------------------------------------------------------------------------ search
search_router = APIRouter()


@search_router.post("/search", response_model=SearchResponse, tags=["search"], dependencies=AUTH,
                    openapi_extra=_multipart_doc({"text": {"type": "string"}, "image": _FILE,
                                                  "instruction": {"type": "string"},
                                                  "k": {"type": "integer", "minimum": 1, "maximum": K_MAX},
                                                  "rerank": {"type": "string"},
                                                  "rerank_k": {"type": "integer", "minimum": 1,
                                                               "maximum": RERANK_K_MAX}},
                                                 "SearchRequest"))
async def search(request: Request) -> dict:
    """Rank the indexed candidates for a text, image or image+text query (JSON with a data-URL
    ``image``, or multipart with an ``image`` file)."""
    started = time.perf_counter()
    state = request.app.state
    parsed = await parse_search(request, state.settings)
    req = parsed.request
    reranker = _reranker(state, req.rerank)
    query = parsed.item.with_instruction(parsed.instruction)
    vector = await state.batcher.encode([query])
    if reranker is None:
        ranked = await run_in_threadpool(partial(ranked_hits, state.index, query, vector, req.k))
    else:  # reranked on the model thread, batched with the other requests' shortlists; no thread waits for it
        def shortlist() -> tuple[list[str], list[float], RerankJob]:
            ids, scores = first_stage_hits(state.index, vector, req.k, rerank_k=req.rerank_k)
            return ids, scores, rerank_job(reranker, state.index, query, ids, scores, rerank_k=req.rerank_k)

        ids, scores, job = await run_in_threadpool(shortlist)
        ids, scores, firsts = reordered(ids, scores, await state.rerank_batchers[req.rerank].rerank(job))
        # (on a worker thread: a LanceDB index reads the records from its table)
        ranked = await run_in_threadpool(hits_from, state.index, ids[:req.k], scores[:req.k], firsts[:req.k])
    hits = [search_hit(hit) for hit in ranked]
    return SearchResponse(query_modality=parsed.item.modality, k=req.k, results=hits,
                          took_ms=round((time.perf_counter() - started) * 1000, 3),
                          reranked_by=req.rerank if reranker is not None else None,
                          rerank_k=req.rerank_k if reranker is not None else None).model_dump()


@search_router.post("/v1/rerank", response_model=RerankResponse, tags=["search"], dependencies=AUTH,
                    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/RerankRequest"}}}}})
async def rerank(request: Request) -> dict:
    """Score documents (texts, data-URL images, or both) against a query with a reranker that reads each
    (query, document) pair in one sequence, best first: the Jina / Cohere rerank shape, with images. A reranker
    that corrects a first stage gets it from its own retriever (``config.retriever``)."""
    state = request.app.state
    parsed = await parse_rerank(request, state.settings)
    req = parsed.request
    name = _rerank_model(state, req.model)
    reranker = state.rerankers[name]
    # (loading the retriever the first time is slow: on a worker thread)
    retriever = await run_in_threadpool(first_stage_retriever, reranker)
    scores = await state.rerank_batchers[name].rerank(RerankJob(parsed.query, parsed.documents, None, retriever))
    order = np.argsort(-scores, kind="stable")[:req.top_n]
    items = [parsed.query, *parsed.documents]
    tokens = count_tokens(items, [None] * len(items), state.tokenizer)
    results = [RerankResult(index=int(i), relevance_score=float(scores[i]),
                            document=parsed.echoes[i] if req.return_documents else None) for i in order]
    return RerankResponse(model=name, results=results, usage=RerankUsage(
        total_tokens=tokens, images=sum(item.image is not None for item in items))).model_dump()


def _rerank_model(state: Any, name: str | None) -> str:
    """The reranker ``/v1/rerank`` names, or the only one served when it names none."""
    if name is not None:
        _reranker(state, name, param="model")
        return name
    served = list(state.rerankers)
    if len(served) != 1:
        if not served:
            raise ApiError(404, "this service serves no reranker (start it with jfe serve --rerank NAME)",
                           param="model", code="reranker_not_found")
        raise ApiError(400, f"this service serves {len(served)} rerankers: name one in 'model' "
                            f"({', '.join(repr(n) for n in served)})", param="model")
    return served[0]


def _reranker(state: Any, name: str | None, param: str = "rerank") -> Any:
    """The reranker a request names: one the service was started with (``jfe serve --rerank``), else a 404."""
    if name is None:
        return None
    served = state.rerankers
    if name not in served:
        offered = ", ".join(repr(n) for n in served) or "none (start the service with --rerank NAME)"
        raise ApiError(404, f"the reranker {name!r} is not served here; rerankers: {offered}", param=param,
                       code="reranker_not_found")
    return served[name]


def search_hit(hit: Hit) -> SearchHit:
    """A ranked candidate as the service shows it: its text, and a link to its image when it has one."""
    return SearchHit(did=hit.did, score=hit.score, rank=hit.rank, modality=hit.record.get("modality"),
                     text=hit.record.get("txt"),
                     image_url=f"/images/{quote(hit.did, safe=':')}" if hit.record.get("img_path") else None,
                     first_stage_rank=hit.first_stage_rank)


# in the order the routes were always declared (it is the order of /openapi.json's paths)
ROUTERS = (service_router, candidates_router, embeddings_router, search_router)
