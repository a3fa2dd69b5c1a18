"""Pure topology decisions of SEFT (drop, grow, prune back, N:M swap) on flat index tensors.

Positions are flat indices `p = row * cols + col` into a layer's weight. Nothing here touches a
model: each function takes tensors and returns indices, so tests can drive it on random data.
"""
from __future__ import annotations

import math

import torch


def drop_fraction(step: int, total_steps: int, zeta0: float) -> float:
    """Cosine-decayed drop fraction ζ_t = ζ_0 (1 + cos(π t / T)) / 2."""
    return zeta0 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1))) / 2


def select_drop(delta: torch.Tensor, live: torch.Tensor, protected: torch.Tensor, n: int) -> torch.Tensor:
    """Slot ids of the `n` live, unprotected slots with the smallest |δ| (fewer if not enough)."""
    eligible = live & ~protected
    n = min(n, int(eligible.sum()))
    if n <= 0:
        return torch.empty(0, dtype=torch.long)
    score = torch.where(eligible, delta.detach().abs(), torch.full_like(delta, float("inf")))
    return torch.topk(score, n, largest=False, sorted=True).indices


def select_grow(
    cand_pos: torch.Tensor,
    cand_score: torch.Tensor,
    excluded: torch.Tensor,
    count: int,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Positions among the candidates with the largest score, skipping `excluded` positions
    (a bool mask over the flat weight, e.g. η before the drop) and, if given, positions where
    `allowed` is False (growth restricted to the active set in the no-regrow ablation)."""
    ok = ~excluded[cand_pos]
    if allowed is not None:
        ok &= allowed[cand_pos]
    pos, score = cand_pos[ok], cand_score[ok]
    count = min(count, pos.numel())
    if count <= 0:
        return torch.empty(0, dtype=torch.long)
    return pos[torch.topk(score, count, largest=True, sorted=True).indices]


def paying_prefix(gain: torch.Tensor, cost: torch.Tensor) -> int:
    """How many reactivations pay for their eviction. `gain` (descending) is the expected loss
    decrease of each growth into a pruned position, `cost` (ascending) the loss increase of
    evicting the cheapest active weights; pairing the i-th best growth with the i-th cheapest
    eviction, the net change is worth taking while gain[i] > cost[i] (a prefix, since one falls
    and the other rises)."""
    n = min(gain.numel(), cost.numel())
    if n == 0:
        return 0
    pays = gain[:n] > cost[:n]
    return int(pays.long().cumprod(0).sum())


def select_prune_back(active: torch.Tensor, sensitivity: torch.Tensor, protected: torch.Tensor, excess: int) -> torch.Tensor:
    """The `excess` active, unprotected positions of smallest sensitivity |W_eff ⊙ g|."""
    if excess <= 0:
        return torch.empty(0, dtype=torch.long)
    eligible = active & ~protected
    if int(eligible.sum()) < excess:
        raise RuntimeError(f"cannot prune back {excess} positions: only {int(eligible.sum())} are unprotected")
    score = torch.where(eligible, sensitivity, torch.full_like(sensitivity, float("inf")))
    return torch.topk(score, excess, largest=False, sorted=True).indices


def nm_swaps(
    grow_pos: torch.Tensor,
    grow_score: torch.Tensor,
    active: torch.Tensor,
    sensitivity: torch.Tensor,
    protected: torch.Tensor,
    m: int,
    gain: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """N:M growth as swaps. Among growth positions outside the active set, keep at most one per
    group of M (the highest scored); each kept one is paired with its group's least sensitive
    active, unprotected position, which gives up its place. Returns (grown, removed), equal
    length, so every group keeps exactly its count of non-zeros. With `gain` (aligned with
    `grow_pos`), a swap is kept only where the growth's gain exceeds the evicted position's
    sensitivity."""
    outside = ~active[grow_pos]
    pos, score = grow_pos[outside], grow_score[outside]
    gain = gain[outside] if gain is not None else None
    if pos.numel() == 0:
        return pos, pos
    groups = pos // m
    order = torch.argsort(score, descending=True, stable=True)
    pos, groups = pos[order], groups[order]
    gain = gain[order] if gain is not None else None
    unique_groups, inverse = torch.unique(groups, return_inverse=True)
    first_idx = torch.full((unique_groups.numel(),), pos.numel(), dtype=torch.long)
    first_idx.scatter_reduce_(0, inverse, torch.arange(pos.numel()), reduce="amin")
    first = torch.zeros_like(groups, dtype=torch.bool)
    first[first_idx] = True
    pos, groups = pos[first], groups[first]
    gain = gain[first] if gain is not None else None
    members = groups[:, None] * m + torch.arange(m)[None, :]
    eligible = active[members] & ~protected[members]
    sens = torch.where(eligible, sensitivity[members], torch.full(members.shape, float("inf")))
    best = sens.argmin(dim=1)
    has = eligible.any(dim=1)
    if gain is not None:
        has &= gain > sens.gather(1, best[:, None]).squeeze(1)
    return pos[has], members[has, best[has]]
