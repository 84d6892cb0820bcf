"""``jfe ship-weights``: the weights that ship inside the package, and the measurement that allows them.

1. **Train** jfe-mini and the two-tower with the published recipe of ``make reproduce`` (``configs/reproduce``:
   stage 1 the long alignment, 600 steps on MiniBEIR's pairs, once per model; stage 2 480 steps at a constant
   lr with the top 5 MobileNetV2 modules trained), for every seed.
2. **Compact** each trained model (:func:`jfe.models.compact.compact_model`): what training changed, in fp16,
   with the large matrices as low-rank deltas from the pretrained towers, so the file fits in git.
3. **Evaluate** the trained model and its compact form on MiniBEIR's test split (local pool, fp32 so any CPU
   gives the same figures) and write ``report.md`` / ``report.json``: per-category R@5 of both, per seed.
4. **Install** seed 0's compact form (chosen before looking, not the best seed) into
   ``src/jfe/models/weights/<name>/`` with ``pretrained.json`` (tag ``shipped``, sha256, the recipe, the
   scores) when ``--install`` is given.

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

# run name -> registered name; the 2x2 grid is what every shipped config trains (configs/jfe-mini-stage1.toml)
SHIPPED: dict[str, str] = {"jfe-mini": "jfe-mini-2x2", "two-tower": "two-tower-mini"}
# the registered name each run's weights ship under
SHIP_AS: dict[str, str] = {"jfe-mini": "jfe-mini", "two-tower": "two-tower-mini"}


@dataclass
class ShipPlan:
    data: Path
    out: Path
    configs: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    stage1_steps: int = 240
    stage2_steps: int = 480
    rank: int = 64
    runs: tuple[str, ...] = tuple(SHIPPED)


def _log(message: str) -> None:
    typer.secho(f"[ship {time.strftime('%H:%M:%S')}] {message}", fg=typer.colors.CYAN, err=True)


def _train(config: Path, overrides: dict[str, Any]) -> Path:
    from jfe.train import train

    final = Path(overrides["output_dir"]) / "final"
    if (final / "config.json").exists():
        return final
    return train(config, overrides=overrides, resume=True, progress=True)


def train_recipe(plan: ShipPlan, run: str, seed: int, root: Path, extra: dict[str, Any] | None = None) -> Path:
    """The shipped recipe for ``run``: stage 1 (seed 0) in ``root/stage1``, stage 2 (``seed``) in
    ``root/seed<seed>/stage2``; ``extra`` overrides both stages' configs (e.g. a ``held_out_fold``)."""
    extra = extra or {}
    stage1 = _train(plan.configs / "stage1.toml", {
        "model": SHIPPED[run], "data": str(plan.data), "steps": plan.stage1_steps, "seed": 0,
        "output_dir": str(root / "stage1"), **extra})
    if not (root / f"seed{seed}" / "stage2" / "final" / "config.json").exists():
        _log(f"{run} seed {seed}: stage 2, {plan.stage2_steps} steps")
    return _train(plan.configs / "stage2.toml", {
        "model": str(stage1), "init": "", "data": str(plan.data), "seed": seed, "schedule": "constant",
        "steps": plan.stage2_steps, "val_every": 0, "output_dir": str(root / f"seed{seed}" / "stage2"), **extra})


def train_run(plan: ShipPlan, run: str, seed: int) -> Path:
    """The trained model of ``run`` and ``seed``: stage 1 shared by the seeds (seed 0), stage 2 per seed."""
    return train_recipe(plan, run, seed, plan.out / "models" / run)


def train_all(plan: ShipPlan) -> dict[tuple[str, int], Path]:
    return {(run, seed): train_run(plan, run, seed) for seed in plan.seeds for run in plan.runs}


def compact_run(plan: ShipPlan, run: str, seed: int, trained: Path) -> Path:
    """The compact form of a trained model (written once)."""
    from jfe.models import load_model
    from jfe.models.towers import TowerEncoder

    folder = plan.out / "compact" / f"rank{plan.rank}" / run / f"seed{seed}"
    if not (folder / "config.json").exists():
        model = load_model(trained, device="cpu")
        assert isinstance(model, TowerEncoder), f"{trained} is not a tower model"
        model.save_compact(folder, rank=plan.rank)
    return folder


def evaluate_run(plan: ShipPlan, label: str, folder: Path) -> dict[str, Any]:
    """MiniBEIR test, local pool, fp32: average and per-category R@5 (results.json kept beside)."""
    from jfe.eval.evaluator import MBEIREvaluator
    from jfe.eval.protocol import EvalResult
    from jfe.models import load_model

    out = plan.out / "eval" / label
    if (out / "results.json").exists():
        result = EvalResult.load(out)
    else:
        _log(f"evaluating {label}")
        model = load_model(folder, device="cpu").set_precision("fp32")
        result = MBEIREvaluator(plan.data, split="test", pool="local", out_dir=out, run_name=label,
                                cache_dir=plan.out / "eval" / "embeddings" / label, progress=False).result(model)
    return {"average": result.average[PRIMARY_METRIC],
            "categories": {name: cat[PRIMARY_METRIC] for name, cat in result.categories.items()}}


def _size_mb(folder: Path) -> float:
    return round((folder / "model.safetensors").stat().st_size / 1e6, 2)


def measure(plan: ShipPlan) -> dict[str, Any]:
    """Train, compact and evaluate every run and seed; the report's data."""
    trained = train_all(plan)
    rows = []
    for (run, seed), folder in trained.items():
        compact = compact_run(plan, run, seed, folder)
        rows.append({"run": run, "seed": seed, "trained": str(folder), "compact": str(compact),
                     "trained_mb": _size_mb(folder), "compact_mb": _size_mb(compact),
                     "full": evaluate_run(plan, f"{run}/seed{seed}/full", folder),
                     "compact_scores": evaluate_run(plan, f"{run}/seed{seed}/compact-rank{plan.rank}", compact)})
    return {"rank": plan.rank, "stage1_steps": plan.stage1_steps, "stage2_steps": plan.stage2_steps,
            "seeds": list(plan.seeds), "configs": str(plan.configs), "rows": rows}


def write_report(report: dict[str, Any], out: Path) -> Path:
    """``report.json`` and ``report.md``: per run, the mean over seeds of full vs compact R@5 and the gap."""
    from jfe.hardware import machine_summary
    from jfe.paths import atomic_write

    report = {**report, "machine": machine_summary()}
    lines = [f"# Shipped weights: trained vs compact (rank {report['rank']}, fp16)", "",
             f"Recipe: `configs/reproduce` with stage 1 {report['stage1_steps']} steps (seed 0, shared), stage 2 "
             f"{report['stage2_steps']} steps at a constant lr, seeds {report['seeds']}. Evaluation: MiniBEIR test, "
             f"local pool, fp32, {PRIMARY_METRIC}. Training in the configs' precision (`auto`: "
             f"{report['machine'].get('bf16_native_cpu') and 'bf16' or 'fp32'} on this CPU). Machine: "
             + ", ".join(f"{k} {v}" for k, v in report["machine"].items() if k in ("cpu", "cpu_count", "cpu_flags")),
             "", "Produced by `make shipped-weights` (`jfe ship-weights`); seed 0 is the one installed in the package, "
             "chosen before any evaluation. The compact form stores the glue whole in fp16 and the changes to the "
             "pretrained towers as a weight-decay scale plus the touched rows or a rank-"
             f"{report['rank']} fp16 delta (`jfe.models.compact`).", ""]
    runs = sorted({row["run"] for row in report["rows"]})
    for run in runs:
        rows = [r for r in report["rows"] if r["run"] == run]
        categories = list(rows[0]["full"]["categories"])
        lines += [f"## {run}", "", "| seed | size trained → compact (MB) | average: trained | compact | gap |"
                  + "".join(f" {c} gap |" for c in categories),
                  "|---:|---|---:|---:|---:|" + "---:|" * len(categories)]
        for r in rows:
            gaps = "".join(f" {100 * (r['compact_scores']['categories'][c] - r['full']['categories'][c]):+.1f} |"
                           for c in categories)
            lines.append(f"| {r['seed']} | {r['trained_mb']} → {r['compact_mb']} | {100 * r['full']['average']:.1f} "
                         f"| {100 * r['compact_scores']['average']:.1f} | "
                         f"{100 * (r['compact_scores']['average'] - r['full']['average']):+.1f} |{gaps}")
        mean = {key: sum(r[field]["average"] for r in rows) / len(rows) for key, field in
                (("full", "full"), ("compact", "compact_scores"))}
        worst = max(abs(r["compact_scores"]["categories"][c] - r["full"]["categories"][c]) for r in rows
                    for c in categories)
        lines += ["", f"Mean over {len(rows)} seeds: trained {100 * mean['full']:.1f}, compact "
                  f"{100 * mean['compact']:.1f} ({100 * (mean['compact'] - mean['full']):+.1f}); the largest "
                  f"per-category gap of any seed is {100 * worst:.1f} points.", ""]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "report.json") as handle:
        handle.write(json.dumps(report, indent=2) + "\n")
    with atomic_write(out / "report.md") as handle:
        handle.write("\n".join(lines))
    return out / "report.md"


def install(plan: ShipPlan, report: dict[str, Any], target: Path) -> list[Path]:
    """Copy seed 0's compact model of every run into ``target/<name>/`` with its ``pretrained.json``."""
    from jfe.models.pretrained import register_pretrained

    written = []
    target.mkdir(parents=True, exist_ok=True)
    for row in report["rows"]:
        if row["seed"] != 0:
            continue
        scores = {"minibeir_test_local_r5": {"average": row["compact_scores"]["average"],
                                             **row["compact_scores"]["categories"]},
                  "trained_r5_average": row["full"]["average"]}
        trained_with = {"recipe": "configs/reproduce", "stage1_steps": plan.stage1_steps,
                        "stage2_steps": plan.stage2_steps, "seed": 0, "compact_rank": plan.rank,
                        "command": "make shipped-weights"}
        entry = register_pretrained(SHIP_AS[row["run"]], Path(row["compact"]), tag="shipped", root=target,
                                    source=f"jfe ship-weights ({row['run']}, seed 0)", scores=scores,
                                    trained_with=trained_with)
        written.append(entry.folder)
    return written


def ship_weights_command(
    data: Path = typer.Option(Path("runs/minibeir"), help="MiniBEIR folder (built by `make minibeir`)."),
    out: Path = typer.Option(Path("runs/ship"), help="Models, compact forms, evaluations and the report."),
    configs: Path = typer.Option(Path("configs/reproduce"), help="Folder with stage1.toml and stage2.toml."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds (seed 0 is the one shipped)."),
    rank: int = typer.Option(64, min=1, help="Rank of the low-rank tower deltas."),
    install_to: Path = typer.Option(None, "--install", help="Install seed 0's compact models here (the package's "
                                                            "src/jfe/models/weights)."),
    publish: Path = typer.Option(None, help="Copy report.md here (e.g. docs/results/shipped_weights.md)."),
) -> None:
    """Train the shipped models, compact them, measure trained vs compact R@5 over seeds, install seed 0."""
    import shutil

    plan = ShipPlan(data=data, out=out, configs=configs, rank=rank,
                    seeds=tuple(int(s) for s in seeds.split(",") if s.strip()))
    report = measure(plan)
    path = write_report(report, out)
    typer.echo(path.read_text(encoding="utf-8"))
    if publish is not None:
        shutil.copyfile(path, publish)
        shutil.copyfile(out / "report.json", publish.with_suffix(".json"))
    if install_to is not None:
        for folder in install(plan, report, install_to):
            typer.echo(f"installed {folder}")


if __name__ == "__main__":  # training only, e.g. to start the long part early
    import sys

    train_all(ShipPlan(data=Path(sys.argv[1]), out=Path(sys.argv[2]), configs=Path("configs/reproduce")))
