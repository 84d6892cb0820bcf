"""The pretrained table: names resolve to trained weights (with their config), untrained names say so,
unknown names list the known ones. Uses the toy encoder under a temporary registered name (no assets)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from jfe.errors import ConfigError
from jfe.models import pretrained, registry
from jfe.models.pretrained import UntrainedModelWarning
from jfe.models.toy import ToyConfig, ToyEncoder

NAME = "toy-table-test"


@pytest.fixture
def toy_name(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(registry._MODELS, NAME, registry.ModelInfo(NAME, "toy-hash", "toy encoder for tests"))
    return NAME


def _trained_folder(tmp_path: Path, seed: int = 7) -> Path:
    """A 'trained' toy model: another seed than the untrained default, plus a training config beside it,
    laid out as ``jfe train`` writes it (``<run>/<stage>/final`` and ``<run>/<stage>/train_config.json``)."""
    run = tmp_path / "run" / "stage2"
    folder = ToyEncoder(ToyConfig(seed=seed, embed_dim=16)).save_pretrained(run / "final")
    (run / "train_config.json").write_text(json.dumps({"stage": "stage2", "steps": 12, "seed": 0}))
    return folder


def test_untrained_name_warns_and_is_flagged(toy_name: str) -> None:
    with pytest.warns(UntrainedModelWarning, match=f"{toy_name}.*no trained weights"):
        model = registry.load_model(toy_name, device="cpu")
    assert model.config.embed_dim == 32  # the registered (untrained) config
    rows = {r["name"]: r for r in pretrained.table({toy_name: "toy-hash"})}
    assert rows[toy_name]["trained"] is False and rows[toy_name]["folder"] is None
    with warnings.catch_warnings():  # training from scratch asks for it: no warning
        warnings.simplefilter("error")
        registry.load_model(toy_name, device="cpu", pretrained=False)
    with pytest.raises(ConfigError, match="no trained weights"):
        registry.load_model(toy_name, device="cpu", pretrained=True)


def test_registered_name_loads_trained_weights_and_their_config(toy_name: str, tmp_path: Path) -> None:
    folder = _trained_folder(tmp_path)
    entry = pretrained.register_pretrained(toy_name, folder, tag="unit", known_names={toy_name: "toy-hash"})
    assert entry.trained_with == {"stage2": {"stage": "stage2", "steps": 12, "seed": 0}}
    assert entry.folder == pretrained.pretrained_root() / toy_name
    assert entry.sha256 == pretrained.sha256_of(folder / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = registry.load_model(toy_name, device="cpu")
    assert model.config.embed_dim == 16  # the config it was trained with, not the registered default
    expected = registry.load_model(folder, device="cpu").encode(["a red square"])
    np.testing.assert_array_equal(model.encode(["a red square"]), expected)
    untrained = registry.load_model(toy_name, device="cpu", pretrained=False)
    assert untrained.config.embed_dim == 32
    with pytest.raises(ConfigError, match="do not fit.*loads its trained weights.*pretrained=False"):
        registry.load_model(toy_name, device="cpu", vocab_buckets=8)  # a shape the trained weights lack
    assert registry.load_model(toy_name, device="cpu", pretrained=False, vocab_buckets=8).config.vocab_buckets == 8
    # the source may change or vanish afterwards: the table keeps its own copy
    (folder / "model.safetensors").unlink()
    np.testing.assert_array_equal(registry.load_model(toy_name, device="cpu").encode(["a red square"]), expected)
    assert pretrained.unregister_pretrained(toy_name)
    with pytest.warns(UntrainedModelWarning):
        registry.load_model(toy_name, device="cpu")


def test_damaged_weights_fail_their_checksum(toy_name: str, tmp_path: Path) -> None:
    entry = pretrained.register_pretrained(toy_name, _trained_folder(tmp_path))
    weights = entry.folder / "model.safetensors"
    registry.load_model(toy_name, device="cpu")  # verified once; the check is remembered while the file is unchanged
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.unlink()  # a hard link to the source: replace, do not write through
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="sha256.*re-register"):
        registry.load_model(toy_name, device="cpu")


def test_unknown_name_lists_the_known_names(toy_name: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'jfe-maxi'.*jfe-mini.*two-tower-mini"):
        registry.load_model("jfe-maxi")
    known = {i.name: i.arch for i in registry.list_models()}
    with pytest.raises(ConfigError, match=r"unknown model name 'jfe-maxi'.*jfe-mini"):
        pretrained.register_pretrained("jfe-maxi", _trained_folder(tmp_path), known_names=known)
    with pytest.raises(ConfigError, match="holds a 'toy-hash' model, but 'jfe-mini' is a 'jfe-mini'"):
        pretrained.register_pretrained("jfe-mini", _trained_folder(tmp_path), known_names=known)
    with pytest.raises(ConfigError, match="not a saved JFE model"):
        pretrained.register_pretrained(toy_name, tmp_path)


def test_cli_list_register_unregister(toy_name: str, tmp_path: Path) -> None:
    from jfe.cli import app

    runner = CliRunner()
    rows = {r["name"]: r for r in json.loads(runner.invoke(app, ["models", "list", "--json"]).output)}
    assert rows["jfe-mini"]["trained"] is False and rows[toy_name]["trained"] is False
    assert "UNTRAINED" in runner.invoke(app, ["models", "list"]).output
    result = runner.invoke(app, ["models", "register", toy_name, str(_trained_folder(tmp_path)), "--tag", "demo"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(runner.invoke(app, ["models", "list", "--json"]).output)}
    assert rows[toy_name]["trained"] is True and rows[toy_name]["tag"] == "demo"
    assert rows[toy_name]["folder"] == str(pretrained.pretrained_root() / toy_name)
    assert rows["jfe-mini"]["trained"] is False
    listing = runner.invoke(app, ["models", "list"]).output
    sha = rows[toy_name]["sha256"]
    assert sha == pretrained.sha256_of(pretrained.pretrained_root() / toy_name / "model.safetensors")
    assert f"trained: demo ({pretrained.pretrained_root() / toy_name}, sha256 {sha[:12]})" in listing
    bad = runner.invoke(app, ["models", "register", "nope", str(_trained_folder(tmp_path, 3))])
    assert isinstance(bad.exception, ConfigError) and "jfe-mini" in str(bad.exception)
    assert runner.invoke(app, ["models", "unregister", toy_name]).exit_code == 0
    assert isinstance(runner.invoke(app, ["models", "unregister", toy_name]).exception, ConfigError)


def test_api_encode_warns_for_an_untrained_name(toy_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import jfe
    from jfe import api

    monkeypatch.setattr(api, "_LOADED", {})
    with pytest.warns(UntrainedModelWarning, match=toy_name):
        vectors = jfe.encode(["a red heart"], model=toy_name)
    assert vectors.shape == (1, 32)


def test_training_from_a_name_ignores_the_table(toy_name: str, tmp_path: Path) -> None:
    """A training config's ``model = NAME`` means the architecture from scratch, even when NAME is trained."""
    from jfe.train.config import load_config
    from jfe.train.trainer import build_model

    pretrained.register_pretrained(toy_name, _trained_folder(tmp_path))
    cfg = load_config({"model": toy_name, "data": str(tmp_path), "output_dir": str(tmp_path / "out")})
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build_model(cfg, torch.device("cpu"))
    assert model.config.embed_dim == 32
