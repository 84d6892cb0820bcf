"""The HTTP service through FastAPI's TestClient: every endpoint and every error case."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from jfe.data.items import Item
from jfe.errors import ConfigError
from jfe.index import VectorIndex
from jfe.indexing import build_index
from jfe.models.toy import ToyConfig, ToyEncoder
from jfe.serve.app import create_app
from jfe.serve.schemas import ServeSettings


@pytest.fixture(scope="module")
def model() -> ToyEncoder:
    return ToyEncoder()


@pytest.fixture
def index(tiny_mbeir: Path, model: ToyEncoder) -> VectorIndex:
    pools = sorted((tiny_mbeir / "cand_pool" / "global").glob("*.jsonl"))
    return build_index(model, pools, tiny_mbeir, progress=False)


def make_client(model, index, **settings) -> TestClient:  # noqa: ANN001
    return TestClient(create_app(model, index, ServeSettings(**settings)))


@pytest.fixture
def client(model: ToyEncoder, index: VectorIndex):
    with make_client(model, index) as c:
        yield c


def png_bytes(path: Path | None = None, size: tuple[int, int] = (32, 32), fmt: str = "PNG") -> bytes:
    image = Image.open(path) if path else Image.new("RGB", size, (10, 200, 30))
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def expected_ranking(model, index, item: Item, k: int, instruction: str | None = None) -> list[str]:  # noqa: ANN001
    ids, _ = index.search(model.encode([item], instruction=instruction), k)
    return ids[0]


def error_of(response) -> dict:  # noqa: ANN001
    body = response.json()
    assert set(body) == {"error"}, body
    # OpenAI's shape: a string code where one is named (model_not_found), else the status
    assert body["error"]["code"] == response.status_code or isinstance(body["error"]["code"], str)
    assert body["error"]["message"] and "param" in body["error"]
    return body["error"]


# ------------------------------------------------------------------------------------------ health & docs
def test_health_reports_model_index_and_dim(client: TestClient, index: VectorIndex) -> None:
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["index_size"] == len(index) == 8
    assert body["dim"] == index.dim
    assert body["model"] == index.meta["model"]
    assert body["auth"] is False


def test_openapi_documents_both_request_bodies(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/search", "/v1/embeddings", "/images/{did}", "/health", "/instructions"} <= set(spec["paths"])
    content = spec["paths"]["/search"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)
    assert {"SearchRequest", "EmbeddingsRequest", "TextPart", "ImagePart"} <= set(spec["components"]["schemas"])


def test_page_and_static_files(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for ref in ("/static/app.js", "/static/style.css"):
        assert ref in page.text
        assert client.get(ref).status_code == 200


def test_unknown_route_is_json_404(client: TestClient) -> None:
    assert error_of(client.get("/nope"))["code"] == 404


# ------------------------------------------------------------------------------------------ search
def test_text_search_matches_direct_encode_and_search(client: TestClient, model, index) -> None:  # noqa: ANN001
    response = client.post("/search", json={"text": "A blue circle", "k": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["query_modality"] == "text" and body["k"] == 5
    hits = body["results"]
    assert [h["did"] for h in hits] == expected_ranking(model, index, Item(text="A blue circle"), 5)
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    top = hits[0]  # the text candidate with exactly this text embeds identically
    assert top["text"] == "A blue circle" and top["modality"] == "text" and top["image_url"] is None
    assert top["score"] == pytest.approx(1.0, abs=1e-5)


def test_image_search_json_data_url(client: TestClient, tiny_mbeir: Path, model, index) -> None:  # noqa: ANN001
    raw = png_bytes(tiny_mbeir / "images/tiny/red_square.png")
    hits = client.post("/search", json={"image": data_url(raw), "k": 3}).json()["results"]
    assert hits[0]["did"] == "1:1" and hits[0]["image_url"] == "/images/1:1"
    assert [h["did"] for h in hits] == expected_ranking(model, index, Item(image=raw), 3)


def test_image_text_search_multipart(client: TestClient, tiny_mbeir: Path, model, index) -> None:  # noqa: ANN001
    raw = png_bytes(tiny_mbeir / "images/tiny/red_square.png")
    response = client.post("/search", data={"text": "make it blue", "k": "4"},
                           files={"image": ("q.png", raw, "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query_modality"] == "image,text" and len(body["results"]) == 4
    assert [h["did"] for h in body["results"]] == \
        expected_ranking(model, index, Item(text="make it blue", image=raw), 4)


def test_instruction_is_prefixed_to_the_query(client: TestClient, model, index) -> None:  # noqa: ANN001
    instruction = "Find the picture this text describes"
    hits = client.post("/search", json={"text": "a red circle", "instruction": instruction, "k": 8}).json()["results"]
    with_instr = expected_ranking(model, index, Item(text="a red circle"), 8, instruction)
    assert [h["did"] for h in hits] == with_instr
    scores_plain = [h["score"] for h in client.post("/search", json={"text": "a red circle", "k": 8}).json()["results"]]
    assert scores_plain != [h["score"] for h in hits]


def test_k_larger_than_index_returns_everything(client: TestClient, index: VectorIndex) -> None:
    hits = client.post("/search", json={"text": "square", "k": 100}).json()["results"]
    assert sorted(h["did"] for h in hits) == sorted(index.ids)


@pytest.mark.parametrize("k", [0, 101, -3, "many"])
def test_k_out_of_range(client: TestClient, k: object) -> None:
    assert "k" in error_of(client.post("/search", json={"text": "x", "k": k}))["message"]
    response = client.post("/search", data={"text": "x", "k": str(k)})
    assert response.status_code == 422 and "k" in error_of(response)["message"]


@pytest.mark.parametrize("payload", [{}, {"text": ""}, {"text": "   "}, {"k": 3}])
def test_empty_search_is_400(client: TestClient, payload: dict) -> None:
    response = client.post("/search", json=payload)
    assert response.status_code == 400 and "empty" in error_of(response)["message"]


def test_empty_multipart_search_is_400(client: TestClient) -> None:
    response = client.post("/search", data={"instruction": "x"})
    assert response.status_code == 400


def test_unknown_field_and_bad_json(client: TestClient) -> None:
    assert client.post("/search", json={"txt": "x"}).status_code == 422
    bad = client.post("/search", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "JSON" in error_of(bad)["message"]
    assert client.post("/search", json=["a list"]).status_code == 422


def test_unsupported_content_type_is_415(client: TestClient) -> None:
    response = client.post("/search", content=b"a red circle", headers={"content-type": "text/plain"})
    assert response.status_code == 415


# ------------------------------------------------------------------------------------------ image limits
def test_remote_image_url_is_refused(client: TestClient) -> None:
    response = client.post("/search", json={"image": "http://169.254.169.254/latest/meta-data"})
    assert response.status_code == 422 and "data URL" in error_of(response)["message"]


def test_non_image_data_url_is_415(client: TestClient) -> None:
    response = client.post("/search", json={"image": data_url(b"hello", "text/plain")})
    assert response.status_code == 415


def test_bad_base64_is_422(client: TestClient) -> None:
    response = client.post("/search", json={"image": "data:image/png;base64,@@@not-base64@@@"})
    assert response.status_code == 422 and "base64" in error_of(response)["message"]


def test_unsupported_format_is_415(client: TestClient) -> None:
    tiff = png_bytes(fmt="TIFF")
    response = client.post("/search", files={"image": ("x.tiff", tiff, "image/tiff")})
    assert response.status_code == 415 and "TIFF" in error_of(response)["message"]
    garbage = client.post("/search", json={"image": data_url(b"this is not an image at all")})
    assert garbage.status_code == 415


def test_corrupt_image_is_422(client: TestClient) -> None:
    truncated = png_bytes(size=(64, 64))[:60]
    response = client.post("/search", files={"image": ("x.png", truncated, "image/png")})
    assert response.status_code == 422, response.text
    assert "image" in error_of(response)["message"]


class _SizedToy(ToyEncoder):
    """A toy that, like jfe-mini, reads images at a fixed side."""

    @property
    def image_input_size(self) -> int | None:
        return 224


def test_uploads_decode_large_jpegs_like_indexed_files(tmp_path: Path, index: VectorIndex) -> None:
    from jfe.data.images import load_image
    from jfe.serve.inputs import open_image

    rng = np.random.default_rng(0)
    photo = Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)).resize((1600, 1200))
    path = tmp_path / "photo.jpg"
    photo.save(path, quality=90)
    sized = create_app(_SizedToy(), index, ServeSettings())
    assert sized.state.settings.image_min_side == 224  # taken from the model
    assert create_app(ToyEncoder(), index, ServeSettings()).state.settings.image_min_side is None
    uploaded = open_image(path.read_bytes(), sized.state.settings, "image")
    assert uploaded.size == (400, 300)  # reduced at decode, as the model's own loader reads the file
    assert uploaded.tobytes() == load_image(path, min_side=224).tobytes()
    with TestClient(sized) as c:
        assert c.post("/search", files={"image": ("p.jpg", path.read_bytes(), "image/jpeg")}).status_code == 200


def test_image_bytes_limit_is_413(model, index) -> None:  # noqa: ANN001
    raw = png_bytes(size=(64, 64))
    with make_client(model, index, max_image_bytes=len(raw) - 1) as c:
        assert c.post("/search", files={"image": ("x.png", raw, "image/png")}).status_code == 413
        assert c.post("/search", json={"image": data_url(raw)}).status_code == 413
        assert c.post("/search", json={"image": data_url(png_bytes(size=(4, 4)))}).status_code == 200


def test_pixel_limit_stops_decompression_bombs(model, index) -> None:  # noqa: ANN001
    # A flat 3000x3000 PNG is a few kB on the wire but 9 MP decoded: refused from the header alone.
    bomb = png_bytes(size=(3000, 3000))
    assert len(bomb) < 100_000
    with make_client(model, index, max_pixels=1_000_000) as c:
        response = c.post("/search", files={"image": ("bomb.png", bomb, "image/png")})
        assert response.status_code == 413 and "pixels" in error_of(response)["message"]
        assert c.post("/search", json={"image": data_url(png_bytes(size=(900, 900)))}).status_code == 200


def test_body_size_limit_is_413(model, index) -> None:  # noqa: ANN001
    with make_client(model, index, max_body_bytes=2048) as c:
        response = c.post("/search", json={"text": "x" * 5000})
        assert response.status_code == 413 and "body" in error_of(response)["message"]

        def chunks():  # no Content-Length: the limit must hold for streamed bodies too
            for _ in range(10):
                yield b'{"text": "' + b"y" * 500
        assert c.post("/search", content=chunks(), headers={"content-type": "application/json"}).status_code == 413
        assert c.post("/search", json={"text": "small"}).status_code == 200


def test_text_length_limit(model, index) -> None:  # noqa: ANN001
    with make_client(model, index, max_text_chars=10) as c:
        assert c.post("/search", json={"text": "a" * 11}).status_code == 422
        # OpenAI's route answers 400 where the rest of the API answers 422 (the official client's BadRequestError)
        assert c.post("/v1/embeddings", json={"input": ["ok", "b" * 11]}).status_code == 400


# ------------------------------------------------------------------------------------------ embeddings
def test_embeddings_of_strings_match_model(client: TestClient, model) -> None:  # noqa: ANN001
    texts = ["a red square", "two words"]
    body = client.post("/v1/embeddings", json={"model": client.get("/v1/models").json()["data"][0]["id"],
                                               "input": texts}).json()
    assert body["object"] == "list" and body["model"]
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in body["data"])
    vectors = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    np.testing.assert_allclose(vectors, model.encode(texts), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["images"] == 0


def test_embeddings_single_string_and_instruction(client: TestClient, model) -> None:  # noqa: ANN001
    body = client.post("/v1/embeddings", json={"input": "a blue circle", "instruction": "Retrieve an image"}).json()
    assert len(body["data"]) == 1
    np.testing.assert_allclose(body["data"][0]["embedding"],
                               model.encode(["a blue circle"], instruction="Retrieve an image")[0], atol=1e-6)


def test_embeddings_content_parts(client: TestClient, tiny_mbeir: Path, model) -> None:  # noqa: ANN001
    raw = png_bytes(tiny_mbeir / "images/tiny/blue_circle.png")
    body = client.post("/v1/embeddings", json={"input": [
        [{"type": "image_url", "image_url": {"url": data_url(raw)}}],
        [{"type": "text", "text": "make it"}, {"type": "text", "text": "red"},
         {"type": "image_url", "image_url": {"url": data_url(raw)}}],
        "plain text",
    ]}).json()
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    want = model.encode([Item(image=raw), Item(text="make it red", image=raw), "plain text"])
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert body["usage"]["images"] == 2


def test_embeddings_base64_encoding(client: TestClient) -> None:
    floats = client.post("/v1/embeddings", json={"input": "hello"}).json()["data"][0]["embedding"]
    packed = client.post("/v1/embeddings", json={"input": "hello", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, floats, atol=1e-7)


def test_embeddings_multipart(client: TestClient, tiny_mbeir: Path, model) -> None:  # noqa: ANN001
    raw = png_bytes(tiny_mbeir / "images/tiny/red_circle.png")
    response = client.post("/v1/embeddings", data={"input": "a red circle"},
                           files={"image": ("x.png", raw, "image/png")})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["data"][0]["embedding"],
                               model.encode([Item(text="a red circle", image=raw)])[0], atol=1e-6)
    assert client.post("/v1/embeddings", data={"instruction": "only"}).status_code == 400


@pytest.mark.parametrize("payload", [{"input": ""}, {"input": []}, {"input": [[]]}, {"input": ["ok", "  "]},
                                     {"input": [[{"type": "text", "text": " "}]]}])
def test_embeddings_empty_input_is_400(client: TestClient, payload: dict) -> None:
    response = client.post("/v1/embeddings", json=payload)
    assert response.status_code == 400 and "empty" in error_of(response)["message"]


def test_embeddings_invalid_inputs(client: TestClient, index) -> None:  # noqa: ANN001
    url = data_url(png_bytes())
    two_images = [[{"type": "image_url", "image_url": {"url": url}}] * 2]
    assert client.post("/v1/embeddings", json={"input": two_images}).status_code == 400
    # token ids are valid input (issue 13 item 4), but the toy model has no tokenizer: a clear 400
    no_tokenizer = client.post("/v1/embeddings", json={"input": [[1, 2, 3]]})
    assert no_tokenizer.status_code == 400 and "no tokenizer" in error_of(no_tokenizer)["message"]
    assert client.post("/v1/embeddings", json={"input": [[True, 2]]}).status_code == 400  # not token ids
    assert client.post("/v1/embeddings", json={"input": [[{"type": "audio"}]]}).status_code == 400
    bad_format = client.post("/v1/embeddings", json={"input": "x", "encoding_format": "int8"})
    assert bad_format.status_code == 400 and error_of(bad_format)["param"] == "encoding_format"
    assert client.post("/v1/embeddings", json={"input": "x", "dimensions": index.dim + 1}).status_code == 400
    assert client.post("/v1/embeddings", json={"input": "x", "dimensions": 0}).status_code == 400
    assert client.post("/v1/embeddings", json={"input": "x", "dimensions": index.dim}).status_code == 200


def test_embeddings_input_count_limit(model, index) -> None:  # noqa: ANN001
    with make_client(model, index, max_inputs=3) as c:
        assert c.post("/v1/embeddings", json={"input": ["a"] * 4}).status_code == 413
        assert len(c.post("/v1/embeddings", json={"input": ["a"] * 3}).json()["data"]) == 3


# ------------------------------------------------------------------------------------------ images
def test_image_endpoint_serves_the_candidate_file(client: TestClient, tiny_mbeir: Path) -> None:
    response = client.get("/images/1:1")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == (tiny_mbeir / "images/tiny/red_square.png").read_bytes()


@pytest.mark.parametrize("did", ["9:9", "1:5", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"])
def test_image_endpoint_404s(client: TestClient, did: str) -> None:
    assert client.get(f"/images/{did}").status_code == 404


def test_image_path_traversal_in_records_is_refused(tmp_path: Path, model) -> None:  # noqa: ANN001
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    inside = root / "images" / "ok.png"
    inside.write_bytes(png_bytes())
    os.symlink(secret, root / "images" / "link.png")
    index = VectorIndex(model.dim, meta={"data_root": str(root), "model": "toy-hash"})
    records = [{"did": f"1:{i}", "txt": None, "img_path": p, "modality": "image", "src_content": None}
               for i, p in enumerate(["images/ok.png", "../secret.png", str(secret), "images/link.png"])]
    index.add([r["did"] for r in records], np.eye(4, model.dim, dtype=np.float32), records)
    with make_client(model, index) as c:
        assert c.get("/images/1:0").content == inside.read_bytes()
        for did in ("1:1", "1:2", "1:3"):
            response = c.get(f"/images/{did}")
            assert response.status_code == 403, did
            assert response.content != secret.read_bytes()


def test_images_need_a_data_root(model) -> None:  # noqa: ANN001
    index = VectorIndex(model.dim)
    index.add(["1:1"], np.eye(1, model.dim, dtype=np.float32),
              [{"did": "1:1", "txt": None, "img_path": "a.png", "modality": "image", "src_content": None}])
    with make_client(model, index) as c:
        assert c.get("/images/1:1").status_code == 404
        assert c.get("/instructions").json() == {"instructions": []}


# ------------------------------------------------------------------------------------------ instructions
def test_instructions_come_from_the_dataset_tsv(client: TestClient) -> None:
    choices = client.get("/instructions").json()["instructions"]
    keys = {(c["dataset_id"], c["query_modality"], c["cand_modality"]) for c in choices}
    assert keys == {("1", "text", "image"), ("1", "image", "text"), ("1", "image,text", "image")}
    assert all(len(c["prompts"]) == 2 and c["dataset"] == "tiny" for c in choices)


# ------------------------------------------------------------------------------------------ auth & CORS
@pytest.mark.parametrize("request_", [("post", "/search", {"json": {"text": "x"}}),
                                      ("post", "/v1/embeddings", {"json": {"input": "x"}}),
                                      ("get", "/images/1:1", {}), ("get", "/instructions", {})])
def test_api_key_is_required_when_configured(model, index, request_) -> None:  # noqa: ANN001
    method, path, kwargs = request_
    with make_client(model, index, api_key="s3cret") as c:
        missing = getattr(c, method)(path, **kwargs)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert error_of(missing)["type"] == "authentication_error"
        assert getattr(c, method)(path, headers={"X-API-Key": "wrong"}, **kwargs).status_code == 401
        assert getattr(c, method)(path, headers={"Authorization": "Bearer nope"}, **kwargs).status_code == 401
        assert getattr(c, method)(path, headers={"X-API-Key": "s3cret"}, **kwargs).status_code == 200
        assert getattr(c, method)(path, headers={"Authorization": "Bearer s3cret"}, **kwargs).status_code == 200


def test_health_and_page_stay_public_with_a_key(model, index) -> None:  # noqa: ANN001
    with make_client(model, index, api_key="s3cret") as c:
        assert c.get("/health").json()["auth"] is True
        assert c.get("/").status_code == 200


def test_cors_is_off_by_default(client: TestClient) -> None:
    response = client.post("/search", json={"text": "x"}, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers
    preflight = client.options("/search", headers={"Origin": "https://evil.example",
                                                   "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_allows_only_configured_origins(model, index) -> None:  # noqa: ANN001
    with make_client(model, index, cors_origins=["https://app.example"]) as c:
        ok = c.options("/search", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                           "Access-Control-Request-Headers": "x-api-key"})
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        other = c.post("/search", json={"text": "x"}, headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


# ------------------------------------------------------------------------------------------ construction
def test_model_and_index_dimensions_must_agree(index: VectorIndex) -> None:
    with pytest.raises(ConfigError, match="dimensions"):
        create_app(ToyEncoder(ToyConfig(embed_dim=index.dim + 1)), index)


def test_model_errors_become_422(model, index) -> None:  # noqa: ANN001
    class Broken(ToyEncoder):
        arch = ""

        def embed(self, items):  # noqa: ANN001, ANN202
            from jfe.errors import DataError

            raise DataError("cannot embed this", record_id="query")

    with make_client(Broken(), index) as c:
        response = c.post("/search", json={"text": "x"})
        assert response.status_code == 422 and "cannot embed this" in error_of(response)["message"]


# ------------------------------------------------------------------------------------------ OpenAI parity
def word_tokenizer(words: list[str]):  # noqa: ANN201 - a transformers fast tokenizer built offline
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")


class TokenizedToy(ToyEncoder):
    """The toy encoder holding a tokenizer, as HF models do (``model.tokenizer``)."""

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer = word_tokenizer(["a", "red", "circle", "blue", "square", "redness"])


def MatryoshkaToy() -> ToyEncoder:  # noqa: N802 - reads as the class it stands for
    """The toy as a model trained with a Matryoshka loss would declare itself (its config's matryoshka_dims)."""
    from jfe.models.toy import ToyConfig

    return ToyEncoder(ToyConfig(matryoshka_dims=[8, 16]))


def test_tokenizer_of_finds_hf_and_tower_tokenizers_and_none_for_the_toy(model, monkeypatch) -> None:  # noqa: ANN001
    from jfe.models import text as text_module
    from jfe.models.tokens import supports_matryoshka, tokenizer_of

    assert tokenizer_of(model) is None and not supports_matryoshka(model)
    toy = TokenizedToy()
    assert tokenizer_of(toy) is toy.tokenizer  # HF models hold ``model.tokenizer``
    assert supports_matryoshka(MatryoshkaToy())
    tower_model = ToyEncoder()
    tower_model.text = text_module.TextTower.__new__(text_module.TextTower)  # only its type matters: no weights
    monkeypatch.setattr(text_module, "load_tokenizer", lambda path=None: "minilm-tokenizer")
    assert tokenizer_of(tower_model) == "minilm-tokenizer"  # tower models share the MiniLM tokenizer


def test_token_array_inputs_decode_with_the_model_tokenizer(index) -> None:  # noqa: ANN001
    toy = TokenizedToy()
    ids = toy.tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    other = toy.tokenizer("blue square", add_special_tokens=False)["input_ids"]
    expected = toy.encode([Item(text="a red circle"), Item(text="blue square")])
    with make_client(toy, index) as c:
        single = c.post("/v1/embeddings", json={"input": ids}).json()  # a list of ints: one input
        assert len(single["data"]) == 1
        np.testing.assert_allclose(single["data"][0]["embedding"], expected[0], atol=1e-6)
        several = c.post("/v1/embeddings", json={"input": [ids, other, "a red circle"]}).json()
        got = np.array([d["embedding"] for d in several["data"]])
        np.testing.assert_allclose(got, np.stack([expected[0], expected[1], expected[0]]), atol=1e-6)
        assert several["usage"]["prompt_tokens"] == len(ids) + len(other) + 3
        outside = c.post("/v1/embeddings", json={"input": [ids[0], 10_000]})
        assert outside.status_code == 400 and "10000" in error_of(outside)["message"]


def test_usage_counts_tokenizer_tokens_not_words(index) -> None:  # noqa: ANN001
    toy = TokenizedToy()
    with make_client(toy, index) as c:
        # WordLevel + Whitespace splits punctuation: 4 tokens for 3 words
        usage = c.post("/v1/embeddings", json={"input": "a red circle!", "instruction": "find it"}).json()["usage"]
        assert usage == {"prompt_tokens": 4, "total_tokens": 4, "images": 0}


def test_usage_counts_words_without_a_tokenizer(client: TestClient) -> None:
    usage = client.post("/v1/embeddings", json={"input": ["a red circle!", "blue"]}).json()["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] == 4


def test_model_field_names_the_served_model_or_is_a_404(client: TestClient, index) -> None:  # noqa: ANN001
    served = index.meta["model"]
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list" and [(m["id"], m["object"]) for m in listed["data"]] == [(served, "model")]
    assert isinstance(listed["data"][0]["created"], int) and listed["data"][0]["owned_by"] == "jfe"
    assert client.post("/v1/embeddings", json={"input": "x", "model": served}).json()["model"] == served
    assert client.post("/v1/embeddings", json={"input": "x"}).json()["model"] == served
    # as OpenAI answers a model it does not have (an echo would let the client believe it got that model)
    for response in (client.post("/v1/embeddings", json={"input": "x", "model": "text-embedding-3-small"}),
                     client.post("/v1/embeddings", data={"input": "x", "model": "m2"})):
        assert response.status_code == 404
        error = error_of(response)
        assert (error["code"], error["param"], error["type"]) == ("model_not_found", "model", "invalid_request_error")
        assert served in error["message"] and "/v1/models" in error["message"]


def test_models_list_needs_the_key_like_the_other_api_routes(model, index) -> None:  # noqa: ANN001
    with make_client(model, index, api_key="s3cret") as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_openai_input_limit_is_the_default() -> None:
    assert ServeSettings().max_inputs == 2048


def test_dimensions_below_the_dim_needs_a_matryoshka_model(client: TestClient, index) -> None:  # noqa: ANN001
    refused = client.post("/v1/embeddings", json={"input": "x", "dimensions": 8})
    assert refused.status_code == 400
    message = error_of(refused)["message"]
    assert "Matryoshka" in message and index.meta["model"] in message


def test_dimensions_truncates_and_renormalises_matryoshka_models(index) -> None:  # noqa: ANN001
    toy = MatryoshkaToy()
    full = toy.encode([Item(text="a red circle")])[0]
    with make_client(toy, index) as c:
        body = c.post("/v1/embeddings", json={"input": "a red circle", "dimensions": 8}).json()
        vec = np.array(body["data"][0]["embedding"])
        assert vec.shape == (8,)
        np.testing.assert_allclose(vec, full[:8] / np.linalg.norm(full[:8]), atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(vec), 1.0, atol=1e-6)
        same = c.post("/v1/embeddings", json={"input": "a red circle", "dimensions": index.dim}).json()
        np.testing.assert_allclose(same["data"][0]["embedding"], full, atol=1e-6)
        assert c.post("/v1/embeddings", json={"input": "x", "dimensions": index.dim + 1}).status_code == 400


def test_openapi_declares_the_api_key_security_schemes(client: TestClient, model, index) -> None:  # noqa: ANN001
    spec = client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["HTTPBearer"] == {"type": "http", "scheme": "bearer", "description": schemes["HTTPBearer"][
        "description"]}
    assert schemes["APIKeyHeader"]["type"] == "apiKey" and schemes["APIKeyHeader"]["name"] == "X-API-Key"
    for path, method in [("/v1/embeddings", "post"), ("/search", "post"), ("/instructions", "get"),
                         ("/images/{did}", "get")]:
        assert {"HTTPBearer": []} in spec["paths"][path][method]["security"], path
        assert {"APIKeyHeader": []} in spec["paths"][path][method]["security"], path
    assert "security" not in spec["paths"]["/health"]["get"]
    with make_client(model, index, api_key="s3cret") as c:  # the declared schemes are the ones enforced
        assert c.post("/v1/embeddings", json={"input": "x"}).status_code == 401
        ok = {"Authorization": "bearer s3cret"}
        assert c.post("/v1/embeddings", json={"input": "x"}, headers=ok).status_code == 200
        assert c.post("/v1/embeddings", json={"input": "x"}, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.post("/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Basic s3cret"}
                      ).status_code == 401


@pytest.mark.assets
def test_token_ids_and_usage_with_the_real_minilm_tokenizer(index) -> None:  # noqa: ANN001
    """The tokenizer jfe-mini serves with (MiniLM WordPiece): sub-word ids decode back to the text."""
    from jfe.models.text import load_tokenizer

    toy = ToyEncoder()
    toy.tokenizer = load_tokenizer()
    text = "a glittering octahedron"
    ids = toy.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # WordPiece splits "octahedron": tokens are not words
    with make_client(toy, index) as c:
        body = c.post("/v1/embeddings", json={"input": [ids]}).json()
        np.testing.assert_allclose(body["data"][0]["embedding"], toy.encode([Item(text=text)])[0], atol=1e-6)
        assert body["usage"]["prompt_tokens"] == len(ids)
        assert c.post("/v1/embeddings", json={"input": text}).json()["usage"]["prompt_tokens"] == len(ids)


def test_the_official_openai_client_talks_to_the_service(model, index) -> None:  # noqa: ANN001
    """OpenAI's own Python client, pointed at the service: models.list, embeddings, and its error classes."""
    import openai

    with make_client(model, index) as c:
        client = openai.OpenAI(base_url=f"{c.base_url}/v1", api_key="unused", http_client=c, max_retries=0)
        served = [m.id for m in client.models.list().data]
        assert served == [index.meta["model"]]
        assert client.models.retrieve(served[0]).id == served[0]
        response = client.embeddings.create(model=served[0], input=["a red circle", "a blue square"])
        assert [d.index for d in response.data] == [0, 1] and len(response.data[0].embedding) == index.dim
        np.testing.assert_allclose(response.data[0].embedding, model.encode([Item(text="a red circle")])[0],
                                   atol=1e-6)
        assert len(client.embeddings.create(model=served[0], input=["x"] * 2048).data) == 2048  # OpenAI's limit
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="text-embedding-3-small", input="a red circle")
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("text-embedding-3-small")
        with pytest.raises(openai.BadRequestError) as bad:
            client.embeddings.create(model=served[0], input=[])
        assert bad.value.status_code == 400
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model=served[0], input="a red circle", dimensions=index.dim + 1)
