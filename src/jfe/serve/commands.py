"""``jfe serve``: run the HTTP search service (FastAPI + uvicorn). Heavy imports happen inside the command."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from jfe.cli_options import DEFAULT_PRECISION, BackendOption, PrecisionOption
from jfe.errors import ConfigError
from jfe.serve.server import KEEP_ALIVE_S


def register(app: typer.Typer) -> None:
    """Add ``jfe serve`` to the ``jfe`` app."""
    app.command("serve")(serve_command)


def serve_command(
    index: Path | None = typer.Option(None, "--index", help="index folder written by `jfe index build`"),
    model: str | None = typer.Option(None, "--model", help="model name or folder (default: the index's model)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)"),
    port: int = typer.Option(8000, help="TCP port"),
    api_key: str | None = typer.Option(None, "--api-key", envvar="JFE_API_KEY",
                                       help="require this key (X-API-Key or Bearer) on the API endpoints"),
    cors_origin: list[str] = typer.Option([], "--cors-origin", help="allow this browser origin (repeatable)"),
    max_batch: int = typer.Option(32, min=1, help="most items encoded together"),
    max_inputs: int = typer.Option(2048, "--max-inputs", min=1, help="most inputs in one /v1/embeddings request "
                                   "(OpenAI's limit)"),
    max_wait_ms: float = typer.Option(5.0, min=0, help="how long a request waits for others to batch with"),
    max_rerank_pairs: int = typer.Option(256, min=1, help="most (query, candidate) pairs reranked together"),
    batching: bool = typer.Option(True, "--batching/--no-batching", help="micro-batch concurrent requests"),
    max_image_mb: float = typer.Option(8.0, min=0.001, help="largest accepted image file, in MiB"),
    max_pixels: int = typer.Option(4096 * 4096, min=1, help="largest accepted image, width x height"),
    demo: bool = typer.Option(False, "--demo", help="serve a built-in shapes dataset with the toy encoder"),
    precision: PrecisionOption = DEFAULT_PRECISION,
    backend: BackendOption = None,
    mmap: bool = typer.Option(False, "--mmap/--no-mmap", help="memory-map the index files instead of reading "
                                                             "them into RAM (large indexes; read-only)"),
    rerank: list[str] = typer.Option([], "--rerank", help="a reranker /search and /v1/rerank may name "
                                                           "(repeatable), e.g. jfe-mini-rerank or a trained folder"),
    log_level: str = typer.Option("info", help="uvicorn log level"),
    keep_alive: int = typer.Option(KEEP_ALIVE_S, "--keep-alive", min=1,
                                   help="seconds an idle keep-alive connection is held (longer than clients' own "
                                        "expiry, so a reused connection is never closed under the client)"),
) -> None:
    """Serve search, embeddings and the web page over HTTP."""
    import uvicorn

    from jfe.models.registry import load_model, load_reranker
    from jfe.serve.app import create_app
    from jfe.serve.schemas import ServeSettings

    if demo:
        from jfe.paths import cache_dir
        from jfe.serve.sample import build_sample_index

        vector_index = build_sample_index(cache_dir() / "serve-demo")
        model = model or "toy"
    elif index is None:
        raise ConfigError("give --index DIR (an index built by `jfe index build`) or --demo")
    else:
        from jfe.index.shards import load_index

        vector_index = load_index(index, mmap=mmap)  # one index folder or a sharded one (merged search)
    model = model or vector_index.meta.get("model")
    if not model:
        raise ConfigError(f"the index at {index} does not name its model; pass --model")
    from jfe.indexing import query_backend, query_precision

    encoder = load_model(str(model), backend=query_backend(vector_index.meta, str(model), backend))
    # auto: as the index's vectors were computed (an ONNX export: in its own precision)
    encoder.set_precision(*query_precision(vector_index.meta, precision, encoder))
    settings = ServeSettings(model_name=str(model), api_key=api_key or os.environ.get("JFE_API_KEY") or None,
                             cors_origins=list(cors_origin), max_batch=max_batch, max_wait_ms=max_wait_ms,
                             max_rerank_pairs=max_rerank_pairs,
                             batching=batching, max_image_bytes=int(max_image_mb * 1024 * 1024),
                             max_pixels=max_pixels, max_inputs=max_inputs)
    rerankers = {name: load_reranker(name, f"--rerank {name}").set_precision(precision) for name in rerank}
    app = create_app(encoder, vector_index, settings, rerankers)
    if not settings.api_key and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host} without an API key: anyone who can reach this port can search "
                   f"and embed; pass --api-key (or set JFE_API_KEY)", err=True)
    reranking = f"; rerankers: {', '.join(rerankers)}" if rerankers else ""
    typer.echo(f"serving {len(vector_index)} candidates with {model} on http://{host}:{port}/ "
               f"(docs: /docs; auth: {'on' if settings.api_key else 'off'}{reranking})")
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=keep_alive)
