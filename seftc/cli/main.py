"""`seftc` entry point: a click group whose subcommands live one per module and load lazily,
so `seftc --help` does not import torch."""
from __future__ import annotations

import difflib
import importlib
import sys

import click

# command name -> "module:attribute"
COMMANDS = {
    "prune": "seftc.cli.prune:prune",
    "eval": "seftc.cli.evaluate:evaluate",
    "inspect": "seftc.cli.inspect:inspect_cmd",
    "repair": "seftc.cli.repair:repair",
    "pack": "seftc.cli.pack:pack",
    "compress": "seftc.cli.compress:compress",
    "export": "seftc.cli.export:export",
    "bench": "seftc.cli.bench:bench",
    "generate": "seftc.cli.generate:generate",
    "unpack": "seftc.cli.pack:unpack",
    "serve": "seftc.cli.serve:serve",
    "plan": "seftc.cli.plan:plan",
}


class LazyGroup(click.Group):
    """Subcommands imported on demand; usage errors print one line and exit with status 2."""

    def main(self, *args, **kwargs):  # type: ignore[override]
        args_list = list(args[0]) if args and args[0] is not None else sys.argv[1:]
        _check_utf8(args_list)
        if not any(a in ("-h", "--help", "--version") for a in args_list) and args_list:
            _quiet_transformers()
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(2)
        sys.exit(rv if isinstance(rv, int) else 0)

    def resolve_command(self, ctx: click.Context, args: list[str]):  # type: ignore[override]
        name = args[0] if args else ""
        if name and not name.startswith("-") and name not in COMMANDS:
            close = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; commands: {', '.join(sorted(COMMANDS))}"
            raise click.UsageError(f"no such command '{name}'{hint}", ctx)
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Each command's whole first sentence (click would cut it at the terminal width)."""
        rows = [(name, self.get_command(ctx, name).get_short_help_str(limit=1000)) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

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


def _check_utf8(args: list[str]) -> None:
    """Refuse arguments that are not valid UTF-8 (seftc's file formats and libraries need UTF-8
    paths and text) before any work: one line, exit 2."""
    from seftc.errors import printable

    for arg in args:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            click.echo(f"error: argument {printable(arg)!r} is not valid UTF-8; seftc needs UTF-8 file names and text "
                       "(rename the file)", err=True)
            sys.exit(2)


def _quiet_transformers() -> None:
    """The CLI draws its own progress; silence transformers' bars and advisories (CLI only)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
