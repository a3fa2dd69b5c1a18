"""Pure mask math shared by every pruner, by repair and by inspect.

A mask is a bool tensor shaped like the weight, True where the weight is kept. Counts are exact:
a layer pruned to sparsity `s` keeps exactly `numel - round(s * numel)` weights whatever the
comparison group (layer, row or column block), and an N:M mask keeps exactly N in every group of
M consecutive weights along the input dimension.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import torch

from seftc.errors import SeftcError


@dataclass(frozen=True)
class Pattern:
    """`unstructured`, or N:M (N kept out of every M consecutive input weights)."""

    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m if self.is_nm else float("nan")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


UNSTRUCTURED = Pattern()


def parse_pattern(text: str) -> Pattern:
    text = text.strip().lower()
    if text == "unstructured":
        return UNSTRUCTURED
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if not match:
        raise SeftcError(f"unknown sparsity pattern {text!r}; use 'unstructured' or N:M such as 2:4 or 4:8")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise SeftcError(f"pattern {text!r} needs 0 < N < M (e.g. 2:4)")
    return Pattern(n, m)


def check_sparsity(sparsity: float) -> float:
    if not (0.0 <= sparsity < 1.0) or sparsity != sparsity:
        raise SeftcError(f"sparsity must be in [0, 1), got {sparsity}; e.g. --sparsity 0.5")
    return float(sparsity)


def prune_count(numel: int, sparsity: float) -> int:
    """How many weights a layer of `numel` loses at `sparsity` (round half to even)."""
    return int(round(sparsity * numel))


def split_counts(total: int, sizes: list[int]) -> list[int]:
    """Split `total` over groups proportionally to `sizes`, exactly (largest remainders first;
    ties go to the earlier group)."""
    whole = sum(sizes)
    if whole == 0:
        return [0] * len(sizes)
    raw = [total * s / whole for s in sizes]
    counts = [min(int(r), s) for r, s in zip(raw, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: (-(raw[i] - counts[i]), i))
    left = total - sum(counts)
    for i in order:
        if left == 0:
            break
        if counts[i] < sizes[i]:
            counts[i] += 1
            left -= 1
    return counts


def lowest_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep-mask that drops the `counts[r]` lowest scores of each row r (ties broken
    deterministically). Rows sharing a count are selected together with one partial top-k,
    which is several times cheaper than a full sort."""
    rows, cols = scores.shape
    keep = torch.ones((rows, cols), dtype=torch.bool, device=scores.device)
    counts = counts.to(scores.device)
    for c in counts.unique().tolist():
        if c <= 0:
            continue
        if c >= cols:
            keep[counts == c] = False
            continue
        sel = (counts == c).nonzero().flatten()
        if sel.numel() == rows:
            keep.scatter_(1, torch.topk(scores, c, dim=1, largest=False, sorted=False).indices, False)
        else:
            idx = torch.topk(scores[sel], c, dim=1, largest=False, sorted=False).indices
            keep[sel] = keep[sel].scatter(1, idx, False)
    return keep


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Drop the lowest scores: over the whole layer, or within each row (counts split exactly)."""
    total = prune_count(scores.numel(), sparsity)
    if per_row:
        counts = torch.tensor(split_counts(total, [scores.shape[1]] * scores.shape[0]))
        return lowest_per_row(scores, counts)
    flat = lowest_per_row(scores.reshape(1, -1), torch.tensor([total]))
    return flat.reshape(scores.shape)


def nm_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep the N highest scores in every group of M consecutive columns."""
    rows, cols = scores.shape
    if cols % pattern.m:
        raise SeftcError(f"N:M pattern {pattern} needs the input width ({cols}) divisible by {pattern.m}")
    groups = scores.reshape(-1, pattern.m)
    counts = torch.full((groups.shape[0],), pattern.m - pattern.n)
    return lowest_per_row(groups, counts).reshape(rows, cols)


def nm_holds(tensor: torch.Tensor, pattern: Pattern) -> bool:
    """True when every group of M consecutive inputs has at most N non-zeros."""
    rows, cols = tensor.shape
    if cols % pattern.m:
        return False
    nonzero = (tensor != 0).reshape(-1, pattern.m).sum(dim=1)
    return bool((nonzero <= pattern.n).all())


def detect_pattern(tensor: torch.Tensor, candidates: tuple[Pattern, ...] = (Pattern(1, 4), Pattern(2, 4), Pattern(4, 8))) -> str:
    """The tightest N:M pattern the tensor satisfies, 'dense' without zeros, else 'unstructured'."""
    nonzero = int(torch.count_nonzero(tensor))
    if nonzero == tensor.numel():
        return "dense"
    for p in candidates:
        if nm_holds(tensor, p):
            return str(p)
    return "unstructured"


class PackedMask:
    """A keep-mask held as its row-major bits packed little-endian, 8 positions a byte (1/8 of a
    bool tensor): the layout of the mask file and of `mask_checksum`, on any device. `unpack()`
    gives the bool tensor back (a new one each time; change a mask by packing a new one)."""

    __slots__ = ("bits", "shape")

    def __init__(self, bits: torch.Tensor, shape: tuple[int, ...]):
        self.bits, self.shape = bits, tuple(shape)

    @classmethod
    def pack(cls, mask: torch.Tensor) -> "PackedMask":
        return cls(pack_bits(mask.detach().reshape(-1)), tuple(mask.shape))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def unpack(self) -> torch.Tensor:
        return unpack_bits(self.bits, self.numel).reshape(self.shape)

    def to(self, device: torch.device | str) -> "PackedMask":
        return PackedMask(self.bits.to(device), self.shape)


_SHIFTS = (0, 1, 2, 3, 4, 5, 6, 7)


def pack_bits(flat: torch.Tensor) -> torch.Tensor:
    """uint8 [ceil(n/8)]: bit j of byte i is flat[8i + j] (numpy packbits, bitorder="little"); padding bits 0."""
    b = flat.reshape(-1).to(torch.uint8)
    pad = (-b.numel()) % 8
    if pad:
        b = torch.cat([b, torch.zeros(pad, dtype=torch.uint8, device=b.device)])
    b = b.view(-1, 8) << torch.tensor(_SHIFTS, dtype=torch.uint8, device=b.device)
    return b.sum(dim=1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of pack_bits: bool [n]."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=bits.device)
    return ((bits.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:n].bool()


def mask_checksum(mask: torch.Tensor | PackedMask) -> str:
    """sha256 over the shape and the row-major mask bits packed little-endian (numpy packbits)."""
    import numpy as np

    if isinstance(mask, PackedMask):
        bits = mask.bits.detach().to("cpu").numpy()
    else:
        bits = np.packbits(mask.detach().to("cpu", torch.bool).numpy().reshape(-1), bitorder="little")
    h = hashlib.sha256()
    h.update(repr(tuple(mask.shape)).encode())
    h.update(bits.tobytes())
    return h.hexdigest()
