"""``jfe train stage1 | stage2 | rerank | run --config FILE [--resume] [--set key=value ...]`` and ``jfe mine``.

Under torchrun, every rank runs the same command:
``torchrun --nproc_per_node 2 -m jfe.train stage2 --config configs/jfe-mini-stage2.toml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from jfe.errors import ConfigError


def _run(config: Path, stage: str | None, resume: bool, sets: list[str] | None, quiet: bool) -> None:
    from jfe.train.config import load_config, parse_overrides
    from jfe.train.run import train

    overrides = parse_overrides(sets)
    cfg = load_config(config, overrides)
    if stage is not None and cfg.stage != stage:
        raise ConfigError(f"{config} is a {cfg.stage!r} config; use `jfe train {cfg.stage}` or `jfe train run`")
    final = train(cfg, resume=resume, progress=not quiet)
    typer.echo(str(final))


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Train an encoder: stage 1 (alignment), stage 2 (instruction tuning), a reranker on "
                             "mined lists, or any config.", no_args_is_help=True)

    config_opt = typer.Option(..., "--config", "-c", exists=True, dir_okay=False, help="TOML training config.")
    resume_opt = typer.Option(False, "--resume", help="Continue from the newest checkpoint in output_dir.")
    set_opt = typer.Option(None, "--set", help="Override a config key, e.g. --set steps=50 --set task_weights.7=2.")
    quiet_opt = typer.Option(False, "--quiet", "-q", help="No progress bar.")

    @group.command("stage1")
    def stage1(config: Path = config_opt, resume: bool = resume_opt, set_: list[str] | None = set_opt,
               quiet: bool = quiet_opt) -> None:
        """Post-training adaptation: image<->caption and text<->text contrastive (align, then full)."""
        _run(config, "stage1", resume, set_, quiet)

    @group.command("stage2")
    def stage2(config: Path = config_opt, resume: bool = resume_opt, set_: list[str] | None = set_opt,
               quiet: bool = quiet_opt) -> None:
        """Instruction tuning over every task type with instructions and hard negatives."""
        _run(config, "stage2", resume, set_, quiet)

    @group.command("run")
    def run(config: Path = config_opt, resume: bool = resume_opt, set_: list[str] | None = set_opt,
            quiet: bool = quiet_opt) -> None:
        """Any training config (the stage is whatever the file says)."""
        _run(config, None, resume, set_, quiet)

    @group.command("rerank")
    def rerank(config: Path = config_opt, resume: bool = resume_opt, set_: list[str] | None = set_opt,
               quiet: bool = quiet_opt) -> None:
        """Train a reranker on mined lists: listwise softmax over each query's positive and mined negatives."""
        _run(config, "rerank", resume, set_, quiet)

    app.add_typer(group, name="train")

    @app.command("mine")
    def mine(model: list[str] = typer.Option(..., "--model", "-m",
                                             help="The retriever: a name, hf:<path> or a folder. Cross-fitting: "
                                                  "one --model per fold, each trained with held_out_fold (it "
                                                  "mines the fold it never saw)."),
             data: Path = typer.Option(..., "--data", exists=True, file_okay=False, help="M-BEIR-layout root."),
             out: Path = typer.Option(..., "--out", "-o", help="The mined lists (JSON lines) to write."),
             split: str = typer.Option("train", "--split", help="Query split to mine (train for training)."),
             k: int = typer.Option(50, "--k", min=1, help="Negatives kept per query."),
             pool: str = typer.Option("local", "--pool", help="local (each task's pool) or global."),
             margin: float | None = typer.Option(None, "--margin", min=0.0,
                                                 help="Drop candidates scoring above best positive - margin "
                                                      "(likely false negatives)."),
             instructions: str = typer.Option("default", "--instructions", help="default | heldout | none."),
             batch_size: int = typer.Option(64, "--batch-size", min=1),
             max_queries: int | None = typer.Option(None, "--max-queries", min=1, help="Per query file (smoke)."),
             precision: str = typer.Option("auto", "--precision", help="auto | fp32 | bf16."),
             quiet: bool = quiet_opt) -> None:
        """Each query's top-k candidates from a retriever, positives removed: hard negatives for training."""
        from jfe.models import load_model
        from jfe.paths import check_writable_path
        from jfe.train.mine import mine as run_mine
        from jfe.train.mine import mine_cross_fitted, score_spread, write_mined

        check_writable_path(out, folder=False)
        encoders = [load_model(name).set_precision(precision) for name in model]
        options: dict[str, Any] = {"k": k, "pool": pool, "margin": margin, "instructions": instructions,
                                   "batch_size": batch_size, "progress": not quiet, "max_queries": max_queries}
        if len(encoders) == 1:
            mined = run_mine(encoders[0], data, split=split, model_name=model[0], **options)
        else:
            mined = mine_cross_fitted(encoders, data, split=split, model_names=model, **options)
        write_mined(out, mined)
        spread = score_spread(mined)
        typer.echo(f"{out}: {int(spread['queries'])} queries, {spread['negatives_per_query']:.1f} negatives each, "
                   f"mean gap best positive - best negative {spread['mean_gap']:+.3f}; "
                   f"{mined.meta['dropped_as_false_negatives']} dropped by the margin")
        if "held_out_fold" in mined.meta:
            held = mined.meta["held_out_fold"]
            typer.echo(f"{model[0]} holds out fold {held['fold']}/{held['folds']} of {split!r}: only that fold's "
                       "queries were mined (give one --model per fold to cover the split)")
