"""Reports: Markdown tables with the best per row in bold, a valid PNG chart, the fusion margin summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from jfe.errors import ConfigError
from jfe.eval.protocol import EvalResult
from jfe.eval.report import margin_summary, role_of, write_report

# category -> (R@1, R@5) per run; fusion categories are mixed-modal, multi-modal, conditional
SCORES = {
    "jfe-mini": {"single-modal": (0.60, 0.90), "cross-modal": (0.50, 0.80), "conditional": (0.40, 0.70)},
    "late-fusion-sf": {"single-modal": (0.55, 0.85), "cross-modal": (0.50, 0.78), "conditional": (0.20, 0.40)},
    "late-fusion-ff": {"single-modal": (0.58, 0.88), "cross-modal": (0.45, 0.70), "conditional": (0.25, 0.50)},
    "two-tower": {"single-modal": (0.50, 0.80), "cross-modal": (0.40, 0.75), "conditional": (0.10, 0.20)},
}
TASK_OF = {"single-modal": 1, "cross-modal": 0, "conditional": 7}


def _result(name: str) -> EvalResult:
    rows, cats = [], {}
    for cat, (r1, r5) in SCORES[name].items():
        rows.append({"dataset": "mini", "task": TASK_OF[cat], "modality": "x→y", "category": cat, "pool": "local",
                     "queries": 10, "file": "f", "missing_positives": 0, "R@1": r1, "R@5": r5})
        cats[cat] = {"tasks": [TASK_OF[cat]], "rows": 1, "queries": 10, "fusion": cat == "conditional",
                     "R@1": r1, "R@5": r5}
    r1, r5 = SCORES[name]["conditional"]
    mods = [{"task": 7, "modification": "direction", "queries": 5, "non_additive": True, "R@1": r1 / 2, "R@5": r5},
            {"task": 7, "modification": "skin_tone", "queries": 5, "non_additive": False, "R@1": r1, "R@5": r5}]
    return EvalResult(run_name=name, model=name, data_root="/d", split="test", pool="local",
                      instructions="default", ks=[1, 5], rows=rows, categories=cats,
                      average={"R@1": sum(v[0] for v in SCORES[name].values()) / 3,
                               "R@5": sum(v[1] for v in SCORES[name].values()) / 3},
                      modifications=mods, non_additive=[{"task": 7, "non_additive": True, "queries": 5,
                                                         "R@1": r1 / 2, "R@5": r5}],
                      n_queries=30, notes=["a note"])


def test_roles() -> None:
    assert [role_of(n) for n in SCORES] == ["one-tower", "late-fusion", "late-fusion", "two-tower"]
    assert role_of("run7", arch="late-fusion-ff-mini") == "late-fusion" and role_of("x") == "other"


def test_margin_summary_hand_computed() -> None:
    runs = {n: _result(n) for n in SCORES}
    summary = margin_summary(runs, "jfe-mini", ["late-fusion-sf", "late-fusion-ff"])
    r5 = summary["metrics"]["R@5"]
    # per category: ours minus the best late-fusion run
    assert r5["per_category"] == pytest.approx({"single-modal": 0.90 - 0.88, "cross-modal": 0.80 - 0.78,
                                                "conditional": 0.70 - 0.50})
    assert r5["fusion"] == pytest.approx(0.20) and r5["non_fusion"] == pytest.approx(0.02)
    assert r5["gap"] == pytest.approx(0.18)
    assert summary["metrics"]["R@1"]["per_category"]["cross-modal"] == pytest.approx(0.0)


def test_write_report_markdown_and_png(tmp_path: Path) -> None:
    # results given both as objects and as result folders
    folder = tmp_path / "sf"
    folder.mkdir()
    _result("late-fusion-sf").save(folder / "results.json")
    runs = {n: _result(n) for n in SCORES if n != "late-fusion-sf"}
    runs["late-fusion-sf"] = folder
    path = write_report(runs, tmp_path / "report")
    text = path.read_text()
    # best per row in bold: single-modal R@5 0.90 by jfe-mini; conditional R@1 0.40 by jfe-mini
    single = next(line for line in text.splitlines() if line.startswith("| single-modal"))
    assert "**90.0**" in single and "**60.0**" in single and "88.0" in single and "**88.0**" not in single
    cross = next(line for line in text.splitlines() if line.startswith("| cross-modal"))
    assert cross.count("**50.0**") == 2  # a tie: both bold
    assert "## Per task" in text and "## Per modification type" in text and "direction" in text
    assert "CIRR" in text and "a note" in text
    assert "+20.0" in text and "**larger**" in text  # conditional margin and the verdict
    margins = json.loads((tmp_path / "report" / "margins.json").read_text())
    assert margins["ours"] == "jfe-mini" and sorted(margins["baselines"]) == ["late-fusion-ff", "late-fusion-sf"]
    png = tmp_path / "report" / "categories_r5.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.size[0] > 300 and image.size[1] > 200


def test_report_without_baselines_and_errors(tmp_path: Path) -> None:
    text = write_report({"jfe-mini": _result("jfe-mini")}, tmp_path / "r").read_text()
    assert "Needs one one-tower run" in text
    with pytest.raises(ConfigError):
        write_report({}, tmp_path / "r2")
    with pytest.raises(ConfigError, match="ours"):
        write_report({"a": _result("jfe-mini")}, tmp_path / "r3", ours="b")


def test_cli_report(tmp_path: Path) -> None:
    from jfe.cli import app

    dirs = []
    for name in SCORES:
        (tmp_path / name).mkdir()
        _result(name).save(tmp_path / name / "results.json")
        dirs.append(str(tmp_path / name))
    result = CliRunner().invoke(app, ["report", *dirs, "--out", str(tmp_path / "rep"),
                                      "--names", "ours-jfe,sf,ff,two-tower"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "ours-jfe" in text and "| sf | late-fusion |" in text
    bad = CliRunner().invoke(app, ["report", *dirs, "--out", str(tmp_path / "rep2"), "--names", "a,b"])
    assert bad.exit_code != 0 and isinstance(bad.exception, ConfigError)
