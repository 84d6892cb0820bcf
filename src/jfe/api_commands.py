"""``jfe search``: a thin shell over :func:`jfe.api.search`, so the command and the Python API rank alike.

It lives at the top (beside :mod:`jfe.api`, which sits above the layers), not in ``jfe.index.commands``: the
index layer must not import the API module, which reaches up to training and evaluation. Heavy imports
happen inside the command so that ``jfe --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from jfe.cli_options import DEFAULT_PRECISION, BackendOption, PrecisionOption, RerankKOption, RerankOption
from jfe.errors import ConfigError, DataError


def register(app: typer.Typer) -> None:
    """Add ``jfe search`` to the ``jfe`` app."""
    app.command("search")(search_command)


def search_command(
    index: Path = typer.Option(..., "--index", help="Index folder written by `jfe index build`."),
    model: str = typer.Option(None, "--model", help="Model name or folder (default: the one the index was built "
                                                    "with)."),
    text: str = typer.Option(None, "--text", help="Query text."),
    image: Path = typer.Option(None, "--image", help="Query image file."),
    instruction: str = typer.Option(None, "--instruction", help="Task instruction prefixed to the query text."),
    k: int = typer.Option(10, "-k", "--top-k", min=1, help="How many results."),
    exclude: list[str] = typer.Option(None, "--exclude", help="A candidate id never to return (repeatable), e.g. "
                                                             "the query image's own id in composed search."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    precision: PrecisionOption = DEFAULT_PRECISION,
    rerank: RerankOption = None,
    rerank_k: RerankKOption = 50,
    backend: BackendOption = None,
) -> None:
    """Search an index with a text, an image, or both; print a ranked table (or JSON). With --rerank, a reranker
    reorders the first --rerank-k hits, reading query and candidate together."""
    from jfe.api import search
    from jfe.data.items import Item
    from jfe.index.shards import load_index

    if not text and image is None:
        raise ConfigError("give a query: --text, --image or both")
    if image is not None and not image.is_file():
        raise DataError("query image not found", path=str(image))
    vector_index = load_index(index, mmap=True)  # search only: the vectors page in from disk
    name = model or vector_index.meta.get("model")
    if not name:
        raise ConfigError(f"the index at {index} does not name its model; pass --model")
    query = Item(text=text or None, image=image, id="query")
    hits = [_shown(hit) for hit in search(vector_index, query, model=str(name), k=k, instruction=instruction,
                                          exclude=exclude or None, precision=precision, rerank=rerank,
                                          rerank_k=rerank_k, backend=backend)]
    if as_json:
        typer.echo(json.dumps({"index": str(index), "model": str(name), "k": k, "rerank": rerank,
                               "rerank_k": rerank_k if rerank else None, "hits": hits}, ensure_ascii=False))
        return
    reranked = f", top {rerank_k} reranked by {rerank}" if rerank else ""
    _print_table(hits, f"top {k} of {len(vector_index)} in {index} (model {name}{reranked})", reranked=bool(rerank))


def _shown(hit: dict[str, Any]) -> dict[str, Any]:
    """An API hit as the command shows it: the record's modality, text and image path up front."""
    record = hit["record"]
    return {"rank": hit["rank"], "first_stage_rank": hit["first_stage_rank"], "did": hit["did"],
            "score": round(hit["score"], 6),
            "modality": record.get("modality"), "text": record.get("txt"), "image": record.get("img_path"),
            "record": record}


def _print_table(hits: list[dict[str, Any]], title: str, reranked: bool = False) -> None:
    from rich.markup import escape
    from rich.table import Table

    from jfe.index.commands import _console

    table = Table(title=title)
    columns = ("rank", *(("was",) if reranked else ()), "did", "score", "modality", "text", "image")
    for column in columns:
        table.add_column(column, justify="right" if column in ("rank", "was", "score") else "left",
                         overflow="fold", no_wrap=column in ("rank", "was", "did", "score"))
    for hit in hits:
        was = (str(hit["first_stage_rank"]),) if reranked else ()
        table.add_row(str(hit["rank"]), *was, escape(hit["did"]), f"{hit['score']:.4f}", hit["modality"] or "-",
                      escape(hit["text"] or "-"), escape(hit["image"] or "-"))
    _console().print(table)
