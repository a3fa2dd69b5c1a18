"""The one exception type that carries a user-facing message.

Library code raises :class:`SeftcError` (or a subclass) for every problem with the user's input;
the CLI prints its message on one line and exits with status 2. Anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations

import errno
import re


def printable(text: object) -> str:
    """`text` with undecodable bytes (surrogate escapes from non-UTF-8 paths) shown as \\xNN."""
    s = text.decode("utf-8", "surrogateescape") if isinstance(text, bytes) else str(text)
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def os_errno(e: BaseException) -> int | None:
    """The errno behind `e`: an OSError's, or the one safetensors (Rust) writes into its message
    ("... (os error 28)"); None for anything else."""
    if isinstance(e, OSError):
        return e.errno
    m = re.search(r"\(os error (\d+)\)", str(e))
    return int(m.group(1)) if m else None


def no_space(e: BaseException) -> str | None:
    """When `e` means the disk is full (ENOSPC, a file size limit EFBIG, a quota EDQUOT): what to
    add after "no space left on the device of PATH"; None otherwise."""
    code = os_errno(e)
    if code == errno.ENOSPC:
        return ""
    if code == errno.EFBIG:
        return " (file size limit reached)"
    if code == errno.EDQUOT:
        return " (disk quota exceeded)"
    return None


class SeftcError(Exception):
    """Bad input: the message names what is wrong and how to fix it."""


class FormatError(SeftcError):
    """A packed sparse tensor or file is malformed."""


def validation_message(err: dict) -> str:
    """One pydantic error's message as a user reads it (no "Value error," prefix)."""
    if err["type"] == "extra_forbidden":
        return "unknown key"
    msg = str(err["msg"])
    for noise in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(noise)
    return msg


def validated(model_cls, where: str, prefix: str = "", labels: dict[str, str] | None = None, **values):
    """Build a pydantic config, turning its first validation error into one SeftcError line that
    names the key's path (`prune.sparsityy: unknown key`); `labels` maps a key to how the user
    gave it (e.g. `--set prune.sparsity=2`), which then names it instead."""
    from pydantic import ValidationError

    try:
        return model_cls(**values)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"]]
        path = ".".join([where, *loc])
        if labels and loc and loc[0] in labels:
            raise SeftcError(f"{labels[loc[0]]}: {validation_message(err)}") from None
        shown = "" if err["type"] in ("extra_forbidden", "value_error", "assertion_error") else f", got {repr(err['input'])[:60]}"
        raise SeftcError(f"{prefix}{path}: {validation_message(err)}{shown}") from None
