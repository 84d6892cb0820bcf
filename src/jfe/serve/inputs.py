"""What the service accepts, checked before anything reaches the model.

* :class:`BodyLimitMiddleware`: request bodies over the limit are refused (413) before any parsing;
* :func:`decode_data_url` / :func:`open_image`: data URLs only (no server-side fetches), then size, format
  and pixel-count checks from the image header before decoding (decompression-bomb safe);
* :func:`parse_search` / :func:`parse_embeddings`: a request from JSON or multipart, validated against the
  request schemas and turned into typed inputs (:class:`ParsedSearch`, :class:`ParsedEmbeddings`) whose
  items are ready to embed.

Every refusal is an :class:`~jfe.serve.errors.ApiError` with the status code and message the client sees.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
from typing import Any, Literal, cast

from fastapi import Request
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, InstanceOf, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from jfe.data.images import load_image
from jfe.data.items import Item
from jfe.errors import DataError
from jfe.models.tokens import supports_matryoshka
from jfe.serve.errors import ApiError, error_response, first_param, validation_message
from jfe.serve.schemas import (
    MAX_JSON_DEPTH,
    RERANK_K_MAX,
    EmbeddingInput,
    EmbeddingsRequest,
    ImagePart,
    RerankDocument,
    RerankInput,
    RerankRequest,
    SearchRequest,
    ServeSettings,
    TextPart,
)

# Bodies larger than this are parsed on a worker thread, so big images never stall the event loop.
_INLINE_BODY = 64 * 1024
JSON_CONTENT_TYPES = ("application/json", "")  # no content type at all is read as JSON
FORM_CONTENT_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


# ------------------------------------------------------------------------------------------ guard
# Paths anyone may fetch; every other path needs the key when the server has one.
PUBLIC_PATHS = frozenset({"/", "/health", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})
AUTH_MESSAGE = "missing or wrong API key (send X-API-Key: KEY or Authorization: Bearer KEY)"


def key_matches(given: str | None, api_key: str | None) -> bool:
    """Whether ``given`` is the server's key (always, when the server has none); constant-time."""
    if not api_key:
        return True
    if not given:
        return False
    return secrets.compare_digest(given.encode("utf-8", "replace"), api_key.encode("utf-8"))


def key_from_headers(headers: dict[bytes, bytes]) -> str | None:
    """The key a client sent: ``X-API-Key``, else an ``Authorization: Bearer`` token."""
    header = headers.get(b"x-api-key")
    if header is not None:
        return header.decode("latin-1")
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith("/static/")


class BodyLimitMiddleware:
    """Before any body is read: refuse a request without the API key (401, where the server has one) and a
    declared ``Content-Length`` over ``max_bytes`` (413); then count streamed (chunked) bodies, buffering at
    most the limit. So an unauthenticated or oversized request costs no memory.
    """

    def __init__(self, app: Any, max_bytes: int, api_key: str | None = None) -> None:
        self.app, self.max_bytes, self.api_key = app, max_bytes, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.api_key and not is_public(scope.get("path", "")) and \
                not key_matches(key_from_headers(headers), self.api_key):
            await error_response(401, AUTH_MESSAGE, "authentication_error",
                                 {"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        too_big = error_response(413, f"request body is larger than the limit of {self.max_bytes} bytes",
                                 "request_too_large")
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


def _probe_image(raw: bytes, settings: ServeSettings, what: str) -> tuple[str | None, int, int]:
    """Format and size from the image header alone (nothing decoded yet)."""
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            return probe.format, *probe.size
    except UnidentifiedImageError:
        raise ApiError(415, f"{what}: not an image in a supported format (accepted: "
                            f"{', '.join(settings.image_formats)})", "unsupported_media_type") from None
    except Image.DecompressionBombError:
        raise ApiError(413, f"{what}: image has too many pixels (limit {settings.max_pixels})",
                       "image_too_large") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ApiError(422, f"{what}: corrupt image ({exc})", "invalid_image") from None


def open_image(raw: bytes, settings: ServeSettings, what: str) -> Image.Image:
    """Check size, format and pixel count from the header, then decode to RGB (decompression-bomb safe)."""
    if not raw:
        raise ApiError(422, f"{what}: the image is empty", "invalid_image")
    if len(raw) > settings.max_image_bytes:
        raise ApiError(413, f"{what}: image is {len(raw)} bytes, over the limit of {settings.max_image_bytes}",
                       "image_too_large")
    fmt, width, height = _probe_image(raw, settings, what)
    if fmt not in settings.image_formats:
        raise ApiError(415, f"{what}: image format {fmt} is not accepted (accepted: "
                            f"{', '.join(settings.image_formats)})", "unsupported_media_type")
    if width * height > settings.max_pixels:
        raise ApiError(413, f"{what}: image has {width}x{height} pixels, over the limit of {settings.max_pixels}",
                       "image_too_large")
    try:
        return load_image(raw, item_id=what, max_pixels=settings.max_pixels, min_side=settings.image_min_side)
    except DataError as exc:
        raise ApiError(422, f"{what}: {exc.message}", "invalid_image") from None


def image_from_url(url: str, settings: ServeSettings, what: str) -> Image.Image:
    """A data-URL image, checked and decoded."""
    return open_image(decode_data_url(url, settings, what), settings, what)


async def _upload_bytes(upload: UploadFile, settings: ServeSettings, what: str) -> bytes:
    if upload.size is not None and upload.size > settings.max_image_bytes:
        raise ApiError(413, f"{what}: image is {upload.size} bytes, over the limit of {settings.max_image_bytes}",
                       "image_too_large")
    return await upload.read(settings.max_image_bytes + 1)  # one byte over is enough to refuse it


async def _uploaded_image(upload: UploadFile, settings: ServeSettings, what: str = "image") -> Image.Image:
    # decoding is CPU work: off the event loop
    return await run_in_threadpool(open_image, await _upload_bytes(upload, settings, what), settings, what)


# ------------------------------------------------------------------------------------------ bodies
def content_type(request: Request) -> str:
    """The media type of the request, lower-case, without parameters."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _unsupported(ctype: str) -> ApiError:
    return ApiError(415, f"unsupported content type {ctype!r} (use application/json or multipart/form-data)",
                    "unsupported_media_type")


async def _json_body(request: Request, model: type[BaseModel]) -> Any:
    body = await request.body()
    if len(body) > _INLINE_BODY:
        return await run_in_threadpool(_parse_json, body, model)
    return _parse_json(body, model)


def check_json_value(obj: Any) -> None:
    """Refuse (400) JSON nested deeper than :data:`MAX_JSON_DEPTH` and strings that are not valid Unicode
    (a lone surrogate such as ``"\\ud800"`` parses, but no tokenizer can encode it). Iterative: a deep
    body cannot exhaust the stack here."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ApiError(400, f"invalid Unicode in a string of the request (a lone surrogate at "
                                    f"position {exc.start})") from None
            continue
        if not isinstance(value, dict | list):
            continue
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"request body is nested more than {MAX_JSON_DEPTH} levels deep")
        children = list(value.items()) if isinstance(value, dict) else [(None, v) for v in value]
        for key, child in children:
            if key is not None:
                stack.append((key, depth + 1))
            stack.append((child, depth + 1))


def _parse_json(body: bytes, model: type[BaseModel]) -> Any:
    if not body.strip():
        raise ApiError(400, "request body is empty: send a JSON object")
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON ({exc})") from None
    except RecursionError:  # the C parser gives up on very deep nesting before check_json_value could
        raise ApiError(400, f"request body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    check_json_value(obj)
    if not isinstance(obj, dict):
        raise ApiError(422, "request body must be a JSON object")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise ApiError(422, validation_message(exc), param=first_param(exc)) from None


def _form_str(form: Any, name: str) -> str | None:
    value = form.get(name)
    if value is None or isinstance(value, UploadFile):
        return None
    return str(value)


def check_text(text: str | None, settings: ServeSettings, what: str) -> str | None:
    """``text`` within the length limit and valid Unicode; ``None`` for no text or only whitespace."""
    if text is None or not text.strip():
        return None
    if len(text) > settings.max_text_chars:
        raise ApiError(422, f"{what}: text is {len(text)} characters, over the limit of {settings.max_text_chars}")
    check_json_value(text)
    return text


def _instruction(text: str | None, settings: ServeSettings) -> str | None:
    """The instruction, held to the text limit (it is encoded with every input); blank means none."""
    return check_text(text, settings, "instruction")


async def _form(request: Request) -> Any:
    """A multipart / urlencoded form with at most one file and eight fields; a second image is 422 like two
    image parts in JSON, and a form the parser refuses is 422 naming why."""
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    try:
        form = await request.form(max_files=2, max_fields=8)
    except (MultiPartException, HTTPException) as exc:
        detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
        raise ApiError(422, f"malformed form ({detail})") from None
    if len(form.getlist("image")) > 1 or sum(isinstance(v, UploadFile) for _, v in form.multi_items()) > 1:
        raise ApiError(422, "at most one image per request")
    return form


# ------------------------------------------------------------------------------------------ search
class ParsedSearch(BaseModel):
    """A checked ``/search`` request: its fields, and the query item (image decoded) to embed."""

    model_config = ConfigDict(frozen=True)
    request: SearchRequest
    item: InstanceOf[Item]
    instruction: str | None = None


async def _search_form(request: Request, settings: ServeSettings) -> tuple[SearchRequest, Image.Image | None]:
    form = await _form(request)
    fields: dict[str, Any] = {"text": _form_str(form, "text"), "instruction": _form_str(form, "instruction")}
    if _form_str(form, "rerank"):
        fields["rerank"] = _form_str(form, "rerank")
    for name in ("k", "rerank_k"):
        raw = _form_str(form, name)
        if raw not in (None, ""):  # an empty field means the default; a form sends every value as text
            if not raw.strip().isdigit():
                raise ApiError(422, f"{name}: an integer is required, got {raw[:20]!r}", param=name)
            fields[name] = int(raw)
    upload = form.get("image")
    if isinstance(upload, str) and upload:  # a data URL sent as a text field
        fields["image"] = upload
    try:
        req = SearchRequest.model_validate(fields)
    except ValidationError as exc:
        raise ApiError(422, validation_message(exc), param=first_param(exc)) from None
    image = await _uploaded_image(upload, settings) if isinstance(upload, UploadFile) else None
    return req, image


async def parse_search(request: Request, settings: ServeSettings) -> ParsedSearch:
    """A ``/search`` request from JSON (``image`` as a data URL) or multipart (an ``image`` file)."""
    ctype = content_type(request)
    if ctype in FORM_CONTENT_TYPES:
        req, image = await _search_form(request, settings)
    elif ctype in JSON_CONTENT_TYPES:
        req, image = await _json_body(request, SearchRequest), None
    else:
        raise _unsupported(ctype)
    text = check_text(req.text, settings, "text")  # the cheap checks first: refuse before decoding
    instruction = _instruction(req.instruction, settings)
    if image is None and req.image:
        image = await run_in_threadpool(image_from_url, req.image, settings, "image")
    if text is None and image is None:
        raise ApiError(400, "empty query: give a text, an image, or both")
    return ParsedSearch(request=req, item=Item(text=text, image=image, id="query"), instruction=instruction)


# ------------------------------------------------------------------------------------------ embeddings
class ParsedEmbeddings(BaseModel):
    """A checked ``/v1/embeddings`` request: the items to embed and how to answer.

    ``id_counts`` has, per item, the number of token ids it was sent as (``None``: sent as text);
    ``dimensions`` is set only when the answer is a Matryoshka prefix shorter than the model's dim.
    """

    model_config = ConfigDict(frozen=True)
    items: list[InstanceOf[Item]]
    id_counts: list[int | None]
    instruction: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    model: str | None = None
    dimensions: int | None = None


def check_model_name(requested: str | None, model_name: str) -> None:
    """OpenAI's ``model``: the served model's name, or left out; any other name is a 404 ``model_not_found``, as
    OpenAI answers (an echo would let a client believe it got the model it named)."""
    if requested is not None and requested != model_name:
        raise ApiError(404, f"the model {requested!r} does not exist here: this service serves {model_name!r} "
                            f"(GET /v1/models lists it)", param="model", code="model_not_found")


def check_dimensions(dimensions: int | None, model: Any, model_name: str) -> int | None:
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
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"{what}: token id {bad[0]} is outside the vocabulary of model {model_name!r} "
                            f"({vocab} ids)")
    return tokenizer.decode(ids, skip_special_tokens=True)


def _text_entry(entry: str | list[int], settings: ServeSettings, tokenizer: Any, what: str,
                model_name: str) -> Item:
    """A string or a token-id list: one text item."""
    raw = entry if isinstance(entry, str) else _decode_ids(entry, tokenizer, what, model_name)
    text = check_text(raw, settings, what)
    if text is None:
        raise ApiError(400, f"{what}: empty text")
    return Item(text=text, id=what)


def _parts(entry: list[Any], what: str) -> tuple[str | None, str | None]:
    """A list of content parts as ``(text, image data URL)``: its texts joined, and at most one image."""
    parts = [p for p in entry if isinstance(p, TextPart | ImagePart)]
    texts = [p.text for p in parts if isinstance(p, TextPart) and p.text.strip()]
    images = [p for p in parts if isinstance(p, ImagePart)]
    if len(images) > 1:
        raise ApiError(422, f"{what}: at most one image part per input (got {len(images)})")
    return (" ".join(texts) if texts else None), (images[0].image_url.url if images else None)


def _checked_item(text: str | None, image_url: str | None, settings: ServeSettings, what: str) -> Item:
    """One item from a text and a data-URL image, both checked (the image decoded); neither is a 400."""
    checked = check_text(text, settings, what)
    image = image_from_url(image_url, settings, what) if image_url else None
    if checked is None and image is None:
        raise ApiError(400, f"{what}: empty input (no text and no image)")
    return Item(text=checked, image=image, id=what)


def _parts_entry(entry: list[Any], settings: ServeSettings, what: str) -> Item:
    """A list of content parts: its texts joined, and at most one data-URL image."""
    return _checked_item(*_parts(entry, what), settings, what)


def embedding_items(req: EmbeddingsRequest, settings: ServeSettings, tokenizer: Any = None,
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
            items.append(_text_entry(entry if isinstance(entry, str) else ids or [], settings, tokenizer, what,
                                     model_name))
        else:
            items.append(_parts_entry(entry, settings, what))
    return items, id_counts


async def _embeddings_form(request: Request, settings: ServeSettings) -> ParsedEmbeddings:
    """Multipart: one item from the ``input`` (or ``text``) field and an ``image`` file or data URL."""
    form = await _form(request)
    text = check_text(_form_str(form, "input") or _form_str(form, "text"), settings, "input")
    upload = form.get("image")
    image = None
    if isinstance(upload, UploadFile):
        image = await _uploaded_image(upload, settings)
    elif isinstance(upload, str) and upload:
        image = await run_in_threadpool(image_from_url, upload, settings, "image")
    if text is None and image is None:
        raise ApiError(400, "empty input: send an 'input' text and/or an 'image' file")
    fmt = _form_str(form, "encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(422, "encoding_format must be 'float' or 'base64'")
    return ParsedEmbeddings(items=[Item(text=text, image=image, id="input #0")], id_counts=[None],
                            instruction=_instruction(_form_str(form, "instruction"), settings),
                            encoding_format=cast(Literal["float", "base64"], fmt), model=_form_str(form, "model"))


async def parse_embeddings(request: Request, settings: ServeSettings, model: Any, model_name: str,
                           tokenizer: Any = None) -> ParsedEmbeddings:
    """A ``/v1/embeddings`` request from JSON (OpenAI's shape plus image parts) or multipart.

    ``model`` (its ``dim``, whether it is Matryoshka-trained) and ``tokenizer`` (for token-id inputs; None
    refuses them) are the served model's; ``model_name`` names it in error messages.
    """
    ctype = content_type(request)
    if ctype in FORM_CONTENT_TYPES:
        parsed = await _embeddings_form(request, settings)
        check_model_name(parsed.model, model_name)
        return parsed
    if ctype not in JSON_CONTENT_TYPES:
        raise _unsupported(ctype)
    req: EmbeddingsRequest = await _json_body(request, EmbeddingsRequest)
    check_model_name(req.model, model_name)
    dimensions = check_dimensions(req.dimensions, model, model_name)
    instruction = _instruction(req.instruction, settings)
    # decodes images and token ids: off the loop
    items, id_counts = await run_in_threadpool(embedding_items, req, settings, tokenizer, model_name)
    return ParsedEmbeddings(items=items, id_counts=id_counts, instruction=instruction,
                            encoding_format=req.encoding_format, model=req.model, dimensions=dimensions)


# ------------------------------------------------------------------------------------------ rerank
class ParsedRerank(BaseModel):
    """A checked ``/v1/rerank`` request: the query and documents as items, and each document as it will be echoed."""

    model_config = ConfigDict(frozen=True)
    request: RerankRequest
    query: InstanceOf[Item]
    documents: list[InstanceOf[Item]]
    echoes: list[RerankDocument]


def rerank_input(entry: RerankInput, settings: ServeSettings, what: str) -> tuple[Item, RerankDocument]:
    """A string, a ``{"text", "image"}`` object or content parts: the item, and the document to echo."""
    text: str | None
    url: str | None
    if isinstance(entry, str):
        text, url = entry, None
    elif isinstance(entry, RerankDocument):
        text, url = entry.text, entry.image
    else:
        text, url = _parts(entry, what)
    item = _checked_item(text, url, settings, what)
    return item, RerankDocument(text=item.text, image=url)


def rerank_items(req: RerankRequest, settings: ServeSettings) -> tuple[Item, list[Item], list[RerankDocument]]:
    """The query, the documents and their echoes; the document count is checked before any image is decoded."""
    if not req.documents:
        raise ApiError(400, "empty documents: give at least one document to rerank", param="documents")
    if len(req.documents) > RERANK_K_MAX:
        raise ApiError(413, f"{len(req.documents)} documents in one request, over the limit of {RERANK_K_MAX} "
                            f"(every document is read with the query: split the request)", "request_too_large")
    query, _ = rerank_input(req.query, settings, "query")
    documents = [rerank_input(entry, settings, f"documents[{i}]") for i, entry in enumerate(req.documents)]
    return query, [item for item, _ in documents], [echo for _, echo in documents]


async def parse_rerank(request: Request, settings: ServeSettings) -> ParsedRerank:
    """A ``/v1/rerank`` request (JSON only: images are data URLs)."""
    ctype = content_type(request)
    if ctype not in JSON_CONTENT_TYPES:
        raise ApiError(415, f"unsupported content type {ctype!r}: /v1/rerank reads application/json (images as "
                            f"data URLs)", "unsupported_media_type")
    req: RerankRequest = await _json_body(request, RerankRequest)
    instruction = _instruction(req.instruction, settings)
    query, documents, echoes = await run_in_threadpool(rerank_items, req, settings)  # decodes images: off the loop
    return ParsedRerank(request=req, query=query.with_instruction(instruction), documents=documents, echoes=echoes)
