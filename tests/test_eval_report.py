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
from jfe_study.seeds import write_seed_report

# category -> (R@1, R@5) per run; fusion categories are mixed-modal, multi-modal, conditional
SCORES = {
    "jfe-mini": {"single-modal": (0.60, 0.90), "cross-modal": (0.50, 0.80), "conditional": (0.40, 0.70)},
    "late-fusion-sf": {"single-modal": (0.55, 0.85), "cross-modal": (0.50, 0.78), "conditional": (0.20, 0.40)},
    "late-fusion-ff": {"single-modal": (0.58, 0.88), "cross-modal": (0.45, 0.70), "conditional": (0.25, 0.50)},
    "two-tower": {"single-modal": (0.50, 0.80), "cross-modal": (0.40, 0.75), "conditional": (0.10, 0.20)},
}
TASK_OF = {"single-modal": 1, "cross-modal": 0, "conditional": 7}
ROLES = {"jfe-mini": "one-tower", "late-fusion-sf": "late-fusion", "late-fusion-ff": "late-fusion",
         "two-tower": "two-tower"}


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
    return EvalResult(run_name=name, model=name, fusion_role=ROLES[name], data_root="/d", split="test",
                      pool="local",
                      instructions="default", ks=[1, 5], rows=rows, categories=cats,
                      average={"R@1": sum(v[0] for v in SCORES[name].values()) / 3,
                               "R@5": sum(v[1] for v in SCORES[name].values()) / 3},
                      modifications=mods, non_additive=[{"task": 7, "non_additive": True, "queries": 5,
                                                         "R@1": r1 / 2, "R@5": r5}],
                      n_queries=30, notes=["a note"])


def test_roles_are_declared_not_guessed_from_names() -> None:
    assert [role_of(_result(n)) for n in SCORES] == ["one-tower", "late-fusion", "late-fusion", "two-tower"]
    bare = _result("two-tower")
    bare.fusion_role = ""  # a results.json of an older version: the arch it records declares the role
    bare.arch = "late-fusion-ff-mini"
    assert role_of(bare) == "late-fusion"
    bare.arch, bare.run_name = "", "jfe-mini-looks-like-one-tower"
    assert role_of(bare) == "other"  # a name says nothing
    from jfe.models.registry import fusion_role_of, list_models

    declared = {info.name: info.fusion_role for info in list_models()}
    assert declared["jfe-mini"] == "one-tower" and declared["two-tower-mini"] == "two-tower"
    assert declared["late-fusion-sf-mini"] == declared["late-fusion-ff-mini"] == "late-fusion"
    assert fusion_role_of("hf:/models/any") == "one-tower" and fusion_role_of("toy") == "other"


def test_a_declared_role_must_be_a_known_one(tiny_mbeir) -> None:  # noqa: ANN001
    from jfe.eval import evaluate
    from jfe.models.toy import ToyEncoder

    with pytest.raises(ConfigError, match="fusion_role must be one of one-tower"):
        evaluate(ToyEncoder(), tiny_mbeir, fusion_role="one_tower", progress=False)
    assert evaluate(ToyEncoder(), tiny_mbeir, fusion_role="one-tower", progress=False).fusion_role == "one-tower"


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


def _seed1(name: str) -> EvalResult:
    """Seed 1: like seed 0, except jfe-mini's conditional R@5 drops from 0.70 to 0.45 (below FF's 0.50)."""
    result = _result(name)
    if name == "jfe-mini":
        result.categories["conditional"]["R@5"] = 0.45
        result.average["R@5"] = (0.90 + 0.80 + 0.45) / 3
    return result


def test_seed_report_hand_computed(tmp_path: Path) -> None:
    groups = {n: [_result(n), _seed1(n)] for n in SCORES}
    text = write_seed_report(groups, tmp_path / "s").read_text()
    conditional = next(line for line in text.splitlines() if line.startswith("| conditional"))
    # jfe-mini: mean of 70 and 45 = 57.5, sample sd = 25 / sqrt(2) = 17.7; the baselines did not move
    assert "| 57.5 ± 17.7 |" in conditional and "| 50.0 ± 0.0 |" in conditional
    seed0 = next(line for line in text.splitlines() if line.startswith("| 0 |"))
    seed1 = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    # seed 0: fusion margin +20 (conditional), non-fusion +2 (single, cross), gap +18, leads all 3 categories
    assert seed0.split(" | ")[1:] == ["+20.0", "+2.0", "+18.0", "yes", "3/3 |"]
    # seed 1: conditional 45 - 50 = -5, gap -7, two of three categories led
    assert seed1.split(" | ")[1:] == ["-5.0", "+2.0", "-7.0", "no", "2/3 |"]
    assert "over seeds: 5.5 ± 17.7 points" in text and "held in **1 of 2** seeds" in text
    summary = json.loads((tmp_path / "s" / "seeds.json").read_text())
    assert summary["pattern_held"] == 1 and summary["per_seed"][1]["categories_led"] == ["single-modal",
                                                                                          "cross-modal"]
    with Image.open(tmp_path / "s" / "categories_r5_seeds.png") as image:
        assert image.size[0] > 300
    with pytest.raises(ConfigError, match="same number of repeats"):
        write_seed_report({"jfe-mini": [_result("jfe-mini")], "late-fusion-sf": []}, tmp_path / "bad")


def test_cli_seeds_report(tmp_path: Path) -> None:
    from jfe.cli import app

    dirs = []
    for seed, make in enumerate((_result, _seed1)):
        for name in SCORES:
            folder = tmp_path / f"seed{seed}" / name
            folder.mkdir(parents=True)
            make(name).save(folder / "results.json")
            dirs.append(str(folder))
    plain = CliRunner().invoke(app, ["report", *dirs, "--out", str(tmp_path / "r")])
    assert plain.exit_code != 0 and "seeds-report" in str(plain.exception)  # repeats are the study's report
    result = CliRunner().invoke(app, ["seeds-report", *dirs, "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "held in **1 of 2** seeds" in (tmp_path / "r" / "seeds.md").read_text()


def test_signed_points_never_show_negative_zero() -> None:
    from jfe.eval.report import _signed

    assert [_signed(v) for v in (-0.0004, 0.0, 0.2, -0.057)] == ["+0.0", "+0.0", "+20.0", "-5.7"]
