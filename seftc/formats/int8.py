"""`bitmask-int8` and `2:4-int8`: the `bitmask` and `2:4` position layouts holding int8 values
with one float32 scale per output row (symmetric, round-to-nearest from the weights; no
calibration). Lossy: a tensor decodes to `dtype(q * scale)`. Spec: formats/int8.md.

Both codecs also expose the quantized form itself: `from_quantized(q, scales, dtype)` packs an
int8 [R, C] matrix and its scales, `quantized(p)` validates a packed tensor and returns them (the
runtime's int8 kernels read that form; the encoding of a given (q, scales) is unique).
"""
from __future__ import annotations

import numpy as np
import torch

from seftc.errors import FormatError
from seftc.formats.base import (KEEP24_PAIRS, Analysis, Codec, Errors, PackedTensor, holds_24, index_width, keep24_of, pack_bits)
from seftc.formats.bitmask import bitmask_components, read_bitmask
from seftc.formats.quantize import dequantize, scale_problem
from seftc.formats.two_four import check_kept, kept_slots, read_24

_MIN_INT8 = np.uint8(0x80)  # -128: outside the symmetric range


class _Int8Codec(Codec):
    quantized = True

    def nbytes(self, a: Analysis) -> int | None:
        qs = a.int8
        return None if qs is None else self.quantized_nbytes(qs[0].numpy())

    def quantized_nbytes(self, q: np.ndarray) -> int | None:
        raise NotImplementedError

    def from_dense(self, tensor: torch.Tensor | Analysis) -> PackedTensor:
        a = tensor if isinstance(tensor, Analysis) else Analysis(tensor)
        if a.int8 is None:
            raise FormatError(f"format {self.name!r} cannot hold NaN or infinite values")
        return super().from_dense(a)

    def encode(self, a: Analysis) -> PackedTensor:
        qs = a.int8
        if qs is None:
            raise FormatError(f"format {self.name!r} cannot hold NaN or infinite values")
        return self.from_quantized(qs[0], qs[1], a.dtype)

    def from_quantized(self, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> PackedTensor:
        """Pack int8 `q` [R, C] (values in [-127, 127]) with float32 `scales` [R] as a `dtype` tensor."""
        raise NotImplementedError

    def _read(self, p: PackedTensor, err: Errors) -> tuple[np.ndarray, np.ndarray]:
        """Checked (int8 q [R, C], float32 scales [R]) of `p`, as numpy."""
        raise NotImplementedError

    def quantized(self, p: PackedTensor, name: str = "<tensor>") -> tuple[torch.Tensor, torch.Tensor]:
        """Validate `p` as `decode` does and return (int8 q [R, C], float32 scales [R])."""
        err = self._checked(p, name)
        q, scales = self._read(p, err)
        return torch.from_numpy(q), torch.from_numpy(scales)

    def _decode(self, p: PackedTensor, err: Errors) -> torch.Tensor:
        q, scales = self._read(p, err)
        return dequantize(torch.from_numpy(q), torch.from_numpy(scales), p.dtype)

    def _finish(self, p: PackedTensor, err: Errors, index: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The int8 matrix with `values` (raw bits) at flat `index`, after the checks every
        int8 format shares: no -128, canonical scales (formats/int8.md, Checks)."""
        rows, cols = p.shape
        if values.size and bool((values == _MIN_INT8).any()):
            err("component 'values' holds -128; values are in [-127, 127]")
        scales = err.comp(p, "scales", (torch.float32,), (rows,))
        q = np.zeros(rows * cols, dtype=np.int8)
        q[index] = values.reshape(-1).view(np.int8)
        q = q.reshape(rows, cols)
        peak = np.abs(q.astype(np.int16)).max(axis=1) if cols else np.zeros(rows, dtype=np.int16)
        problem = scale_problem(scales, peak, p.dtype)
        if problem:
            err(f"component 'scales': {problem}")
        return q, scales.view(np.float32)


class BitmaskInt8(_Int8Codec):
    name = "bitmask-int8"
    components = ("values", "mask", "row_offsets", "scales")

    def quantized_nbytes(self, q: np.ndarray) -> int:
        rows, cols = q.shape
        nnz = int(np.count_nonzero(q))
        return nnz + rows * ((cols + 7) // 8) + (rows + 1) * index_width(nnz) + 4 * rows

    def from_quantized(self, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> PackedTensor:
        qn = q.numpy()
        mask = qn != 0
        comps = {**bitmask_components(mask, torch.from_numpy(qn[mask])), "scales": scales.to(torch.float32).contiguous()}
        return self.packed_as(qn.shape, dtype, comps)

    def _read(self, p: PackedTensor, err: Errors) -> tuple[np.ndarray, np.ndarray]:
        index, values = read_bitmask(p, err, torch.int8)
        return self._finish(p, err, index, values)


class TwoFourInt8(_Int8Codec):
    name = "2:4-int8"
    components = ("values", "positions", "scales")

    def quantized_nbytes(self, q: np.ndarray) -> int | None:
        rows, cols = q.shape
        if not holds_24(pack_bits(q != 0), cols):
            return None
        return rows * (cols // 2) + rows * ((cols + 7) // 8) + 4 * rows

    def from_quantized(self, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> PackedTensor:
        qn = q.numpy()
        codes = pack_bits(qn != 0)
        if not holds_24(codes, qn.shape[1]):
            raise FormatError(f"format {self.name!r} needs at most 2 non-zeros in every aligned group of 4 columns")
        comps = {"values": torch.from_numpy(kept_slots(qn, codes)), "positions": keep24_of(codes, qn.shape[1], KEEP24_PAIRS),
                 "scales": scales.to(torch.float32).contiguous()}
        return self.packed_as(qn.shape, dtype, comps)

    def _read(self, p: PackedTensor, err: Errors) -> tuple[np.ndarray, np.ndarray]:
        index, values, positions = read_24(p, err, torch.int8)
        q, scales = self._finish(p, err, index, values)
        check_kept(err, pack_bits(q != 0), p.shape[1], positions)
        return q, scales


BITMASK_INT8 = BitmaskInt8()
TWO_FOUR_INT8 = TwoFourInt8()
