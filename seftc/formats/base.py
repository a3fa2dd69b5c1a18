"""What every format shares: the codec interface, the packed tensor, bit helpers, validation.

A *codec* turns one dense tensor into named component tensors and back. Components are torch
tensors (that is what safetensors stores); the reference encoders and decoders work on numpy
views of them on the CPU. Values are moved as raw bit patterns (never through float
arithmetic), so a round trip is bit-exact, NaNs and -0.0 included. "Zero" always means the
all-zero bit pattern (+0.0); -0.0 is a value like any other.

Every decoder validates its input before it allocates anything sized by it and raises
:class:`FormatError` naming the tensor and what is wrong.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import torch

from seftc.errors import FormatError

# dtype <-> the safetensors name used in specs, metadata and checksums
ST_NAMES: dict[torch.dtype, str] = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.bool: "BOOL",
}
ST_DTYPES: dict[str, torch.dtype] = {v: k for k, v in ST_NAMES.items()}
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the sparse formats pack
UINTS = (torch.uint8, torch.uint16, torch.uint32, torch.uint64)
_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NP_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

MAX_DIM = 1 << 40  # no real weight has a dimension anywhere near this
MAX_DENSE_BYTES = 1 << 36  # refuse to materialise a dense tensor above 64 GiB (see formats/README.md)
# A sparse tensor's dense form may be at most MAX_EXPANSION times its component bytes (tensors up to
# EXPANSION_FLOOR bytes dense are exempt): what a file can justify. Honest tensors stay far below it
# (rice at 99.99 % sparsity, float32: ~7000x); the writer never produces one above it.
MAX_EXPANSION = 1 << 16
EXPANSION_FLOOR = 1 << 20
RESERVED_NAMES = ("__metadata__",)  # safetensors' header key; never a tensor name


def memory_limit() -> int:
    """The most bytes a reader will allocate for one dense tensor: this machine's physical memory."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return MAX_DENSE_BYTES


def justified(dense_bytes: int, payload_bytes: int) -> bool:
    """Whether `payload_bytes` of components may decode to `dense_bytes` (formats/README.md, Limits)."""
    return dense_bytes <= max(EXPANSION_FLOOR, MAX_EXPANSION * payload_bytes)


def name_problem(name: Any) -> str | None:
    """Why `name` cannot be a stored tensor's name (formats/README.md, The container), or None."""
    if not isinstance(name, str) or not name:
        return "is empty"
    if name in RESERVED_NAMES:
        return "is reserved by safetensors"
    bad = next((ch for ch in name if ch in "/\\" or ord(ch) < 0x20 or ord(ch) == 0x7F), None)
    if bad is not None:
        return f"contains {bad!r} (no path separators or control characters)"
    return None


def st_name(dtype: torch.dtype) -> str:
    try:
        return ST_NAMES[dtype]
    except KeyError:
        raise FormatError(f"dtype {dtype} cannot be stored") from None


def index_dtype(max_value: int) -> torch.dtype:
    """The narrowest unsigned integer dtype holding 0..max_value."""
    for dt, limit in ((torch.uint8, 0xFF), (torch.uint16, 0xFFFF), (torch.uint32, 0xFFFFFFFF)):
        if max_value <= limit:
            return dt
    return torch.uint64


def index_width(max_value: int) -> int:
    return index_dtype(max_value).itemsize


# --- torch <-> numpy, bit patterns preserved ------------------------------------------------------

def np_bits(t: torch.Tensor) -> np.ndarray:
    """The tensor's raw bits as an unsigned numpy array of the same element width (a view)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t.view(_SIGNED[t.element_size()]).numpy().view(_NP_UINT[t.element_size()])


def _np_signed(width: int) -> Any:
    return {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[width]


def index_tensor(a: np.ndarray, max_value: int) -> torch.Tensor:
    """Non-negative integers as a torch tensor at the narrowest width for max_value."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=_NP_UINT[index_width(max_value)]))


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """bool [..., n] -> uint8 [..., ceil(n/8)], LSB first: numpy.packbits(bitorder="little")."""
    return np.packbits(bits, axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, n: int) -> np.ndarray:
    """uint8 [..., m] -> bool [..., n] (n <= 8*m), inverse of pack_bits."""
    return np.unpackbits(packed, axis=-1, count=n, bitorder="little").view(bool)


def padding_is_zero(packed: np.ndarray, n: int) -> bool:
    """Whether the bits past the first n of each row of `packed` are all zero."""
    if n % 8 == 0 or packed.shape[-1] == 0:
        return True
    return not bool((packed[..., -1] >> (n % 8)).any())


def sha256_of(name: str, fmt: str, version: int, dtype: str, shape: tuple[int, ...], params: dict[str, int],
              components: list[tuple[str, torch.Tensor]]) -> str:
    """The checksum of one stored tensor, as specified in formats/README.md: it covers the name,
    the header (format, version, dtype, shape, params) and every component's name, dtype, shape
    and bytes."""
    h = hashlib.sha256()
    h.update(name.encode("utf-8") + b"\n")
    p = ";".join(f"{k}={params[k]}" for k in sorted(params))
    h.update(f"seftc/{fmt}/{version}/{dtype}/{_dims(shape)}/{p}\n".encode("ascii"))
    for comp, t in components:
        h.update(f"{comp}/{st_name(t.dtype)}/{_dims(tuple(t.shape))}\n".encode("ascii"))
        h.update(raw_bytes(t))
    return h.hexdigest()


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(d)) for d in shape)


def raw_bytes(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(np_bits(t).reshape(-1).view(np.uint8))


class Analysis:
    """One dense tensor and the facts every codec's size estimate needs, computed once."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.dim() != 2:
            raise FormatError(f"sparse formats take 2-D tensors, not shape {tuple(tensor.shape)}")
        if tensor.dtype not in VALUE_DTYPES:
            raise FormatError(f"sparse formats take float32/float16/bfloat16 values, not {tensor.dtype}")
        self.tensor = tensor.detach().cpu().contiguous()
        self.dtype = self.tensor.dtype
        self.rows, self.cols = (int(d) for d in self.tensor.shape)
        self.itemsize = self.tensor.element_size()
        self.bits = np_bits(self.tensor)  # uint16/uint32 [R, C]

    @cached_property
    def mask(self) -> np.ndarray:
        return self.bits != 0

    @cached_property
    def nnz(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def dense_bytes(self) -> int:
        return self.numel * self.itemsize

    @cached_property
    def values(self) -> np.ndarray:
        """The non-zero values' bits in row-major order."""
        return self.bits[self.mask]

    @cached_property
    def row_offsets(self) -> np.ndarray:
        """int64 [R+1]: where each row's values start; the last entry is nnz."""
        return row_offsets_of(self.mask)

    @cached_property
    def group_codes(self) -> np.ndarray:
        """uint8 [R, ceil(C/8)]: the packed mask, two groups of four per byte (low nibble first)."""
        return pack_bits(self.mask)

    @cached_property
    def is_24(self) -> bool:
        """At most two non-zeros in every aligned group of four along each row."""
        return holds_24(self.group_codes, self.cols)

    def keep24(self, table: np.ndarray) -> np.ndarray:
        """uint8 [R, ceil(C/8)]: `table[nibble]` for both groups of each mask byte (see KEEP24_*)."""
        return keep24_of(self.group_codes, self.cols, table)

    @cached_property
    def int8(self) -> "tuple[torch.Tensor, torch.Tensor] | None":
        """(int8 [R, C], float32 [R]): the tensor quantized per row (formats/int8.md), or None
        when it holds NaN or infinity, which int8 cannot represent."""
        from seftc.formats.quantize import quantize_rows

        return quantize_rows(self.tensor)


def row_offsets_of(mask: np.ndarray) -> np.ndarray:
    """int64 [R+1] from a bool [R, C] mask: where each row's entries start; the last is the total."""
    out = np.zeros(mask.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.count_nonzero(mask, axis=1), out=out[1:])
    return out


def holds_24(group_codes: np.ndarray, cols: int) -> bool:
    """Whether a packed mask has at most two bits in every aligned group of four (and C % 4 == 0)."""
    return cols % 4 == 0 and bool(_POP2[group_codes].all())


def keep24_of(group_codes: np.ndarray, cols: int, table: np.ndarray) -> np.ndarray:
    """uint8 [R, ceil(C/8)]: `table[nibble]` for both groups of each packed-mask byte (see
    KEEP24_*); the high nibble of a row's last byte is zero when C % 8 == 4."""
    out = table[group_codes & 15] | (table[group_codes >> 4] << 4)
    if cols % 8 == 4 and out.shape[0]:
        out[:, -1] &= 15
    return out


def _keep24_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each 4-bit group mask: the two kept positions (its non-zeros, filled up with its
    lowest-index zeros, ascending) as a 2-bit-pair nibble `p0 | p1 << 2` and as a 4-bit mask."""
    pairs, masks, pop2 = np.zeros(16, np.uint8), np.zeros(16, np.uint8), np.zeros(256, bool)
    for code in range(16):
        nonzero = [i for i in range(4) if code >> i & 1]
        kept = sorted((nonzero + [i for i in range(4) if i not in nonzero])[:2]) if len(nonzero) <= 2 else [0, 1]
        pairs[code] = kept[0] | kept[1] << 2
        masks[code] = (1 << kept[0]) | (1 << kept[1])
    for byte in range(256):
        pop2[byte] = bin(byte & 15).count("1") <= 2 and bin(byte >> 4).count("1") <= 2
    return pairs, masks, pop2


KEEP24_PAIRS, KEEP24_MASK, _POP2 = _keep24_tables()


@dataclass
class PackedTensor:
    """One tensor in one format: its header and its component tensors."""

    format: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    components: dict[str, torch.Tensor]
    params: dict[str, int] = field(default_factory=dict)
    foreign: bool = False  # read from a file without seftc metadata (compressed-tensors' own writer)

    @property
    def codec(self) -> "Codec":
        from seftc.formats.registry import get_codec

        return get_codec(self.format)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.components.values())

    @property
    def dense_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def sha256(self, name: str) -> str:
        codec = self.codec
        comps = [(c, self.components[c]) for c in codec.components]
        return sha256_of(name, self.format, codec.version, st_name(self.dtype), self.shape, self.params, comps)

    def to_dense(self, name: str = "<tensor>") -> torch.Tensor:
        """Validate and decode (reference decoder, on the CPU)."""
        return self.codec.decode(self, name)

    def to(self, device: Any) -> "PackedTensor":
        comps = {k: v.to(device) for k, v in self.components.items()}
        return PackedTensor(self.format, self.shape, self.dtype, comps, dict(self.params), self.foreign)


class Codec:
    """A format: fixed component names (in checksum order) and an encode/decode pair.

    Subclasses set `name`, `version`, `components` and implement `nbytes`, `encode`, `_decode`.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    components: ClassVar[tuple[str, ...]]
    params: ClassVar[tuple[str, ...]] = ()
    sparse: ClassVar[bool] = True
    quantized: ClassVar[bool] = False  # lossy (int8 values + scales): decode(encode(t)) approximates t

    def key(self, name: str, comp: str) -> str:
        """The safetensors key of component `comp` of tensor `name`."""
        return f"{name}.{comp}"

    def nbytes(self, a: Analysis) -> int | None:
        """Payload bytes of `a` in this format, or None when the format cannot hold it."""
        raise NotImplementedError

    def fits(self, a: Analysis) -> bool:
        """Whether this format holds `a` within the readers' limits: the pattern fits (nbytes is
        known) and the dense size is justified by the payload (see `justified`)."""
        size = self.nbytes(a)
        return size is not None and (not self.sparse or justified(a.dense_bytes, size))

    def min_bytes(self, a: Analysis) -> int:
        """A cheap lower bound of nbytes (where nbytes is costly), to skip hopeless candidates."""
        return 0

    def encode(self, a: Analysis) -> PackedTensor:
        raise NotImplementedError

    def _decode(self, p: PackedTensor, err: "Errors") -> torch.Tensor:
        raise NotImplementedError

    def packed(self, a: Analysis, comps: dict[str, np.ndarray | torch.Tensor], params: dict[str, int] | None = None) -> PackedTensor:
        return self.packed_as((a.rows, a.cols), a.dtype, comps, params)

    def packed_as(self, shape: tuple[int, ...], dtype: torch.dtype, comps: dict[str, np.ndarray | torch.Tensor],
                  params: dict[str, int] | None = None) -> PackedTensor:
        tensors = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v)) for k, v in comps.items()}
        return PackedTensor(self.name, tuple(int(d) for d in shape), dtype, tensors, dict(params or {}))

    def from_dense(self, tensor: torch.Tensor | Analysis) -> PackedTensor:
        a = tensor if isinstance(tensor, Analysis) else Analysis(tensor)
        if not self.fits(a):
            raise FormatError(f"a tensor of shape {[a.rows, a.cols]} does not fit format {self.name!r}"
                              f"{'' if self.nbytes(a) is None else ' (too few non-zeros to justify its size; formats/README.md, Limits)'}")
        return self.encode(a)

    def decode(self, p: PackedTensor, name: str = "<tensor>") -> torch.Tensor:
        """Validate `p` and return the dense tensor; FormatError on anything malformed."""
        return self._decode(p, self._checked(p, name))

    def _checked(self, p: PackedTensor, name: str) -> "Errors":
        """Check `p`'s format, header and component names; the error reporter for the rest."""
        err = Errors(name, self.name)
        if p.format != self.name:
            err(f"is format {p.format!r}, not {self.name!r}")
        self.check_header(p, err)
        if sorted(p.components) != sorted(self.components):
            err(f"components {sorted(p.components)} do not match {list(self.components)}")
        return err

    def check_header(self, p: PackedTensor, err: "Errors") -> None:
        if self.sparse:
            if len(p.shape) != 2:
                err(f"shape {list(p.shape)} is not 2-D")
            if p.dtype not in VALUE_DTYPES:
                err(f"value dtype {p.dtype} is not one of F32, F16, BF16")
        if any(not isinstance(d, int) or d < 0 or d > MAX_DIM for d in p.shape):
            err(f"shape {list(p.shape)} has a negative or implausible dimension")
        dense = math.prod(p.shape) * p.dtype.itemsize
        if dense > MAX_DENSE_BYTES:
            err(f"shape {list(p.shape)} would need {dense} bytes dense, over the {MAX_DENSE_BYTES}-byte reader limit")
        if self.sparse and not justified(dense, p.nbytes):
            err(f"shape {list(p.shape)} is not justified by the file: {dense} bytes dense from {p.nbytes} bytes of components, "
                f"over the {MAX_EXPANSION}:1 expansion limit (formats/README.md, Limits); the file is forged or corrupt")
        if dense > memory_limit():
            err(f"shape {list(p.shape)} would need {dense / 2**30:.1f} GiB dense, more than this machine's memory "
                f"({memory_limit() / 2**30:.1f} GiB)")
        if sorted(p.params) != sorted(self.params):
            err(f"params {sorted(p.params)} are not {sorted(self.params)}")


class Errors:
    """Raises FormatError messages that name the tensor and the format, and reads components
    as numpy arrays after checking their dtype and shape."""

    def __init__(self, name: str, fmt: str):
        self.name, self.fmt = name, fmt

    def __call__(self, what: str) -> "NoReturn":  # type: ignore[name-defined]
        raise FormatError(f"tensor {self.name!r} ({self.fmt}): {what}")

    def comp(self, p: PackedTensor, comp: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...] | None = None,
             ndim: int | None = None) -> np.ndarray:
        """Component `comp` (raw bits, unsigned numpy), checked for dtype and shape or ndim."""
        t = p.components[comp]
        if t.dtype not in dtypes:
            self(f"component {comp!r} has dtype {ST_NAMES.get(t.dtype, t.dtype)}, expected {' or '.join(ST_NAMES[d] for d in dtypes)}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            self(f"component {comp!r} has shape {list(t.shape)}, expected {list(shape)}")
        if ndim is not None and t.dim() != ndim:
            self(f"component {comp!r} has {t.dim()} dimensions, expected {ndim}")
        return np_bits(t)

    def index(self, p: PackedTensor, comp: str, shape: tuple[int, ...], width_for: int | None = None) -> np.ndarray:
        """An unsigned index component as int64; with `width_for`, it must be stored at the
        narrowest width for that value. Values of 2^63 and more are refused."""
        t = p.components[comp]
        if width_for is not None and t.dtype != index_dtype(width_for):
            self(f"component {comp!r} has dtype {ST_NAMES.get(t.dtype, t.dtype)}, but the narrowest width for {width_for} is {ST_NAMES[index_dtype(width_for)]}")
        a = self.comp(p, comp, UINTS, shape)
        if a.dtype == np.uint64 and a.size and int(a.max()) >= 1 << 63:
            self(f"component {comp!r} holds a value of 2^63 or more")
        return a.astype(np.int64)

    def no_zero_values(self, comp: str, values: np.ndarray) -> None:
        """Stored values are the non-zeros: +0.0 (all bits zero) among them is a second encoding."""
        if values.size and not values.all():
            self(f"component {comp!r} stores +0.0 as a value; zeros are never stored (non-canonical encoding)")

    def offsets(self, comp: str, offs: np.ndarray, total: int, what: str = "values") -> None:
        """offs must start at 0, never decrease and end at `total`."""
        if offs.size == 0 or int(offs[0]) != 0:
            self(f"component {comp!r} must start at 0")
        if offs.size > 1 and bool((offs[1:] < offs[:-1]).any()):
            self(f"component {comp!r} decreases")
        if int(offs[-1]) != total:
            self(f"component {comp!r} ends at {int(offs[-1])}, but there are {total} {what}")


def scatter_dense(shape: tuple[int, ...], dtype: torch.dtype, flat_index: np.ndarray, values: np.ndarray) -> torch.Tensor:
    """A dense tensor of `shape` with `values` (raw bits) at row-major `flat_index`."""
    try:
        out = np.zeros(math.prod(shape), dtype=_NP_UINT[dtype.itemsize])
    except MemoryError:
        raise FormatError(f"not enough memory for a dense {list(shape)} tensor ({math.prod(shape) * dtype.itemsize / 2**30:.1f} GiB)") from None
    out[flat_index] = values.reshape(-1)
    return torch.from_numpy(out.view(_np_signed(dtype.itemsize))).view(dtype).reshape(shape)


def values_tensor(bits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Raw value bits (unsigned numpy) as a torch tensor of the value dtype."""
    return torch.from_numpy(np.ascontiguousarray(bits).view(_np_signed(dtype.itemsize))).view(dtype)
