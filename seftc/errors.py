"""The one exception type that carries a user-facing message.

Library code raises :class:`SeftcError` (or a subclass) for every problem with the user's input;
the CLI prints its message on one line and exits with status 2. Anything else is a bug and keeps
its traceback.
"""


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
