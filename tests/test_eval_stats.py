"""Bootstrap intervals and plateau detection on synthetic data whose answers are known analytically."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from jfe_study.bootstrap import fusion_margin_ci, modification_margin_ci, read_per_query, stratified_bootstrap
from jfe_study.curves import common_budget, plateau, read_curve, smooth

Z95 = 1.959964


def _mean(means: list[np.ndarray]) -> np.ndarray:
    return means[0][:, 0]


def test_bootstrap_ci_of_a_mean_matches_the_normal_theory_width() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(3.0, 2.0, size=400)
    ci = stratified_bootstrap([values], _mean, n_boot=4000, seed=0)
    se = values.std() / math.sqrt(len(values))  # the bootstrap's plug-in standard error
    assert ci.estimate == pytest.approx(values.mean())
    assert ci.low < ci.estimate < ci.high
    assert (ci.high - ci.low) / 2 == pytest.approx(Z95 * se, rel=0.08)
    assert ci.estimate - ci.low == pytest.approx(ci.high - ci.estimate, rel=0.2)  # symmetric for a mean


def test_bootstrap_ci_of_a_hit_rate_matches_the_binomial_width() -> None:
    hits = np.r_[np.ones(150), np.zeros(350)]  # p = 0.3, n = 500
    ci = stratified_bootstrap([hits], _mean, n_boot=4000, seed=3)
    assert (ci.high - ci.low) / 2 == pytest.approx(Z95 * math.sqrt(0.3 * 0.7 / 500), rel=0.08)


def test_stratified_resampling_keeps_stratum_sizes() -> None:
    """Mean of two stratum means: var = (s1^2/n1 + s2^2/n2) / 4; a constant stratum adds no variance."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 1, 300), rng.normal(10, 3, 600)
    ci = stratified_bootstrap([a, b], lambda m: (m[0][:, 0] + m[1][:, 0]) / 2, n_boot=4000)
    se = math.sqrt(a.var() / len(a) + b.var() / len(b)) / 2
    assert ci.estimate == pytest.approx((a.mean() + b.mean()) / 2)
    assert (ci.high - ci.low) / 2 == pytest.approx(Z95 * se, rel=0.08)
    flat = stratified_bootstrap([np.full(50, 0.25)], _mean, n_boot=200)
    assert flat.low == flat.high == flat.estimate == 0.25


def test_paired_difference_uses_the_pairing() -> None:
    """Two runs that differ by a small per-query offset: the interval of the difference is that of the
    offsets (paired), far narrower than the unpaired one."""
    rng = np.random.default_rng(4)
    a = rng.normal(0, 1, 400)
    b = a + 0.2 + rng.normal(0, 0.1, 400)
    ci = stratified_bootstrap([np.c_[b, a]], lambda m: m[0][:, 0] - m[0][:, 1], n_boot=4000)
    d = b - a
    assert ci.estimate == pytest.approx(d.mean())
    assert (ci.high - ci.low) / 2 == pytest.approx(Z95 * d.std() / math.sqrt(400), rel=0.08)
    assert ci.low > 0.18 and ci.high < 0.22


def test_bootstrap_coverage_is_close_to_nominal() -> None:
    """Over many samples of a known distribution, the 95 % interval holds the true mean ~95 % of the time."""
    rng = np.random.default_rng(5)
    covered = 0
    trials = 300
    for t in range(trials):
        sample = rng.exponential(1.0, size=80)  # true mean 1, skewed
        ci = stratified_bootstrap([sample], _mean, n_boot=400, seed=t)
        covered += ci.low <= 1.0 <= ci.high
    assert 0.88 <= covered / trials <= 0.99


def test_bootstrap_is_seeded_and_checks_its_input() -> None:
    values = np.arange(30) % 2
    assert stratified_bootstrap([values], _mean, seed=7) == stratified_bootstrap([values], _mean, seed=7)
    assert stratified_bootstrap([values], _mean, seed=7) != stratified_bootstrap([values], _mean, seed=8)
    with pytest.raises(ValueError, match="no strata"):
        stratified_bootstrap([], _mean)
    with pytest.raises(ValueError, match="at least one query"):
        stratified_bootstrap([np.array([])], _mean)
    with pytest.raises(ValueError, match="level"):
        stratified_bootstrap([values], _mean, level=1.5)


def _entries(task_hits: dict[tuple[str, int], list[bool]], modification: str | None = None) -> list[dict]:
    out = []
    for (dataset, task), hits in task_hits.items():
        for i, hit in enumerate(hits):
            out.append({"qid": f"{dataset}:{task}:{i}", "dataset": dataset, "task": task,
                        "first_hit_rank": 1 if hit else None, "modification": modification})
    return out


def test_fusion_margin_on_known_runs() -> None:
    n = 40
    half = [i % 2 == 0 for i in range(n)]
    ours = _entries({("e", 7): [True] * n, ("e", 2): half, ("e", 1): half}, "colour")
    sf = _entries({("e", 7): half, ("e", 2): half, ("e", 1): half}, "colour")
    ff = _entries({("e", 7): [i % 4 == 0 for i in range(n)], ("e", 2): [False] * n, ("e", 1): [True] * n}, "colour")
    out = fusion_margin_ci({"ours": ours, "sf": sf, "ff": ff}, "ours", ["sf", "ff"], n_boot=500)
    # conditional (task 7): 1.0 - max(0.5, 0.25) = 0.5; mixed-modal (task 2): 0.5 - 0.5 = 0 -> fusion 0.25
    assert out["per_category"]["conditional"]["estimate"] == pytest.approx(0.5)
    assert out["per_category"]["mixed-modal"]["estimate"] == pytest.approx(0.0)
    assert out["fusion"]["estimate"] == pytest.approx(0.25)
    assert out["fusion"]["low"] < 0.25 < out["fusion"]["high"]
    # single-modal (task 1): 0.5 - max(0.5, 1.0) = -0.5 exactly in every replicate (ff always hits)
    assert out["non_fusion"]["estimate"] == pytest.approx(-0.5)
    assert out["non_fusion"]["low"] <= -0.5 <= out["non_fusion"]["high"]
    mods = modification_margin_ci({"ours": ours, "sf": sf, "ff": ff}, "ours", ["sf", "ff"], n_boot=200)
    conditional = next(r for r in mods if r["task"] == 7)
    assert conditional["modification"] == "colour" and conditional["queries"] == n
    assert conditional["margin"]["estimate"] == pytest.approx(0.5)


def test_seeds_average_per_query_and_queries_stay_paired() -> None:
    a = _entries({("e", 7): [True, True, False, False]})
    b = _entries({("e", 7): [True, False, False, False]})
    base = _entries({("e", 7): [False, False, False, False, True]})  # an extra query the others lack: dropped
    out = fusion_margin_ci({"ours": [a, b], "sf": base}, "ours", ["sf"], n_boot=100)
    assert out["fusion"]["estimate"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert out["non_fusion"] is None


def test_read_per_query_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "per_query.jsonl"
    path.write_text(json.dumps({"qid": "1", "task": 0, "first_hit_rank": 2}) + "\n{oops\n")
    with pytest.raises(Exception, match=r"per_query.jsonl:2.*malformed"):
        read_per_query(tmp_path)
    with pytest.raises(Exception, match="per_query.jsonl missing"):
        read_per_query(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------- curves
def test_plateau_of_a_saturating_exponential_is_where_the_rest_gain_is_below_threshold() -> None:
    steps = np.arange(0, 1001, 50)
    values = 0.5 * (1 - np.exp(-steps / 100))
    found = plateau(steps, values, threshold=0.005)
    # rising curve: remaining gain after s is 0.5 (e^{-s/100} - e^{-10}) <= 0.005 from s >= 460.06
    analytic = -100 * math.log(0.01 + math.exp(-10))
    assert found.reached and found.step == min(s for s in steps if s >= analytic) == 500
    assert found.value == pytest.approx(values[10])
    coarse = -100 * math.log(0.1 + math.exp(-10))
    assert plateau(steps, values, threshold=0.05).step == min(s for s in steps if s >= coarse)


def test_a_rising_curve_has_no_plateau_and_a_peak_is_one() -> None:
    steps = list(range(0, 500, 50))
    rising = plateau(steps, [0.01 * i for i in range(10)], threshold=0.005)
    assert not rising.reached and rising.step == 450
    peaked = plateau(steps, [0.1, 0.2, 0.3, 0.35, 0.34, 0.3, 0.28, 0.25, 0.2, 0.2], threshold=0.0)
    assert peaked.reached and peaked.step == 150


def test_smoothing_ignores_noise_around_a_plateau() -> None:
    rng = np.random.default_rng(0)
    steps = np.arange(0, 2001, 50)
    clean = 0.4 * (1 - np.exp(-steps / 200))
    noisy = clean + rng.normal(0, 0.01, len(steps))
    raw = plateau(steps, noisy, threshold=0.005)
    smoothed = plateau(steps, noisy, threshold=0.005, smoothing=5)
    assert smoothed.reached and 700 <= smoothed.step <= 1300  # noise-free answer: 0.4 e^{-s/200} <= .005 -> 876
    assert raw.step >= smoothed.step  # a single lucky late point pushes the unsmoothed plateau later
    np.testing.assert_allclose(smooth([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    with pytest.raises(ValueError):
        plateau([0, 1], [0.1])


def test_read_curve_per_category_and_common_budget(tmp_path: Path) -> None:
    lines = [{"step": 5, "loss": 1.0}]
    for step, v in ((0, 0.1), (50, 0.3), (100, 0.4)):
        lines.append({"step": step, "val/R@1": v / 2, "val/R@5": v, "val/R@5/task1": v, "val/R@5/task4": v + 0.1,
                      "val/R@5/task7": 2 * v})
    lines.append({"step": 50, "val/R@5": 0.35, "val/R@5/task1": 0.35, "val/R@5/task4": 0.35, "val/R@5/task7": 0.7})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    curve = read_curve(tmp_path, step_offset=10)
    assert curve.steps == [10, 60, 110]
    assert curve.values["average"] == pytest.approx([0.1, 0.35, 0.4])  # the resumed repeat wins
    assert curve.values["single-modal"] == pytest.approx([0.15, 0.35, 0.45])
    assert curve.values["conditional"] == pytest.approx([0.2, 0.7, 0.8])
    assert "cross-modal" not in curve.values
    p1, p2 = plateau([0, 50, 100], [0.1, 0.3, 0.3]), plateau([0, 50, 100], [0.1, 0.1, 0.1])
    assert common_budget([p1, p2], [0, 50, 100]) == 50
