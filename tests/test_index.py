"""VectorIndex: search against brute force, ties, exclude, remove, persistence, factories; build and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from jfe.errors import ConfigError, DataError
from jfe.index import VectorIndex
from jfe.indexing import build_index
from jfe.models.toy import ToyEncoder


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(pool: np.ndarray, ids: list[str], queries: np.ndarray, k: int) -> list[list[str]]:
    scores = queries @ pool.T
    return [[ids[j] for j in np.argsort(-row, kind="stable")[:k]] for row in scores]


@pytest.fixture
def filled() -> tuple[VectorIndex, np.ndarray, list[str], np.ndarray]:
    rng = np.random.default_rng(0)
    pool, queries = _unit(rng, 300, 16), _unit(rng, 25, 16)
    ids = [f"7:{i}" for i in range(300)]
    index = VectorIndex(16, meta={"model": "toy"})
    index.add(ids, pool, [{"did": d, "txt": f"text {d}", "img_path": None, "modality": "text"} for d in ids])
    return index, pool, ids, queries


def test_flat_search_matches_brute_force(filled) -> None:
    index, pool, ids, queries = filled
    got, scores = index.search(queries, 10)
    assert got == _brute(pool, ids, queries, 10)
    expected = np.sort(queries @ pool.T, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    assert scores.dtype == np.float32 and scores.shape == (25, 10)
    assert len(index) == 300 and "7:3" in index and "7:300" not in index
    assert index.record("7:5")["txt"] == "text 7:5" and index.record("nope") is None


def test_ties_rank_in_insertion_order() -> None:
    index = VectorIndex(2)
    same = np.tile(np.array([[1.0, 0.0]], dtype=np.float32), (5, 1))
    index.add(["b", "a", "d", "c", "e"], same)
    index.add(["z"], np.array([[0.0, 1.0]], dtype=np.float32))
    ids, scores = index.search(np.array([[1.0, 0.0]], dtype=np.float32), 3)
    assert ids == [["b", "a", "d"]]
    assert np.all(scores == 1.0)
    ids, _ = index.search(np.array([[1.0, 0.0]], dtype=np.float32), 6)
    assert ids == [["b", "a", "d", "c", "e", "z"]]


def test_exclude_filters_and_still_returns_k(filled) -> None:
    index, pool, ids, queries = filled
    full, _ = index.search(queries[:3], 5)
    exclude = [set(full[0][:2]), set(), {full[2][0], "not-in-index"}]
    got, scores = index.search(queries[:3], 5, exclude=exclude)
    assert got[0] == full[0][2:] + _brute(pool, ids, queries[:1], 7)[0][5:7]
    assert got[1] == full[1]
    assert got[2][:4] == full[2][1:] and full[2][0] not in got[2]
    assert all(len(row) == 5 for row in got) and np.isfinite(scores).all()


def test_batched_numpy_path_equals_single_query_faiss_path(filled) -> None:
    index, pool, ids, queries = filled
    index.remove(ids[:50])  # the numpy path must map storage rows to ids correctly after removals
    exclude = [set(_brute(pool, ids, queries[i:i + 1], 60)[0][50 + i % 3:53 + i % 3]) for i in range(len(queries))]
    batch_ids, batch_scores = index.search(queries, 7, exclude=exclude)  # >= 16 queries: numpy path
    for i in range(len(queries)):
        one_ids, one_scores = index.search(queries[i:i + 1], 7, exclude=exclude[i:i + 1])  # faiss path
        assert batch_ids[i] == one_ids[0] and not set(batch_ids[i]) & (exclude[i] | set(ids[:50]))
        np.testing.assert_allclose(batch_scores[i], one_scores[0], rtol=1e-5, atol=1e-6)


def test_remove_really_removes(filled) -> None:
    index, pool, ids, queries = filled
    top = index.search(queries[:1], 1)[0][0][0]
    assert index.remove([top, top, "unknown"]) == 1
    assert top not in index and len(index) == 299 and index.record(top) is None
    got, _ = index.search(queries[:1], 299)
    assert top not in got[0] and len(got[0]) == 299
    # re-adding under the same id goes to the end of the insertion order and is findable again
    index.add([top], pool[ids.index(top)][None])
    assert index.search(queries[:1], 1)[0][0][0] == top and len(index) == 300


def test_add_replaces_existing_id(filled) -> None:
    index, pool, ids, queries = filled
    index.add(["7:0"], queries[:1])
    assert len(index) == 300
    assert index.search(queries[:1], 1)[0][0] == ["7:0"]


def test_save_load_roundtrip_identical(filled, tmp_path: Path) -> None:
    index, pool, ids, queries = filled
    index.remove(["7:10", "7:11"])
    before = index.search(queries, 20, exclude=[{"7:1"}] * len(queries))
    index.save(tmp_path / "idx")
    loaded = VectorIndex.load(tmp_path / "idx")
    after = loaded.search(queries, 20, exclude=[{"7:1"}] * len(queries))
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1], after[1])
    assert loaded.meta["model"] == "toy" and len(loaded) == 298 and loaded.record("7:3") == index.record("7:3")
    assert loaded.ids == index.ids
    # the loaded index keeps working: adds get fresh ids, no collision with the saved ones
    loaded.add(["new"], queries[:1])
    assert loaded.search(queries[:1], 1)[0] == [["new"]]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_short_pool_pads_scores(filled) -> None:
    index = VectorIndex(3)
    index.add(["a", "b"], np.eye(3, dtype=np.float32)[:2])
    ids, scores = index.search(np.eye(3, dtype=np.float32)[:1], 5)
    assert ids == [["a", "b"]]
    assert scores[0, 0] == 1.0 and np.isneginf(scores[0, 2:]).all()
    empty = VectorIndex(3)
    assert empty.search(np.eye(3, dtype=np.float32)[:2], 4)[0] == [[], []]


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW16"])
def test_factories(factory: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pool = _unit(rng, 400, 8)
    ids = [str(i) for i in range(400)]
    index = VectorIndex(8, factory=factory)
    index.add(ids, pool)
    assert index.is_trained
    # querying with a stored vector finds itself first (IVF probes the query's own list)
    got, scores = index.search(pool[:20], 3)
    assert [row[0] for row in got] == ids[:20]
    assert np.allclose(scores[:, 0], 1.0, atol=1e-4)
    index.save(tmp_path / factory)
    assert VectorIndex.load(tmp_path / factory).search(pool[:20], 3)[0] == got


def test_ivf_nprobe_is_kept(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    pool, queries = _unit(rng, 2000, 16), _unit(rng, 50, 16)
    ids = [str(i) for i in range(2000)]
    index = VectorIndex(16, factory="IVF32,Flat")
    index.add(ids, pool)
    exact = _brute(pool, ids, queries, 5)
    coarse = index.search(queries, 5)[0]
    index.set_search_param("nprobe", 32)  # all lists: exhaustive, so exact
    assert index.search(queries, 5)[0] == exact
    assert coarse != exact  # one probed list misses some true neighbours on random data
    index.save(tmp_path / "ivf")
    assert VectorIndex.load(tmp_path / "ivf").search(queries, 5)[0] == exact
    with pytest.raises(ConfigError, match="parameter"):
        VectorIndex(4).set_search_param("nprobe", 3)


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ConfigError, match="factory"):
        VectorIndex(8, factory="NoSuchIndex")
    index = VectorIndex(4)
    with pytest.raises(DataError, match=r"shape \[n, 4\]"):
        index.add(["a"], np.zeros((1, 5), dtype=np.float32))
    with pytest.raises(DataError, match="duplicate"):
        index.add(["a", "a"], np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(DataError, match="NaN"):
        index.add(["a"], np.full((1, 4), np.nan, dtype=np.float32))
    with pytest.raises(ConfigError, match="train"):
        VectorIndex(4, factory="IVF64,Flat").add(["a", "b"], np.eye(4, dtype=np.float32)[:2])


def test_load_rejects_non_index(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a JFE index"):
        VectorIndex.load(tmp_path)


# ------------------------------------------------------------------------------------------------ build + CLI


def test_build_index_from_pools(tiny_mbeir: Path) -> None:
    local = sorted((tiny_mbeir / "cand_pool" / "local").glob("*.jsonl"))
    model = ToyEncoder()
    index = build_index(model, local, tiny_mbeir, progress=False, model_name="toy")
    assert len(index) == 8  # task0 and task7 pools share 1:1-1:4: each did embedded and stored once
    assert index.meta["data_root"] == str(tiny_mbeir.resolve()) and index.meta["model"] == "toy"
    assert index.record("1:5")["txt"] == "A red square"
    assert index.record("1:1")["img_path"] == "images/tiny/red_square.png"  # stays relative, as in M-BEIR
    vec = model.encode([{"text": "A red square"}])
    assert index.search(vec, 1)[0] == [["1:5"]]


def test_bad_pool_line_names_file_and_line_and_writes_nothing(tiny_mbeir: Path, tmp_path: Path) -> None:
    good = tiny_mbeir / "cand_pool" / "local" / "mbeir_tiny_task3_cand_pool.jsonl"
    bad = tmp_path / "bad_pool.jsonl"
    lines = good.read_text().splitlines()
    lines.insert(2, '{"did": "1:99", "txt": "x", "img_path": null, "modality": "video"}')
    bad.write_text("\n".join(lines) + "\n")
    model_dir = ToyEncoder().save_pretrained(tmp_path / "toy")
    out = tmp_path / "indexes" / "idx"
    from jfe.cli import app

    result = CliRunner().invoke(app, ["index", "build", "--model", str(model_dir), "--pool", f"{good},{bad}",
                                      "--data-root", str(tiny_mbeir), "--out", str(out), "--no-progress"])
    assert isinstance(result.exception, DataError)
    assert f"{bad}:3" in str(result.exception) and "1:99" in str(result.exception)
    assert not out.exists()
    assert not (tmp_path / "indexes").exists() or not list((tmp_path / "indexes").iterdir())


def test_cli_build_and_search(tiny_mbeir: Path, tmp_path: Path) -> None:
    from jfe.cli import app

    model_dir = ToyEncoder().save_pretrained(tmp_path / "toy")
    pools = ",".join(str(p) for p in sorted((tiny_mbeir / "cand_pool" / "local").glob("*.jsonl")))
    out = tmp_path / "idx"
    runner = CliRunner()
    result = runner.invoke(app, ["index", "build", "--model", str(model_dir), "--pool", pools,
                                 "--data-root", str(tiny_mbeir), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert VectorIndex.load(out).meta["model"] == str(model_dir)

    result = runner.invoke(app, ["search", "--index", str(out), "--text", "A blue circle", "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [h["rank"] for h in payload["hits"]] == [1, 2, 3]
    assert payload["hits"][0]["did"] == "1:8" and payload["hits"][0]["text"] == "A blue circle"
    assert payload["hits"][0]["score"] >= payload["hits"][1]["score"]

    image = tiny_mbeir / "images" / "tiny" / "red_square.png"
    result = runner.invoke(app, ["search", "--index", str(out), "--image", str(image), "-k", "2"])
    assert result.exit_code == 0, result.output
    assert "1:1" in result.stdout and "images/tiny/red_square.png" in result.stdout  # the image finds itself
