"""The shipped-weights study (jfe_study.ship): its report and its install step, on a tiny trained model."""

from __future__ import annotations

import json
from pathlib import Path

from jfe.models import load_model
from jfe.models import pretrained as table
from jfe_study.ship import ShipPlan, install, write_report


def _row(run: str, seed: int, full: float, compact: float, folder: Path) -> dict:
    cats = {"single-modal": full, "conditional": full - 0.1}
    return {"run": run, "seed": seed, "trained": "x", "compact": str(folder), "trained_mb": 100.0,
            "compact_mb": 12.0, "full": {"average": full, "categories": cats},
            "compact_scores": {"average": compact, "categories": {**cats, "conditional": full - 0.08}}}


def test_report_says_the_gap_per_seed_and_install_writes_seed_zero(tmp_path: Path) -> None:
    folder = load_model("two-tower-mini", device="cpu", pretrained=False, image_size=64, grid=2) \
        .save_compact(tmp_path / "compact")
    rows = [_row("two-tower", 0, 0.30, 0.305, folder), _row("two-tower", 1, 0.28, 0.27, tmp_path / "other")]
    report = {"rank": 64, "stage1_steps": 240, "stage2_steps": 480, "seeds": [0, 1], "configs": "c", "rows": rows}
    text = write_report(report, tmp_path / "out").read_text()
    assert "| 0 | 100.0 → 12.0 | 30.0 | 30.5 | +0.5 | +0.0 | +2.0 |" in text
    assert "Mean over 2 seeds: trained 29.0, compact 28.7 (-0.3)" in text
    assert "largest per-category gap of any seed is 2.0 points" in text
    assert json.loads((tmp_path / "out" / "report.json").read_text())["machine"]["cpu_count"] >= 1

    plan = ShipPlan(data=tmp_path, out=tmp_path / "out", configs=tmp_path)
    installed = install(plan, report, tmp_path / "weights")
    assert installed == [tmp_path / "weights" / "two-tower-mini"]  # seed 0 only, under its registered name
    meta = json.loads((installed[0] / table.META_NAME).read_text())
    assert meta["tag"] == "shipped" and meta["scores"]["minibeir_test_local_r5"]["average"] == 0.305
    assert meta["scores"]["trained_r5_average"] == 0.30 and meta["trained_with"]["command"] == "make shipped-weights"
    assert meta["sha256"] == table.sha256_of(installed[0] / table.WEIGHTS_NAME)
