"""The one ``jfe`` command. Each layer contributes a sub-command group from its own module."""
from __future__ import annotations

import typer

app = typer.Typer(help="JFE: universal multimodal retrieval with a joint fusion encoder.", no_args_is_help=True)


def main() -> None:
    app()
