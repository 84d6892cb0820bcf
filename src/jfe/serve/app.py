"""The HTTP search service: ``create_app(model, index, settings) -> FastAPI``.

Endpoints (``/docs`` has the OpenAPI page):

* ``POST /v1/embeddings`` — OpenAI-style embeddings of text, image or image+text inputs (JSON or multipart).
* ``POST /search`` — rank the index's candidates for a text / image / image+text query (JSON or multipart).
* ``GET /images/{did}`` — a candidate's image (only ids in the index; never outside the data root).
* ``GET /instructions`` — the dataset's instruction choices; ``GET /health``; ``GET /`` — the web page.

Every error is JSON ``{"error": {"message", "type", "code"}}`` with a 4xx status for bad input.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import mimetypes
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from jfe.data.images import load_image
from jfe.data.items import Item
from jfe.errors import ConfigError, DataError, JFEError
from jfe.index.hits import hits_from
from jfe.models.tokens import supports_matryoshka, tokenizer_of
from jfe.serve.batching import EncodeBatcher
from jfe.serve.schemas import (
    EmbeddingData,
    EmbeddingInput,
    EmbeddingsRequest,
    EmbeddingsResponse,
    Health,
    ImagePart,
    InstructionChoice,
    InstructionsResponse,
    SearchHit,
    SearchRequest,
    SearchResponse,
    ServeSettings,
    TextPart,
    Usage,
)

log = logging.getLogger("jfe.serve")
STATIC_DIR = Path(__file__).parent / "static"


class ApiError(Exception):
    """An error the client caused (or may see): rendered as JSON with its status code."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type_, headers


def _error_response(status: int, message: str, type_: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": status}}, status_code=status,
                        headers=headers)


# ------------------------------------------------------------------------------------------ body limit
class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413 before any handler parses them.

    Checks ``Content-Length`` first, then counts streamed (chunked) bodies, buffering at most the limit.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = _error_response(413, f"request body is larger than the limit of {self.max_bytes} bytes",
                                  "request_too_large")
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await too_big(scope, receive, send)
            return
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await too_big(scope, receive, send)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ------------------------------------------------------------------------------------------ images
def decode_data_url(url: str, settings: ServeSettings, what: str) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URL; remote URLs are refused (no server-side fetches)."""
    if not url.startswith("data:"):
        raise ApiError(422, f"{what}: only data URLs (data:image/png;base64,...) are accepted; "
                            "the server does not fetch remote URLs", "invalid_image")
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ApiError(422, f"{what}: the data URL must be base64-encoded (data:image/png;base64,...)",
                       "invalid_image")
    mime = header[5:].split(";", 1)[0].strip().lower()
    if mime and not mime.startswith("image/"):
        raise ApiError(415, f"{what}: media type {mime!r} is not an image", "unsupported_media_type")
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > settings.max_image_bytes + 2:  # refuse before decoding anything big
        raise ApiError(413, f"{what}: image is larger than the limit of {settings.max_image_bytes} bytes",
                       "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{what}: invalid base64 data in the data URL", "invalid_image") from None


def open_image(raw: bytes, settings: ServeSettings, what: str) -> Image.Image:
    """Check size, format and pixel count from the header, then decode to RGB (decompression-bomb safe)."""
    if not raw:
        raise ApiError(422, f"{what}: the image is empty", "invalid_image")
    if len(raw) > settings.max_image_bytes:
        raise ApiError(413, f"{what}: image is {len(raw)} bytes, over the limit of {settings.max_image_bytes}",
                       "image_too_large")
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            fmt, (width, height) = probe.format, probe.size
    except UnidentifiedImageError:
        raise ApiError(415, f"{what}: not an image in a supported format (accepted: "
                            f"{', '.join(settings.image_formats)})", "unsupported_media_type") from None
    except Image.DecompressionBombError:
        raise ApiError(413, f"{what}: image has too many pixels (limit {settings.max_pixels})",
                       "image_too_large") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ApiError(422, f"{what}: corrupt image ({exc})", "invalid_image") from None
    if fmt not in settings.image_formats:
        raise ApiError(415, f"{what}: image format {fmt} is not accepted (accepted: "
                            f"{', '.join(settings.image_formats)})", "unsupported_media_type")
    if width * height > settings.max_pixels:
        raise ApiError(413, f"{what}: image has {width}x{height} pixels, over the limit of {settings.max_pixels}",
                       "image_too_large")
    try:
        return load_image(raw, item_id=what, max_pixels=settings.max_pixels)
    except DataError as exc:
        raise ApiError(422, f"{what}: {exc.message}", "invalid_image") from None


def _image_from_url(url: str, settings: ServeSettings, what: str) -> Image.Image:
    return open_image(decode_data_url(url, settings, what), settings, what)


async def _upload_bytes(upload: UploadFile, settings: ServeSettings, what: str) -> bytes:
    if upload.size is not None and upload.size > settings.max_image_bytes:
        raise ApiError(413, f"{what}: image is {upload.size} bytes, over the limit of {settings.max_image_bytes}",
                       "image_too_large")
    return await upload.read(settings.max_image_bytes + 1)


# ------------------------------------------------------------------------------------------ parsing
def _validation_message(exc: ValidationError | RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


# Bodies larger than this are parsed on a worker thread, so big images never stall the event loop.
_INLINE_BODY = 64 * 1024


async def _json_body(request: Request, model: type) -> Any:
    body = await request.body()
    if len(body) > _INLINE_BODY:
        return await run_in_threadpool(_parse_json, body, model)
    return _parse_json(body, model)


def _parse_json(body: bytes, model: type) -> Any:
    try:
        obj = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ApiError(422, "request body must be a JSON object")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise ApiError(422, _validation_message(exc)) from None


def _form_str(form: Any, name: str) -> str | None:
    value = form.get(name)
    if value is None or isinstance(value, UploadFile):
        return None
    return str(value)


def _is_form(ctype: str) -> bool:
    return ctype in ("multipart/form-data", "application/x-www-form-urlencoded")


def _check_text(text: str | None, settings: ServeSettings, what: str) -> str | None:
    if text is None or not text.strip():
        return None
    if len(text) > settings.max_text_chars:
        raise ApiError(422, f"{what}: text is {len(text)} characters, over the limit of {settings.max_text_chars}")
    return text


def _multipart_doc(fields: dict[str, dict], ref: str) -> dict:
    """``openapi_extra`` for a route that reads JSON or multipart from the raw request."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}},
        "multipart/form-data": {"schema": {"type": "object", "properties": fields}},
    }}}


_FILE = {"type": "string", "format": "binary"}


# ------------------------------------------------------------------------------------------ the app
def create_app(model: Any, index: Any, settings: ServeSettings | None = None) -> FastAPI:
    """Build the service around an encoder (``encode``/``dim``) and a :class:`~jfe.index.VectorIndex`."""
    settings = settings or ServeSettings()
    if int(model.dim) != int(index.dim):
        raise ConfigError(f"the model embeds in {model.dim} dimensions but the index holds {index.dim}: "
                          "serve the model the index was built with")
    model_name = settings.model_name if settings.model_name != "model" else \
        str(index.meta.get("model") or getattr(model, "arch", "") or "model")
    batcher = EncodeBatcher(model, enabled=settings.batching, max_batch=settings.max_batch,
                            max_wait_ms=settings.max_wait_ms)
    data_root = Path(index.meta["data_root"]).resolve() if index.meta.get("data_root") else None
    instruction_cache: list[InstructionChoice] | None = None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await batcher.aclose()

    app = FastAPI(title="JFE search", version="0.1.0", lifespan=lifespan,
                  description="Universal multimodal retrieval with a joint fusion encoder: embeddings and search.")
    app.state.settings, app.state.batcher, app.state.index, app.state.model = settings, batcher, index, model

    # ------------------------------------------------------------------ errors
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.type, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(422, _validation_message(exc), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, str(exc.detail), "http_error", getattr(exc, "headers", None))

    @app.exception_handler(JFEError)
    async def _jfe_error(_: Request, exc: JFEError) -> JSONResponse:
        return _error_response(422, str(exc), "invalid_input")

    # ------------------------------------------------------------------ middleware
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "X-API-Key", "Authorization"])

    # Declared through fastapi.security so /openapi.json lists both ways to send the key (either suffices);
    # auto_error=False because the key is optional: require_key decides, with our JSON error body.
    bearer_scheme = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY (when the server has a key)")
    header_scheme = APIKeyHeader(name="X-API-Key", auto_error=False,
                                 description="X-API-Key: KEY (when the server has a key)")

    def require_key(bearer: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
                    header_key: str | None = Depends(header_scheme)) -> None:
        if not settings.api_key:
            return
        given = header_key if header_key is not None else (bearer.credentials.strip() if bearer else None)
        if not given or not secrets.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send X-API-Key: KEY or Authorization: Bearer KEY)",
                           "authentication_error", {"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_key)]
    tokenizer = tokenizer_of(model)  # None: token-array inputs are refused and usage counts words

    # ------------------------------------------------------------------ pages
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/health", response_model=Health, tags=["service"])
    async def health() -> dict:
        """Liveness and what is served (never needs the API key)."""
        return {"model": model_name, "index_size": len(index), "dim": int(index.dim),
                "batching": settings.batching, "max_batch": settings.max_batch, "auth": bool(settings.api_key),
                "stats": batcher.stats.as_dict()}

    @app.get("/instructions", response_model=InstructionsResponse, tags=["search"], dependencies=auth)
    async def instructions() -> dict:
        """Instruction choices from the dataset's ``instructions/query_instructions.tsv`` (empty if none)."""
        nonlocal instruction_cache
        if instruction_cache is None:
            instruction_cache = await run_in_threadpool(_load_instructions, data_root)
        return {"instructions": instruction_cache}

    @app.get("/images/{did}", tags=["search"], dependencies=auth, name="image",
             responses={200: {"content": {"image/png": {}}}, 404: {"description": "no such image"}})
    async def image(did: str) -> FileResponse:
        """The image of candidate ``did``: only ids in the index, only files inside the data root."""
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
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"Cache-Control": "public, max-age=3600",
                                                            "X-Content-Type-Options": "nosniff"})

    # ------------------------------------------------------------------ embeddings
    @app.post("/v1/embeddings", response_model=EmbeddingsResponse, tags=["embeddings"], dependencies=auth,
              openapi_extra=_multipart_doc({"input": {"type": "string"}, "image": _FILE,
                                            "instruction": {"type": "string"}, "model": {"type": "string"},
                                            "encoding_format": {"type": "string", "enum": ["float", "base64"]}},
                                           "EmbeddingsRequest"))
    async def embeddings(request: Request) -> dict:
        """OpenAI-style embeddings. JSON ``input``: a string, or a list of strings and/or content-part lists
        (``{"type": "text", ...}``, ``{"type": "image_url", "image_url": {"url": "data:..."}}``); multipart:
        one item from the ``input`` text field and an ``image`` file."""
        ctype = _content_type(request)
        if _is_form(ctype):
            form = await request.form(max_files=1, max_fields=8)
            text = _check_text(_form_str(form, "input") or _form_str(form, "text"), settings, "input")
            upload = form.get("image")
            img = None
            if isinstance(upload, UploadFile):
                img = await run_in_threadpool(open_image, await _upload_bytes(upload, settings, "image"), settings,
                                              "image")
            elif isinstance(upload, str) and upload:
                img = await run_in_threadpool(_image_from_url, upload, settings, "image")
            if text is None and img is None:
                raise ApiError(400, "empty input: send an 'input' text and/or an 'image' file")
            items = [Item(text=text, image=img, id="input #0")]
            instruction, fmt = _form_str(form, "instruction"), _form_str(form, "encoding_format") or "float"
            if fmt not in ("float", "base64"):
                raise ApiError(422, "encoding_format must be 'float' or 'base64'")
            requested_model, dimensions = _form_str(form, "model"), None
            id_counts: list[int | None] = [None]
        elif ctype in ("application/json", ""):
            req: EmbeddingsRequest = await _json_body(request, EmbeddingsRequest)
            dimensions = _check_dimensions(req.dimensions, model, model_name)
            # decodes images and token ids: off the loop
            items, id_counts = await run_in_threadpool(_embedding_items, req, settings, tokenizer, model_name)
            instruction, fmt, requested_model = req.instruction, req.encoding_format, req.model
        else:
            raise ApiError(415, f"unsupported content type {ctype!r} (use application/json or multipart/form-data)",
                           "unsupported_media_type")
        instruction = instruction if instruction and instruction.strip() else None
        vectors = await batcher.encode([item.with_instruction(instruction) for item in items])
        if dimensions is not None and dimensions < vectors.shape[1]:  # Matryoshka: prefix, renormalised
            vectors = vectors[:, :dimensions]
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        tokens = _count_tokens(items, id_counts, tokenizer)
        data = [EmbeddingData(index=i, embedding=_encode_vector(vec, fmt)) for i, vec in enumerate(vectors)]
        return EmbeddingsResponse(data=data, model=requested_model or model_name, usage=Usage(
            prompt_tokens=tokens, total_tokens=tokens, images=sum(item.image is not None for item in items))
        ).model_dump()

    # ------------------------------------------------------------------ search
    @app.post("/search", response_model=SearchResponse, tags=["search"], dependencies=auth,
              openapi_extra=_multipart_doc({"text": {"type": "string"}, "image": _FILE,
                                            "instruction": {"type": "string"},
                                            "k": {"type": "integer", "minimum": 1, "maximum": 100}},
                                           "SearchRequest"))
    async def search(request: Request) -> dict:
        """Rank the indexed candidates for a text, image or image+text query (JSON with a data-URL
        ``image``, or multipart with an ``image`` file)."""
        started = time.perf_counter()
        ctype = _content_type(request)
        if _is_form(ctype):
            form = await request.form(max_files=1, max_fields=8)
            raw_k = _form_str(form, "k")
            fields: dict[str, Any] = {"text": _form_str(form, "text"), "instruction": _form_str(form, "instruction")}
            if raw_k not in (None, ""):
                fields["k"] = raw_k
            upload = form.get("image")
            if isinstance(upload, str) and upload:
                fields["image"] = upload
            try:
                req = SearchRequest.model_validate(fields)
            except ValidationError as exc:
                raise ApiError(422, _validation_message(exc)) from None
            img = await run_in_threadpool(open_image, await _upload_bytes(upload, settings, "image"), settings,
                                          "image") if isinstance(upload, UploadFile) else None
        elif ctype in ("application/json", ""):
            req = await _json_body(request, SearchRequest)
            img = None
        else:
            raise ApiError(415, f"unsupported content type {ctype!r} (use application/json or multipart/form-data)",
                           "unsupported_media_type")
        if img is None and req.image:
            img = await run_in_threadpool(_image_from_url, req.image, settings, "image")
        text = _check_text(req.text, settings, "text")
        if text is None and img is None:
            raise ApiError(400, "empty query: give a text, an image, or both")
        item = Item(text=text, image=img, id="query")
        instruction = req.instruction if req.instruction and req.instruction.strip() else None
        vector = await batcher.encode([item.with_instruction(instruction)])
        ids, scores = await run_in_threadpool(index.search, vector, req.k)
        hits = [SearchHit(did=hit.did, score=hit.score, rank=hit.rank, modality=hit.record.get("modality"),
                          text=hit.record.get("txt"),
                          image_url=f"/images/{quote(hit.did, safe=':')}" if hit.record.get("img_path") else None)
                for hit in hits_from(index, ids[0], scores[0].tolist())]
        return SearchResponse(query_modality=item.modality, k=req.k, results=hits,
                              took_ms=round((time.perf_counter() - started) * 1000, 3)).model_dump()

    _add_request_schemas(app)
    return app


def _check_dimensions(dimensions: int | None, model: Any, model_name: str) -> int | None:
    """OpenAI's ``dimensions``: the model's own dim always; fewer only for Matryoshka-trained models."""
    dim = int(model.dim)
    if dimensions is None or dimensions == dim:
        return None
    if dimensions > dim:
        raise ApiError(400, f"dimensions={dimensions} is more than model {model_name!r} has ({dim})")
    if not supports_matryoshka(model):
        raise ApiError(400, f"dimensions={dimensions} is not supported: model {model_name!r} is not trained for "
                            f"Matryoshka truncation, so it only gives its full {dim} dimensions")
    return dimensions


def _is_token_ids(entry: list[Any]) -> bool:
    """A non-empty list of ints (the schema's strict ints: never bools) is OpenAI's token-array input."""
    return bool(entry) and isinstance(entry[0], int)


def _decode_ids(ids: list[int], tokenizer: Any, what: str, model_name: str) -> str:
    if tokenizer is None:
        raise ApiError(400, f"{what}: token-id input is not supported: model {model_name!r} has no tokenizer "
                            "(send text instead)")
    vocab = len(tokenizer)
    bad = [t for t in ids if t >= vocab]
    if bad:
        raise ApiError(400, f"{what}: token id {bad[0]} is outside the vocabulary of model {model_name!r} "
                            f"({vocab} ids)")
    return tokenizer.decode(ids, skip_special_tokens=True)


def _count_tokens(items: list[Item], id_counts: list[int | None], tokenizer: Any) -> int:
    """Prompt tokens: the ids sent for token-array inputs, else the tokenizer's count (words without one)."""
    texts = [item.text for item, ids in zip(items, id_counts, strict=True) if ids is None and item.text]
    given = sum(n for n in id_counts if n is not None)
    if tokenizer is None:
        return given + sum(len(text.split()) for text in texts)
    if not texts:
        return given
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return given + sum(len(ids) for ids in encoded)


def _embedding_items(req: EmbeddingsRequest, settings: ServeSettings, tokenizer: Any = None,
                     model_name: str = "model") -> tuple[list[Item], list[int | None]]:
    """The items to embed, and for each the number of token ids it was sent as (``None``: sent as text)."""
    one = isinstance(req.input, str) or _is_token_ids(req.input)  # a string or one token-id list: one input
    entries = cast(list[EmbeddingInput], [req.input] if one else list(req.input))
    if not entries:
        raise ApiError(400, "empty input: 'input' is an empty list")
    if len(entries) > settings.max_inputs:
        raise ApiError(413, f"{len(entries)} inputs in one request, over the limit of {settings.max_inputs}",
                       "request_too_large")
    items: list[Item] = []
    id_counts: list[int | None] = []
    for i, entry in enumerate(entries):
        what = f"input[{i}]"
        ids = cast(list[int], entry) if not isinstance(entry, str) and _is_token_ids(entry) else None
        id_counts.append(len(ids) if ids is not None else None)
        if isinstance(entry, str) or ids is not None:
            raw = entry if isinstance(entry, str) else _decode_ids(ids or [], tokenizer, what, model_name)
            text = _check_text(raw, settings, what)
            if text is None:
                raise ApiError(400, f"{what}: empty text")
            items.append(Item(text=text, id=what))
            continue
        parts = [p for p in entry if isinstance(p, TextPart | ImagePart)]
        texts = [p.text for p in parts if isinstance(p, TextPart) and p.text.strip()]
        images = [p for p in parts if isinstance(p, ImagePart)]
        if len(images) > 1:
            raise ApiError(422, f"{what}: at most one image part per input (got {len(images)})")
        text = _check_text(" ".join(texts), settings, what) if texts else None
        img = _image_from_url(images[0].image_url.url, settings, what) if images else None
        if text is None and img is None:
            raise ApiError(400, f"{what}: empty input (no text and no image)")
        items.append(Item(text=text, image=img, id=what))
    return items, id_counts


def _encode_vector(vec: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":  # what OpenAI's client asks for by default: little-endian float32 bytes
        return base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vec]


def _load_instructions(data_root: Path | None) -> list[InstructionChoice]:
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


def _add_request_schemas(app: FastAPI) -> None:
    """Put the JSON request models into the OpenAPI components (the routes read the raw request)."""
    from pydantic.json_schema import models_json_schema

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, defs = models_json_schema([(EmbeddingsRequest, "validation"), (SearchRequest, "validation")],
                                     ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
