"""The one exception type that carries a user-facing message.

Library code raises :class:`SeftcError` (or a subclass) for every problem with the user's input;
the CLI prints its message on one line and exits with status 2. Anything else is a bug and keeps
its traceback.
"""


class SeftcError(Exception):
    """Bad input: the message names what is wrong and how to fix it."""


class FormatError(SeftcError):
    """A packed sparse tensor or file is malformed."""
