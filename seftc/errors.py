"""The one exception type that carries a user-facing message.

Library code raises :class:`SeftcError` (or a subclass) for every problem with the user's input;
the CLI prints its message on one line and exits with status 2. Anything else is a bug and keeps
its traceback.
"""


class SeftcError(Exception):
    """Bad input: the message names what is wrong and how to fix it."""


class FormatError(SeftcError):
    """A packed sparse tensor or file is malformed."""


def validated(model_cls, where: str, prefix: str = "", **values):
    """Build a pydantic config, turning its first validation error into one SeftcError line that
    names the key's path (`prune.sparsityy: unknown key`)."""
    from pydantic import ValidationError

    try:
        return model_cls(**values)
    except ValidationError as e:
        err = e.errors()[0]
        path = ".".join([where, *map(str, err["loc"])])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise SeftcError(f"{prefix}{path}: {msg}") from None
