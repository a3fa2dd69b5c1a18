"""`seftc` entry point: a click group whose subcommands live one per module and load lazily,
so `seftc --help` does not import torch."""
from __future__ import annotations

import importlib

import click

# command name -> "module:attribute"
COMMANDS = {
    "prune": "seftc.cli.prune:prune",
    "eval": "seftc.cli.evaluate:evaluate",
    "inspect": "seftc.cli.inspect:inspect_cmd",
    "pack": "seftc.cli.pack:pack",
    "unpack": "seftc.cli.pack:unpack",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="seftc")
def cli() -> None:
    """seftc: prune, repair (SEFT), pack, export and serve sparse LLMs."""


def main() -> None:
    cli()
