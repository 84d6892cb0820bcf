"""``jfe demo`` end to end on a small real MiniBEIR: two models, two stages, both pools, the report, and a
cached second run that trains and evaluates nothing again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jfe.data import assets

pytestmark = pytest.mark.assets

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"


@pytest.fixture(scope="module")
def small_minibeir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [n for n, source in assets.SOURCES.items() if source.required and not assets.is_fetched(n)]
    if missing:
        pytest.fail(f"assets not fetched: {missing} (run `jfe assets fetch`; CI does)")
    from jfe.data.minibeir import build_minibeir

    root = tmp_path_factory.mktemp("demo") / "minibeir"
    build_minibeir(root, seed=0, max_bases=60, image_size=64, progress=False)
    return root


def test_demo_trains_evaluates_reports_and_reruns_from_cache(small_minibeir: Path, tmp_path: Path) -> None:
    from jfe.eval.protocol import EvalResult
    from jfe_study.demo import DemoPlan, run_demo

    runs = {"jfe-mini": ("jfe-mini", ("stage1", "stage2")), "two-tower": ("two-tower-mini", ("stage1", "stage2"))}
    plan = DemoPlan(data=small_minibeir, out=tmp_path / "demo", configs=CONFIGS, runs=runs, stage1_steps=2,
                    stage2_steps=2, overrides={"batch_size": 4, "val_max_queries": 4, "val_max_pool": 8})
    report = run_demo(plan)

    for run in runs:
        for stage in ("stage1", "stage2"):
            config = json.loads((plan.out / "models" / run / stage / "train_config.json").read_text())
            assert config["steps"] == 2 and config["batch_size"] == 4  # the plan's budget reached every stage
        assert (plan.out / "models" / run / "final" / "config.json").exists()
        for pool in ("local", "global"):
            result = EvalResult.load(plan.out / "eval" / pool / run)
            assert result.pool == pool and result.n_queries > 0
            assert set(result.categories) >= {"single-modal", "conditional"}
            assert (plan.out / "eval" / pool / run / "run.trec").stat().st_size > 0
    for pool in ("local", "global"):
        text = (report / pool / "report.md").read_text()
        assert "jfe-mini" in text and "two-tower" in text and "| conditional |" in text
        assert (report / pool / "categories_r5.png").stat().st_size > 1000
    first = json.loads((report / "timings.json").read_text())
    assert set(first) == {"train/jfe-mini", "train/two-tower", "eval/jfe-mini", "eval/two-tower", "total"}

    weights = plan.out / "models" / "jfe-mini" / "final" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    run_demo(plan)  # everything is there: nothing is trained or evaluated again
    assert weights.stat().st_mtime_ns == stamp
    second = json.loads((report / "timings.json").read_text())
    assert second["total"] < first["total"]
    history = (report / "timings_history.jsonl").read_text().splitlines()
    assert [json.loads(line)["total"] for line in history] == [first["total"], second["total"]]
