"""Request/response models of the HTTP service and its settings.

The embeddings endpoint follows OpenAI's ``/v1/embeddings`` shape, extended with image content parts
(the chat-completions ``image_url`` part) and an optional retrieval ``instruction``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

K_MAX = 100
RERANK_K_MAX = 200  # a reranker reads every (query, candidate) pair: ~150 ms per 50 on 2 CPU cores
# short fields (model names, user tags) never need more; texts and instructions have the settings' limit
SHORT_FIELD_CHARS = 256
# JSON bodies nest at most this deep (content parts sit at depth 4): deeper is refused before validation
MAX_JSON_DEPTH = 16


class ServeSettings(BaseModel):
    """Everything ``create_app`` needs besides the model and the index (all limits are per request)."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = Field("model", description="name reported in /health and in embedding responses")
    api_key: str | None = Field(None, description="when set, API endpoints need X-API-Key or a Bearer token")
    cors_origins: list[str] = Field(default_factory=list, description="allowed CORS origins; empty = CORS off")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest request body")
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=1, description="largest encoded image")
    max_pixels: int = Field(4096 * 4096, ge=1, description="largest decoded image (width x height)")
    max_inputs: int = Field(2048, ge=1, description="most inputs in one embeddings request (OpenAI's limit)")
    max_text_chars: int = Field(8192, ge=1, description="longest text of one input, and of an instruction")
    batching: bool = Field(True, description="micro-batch concurrent requests into one encode call")
    max_batch: int = Field(32, ge=1, description="most items in one micro-batch")
    max_wait_ms: float = Field(5.0, ge=0, description="how long the first request of a batch waits for company")
    max_rerank_pairs: int = Field(256, ge=1, description="most (query, candidate) pairs in one reranking micro-batch "
                                  "(a shortlist is never split)")
    image_formats: tuple[str, ...] = Field(("PNG", "JPEG", "GIF", "WEBP", "BMP"),
                                           description="accepted image formats (PIL names)")
    image_min_side: int | None = Field(None, ge=1, description="decode large JPEGs at a reduced scale of at "
                                       "least this side (default: the model's image input size), as files are")


# --------------------------------------------------------------------------------------- embeddings
class ImageURL(BaseModel):
    url: str = Field(..., description="a data URL: data:image/png;base64,... (remote URLs are refused)")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]
# OpenAI's token-array input: ids of the served model's tokenizer (strict, so true/false or "1" are not ids);
# the range is checked against the vocabulary when decoding (400 naming the id, as for an id too large).
TokenIds = list[Annotated[int, Field(strict=True)]]
EmbeddingInput = str | TokenIds | list[ContentPart]


class EmbeddingsRequest(BaseModel):
    """``input``: a string, a list of token ids (one input), or a list whose entries are strings, token-id
    lists or lists of content parts (one item each). Token ids need a model with a tokenizer."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, max_length=SHORT_FIELD_CHARS,
                              description="the served model's name (GET /v1/models) or left out; another "
                                          "name is a 404 model_not_found")
    input: str | TokenIds | list[EmbeddingInput]
    instruction: str | None = Field(None, description="retrieval instruction prefixed to every input's text")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description=(
        "Matryoshka truncation to the first `dimensions` components, renormalised; only for models trained "
        "for it (others accept only their own dim, else 400)"))
    user: str | None = Field(None, max_length=SHORT_FIELD_CHARS)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int = Field(..., description=(
        "tokens of the input texts by the model's tokenizer (token-array inputs count their ids); "
        "whitespace-separated words for models without a tokenizer; instructions are not counted"))
    total_tokens: int
    images: int = 0


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


# --------------------------------------------------------------------------------------- search
class SearchRequest(BaseModel):
    """A query: text, an image (data URL), or both; an optional instruction; ``k`` results."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    image: str | None = Field(None, description="data:image/...;base64,... data URL")
    instruction: str | None = None
    k: int = Field(10, ge=1, le=K_MAX, strict=True)  # strict: true/false or "3" are not a k
    rerank: str | None = Field(None, description="a reranker the service was started with (`jfe serve --rerank`): "
                               "it reorders the first rerank_k hits, reading query and candidate together")
    rerank_k: int = Field(50, ge=1, le=RERANK_K_MAX, strict=True, description="first-stage hits the reranker reads")


class SearchHit(BaseModel):
    did: str
    score: float
    rank: int
    modality: str | None
    text: str | None
    image_url: str | None = Field(None, description="relative URL of the candidate's image, if it has one")
    first_stage_rank: int | None = Field(None, description="where the retriever ranked this hit, when a reranker "
                                         "reordered the list")


class SearchResponse(BaseModel):
    query_modality: str
    k: int
    took_ms: float
    results: list[SearchHit]
    reranked_by: str | None = Field(None, description="the reranker that reordered the first stage, if any")
    rerank_k: int | None = None


# --------------------------------------------------------------------------------------- rerank
class RerankDocument(BaseModel):
    """A query or document as multimodal rerank APIs send it (jina-reranker-m0's shape): a text, an image (a data
    URL), or both."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    image: str | None = Field(None, description="data:image/...;base64,... data URL (remote URLs are refused)")


# a string, a {"text", "image"} object, or content parts (as in /v1/embeddings)
RerankInput = str | RerankDocument | list[ContentPart]


class RerankRequest(BaseModel):
    """Score every document against the query with a reranker that reads each (query, document) pair in one
    sequence; the Jina / Cohere rerank shape, with images."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, max_length=SHORT_FIELD_CHARS,
                              description="a reranker the service was started with (jfe serve --rerank); may be "
                                          "left out when it serves exactly one")
    query: RerankInput
    documents: list[RerankInput] = Field(..., description=f"at most {RERANK_K_MAX} documents")
    top_n: int | None = Field(None, ge=1, strict=True, description="return only the n best (default: all)")
    return_documents: bool = Field(True, description="echo each result's document (text and image)")
    instruction: str | None = Field(None, description="retrieval instruction prefixed to the query's text")


class RerankResult(BaseModel):
    index: int = Field(..., description="the document's position in the request")
    relevance_score: float = Field(..., description="the reranker's score (higher is more relevant; not a "
                                   "probability: compare scores within one request)")
    document: RerankDocument | None = None


class RerankUsage(BaseModel):
    total_tokens: int = Field(..., description="tokens of the query's and the documents' texts by the served "
                              "encoder's tokenizer (words without one)")
    images: int = Field(0, description="images among the query and the documents")


class RerankResponse(BaseModel):
    model: str
    results: list[RerankResult] = Field(..., description="best first")
    usage: RerankUsage


# --------------------------------------------------------------------------------------- misc
class ModelCard(BaseModel):
    """One entry of ``GET /v1/models`` (OpenAI's model object)."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="when the service started (Unix seconds)")
    owned_by: str = "jfe"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    index_size: int
    dim: int
    batching: bool
    max_batch: int
    auth: bool = Field(False, description="whether API endpoints need a key")
    stats: dict[str, int] = Field(default_factory=dict, description="micro-batching counters")
    rerankers: list[str] = Field(default_factory=list, description="rerankers /search and /v1/rerank may name "
                                 "(jfe serve --rerank)")
    backend: str | None = Field(None, description="what encodes queries: torch, onnx or openvino (jfe serve --backend)")
    precision: str | None = Field(None, description="the precision queries are encoded in (fp32, bf16, int8)")


class InstructionChoice(BaseModel):
    dataset_id: str
    dataset: str
    query_modality: str
    cand_modality: str
    prompts: list[str]


class InstructionsResponse(BaseModel):
    instructions: list[InstructionChoice]


class ErrorBody(BaseModel):
    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody
