"""``jfe index build`` (``jfe search`` is :mod:`jfe.api_commands`, a shell over ``jfe.search``).

Heavy imports (torch, faiss, rich) happen inside the command functions so that ``jfe --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from jfe.cli_options import DEFAULT_PRECISION, BackendOption, PrecisionOption
from jfe.errors import ConfigError

index_app = typer.Typer(help="Vector indexes over M-BEIR candidate pools.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add ``jfe index ...`` to the ``jfe`` app."""
    app.add_typer(index_app, name="index")


def _console(stderr: bool = False):  # noqa: ANN202 - rich is imported lazily
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=None if stream.isatty() else 200)


def _split_files(values: list[str]) -> list[Path]:
    files = [Path(p.strip()) for value in values for p in value.split(",") if p.strip()]
    if not files:
        raise ConfigError("give at least one --pool file")
    return files


@index_app.command("build")
def index_build(
    model: str = typer.Option(..., "--model", help="Model name (e.g. jfe-mini) or saved model folder."),
    pool: list[str] = typer.Option(..., "--pool", help="Candidate pool jsonl file(s): comma-separated or repeated."),
    data_root: Path = typer.Option(..., "--data-root", help="Dataset root that image paths are relative to."),
    out: Path = typer.Option(..., "--out", help="Index folder to write (an index there is replaced atomically; "
                                                "any other non-empty folder is refused)."),
    factory: str = typer.Option("Flat", "--factory", help="faiss index_factory string: Flat (exact), IVF1024,Flat, "
                                                          "HNSW32, IVF4096,PQ32 ...; with --store lancedb: Flat, "
                                                          "IVF_PQ or IVF_HNSW_SQ."),
    store: str = typer.Option("faiss", "--store", help="faiss (JFE's index folder) or lancedb (a LanceDB table "
                                                       "other tools open too; the `lancedb` extra)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Candidates per encoder batch."),
    nprobe: int = typer.Option(None, "--nprobe", min=1, help="IVF lists probed per query (more: slower, more "
                                                             "exact); saved with the index."),
    search_param: list[str] = typer.Option(None, "--search-param", help="faiss search parameter NAME=VALUE "
                                           "(efSearch=128, nprobe=32); repeatable; saved in meta.json."),
    shards: int = typer.Option(1, "--shards", min=1, help="Write the index as this many shards."),
    ray: str = typer.Option(None, "--ray", help="Encode with Ray across workers (ADDRESS or auto; needs the "
                                                "`ray` extra) and write shards."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    precision: PrecisionOption = DEFAULT_PRECISION,
    backend: BackendOption = None,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder that is not an "
                                                              "index, and everything in it."),
) -> None:
    """Embed candidate pools (no instruction) and write a searchable index folder."""
    import time

    from jfe.index.build import parse_search_params
    from jfe.indexing import write_index

    files = _split_files(pool)
    started = time.perf_counter()
    params = parse_search_params(search_param) if search_param else None
    if nprobe is not None:
        params = {**(params or {}), "nprobe": nprobe}
    index = write_index(out, model, files, data_root, factory=factory, search_params=params, batch_size=batch_size,
                        progress=progress, shards=shards, ray_address=ray, precision=precision,
                        overwrite=overwrite, backend=backend, store=store.strip().lower())
    _console(stderr=True).print(f"indexed {len(index)} candidates (dim {index.dim}, {factory}) into {out} "
                                f"in {time.perf_counter() - started:.1f}s", markup=False)
