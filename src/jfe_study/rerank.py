"""``jfe rerank-study`` (``make rerank``): does fusing query and candidate in one sequence pay, after retrieval?

1. **Mine** the training split with the retriever (the shipped two-tower-mini, the best retriever here):
   each training query's top 50 in its task's pool, positives removed (``jfe mine``).
2. **Train** on the same lists, steps and batches, for every seed: ``jfe-mini-rerank`` (query and candidate in
   one sequence through jfe-mini's towers, started from the shipped jfe-mini) and ``late-fusion-rerank-mini``
   (an MLP over the two-tower's query and candidate vectors). Both correct the retriever's score from a head
   that starts at zero (``configs/rerank``).
3. **Evaluate** on MiniBEIR test, local and global pools: the retriever alone, and the retriever's top
   ``rerank_k`` reordered by each reranker of each seed (``jfe eval --rerank``).
4. **Report**: per category mean ± sd over seeds, the fusion-category margin of the joint reranker over the
   retriever alone and over the late reranker with paired bootstrap 95 % intervals (queries resampled within each
   (dataset, task); a query scores its hit rate over the seeds), per modification type, and a chart.

Every step is skipped when its output exists, so an interrupted run continues.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from jfe.eval.metrics import PRIMARY_METRIC

JOINT, LATE = "jfe-mini-rerank", "late-fusion-rerank-mini"


@dataclass
class RerankPlan:
    data: Path
    out: Path
    configs: Path
    retriever: str = "two-tower-mini"
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 300
    rerank_k: int = 20
    pools: tuple[str, ...] = ("local", "global")
    precision: str = "auto"
    rerankers: tuple[str, ...] = (JOINT, LATE)
    # > 1: cross-fitted lists (the retriever's recipe retrained once per fold without it, each mining its fold)
    cross_fit: int = 0
    recipe_configs: Path = Path("configs/reproduce")  # the shipped retrievers' recipe (jfe ship-weights)


def _log(message: str) -> None:
    typer.secho(f"[rerank {time.strftime('%H:%M:%S')}] {message}", fg=typer.colors.CYAN, err=True)


def fold_retrievers(plan: RerankPlan) -> list[Path]:
    """The retriever's shipped recipe (both stages) trained once per fold, each without its fold's queries."""
    from jfe.errors import ConfigError
    from jfe_study.ship import SHIP_AS, ShipPlan, train_recipe

    runs = {name: run for run, name in SHIP_AS.items()}
    if plan.retriever not in runs:
        raise ConfigError(f"cross-fitting retrains the retriever's recipe: {plan.retriever!r} is not a shipped "
                          f"retriever ({', '.join(runs)})")
    recipe = ShipPlan(data=plan.data, out=plan.out, configs=plan.recipe_configs)
    folders = []
    for fold in range(plan.cross_fit):
        root = plan.out / "retrievers" / f"fold{fold}of{plan.cross_fit}"
        if not (root / "seed0" / "stage2" / "final" / "config.json").exists():
            _log(f"training {plan.retriever} without fold {fold} of {plan.cross_fit} (the shipped recipe)")
        held = {"fold": fold, "folds": plan.cross_fit, "split": "train"}
        folders.append(train_recipe(recipe, runs[plan.retriever], 0, root, {"held_out_fold": held}))
    return folders


def mined_lists(plan: RerankPlan) -> Path:
    from jfe.models import load_model
    from jfe.train.mine import mine, mine_cross_fitted, write_mined

    if plan.cross_fit > 1:
        path = plan.out / f"mined_train_crossfit{plan.cross_fit}.jsonl"
        if not path.exists():
            folders = fold_retrievers(plan)
            _log(f"mining the training split with {len(folders)} fold retrievers (cross-fitted)")
            models = [load_model(f).set_precision("fp32") for f in folders]
            write_mined(path, mine_cross_fitted(models, plan.data, split="train", k=50,
                                                model_names=[str(f) for f in folders]))
        return path
    path = plan.out / "mined_train.jsonl"
    if not path.exists():
        _log(f"mining the training split with {plan.retriever}")
        retriever = load_model(plan.retriever).set_precision("fp32")
        write_mined(path, mine(retriever, plan.data, split="train", k=50, model_name=plan.retriever))
    return path


def train_reranker(plan: RerankPlan, name: str, seed: int, mined: Path) -> Path:
    from jfe.train import train

    out = plan.out / "models" / name / f"seed{seed}"
    final = out / "final"
    if (final / "config.json").exists():
        return final
    _log(f"training {name} seed {seed}, {plan.steps} steps")
    return train(plan.configs / f"{name}.toml", overrides={
        "data": str(plan.data), "mined": str(mined), "seed": seed, "steps": plan.steps, "output_dir": str(out),
        "model_overrides.retriever": plan.retriever}, resume=True, progress=True)


def evaluate(plan: RerankPlan, label: str, pool: str, reranker: Path | None) -> Any:
    """MiniBEIR test in ``pool``: the retriever alone, or with ``reranker`` over its top rerank_k."""
    from jfe.eval.evaluator import MBEIREvaluator
    from jfe.eval.protocol import EvalResult
    from jfe.models import load_model

    out = plan.out / "eval" / pool / label
    if (out / "results.json").exists():
        return EvalResult.load(out)
    _log(f"evaluating {label} ({pool} pool)")
    retriever = load_model(plan.retriever).set_precision(plan.precision)
    model = load_model(reranker).set_precision(plan.precision) if reranker is not None else None
    return MBEIREvaluator(plan.data, split="test", pool=pool, out_dir=out, run_name=label,
                          model_name=plan.retriever, cache_dir=plan.out / "eval" / "embeddings", progress=True,
                          reranker=model, rerank_k=plan.rerank_k, reranker_name=label).result(retriever)


def measure(plan: RerankPlan) -> dict[str, Any]:
    """Mine, train, evaluate: the report's data (result folders per pool and run)."""
    mined = mined_lists(plan)
    models = {(name, seed): train_reranker(plan, name, seed, mined) for seed in plan.seeds
              for name in plan.rerankers}
    runs: dict[str, dict[str, list[str]]] = {}
    for pool in plan.pools:
        alone = f"{plan.retriever}"
        evaluate(plan, alone, pool, None)
        runs[pool] = {alone: [str(plan.out / "eval" / pool / alone)]}
        for name in plan.rerankers:
            label = f"+ {name}"
            runs[pool][label] = []
            for seed in plan.seeds:
                seed_label = f"{name}-seed{seed}"
                evaluate(plan, seed_label, pool, models[(name, seed)])
                runs[pool][label].append(str(plan.out / "eval" / pool / seed_label))
    return {"retriever": plan.retriever, "seeds": list(plan.seeds), "steps": plan.steps, "rerank_k": plan.rerank_k,
            "precision": plan.precision, "runs": runs, "mined": str(mined)}


def chart_name(pool: str) -> str:
    return f"rerank_{pool}_categories_r5.png"


def _pool_section(pool: str, runs: dict[str, list[str]], retriever: str, out: Path
                  ) -> tuple[list[str], dict[str, Any]]:
    from jfe.data.records import CATEGORIES
    from jfe.eval.protocol import EvalResult
    from jfe_study.bootstrap import fusion_margin_ci, modification_margin_ci, read_per_query
    from jfe_study.seeds import seed_category_table, seed_chart

    loaded = {label: [EvalResult.load(p) for p in paths] for label, paths in runs.items()}
    per_query = {label: [read_per_query(p) for p in paths] for label, paths in runs.items()}
    joint, late = f"+ {JOINT}", f"+ {LATE}"
    present = [c for c in CATEGORIES if any(c in r.categories for rs in loaded.values() for r in rs)]
    seed_chart(loaded, present, out / chart_name(pool))
    lines = [f"## {pool} pool", "", *seed_category_table(loaded, average=True), "",
             f"![{PRIMARY_METRIC} per category, {pool} pool]({chart_name(pool)})", ""]
    data: dict[str, Any] = {}
    comparisons = [(joint, retriever, f"{retriever} + {JOINT} vs {retriever} alone")]
    if late in per_query:
        comparisons += [(joint, late, f"{JOINT} vs {LATE} (same lists, steps, batches)"),
                        (late, retriever, f"{retriever} + {LATE} vs {retriever} alone")]
    lines += [f"{PRIMARY_METRIC} margins, paired bootstrap 95 % intervals (2000 replicates, queries resampled within "
              "each (dataset, task); each query scores its hit rate over the seeds):", "",
              "| comparison | fusion categories | other categories | " + " | ".join(
                  ("mixed-modal", "multi-modal", "conditional")) + " |", "|---|---:|---:|---:|---:|---:|"]

    def cell(interval: dict[str, float] | None) -> str:
        if not interval:
            return "–"
        return f"{100 * interval['estimate']:+.1f} [{100 * interval['low']:+.1f}, {100 * interval['high']:+.1f}]"

    for ours, baseline, title in comparisons:
        ci = fusion_margin_ci({ours: per_query[ours], baseline: per_query[baseline]}, ours, [baseline])
        data[title] = ci
        lines.append(f"| {title} | {cell(ci['fusion'])} | {cell(ci['non_fusion'])} | " + " | ".join(
            cell(ci["per_category"].get(c)) for c in ("mixed-modal", "multi-modal", "conditional")) + " |")
    mods = modification_margin_ci({joint: per_query[joint], retriever: per_query[retriever]}, joint, [retriever])
    data["modifications"] = mods
    if mods:
        lines += ["", f"Per modification type ({retriever} + {JOINT} vs {retriever} alone, {PRIMARY_METRIC}):", "",
                  "| task | modification | queries | alone | + joint reranker | margin [95 % CI] |",
                  "|---:|---|---:|---:|---:|---|"]
        for row in sorted(mods, key=lambda r: (r["task"], r["modification"])):
            alone, reranked = row[f"{retriever} {PRIMARY_METRIC}"], row[f"{joint} {PRIMARY_METRIC}"]
            lines.append(f"| {row['task']} | {row['modification']} | {row['queries']} | {100 * alone:.1f} | "
                         f"{100 * reranked:.1f} | {cell(row['margin'])} |")
    return lines + [""], data


def write_report(report: dict[str, Any], out: Path) -> Path:
    from jfe.hardware import machine_summary
    from jfe.paths import atomic_write

    machine = machine_summary()
    retriever = report["retriever"]
    lines = [f"# Reranking: {retriever} + joint-fusion reranker vs + late-fusion reranker", "",
             f"MiniBEIR test, {PRIMARY_METRIC}, first stage {retriever} (shipped weights), each query's top "
             f"{report['rerank_k']} reranked. Rerankers trained {report['steps']} steps on the same lists mined from "
             f"the training split (`configs/rerank`), seeds {report['seeds']}; precision {report['precision']}. "
             "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items() if k in ("cpu", "cpu_count", "cpu_flags")),
             "", "Produced by `make rerank` (`jfe rerank-study`).", ""]
    sections: dict[str, Any] = {}
    out.mkdir(parents=True, exist_ok=True)
    for pool, runs in report["runs"].items():
        section, data = _pool_section(pool, runs, retriever, out)
        lines += section
        sections[pool] = data
    with atomic_write(out / "report.json") as handle:
        handle.write(json.dumps({**report, "machine": machine, "margins": sections}, indent=2) + "\n")
    with atomic_write(out / "report.md") as handle:
        handle.write("\n".join(lines))
    return out / "report.md"


def rerank_study_command(
    data: Path = typer.Option(Path("runs/minibeir"), help="MiniBEIR folder (built by `make minibeir`)."),
    out: Path = typer.Option(Path("runs/rerank"), help="Mined lists, rerankers, evaluations and the report."),
    configs: Path = typer.Option(Path("configs/rerank"), help="Folder with one training config per reranker."),
    retriever: str = typer.Option("two-tower-mini", help="The first stage (a name or folder)."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds of the rerankers."),
    steps: int = typer.Option(300, min=1, help="Training steps of every reranker."),
    rerank_k: int = typer.Option(20, min=1, help="First-stage candidates reranked per query."),
    pools: str = typer.Option("local,global", help="Pools to evaluate in."),
    precision: str = typer.Option("auto", help="Evaluation precision: auto | fp32 | bf16."),
    cross_fit: int = typer.Option(0, "--cross-fit", min=0,
                                  help="Folds for cross-fitted mining (the retriever retrained per fold without "
                                       "it); 0: mine with the retriever itself."),
    publish: Path = typer.Option(None, help="Copy report.md (and .json) here, e.g. docs/results/rerank.md."),
) -> None:
    """Train both rerankers on mined lists over seeds and measure them after the retriever (report + CIs)."""
    import shutil

    plan = RerankPlan(data=data, out=out, configs=configs, retriever=retriever, steps=steps, rerank_k=rerank_k,
                      seeds=tuple(int(s) for s in seeds.split(",") if s.strip()), precision=precision,
                      pools=tuple(p.strip() for p in pools.split(",") if p.strip()), cross_fit=cross_fit)
    path = write_report(measure(plan), out)
    typer.echo(path.read_text(encoding="utf-8"))
    if publish is not None:
        shutil.copyfile(path, publish)
        shutil.copyfile(out / "report.json", publish.with_suffix(".json"))
        for pool in plan.pools:
            shutil.copyfile(out / chart_name(pool), publish.parent / chart_name(pool))
