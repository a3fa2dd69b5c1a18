"""`rice`: Golomb-Rice coded position gaps, entropy-efficient at high sparsity.

The non-zero positions of each block of rows, taken in row-major order, become gaps (zeros
skipped since the previous non-zero). Each gap g is split at a per-tensor parameter k: the low
k bits go to a fixed-width `low` stream, the high part g >> k in unary to the `high` stream. A
block index gives each block's first value and first high bit, so blocks decode independently.
Spec: formats/rice.md.
"""
from __future__ import annotations

import numpy as np
import torch

from seftc.formats.base import (Analysis, Codec, Errors, PackedTensor, index_tensor, index_width, pack_bits, padding_is_zero,
                                scatter_dense, unpack_bits, values_tensor)

BLOCK_ROWS = 64
MAX_K = 40


class Plan:
    """The gap coding of one tensor: which k, and each non-zero's block and gap."""

    def __init__(self, a: Analysis, block_rows: int = BLOCK_ROWS):
        self.block_rows = block_rows
        self.nblocks = -(-a.rows // block_rows)
        block_len = max(block_rows * a.cols, 1)
        flat = np.flatnonzero(a.mask)
        self.blk = flat // block_len
        rel = flat - self.blk * block_len
        gaps = np.empty_like(rel)
        if rel.size:
            gaps[0] = rel[0]
            gaps[1:] = np.where(self.blk[1:] != self.blk[:-1], rel[1:], rel[1:] - rel[:-1] - 1)
        self.gaps = gaps
        self.nnz = int(flat.size)
        self.k = best_k(self.gaps)
        self.high_bits = int((self.gaps >> self.k).sum()) + self.nnz

    def nbytes(self, itemsize: int) -> int:
        index = (self.nblocks + 1) * (index_width(self.nnz) + index_width(self.high_bits))
        return self.nnz * itemsize + (self.nnz * self.k + 7) // 8 + (self.high_bits + 7) // 8 + index


def best_k(gaps: np.ndarray) -> int:
    """The canonical k: the smallest minimising the stream bits `nnz*k + sum(gaps >> k)`."""
    if gaps.size == 0:
        return 0
    best, best_cost = 0, None
    for k in range(0, int(gaps.max()).bit_length() + 1):
        cost = gaps.size * k + int((gaps >> k).sum())
        if best_cost is not None and cost >= best_cost:
            break  # the cost is convex in k
        best, best_cost = k, cost
    return best


class Rice(Codec):
    name = "rice"
    components = ("values", "low", "high", "block_nnz", "block_bits")
    params = ("block_rows", "k")

    def plan(self, a: Analysis) -> Plan:
        if not hasattr(a, "_rice_plan"):
            a._rice_plan = Plan(a)  # type: ignore[attr-defined]
        return a._rice_plan  # type: ignore[attr-defined]

    def nbytes(self, a: Analysis) -> int:
        return self.plan(a).nbytes(a.itemsize)

    def min_bytes(self, a: Analysis) -> int:
        return a.nnz * a.itemsize + (a.nnz + 7) // 8  # values + one terminating bit per value

    def encode(self, a: Analysis) -> PackedTensor:
        plan = self.plan(a)
        k, g = plan.k, plan.gaps
        step = (g >> k) + 1
        high = np.zeros(plan.high_bits, dtype=bool)
        high[np.cumsum(step) - 1] = True
        block_nnz = np.zeros(plan.nblocks + 1, dtype=np.int64)
        np.cumsum(np.bincount(plan.blk, minlength=plan.nblocks), out=block_nnz[1:])
        block_bits = np.zeros(plan.nblocks + 1, dtype=np.int64)
        np.cumsum(np.bincount(plan.blk, weights=step, minlength=plan.nblocks).astype(np.int64), out=block_bits[1:])
        return self.packed(a, {
            "values": values_tensor(a.values, a.dtype),
            "low": _pack_fields(g, k),
            "high": pack_bits(high),
            "block_nnz": index_tensor(block_nnz, plan.nnz),
            "block_bits": index_tensor(block_bits, plan.high_bits),
        }, {"k": k, "block_rows": plan.block_rows})

    def _decode(self, p: PackedTensor, err: Errors) -> torch.Tensor:
        rows, cols = p.shape
        k, block_rows = p.params["k"], p.params["block_rows"]
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_K:
            err(f"param k={k!r} is not an integer in 0..{MAX_K}")
        if block_rows != BLOCK_ROWS or isinstance(block_rows, bool):
            err(f"param block_rows={block_rows!r} is not {BLOCK_ROWS} (the one canonical block size)")
        nblocks = -(-rows // block_rows)
        span = min(block_rows, rows) * cols  # positions in a full block
        values = err.comp(p, "values", (p.dtype,), ndim=1)
        err.no_zero_values("values", values)
        nnz = values.size
        bn = err.index(p, "block_nnz", (nblocks + 1,), width_for=nnz)
        err.offsets("block_nnz", bn, nnz)
        bb = err.index(p, "block_bits", (nblocks + 1,))
        total = int(bb[-1])
        err.offsets("block_bits", bb, total, "bits")
        err.index(p, "block_bits", (nblocks + 1,), width_for=total)
        high = err.comp(p, "high", (torch.uint8,), ((total + 7) // 8,))
        low = err.comp(p, "low", (torch.uint8,), ((nnz * k + 7) // 8,))
        if not padding_is_zero(high, total) or not padding_is_zero(low, nnz * k):
            err("a bit stream has bits set past its end")

        ones = np.flatnonzero(unpack_bits(high, total))
        if ones.size != nnz:
            err(f"component 'high' holds {ones.size} codes, but there are {nnz} values")
        # block b's codes must be exactly the 1 bits in [block_bits[b], block_bits[b+1]) ...
        if not np.array_equal(np.searchsorted(ones, bb), bn):
            err("component 'high' has codes outside their block's bit range")
        counts = np.diff(bn)
        full = counts > 0
        if bool((bb[1:][~full] != bb[:-1][~full]).any()):
            err("component 'block_bits' gives bits to a block without values")
        first, last = bn[:-1][full], bn[1:][full] - 1
        # ... and a block with codes must end on its last 1 bit
        if bool((ones[last] != bb[1:][full] - 1).any()):
            err("component 'high' has a block whose bits do not end with its last code")

        q = np.empty_like(ones)
        if nnz:
            q[0] = ones[0]
            q[1:] = ones[1:] - ones[:-1] - 1
            q[first] = ones[first] - bb[:-1][full]
            if int(q.max()) > (span >> k):
                err("component 'high' codes a gap longer than a block")
        step = (q << k) + _fields(low, nnz, k) + 1
        if nnz and int(step.max()) > span:
            err("a gap is longer than a block")
        if best_k(step - 1) != k:
            err(f"param k={k} is not canonical: the writer's k for these gaps is {best_k(step - 1)}")
        cs = np.cumsum(step)
        base = (cs - step)[first]  # the position count before each non-empty block
        blocks = np.flatnonzero(full)
        block_size = np.minimum(rows - blocks * block_rows, block_rows) * cols
        if bool((cs[last] - base > block_size).any()):
            err("a block's gaps run past the block's last position")
        flat = cs - 1 + np.repeat(blocks * span - base, counts[full])
        return scatter_dense((rows, cols), p.dtype, flat, values)


def _pack_fields(values: np.ndarray, k: int) -> np.ndarray:
    """The low k bits of each value, concatenated into an LSB-first bit stream."""
    n = values.size
    if k == 0 or n == 0:
        return np.zeros(0, dtype=np.uint8)
    as_bytes = (values & ((1 << k) - 1)).astype("<u8").view(np.uint8).reshape(n, 8)
    bits = np.unpackbits(as_bytes[:, : (k + 7) // 8], axis=1, count=k, bitorder="little")
    return pack_bits(bits.reshape(-1))


def _fields(stream: np.ndarray, n: int, k: int) -> np.ndarray:
    """n fields of k bits each from an LSB-first bit stream, as int64."""
    if k == 0:
        return np.zeros(n, dtype=np.int64)
    bits = unpack_bits(stream, n * k).reshape(n, k)
    if k <= 8:
        return np.packbits(bits, axis=1, bitorder="little").reshape(n).astype(np.int64)
    return bits.astype(np.int64) @ (np.int64(1) << np.arange(k, dtype=np.int64))


RICE = Rice()


def from_dense(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    return RICE.from_dense(tensor).components


def to_dense(components: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype, params: dict[str, int]) -> torch.Tensor:
    return RICE.decode(PackedTensor(RICE.name, tuple(shape), dtype, components, dict(params)))
