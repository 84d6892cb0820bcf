"""The study's commands on the ``jfe`` command (entry point ``jfe.commands``): ``jfe demo``, ``jfe reproduce``,
``jfe seeds-report``, ``jfe ship-weights`` and ``jfe rerank-study``. Heavy imports happen inside the commands, so
``jfe --help`` stays fast."""

from __future__ import annotations

from pathlib import Path

import typer

from jfe.eval.commands import NamesOption, OursOption, TitleOption


def register(app: typer.Typer) -> None:
    """Add the study's commands to the ``jfe`` app."""
    from jfe_study import demo, reproduce, rerank, ship

    demo.register(app)
    reproduce.register(app)
    app.command("seeds-report")(seeds_report_command)
    app.command("ship-weights")(ship.ship_weights_command)
    app.command("rerank-study")(rerank.rerank_study_command)


def seeds_report_command(
    results: list[Path] = typer.Argument(..., help="Evaluation output folders; folders with the same run name are "
                                                   "repeats (seeds), in the same seed order for every run."),
    out: Path = typer.Option(..., "--out", help="Folder for seeds.md, seeds.json and the chart."),
    names: NamesOption = None,
    ours: OursOption = None,
    title: TitleOption = None,
) -> None:
    """Report repeated runs (seeds): per-category mean ± sd and the fusion margin per seed (seeds.md)."""
    from jfe.eval.commands import run_labels
    from jfe.eval.protocol import EvalResult
    from jfe_study.seeds import SEEDS_CHART_FILE, write_seed_report

    loaded = [EvalResult.load(p) for p in results]
    groups: dict[str, list[EvalResult]] = {}
    for label, result in zip(run_labels(names, loaded), loaded, strict=True):
        groups.setdefault(label, []).append(result)
    path = write_seed_report(groups, out, ours=ours, title=title)
    typer.echo(f"wrote {path} and {path.parent / SEEDS_CHART_FILE}")
