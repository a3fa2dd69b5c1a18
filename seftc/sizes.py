"""Byte sizes as people write them: `5GB`, `500MB`, `2GiB`, `8GiB`, `1.5G`, or a plain integer.

Decimal units (KB, MB, GB, TB) are powers of 1000 and binary units (KiB, MiB, GiB, TiB) powers of
1024, as in Hugging Face's `max_shard_size`; a bare `K`/`M`/`G`/`T` is binary (like `ls -h`)."""
from __future__ import annotations

import re

from seftc.errors import SeftcError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes from `text`; raises SeftcError naming `what` (e.g. '--max-shard-size')."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.fullmatch(str(text))
        unit = _UNITS.get(match[2].lower()) if match else None
        if unit is None:
            raise SeftcError(f"{what} {text!r} is not a size; write e.g. 500MB, 5GB or 2GiB")
        value = int(float(match[1]) * unit)
    if value <= 0:
        raise SeftcError(f"{what} must be positive, got {text!r}")
    return value


def format_size(n: float) -> str:
    """`n` bytes in binary units with three significant figures (`1.47 GiB`)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"
