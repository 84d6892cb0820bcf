"""The one ``jfe`` command.

Each layer contributes its commands from a ``commands`` module of its own (``jfe.data.commands``,
``jfe.models.commands``, ...), each exposing ``register(app)``. Those modules import heavy libraries
inside the command functions so that ``jfe --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

import typer

from jfe.errors import JFEError

app = typer.Typer(help="JFE: universal multimodal retrieval with a joint fusion encoder.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

COMMAND_MODULES = (
    "jfe.data.commands",
    "jfe.models.commands",
    "jfe.train.commands",
    "jfe.index.commands",
    "jfe.api_commands",  # jfe search: over jfe.api, so above every layer
    "jfe.eval.commands",
    "jfe.serve.commands",
)
# Commands of other installed packages (the paper study's `jfe demo`, `jfe reproduce`, `jfe seeds-report`,
# in src/jfe_study): declared as entry points, so the library never imports them.
PLUGIN_GROUP = "jfe.commands"

for _module_name in COMMAND_MODULES:
    importlib.import_module(_module_name).register(app)


def _register_plugins() -> None:
    from importlib.metadata import entry_points

    for entry in entry_points(group=PLUGIN_GROUP):
        entry.load()(app)


_register_plugins()


def main() -> None:
    """Entry point: JFE's own errors print as one clear line, not a traceback."""
    from jfe.hardware import tune_allocator

    tune_allocator()  # batches reuse freed activation memory instead of page-faulting it in (JFE_MALLOC_TUNE=0: off)
    try:
        app()
    except JFEError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except OSError as exc:  # the file system said no (full disk, no permission, a file where a folder goes)
        where = f": {exc.filename}" if exc.filename else ""
        typer.secho(f"error: {exc.strerror or exc}{where}", fg=typer.colors.RED, err=True)
        sys.exit(2)
