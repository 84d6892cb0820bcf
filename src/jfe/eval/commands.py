"""``jfe eval`` (M-BEIR protocol) and ``jfe report`` (Markdown + PNG comparison)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jfe.cli_options import DEFAULT_PRECISION, BackendOption, PrecisionOption, RerankKOption, RerankOption
from jfe.errors import ConfigError
from jfe.eval.metrics import recall_key


def register(app: typer.Typer) -> None:
    """Add ``jfe eval`` and ``jfe report`` to the ``jfe`` app."""
    app.command("eval")(eval_command)
    app.command("report")(report_command)


def _run_name(model: str) -> str:
    """A readable run id: a registry name as is; for a folder, its name (skipping ``final``/``checkpoint-*``)."""
    path = Path(model)
    if not path.is_dir():
        return model
    for part in reversed(path.resolve().parts):
        if part not in ("final", "best", "model") and not part.startswith(("checkpoint", "step")):
            return part
    return path.name


def eval_command(
    model: str = typer.Option(..., "--model", help="Model name (e.g. jfe-mini) or saved model folder."),
    data: Path = typer.Option(..., "--data", help="Dataset root in the M-BEIR layout (MiniBEIR or M-BEIR)."),
    split: str = typer.Option("test", "--split", help="Query split: test, val or train."),
    pool: str = typer.Option("local", "--pool", help="local (each task's own pool) or global (the union pool)."),
    out: Path = typer.Option(None, "--out", help="Write run.trec, results.tsv, results.json here (and cache "
                                                 "embeddings for fast reruns)."),
    instructions: str = typer.Option("default", "--instructions", help="default, heldout (held-out rewordings) "
                                                                       "or none."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Items per encoder batch."),
    run_name: str = typer.Option(None, "--run-name", help="Run id in the TREC file (default: the model name)."),
    max_queries: int = typer.Option(None, "--max-queries", min=1, help="Cap queries per file (smoke tests)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    precision: PrecisionOption = DEFAULT_PRECISION,
    text_mode: str = typer.Option("jfe", "--text-mode", help="Text formatting: 'jfe', or 'uniir' (UniIR's exact "
                                                             "format_string, to reproduce UniIR checkpoints)."),
    rerank: RerankOption = None,
    rerank_k: RerankKOption = 50,
    backend: BackendOption = None,
) -> None:
    """Evaluate a model with the M-BEIR protocol: Recall@1/5/10/20/50 per (dataset, task) and per category."""
    from rich.table import Table

    from jfe.eval.evaluator import MBEIREvaluator
    from jfe.index.commands import _console
    from jfe.models.registry import load_model, load_reranker

    if pool not in ("local", "global"):
        raise ConfigError(f"--pool must be 'local' or 'global', got {pool!r}")
    encoder = load_model(model, backend=backend)
    encoder.set_precision(precision)
    reranker = load_reranker(rerank, f"--rerank {rerank}").set_precision(precision) if rerank else None
    evaluator = MBEIREvaluator(data, split=split, pool=pool, out_dir=out, instructions=instructions,
                               batch_size=batch_size, run_name=run_name or _run_name(model), model_name=model,
                               progress=progress, max_queries=max_queries, text_mode=text_mode,  # type: ignore[arg-type]
                               reranker=reranker, rerank_k=rerank_k, reranker_name=rerank)
    result = evaluator.result(encoder)
    metrics = [*(recall_key(k) for k in result.ks), "headline"]
    reranked = f", reranked by {rerank} (top {rerank_k})" if rerank else ""
    computed = f", {result.compute.get('backend', 'torch')} {result.compute.get('precision', '')}".rstrip()
    table = Table(title=f"{result.run_name}: {split} split, {pool} pool, {result.n_queries} queries{reranked}"
                        f"{computed}")
    for column in ("dataset", "task", "query→candidate", "queries", *metrics):
        table.add_column(column, justify="left" if column in ("dataset", "task", "query→candidate") else "right")
    for row in result.rows:
        table.add_row(row["dataset"], str(row["task"]), row["modality"], str(row["queries"]),
                      *(f"{100 * row[m]:.1f}" for m in metrics))
    table.add_section()
    for category, values in result.categories.items():
        table.add_row(f"[b]{category}[/b]", ",".join(map(str, values["tasks"])),
                      "fusion" if values["fusion"] else "", str(values["queries"]),
                      *(f"{100 * values[m]:.1f}" for m in metrics))
    table.add_row("[b]average[/b]", "", "", str(result.n_queries), *(f"{100 * result.average[m]:.1f}" for m in metrics))
    console = _console()
    console.print(table)
    from jfe.eval.protocol import STANDARD_NOTES

    for note in (n for n in result.notes if n not in STANDARD_NOTES):  # e.g. no instructions file was found
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
    if result.missing_positives.get("count"):
        console.print(f"{result.missing_positives['count']} queries have no positive in their pool (counted as "
                      "misses)", markup=False)
    if out is not None:
        extra = ", run.first_stage.trec" if reranker is not None else ""
        console.print(f"wrote {out}/results.json, results.tsv, categories.tsv, run.trec{extra}", markup=False)


def run_labels(names: str | None, loaded: list) -> list[str]:  # noqa: ANN001 - EvalResults, imported lazily
    """``--names`` split on commas, else each result's own run name; one label per result folder."""
    labels = [n.strip() for n in names.split(",")] if names else [r.run_name for r in loaded]
    if len(labels) != len(loaded):
        raise ConfigError(f"--names gives {len(labels)} names for {len(loaded)} result folders")
    return labels


# the options every comparison report takes (jfe report here, jfe seeds-report in the study)
NamesOption = Annotated[str | None, typer.Option("--names", help="Comma-separated run names, one per folder "
                                                                 "(default: each result's run name).")]
OursOption = Annotated[str | None, typer.Option("--ours", help="The one-tower run (default: the run whose model "
                                                               "declares the one-tower role).")]
TitleOption = Annotated[str | None, typer.Option("--title", help="Report title.")]


def report_command(
    results: list[Path] = typer.Argument(..., help="Evaluation output folders (each with results.json)."),
    out: Path = typer.Option(..., "--out", help="Folder for report.md and categories_r5.png."),
    names: NamesOption = None,
    ours: OursOption = None,
    title: TitleOption = None,
) -> None:
    """Compare evaluation results: Markdown tables (per task, category, modification) and a bar chart."""
    from jfe.eval.protocol import EvalResult
    from jfe.eval.report import write_report

    loaded = [EvalResult.load(p) for p in results]
    labels = run_labels(names, loaded)
    if len(set(labels)) != len(labels):
        raise ConfigError(f"run names must be unique, got {labels} (pass --names; repeats of one run across "
                          f"seeds are `jfe seeds-report`)")
    path = write_report(dict(zip(labels, loaded, strict=True)), out, ours=ours, title=title)
    typer.echo(f"wrote {path} and {path.parent / 'categories_r5.png'}")
