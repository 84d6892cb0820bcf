"""The one evaluator object (jfe.eval.MBEIREvaluator): configured once, called on any model, used by jfe eval,
the trainer's validation and the study."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jfe.errors import ConfigError
from jfe.eval import MBEIREvaluator, Sample
from jfe.eval.evaluator import sample_groups
from jfe.eval.metrics import PRIMARY_METRIC, recall_at_ks, recall_k, recall_key
from jfe.eval.protocol import evaluate
from jfe.models.toy import ToyEncoder


def test_full_protocol_scores_are_the_results_average_and_categories(tiny_mbeir: Path, tmp_path: Path) -> None:
    model = ToyEncoder()
    evaluator = MBEIREvaluator(tiny_mbeir, split="test", pool="local", out_dir=tmp_path / "eval", progress=False)
    scores = evaluator(model)
    assert evaluator.primary_metric == PRIMARY_METRIC == "R@5"
    result = evaluator.last_result
    assert result is not None and (tmp_path / "eval" / "results.json").is_file()
    direct = evaluate(model, tiny_mbeir, split="test", pool="local", progress=False)
    assert direct.average == {k: v for k, v in scores.items() if "/" not in k}
    assert {k for k in scores if "/" in k} == {f"R@5/{c}" for c in direct.categories}
    assert all(scores[f"R@5/{c}"] == values["R@5"] for c, values in direct.categories.items())


def test_the_sample_is_fixed_and_scored_per_file_and_task(tiny_mbeir: Path) -> None:
    model = ToyEncoder()
    evaluator = MBEIREvaluator(tiny_mbeir, split="test", ks=(1, 5), sample=Sample(max_queries=6, max_pool=3),
                               instructions="none", progress=False)
    first, second = evaluator(model), evaluator(model)
    assert first == second and evaluator.groups() is evaluator.groups()  # read once, the same every call
    groups = sample_groups(tiny_mbeir, "test", Sample(max_queries=6, max_pool=3))
    assert sum(len(g.queries) for g in groups) <= 6 + len(groups)
    assert all(len(g.pool_ids) <= max(3, len(set().union(*g.positives))) for g in groups)
    # the scores by hand: each file ranked in its capped pool, its exclusions removed, then the mean over files
    per_file = []
    for group in groups:
        pool = model.encode(group.pool)
        scores = model.encode(group.queries) @ pool.T
        ranked = []
        for row, excluded in zip(scores, group.excluded, strict=True):
            order = [group.pool_ids[i] for i in np.argsort(-row, kind="stable") if group.pool_ids[i] not in excluded]
            ranked.append(order[:5])
        per_file.append(recall_at_ks(ranked, group.positives, (1, 5)))
    assert first["R@5"] == pytest.approx(np.mean([f["R@5"] for f in per_file]))
    assert first["R@1"] == pytest.approx(np.mean([f["R@1"] for f in per_file]))
    assert {k for k in first if k.startswith("R@5/task")} == {f"R@5/task{g.task_ids[0]}" for g in groups}


def test_a_sample_of_some_tasks(tiny_mbeir: Path) -> None:
    evaluator = MBEIREvaluator(tiny_mbeir, split="test", sample=Sample(), tasks={7}, instructions="none",
                               progress=False)
    assert [g.task_ids[0] for g in evaluator.groups()] == [7]
    assert {k for k in evaluator(ToyEncoder()) if "/" in k} == {"R@5/task7"}


def test_settings_that_do_not_go_together_are_refused(tiny_mbeir: Path) -> None:
    with pytest.raises(ConfigError, match="sampled evaluation"):
        MBEIREvaluator(tiny_mbeir, pool="global", sample=Sample())
    with pytest.raises(ConfigError, match="sampled evaluation"):
        MBEIREvaluator(tiny_mbeir, instructions="heldout", sample=Sample())
    with pytest.raises(ConfigError, match="tasks"):
        MBEIREvaluator(tiny_mbeir, tasks={7})


def test_metric_names_come_from_one_function() -> None:
    assert [recall_key(k) for k in (1, 5, 10)] == ["R@1", "R@5", "R@10"]
    assert [recall_k(name) for name in ("R@10", "R@5", "headline", "R@", "R@x")] == [10, 5, None, None, None]
