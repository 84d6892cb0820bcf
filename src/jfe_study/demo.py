"""``jfe demo``: the main job end to end on MiniBEIR.

Build the benchmark, train jfe-mini (stage 1 + stage 2) and the three baselines with the same recipe and
budget, evaluate all four on the test split (local and global pools), and write the comparison report.
Every step is skipped when its output already exists, so a second run only re-reports.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import typer

from jfe.cli_options import DEFAULT_PRECISION, PrecisionOption
from jfe.paths import atomic_write

# run name -> registered model; a 2x2 visual grid wherever a model reads one (two-tower and SF pool globally)
MODELS: dict[str, str] = {
    "jfe-mini": "jfe-mini-2x2",
    "two-tower": "two-tower-mini",
    "late-fusion-sf": "late-fusion-sf-mini",
    "late-fusion-ff": "late-fusion-ff-mini-2x2",
}

# name -> which stages run; the ablations justify the two-stage design with numbers.
ABLATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "jfe-mini": ("jfe-mini-2x2", ("stage1", "stage2")),
    "jfe-mini-stage2-only": ("jfe-mini-2x2", ("stage2",)),
    "jfe-mini-stage1-only": ("jfe-mini-2x2", ("stage1",)),
}


@dataclass
class DemoPlan:
    data: Path
    out: Path
    configs: Path
    runs: dict[str, tuple[str, tuple[str, ...]]]
    stage1_steps: int | None = None
    stage2_steps: int | None = None
    seed: int = 0
    overrides: dict = field(default_factory=dict)  # extra training-config keys for every stage (``--set``)
    # compute precision of training and evaluation alike: "auto" (bf16 where the CPU has it) or "fp32" (the same
    # numbers on every CPU)
    precision: str = "auto"


def _log(message: str) -> None:
    typer.secho(f"[demo {time.strftime('%H:%M:%S')}] {message}", fg=typer.colors.CYAN, err=True)


def ensure_minibeir(data: Path) -> None:
    """Build MiniBEIR unless a complete build is already there (its README is written last)."""
    if (data / "README.md").exists() and (data / "instructions" / "query_instructions.tsv").exists():
        _log(f"MiniBEIR already built at {data}")
        return
    from jfe.data.minibeir import build_minibeir

    _log(f"building MiniBEIR at {data}")
    build_minibeir(data)


def train_run(plan: DemoPlan, run_name: str, model_name: str, stages: tuple[str, ...]) -> Path:
    """Train one model through the given stages; returns its final checkpoint directory."""
    from jfe.train import train

    init: str = model_name
    final = plan.out / "models" / run_name / "final"
    if (final / "config.json").exists():
        _log(f"{run_name}: trained model found at {final}")
        return final
    for stage in stages:
        stage_dir = plan.out / "models" / run_name / stage
        overrides: dict = {"precision": plan.precision, **plan.overrides, "model": init, "data": str(plan.data),
                           "output_dir": str(stage_dir), "seed": plan.seed}
        steps = plan.stage1_steps if stage == "stage1" else plan.stage2_steps
        if steps is not None:
            overrides["steps"] = steps
        config = plan.configs / f"{stage}.toml"
        _log(f"{run_name}: {stage} ({config}) starting from {init}")
        started = time.time()
        checkpoint = train(config, overrides=overrides, resume=True, progress=True)
        _log(f"{run_name}: {stage} done in {time.time() - started:.0f}s")
        init = str(checkpoint)
    from jfe.models import load_model

    load_model(init).save_pretrained(final)
    return final


def evaluate_run(plan: DemoPlan, run_name: str, checkpoint: Path) -> dict[str, Path]:
    from jfe.eval.evaluator import MBEIREvaluator
    from jfe.models import load_model

    model = None
    outputs = {}
    for pool in ("local", "global"):
        out_dir = plan.out / "eval" / pool / run_name
        outputs[pool] = out_dir
        if (out_dir / "results.json").exists():
            continue
        model = model or load_model(checkpoint).set_precision(plan.precision)
        _log(f"{run_name}: evaluating on the {pool} pool")
        # One embedding cache for both pools: the global run then re-embeds nothing.
        MBEIREvaluator(plan.data, split="test", pool=pool, out_dir=out_dir, run_name=run_name,
                       cache_dir=plan.out / "eval" / "embeddings").result(model)
    return outputs


def run_demo(plan: DemoPlan) -> Path:
    from jfe.eval.report import write_report

    started = time.time()
    ensure_minibeir(plan.data)
    timings: dict[str, float] = {}
    checkpoints = {}
    for run_name, (model_name, stages) in plan.runs.items():
        t0 = time.time()
        checkpoints[run_name] = train_run(plan, run_name, model_name, stages)
        timings[f"train/{run_name}"] = round(time.time() - t0, 1)
    results: dict[str, dict[str, Path]] = {"local": {}, "global": {}}
    for run_name, checkpoint in checkpoints.items():
        t0 = time.time()
        for pool, path in evaluate_run(plan, run_name, checkpoint).items():
            results[pool][run_name] = path
        timings[f"eval/{run_name}"] = round(time.time() - t0, 1)
    report_paths = {}
    for pool, runs in results.items():
        report_paths[pool] = write_report(runs, plan.out / "report" / pool)
    timings["total"] = round(time.time() - started, 1)
    # timings.json: this invocation (a cached rerun only re-reports); timings_history.jsonl: every invocation
    with atomic_write(plan.out / "report" / "timings.json") as handle:
        handle.write(json.dumps(timings, indent=2) + "\n")
    with open(plan.out / "report" / "timings_history.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **timings}) + "\n")
    _log(f"done in {timings['total']:.0f}s; reports: " + ", ".join(str(p) for p in report_paths.values()))
    return plan.out / "report"


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_command(
        data: Path = typer.Option(Path("runs/minibeir"), help="MiniBEIR folder (built if missing)."),
        out: Path = typer.Option(Path("runs/demo"), help="Where models, evaluations and the report go."),
        configs: Path = typer.Option(Path("configs/demo"), help="Folder with stage1.toml and stage2.toml."),
        ablations: bool = typer.Option(False, "--ablations", help="Run jfe-mini stage-1-only / stage-2-only."),
        stage1_steps: int | None = typer.Option(None, help="Override stage-1 steps (all models alike)."),
        stage2_steps: int | None = typer.Option(None, help="Override stage-2 steps (all models alike)."),
        seed: int = typer.Option(0),
        set_: list[str] = typer.Option(None, "--set", help="Training-config override for every stage and model, "
                                       "key=value (repeatable), e.g. --set batch_size=32."),
        precision: PrecisionOption = DEFAULT_PRECISION,
    ) -> None:
        """Build MiniBEIR, train jfe-mini and the three baselines alike, evaluate, and report.

        --precision fp32 gives the same numbers on every CPU (auto computes in bf16 where the CPU has it)."""
        from jfe.hardware import check_precision
        from jfe.train.config import parse_overrides

        runs: dict[str, tuple[str, tuple[str, ...]]] = ABLATIONS if ablations else \
            {name: (model, ("stage1", "stage2")) for name, model in MODELS.items()}
        plan = DemoPlan(data=data, out=out, configs=configs, runs=runs, stage1_steps=stage1_steps,
                        stage2_steps=stage2_steps, seed=seed, overrides=parse_overrides(set_),
                        precision=check_precision(precision))
        report = run_demo(plan)
        typer.echo(f"report: {report}")
