"""Generated garbage against every reader a user's file or request reaches: a clear error or success, never a
traceback from inside JFE, never a 5xx (property-based, hypothesis)."""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jfe.data.items import read_items
from jfe.data.mbeir import iter_candidates, iter_queries, read_instructions, read_qrels
from jfe.data.validate import KINDS, validate_dataset
from jfe.errors import DataError
from jfe.indexing import build_index
from jfe.serve.app import create_app
from jfe.serve.schemas import ServeSettings

# text with lone surrogates, control characters, path tricks and the field values the readers switch on
texts = st.one_of(st.text(max_size=30), st.sampled_from(["", " ", "\ud800", "../x.png", "/etc/hostname", "1:1",
                                                         "image", "text", "image,text", "data:image/png;base64,AA"]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(texts, inner, max_size=4)), max_leaves=12)
QUERY_KEYS = ["qid", "query_txt", "query_img_path", "query_modality", "query_src_content", "pos_cand_list",
              "neg_cand_list", "task_id"]
CAND_KEYS = ["did", "txt", "img_path", "modality", "src_content"]


def records(keys: list[str]) -> st.SearchStrategy:
    """Objects shaped like records (known keys, any values) - closer to real mistakes than random dicts."""
    return st.dictionaries(st.sampled_from(keys), json_values, max_size=len(keys))


def _line(value: object) -> bytes:
    try:
        return json.dumps(value).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return b"{"


lines = st.one_of(st.binary(max_size=40), json_values.map(_line), records(QUERY_KEYS).map(_line),
                  records(CAND_KEYS).map(_line))


@settings(max_examples=150, deadline=None)
@given(content=st.lists(lines, max_size=6))
def test_readers_raise_only_data_errors(content: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.jsonl"
        path.write_bytes(b"\n".join(content))
        for reader in (iter_queries, iter_candidates, read_items):
            try:
                list(reader(path))
            except DataError as exc:
                assert str(path) in str(exc)  # the error names the file
        for reader in (read_qrels, read_instructions):
            with contextlib.suppress(DataError):
                reader(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(queries=st.lists(lines, max_size=4), pool=st.lists(lines, max_size=4), qrels=st.binary(max_size=60),
       tsv=st.binary(max_size=60))
def test_validate_reports_every_garbage_as_problems(queries: list[bytes], pool: list[bytes], qrels: bytes,
                                                    tsv: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = {"query/test/mbeir_x_task1_test.jsonl": b"\n".join(queries),
                 "cand_pool/local/mbeir_x_task1_cand_pool.jsonl": b"\n".join(pool),
                 "qrels/test/mbeir_x_task1_test_qrels.txt": qrels, "instructions/query_instructions.tsv": tsv}
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        problems = validate_dataset(root)
        assert all(p.kind in KINDS for p in problems)


# ------------------------------------------------------------------------------------------ HTTP
@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from conftest import build_tiny_mbeir
    from test_serve import TokenizedToy  # a tokenizer counts usage and decodes token ids, as real models do

    root = build_tiny_mbeir(tmp_path_factory.mktemp("fuzz") / "tiny")
    model = TokenizedToy()
    index = build_index(model, sorted((root / "cand_pool" / "global").glob("*.jsonl")), root, progress=False)
    with TestClient(create_app(model, index, ServeSettings()), raise_server_exceptions=False) as test_client:
        yield test_client


SEARCH_KEYS = ["text", "image", "instruction", "k"]
EMBED_KEYS = ["input", "model", "instruction", "encoding_format", "dimensions", "user"]
content_parts = st.lists(st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
                                   st.fixed_dictionaries({"type": st.just("image_url"),
                                                          "image_url": st.fixed_dictionaries({"url": texts})}),
                                   json_values), max_size=3)
bodies = st.one_of(records(SEARCH_KEYS), records(EMBED_KEYS), json_values,
                   st.fixed_dictionaries({"input": st.one_of(st.lists(st.one_of(texts, content_parts,
                                                                                st.lists(st.integers(-5, 10**6),
                                                                                         max_size=3)),
                                                                      max_size=3), texts)}))


def _assert_json_answer(response) -> None:  # noqa: ANN001
    assert response.status_code < 500, (response.status_code, response.text[:200])
    payload = response.json()
    if response.status_code >= 400:
        assert set(payload["error"]) == {"message", "type", "param", "code"}  # OpenAI's error object
        # the status, or OpenAI's string code where it names one (a model this service does not serve)
        assert payload["error"]["code"] == response.status_code or \
            (response.status_code, payload["error"]["code"]) == (404, "model_not_found")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, path=st.sampled_from(["/search", "/v1/embeddings"]))
def test_json_garbage_never_gets_a_5xx(client: TestClient, body: object, path: str) -> None:
    raw = json.dumps(body).encode("utf-8", "surrogatepass")  # lone surrogates travel as \\ud800 escapes
    _assert_json_answer(client.post(path, content=raw, headers={"Content-Type": "application/json"}))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=200), st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
                    st.integers(1, 3000).map(lambda n: b'{"input": ' + b"[" * n + b"]" * n + b"}")),
       ctype=st.sampled_from(["application/json", "", "multipart/form-data",
                                                           "multipart/form-data; boundary=x", "text/plain",
                                                           "application/x-www-form-urlencoded"]),
       path=st.sampled_from(["/search", "/v1/embeddings"]))
def test_byte_garbage_never_gets_a_5xx(client: TestClient, raw: bytes, ctype: str, path: str) -> None:
    _assert_json_answer(client.post(path, content=raw, headers={"Content-Type": ctype} if ctype else {}))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.dictionaries(st.sampled_from(["text", "input", "instruction", "k", "encoding_format", "model",
                                               "image", "other"]), texts.filter(lambda t: "\ud800" not in t),
                              max_size=5),
       files=st.lists(st.binary(max_size=64), max_size=2), path=st.sampled_from(["/search", "/v1/embeddings"]))
def test_form_garbage_never_gets_a_5xx(client: TestClient, fields: dict, files: list[bytes], path: str) -> None:
    uploads = [("image", (f"f{i}.png", data, "image/png")) for i, data in enumerate(files)]
    _assert_json_answer(client.post(path, data=fields, files=uploads or None))
