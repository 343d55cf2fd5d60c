"""The `prunekit` command line: thin wrappers over the Python API.

The commands live by what they do: `build` (demo, inspect, export, prune) makes a smaller model,
`measure` (report, check, sensitivity, search, bundle, device-table) measures one, gates it or
allocates with what was measured; `support` holds what they share. This module registers them.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from prunekit.cli import build, measure
from prunekit.cli.build import export_command

__all__ = ["app", "export_command"]

app = typer.Typer(help="Prune trained PyTorch models and measure what it bought.", no_args_is_help=True)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False) -> None:
    """prunekit: smaller, faster models with measured results."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


COMMANDS = (
    ("demo", build.demo), ("inspect", build.inspect), ("export", build.export), ("prune", build.prune_command),
    ("report", measure.report), ("check", measure.check_command), ("sensitivity", measure.sensitivity_command),
    ("search", measure.search_command), ("bundle", measure.bundle_command),
    ("device-table", measure.device_table_command),
)
for _name, _command in COMMANDS:
    app.command(_name)(_command)
