"""`csr`: compressed sparse rows: values, column indices at the narrowest sufficient width, row
pointers. Spec: formats/csr.md.
"""
from __future__ import annotations

import numpy as np
import torch

from seftc.formats.base import Analysis, Codec, Errors, PackedTensor, index_tensor, index_width, scatter_dense, values_tensor


class CSR(Codec):
    name = "csr"
    components = ("values", "col_indices", "row_ptr")

    def nbytes(self, a: Analysis) -> int:
        return a.nnz * (a.itemsize + index_width(max(a.cols - 1, 0))) + (a.rows + 1) * index_width(a.nnz)

    def encode(self, a: Analysis) -> PackedTensor:
        cols = np.flatnonzero(a.mask) % max(a.cols, 1)
        return self.packed(a, {
            "values": values_tensor(a.values, a.dtype),
            "col_indices": index_tensor(cols, max(a.cols - 1, 0)),
            "row_ptr": index_tensor(a.row_offsets, a.nnz),
        })

    def _decode(self, p: PackedTensor, err: Errors) -> torch.Tensor:
        rows, cols = p.shape
        values = err.comp(p, "values", (p.dtype,), ndim=1)
        err.no_zero_values("values", values)
        nnz = values.size
        col = err.index(p, "col_indices", (nnz,), width_for=max(cols - 1, 0))
        ptr = err.index(p, "row_ptr", (rows + 1,), width_for=nnz)
        err.offsets("row_ptr", ptr, nnz)
        if nnz and int(col.max()) >= cols:
            err(f"component 'col_indices' holds column {int(col.max())}, but the tensor has {cols} columns")
        row = np.repeat(np.arange(rows, dtype=np.int64), np.diff(ptr))
        if nnz > 1 and bool(((row[1:] == row[:-1]) & (col[1:] <= col[:-1])).any()):
            err("component 'col_indices' is not strictly increasing within a row")
        return scatter_dense((rows, cols), p.dtype, row * cols + col, values)


CSR_CODEC = CSR()


def from_dense(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    return CSR_CODEC.from_dense(tensor).components


def to_dense(components: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    return CSR_CODEC.decode(PackedTensor(CSR_CODEC.name, tuple(shape), dtype, components))
