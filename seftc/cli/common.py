"""What every subcommand shares: error conduct, JSON output, progress bars."""
from __future__ import annotations

import errno
import functools
import json
import re
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from seftc.errors import SeftcError, no_space, os_errno, printable

# Piped or redirected, rich would cut tables and lines at 80 columns; a log gets the full width instead.
_UNBOUNDED = 100_000
stderr = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=_UNBOUNDED)
stdout = Console() if sys.stdout.isatty() else Console(width=_UNBOUNDED)


def fail(message: str) -> "NoReturn":  # type: ignore[name-defined]
    """One clear line on stderr, exit status 2, no traceback."""
    click.echo(f"error: {printable(message)}", err=True)
    sys.exit(2)


_OS_ERRORS = {
    errno.EACCES: "permission denied: {where}; check its permissions",
    errno.EPERM: "operation not permitted: {where}; check its permissions",
    errno.EROFS: "{where} is on a read-only file system; write somewhere else",
    errno.ENAMETOOLONG: "file name too long: {where}; choose a shorter name",
    errno.ENOENT: "no such file or folder: {where}",
    errno.ENOTDIR: "not a folder: {where}",
    errno.EISDIR: "{where} is a folder where a file was expected",
    errno.ELOOP: "too many levels of symbolic links: {where}",
    errno.EMFILE: "too many open files ({where}); raise the limit (ulimit -n)",
    errno.EIO: "input/output error on {where}; check the disk",
    errno.ENOMEM: "out of memory ({where})",
}
_ALLOC = re.compile(r"(?:can't allocate memory|Tried to allocate|tried to allocate)[^0-9]*([0-9.]+) ?(bytes|[KMGT]iB)?", re.I)


def os_error_message(e: BaseException) -> str | None:
    """One line for an OSError the user can fix (full disk, permissions, read-only, long names...),
    or None. Also reads the errno that safetensors (Rust) puts in its messages."""
    code = os_errno(e)
    if code is None:
        return None
    where = getattr(e, "filename", None)
    where = printable(where) if where is not None else "the output"
    space = no_space(e)
    if space is not None:
        return f"no space left on the device of {where}{space}; free some space or write somewhere else (nothing was kept)"
    template = _OS_ERRORS.get(code)
    return template.format(where=where) if template else None


def memory_error_message(e: BaseException) -> str | None:
    """One line for running out of memory (Python's MemoryError, torch's allocator errors), with
    the size asked for when the message has it; None for anything else."""
    text = str(e)
    gpu = type(e).__name__ == "OutOfMemoryError"
    if not (isinstance(e, MemoryError) or gpu or "DefaultCPUAllocator" in text or "out of memory" in text.lower()):
        return None
    m = _ALLOC.search(text)
    size = ""
    if m:
        value = float(m.group(1)) * {None: 1, "bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}[m.group(2)]
        size = f" allocating {value / 2**30:.2f} GiB"
    where = "GPU memory" if gpu else "memory"
    return (f"out of {where}{size}; use smaller settings (batch, samples, sequence length) or a machine with more {where}, "
            "and check that the input's sizes are what you expect")


def user_errors(fn: Callable) -> Callable:
    """Turn a SeftcError, running out of memory, and OS errors the user can fix (full disk,
    permissions, read-only folders, long names) into `fail`: one line, exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SeftcError as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted; nothing was written")
        except Exception as e:
            message = memory_error_message(e) or os_error_message(e)
            if message is None:
                raise
            fail(message)

    return wrapper


def note_checksums(status: str) -> None:
    """Say on stderr when a packed folder was read without checksums (formats/README.md)."""
    if status != "verified":
        from seftc.formats.packing import FOREIGN_NOTE

        click.echo(f"note: {FOREIGN_NOTE}", err=True)


class Checked(click.ParamType):
    """An option type for options without a config model: validated by one of the constrained
    types in seftc.config_types (those the typed configs use), so limits live in one place.
    `type=Checked(Count)`."""

    def __init__(self, kind: Any):
        self.kind = kind
        self.name = "integer" if kind.__origin__ is int else "number"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        from seftc.config_types import check

        try:
            return check(self.kind, value, "value")
        except ValueError as e:
            self.fail(str(e).removeprefix("value: "), param, ctx)


class CountList(click.ParamType):
    """Comma-separated positive integers ("1,4,16"), each a `Count`."""

    name = "counts"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[int, ...]:
        from seftc.config_types import parse_counts

        if isinstance(value, tuple):
            return value
        try:
            return parse_counts(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


class RichProgress:
    """A progress reporter for library code: `progress(description, total)` opens a task,
    the returned callable advances it. Library code only sees the Protocol in seftc.progress.
    The live display starts with the first task, so a command that fails before any work
    prints its error line alone (no blank line left by an empty display)."""

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console or stderr,
            transient=False,
            disable=not enabled,
        )
        self._started = False

    def __enter__(self) -> "RichProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._started:
            self._progress.__exit__(*exc)

    def task(self, description: str, total: int | None) -> Callable[[int], None]:
        if not self._started:
            self._progress.__enter__()
            self._started = True
        task_id = self._progress.add_task(description, total=total)
        self._last = (task_id, description)
        return lambda n=1: self._progress.advance(task_id, n)

    def status(self, **fields: Any) -> None:
        """Show live figures (step, loss, tokens/s, ...) beside the last task's bar."""
        task_id, description = self._last
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items() if v is not None)
        self._progress.update(task_id, description=f"{description} {text}")


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Any]:
    """Live bars on a terminal; plain periodic lines when stderr is a log (see plain_progress);
    nothing when not `enabled` (e.g. --json)."""
    if enabled and not stderr.is_terminal:
        from seftc.cli.plain_progress import LineProgress

        with LineProgress() as lines:
            yield lines
        return
    with RichProgress(enabled) as p:
        yield p


def max_shard_size_option(fn: Callable) -> Callable:
    """`--max-shard-size SIZE` for commands that write model weights."""
    return click.option("--max-shard-size", default="5GB", show_default=True, metavar="SIZE",
                        help="Largest weight file written (500MB, 5GB, 2GiB); bigger outputs are sharded with an index.")(fn)


def device_option(fn: Callable) -> Callable:
    """`--device cpu|cuda` for commands that compute on a model (default: CUDA when available)."""
    return click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, show_default="cuda when available, else cpu",
                        help="Where to compute.")(fn)


def max_memory_option(fn: Callable) -> Callable:
    """`--max-memory SIZE` for commands that load a model: refuse up front what the plan says won't fit."""
    return click.option("--max-memory", default=None, metavar="SIZE", show_default="no limit",
                        help="Refuse to start when the estimated peak memory (seftc plan) exceeds SIZE (e.g. 8GiB).")(fn)
