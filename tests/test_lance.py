"""LanceDB as an index store (`jfe index build --store lancedb`) and JFE in LanceDB's embedding registry, with the
real lancedb package (nothing mocked): the same results as a faiss Flat index, searched by `jfe search`,
`jfe.search` and `jfe serve`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import jfe
from jfe.cli import app
from jfe.errors import ConfigError, DataError
from jfe.index.build import index_vectors
from jfe.index.lance import LANCE_FILE, LanceIndex
from jfe.index.shards import load_index
from jfe.models.toy import ToyEncoder


def _unit(rows: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_lancedb_flat_ranks_as_faiss_flat_with_ties_and_exclusions(tmp_path: Path) -> None:
    vectors = _unit(600, 24, 0)
    vectors[[10, 30]] = vectors[20]  # three equal vectors: ties rank in pool order
    ids = [f"9:{i}" for i in range(600)]
    lance = LanceIndex.write(tmp_path / "lance", ids, vectors, [{"did": d} for d in ids])
    faiss = index_vectors(ids, vectors, None, recall_queries=0)
    rng = np.random.default_rng(1)
    queries = vectors[:80] + 0.05 * rng.standard_normal((80, 24)).astype(np.float32)
    queries[0] = vectors[20]
    exclude = [{"9:20"}] + [set(rng.choice(ids, 4).tolist()) for _ in range(79)]
    for k in (1, 10, 37):
        got_ids, got_scores = lance.search(queries, k, exclude=exclude)
        want_ids, want_scores = faiss.search(queries, k, exclude=exclude)
        assert got_ids == want_ids
        np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    assert lance.search(queries[:1], 3)[0][0] == ["9:10", "9:20", "9:30"]
    assert lance.meta["recall"]["value"] == 1.0  # measured at build, as for faiss
    short_ids, short_scores = lance.search(queries[:1], 700)  # more than the pool: padded as faiss pads
    assert len(short_ids[0]) == 600 and np.isneginf(short_scores[0, 600:]).all()
    again = load_index(tmp_path / "lance")  # the one door loads it
    assert isinstance(again, LanceIndex) and len(again) == 600 and "9:7" in again
    assert again.record("9:7") == {"did": "9:7"} and again.record("nope") is None


def test_lancedb_ann_index_records_its_recall(tmp_path: Path) -> None:
    vectors = _unit(2000, 32, 2)
    ids = [str(i) for i in range(2000)]
    index = LanceIndex.write(tmp_path / "ivf", ids, vectors, None, factory="ivf_pq")
    info = json.loads((tmp_path / "ivf" / LANCE_FILE).read_text())
    assert info["factory"] == "IVF_PQ" and info["search_params"] == {"nprobes": 32, "refine_factor": 10}
    assert 0.5 < index.meta["recall"]["value"] <= 1.0
    found, _ = index.search(vectors[:5], 10)
    assert [row[0] for row in found] == ids[:5]  # each vector finds itself first (refined by exact scores)
    with pytest.raises(ConfigError, match="Flat, IVF_PQ or IVF_HNSW_SQ|Flat, IVF_PQ, IVF_HNSW_SQ"):
        LanceIndex.write(tmp_path / "bad", ids, vectors, None, factory="HNSW32")
    with pytest.raises(ConfigError, match="search parameters"):
        LanceIndex.write(tmp_path / "bad", ids, vectors, None, search_params={"efSearch": 64})
    assert not (tmp_path / "bad").exists()


def test_cli_builds_a_lancedb_index_that_search_and_serve_read(tiny_mbeir: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from jfe.serve.app import create_app
    from jfe.serve.schemas import ServeSettings

    model_dir = ToyEncoder().save_pretrained(tmp_path / "toy")
    pools = [str(p) for p in sorted((tiny_mbeir / "cand_pool" / "local").glob("*.jsonl"))]
    runner = CliRunner()
    common = ["--model", str(model_dir), "--pool", ",".join(pools), "--data-root", str(tiny_mbeir), "--no-progress"]
    result = runner.invoke(app, ["index", "build", *common, "--out", str(tmp_path / "lance"), "--store", "lancedb"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["index", "build", *common, "--out", str(tmp_path / "faiss")])
    assert result.exit_code == 0, result.output
    lance, faiss = load_index(tmp_path / "lance"), load_index(tmp_path / "faiss")
    assert isinstance(lance, LanceIndex) and lance.meta["store"] == "lancedb" and lance.meta["model"] == str(model_dir)
    for query in ("A blue circle", "a red square", {"text": "same but blue", "image": tiny_mbeir / "images" / "tiny"
                                                    / "red_square.png"}):
        got = jfe.search(tmp_path / "lance", query, k=4)
        want = jfe.search(tmp_path / "faiss", query, k=4)
        assert [h["did"] for h in got] == [h["did"] for h in want]
        np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in want], atol=1e-5)
    assert lance.record(got[0]["did"]) == faiss.record(got[0]["did"])  # records come back from the table
    assert got[0].get("modality") == want[0].get("modality")
    result = runner.invoke(app, ["search", "--index", str(tmp_path / "lance"), "--text", "A blue circle", "-k", "3",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["hits"][0]["did"] == "1:8"
    with TestClient(create_app(jfe.load_model(model_dir), lance, ServeSettings())) as client:
        hits = client.post("/search", json={"text": "A blue circle", "k": 2}).json()["results"]
        assert [h["did"] for h in hits] == [h["did"] for h in jfe.search(tmp_path / "faiss", "A blue circle", k=2)]


def test_lancedb_build_refuses_what_it_cannot_do_before_encoding(tiny_mbeir: Path, tmp_path: Path) -> None:
    pools = sorted((tiny_mbeir / "cand_pool" / "local").glob("*.jsonl"))
    from jfe.indexing import write_index

    with pytest.raises(ConfigError, match="--shards"):
        write_index(tmp_path / "a", "toy", pools, tiny_mbeir, store="lancedb", shards=2, progress=False)
    with pytest.raises(ConfigError, match="unknown index store"):
        write_index(tmp_path / "a", "toy", pools, tiny_mbeir, store="qdrant", progress=False)
    with pytest.raises(ConfigError, match="IVF_PQ"):
        write_index(tmp_path / "a", "toy", pools, tiny_mbeir, store="lancedb", factory="IVF64,Flat", progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError):
        write_index(tmp_path / "mine", "toy", pools, tiny_mbeir, store="lancedb", progress=False)
    assert (tmp_path / "mine" / "keep.txt").read_text() == "mine" and not (tmp_path / "a").exists()
    # a damaged manifest is named
    index_dir = tmp_path / "ok"
    write_index(index_dir, "toy", pools, tiny_mbeir, store="lancedb", progress=False)
    manifest = json.loads((index_dir / LANCE_FILE).read_text())
    (index_dir / LANCE_FILE).write_text(json.dumps({**manifest, "size": 3}))
    with pytest.raises(DataError, match="says 3 vectors"):
        load_index(index_dir)


def test_the_lancedb_embedding_registry_embeds_rows_and_queries_with_jfe(tmp_path: Path) -> None:
    import lancedb
    from lancedb.embeddings import get_registry
    from lancedb.pydantic import LanceModel, Vector

    import jfe.lance_embeddings  # noqa: F401 - registers "jfe"
    from conftest import drawn_image

    model_dir = str(ToyEncoder().save_pretrained(tmp_path / "toy"))
    embed = get_registry().get("jfe").create(model=model_dir, source="image", precision="fp32")

    class Photo(LanceModel):
        image: str = embed.SourceField()
        vector: Vector(embed.ndims()) = embed.VectorField()  # type: ignore[valid-type]

    paths = []
    for i in range(4):
        drawn_image(i).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    table = lancedb.connect(str(tmp_path / "db")).create_table("photos", schema=Photo)
    table.add([{"image": p} for p in paths])
    stored = np.stack(table.to_pandas()["vector"].to_list())
    expected = jfe.encode([Path(p) for p in paths], model=model_dir, precision="fp32")
    np.testing.assert_allclose(stored, expected, atol=1e-5)
    # a reopened table embeds its queries itself, with the settings stored in its schema
    reopened = lancedb.connect(str(tmp_path / "db")).open_table("photos")
    hit = reopened.search(drawn_image(2)).limit(1).to_list()[0]
    assert hit["image"] == paths[2]
    text_hit = reopened.search("a red heart").limit(4).to_list()
    assert len(text_hit) == 4
    # LanceDB wraps the embedding function's errors in its own; JFE's message (file, row) is kept inside
    with pytest.raises(Exception, match="missing.png, record 'added row #1': image file not found"):
        table.add([{"image": paths[0]}, {"image": str(tmp_path / "missing.png")}])
    assert table.count_rows() == 4  # nothing half-added
