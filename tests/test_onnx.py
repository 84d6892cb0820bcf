"""The ONNX Runtime backend (jfe.models.onnx_backend): export, load, parity on the real trained jfe-mini, the
manifest's checks, atomic export, and the backend an index records being the one its searches use."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import jfe
from conftest import SHIPPED_ROOT, drawn_image
from jfe.cli import app
from jfe.data.items import Item
from jfe.errors import ConfigError
from jfe.models import feature_cache, load_model
from jfe.models import onnx_backend as ob
from jfe.models.onnx_backend import MANIFEST_NAME, OnnxEncoder, export_onnx

pytestmark = pytest.mark.assets
SHIPPED_JFE_MINI = SHIPPED_ROOT / "jfe-mini"


def _items() -> list[Item]:
    words = ["red heart", "green star", "a cat on a mat", "blue moon over the sea", "clock", "arrow pointing up"]
    return ([Item(text=w) for w in words] + [Item(image=drawn_image(i)) for i in range(6)]
            + [Item(image=drawn_image(10 + i), text=f"the same, but {w}") for i, w in enumerate(words)])


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The shipped (trained) jfe-mini exported fp32, int8, and int8 with calibrated int8 vision, from a working
    directory of its own that must stay empty (ONNX Runtime's tools may drop temporaries into it)."""
    root = tmp_path_factory.mktemp("onnx")
    model = load_model(SHIPPED_JFE_MINI, device="cpu")
    calibration = [drawn_image(100 + i) for i in range(16)]
    cwd, before = tmp_path_factory.mktemp("cwd"), os.getcwd()
    os.chdir(cwd)
    try:
        made = {"fp32": export_onnx(model, root / "fp32", source="jfe-mini"),
                "int8": export_onnx(model, root / "int8", source="jfe-mini", precision="int8"),
                "int8-vision": export_onnx(model, root / "int8v", source="jfe-mini", precision="int8",
                                           vision_int8=True, calibration=calibration)}
    finally:
        os.chdir(before)
    assert not any(cwd.iterdir()), list(cwd.iterdir())
    yield made


@pytest.fixture(scope="module")
def torch_vectors() -> np.ndarray:
    with feature_cache.disabled():
        return load_model(SHIPPED_JFE_MINI, device="cpu").encode(_items(), precision="fp32", batch_size=8)


@pytest.mark.parametrize(("kind", "rule"), [("fp32", 0.999), ("int8", 0.98)])
def test_export_then_load_matches_torch_fp32_on_the_trained_jfe_mini(exports: dict[str, Path],
                                                                     torch_vectors: np.ndarray, kind: str,
                                                                     rule: float) -> None:
    model = load_model(exports[kind])
    assert isinstance(model, OnnxEncoder) and model.backend == "onnx"
    assert model.fusion_role == "one-tower" and model.arch == "jfe-mini" and model.dim == 384
    with feature_cache.disabled():
        vectors = model.encode(_items(), batch_size=5)  # batches that mix modalities differently than torch's
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosine = (vectors * torch_vectors).sum(1)
    assert cosine.min() >= rule, cosine.min()
    if kind == "int8":  # quantised, so not the fp32 numbers: the int8 graph really runs
        assert cosine.min() < 0.99999
    # the feature cache keys the export's own features: a warm encode gives the cold one's vectors
    with feature_cache.overridden(mode="memory"):
        feature_cache.clear()
        first = model.encode(_items())
        again = model.encode(_items())
    np.testing.assert_allclose(first, again, atol=1e-6)


def test_int8_vision_is_calibrated_and_recorded(exports: dict[str, Path], torch_vectors: np.ndarray) -> None:
    manifest = json.loads((exports["int8-vision"] / MANIFEST_NAME).read_text())
    assert manifest["precision"] == "int8" and manifest["calibration"]["images"] == 16
    assert "static QDQ int8" in manifest["graphs"]["vision"]["quantization"]
    assert json.loads((exports["int8"] / MANIFEST_NAME).read_text())["graphs"]["vision"]["quantization"] == "none"
    with feature_cache.disabled():
        vectors = load_model(exports["int8-vision"]).encode(_items())
    assert (vectors * torch_vectors).sum(1).min() > 0.8
    # texts never reach the vision graph: alone in their batch (dynamic int8 scales activations per batch), they
    # get the same vectors from both int8 exports
    texts = _items()[:6]
    np.testing.assert_allclose(load_model(exports["int8-vision"]).encode(texts),
                               load_model(exports["int8"]).encode(texts), atol=1e-6)


def test_manifest_records_what_the_export_is(exports: dict[str, Path]) -> None:
    manifest = json.loads((exports["fp32"] / MANIFEST_NAME).read_text())
    assert manifest["format"] == "jfe-onnx/1" and manifest["jfe_version"] == jfe.__version__
    assert manifest["source"] == "jfe-mini" and len(manifest["source_sha256"]) == 64
    assert manifest["source_sha256"] == ob.weights_sha256(load_model(SHIPPED_JFE_MINI, device="cpu"))
    assert manifest["inputs"] == ["input_ids", "attention_mask", "visual_index"]
    assert manifest["exported_on"]["cpu_flags"] is not None and manifest["opset"] == ob.OPSET
    assert (exports["fp32"] / "text" / "tokenizer.json").is_file()


def test_a_changed_graph_or_manifest_is_a_clear_error(exports: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(exports["fp32"], folder)
    load_model(folder)  # an intact copy loads
    manifest = json.loads((folder / MANIFEST_NAME).read_text())

    with open(folder / "fusion.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ConfigError, match="fusion.onnx does not match jfe_onnx.json"):
        load_model(folder)
    shutil.copy(exports["fp32"] / "fusion.onnx", folder / "fusion.onnx")

    for change, message in ((lambda m: m.update(inputs=["input_ids"]), "fusion inputs"),
                            (lambda m: m["config"].update(grid=99), "does not fit arch 'jfe-mini'"),
                            (lambda m: m.update(arch="no-such-arch"), "no-such-arch"),
                            (lambda m: m.pop("graphs"), "not a readable JFE ONNX manifest")):
        changed = json.loads(json.dumps(manifest))
        change(changed)
        (folder / MANIFEST_NAME).write_text(json.dumps(changed))
        with pytest.raises(ConfigError, match=message):
            load_model(folder)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    (folder / "vision.onnx").unlink()
    with pytest.raises(ConfigError, match="vision graph vision.onnx is missing"):
        load_model(folder)


def test_an_export_runs_only_as_onnx_and_does_not_train(exports: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="ONNX export: it runs with backend onnx"):
        load_model(exports["int8"], backend="torch")
    with pytest.raises(ConfigError, match="settings were fixed at export"):
        load_model(exports["int8"], grid=2)
    model = load_model(exports["int8"])
    with pytest.raises(ConfigError, match="computing in int8"):
        model.encode(["a"], precision="bf16")
    with pytest.raises(ConfigError, match="unknown precision"):
        model.encode(["a"], precision="fp8")
    assert model.compute_record("auto") == {"backend": "onnx", "precision": "int8"}
    with pytest.raises(ConfigError, match="does not train"):
        model.embed([Item(text="a")])
    with pytest.raises(ConfigError, match="unknown backend"):
        load_model("jfe-mini", backend="tensorrt")
    with pytest.raises(ConfigError, match="optimum"):
        load_model("hf:/nowhere", backend="onnx")


@pytest.mark.parametrize("name", ["two-tower-mini", "late-fusion-sf-mini", "late-fusion-ff-mini"])
def test_every_baseline_exports_and_matches(name: str, tmp_path: Path) -> None:
    model = load_model(name, device="cpu", pretrained=False, image_size=96, grid=2, seed=3)
    exported = load_model(export_onnx(model, tmp_path / name, source=name))
    assert exported.fusion_role == model.fusion_role
    items = _items()[::2]  # every modality, in one batch and one by one
    with feature_cache.disabled():
        reference = model.encode(items, precision="fp32")
        batch = exported.encode(items, batch_size=16)
        single = np.concatenate([exported.encode([item]) for item in items])
    assert (reference * batch).sum(1).min() >= 0.9999
    np.testing.assert_allclose(batch, single, atol=1e-5)


def test_rerankers_and_foreign_folders_are_refused(tmp_path: Path) -> None:
    reranker = load_model("jfe-mini-rerank", device="cpu", pretrained=False)
    with pytest.raises(ConfigError, match="is a reranker"):
        export_onnx(reranker, tmp_path / "r")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    model = load_model("two-tower-mini", device="cpu", pretrained=False, image_size=64, grid=1)
    with pytest.raises(ConfigError, match="is not a JFE ONNX export"):
        export_onnx(model, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    result = CliRunner().invoke(app, ["export", "onnx", "two-tower-mini", str(foreign)])
    assert isinstance(result.exception, ConfigError) and (foreign / "notes.txt").read_text() == "keep me"


def test_export_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model("two-tower-mini", device="cpu", pretrained=False, image_size=64, grid=1)
    out = export_onnx(model, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def broken(*args: object) -> None:
        raise RuntimeError("killed mid-export")

    monkeypatch.setattr(ob, "_export_fusion", broken)
    with pytest.raises(RuntimeError, match="killed mid-export"):
        export_onnx(model, out, precision="int8")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # the old export, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary left behind
    load_model(out)


def test_an_index_built_on_onnx_is_searched_on_onnx(tiny_mbeir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from jfe import api
    from jfe.indexing import write_index
    from jfe.models import registry

    pools = sorted((tiny_mbeir / "cand_pool" / "local").glob("*.jsonl"))
    overrides = {"pretrained": False, "image_size": 64, "grid": 1}
    torch_model = load_model("two-tower-mini", device="cpu", **overrides)
    exported = export_onnx(torch_model, tmp_path / "exported", source="two-tower-mini")
    index = write_index(tmp_path / "index", str(exported), pools, tiny_mbeir, progress=False)
    assert index.meta["backend"] == "onnx" and index.meta["precision"] == "fp32"

    seen: list[tuple[str, str | None]] = []
    real = registry.load_model

    def spy(spec: str, *args: object, backend: str | None = None, **kwargs: object) -> object:
        seen.append((str(spec), backend))
        return real(spec, *args, backend=backend, **kwargs)

    monkeypatch.setattr(registry, "load_model", spy)
    monkeypatch.setattr(api, "_LOADED", {})
    hits = api.search(tmp_path / "index", "a red circle", k=3)
    assert len(hits) == 3 and seen[-1] == (str(exported), "onnx")  # as meta.json records
    loaded = next(iter(api._LOADED.values()))
    assert isinstance(loaded, OnnxEncoder)
    # the same index searched with the torch model it came from, asked for by name and backend
    with pytest.raises(ConfigError, match="runs with backend onnx"):
        api.search(tmp_path / "index", "a red circle", k=3, backend="torch")


def test_backend_onnx_exports_a_torch_model_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 tiny_mbeir: Path) -> None:
    from jfe.indexing import query_backend, write_index

    monkeypatch.setattr(ob, "cache_dir", lambda: tmp_path / "cache")  # JFE's cache, less its assets
    saved = load_model("two-tower-mini", device="cpu", pretrained=False, image_size=64, grid=1).save_pretrained(
        tmp_path / "tt")
    first = load_model(tmp_path / "tt", backend="onnx")
    assert isinstance(first, OnnxEncoder)
    cached = list((tmp_path / "cache" / "onnx").iterdir())
    assert len(cached) == 1 and first.folder == cached[0]
    stamp = (cached[0] / "fusion.onnx").stat().st_mtime_ns
    from jfe.models import registry

    def no_torch_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the PyTorch model was built although its export is cached")

    with monkeypatch.context() as patch:
        patch.setattr(registry, "_load_saved", no_torch_build)
        load_model(str(saved), backend="onnx")  # found by the folder's file digests, without building the model
    assert (cached[0] / "fusion.onnx").stat().st_mtime_ns == stamp  # reused, not exported again
    weights = Path(saved) / "model.safetensors"
    with open(weights, "r+b") as handle:  # retrained in place (any byte of the weights changes)
        handle.seek(-4, 2)
        handle.write(b"\x00\x00\x80\x3f")
    load_model(str(saved), backend="onnx")
    assert len(list((tmp_path / "cache" / "onnx").iterdir())) == 2  # a new export for the new weights

    pools = sorted((tiny_mbeir / "cand_pool" / "local").glob("*.jsonl"))
    index = write_index(tmp_path / "index", str(saved), pools, tiny_mbeir, progress=False, backend="onnx")
    assert index.meta["model"] == str(saved) and index.meta["backend"] == "onnx"
    assert query_backend(index.meta, str(saved)) == "onnx"  # its searches encode queries on ONNX too
    assert query_backend(index.meta, "another-model") is None  # another model runs as what it is
    assert query_backend(index.meta, str(saved), "torch") == "torch"  # an explicit choice wins


def test_export_cli_checks_its_options(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["export", "onnx", "jfe-mini", str(tmp_path / "a"), "--calibration", "x.jsonl"])
    assert isinstance(result.exception, ConfigError) and "--int8-vision" in str(result.exception)
    result = runner.invoke(app, ["export", "onnx", "jfe-mini", str(tmp_path / "b"), "--int8-vision"])
    assert isinstance(result.exception, ConfigError) and "--quantize int8" in str(result.exception)
    result = runner.invoke(app, ["export", "onnx", "jfe-mini", str(tmp_path / "c"), "--quantize", "int8",
                                 "--int8-vision", "--calibration", "x.jsonl"])
    assert isinstance(result.exception, ConfigError) and "--data-root" in str(result.exception)
    assert not any(tmp_path.iterdir())


def test_the_service_serves_an_onnx_model(exports: dict[str, Path], tiny_mbeir: Path) -> None:
    import base64
    import io

    from fastapi.testclient import TestClient

    from jfe.indexing import build_index
    from jfe.serve.app import create_app
    from jfe.serve.schemas import ServeSettings

    model = load_model(exports["int8"])
    index = build_index(model, sorted((tiny_mbeir / "cand_pool" / "global").glob("*.jsonl")), tiny_mbeir,
                        progress=False, model_name=str(exports["int8"]))
    assert index.meta["backend"] == "onnx" and index.meta["precision"] == "int8"
    buffer = io.BytesIO()
    drawn_image(5).save(buffer, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with TestClient(create_app(model, index, ServeSettings())) as client:
        hits = client.post("/search", json={"text": "a red circle", "k": 2}).json()["results"]
        assert len(hits) == 2
        both = client.post("/search", json={"text": "the same, but blue", "image": image, "k": 2})
        assert both.status_code == 200, both.text
        embedded = client.post("/v1/embeddings", json={"input": ["a red circle"]}).json()
        health = client.get("/health").json()
        assert health["backend"] == "onnx" and health["precision"] == "int8"
        ids = model.tokenizer("a red circle", add_special_tokens=False)["input_ids"]
        assert embedded["usage"]["prompt_tokens"] == len(ids)  # the export's tokenizer counts, not words
        from_ids = client.post("/v1/embeddings", json={"input": [ids]}).json()  # OpenAI token-array input
        np.testing.assert_allclose(from_ids["data"][0]["embedding"], embedded["data"][0]["embedding"], atol=1e-5)
    vector = np.array(embedded["data"][0]["embedding"], dtype=np.float32)
    np.testing.assert_allclose(vector, model.encode(["a red circle"])[0], atol=1e-5)


def test_jfe_eval_runs_on_the_onnx_backend_and_says_so(exports: dict[str, Path], tiny_mbeir: Path) -> None:
    from jfe.eval.protocol import EvalResult

    out = tiny_mbeir.parent / "eval-onnx"
    result = CliRunner().invoke(app, ["eval", "--model", str(exports["int8"]), "--data", str(tiny_mbeir),
                                      "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "onnx int8" in result.output
    saved = EvalResult.load(out)
    assert saved.compute == {"backend": "onnx", "precision": "int8"} and saved.arch == "jfe-mini"
    assert saved.fusion_role == "one-tower" and saved.average


def test_torch_queries_against_an_onnx_built_index_follow_its_precision() -> None:
    from jfe.indexing import query_precision

    torch_model = load_model("toy")
    assert query_precision({"backend": "onnx", "precision": "fp32"}, "auto", torch_model)[0] == "fp32"
    assert query_precision({"backend": "onnx", "precision": "int8"}, "auto", torch_model)[0] == "auto"


def test_export_cli_calibrates_int8_vision_on_pool_images(tiny_mbeir: Path, tmp_path: Path) -> None:
    pool = tiny_mbeir / "cand_pool" / "local" / "mbeir_tiny_task0_cand_pool.jsonl"
    out = tmp_path / "int8v"
    result = CliRunner().invoke(app, ["export", "onnx", "two-tower-mini", str(out), "--quantize", "int8",
                                      "--int8-vision", "--calibration", str(pool), "--data-root", str(tiny_mbeir),
                                      "--calibration-images", "8"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    with_images = sum(1 for line in pool.read_text().splitlines() if json.loads(line).get("img_path"))
    assert 0 < with_images < 8  # the tiny pool has fewer images than asked for: all of them calibrate
    assert manifest["calibration"]["images"] == with_images and str(pool) in manifest["calibration"]["source"]
    assert "seed-0 sample" in manifest["calibration"]["source"]
    assert load_model(out).encode(["a red circle"]).shape == (1, 384)


# --- OpenVINO Runtime on the same fp32 export (jfe.models.openvino_backend) ---------------------------------------


def test_openvino_runs_the_fp32_export_at_parity_in_fp32_and_native_bf16(exports: dict[str, Path],
                                                                        torch_vectors: np.ndarray) -> None:
    from jfe.hardware import cpu_bf16_flags
    from jfe.models.openvino_backend import OpenVinoEncoder

    model = load_model(exports["fp32"], backend="openvino")
    assert isinstance(model, OpenVinoEncoder) and model.arch == "jfe-mini" and model.fusion_role == "one-tower"
    with feature_cache.disabled():
        fp32 = model.encode(_items(), batch_size=5, precision="fp32")
    assert ((fp32 * torch_vectors).sum(1)).min() >= 0.999
    assert model.compute_record("fp32") == {"backend": "openvino", "precision": "fp32"}
    if not cpu_bf16_flags():  # auto is fp32 here, and bf16 (which OpenVINO would silently ignore) is refused
        assert model.compute_record() == {"backend": "openvino", "precision": "fp32"}
        with pytest.raises(ConfigError, match="natively"):
            model.set_precision("bf16")
        return
    assert model.compute_record() == {"backend": "openvino", "precision": "bf16", "vision_precision": "bf16"}
    with feature_cache.overridden(mode="memory"):  # fp32 features cached first must not serve the bf16 encode
        feature_cache.clear()
        model.encode(_items(), precision="fp32")
        bf16 = model.encode(_items(), batch_size=5)
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)
    cosine = (bf16 * torch_vectors).sum(1)
    assert cosine.min() >= 0.995, cosine.min()
    assert cosine.min() < 0.99999  # bf16 really computed (OpenVINO would run fp32 if the hint were lost)


def test_openvino_refuses_int8_exports_and_garbage_precisions(exports: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="int8 export.*--backend onnx"):
        load_model(exports["int8"], backend="openvino")
    with pytest.raises(ConfigError, match="unknown precision"):
        load_model(exports["fp32"], backend="openvino").set_precision("int4")
    with pytest.raises(ConfigError, match="unknown backend"):
        load_model(exports["fp32"], backend="tensorrt")


def test_backend_openvino_builds_an_index_that_searches_on_openvino(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    tiny_mbeir: Path) -> None:
    from jfe.indexing import query_backend, query_precision, write_index
    from jfe.models.openvino_backend import OpenVinoEncoder

    monkeypatch.setattr(ob, "cache_dir", lambda: tmp_path / "cache")
    saved = str(load_model("two-tower-mini", device="cpu", pretrained=False, image_size=64, grid=1).save_pretrained(
        tmp_path / "tt"))
    pools = sorted((tiny_mbeir / "cand_pool" / "local").glob("*.jsonl"))
    index = write_index(tmp_path / "index", saved, pools, tiny_mbeir, progress=False, backend="openvino",
                        precision="fp32")
    assert index.meta["backend"] == "openvino" and index.meta["precision"] == "fp32"
    assert len(list((tmp_path / "cache" / "onnx").iterdir())) == 1  # the fp32 export it ran, made once
    assert query_backend(index.meta, saved) == "openvino"
    model = load_model(saved, backend="openvino")  # the cached export again
    assert isinstance(model, OpenVinoEncoder)
    assert query_precision(index.meta, "auto", model) == ("fp32", None)  # queries follow the index's fp32
    hits = jfe.search(tmp_path / "index", "a red circle", k=3)
    assert len(hits) == 3
    with pytest.raises(ConfigError, match="--ray"):
        write_index(tmp_path / "ray", saved, pools, tiny_mbeir, progress=False, backend="openvino",
                    ray_address="auto")


def test_jfe_eval_and_serve_say_openvino(exports: dict[str, Path], tiny_mbeir: Path) -> None:
    from fastapi.testclient import TestClient

    from jfe.eval.protocol import EvalResult
    from jfe.indexing import build_index
    from jfe.serve.app import create_app
    from jfe.serve.schemas import ServeSettings

    out = tiny_mbeir.parent / "eval-openvino"
    result = CliRunner().invoke(app, ["eval", "--model", str(exports["fp32"]), "--backend", "openvino",
                                      "--precision", "fp32", "--data", str(tiny_mbeir), "--out", str(out),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "openvino fp32" in result.output
    assert EvalResult.load(out).compute == {"backend": "openvino", "precision": "fp32"}
    model = load_model(exports["fp32"], backend="openvino").set_precision("fp32")
    index = build_index(model, sorted((tiny_mbeir / "cand_pool" / "global").glob("*.jsonl")), tiny_mbeir,
                        progress=False, model_name=str(exports["fp32"]))
    with TestClient(create_app(model, index, ServeSettings())) as client:
        health = client.get("/health").json()
        assert health["backend"] == "openvino" and health["precision"] == "fp32"
        embedded = client.post("/v1/embeddings", json={"input": ["a red circle"]}).json()
    np.testing.assert_allclose(embedded["data"][0]["embedding"], model.encode(["a red circle"])[0], atol=1e-5)
