"""``python -m jfe.train stage1|stage2|run --config FILE``: the ``jfe train`` commands as a module, so that
torchrun can start them on every rank: ``torchrun --nproc_per_node 2 -m jfe.train stage2 --config ...``."""

from __future__ import annotations

import sys

import typer

from jfe.errors import JFEError
from jfe.train.commands import register


def main() -> None:
    from jfe.hardware import tune_allocator

    tune_allocator()  # as the jfe command does (JFE_MALLOC_TUNE=0: off)
    app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
    register(app)
    try:
        app(args=["train", *sys.argv[1:]], prog_name="python -m jfe.train")
    except JFEError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
