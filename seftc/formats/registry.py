"""The fixed table of formats: names (as written in files, manifests and `--format`) -> codecs.

A name read from a file is only ever looked up here; unknown names are a FormatError.
"""
from __future__ import annotations

from seftc.errors import FormatError
from seftc.formats.base import Analysis, Codec
from seftc.formats.bitmask import BITMASK
from seftc.formats.csr import CSR_CODEC
from seftc.formats.ct import CT_24_BITMASK, CT_BITMASK
from seftc.formats.dense import DENSE
from seftc.formats.int8 import BITMASK_INT8, TWO_FOUR_INT8
from seftc.formats.names import INT8_OF, QUANTIZE, quantize_problem  # noqa: F401 (re-exported)
from seftc.formats.rice import RICE
from seftc.formats.two_four import TWO_FOUR

CODECS: dict[str, Codec] = {c.name: c for c in (DENSE, TWO_FOUR, BITMASK, CSR_CODEC, RICE, CT_BITMASK, CT_24_BITMASK,
                                                TWO_FOUR_INT8, BITMASK_INT8)}
# what `auto` chooses among; on a tie the earlier one wins
AUTO_CANDIDATES = ("2:4", "bitmask", "csr", "rice")
CT_LAYOUT = ("ct-sparse-bitmask", "ct-sparse-24-bitmask")
CHOICES = ("auto", "2:4", "bitmask", "csr", "rice", *CT_LAYOUT)
def candidates(fmt: str = "auto", quantize: str = "none") -> tuple[str, ...]:
    """The formats `fmt` (auto or a name) stands for, in tie-break order; their int8 variants
    with quantize="int8"."""
    names = AUTO_CANDIDATES if fmt == "auto" else (get_codec(fmt).name,)
    if quantize == "int8":
        names = tuple(INT8_OF[n] for n in names if n in INT8_OF)
    return names


def get_codec(name: str) -> Codec:
    codec = CODECS.get(name) if isinstance(name, str) else None
    if codec is None:
        raise FormatError(f"unknown format {name!r}; known: {', '.join(CODECS)}")
    return codec


def stored_bytes(codec: Codec, a: Analysis, name: str = "") -> int | None:
    """Payload plus an estimate of the safetensors header entries the components add."""
    size = codec.nbytes(a)
    if size is None:
        return None
    return size + len(codec.components) * (len(name) + _HEADER_PER_COMPONENT) + _HEADER_PER_PARAM * len(codec.params)


_HEADER_PER_COMPONENT = 64  # '"NAME.comp":{"dtype":"U8","shape":[..],"data_offsets":[..,..]},'
_HEADER_PER_PARAM = 16


def choose(a: Analysis, fmt: str = "auto", name: str = "", quantize: str = "none") -> str:
    """The format to store `a` in: with `auto` the smallest valid sparse format, with a named
    format that one where it holds the tensor (their int8 variants with quantize="int8");
    `dense` whenever nothing is smaller than dense."""
    best, best_size = "dense", stored_bytes(get_codec("dense"), a, name)
    for candidate in candidates(fmt, quantize):
        codec = get_codec(candidate)
        if codec.min_bytes(a) >= best_size or not codec.fits(a):
            continue
        size = stored_bytes(codec, a, name)
        if size is not None and size < best_size:
            best, best_size = candidate, size
    return best
