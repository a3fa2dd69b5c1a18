"""`bitmask`: the non-zero values in row order, a packed bit per position, row offsets.

Spec: formats/bitmask.md.
"""
from __future__ import annotations

import numpy as np
import torch

from seftc.formats.base import (Analysis, Codec, Errors, PackedTensor, index_tensor, index_width, pack_bits, padding_is_zero,
                                row_offsets_of, scatter_dense, unpack_bits, values_tensor)


class Bitmask(Codec):
    name = "bitmask"
    components = ("values", "mask", "row_offsets")

    def nbytes(self, a: Analysis) -> int:
        return a.nnz * a.itemsize + a.rows * ((a.cols + 7) // 8) + (a.rows + 1) * index_width(a.nnz)

    def encode(self, a: Analysis) -> PackedTensor:
        return self.packed(a, bitmask_components(a.mask, values_tensor(a.values, a.dtype)))

    def _decode(self, p: PackedTensor, err: Errors) -> torch.Tensor:
        index, values = read_bitmask(p, err, p.dtype)
        return scatter_dense(p.shape, p.dtype, index, values)


def bitmask_components(mask: np.ndarray, values: torch.Tensor) -> dict[str, np.ndarray | torch.Tensor]:
    """`values` (the non-zeros in row order), `mask` and `row_offsets` of a bool [R, C] mask."""
    return {"values": values, "mask": pack_bits(mask), "row_offsets": index_tensor(row_offsets_of(mask), int(values.numel()))}


def read_bitmask(p: PackedTensor, err: Errors, values_dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Check the `values` / `mask` / `row_offsets` components of `p` (formats/bitmask.md, Checks)
    and return the row-major flat index of every stored value and the values (raw bits)."""
    rows, cols = p.shape
    mask = err.comp(p, "mask", (torch.uint8,), (rows, (cols + 7) // 8))
    values = err.comp(p, "values", (values_dtype,), ndim=1)
    err.no_zero_values("values", values)
    offs = err.index(p, "row_offsets", (rows + 1,), width_for=values.size)
    if not padding_is_zero(mask, cols):
        err("component 'mask' has bits set past the last column")
    err.offsets("row_offsets", offs, values.size)
    bits = unpack_bits(mask, cols)
    counts = np.count_nonzero(bits, axis=1)
    bad = np.flatnonzero(np.diff(offs) != counts)
    if bad.size:
        r = int(bad[0])
        err(f"row_offsets give row {r} {int(offs[r + 1] - offs[r])} values, but its mask has {int(counts[r])} bits set")
    return np.flatnonzero(bits), values


BITMASK = Bitmask()


def from_dense(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    return BITMASK.from_dense(tensor).components


def to_dense(components: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    return BITMASK.decode(PackedTensor(BITMASK.name, tuple(shape), dtype, components))
