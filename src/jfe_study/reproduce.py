"""``jfe reproduce``: the paper's comparison at convergence (what ``make reproduce`` runs).

For every model of the comparison (jfe-mini and the three baselines, same recipe and budget):

1. **Stage 1** on the pretraining corpus (``--corpus``, an M-BEIR-layout folder of image-text pairs) when
   it is built, else on MiniBEIR's own stage-1 pairs (said loudly, and recorded in the report); the same
   number of steps for every model and seed.
2. **Learning curve** (seed 0): stage 2 on MiniBEIR for ``curve_steps`` steps at a constant learning rate
   after warm-up, validated every ``val_every`` steps on capped val pools (val R@5 per task, hence per
   category) with a checkpoint at each validation. Because the schedule does not depend on the run's
   length, the checkpoint at step *B* is the model a budget of *B* steps gives.
3. **Budget**: each model's plateau (:func:`jfe_study.curves.plateau`: the step after which its average val
   R@5 never gains more than ``threshold``); the common budget is the latest of them.
4. **Seeds**: seed 0 is the curve run's checkpoint at the budget; the other seeds train stage 2 (to the
   budget) again from the same stage-1 model (``shared_stage1``, the default, as the paper's seeds vary the
   instruction tuning of one adapted model), or stage 1 and stage 2 again (``--stage1-per-seed``).
5. **Evaluation** of every model and seed on the test split, and the **report**: learning-curve and margin
   charts, per-category mean ± sd over seeds (``write_seed_report``), bootstrap 95 % intervals over queries
   for the fusion margin (jfe-mini minus the best late-fusion baseline, on fusion and non-fusion categories,
   queries resampled within each task, seeds averaged per query), per modification type, and a verdict.
   ``--publish DIR`` copies the report under ``DIR`` (``docs/results``) with a ``reproduce_`` prefix.

Finished steps are skipped, so an interrupted run continues; the trained seed-0 models are registered in
the pretrained table (tag ``reproduce``) at the end.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import typer

from jfe.cli_options import DEFAULT_PRECISION, PrecisionOption
from jfe.data.records import CATEGORIES, FUSION_CATEGORIES
from jfe.errors import ConfigError
from jfe.eval.metrics import PRIMARY_METRIC as METRIC
from jfe.paths import atomic_write

REPORT_NAME = "reproduce.md"
CURVE_CHART = "learning_curves.png"
MARGIN_CHART = "margins_r5.png"
TARGET_FUSION, TARGET_OTHER = 0.05, 0.0  # the "done when": >= +5 R@5 on fusion, >= 0 elsewhere


@dataclass
class ReproducePlan:
    data: Path  # MiniBEIR (built if missing)
    out: Path
    configs: Path  # stage1.toml and stage2.toml (the demo's recipe by default)
    corpus: Path | None = None  # stage-1 pretraining corpus; None or not built -> MiniBEIR's stage-1 pairs
    # "corpus": stage 1 on the corpus when built; "minibeir": on MiniBEIR's own caption and text pairs by choice
    # (the stage-1 config's task weights), for every model alike
    stage1_data: str = "corpus"
    models: dict[str, str] = field(default_factory=dict)  # run name -> model name; default: the demo's four
    # run name -> fusion role in the comparison; default: what each run's model declares (Encoder.fusion_role)
    roles: dict[str, str] = field(default_factory=dict)
    # `make reproduce` passes its published settings (Makefile REPRODUCE_ARGS, README); stage 1 is trained
    # once per model and shared by the seeds, so its steps are paid once per model, not per seed
    stage1_steps: int = 180
    shared_stage1: bool = True  # False: every seed retrains stage 1 with its own seed
    curve_steps: int = 200
    val_every: int = 40
    val_max_queries: int = 96
    val_max_pool: int = 100
    seeds: tuple[int, ...] = (0, 1, 2)
    threshold: float = 0.005  # val R@5 gain (fraction) below which a curve counts as flat
    smoothing: int = 1
    n_boot: int = 2000
    split: str = "test"
    pools: tuple[str, ...] = ("local",)
    eval_max_queries: int | None = None  # per query file; smoke runs only
    overrides: dict[str, Any] = field(default_factory=dict)  # training-config keys for every stage and model
    run_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # run name -> extra keys (both stages)
    register: bool = True
    prune: bool = True  # drop the curve's older checkpoints once the budget's model is extracted
    precision: str = "auto"  # training and evaluation alike; "fp32" gives the same numbers on every CPU


def _log(message: str) -> None:
    typer.secho(f"[reproduce {time.strftime('%H:%M:%S')}] {message}", fg=typer.colors.CYAN, err=True)


def model_choices(pairs: list[str] | None) -> dict[str, str]:
    """The four runs and their models, the demo's unless ``RUN=MODEL`` pairs replace some ({} = the demo's)."""
    from jfe_study.demo import MODELS

    if not pairs:
        return {}
    chosen = dict(MODELS)
    for pair in pairs:
        run, sep, name = (part.strip() for part in pair.partition("="))
        if not sep or not name:
            raise ConfigError(f"--model takes RUN=MODEL, not {pair!r}")
        if run not in MODELS:
            raise ConfigError(f"unknown run {run!r} in --model: expected one of {', '.join(MODELS)}")
        chosen[run] = name
    return chosen


def _models(plan: ReproducePlan) -> dict[str, str]:
    from jfe_study.demo import MODELS

    return plan.models or dict(MODELS)


# ------------------------------------------------------------------------------------------- stage 1 data
def corpus_tasks(root: Path) -> dict[int, float]:
    """Task ids of a corpus's training query files (``mbeir_<name>_task<N>_train.jsonl``), weight 1 each."""
    import re

    found = set()
    for path in (root / "query" / "train").glob("*.jsonl"):
        match = re.search(r"_task(\d+)_", path.name)
        if match:
            found.add(int(match.group(1)))
    return {t: 1.0 for t in sorted(found)}


def stage1_source(plan: ReproducePlan) -> dict[str, Any]:
    """Where stage 1 trains: ``{"data", "corpus_used", "message", "task_weights"}``."""
    if plan.stage1_data == "minibeir":
        return {"data": plan.data, "corpus_used": False, "task_weights": None,
                "message": f"stage 1 on MiniBEIR's own image-caption and text pairs ({plan.data}), chosen with "
                           "--stage1-data minibeir: on MiniBEIR's test the corpus did not help (docs/results/"
                           "experiments.md, issue 11)"}
    if plan.stage1_data != "corpus":
        raise ConfigError(f"stage1_data must be 'corpus' or 'minibeir', not {plan.stage1_data!r}")
    corpus = plan.corpus
    if corpus is not None and (corpus / "README.md").is_file() and corpus_tasks(corpus):
        return {"data": corpus, "corpus_used": True, "task_weights": corpus_tasks(corpus),
                "message": f"stage 1 on the pretraining corpus {corpus} (tasks {sorted(corpus_tasks(corpus))})"}
    why = "no corpus given" if corpus is None else f"no built corpus at {corpus} (README.md or train queries missing)"
    return {"data": plan.data, "corpus_used": False, "task_weights": None,
            "message": f"PRETRAINING CORPUS NOT USED: {why}; stage 1 falls back to MiniBEIR's own image-caption "
                       f"and text pairs ({plan.data}). Build the corpus and rerun for the issue's comparison."}


# ------------------------------------------------------------------------------------------------ training
def val_caps(plan: ReproducePlan) -> dict[str, int]:
    """The curves' validation caps: the plan's, unless ``--set`` gave others (the report names these)."""
    return {key: int(plan.overrides.get(key, getattr(plan, key))) for key in ("val_max_queries", "val_max_pool")}


def _train(plan: ReproducePlan, run: str, stage: str, overrides: dict[str, Any]) -> Path:
    from jfe.train import train

    # the plan's validation caps are defaults `--set` may change; the orchestration's own keys (model, data,
    # output_dir, seed, steps, schedule) always win
    caps = val_caps(plan) if stage == "stage2" else {}
    merged = {"precision": plan.precision, **caps, **plan.overrides, **plan.run_overrides.get(run, {}), **overrides}
    return train(plan.configs / f"{stage}.toml", overrides=merged, resume=True, progress=True)


def train_stage1(plan: ReproducePlan, run: str, model: str, seed: int, source: dict[str, Any]) -> Path:
    overrides: dict[str, Any] = {"model": model, "data": str(source["data"]), "steps": plan.stage1_steps,
                                 "seed": seed, "output_dir": str(plan.out / "models" / run / f"seed{seed}" / "stage1")}
    if source["task_weights"]:
        overrides["task_weights"] = source["task_weights"]
    _log(f"{run} seed {seed}: stage 1, {plan.stage1_steps} steps on {source['data']}")
    return _train(plan, run, "stage1", overrides)


def _stage2_overrides(plan: ReproducePlan, run: str, seed: int, init: Path, folder: str) -> dict[str, Any]:
    # constant lr after warm-up: a checkpoint at step B is then what a B-step budget gives
    return {"model": str(init), "init": "", "data": str(plan.data), "seed": seed, "schedule": "constant",
            "output_dir": str(plan.out / "models" / run / f"seed{seed}" / folder)}


def train_curve(plan: ReproducePlan, run: str, init: Path) -> Path:
    """Stage 2 of seed 0 up to ``curve_steps``, validated (and checkpointed) every ``val_every`` steps."""
    points = plan.curve_steps // plan.val_every + 1
    overrides = {**_stage2_overrides(plan, run, 0, init, "curve"), "steps": plan.curve_steps,
                 "val_every": plan.val_every, "checkpoint_every": plan.val_every, "keep_checkpoints": points}
    _log(f"{run}: learning curve, stage 2 up to {plan.curve_steps} steps, val every {plan.val_every}")
    final = _train(plan, run, "stage2", overrides)
    for ckpt in sorted((final.parent / "checkpoints").glob("step-*"))[:-1]:  # done: only the models are needed
        (ckpt / "trainer_state.pt").unlink(missing_ok=True)
    return final.parent


def extract_budget_model(plan: ReproducePlan, run: str, curve_dir: Path, budget: int) -> Path:
    """Seed 0's model at ``budget``: the curve run's checkpoint at that step (its final model at the end)."""
    final = plan.out / "models" / run / "seed0" / "final"
    marker = final.parent / "budget.json"
    if (final / "config.json").exists():
        done = json.loads(marker.read_text()) if marker.exists() else {}
        if done.get("budget") == budget:
            return final
        # a copy of a curve checkpoint, nothing trained: taken again at the new budget (a longer curve)
        _log(f"{run} seed 0: the budget moved from {done.get('budget')} to {budget}; re-extracting")
        shutil.rmtree(final)
    source = curve_dir / "final" if budget >= plan.curve_steps else \
        curve_dir / "checkpoints" / f"step-{budget:07d}" / "model"
    if not (source / "config.json").exists():
        raise ConfigError(f"no checkpoint of {run} at step {budget} in {curve_dir} (pruned? delete it to rerun)")
    from jfe.models import load_model

    load_model(source, device="cpu").save_pretrained(final)
    with atomic_write(marker) as handle:
        handle.write(json.dumps({"budget": budget, "from": str(source)}) + "\n")
    if plan.prune:  # only the newest checkpoint (with its trainer state): a longer --curve-steps continues it
        for ckpt in sorted((curve_dir / "checkpoints").glob("step-*"))[:-1]:
            shutil.rmtree(ckpt, ignore_errors=True)
    return final


def _seed_budgets(plan: ReproducePlan, models: dict[str, str]) -> dict[Path, int]:
    """The stage-2 folder of every finished seed (not 0) and the steps it was trained for."""
    found = {}
    for run in models:
        for seed in [s for s in plan.seeds if s != 0]:
            folder = plan.out / "models" / run / f"seed{seed}" / "stage2"
            if (folder / "final" / "config.json").exists():
                found[folder] = int(json.loads((folder / "train_config.json").read_text())["steps"])
    return found


def train_seed(plan: ReproducePlan, run: str, model: str, seed: int, budget: int, source: dict[str, Any]) -> Path:
    """Seed ``seed`` of ``run`` at ``budget`` stage-2 steps, from the shared (seed-0) stage 1 or its own."""
    final = plan.out / "models" / run / f"seed{seed}" / "stage2" / "final"
    # shared: the paper's seeds vary instruction tuning over one adapted model; train_stage1 of seed 0 is done
    # by now (the learning curve started from it), so this only finds its folder
    stage1 = train_stage1(plan, run, model, 0 if plan.shared_stage1 else seed, source)
    _log(f"{run} seed {seed}: stage 2, {budget} steps")
    return _train(plan, run, "stage2", {**_stage2_overrides(plan, run, seed, stage1, "stage2"), "steps": budget,
                                   "val_every": 0}) if not (final / "config.json").exists() else final


# --------------------------------------------------------------------------------------------- evaluation
def evaluate_all(plan: ReproducePlan, checkpoints: dict[tuple[str, int], Path]) -> dict[str, dict[str, list[Path]]]:
    """pool -> run -> eval folders by seed (in ``plan.seeds`` order)."""
    from jfe.eval.evaluator import MBEIREvaluator
    from jfe.models import load_model

    out: dict[str, dict[str, list[Path]]] = {pool: {} for pool in plan.pools}
    for (run, seed), checkpoint in checkpoints.items():
        model = None
        for pool in plan.pools:
            folder = plan.out / "eval" / pool / f"seed{seed}" / run
            out[pool].setdefault(run, []).append(folder)
            if (folder / "results.json").exists():
                continue
            model = model or load_model(checkpoint).set_precision(plan.precision)
            _log(f"{run} seed {seed}: evaluating ({plan.split} split, {pool} pool)")
            MBEIREvaluator(plan.data, split=plan.split, pool=pool, out_dir=folder, run_name=run,
                           cache_dir=plan.out / "eval" / "embeddings" / f"seed{seed}" / run, progress=False,
                           max_queries=plan.eval_max_queries, fusion_role=plan.roles.get(run)).result(model)
    return out


# ------------------------------------------------------------------------------------------------ charts
def _plt():  # noqa: ANN202 - matplotlib is imported lazily, headless
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve_chart(curves: dict[str, Any], budget: int, path: Path) -> None:
    """One panel per category (and the average): val R@5 against stage-2 steps, a line per model."""
    plt = _plt()
    panels = ["average", *[c for c in CATEGORIES if any(c in cv["values"] for cv in curves.values())]]
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=100, squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for run, curve in curves.items():
            if panel in curve["values"]:
                ax.plot(curve["steps"], 100 * np.asarray(curve["values"][panel], dtype=float), marker="o",
                        markersize=3, label=run)
        ax.axvline(budget, color="grey", linestyle="--", linewidth=1)
        ax.set_title(panel + (" (fusion)" if panel in FUSION_CATEGORIES else ""), fontsize=10)
        ax.set_xlabel("stage-2 steps")
        ax.set_ylabel(f"val {METRIC} (%)")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Learning curves (seed 0); dashed: the chosen budget, {budget} steps", fontsize=11)
    fig.tight_layout()
    with atomic_write(path, mode="wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)


def margin_chart(margins: dict[str, Any], per_seed: list[dict[str, Any]], path: Path) -> None:
    """Ours minus the best late-fusion baseline per category and group, with 95 % intervals; dots = seeds."""
    plt = _plt()
    labels = [*margins["per_category"], "fusion", "non_fusion"]
    boxes = [margins["per_category"][c] for c in margins["per_category"]] + [margins["fusion"], margins["non_fusion"]]
    keep = [(label, box) for label, box in zip(labels, boxes, strict=True) if box is not None]
    fig, ax = plt.subplots(figsize=(1.3 * len(keep) + 3, 4), dpi=100)
    x = np.arange(len(keep))
    est = np.array([100 * b["estimate"] for _, b in keep])
    err = np.array([[100 * (b["estimate"] - b["low"]) for _, b in keep], [100 * (b["high"] - b["estimate"])
                                                                         for _, b in keep]])
    colours = ["tab:orange" if label in FUSION_CATEGORIES or label == "fusion" else "tab:blue" for label, _ in keep]
    ax.bar(x, est, color=colours, yerr=err, capsize=4)
    for seed_margins in per_seed:
        ys = [seed_margins["per_category"].get(label) if label in seed_margins["per_category"] else
              seed_margins.get(label) for label, _ in keep]
        ax.scatter(x, [100 * y if y is not None else np.nan for y in ys], s=8, color="black", zorder=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axhline(100 * TARGET_FUSION, color="tab:orange", linestyle=":", linewidth=1)
    ax.set_xticks(x, [label.replace("_", "-") for label, _ in keep], rotation=20)
    ax.set_ylabel(f"{METRIC} margin (points)")
    ax.set_title(f"{margins['ours']} minus best of {', '.join(margins['baselines'])}: 95 % bootstrap CI over "
                 f"queries; dots = seeds", fontsize=9)
    fig.tight_layout()
    with atomic_write(path, mode="wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ report
def _pts(value: float | None) -> str:
    return "–" if value is None else f"{round(100 * value, 1) + 0.0:+.1f}"


def _ci(box: dict[str, float] | None) -> str:
    return "–" if box is None else f"{_pts(box['estimate'])} [{_pts(box['low'])}, {_pts(box['high'])}]"


def verdict(margins: dict[str, Any]) -> str:
    """The issue's target, judged on the pooled estimates and their intervals."""
    fusion, other = margins["fusion"], margins["non_fusion"]
    if fusion is None or other is None:
        return "No verdict: the evaluation lacks fusion or non-fusion categories."
    met = fusion["estimate"] >= TARGET_FUSION and other["estimate"] >= TARGET_OTHER
    sure = fusion["low"] > 0
    text = (f"Fusion margin {_ci(fusion)}, non-fusion margin {_ci(other)} {METRIC} points (95 % bootstrap CI). "
            f"Target (fusion ≥ +{100 * TARGET_FUSION:.0f}, non-fusion ≥ {100 * TARGET_OTHER:+.0f}): "
            f"**{'met' if met else 'NOT met'}**. ")
    text += ("The one tower's fusion advantage is positive beyond query-sampling noise." if sure else
             "The one tower's fusion margin is not positive beyond query-sampling noise.")
    return text


def _modification_table(mods: list[dict[str, Any]], runs: dict[str, list[Any]]) -> list[str]:
    from jfe_study.seeds import mean_sd

    lines = ["| task | modification | queries | " + " | ".join(runs) + " | margin [95 % CI] |",
             "|---:|---|---:|" + "---:|" * len(runs) + "---:|"]
    for row in sorted(mods, key=lambda r: (r["task"], r["modification"])):
        cells = []
        for results in runs.values():
            values = [m[METRIC] for r in results for m in r.modifications
                      if m["task"] == row["task"] and str(m["modification"]) == row["modification"]]
            cells.append(mean_sd(values) if values else "–")
        lines.append(f"| {row['task']} | {row['modification']} | {row['queries']} | " + " | ".join(cells)
                     + f" | {_ci(row['margin'])} |")
    return lines


def _curves_section(plan: ReproducePlan, info: dict[str, Any], curves: dict[str, Any]) -> list[str]:
    """The report's head: how stage 1 and 2 ran, each model's plateau and the budget chosen from them."""
    budget, caps = info["budget"], val_caps(plan)
    lines = ["# JFE reproduce: the comparison at convergence", "",
             f"Stage 1: {info['stage1']['message'].rstrip('.')}. {plan.stage1_steps} steps for every model"
             + (", trained once (seed 0) and shared by every seed: seeds vary stage 2 only." if plan.shared_stage1
                else " and seed, retrained per seed."),
             f"Stage 2 on `{plan.data}`; learning curves (seed 0) up to {plan.curve_steps} steps at a constant "
             f"lr after warm-up, val {METRIC} every {plan.val_every} steps on capped val pools "
             f"({caps['val_max_queries']} queries, ≤ {caps['val_max_pool']} candidates per pool).",
             f"Seeds: {', '.join(map(str, plan.seeds))}. Machine: {info['machine']}. Wall time of this "
             f"invocation: {info['timings'].get('total', float('nan')):.0f} s (it reuses what earlier invocations "
             "finished; each step's own cost, the longest any invocation took, is in timings.json).", "",
             "## Learning curves and the budget", "",
             f"Plateau: the first validated step after which the average val {METRIC} (smoothed over "
             f"{plan.smoothing} point(s)) never gains more than {100 * plan.threshold:.1f} points.", "",
             f"| model | plateau step | reached | val {METRIC} there | best val {METRIC} |", "|---|---:|---|---:|---:|"]
    for run, p in info["plateaus"].items():
        best = max(curves[run]["values"]["average"])
        lines.append(f"| {run} | {p['step']} | {'yes' if p['reached'] else 'NO (still rising)'} | "
                     f"{100 * p['value']:.1f} | {100 * best:.1f} |")
    latest = max(p["step"] for p in info["plateaus"].values())
    why = "the latest plateau" if latest == budget else f"the latest plateau is step {latest}; raised to the " \
        "first validated step so that stage 2 trains at all"
    lines += ["", f"**Budget: {budget} stage-2 steps** ({why})" +
              ("" if all(p["reached"] for p in info["plateaus"].values()) else
               " — at least one curve had not flattened by the end: raise `--curve-steps` for a true plateau"),
              "", f"![learning curves]({CURVE_CHART})", ""]
    return lines


def _margin_tables(plan: ReproducePlan, margins: dict[str, Any], seed_cis: list[dict[str, Any]], ours: str,
                   baselines: list[str], chart: str) -> list[str]:
    """Pooled and per-seed fusion / non-fusion margins with their intervals, then per category and the chart."""
    from jfe.eval.report import backticked

    lines = ["", f"### Fusion margin: `{ours}` minus the best of {backticked(baselines)}", "",
             f"{METRIC} points; 95 % bootstrap CI over queries (resampled within each dataset/task, "
             f"{plan.n_boot} replicates, seed 0); 'pooled' scores each query by its hit rate over the seeds.", "",
             "| | fusion | non-fusion |", "|---|---:|---:|",
             f"| pooled over seeds | {_ci(margins['fusion'])} | {_ci(margins['non_fusion'])} |"]
    for seed, ci in zip(plan.seeds, seed_cis, strict=True):
        lines.append(f"| seed {seed} | {_ci(ci['fusion'])} | {_ci(ci['non_fusion'])} |")
    lines += ["", "| category | fusion | margin [95 % CI] |", "|---|---|---:|"]
    for category, box in margins["per_category"].items():
        lines.append(f"| {category} | {'yes' if category in FUSION_CATEGORIES else 'no'} | {_ci(box)} |")
    return lines + ["", f"![margins]({chart})"]


def _pool_section(plan: ReproducePlan, pool: str, runs: dict[str, list[Path]], report: Path
                  ) -> tuple[list[str], dict[str, Any] | None]:
    """One pool: its seed report, the bootstrap margins (chart and tables), per modification type and the
    verdict; the pool's summary is None when there is no one-tower run or no late-fusion baseline."""
    from jfe.eval.protocol import EvalResult
    from jfe.eval.report import margin_summary, resolve_roles
    from jfe_study.bootstrap import fusion_margin_ci, modification_margin_ci, read_per_query
    from jfe_study.seeds import seed_category_table, write_seed_report

    results = {run: [EvalResult.load(f) for f in folders] for run, folders in runs.items()}
    seed_md = write_seed_report(results, report / pool, title=f"JFE reproduce, {pool} pool, across seeds")
    _, ours, baselines = resolve_roles({n: rs[0] for n, rs in results.items()}, None, None)
    lines = [f"## {pool.capitalize()} pool ({plan.split} split)", "",
             (f"Per-category {METRIC} mean ± sd over {len(plan.seeds)} seeds" if len(plan.seeds) > 1 else
              f"Per-category {METRIC} of seed {plan.seeds[0]} alone (no sd)")
             + f": [{pool}/seeds.md]({pool}/seeds.md).", ""]
    lines += seed_category_table(results)
    if not ours or not baselines:
        return lines + ["", "(no one-tower run or no late-fusion baselines: no margins)", ""], None
    per_query = {run: [read_per_query(f) for f in folders] for run, folders in runs.items()}
    margins = fusion_margin_ci(per_query, ours, baselines, n_boot=plan.n_boot, seed=0)
    per_seed = [margin_summary({n: rs[i] for n, rs in results.items()}, ours, baselines,
                               metrics=(METRIC,))["metrics"][METRIC] for i in range(len(plan.seeds))]
    seed_cis = [fusion_margin_ci({n: per_query[n][i] for n in [ours, *baselines]}, ours, baselines,
                                 n_boot=plan.n_boot, seed=0) for i in range(len(plan.seeds))]
    mods = modification_margin_ci(per_query, ours, baselines, n_boot=plan.n_boot, seed=0)
    chart = f"{pool}_{MARGIN_CHART}"
    margin_chart(margins, per_seed, report / chart)
    lines += _margin_tables(plan, margins, seed_cis, ours, baselines, chart)
    lines += ["", f"### Per modification type ({METRIC}, mean ± sd over seeds)", ""]
    lines += _modification_table(mods, results) if mods else ["(no modification types)"]
    lines += ["", f"**Verdict ({pool} pool):** {verdict(margins)}", ""]
    return lines, {"margins": margins, "per_seed_ci": seed_cis, "modifications": mods,
                   "seeds_report": str(seed_md), "verdict": verdict(margins)}


def write_reproduce_report(plan: ReproducePlan, info: dict[str, Any], evals: dict[str, dict[str, list[Path]]],
                           curves: dict[str, Any]) -> Path:
    """Every pool's seed report, bootstrap margins, charts and ``reproduce.md``; returns its path."""
    report = plan.out / "report"
    report.mkdir(parents=True, exist_ok=True)
    curve_chart(curves, info["budget"], report / CURVE_CHART)
    lines = _curves_section(plan, info, curves)
    summary: dict[str, Any] = {"budget": info["budget"], "plateaus": info["plateaus"], "stage1": {
        k: str(v) if isinstance(v, Path) else v for k, v in info["stage1"].items()}, "pools": {}}
    for pool, runs in evals.items():
        pool_lines, pool_summary = _pool_section(plan, pool, runs, report)
        lines += pool_lines
        if pool_summary is not None:
            summary["pools"][pool] = pool_summary
    with atomic_write(report / "reproduce.json") as handle:
        handle.write(json.dumps(summary, indent=2, default=str) + "\n")
    path = report / REPORT_NAME
    with atomic_write(path) as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def publish(report: Path, target: Path) -> list[Path]:
    """Copy the report under ``target`` with a ``reproduce_`` prefix (links rewritten); returns the files."""
    target.mkdir(parents=True, exist_ok=True)
    written = []
    renames = {}
    for path in sorted(report.rglob("*")):
        if path.is_file() and path.suffix in (".md", ".png", ".json"):
            rel = path.relative_to(report).as_posix()
            renames[rel] = {REPORT_NAME: "reproduce_report.md", "reproduce.json": "reproduce_summary.json"}.get(
                rel, "reproduce_" + rel.replace("/", "_"))
    for rel, name in renames.items():
        source = report / rel
        if source.suffix == ".md":
            text = source.read_text(encoding="utf-8")
            base = Path(rel).parent.as_posix()
            for other, other_name in renames.items():
                local = other if base == "." else (other[len(base) + 1:] if other.startswith(base + "/") else None)
                if local:
                    text = text.replace(f"]({local})", f"]({other_name})")
            with atomic_write(target / name) as handle:
                handle.write(text)
        else:
            shutil.copyfile(source, target / name)
        written.append(target / name)
    return written


def _machine() -> str:
    """The CPU model, cores and the flags every published figure names (jfe.hardware), in one line."""
    import os

    from jfe.hardware import REPORTED_CPU_FLAGS, cpu_flags, cpu_model_name

    have = cpu_flags()
    flags = " ".join(f for f in REPORTED_CPU_FLAGS if f in have) or "none of the reported flags"
    return f"{cpu_model_name()}, {os.cpu_count()} cores (CPU flags: {flags})"


def _register(plan: ReproducePlan, models: dict[str, str], finals: dict[str, Path], info: dict[str, Any]) -> None:
    from jfe.models.pretrained import register_pretrained
    from jfe.models.registry import list_models

    known = {i.name: i.arch for i in list_models()}
    for run, final in finals.items():
        name = models[run]
        if name not in known:
            _log(f"{run}: {name!r} is not a registered model name; not added to the pretrained table")
            continue
        configs = {}
        for stage, folder in (("stage1", "stage1"), ("stage2", "curve")):
            path = plan.out / "models" / run / "seed0" / folder / "train_config.json"
            if path.exists():
                configs[stage] = json.loads(path.read_text())
        configs["budget"] = info["budget"]
        entry = register_pretrained(name, final, tag="reproduce", trained_with=configs, known_names=known)
        _log(f"{name}: registered as trained ({entry.folder})")


def _keep_longest(path: Path, timings: dict[str, float]) -> dict[str, float]:
    """Per step, the longest time any invocation took: a cached rerun skips finished work in ~0 s, and
    the report should show what the work cost, not the rerun. Steps only earlier invocations ran are kept;
    "total" is this invocation's wall time, never a maximum."""
    previous = json.loads(path.read_text()) if path.exists() else {}
    merged = {**previous, **{k: v if k == "total" else max(float(previous.get(k, 0.0)), v)
                             for k, v in timings.items()}}
    with atomic_write(path) as handle:
        handle.write(json.dumps(merged, indent=2) + "\n")
    return merged


def run_reproduce(plan: ReproducePlan) -> Path:
    from jfe_study.curves import common_budget, plateau, read_curve
    from jfe_study.demo import ensure_minibeir

    if plan.val_every < 1 or plan.curve_steps < plan.val_every:
        raise ConfigError("need 1 <= val_every <= curve_steps")
    if 0 not in plan.seeds:
        raise ConfigError("seed 0 must be among the seeds (it is the learning-curve run)")
    started = time.time()
    timings: dict[str, float] = {}
    ensure_minibeir(plan.data)
    models = _models(plan)
    source = stage1_source(plan)
    _log(source["message"])
    curve_dirs, curves, plateaus = {}, {}, {}
    for run, model in models.items():
        t0 = time.time()
        stage1 = train_stage1(plan, run, model, 0, source)
        curve_dirs[run] = train_curve(plan, run, stage1)
        curve = read_curve(curve_dirs[run])
        curves[run] = curve.to_json()
        plateaus[run] = plateau(curve.steps, curve.values["average"], plan.threshold, plan.smoothing)
        timings[f"curve/{run}"] = round(time.time() - t0, 1)
        _keep_longest(plan.out / "timings.json", timings)  # each step as it ends: an interrupted run keeps them
    # at least one validated step of stage 2: a plateau at step 0 (stage 2 does not help) still trains
    budget = max(plan.val_every, common_budget(list(plateaus.values()), next(iter(curves.values()))["steps"]))
    _log(f"plateaus: {', '.join(f'{r} {p.step}' for r, p in plateaus.items())} -> budget {budget} steps")
    stale = [folder for folder, steps in _seed_budgets(plan, models).items() if steps != budget]
    if stale:  # trained seeds are never deleted for the user: hours of work, and the old report needs them
        raise ConfigError(f"the budget is now {budget} stage-2 steps, but these seeds were trained to another "
                          f"budget; delete them to retrain at {budget}: " + ", ".join(map(str, stale)))
    checkpoints: dict[tuple[str, int], Path] = {}
    for run in models:
        checkpoints[(run, 0)] = extract_budget_model(plan, run, curve_dirs[run], budget)
    for seed in [s for s in plan.seeds if s != 0]:
        for run, model in models.items():
            t0 = time.time()
            checkpoints[(run, seed)] = train_seed(plan, run, model, seed, budget, source)
            timings[f"seed{seed}/{run}"] = round(time.time() - t0, 1)
            _keep_longest(plan.out / "timings.json", timings)
    ordered = {key: checkpoints[key] for seed in plan.seeds for key in [(r, seed) for r in models]}
    t0 = time.time()
    evals = evaluate_all(plan, ordered)
    timings["eval"] = round(time.time() - t0, 1)
    timings["total"] = round(time.time() - started, 1)
    timings = _keep_longest(plan.out / "timings.json", timings)
    info = {"budget": budget, "plateaus": {r: p.to_json() for r, p in plateaus.items()}, "stage1": source,
            "timings": timings, "machine": _machine()}
    with atomic_write(plan.out / "curves.json") as handle:
        handle.write(json.dumps({"curves": curves, **info, "plan": asdict(plan)}, indent=2, default=str) + "\n")
    report = write_reproduce_report(plan, info, evals, curves)
    with atomic_write(plan.out / "report" / "timings.json") as handle:
        handle.write(json.dumps(timings, indent=2) + "\n")
    if plan.register:
        _register(plan, models, {run: checkpoints[(run, 0)] for run in models}, info)
    _log(f"done in {timings['total']:.0f}s; report: {report}")
    return report


def register(app: typer.Typer) -> None:
    @app.command("reproduce")
    def reproduce_command(
        data: Path = typer.Option(Path("runs/minibeir"), help="MiniBEIR folder (built if missing)."),
        corpus: Path = typer.Option(Path("runs/pretrain"), help="Stage-1 pretraining corpus (M-BEIR "
                                    "layout); when not built, stage 1 falls back to MiniBEIR's pairs."),
        out: Path = typer.Option(Path("runs/reproduce"), help="Models, curves, evaluations and the report."),
        configs: Path = typer.Option(Path("configs/demo"), help="Folder with stage1.toml and stage2.toml."),
        stage1_steps: int = typer.Option(180, min=1, help="Stage-1 steps, every model alike."),
        stage1_data: str = typer.Option("corpus", help="Stage-1 data, every model alike: 'corpus' (--corpus "
                                        "when built) or 'minibeir' (MiniBEIR's caption and text pairs)."),
        stage1_per_seed: bool = typer.Option(False, "--stage1-per-seed", help="Retrain stage 1 for every seed "
                                             "(default: once per model, shared by the seeds)."),
        curve_steps: int = typer.Option(200, min=1, help="Stage-2 steps of the learning curves."),
        val_every: int = typer.Option(40, min=1, help="Validate (and checkpoint) every N stage-2 steps."),
        seeds: str = typer.Option("0,1,2", help="Comma-separated seeds (0 = the learning-curve run)."),
        threshold: float = typer.Option(0.005, min=0.0, help=f"Plateau: val {METRIC} gain (fraction) counted as "
                                        "flat."),
        smoothing: int = typer.Option(1, min=1, help="Moving-average window (points) before plateau detection."),
        n_boot: int = typer.Option(2000, min=100, help="Bootstrap replicates."),
        pools: str = typer.Option("local", help="Comma-separated pools to evaluate: local, global."),
        set_: list[str] = typer.Option(None, "--set", help="Training-config override for every stage and model."),
        publish_to: Path | None = typer.Option(None, "--publish", help="Copy the report here (e.g. docs/results)."),
        no_register: bool = typer.Option(False, "--no-register", help="Do not register the trained models."),
        model: list[str] = typer.Option(None, "--model", help="RUN=MODEL: train this model for one of the four "
                                        "runs (jfe-mini, two-tower, late-fusion-sf, late-fusion-ff), e.g. "
                                        "jfe-mini=jfe-mini for the 4x4 grid; repeatable."),
        precision: PrecisionOption = DEFAULT_PRECISION,
    ) -> None:
        """Learning curves of the four models to a plateau, 3 seeds at that budget, bootstrap CIs: the report."""
        from jfe.hardware import check_precision
        from jfe.train.config import parse_overrides

        plan = ReproducePlan(data=data, out=out, configs=configs, corpus=corpus, stage1_steps=stage1_steps,
                             models=model_choices(model),
                             stage1_data=stage1_data,
                             shared_stage1=not stage1_per_seed, curve_steps=curve_steps, val_every=val_every,
                             seeds=tuple(int(s) for s in seeds.split(",") if s.strip()), threshold=threshold,
                             smoothing=smoothing, n_boot=n_boot, pools=tuple(p.strip() for p in pools.split(",")),
                             overrides=parse_overrides(set_), register=not no_register,
                             precision=check_precision(precision))
        report = run_reproduce(plan)
        if publish_to is not None:
            files = publish(report.parent, publish_to)
            typer.echo(f"published {len(files)} files under {publish_to}")
        typer.echo(f"report: {report}")
