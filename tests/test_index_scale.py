"""Search at scale: exact top-k vs a plain fp32 reference, ANN factories with recall in meta.json, mmap
loading, atomic builds under injected failures, sharded indexes and Ray encoding (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from jfe.errors import ConfigError, DataError
from jfe.index import VectorIndex
from jfe.index.build import index_vectors, parse_search_params
from jfe.index.exact import Bf16Pool, exact_topk
from jfe.index.shards import ShardedIndex, load_index, split_rows
from jfe.models.toy import ToyEncoder


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(queries: np.ndarray, pool: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ pool.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("chunk_rows", [64, 1000, 32768])
def test_exact_topk_equals_plain_fp32(precision: str, chunk_rows: int) -> None:
    # Small integer entries: every dot product is exact in fp32 whatever the BLAS blocking, so the reference
    # ranking (ties included: lower row first) is unambiguous and the ids must be identical.
    rng = np.random.default_rng(3)
    pool = rng.integers(-3, 4, (2500, 32)).astype(np.float32)
    queries = rng.integers(-3, 4, (40, 32)).astype(np.float32)
    scores, rows = exact_topk(queries, pool, 10, precision=precision, chunk_rows=chunk_rows)
    ref_scores, ref_rows = _reference(queries, pool, 10)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    # random unit vectors: same ids except where two reference scores are closer than fp32 rounding
    unit_pool, unit_q = _unit(rng, 2500, 32), _unit(rng, 40, 32)
    scores, rows = exact_topk(unit_q, unit_pool, 10, precision=precision, chunk_rows=chunk_rows)
    ref_scores, ref_rows = _reference(unit_q, unit_pool, 10)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    full = unit_q @ unit_pool.T
    np.testing.assert_allclose(np.take_along_axis(full, rows, axis=1), ref_scores, atol=1e-6)


def test_bf16_scan_over_a_prepared_copy_equals_fp32_and_rejects_another_pool() -> None:
    rng = np.random.default_rng(5)
    centres = _unit(rng, 8, 48)  # clustered: many near-ties, so the "unsure" fp32 fallback runs too
    pool = centres[rng.integers(0, 8, 5000)] + 0.05 * rng.standard_normal((5000, 48)).astype(np.float32)
    queries = centres[rng.integers(0, 8, 30)] + 0.05 * rng.standard_normal((30, 48)).astype(np.float32)
    prepared = Bf16Pool.of(pool, chunk_rows=700)
    assert len(prepared) == 5000 and prepared.data.dtype.is_floating_point
    ref_scores, ref_rows = exact_topk(queries, pool, 10, precision="fp32", chunk_rows=512)
    for chunk_rows in (16, 512, 8192):  # chunks smaller than the 32 bf16 candidates, and the whole pool
        scores, rows = exact_topk(queries, pool, 10, precision="bf16", chunk_rows=chunk_rows, prepared=prepared)
        np.testing.assert_array_equal(rows, ref_rows)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    with pytest.raises(ValueError, match="5000 rows, the pool 4999"):
        exact_topk(queries, pool[:-1], 10, precision="bf16", prepared=prepared)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_flat_index_batch_search_keeps_its_bf16_copy_in_step(precision: str) -> None:
    rng = np.random.default_rng(6)
    pool, queries = _unit(rng, 300, 16), _unit(rng, 20, 16)
    index = VectorIndex(16, scan_precision=precision)
    index.add([f"d{i}" for i in range(300)], pool)
    ids, _ = index.search(queries, 5)
    ref = np.argsort(-(queries @ pool.T), axis=1, kind="stable")[:, :5]
    assert ids == [[f"d{j}" for j in row] for row in ref]
    assert (index._bf16 is not None) == (precision == "bf16")
    # a new exact copy of each query must now rank first: a stale bf16 copy would not contain it
    index.add([f"q{i}" for i in range(20)], queries)
    assert [row[0] for row in index.search(queries, 5)[0]] == [f"q{i}" for i in range(20)]
    index.remove([f"q{i}" for i in range(20)])
    assert index.search(queries, 5)[0] == ids


def test_exact_topk_ties_memmap_and_short_pool(tmp_path: Path) -> None:
    pool = np.tile(np.eye(4, dtype=np.float32), (50, 1))  # each direction 50 times: ties everywhere
    path = tmp_path / "pool.f32"
    pool.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=pool.shape)
    scores, rows = exact_topk(np.eye(4, dtype=np.float32)[:2], mapped, 5, chunk_rows=7)
    assert rows.tolist() == [[0, 4, 8, 12, 16], [1, 5, 9, 13, 17]]  # equal scores: lower row first
    assert np.all(scores == 1.0)
    scores, rows = exact_topk(np.eye(4, dtype=np.float32)[:1], pool[:2], 4)
    assert rows.tolist() == [[0, 1, -1, -1]] and np.isneginf(scores[0, 2:]).all()


@pytest.mark.parametrize("factory", ["HNSW16", "IVF16,PQ8x4", "OPQ8,IVF16,PQ8x4"])
def test_ann_factory_records_recall_and_params_and_mmaps(factory: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    centres = _unit(rng, 20, 32)
    pool = centres[rng.integers(0, 20, 3000)] + 0.3 * rng.standard_normal((3000, 32)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    ids = [f"9:{i}" for i in range(len(pool))]
    params = {"efSearch": 64} if factory.startswith("HNSW") else {"nprobe": 8}
    index = index_vectors(ids, pool, None, factory=factory, search_params=params, train_sample=2000)
    recall = index.meta["recall"]
    assert recall["k"] == 10 and recall["queries"] == 200 and 0.3 < recall["value"] <= 1.0
    # the recall written is what searching gives: recompute it independently
    sample = pool[np.sort(np.random.default_rng(0).choice(len(pool), 200, replace=False))]
    got = index.search(sample, 10)[0]
    truth = _reference(sample, pool, 10)[1]
    manual = np.mean([len(set(g) & {ids[j] for j in t}) / 10 for g, t in zip(got, truth, strict=True)])
    assert recall["value"] == pytest.approx(manual, abs=1e-4)
    if "PQ" in factory:
        assert index.meta["trained_on"]["vectors"] == 2000
    index.save(tmp_path / "ann")
    meta = json.loads((tmp_path / "ann" / "meta.json").read_text())
    assert meta["search_params"] == params and meta["meta"]["recall"] == recall
    loaded = VectorIndex.load(tmp_path / "ann", mmap=True)
    assert loaded.search(sample, 10)[0] == got


def test_default_search_params_and_parsing() -> None:
    rng = np.random.default_rng(5)
    pool = _unit(rng, 600, 16)
    index = index_vectors([str(i) for i in range(600)], pool, None, factory="IVF8,Flat", recall_queries=50)
    assert index._params == {"nprobe": 32}
    assert index.meta["recall"]["value"] == 1.0  # 32 >= 8 lists probed: exhaustive
    assert parse_search_params(["efSearch=128", "nprobe=4"]) == {"efSearch": 128, "nprobe": 4}
    for bad in ("efSearch", "=3", "nprobe=lots"):
        with pytest.raises(ConfigError, match="NAME=NUMBER"):
            parse_search_params([bad])


def test_flat_index_batched_path_equals_reference() -> None:
    rng = np.random.default_rng(6)
    pool, queries = _unit(rng, 5000, 24), _unit(rng, 64, 24)
    ids = [f"x{i}" for i in range(5000)]
    index = VectorIndex(24)
    index.add(ids, pool)
    got, scores = index.search(queries, 10)
    ref_scores, ref_rows = _reference(queries, pool, 10)
    assert got == [[ids[j] for j in row] for row in ref_rows]
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


# ------------------------------------------------------------------------------------------------ CLI builds


def _pools(tiny_mbeir: Path) -> str:
    return ",".join(str(p) for p in sorted((tiny_mbeir / "cand_pool" / "local").glob("*.jsonl")))


def _build(tiny_mbeir: Path, model_dir: Path, out: Path, *extra: str):  # noqa: ANN202
    from jfe.cli import app

    return CliRunner().invoke(app, ["index", "build", "--model", str(model_dir), "--pool", _pools(tiny_mbeir),
                                    "--data-root", str(tiny_mbeir), "--out", str(out), "--no-progress", *extra])


def test_rejected_factory_names_string_and_writes_nothing(tiny_mbeir: Path, tmp_path: Path) -> None:
    model_dir = ToyEncoder().save_pretrained(tmp_path / "toy")
    out = tmp_path / "indexes" / "idx"
    result = _build(tiny_mbeir, model_dir, out, "--factory", "HNSWxyz,PQ")
    assert isinstance(result.exception, ConfigError) and "'HNSWxyz,PQ'" in str(result.exception)
    assert not out.exists() and not (tmp_path / "indexes").exists()


def test_build_records_compute_precision_and_rejects_unknown(tiny_mbeir: Path, tmp_path: Path) -> None:
    model_dir = ToyEncoder().save_pretrained(tmp_path / "toy")
    for extra, folder in (((), "one"), (("--shards", "2"), "two")):
        assert _build(tiny_mbeir, model_dir, tmp_path / folder, "--precision", "fp32", *extra).exit_code == 0
    assert load_index(tmp_path / "one").meta["precision"] == "fp32"
    assert json.loads((tmp_path / "two" / "shards.json").read_text())["meta"]["precision"] == "fp32"
    result = _build(tiny_mbeir, model_dir, tmp_path / "bad", "--precision", "fp8")
    assert isinstance(result.exception, ConfigError) and "'fp8'" in str(result.exception)
    assert not (tmp_path / "bad").exists()


def test_killed_build_leaves_previous_index_intact(tiny_mbeir: Path, tmp_path: Path, monkeypatch) -> None:
    import faiss

    model_dir = ToyEncoder().save_pretrained(tmp_path / "toy")
    out = tmp_path / "idx"
    assert _build(tiny_mbeir, model_dir, out).exit_code == 0
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    real_write = faiss.write_index

    def dies_mid_write(index, path):  # noqa: ANN001, ANN202 - writes part of the file, then "is killed"
        real_write(index, path)
        Path(path).write_bytes(Path(path).read_bytes()[:20])
        raise KeyboardInterrupt("killed mid-build")

    monkeypatch.setattr(faiss, "write_index", dies_mid_write)
    for extra in ((), ("--shards", "2")):
        result = _build(tiny_mbeir, model_dir, out, "--factory", "HNSW8", *extra)
        assert result.exit_code != 0  # the CLI turns the interrupt into exit status 130
        assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp folders cleaned
    assert len(VectorIndex.load(out)) == 8


def test_shards_merge_equals_one_index_and_missing_shard_is_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    pool, queries = _unit(rng, 900, 16), _unit(rng, 30, 16)
    pool[100] = pool[700]  # an exact tie across shards: the earlier row (shard 0) must rank first
    ids = [f"s{i}" for i in range(900)]
    single = VectorIndex(16)
    single.add(ids, pool)
    shards = []
    for start, stop in split_rows(900, 3):
        shard = VectorIndex(16)
        shard.add(ids[start:stop], pool[start:stop])
        shards.append(shard)
    sharded = ShardedIndex(shards)
    exclude = [{ids[i]} for i in range(30)]
    for q in (queries, queries[:1], pool[700:701]):
        a, b = single.search(q, 12, exclude=exclude[:len(q)]), sharded.search(q, 12, exclude=exclude[:len(q)])
        assert a[0] == b[0]
        np.testing.assert_allclose(a[1], b[1], atol=1e-6)  # BLAS blocking differs with the shard size: 1 ulp
    assert sharded.search(pool[700:701], 2)[0] == [["s100", "s700"]]
    sharded.save(tmp_path / "sh")
    loaded = load_index(tmp_path / "sh", mmap=True)
    assert isinstance(loaded, ShardedIndex) and loaded.search(queries, 12)[0] == single.search(queries, 12)[0]
    import shutil

    shutil.rmtree(tmp_path / "sh" / "shard-00001")
    with pytest.raises(DataError, match="shard 'shard-00001'.*missing"):
        load_index(tmp_path / "sh")


def test_cli_sharded_build_searches_like_single(tiny_mbeir: Path, tmp_path: Path) -> None:
    from jfe.cli import app

    model_dir = ToyEncoder().save_pretrained(tmp_path / "toy")
    assert _build(tiny_mbeir, model_dir, tmp_path / "one").exit_code == 0
    result = _build(tiny_mbeir, model_dir, tmp_path / "two", "--shards", "2")
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "two" / "shards.json").read_text())["shards"]) == 2
    runner = CliRunner()
    hits = [json.loads(runner.invoke(app, ["search", "--index", str(tmp_path / name), "--text", "A blue circle",
                                           "-k", "8", "--json"]).stdout)["hits"] for name in ("one", "two")]
    assert [(h["did"], h["score"]) for h in hits[0]] == [(h["did"], h["score"]) for h in hits[1]]


def test_ray_flag_without_ray_names_the_extra(tiny_mbeir: Path, tmp_path: Path, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    model_dir = ToyEncoder().save_pretrained(tmp_path / "toy")
    result = _build(tiny_mbeir, model_dir, tmp_path / "idx", "--ray", "auto")
    assert isinstance(result.exception, ConfigError) and "ray[data]" in str(result.exception)
    assert not (tmp_path / "idx").exists()


def test_ray_build_equals_single_process(tiny_mbeir: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    model_dir = ToyEncoder().save_pretrained(tmp_path / "toy")
    assert _build(tiny_mbeir, model_dir, tmp_path / "one").exit_code == 0
    assert not ray.is_initialized()
    # what a user types on a machine without a running cluster: --ray auto starts a local one (and stops it)
    result = _build(tiny_mbeir, model_dir, tmp_path / "ray", "--ray", "auto")
    assert result.exit_code == 0, result.output
    assert not ray.is_initialized()
    one, sharded = VectorIndex.load(tmp_path / "one"), load_index(tmp_path / "ray")
    assert isinstance(sharded, ShardedIndex) and len(sharded.shards) == 2 and sharded.ids == one.ids
    # resolved once by the driver and recorded as such: every worker encoded in it, whatever its own hardware
    assert sharded.meta["precision"] == one.meta["precision"] == "fp32"
    queries = np.stack([one.vector(d) for d in one.ids])
    a, b = one.search(queries, 8), sharded.search(queries, 8)
    assert a[0] == b[0]
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)
    for did in one.ids:
        shard = next(s for s in sharded.shards if did in s)
        np.testing.assert_allclose(shard.vector(did), one.vector(did), atol=1e-6)


def test_exact_auto_precision_follows_the_shared_cpu_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    """The index and the models ask one place (jfe.hardware) whether the CPU has native bf16."""
    from jfe.index import exact

    monkeypatch.setattr(exact, "cpu_bf16_flags", lambda flags=None: [])
    assert exact.resolve_scan_precision("auto") == "fp32"
    monkeypatch.setattr(exact, "cpu_bf16_flags", lambda flags=None: ["amx_bf16"])
    assert exact.resolve_scan_precision("auto") == "bf16"
    assert exact.resolve_scan_precision("fp32") == "fp32" and exact.resolve_scan_precision("bf16") == "bf16"
    assert exact.resolve_scan_precision(" BF16 ") == "bf16"  # the encoders' spellings
    with pytest.raises(ValueError, match="unknown precision 'int4': expected one of auto, fp32, bf16"):
        exact.resolve_scan_precision("int4")


def test_ray_addresses_auto_falls_back_to_local_and_a_dead_address_is_a_clear_error() -> None:
    from jfe.errors import ConfigError
    from jfe.indexing import _connect_ray

    class FakeRay:
        def __init__(self, running: bool) -> None:
            self.running, self.calls = running, []

        def init(self, address: str | None = None, **kwargs: object) -> None:
            self.calls.append(address)
            if address is not None and not (address == "auto" and self.running):
                raise ConnectionError(f"Could not find any running Ray instance at {address}")

    cluster, laptop = FakeRay(running=True), FakeRay(running=False)
    _connect_ray(cluster, "auto")
    _connect_ray(laptop, "auto")
    assert cluster.calls == ["auto"] and laptop.calls == ["auto", None]
    with pytest.raises(ConfigError, match="--ray 10.0.0.9:6379: no Ray cluster answers there"):
        _connect_ray(FakeRay(running=False), "10.0.0.9:6379")


def _pool_of_400(root: Path) -> Path:
    """400 candidates: texts of many lengths, images, image+text pairs (so batches pad and mix differently)."""
    from conftest import drawn_image

    (root / "images").mkdir(parents=True)
    words = ["red", "blue", "green", "cat", "dog", "moon", "star", "heart", "clock", "arrow", "over", "under", "the",
             "a", "big", "small"]
    rng = np.random.default_rng(0)
    lines = []
    for i in range(400):
        text = " ".join(rng.choice(words, int(rng.integers(1, 14)))) if i % 3 != 1 else None
        image = None
        if i % 3 != 0:
            drawn_image(i, (48, 48)).save(root / "images" / f"{i}.png")
            image = f"images/{i}.png"
        modality = "image,text" if text and image else ("image" if image else "text")
        lines.append(json.dumps({"did": f"5:{i}", "txt": text, "img_path": image, "modality": modality}))
    (root / "pool.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pool.jsonl"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ray_build_of_400_candidates_equals_single_process_under_each_precision(tmp_path: Path,
                                                                               precision: str) -> None:
    """The Ray workers encode the very batches one process encodes (jfe.models.base.encode_batches), so even
    under bf16, where a vector depends a little on its batch, ids and scores are the single process's."""
    pytest.importorskip("ray.data")
    from jfe.cli import app
    from jfe.models import load_model

    pool = _pool_of_400(tmp_path / "data")
    model_dir = load_model("two-tower-mini", device="cpu", pretrained=False, image_size=64, grid=1).save_pretrained(
        tmp_path / "model")
    common = ["index", "build", "--model", str(model_dir), "--pool", str(pool), "--data-root", str(tmp_path / "data"),
              "--no-progress", "--precision", precision, "--batch-size", "16"]
    runner = CliRunner()
    assert runner.invoke(app, [*common, "--out", str(tmp_path / "one")]).exit_code == 0
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "ray"), "--ray", "local"])
    assert result.exit_code == 0, result.output
    one, sharded = VectorIndex.load(tmp_path / "one"), load_index(tmp_path / "ray")
    assert isinstance(sharded, ShardedIndex) and sharded.ids == one.ids and len(one) == 400
    assert sharded.meta["precision"] == one.meta["precision"] == precision
    vectors = np.stack([one.vector(d) for d in one.ids])
    for did in one.ids:
        shard = next(s for s in sharded.shards if did in s)
        np.testing.assert_allclose(shard.vector(did), one.vector(did), atol=1e-6)
    a, b = one.search(vectors[:50], 10), sharded.search(vectors[:50], 10)
    assert a[0] == b[0]
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)
