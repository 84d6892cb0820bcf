"""The trained weights inside the package (src/jfe/models/weights/): what a user gets right after install."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jfe.data import assets
from jfe.models import load_model
from jfe.models import pretrained as table
from jfe.models.compact import is_compact

SHIPPED = ("jfe-mini", "two-tower-mini")
MAX_BYTES = 20 * 1000 * 1000  # what may live in git per model


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_entries_are_small_verified_and_documented(shipped_weights: Path, name: str) -> None:
    entry = table.find_pretrained(name)
    assert entry is not None and entry.shipped and entry.tag == "shipped"
    weights = entry.folder / table.WEIGHTS_NAME
    assert weights.stat().st_size <= MAX_BYTES and is_compact(weights)
    assert table.sha256_of(weights) == entry.sha256 and table.verified_folder(entry) == entry.folder
    assert entry.trained_with["command"] == "make shipped-weights"
    assert 0 < entry.scores["minibeir_test_local_r5"]["average"] <= 1
    meta = json.loads((entry.folder / table.META_NAME).read_text())
    assert "/" not in meta["source"].split(" ")[0]  # no path of the machine that trained it


def test_models_list_shows_the_shipped_weights(shipped_weights: Path) -> None:
    from jfe.cli import app

    rows = {r["name"]: r for r in json.loads(CliRunner().invoke(app, ["models", "list", "--json"]).output)}
    for name in SHIPPED:
        assert rows[name]["trained"] and rows[name]["tag"] == "shipped" and rows[name]["shipped"]
        assert len(rows[name]["sha256"]) == 64
    listing = CliRunner().invoke(app, ["models", "list"]).output
    assert f"trained: shipped (package, sha256 {rows['jfe-mini']['sha256'][:12]})" in listing


@pytest.mark.assets
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_models_load_without_warning(shipped_weights: Path, name: str) -> None:
    missing = [n for n in ("minilm", "mobilenet_v2") if not assets.is_fetched(n)]
    if missing:
        pytest.fail(f"assets not fetched: {missing} (run `jfe assets fetch`; CI does)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no UntrainedModelWarning: these are the trained weights
        model = load_model(name, device="cpu")
    entry = table.find_pretrained(name)
    assert entry is not None
    saved = json.loads((entry.folder / "config.json").read_text())
    assert model.config.model_dump() == {**model.config.model_dump(), **saved}  # built as it was trained
