"""benchmarks/train_throughput.py runs the real training step and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


def _load():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_toy_benchmark_writes_json(tmp_path: Path, capsys) -> None:
    bench = _load()
    out = tmp_path / "bench.json"
    assert bench.main(["--models", "toy-hash", "--steps", "2", "--batch-size", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["model"], r["stage"]) for r in result["results"]] == [("toy-hash", "stage1"), ("toy-hash", "stage2")]
    assert all(r["pairs_per_s"] > 0 and r["trainable_params"] > 0 for r in result["results"])
    assert "| toy-hash | stage2 | 8 | 1 |" in capsys.readouterr().out


def test_missing_registry_is_a_clear_message(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _load()
    monkeypatch.setattr(bench, "_registry_available", lambda: False)  # as before the models layer existed
    assert bench.main(["--models", "jfe-mini"]) == 2
    assert "jfe.models.registry" in capsys.readouterr().err
