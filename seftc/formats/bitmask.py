"""`bitmask`: the non-zero values in row order, a packed bit per position, row offsets.

Spec: formats/bitmask.md.
"""
from __future__ import annotations

import numpy as np
import torch

from seftc.formats.base import (Analysis, Codec, Errors, PackedTensor, index_tensor, index_width, pack_bits, padding_is_zero,
                                scatter_dense, unpack_bits, values_tensor)


class Bitmask(Codec):
    name = "bitmask"
    components = ("values", "mask", "row_offsets")

    def nbytes(self, a: Analysis) -> int:
        return a.nnz * a.itemsize + a.rows * ((a.cols + 7) // 8) + (a.rows + 1) * index_width(a.nnz)

    def encode(self, a: Analysis) -> PackedTensor:
        return self.packed(a, {
            "values": values_tensor(a.values, a.dtype),
            "mask": pack_bits(a.mask),
            "row_offsets": index_tensor(a.row_offsets, a.nnz),
        })

    def _decode(self, p: PackedTensor, err: Errors) -> torch.Tensor:
        rows, cols = p.shape
        mask = err.comp(p, "mask", (torch.uint8,), (rows, (cols + 7) // 8))
        values = err.comp(p, "values", (p.dtype,), ndim=1)
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
        return scatter_dense((rows, cols), p.dtype, np.flatnonzero(bits), values)


BITMASK = Bitmask()


def from_dense(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    return BITMASK.from_dense(tensor).components


def to_dense(components: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    return BITMASK.decode(PackedTensor(BITMASK.name, tuple(shape), dtype, components))
