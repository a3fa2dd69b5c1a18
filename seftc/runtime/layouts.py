"""Kernel layouts built from a dense pruned weight or from a packed tensor's components.

`SparseLayout` is what `seftc::sparse_linear` reads: per row, 64-bit mask words (bit i of word w =
column 64*w + i) and that row's stored values contiguous in column order, with row offsets. The
values buffer ends in `PAD` zeros so that SIMD decoders may read a little past the last value.
A 2:4 weight uses the same layout with exactly two bits per aligned group of four (its stored
zeros included), so its bytes equal the 2:4 format's: C/2 values + C/8 mask bytes per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from seftc.errors import SeftcError

PAD = 16
KINDS = ("bitmask", "2:4")


def _pack_words(keep: torch.Tensor) -> torch.Tensor:
    """bool [R, C] -> int64 [R, ceil(C/64)] (little-endian bit order)."""
    rows, cols = keep.shape
    words = (cols + 63) // 64
    bits = np.zeros((rows, words * 64), dtype=bool)
    bits[:, :cols] = keep.cpu().numpy()
    packed = np.packbits(bits, axis=-1, bitorder="little")  # [R, 8W] bytes
    return torch.from_numpy(np.ascontiguousarray(packed).view("<i8").reshape(rows, words).copy())


def _padded(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values.reshape(-1), values.new_zeros(PAD)])


def keep_24(weight: torch.Tensor) -> torch.Tensor:
    """bool [R, C]: each aligned group of four keeps its non-zeros, filled up to exactly two with
    its lowest-index zeros. The weight must have at most two non-zeros per group."""
    rows, cols = weight.shape
    nz = (weight != 0).reshape(rows, cols // 4, 4)
    if bool((nz.sum(-1) > 2).any()):
        raise SeftcError("weight is not 2:4 sparse (a group of four holds more than two non-zeros)")
    idx = torch.arange(4).expand_as(nz)
    key = torch.where(nz, idx, idx + 4)
    kept = key.sort(dim=-1).values[..., :2] % 4
    keep = torch.zeros_like(nz)
    keep.scatter_(-1, kept, True)
    return keep.reshape(rows, cols)


def is_24(weight: torch.Tensor) -> bool:
    rows, cols = weight.shape
    return cols % 4 == 0 and bool(((weight != 0).reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


@dataclass
class SparseLayout:
    kind: str  # "bitmask" | "2:4"
    shape: tuple[int, int]
    masks: torch.Tensor  # int64 [R, W]
    values: torch.Tensor  # [n + PAD], the weight's dtype
    row_offsets: torch.Tensor  # int64 [R + 1]

    @property
    def nnz_stored(self) -> int:
        return int(self.row_offsets[-1])

    @property
    def nbytes(self) -> int:
        """Bytes a matrix-vector product reads: stored values, mask words, row offsets."""
        return (self.nnz_stored * self.values.element_size() + self.masks.numel() * 8 + self.row_offsets.numel() * 8)

    @property
    def dense_nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.values.element_size()

    @classmethod
    def from_dense(cls, weight: torch.Tensor, kind: str = "bitmask", dtype: torch.dtype | None = None) -> "SparseLayout":
        """Build from a dense (pruned) weight [R, C]; zeros are not stored (2:4: exactly C/2 per row)."""
        if weight.dim() != 2:
            raise SeftcError(f"a sparse linear weight must be 2-D, not {list(weight.shape)}")
        if kind not in KINDS:
            raise SeftcError(f"unknown sparse layout {kind!r}; choose one of {', '.join(KINDS)}")
        w = weight.detach().to("cpu", dtype or weight.dtype).contiguous()
        if w.dtype not in (torch.float32, torch.bfloat16):
            w = w.float()
        if kind == "2:4":
            if w.shape[1] % 4:
                raise SeftcError(f"a 2:4 layout needs a multiple of 4 columns, not {w.shape[1]}")
            keep = keep_24(w)
        else:
            keep = w != 0
        counts = keep.sum(dim=1)
        offsets = torch.zeros(w.shape[0] + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=offsets[1:])
        return cls(kind, (int(w.shape[0]), int(w.shape[1])), _pack_words(keep), _padded(w[keep]), offsets)

    @classmethod
    def from_packed(cls, packed, name: str = "<tensor>") -> "SparseLayout":
        """Build from a `seftc.formats` PackedTensor; bitmask and 2:4 are translated directly,
        any other format is decoded (validated) and re-laid out."""
        rows, cols = packed.shape
        comps = packed.components
        dtype = packed.dtype if packed.dtype in (torch.float32, torch.bfloat16) else torch.float32
        if packed.format == "bitmask" and packed.dtype == dtype:
            packed.to_dense(name)  # validates structure
            mask = comps["mask"].numpy()
            words = (cols + 63) // 64
            buf = np.zeros((rows, words * 8), dtype=np.uint8)
            buf[:, : mask.shape[1]] = mask
            masks = torch.from_numpy(buf.view("<i8").reshape(rows, words).copy())
            offsets = torch.from_numpy(comps["row_offsets"].numpy().astype(np.int64))
            return cls("bitmask", (rows, cols), masks, _padded(comps["values"].reshape(-1)), offsets)
        if packed.format == "2:4" and packed.dtype == dtype:
            from seftc.formats.two_four import unpack_2bit

            packed.to_dense(name)
            pos = torch.from_numpy(unpack_2bit(comps["positions"].numpy(), cols // 2)).reshape(rows, cols // 4, 2)
            keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool)
            keep.scatter_(-1, pos, True)
            offsets = torch.arange(rows + 1, dtype=torch.int64) * (cols // 2)
            return cls("2:4", (rows, cols), _pack_words(keep.reshape(rows, cols)), _padded(comps["values"].reshape(-1)), offsets)
        dense = packed.to_dense(name)
        return cls.from_dense(dense, "2:4" if packed.format == "2:4" else "bitmask", dtype)

    @classmethod
    def concat(cls, layouts: "list[SparseLayout]") -> "SparseLayout":
        """The layout of the weights stacked by rows (the layout is row-wise: masks and offsets stack,
        values follow one another). All must have the same columns and values dtype; the kind is
        theirs when they share it, else bitmask (a 2:4 block is a valid bitmask block)."""
        cols = layouts[0].shape[1]
        if any(l.shape[1] != cols or l.values.dtype != layouts[0].values.dtype for l in layouts):
            raise ValueError("concatenated layouts need the same columns and values dtype")
        kinds = {l.kind for l in layouts}
        offsets, base = [torch.zeros(1, dtype=torch.int64)], 0
        for l in layouts:
            start = int(l.row_offsets[0])
            offsets.append(l.row_offsets[1:] - start + base)
            base += l.nnz_stored - start
        values = torch.cat([l.values[int(l.row_offsets[0]):l.nnz_stored] for l in layouts])
        return cls(kinds.pop() if len(kinds) == 1 else "bitmask", (sum(l.shape[0] for l in layouts), cols),
                   torch.cat([l.masks for l in layouts]), _padded(values), torch.cat(offsets))

    def to_dense(self) -> torch.Tensor:
        from seftc.runtime.reference import dense_weight

        return dense_weight(self.masks, self.values, self.row_offsets, self.shape[1])
