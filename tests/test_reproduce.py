"""``jfe reproduce`` end to end at toy scale: four toy runs (named for their roles) on the synthetic
M-BEIR dataset, stage 1 on a separate synthetic 'corpus' (and the MiniBEIR fallback), learning curves,
the budget, three seeds, evaluation, bootstrap margins, charts, publishing and registration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jfe.train.synthetic import write_synthetic_mbeir

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
RUNS = {"jfe-toy": "toy-hash", "two-tower-toy": "toy-hash", "late-fusion-sf-toy": "toy-hash",
        "late-fusion-ff-toy": "toy-hash"}
# every run is the toy encoder, so the study declares which role each plays in the comparison
ROLES = {"jfe-toy": "one-tower", "two-tower-toy": "two-tower", "late-fusion-sf-toy": "late-fusion",
         "late-fusion-ff-toy": "late-fusion"}


def _dataset(root: Path, seed: int) -> Path:
    """The synthetic set with its val queries copied as the test split (the evaluation's split)."""
    write_synthetic_mbeir(root, seed=seed)
    for kind in ("query", "qrels"):
        for path in (root / kind / "val").iterdir():
            target = root / kind / "test" / path.name.replace("_val", "_test")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return root


def _configs(root: Path) -> Path:
    root.mkdir(parents=True)
    common = 'batch_size = 8\nlr = 0.05\nwarmup_steps = 2\nlog_every = 2\ncheckpoint_every = 100\n'
    (root / "stage1.toml").write_text(f'stage = "stage1"\nmodel = "toy-hash"\ndata = "x"\noutput_dir = "x"\n{common}')
    (root / "stage2.toml").write_text(f'stage = "stage2"\nmodel = "toy-hash"\ndata = "x"\noutput_dir = "x"\n{common}')
    return root


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    from jfe_study.reproduce import ReproducePlan, run_reproduce

    base = tmp_path_factory.mktemp("reproduce")
    data = _dataset(base / "minibeir", seed=0)
    (data / "README.md").write_text("synthetic\n")  # a complete build, as ensure_minibeir expects
    (data / "instructions" / "query_instructions.tsv").touch()
    corpus = write_synthetic_mbeir(base / "corpus", seed=1)
    (corpus / "README.md").write_text("a toy pretraining corpus\n")
    plan = ReproducePlan(data=data, out=base / "out", configs=_configs(base / "configs"), corpus=corpus,
                         models=RUNS, roles=ROLES, stage1_steps=3, curve_steps=8, val_every=2, val_max_queries=16,
                         val_max_pool=40, seeds=(0, 1, 2), n_boot=200, register=False,
                         # four different toy encoders (hash buckets, init) and lrs, so the runs differ
                         run_overrides={run: {"model_overrides": {"seed": i, "vocab_buckets": 64 * (i + 1)},
                                              "lr": 0.05 / (i + 1)} for i, run in enumerate(RUNS)})
    return plan, run_reproduce(plan)


def test_reproduce_writes_curves_budget_seeds_and_margins(reproduced: tuple) -> None:
    from jfe.eval.protocol import EvalResult
    from jfe.eval.report import margin_summary

    plan, report = reproduced
    summary = json.loads((plan.out / "curves.json").read_text())
    assert summary["stage1"]["corpus_used"] is True
    for run in RUNS:
        stage1 = json.loads((plan.out / "models" / run / "seed0" / "stage1" / "train_config.json").read_text())
        assert stage1["data"] == str(plan.corpus) and stage1["steps"] == 3  # the corpus, same budget for all
        assert stage1["task_weights"] == {"0": 1.0, "1": 1.0, "3": 1.0, "7": 1.0}
        assert summary["curves"][run]["steps"] == [0, 2, 4, 6, 8]
        assert set(summary["curves"][run]["values"]) >= {"average", "cross-modal", "single-modal", "conditional"}
    budget = summary["budget"]
    assert budget in (2, 4, 6, 8) and budget == max(2, *(p["step"] for p in summary["plateaus"].values()))
    for run in RUNS:
        for seed in (1, 2):
            cfg = json.loads((plan.out / "models" / run / f"seed{seed}" / "stage2" / "train_config.json").read_text())
            assert cfg["steps"] == budget
            assert cfg["seed"] == seed and cfg["schedule"] == "constant"
            # stage 1 is shared: every seed's stage 2 starts from seed 0's stage-1 model, none trains its own
            assert cfg["model"] == str(plan.out / "models" / run / "seed0" / "stage1" / "final")
            assert not (plan.out / "models" / run / f"seed{seed}" / "stage1").exists()
        assert json.loads((plan.out / "models" / run / "seed0" / "budget.json").read_text())["budget"] == budget
        # once the budget's model is out only the curve's newest checkpoint stays, with its trainer state
        kept = sorted((plan.out / "models" / run / "seed0" / "curve" / "checkpoints").glob("step-*"))
        assert [p.name for p in kept] == ["step-0000008"] and (kept[0] / "trainer_state.pt").exists()
        assert (plan.out / "models" / run / "seed0" / "curve" / "final" / "config.json").exists()
    curve_cfg = json.loads((plan.out / "models" / "jfe-toy" / "seed0" / "curve" / "train_config.json").read_text())
    assert curve_cfg["val_max_queries"] == 16 and curve_cfg["val_every"] == 2 and curve_cfg["schedule"] == "constant"
    text = report.read_text()
    assert "pretraining corpus" in text and f"**Budget: {budget} stage-2 steps**" in text
    assert "| pooled over seeds |" in text and "| seed 2 |" in text and "**Verdict (local pool):**" in text
    assert "| 7 | more red |" in text  # the per-modification table
    assert "+0.0 [+0.0, +0.0] | +0.0 [+0.0, +0.0]" not in text  # the runs differ: margins are not all zero
    for name in ("learning_curves.png", "local_margins_r5.png", "local/seeds.md", "local/categories_r5_seeds.png"):
        assert (report.parent / name).stat().st_size > 500, name
    # the bootstrap point estimate of one seed equals the report's margin summary for that seed
    margins = json.loads((report.parent / "reproduce.json").read_text())["pools"]["local"]
    for i, seed in enumerate(plan.seeds):
        results = {run: EvalResult.load(plan.out / "eval" / "local" / f"seed{seed}" / run) for run in RUNS}
        expected = margin_summary(results, "jfe-toy", ["late-fusion-sf-toy", "late-fusion-ff-toy"],
                                  metrics=("R@5",))["metrics"]["R@5"]
        assert margins["per_seed_ci"][i]["fusion"]["estimate"] == pytest.approx(expected["fusion"])
        assert margins["per_seed_ci"][i]["non_fusion"]["estimate"] == pytest.approx(expected["non_fusion"])
        box = margins["per_seed_ci"][i]["fusion"]
        assert box["low"] <= box["estimate"] <= box["high"]


def test_rerun_is_cached_and_publish_rewrites_links(reproduced: tuple, tmp_path: Path) -> None:
    from jfe_study.reproduce import publish, run_reproduce

    plan, report = reproduced
    weights = plan.out / "models" / "jfe-toy" / "seed1" / "stage2" / "final" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert run_reproduce(plan) == report
    assert weights.stat().st_mtime_ns == stamp  # nothing retrained
    files = {p.name for p in publish(report.parent, tmp_path / "docs")}
    assert {"reproduce_report.md", "reproduce_summary.json", "reproduce_learning_curves.png",
            "reproduce_local_seeds.md"} <= files
    text = (tmp_path / "docs" / "reproduce_report.md").read_text()
    assert "](reproduce_learning_curves.png)" in text and "](reproduce_local_seeds.md)" in text


def test_a_longer_curve_continues_and_seeds_at_another_budget_are_refused(reproduced: tuple,
                                                                         tmp_path: Path) -> None:
    from dataclasses import replace

    from jfe.errors import ConfigError
    from jfe_study.reproduce import run_reproduce

    plan, _ = reproduced
    out = tmp_path / "out"
    shutil.copytree(plan.out, out)
    seed1 = out / "models" / "two-tower-toy" / "seed1" / "stage2"
    config = json.loads((seed1 / "train_config.json").read_text())
    (seed1 / "train_config.json").write_text(json.dumps({**config, "steps": 999}))
    with pytest.raises(ConfigError, match=f"delete them to retrain at .*{seed1}"):
        run_reproduce(replace(plan, out=out))
    curve = out / "models" / "jfe-toy" / "seed0" / "curve"
    before = [json.loads(line) for line in (curve / "metrics.jsonl").read_text().splitlines()]
    run_reproduce(replace(plan, out=out, curve_steps=12, seeds=(0,)))
    after = [json.loads(line) for line in (curve / "metrics.jsonl").read_text().splitlines()]
    assert after[:len(before)] == before  # continued from step 8, not retrained from 0
    summary = json.loads((out / "curves.json").read_text())
    assert summary["curves"]["jfe-toy"]["steps"] == [0, 2, 4, 6, 8, 10, 12]
    budget = json.loads((out / "models" / "jfe-toy" / "seed0" / "budget.json").read_text())["budget"]
    assert budget == summary["budget"]


def test_without_a_corpus_stage1_falls_back_loudly_and_models_register(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from jfe.models import pretrained, registry
    from jfe_study.reproduce import ReproducePlan, run_reproduce, stage1_source

    monkeypatch.setitem(registry._MODELS, "toy-hash", registry.ModelInfo("toy-hash", "toy-hash", "toy"))
    data = _dataset(tmp_path / "minibeir", seed=0)
    (data / "README.md").write_text("synthetic\n")
    plan = ReproducePlan(data=data, out=tmp_path / "out", configs=_configs(tmp_path / "configs"),
                         corpus=tmp_path / "no-corpus",
                         models={"jfe-toy": "toy-hash", "late-fusion-sf-toy": "toy-hash"}, roles=ROLES,
                         stage1_steps=2, curve_steps=4, val_every=2, val_max_queries=8, val_max_pool=20, seeds=(0,),
                         n_boot=100, threshold=1.0)  # everything is flat: the budget is the first step
    source = stage1_source(plan)
    assert not source["corpus_used"] and "PRETRAINING CORPUS NOT USED" in source["message"]
    report = run_reproduce(plan)
    assert "PRETRAINING CORPUS NOT USED" in report.read_text()
    from jfe.hardware import cpu_model_name
    assert f"Machine: {cpu_model_name()}" in report.read_text() and "CPU flags:" in report.read_text()
    stage1 = json.loads((plan.out / "models" / "jfe-toy" / "seed0" / "stage1" / "train_config.json").read_text())
    assert stage1["data"] == str(data)
    assert json.loads((plan.out / "curves.json").read_text())["budget"] == 2
    assert "raised to the first validated step" in report.read_text()
    taken = json.loads((plan.out / "models" / "jfe-toy" / "seed0" / "budget.json").read_text())
    assert taken["from"].endswith("step-0000002/model")  # seed 0 at the budget: the curve's checkpoint
    entry = pretrained.find_pretrained("toy-hash")  # the last run registered wins the name
    assert entry is not None and entry.tag == "reproduce" and "stage2" in entry.trained_with
    assert entry.trained_with["budget"] == json.loads((plan.out / "curves.json").read_text())["budget"]


def test_stage1_on_minibeir_is_a_stated_choice_even_when_a_corpus_is_built(tmp_path: Path) -> None:
    from jfe.errors import ConfigError
    from jfe_study.reproduce import ReproducePlan, stage1_source

    corpus = tmp_path / "corpus"
    (corpus / "query" / "train").mkdir(parents=True)
    (corpus / "README.md").write_text("built\n")
    (corpus / "query" / "train" / "mbeir_icons_task0_train.jsonl").write_text("")
    plan = ReproducePlan(data=tmp_path / "minibeir", out=tmp_path / "out", configs=tmp_path, corpus=corpus)
    assert stage1_source(plan)["corpus_used"] and stage1_source(plan)["task_weights"] == {0: 1.0}
    plan.stage1_data = "minibeir"
    chosen = stage1_source(plan)
    # MiniBEIR's data with the stage-1 config's own task weights, and not reported as a fallback
    assert chosen["data"] == plan.data and chosen["task_weights"] is None and not chosen["corpus_used"]
    assert "--stage1-data minibeir" in chosen["message"] and "NOT USED" not in chosen["message"]
    plan.stage1_data = "imagenet"
    with pytest.raises(ConfigError, match="stage1_data"):
        stage1_source(plan)


@pytest.mark.slow
@pytest.mark.assets
def test_reproduce_with_the_real_models_and_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped configs/demo recipe with the real jfe-mini and late-fusion-sf-mini, a few steps each, on a
    small real MiniBEIR: the orchestration runs the real models and registers them in the pretrained table."""
    from jfe.data import assets
    from jfe.data.minibeir import build_minibeir
    from jfe.models import pretrained
    from jfe_study.reproduce import ReproducePlan, run_reproduce

    missing = [n for n, source in assets.SOURCES.items() if source.required and not assets.is_fetched(n)]
    if missing:
        pytest.fail(f"assets not fetched: {missing} (run `jfe assets fetch`; CI does)")
    data = tmp_path / "minibeir"
    build_minibeir(data, seed=0, max_bases=40, image_size=64, progress=False)
    plan = ReproducePlan(data=data, out=tmp_path / "out", configs=CONFIGS, corpus=None,
                         models={"jfe-mini": "jfe-mini", "late-fusion-sf": "late-fusion-sf-mini"}, stage1_steps=2,
                         curve_steps=4, val_every=2, val_max_queries=8, val_max_pool=20, seeds=(0, 1), n_boot=100,
                         overrides={"batch_size": 4})
    report = run_reproduce(plan)
    assert "**Verdict (local pool):**" in report.read_text()
    entry = pretrained.find_pretrained("jfe-mini")
    assert entry is not None and entry.tag == "reproduce"
    from jfe.train.config import load_config

    recipe = load_config(CONFIGS / "stage2.toml")  # the demo preset extends jfe-mini's own stage 2
    assert entry.trained_with["stage2"]["lr"] == recipe.lr  # the recipe's config travels along
    assert entry.trained_with["stage2"]["temperature"] == recipe.temperature


def test_timings_keep_each_steps_longest_time_and_this_invocations_total(tmp_path: Path) -> None:
    from jfe_study.reproduce import _keep_longest

    path = tmp_path / "timings.json"
    _keep_longest(path, {"curve/a": 50.0})  # an interrupted first invocation: its finished step is kept
    merged = _keep_longest(path, {"curve/a": 0.1, "seed1/a": 30.0, "total": 31.0})  # the rerun skips curve/a
    assert merged == {"curve/a": 50.0, "seed1/a": 30.0, "total": 31.0}
    merged = _keep_longest(path, {"curve/a": 0.0, "seed1/a": 0.0, "eval": 9.0, "total": 9.5})
    assert merged == {"curve/a": 50.0, "seed1/a": 30.0, "eval": 9.0, "total": 9.5}
    assert json.loads(path.read_text()) == merged


def test_model_choices_swap_one_run_and_name_bad_pairs() -> None:
    from jfe.errors import ConfigError
    from jfe_study.demo import MODELS
    from jfe_study.reproduce import model_choices

    assert model_choices(None) == {} and model_choices([]) == {}  # the plan then uses the demo's four
    chosen = model_choices(["jfe-mini = jfe-mini"])
    assert chosen == {**MODELS, "jfe-mini": "jfe-mini"} and list(chosen) == list(MODELS)
    with pytest.raises(ConfigError, match="unknown run 'clip'.*jfe-mini, two-tower"):
        model_choices(["clip=jfe-mini"])
    with pytest.raises(ConfigError, match="RUN=MODEL"):
        model_choices(["jfe-mini"])
