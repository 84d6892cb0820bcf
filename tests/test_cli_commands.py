"""The thin commands do each thing one way: `jfe encode` reads items through the data layer, `jfe search`
is `jfe.search`, `jfe serve` loads models through the registry, and `--precision` is one shared option."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from jfe.cli import app
from jfe.data.items import Item
from jfe.errors import ConfigError, DataError
from jfe.models.toy import ToyEncoder

runner = CliRunner()


def _index(tiny_mbeir: Path, tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    model_dir = ToyEncoder().save_pretrained(tmp_path / "toy")
    pools = ",".join(str(p) for p in sorted((tiny_mbeir / "cand_pool" / "global").glob("*.jsonl")))
    out = tmp_path / ("idx" + "-".join(extra))
    result = runner.invoke(app, ["index", "build", "--model", str(model_dir), "--pool", pools, "--data-root",
                                 str(tiny_mbeir), "--out", str(out), "--no-progress", *extra])
    assert result.exit_code == 0, result.output
    return out, model_dir


# ------------------------------------------------------------------------------------------ encode
def test_encode_items_file_gives_the_model_vectors(tiny_mbeir: Path, tmp_path: Path) -> None:
    image = tiny_mbeir / "images" / "tiny" / "red_square.png"
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"text": "a red square"}) + "\n\n" + json.dumps({"image": str(image)}) + "\n"
                     + json.dumps({"text": "make it blue", "image": str(image), "id": "pair"}) + "\n")
    out = tmp_path / "v.npy"
    result = runner.invoke(app, ["encode", "--model", "toy", "--items", str(items), "--text", "x", "--out", str(out)])
    assert result.exit_code == 0, result.output
    expected = ToyEncoder().encode([Item(text="x"), Item(text="a red square"), Item(image=image),
                                    Item(text="make it blue", image=image)])
    np.testing.assert_array_equal(np.load(out), expected)


@pytest.mark.parametrize(("line", "match"), [
    ("{broken", "malformed JSON"),
    ('"just text"', "JSON object"),
    ('{"text": "a", "img": "x.png"}', "unknown item keys"),
    ("{}", "neither text nor image"),
])
def test_encode_items_file_errors_name_file_and_line(tmp_path: Path, line: str, match: str) -> None:
    items = tmp_path / "items.jsonl"
    items.write_text('{"text": "fine"}\n' + line + "\n")
    result = runner.invoke(app, ["encode", "--model", "toy", "--items", str(items), "--out", str(tmp_path / "v.npy")])
    assert isinstance(result.exception, DataError), result.output
    assert f"{items}:2" in str(result.exception) and result.exception.line == 2
    assert re.search(match, str(result.exception)), result.exception
    assert not (tmp_path / "v.npy").exists()


def test_encode_missing_items_file_is_a_data_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["encode", "--model", "toy", "--items", str(tmp_path / "no.jsonl"),
                                 "--out", str(tmp_path / "v.npy")])
    assert isinstance(result.exception, DataError) and str(tmp_path / "no.jsonl") in str(result.exception)


# ------------------------------------------------------------------------------------------ search
def test_cli_search_is_the_python_api(tiny_mbeir: Path, tmp_path: Path) -> None:
    import jfe

    out, model_dir = _index(tiny_mbeir, tmp_path)
    image = tiny_mbeir / "images" / "tiny" / "red_square.png"
    result = runner.invoke(app, ["search", "--index", str(out), "--text", "make it blue", "--image", str(image),
                                 "--instruction", "edit", "-k", "5", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)["hits"]
    hits = jfe.search(out, Item(text="make it blue", image=image), k=5, instruction="edit")
    assert [(h["did"], h["rank"], h["record"]) for h in shown] == [(h["did"], h["rank"], h["record"]) for h in hits]
    assert [h["score"] for h in shown] == [round(h["score"], 6) for h in hits]
    assert [h["text"] for h in shown] == [h["record"].get("txt") for h in hits]
    direct = ToyEncoder().encode([Item(text="make it blue", image=image)], instruction="edit")
    from jfe.index import VectorIndex

    ids, scores = VectorIndex.load(out).search(direct, 5)
    assert [h["did"] for h in hits] == ids[0] and [h["score"] for h in hits] == scores[0].tolist()


def test_api_search_loads_sharded_folders_like_the_cli(tiny_mbeir: Path, tmp_path: Path) -> None:
    import jfe

    plain, _ = _index(tiny_mbeir, tmp_path)
    sharded, _ = _index(tiny_mbeir, tmp_path, "--shards", "2")
    assert [h["did"] for h in jfe.search(sharded, "A blue circle", k=8)] == \
        [h["did"] for h in jfe.search(plain, "A blue circle", k=8)]
    result = runner.invoke(app, ["search", "--index", str(sharded), "--text", "A blue circle", "-k", "8", "--json"])
    assert [h["did"] for h in json.loads(result.stdout)["hits"]] == \
        [h["did"] for h in jfe.search(plain, "A blue circle", k=8)]


def test_api_search_without_a_model_name_is_a_config_error(tiny_mbeir: Path) -> None:
    import jfe
    from jfe.indexing import build_index

    index = build_index(ToyEncoder(), sorted((tiny_mbeir / "cand_pool" / "global").glob("*.jsonl")), tiny_mbeir,
                        progress=False)
    index.meta.pop("model", None)
    with pytest.raises(ConfigError, match="does not name its model"):
        jfe.search(index, "a red circle")
    assert len(jfe.search(index, "a red circle", model=ToyEncoder(), k=2)) == 2


# ------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("name", ["toy", "toy-hash"])
def test_toy_names_load_through_the_registry_without_an_untrained_warning(name: str) -> None:
    from jfe.models.registry import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an UntrainedModelWarning would raise here
        model = load_model(name, device="cpu")
    assert isinstance(model, ToyEncoder) and not model.training
    np.testing.assert_array_equal(model.encode(["a red circle"]), ToyEncoder().encode(["a red circle"]))


def test_serve_has_no_model_resolver_of_its_own() -> None:
    import jfe.serve.commands as serve_commands

    assert not hasattr(serve_commands, "load_model")


# ------------------------------------------------------------------------------------------ --precision
def test_precision_is_one_shared_option() -> None:
    import typer

    from jfe.cli_options import DEFAULT_PRECISION, PRECISION_HELP

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    found = {}
    for name in ("encode", "eval", "serve", "index build"):
        group = commands[name.split()[0]]
        command = group.commands[name.split()[1]] if " " in name else group  # type: ignore[attr-defined]
        [option] = [p for p in command.params if "--precision" in p.opts]
        found[name] = (option.default, option.help)
    assert set(found.values()) == {(DEFAULT_PRECISION, PRECISION_HELP)}
    bad = runner.invoke(app, ["encode", "--model", "toy", "--text", "x", "--precision", "fp8", "--out", "v.npy"])
    assert isinstance(bad.exception, ConfigError) and "fp8" in str(bad.exception)


# ------------------------------------------------------------------------------------------ service
def test_apps_built_side_by_side_keep_their_own_state(tiny_mbeir: Path) -> None:
    """The routes are shared; what they serve comes from each app's state."""
    from jfe.indexing import build_index
    from jfe.serve.app import create_app
    from jfe.serve.schemas import ServeSettings

    model = ToyEncoder()
    full = build_index(model, sorted((tiny_mbeir / "cand_pool" / "global").glob("*.jsonl")), tiny_mbeir,
                       progress=False)
    part = build_index(model, [tiny_mbeir / "cand_pool" / "local" / "mbeir_tiny_task3_cand_pool.jsonl"], tiny_mbeir,
                       progress=False)
    with TestClient(create_app(model, full, ServeSettings(model_name="a"))) as a, \
            TestClient(create_app(model, part, ServeSettings(model_name="b", api_key="k"))) as b:
        assert (a.get("/health").json()["index_size"], a.get("/health").json()["model"]) == (len(full), "a")
        assert (b.get("/health").json()["index_size"], b.get("/health").json()["model"]) == (len(part), "b")
        assert a.post("/search", json={"text": "x", "k": 100}).json()["k"] == 100
        assert len(a.post("/search", json={"text": "x", "k": 100}).json()["results"]) == len(full)
        assert b.post("/search", json={"text": "x"}).status_code == 401
        got = b.post("/search", json={"text": "x", "k": 100}, headers={"X-API-Key": "k"}).json()["results"]
        assert len(got) == len(part) < len(full)


def test_serve_loads_a_sharded_index_memory_mapped(tiny_mbeir: Path, tmp_path: Path, monkeypatch) -> None:
    """`jfe serve --index` takes the sharded folders `jfe index build --shards` writes, and `--mmap`."""
    import uvicorn

    one, model_dir = _index(tiny_mbeir, tmp_path)
    sharded, _ = _index(tiny_mbeir, tmp_path, "--shards", "2")
    served: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.setdefault("app", app))
    answers = []
    for folder, extra in ((one, ()), (sharded, ("--mmap",))):
        served.clear()
        result = runner.invoke(app, ["serve", "--index", str(folder), "--model", str(model_dir), *extra])
        assert result.exit_code == 0, result.output
        with TestClient(served["app"]) as client:
            assert client.get("/health").json()["index_size"] == 8
            hits = client.post("/search", json={"text": "A blue circle", "k": 8}).json()["results"]
        answers.append([(h["did"], round(h["score"], 6)) for h in hits])
    assert answers[0] == answers[1] and len(answers[0]) == 8


# ------------------------------------------------------------------------------------------ env
def test_env_reports_the_machine_and_what_auto_precision_picks(real_bf16_detection: None) -> None:
    from jfe.hardware import cpu_bf16_flags

    def info() -> dict:
        result = runner.invoke(app, ["env", "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    native = info()
    assert native["precision_auto"]["cpu"] == ("bf16" if cpu_bf16_flags() else "fp32")
    assert native["bf16_native_cpu"] == bool(cpu_bf16_flags())
    assert set(native["cpu_flags"]) | set(native["cpu_flags_absent"]) >= {"avx2", "avx512_bf16", "amx_bf16"}
    assert not {"JFE_PRECISION", "JFE_VISION_PRECISION"} & set(native)  # no environment variable decides it
    import onnxruntime
    import openvino

    assert native["runtimes"] == {"onnxruntime": onnxruntime.__version__,  # the --backend choices, with versions
                                  "openvino": openvino.__version__.split("-")[0]}
    text = runner.invoke(app, ["env"]).stdout
    assert re.search(r"^precision_auto\s+cpu: bf16$", text, re.MULTILINE), text


class _PrecisionSpy(ToyEncoder):
    """The toy encoder, recording the precision every encode call asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str | None] = []

    def encode(self, items, instruction=None, batch_size=32, progress=False, desc="encode",  # noqa: ANN001
               precision=None):  # noqa: ANN001, ANN201
        self.asked.append(precision)
        return super().encode(items, instruction=instruction, batch_size=batch_size, progress=progress,
                              desc=desc, precision=precision)


def test_queries_are_encoded_as_the_index_was_unless_told_otherwise(tiny_mbeir: Path) -> None:
    from jfe.api import search
    from jfe.indexing import build_index, query_precision

    spy = _PrecisionSpy()
    pool = tiny_mbeir / "cand_pool" / "global" / "mbeir_union_test_cand_pool.jsonl"
    index = build_index(spy, [pool], tiny_mbeir, progress=False, precision="fp32")
    assert index.meta["precision"] == "fp32"
    index.meta["precision"] = "bf16"  # as if built on a CPU with native bf16
    search(index, "a red square", model=spy, k=2)
    assert spy.asked[-1] == "bf16"  # auto follows the index
    with pytest.warns(UserWarning, match="computed in bf16"):
        search(index, "a red square", model=spy, k=2, precision="fp32")
    assert spy.asked[-1] == "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert query_precision({"precision": "bf16", "vision_precision": "bf16"}) == ("bf16", "follow")
        assert query_precision({}) == ("auto", None)
        assert query_precision({"precision": "fp32"}, "fp32") == ("fp32", None)


def test_search_excludes_the_ids_it_is_told_to(tiny_mbeir: Path, tmp_path: Path) -> None:
    from jfe.api import search

    out = tmp_path / "idx"
    pool = tiny_mbeir / "cand_pool" / "global" / "mbeir_union_test_cand_pool.jsonl"
    assert runner.invoke(app, ["index", "build", "--model", "toy", "--pool", str(pool), "--data-root",
                               str(tiny_mbeir), "--out", str(out), "--no-progress"]).exit_code == 0
    query = {"image": tiny_mbeir / "images/tiny/red_square.png", "text": "make it blue"}
    first = search(out, query, k=3)
    assert first[0]["did"] == "1:1"  # the toy finds the reference image itself first
    excluded = search(out, query, k=3, exclude=["1:1"])
    assert "1:1" not in [h["did"] for h in excluded]
    assert [h["did"] for h in excluded][:2] == [h["did"] for h in first[1:]]  # the rest keep their order
    shown = runner.invoke(app, ["search", "--index", str(out), "--image", str(query["image"]), "--text",
                                "make it blue", "-k", "3", "--exclude", "1:1", "--json"])
    assert shown.exit_code == 0, shown.output
    assert [h["did"] for h in json.loads(shown.output)["hits"]] == [h["did"] for h in excluded]


def test_serve_encodes_queries_in_the_index_precision(tiny_mbeir: Path, tmp_path: Path) -> None:
    from unittest import mock

    out = tmp_path / "idx"
    pool = tiny_mbeir / "cand_pool" / "global" / "mbeir_union_test_cand_pool.jsonl"
    assert runner.invoke(app, ["index", "build", "--model", "toy", "--pool", str(pool), "--data-root",
                               str(tiny_mbeir), "--out", str(out), "--no-progress"]).exit_code == 0
    meta = json.loads((out / "meta.json").read_text())
    meta["meta"]["precision"] = "bf16"
    (out / "meta.json").write_text(json.dumps(meta))
    with mock.patch("uvicorn.run"), mock.patch("jfe.serve.app.create_app") as create:
        assert runner.invoke(app, ["serve", "--index", str(out)]).exit_code == 0
    assert create.call_args.args[0].precision == "bf16"
