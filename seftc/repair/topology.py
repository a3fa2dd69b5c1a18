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
        return torch.empty(0, dtype=torch.long, device=delta.device)
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
        return torch.empty(0, dtype=torch.long, device=cand_pos.device)
    return pos[torch.topk(score, count, largest=True, sorted=True).indices]


def paying_prefix(gain: torch.Tensor, cost: torch.Tensor, margin: float = 1.0) -> int:
    """How many reactivations pay for their eviction. `gain` (descending) is the expected loss
    decrease of each growth into a pruned position, `cost` (ascending) the loss increase of
    evicting the cheapest active weights; pairing the i-th best growth with the i-th cheapest
    eviction, the net change is worth taking while gain[i] > margin × cost[i] (a prefix, since one
    falls and the other rises)."""
    n = min(gain.numel(), cost.numel())
    if n == 0:
        return 0
    pays = gain[:n] > margin * cost[:n]
    return int(pays.long().cumprod(0).sum())


def rank_within(groups: torch.Tensor) -> torch.Tensor:
    """For a sequence of group ids, each element's 0-based rank among the elements of its group
    that come before it (so a prefix rule "rank < cap[group]" keeps the first cap of each group)."""
    if groups.numel() == 0:
        return groups.clone()
    order = torch.argsort(groups, stable=True)
    _, counts = torch.unique_consecutive(groups[order], return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank = torch.empty_like(groups)
    rank[order] = torch.arange(groups.numel(), dtype=groups.dtype, device=groups.device) - starts
    return rank


def row_caps(active: torch.Tensor, cols: int, fraction: float) -> torch.Tensor:
    """Per output row, how many positions one update may evict: floor(fraction × the row's active
    count), which is below the row's count for fraction < 1, so no update can empty a row."""
    return torch.floor(active.view(-1, cols).sum(dim=1).double() * fraction).long()


def select_prune_back(active: torch.Tensor, sensitivity: torch.Tensor, protected: torch.Tensor, excess: int,
                      cols: int | None = None, caps: torch.Tensor | None = None) -> torch.Tensor:
    """The `excess` active, unprotected positions of smallest sensitivity. With per-row `caps`
    (rows of `cols` positions), at most caps[r] of them in row r: then fewer than `excess` may
    come back, and the caller gives up as many reactivations."""
    if excess <= 0:
        return torch.empty(0, dtype=torch.long, device=active.device)
    eligible = active & ~protected
    if caps is None:
        if int(eligible.sum()) < excess:
            raise RuntimeError(f"cannot prune back {excess} positions: only {int(eligible.sum())} are unprotected")
        score = torch.where(eligible, sensitivity, torch.full_like(sensitivity, float("inf")))
        return torch.topk(score, excess, largest=False, sorted=True).indices
    idx = eligible.nonzero().flatten()
    idx = idx[torch.argsort(sensitivity[idx], stable=True)]
    rows = idx // cols
    return idx[rank_within(rows) < caps[rows]][:excess]


def cap_swaps(grown: torch.Tensor, removed: torch.Tensor, cols: int, caps: torch.Tensor | None, limit: int | None) -> torch.Tensor:
    """Which N:M swaps (in priority order) stay under the caps: at most caps[r] evictions in row r
    and `limit` swaps in all. Returns a bool mask over the swaps."""
    keep = torch.ones(grown.numel(), dtype=torch.bool, device=grown.device)
    if caps is not None and grown.numel():
        rows = removed // cols
        keep &= rank_within(rows) < caps[rows]
    if limit is not None:
        keep &= torch.cumsum(keep.long(), 0) <= limit
    return keep


def rescale(score: torch.Tensor, reference: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """`score` scaled so that its mean over `where` equals `reference`'s: an importance score in
    the loss units of the reference, so it can be blended with it or weighed against a gain."""
    own = float(score[where].double().mean()) if bool(where.any()) else 0.0
    if own <= 0:
        return torch.zeros_like(score)
    return score * (float(reference[where].double().mean()) / own)


EVICT_SCORES = ("last", "window", "fisher", "wanda", "magnitude", "random")


def eviction_cost(kind: str, w_eff: torch.Tensor, last_grad: torch.Tensor, active: torch.Tensor, *,
                  abs_mean: torch.Tensor | None = None, sq_mean: torch.Tensor | None = None,
                  importance: torch.Tensor | None = None, blend: float = 0.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Estimated loss increase of evicting each position (flat, fp32), by `kind`:
    - `last`: |W_eff ⊙ g| of the last micro-batch (first order, one batch);
    - `window`: `abs_mean`, the mean over the accumulation window of |W_eff ⊙ g|;
    - `fisher`: the OBD cost ½ W_eff² · `sq_mean` (mean g² over the window: the empirical Fisher);
    - `wanda`: `importance` (the pruning-time |W_eff|·‖X‖), `magnitude`: |W_eff|, `random`: uniform.
    The last three measure no loss, so they are rescaled to the mean of the `last` cost over the
    active set (loss-like units, for the gain rule). With `blend` > 0 the cost is
    (1 − blend)·cost + blend·importance, the importance rescaled to the cost's mean over A."""
    w = w_eff.reshape(-1).float().abs()
    first = w * last_grad.reshape(-1).float().abs()
    if kind == "last":
        cost = first
    elif kind == "window":
        cost = abs_mean.reshape(-1).float()
    elif kind == "fisher":
        cost = 0.5 * w.square() * sq_mean.reshape(-1).float()
    elif kind == "wanda":
        cost = rescale(importance.reshape(-1).float(), first, active)
    elif kind == "magnitude":
        cost = rescale(w, first, active)
    elif kind == "random":
        # drawn on the CPU (the seeded generator's device), so every device draws the same numbers
        cost = rescale(torch.rand(w.numel(), generator=generator, device="cpu").to(w.device), first, active)
    else:
        raise ValueError(f"unknown eviction score {kind!r}; choose one of {', '.join(EVICT_SCORES)}")
    if blend > 0:
        cost = (1 - blend) * cost + blend * rescale(importance.reshape(-1).float(), cost, active)
    return cost


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
    first_idx = torch.full((unique_groups.numel(),), pos.numel(), dtype=torch.long, device=pos.device)
    first_idx.scatter_reduce_(0, inverse, torch.arange(pos.numel(), device=pos.device), reduce="amin")
    first = torch.zeros_like(groups, dtype=torch.bool)
    first[first_idx] = True
    pos, groups = pos[first], groups[first]
    gain = gain[first] if gain is not None else None
    members = groups[:, None] * m + torch.arange(m, device=groups.device)[None, :]
    eligible = active[members] & ~protected[members]
    sens = torch.where(eligible, sensitivity[members], torch.full(members.shape, float("inf"), device=sensitivity.device))
    best = sens.argmin(dim=1)
    has = eligible.any(dim=1)
    if gain is not None:
        has &= gain > sens.gather(1, best[:, None]).squeeze(1)
    return pos[has], members[has, best[has]]
