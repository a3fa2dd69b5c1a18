"""`2:4`: two values per aligned group of four columns, `[R, C/2]`, plus their 2-bit positions
packed four to a byte. Spec: formats/24.md.
"""
from __future__ import annotations

import numpy as np
import torch

from seftc.formats.base import (KEEP24_MASK, KEEP24_PAIRS, Analysis, Codec, Errors, PackedTensor, keep24_of, scatter_dense, unpack_bits,
                                values_tensor)


class TwoFour(Codec):
    name = "2:4"
    components = ("values", "positions")

    def nbytes(self, a: Analysis) -> int | None:
        if not a.is_24:
            return None
        return a.rows * (a.cols // 2) * a.itemsize + a.rows * ((a.cols + 7) // 8)

    def encode(self, a: Analysis) -> PackedTensor:
        positions = a.keep24(KEEP24_PAIRS)
        return self.packed(a, {"values": values_tensor(kept_values(a), a.dtype), "positions": positions})

    def _decode(self, p: PackedTensor, err: Errors) -> torch.Tensor:
        index, values, positions = read_24(p, err, p.dtype)
        out = scatter_dense(p.shape, p.dtype, index, values)
        check_kept(err, Analysis(out).group_codes, p.shape[1], positions)
        return out


def read_24(p: PackedTensor, err: Errors, values_dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check the `values` / `positions` components of `p` (formats/24.md, Checks, all but the
    canonical choice of kept zeros: `check_kept`) and return the row-major flat index of every
    slot, the slot values (raw bits) and the packed positions."""
    rows, cols = p.shape
    if cols % 4:
        err(f"has {cols} columns, not a multiple of 4")
    values = err.comp(p, "values", (values_dtype,), (rows, cols // 2))
    packed = err.comp(p, "positions", (torch.uint8,), (rows, (cols + 7) // 8))
    if cols % 8 and rows and bool((packed[:, -1] >> 4).any()):
        err("component 'positions' has bits set past the last group")
    pos = unpack_2bit(packed, cols // 2).reshape(rows, cols // 4, 2)
    if bool((pos[..., 0] >= pos[..., 1]).any()):
        err("component 'positions' has a group whose two positions are not strictly increasing")
    index = pos + np.arange(0, cols, 4, dtype=np.int64).reshape(1, -1, 1) + np.arange(rows, dtype=np.int64).reshape(-1, 1, 1) * cols
    return index.reshape(-1), values, packed


def check_kept(err: Errors, group_codes: np.ndarray, cols: int, positions: np.ndarray) -> None:
    """The stored positions must be the decoded tensor's kept positions (packed mask `group_codes`)."""
    if not np.array_equal(keep24_of(group_codes, cols, KEEP24_PAIRS), positions):
        err("component 'positions' is not canonical: a group keeps a zero other than its lowest-index ones (formats/24.md)")


def kept_values(a: Analysis) -> np.ndarray:
    """[R, C/2]: the values at each group's two kept positions (raw bits), row-major."""
    return kept_slots(a.bits, a.group_codes)


def kept_slots(values: np.ndarray, group_codes: np.ndarray) -> np.ndarray:
    """[R, C/2]: the entries of `values` [R, C] at each group's two kept positions (packed mask
    `group_codes` of the non-zeros), row-major."""
    rows, cols = values.shape
    kept = unpack_bits(keep24_of(group_codes, cols, KEEP24_MASK), cols)
    return values[kept].reshape(rows, cols // 2)


def unpack_2bit(packed: np.ndarray, s: int) -> np.ndarray:
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
    q = ((packed[..., None] >> shifts) & 3).reshape(packed.shape[0], packed.shape[1] * 4)
    return q[:, :s].astype(np.int64)


TWO_FOUR = TwoFour()


def from_dense(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    return TWO_FOUR.from_dense(tensor).components


def to_dense(components: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    return TWO_FOUR.decode(PackedTensor(TWO_FOUR.name, tuple(shape), dtype, components))
