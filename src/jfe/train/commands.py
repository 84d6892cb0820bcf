"""``jfe train stage1 | stage2 | run --config FILE [--resume] [--set key=value ...]``.

Under torchrun, every rank runs the same command:
``torchrun --nproc_per_node 2 -m jfe.train stage2 --config configs/jfe-mini-stage2.toml``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from jfe.errors import ConfigError


def _run(config: Path, stage: str | None, resume: bool, sets: list[str] | None, quiet: bool) -> None:
    from jfe.train.config import load_config, parse_overrides
    from jfe.train.trainer import train

    overrides = parse_overrides(sets)
    cfg = load_config(config, overrides)
    if stage is not None and cfg.stage != stage:
        raise ConfigError(f"{config} is a {cfg.stage!r} config; use `jfe train {cfg.stage}` or `jfe train run`")
    final = train(cfg, resume=resume, progress=not quiet)
    typer.echo(str(final))


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Train an encoder: stage 1 (alignment), stage 2 (instruction tuning), or any config.",
                        no_args_is_help=True)

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

    app.add_typer(group, name="train")
