"""``jfe index build`` and ``jfe search``.

Heavy imports (torch, faiss, rich) happen inside the command functions so that ``jfe --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from jfe.errors import ConfigError, DataError

index_app = typer.Typer(help="Vector indexes over M-BEIR candidate pools.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add ``jfe index ...`` and ``jfe search`` to the ``jfe`` app."""
    app.add_typer(index_app, name="index")
    app.command("search")(search_command)


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
    out: Path = typer.Option(..., "--out", help="Index folder to write (replaced atomically)."),
    factory: str = typer.Option("Flat", "--factory", help="faiss index_factory string: Flat (exact), IVF1024,Flat, "
                                                          "HNSW32, IVF4096,PQ32 ..."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Candidates per encoder batch."),
    nprobe: int = typer.Option(None, "--nprobe", min=1, help="IVF lists probed per query (more: slower, more "
                                                             "exact); saved with the index."),
    search_param: list[str] = typer.Option(None, "--search-param", help="faiss search parameter NAME=VALUE "
                                           "(efSearch=128, nprobe=32); repeatable; saved in meta.json."),
    shards: int = typer.Option(1, "--shards", min=1, help="Write the index as this many shards."),
    ray: str = typer.Option(None, "--ray", help="Encode with Ray across workers (ADDRESS or auto; needs the "
                                                "`ray` extra) and write shards."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Embed candidate pools (no instruction) and write a searchable index folder."""
    import time

    from jfe.index.build import parse_search_params, write_index

    files = _split_files(pool)
    started = time.perf_counter()
    params = parse_search_params(search_param) if search_param else None
    if nprobe is not None:
        params = {**(params or {}), "nprobe": nprobe}
    index = write_index(out, model, files, data_root, factory=factory, search_params=params, batch_size=batch_size,
                        progress=progress, shards=shards, ray_address=ray)
    _console(stderr=True).print(f"indexed {len(index)} candidates (dim {index.dim}, {factory}) into {out} "
                                f"in {time.perf_counter() - started:.1f}s", markup=False)


def search_command(
    index: Path = typer.Option(..., "--index", help="Index folder written by `jfe index build`."),
    model: str = typer.Option(None, "--model", help="Model name or folder (default: the one the index was built "
                                                    "with)."),
    text: str = typer.Option(None, "--text", help="Query text."),
    image: Path = typer.Option(None, "--image", help="Query image file."),
    instruction: str = typer.Option(None, "--instruction", help="Task instruction prefixed to the query text."),
    k: int = typer.Option(10, "-k", "--top-k", min=1, help="How many results."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Search an index with a text, an image, or both; print a ranked table (or JSON)."""
    from jfe.data.items import Item
    from jfe.index.shards import load_index
    from jfe.models.registry import load_model

    if not text and image is None:
        raise ConfigError("give a query: --text, --image or both")
    if image is not None and not image.is_file():
        raise DataError("query image not found", path=str(image))
    vector_index = load_index(index, mmap=True)  # search only: the vectors page in from disk
    name = model or vector_index.meta.get("model")
    if not name:
        raise ConfigError(f"the index at {index} does not name its model; pass --model")
    encoder = load_model(str(name))
    query = Item(text=text or None, image=image, id="query")
    vector = encoder.encode([query], instruction=instruction)
    ids, scores = vector_index.search(vector, k)
    from jfe.index.hits import hits_from

    hits: list[dict[str, Any]] = [
        {"rank": hit.rank, "did": hit.did, "score": round(hit.score, 6), "modality": hit.record.get("modality"),
         "text": hit.record.get("txt"), "image": hit.record.get("img_path"), "record": hit.record}
        for hit in hits_from(vector_index, ids[0], scores[0].tolist())]
    if as_json:
        typer.echo(json.dumps({"index": str(index), "model": str(name), "k": k, "hits": hits}, ensure_ascii=False))
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"top {k} of {len(vector_index)} in {index} (model {name})")
    for column in ("rank", "did", "score", "modality", "text", "image"):
        table.add_column(column, justify="right" if column in ("rank", "score") else "left",
                         overflow="fold", no_wrap=column in ("rank", "did", "score"))
    for hit in hits:
        table.add_row(str(hit["rank"]), escape(hit["did"]), f"{hit['score']:.4f}", hit["modality"] or "-",
                      escape(hit["text"] or "-"), escape(hit["image"] or "-"))
    _console().print(table)
