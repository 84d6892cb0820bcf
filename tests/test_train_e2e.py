"""End to end on the synthetic set: both stages lower the loss and raise val recall; the CLI drives it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from jfe.errors import ConfigError
from jfe.models.registry import load_model
from jfe.train import train
from jfe.train.commands import register
from jfe.train.synthetic import write_synthetic_mbeir


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mbeir(tmp_path_factory.mktemp("synth"))


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_stages_lower_loss_and_raise_recall(root: Path, tmp_path: Path) -> None:
    common = {"model": "toy-hash", "data": str(root), "batch_size": 16, "lr": 0.05, "warmup_steps": 3,
              "val_every": 20, "log_every": 5, "checkpoint_every": 40}
    stage1 = train({**common, "stage": "stage1", "steps": 40, "output_dir": str(tmp_path / "s1")}, progress=False)
    stage2 = train({**common, "stage": "stage2", "steps": 40, "init": str(stage1),
                    "output_dir": str(tmp_path / "s2")}, progress=False)
    for out in (tmp_path / "s1", tmp_path / "s2"):
        rows = _rows(out)
        losses = [r["loss"] for r in rows if "loss" in r]
        recall = [r["val/R@1"] for r in rows if "val/R@1" in r]
        assert rows[0]["step"] == 0 and "val/R@1" in rows[0]  # the starting point is logged
        assert losses[-1] < 0.7 * losses[0]
        assert recall[-1] > recall[0] + 0.1
        assert all(r["pairs_per_s"] > 0 for r in rows if "loss" in r)
    stage2_rows = _rows(tmp_path / "s2")
    assert {"val/R@5/task7", "val/R@5/task1"} <= set(stage2_rows[-1])  # stage 2 validates every task
    assert "val/R@5/task7" not in _rows(tmp_path / "s1")[-1]  # stage 1 only its own pairs
    model = load_model(stage2, device="cpu")
    vecs = model.encode(["red_3 green_0 blue_0", "red_0 green_0 blue_3"])
    assert vecs.shape == (2, model.dim)


def test_cli_stage_commands(root: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    config = tmp_path / "s1.toml"
    config.write_text(f'stage = "stage1"\nmodel = "toy-hash"\ndata = "{root}"\noutput_dir = "{tmp_path / "out"}"\n'
                      f"steps = 50\nbatch_size = 8\n")
    runner = CliRunner()
    result = runner.invoke(app, ["train", "stage1", "--config", str(config), "--set", "steps=3", "--quiet"])
    assert result.exit_code == 0, result.output
    final = Path(result.output.strip().splitlines()[-1])
    assert (final / "config.json").exists()
    assert json.loads((tmp_path / "out" / "train_config.json").read_text())["steps"] == 3
    result = runner.invoke(app, ["train", "stage2", "--config", str(config)])
    assert isinstance(result.exception, ConfigError) and "stage1" in str(result.exception)
    result = runner.invoke(app, ["train", "run", "--config", str(config), "--set", "steps=3", "--resume", "-q"])
    assert result.exit_code == 0 and Path(result.output.strip().splitlines()[-1]) == final


def test_trains_on_the_shared_tiny_fixture(tiny_mbeir: Path, tmp_path: Path) -> None:
    """The conftest dataset (2 training queries, no val split): stage-2 style with padded hard negatives,
    validated on its test split, where composed queries exclude their reference image."""
    final = train({"stage": "stage2", "model": "toy-hash", "data": str(tiny_mbeir), "output_dir": str(tmp_path / "o"),
                   "steps": 2, "batch_size": 2, "val_split": "test", "val_every": 1, "group_size": 1},
                  progress=False)
    assert (final / "model.safetensors").exists()
    last = _rows(tmp_path / "o")[-1]
    assert last["step"] == 2 and {"val/R@5/task0", "val/R@5/task3", "val/R@5/task7"} <= set(last)


def test_matryoshka_training_is_recorded_in_the_model_and_honoured_by_the_service(root: Path,
                                                                                  tmp_path: Path) -> None:
    from jfe.serve.inputs import check_dimensions

    common = {"model": "toy-hash", "data": str(root), "batch_size": 8, "steps": 3, "val_every": 0}
    final = train({**common, "output_dir": str(tmp_path / "m"), "matryoshka_dims": [16, 8]}, progress=False)
    model = load_model(final)
    assert model.config.matryoshka_dims == [8, 16] and model.matryoshka
    assert check_dimensions(8, model, "m") == 8  # OpenAI's `dimensions` below the dim: served
    rows = _rows(tmp_path / "m")
    assert all(r["loss"] > 0 for r in rows if "loss" in r)
    # going on without the loss clears the claim: its prefixes are no longer trained
    plain = load_model(train({**common, "model": str(final), "output_dir": str(tmp_path / "p")}, progress=False))
    assert plain.config.matryoshka_dims == [] and not plain.matryoshka
    with pytest.raises(ConfigError, match="matryoshka_dims"):
        train({**common, "output_dir": str(tmp_path / "bad"), "matryoshka_dims": [64]}, progress=False)
