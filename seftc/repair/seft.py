"""SEFT: sparse fine-tuning by sparsity evolution (see ../shared/docs/SEFT.md).

Per target layer a `SeftLinear` trains `k = ceil(ρ·numel)` delta slots. Every `update_interval`
steps the topology moves: drop the smallest |δ| (merged into W), grow the candidates of largest
accumulated |gradient| (pruned positions included: reactivation), prune back the least sensitive
|W_eff ⊙ g| active positions so that |A| = T exactly; under N:M a growth into a pruned position is
a swap inside its group.

Decisions left open by the spec, and ours:
- Gradient statistics: on the first micro-batch of the first of the `accumulation` steps before
  an update, the candidate set is the top-`candidates·k` positions by |g| outside η (O(k) memory);
  over the window we sum their signed gradients and grow by |sum| (the magnitude of the
  window-mean gradient: consistent directions win over noise).
- Sensitivity |W_eff ⊙ g| uses the dense gradient of the update step's last micro-batch, inside
  that layer's backward; only the chosen indices survive it. Decisions are taken there and
  applied after the optimizer step (drops merge the post-step δ).
- Reactivation must pay (`reactivation="gain"`, the default): a growth into a pruned position
  costs an eviction, so it is taken only while its expected gain exceeds that cost. Gain of growing
  p: |mean window gradient at p| × τ, with τ the mean |δ| the live, unprotected slots have learned
  (what a slot typically moves in its life); cost of evicting q: its sensitivity |W_eff ⊙ g|.
  Pairing the best growths with the cheapest evictions, the paying prefix is kept; slots not
  taken by a paying reactivation go to the next candidates inside A. Under N:M each swap is
  kept only where the growth's gain exceeds the evicted weight's sensitivity. `"always"` is the
  spec's plain rule (every top-scored candidate is grown, whatever it evicts). Why: the plain
  rule reactivated ~3.5% of the active weights in 40 steps on SmolLM2 at 70%, and SEFT without
  reactivation did better. Measured since: it reactivates only ~2% fewer positions than the plain
  rule (the first-order sensitivity of most small kept weights is near zero), and reactivation still
  costs quality (results/repair-tuning.md, results/repair-140-v1.md). The gain is first order, so
  only a first-order cost (`last`, `window`) binds the rule: the Fisher cost is orders of magnitude
  smaller in these units (median ~1e-10 against gains of ~1e-8–1e-7 on SmolLM2), and with it the rule never
  refuses a reactivation (results/repair-val40-nm.md); `window` is the default.
- Eviction score (`evict_score`, issue 16): `last` is the first-order |W_eff ⊙ g| above; `window`
  averages |W_eff ⊙ g| over every micro-batch of the accumulation window, `fisher` is the OBD cost
  ½ W_eff² · mean g² over the window (both from bf16 sums kept at the active positions only, which
  live per layer during the window and are freed at the update); `wanda` is the pruning-time importance
  |W_eff|·‖X‖, `magnitude` |W_eff|, `random` uniform (ablations; rescaled to the `last` cost's mean
  over A so the gain rule can weigh them). `evict_blend` mixes the importance |W_eff|·‖X‖ into any
  cost. ‖X‖ is not in the prune manifest (Wanda keeps no statistics), so it is recomputed at the
  start of repair on the pruned model from `importance_windows` windows of the prune manifest's
  calibration text, and checkpointed (a resumed run does not recompute it on trained weights).
- Growth candidates (`grow_candidates`): `first` as above; `window` picks them at the update from
  the gradient summed over the whole window (a dense bf16 accumulator, freed at the update).
- Caps: `reactivation_cap` bounds the reactivations of one update to a fraction of the layer's
  active count (the best-scored kept); `row_cap` bounds each output row's evictions to
  floor(row_cap × its active count), so no update empties a row (rows emptied are counted per
  update). When the row caps cannot supply an eviction for every reactivation, the lowest-scored
  reactivations are given up and their slots refilled inside A, so |A| = T stays exact. Under N:M
  the same caps bound the swaps (per row of the evicted position, and in all).
- `reactivation_stop`: no reactivation in updates after that fraction of the steps;
  `reactivation_margin`: the gain rule takes a reactivation only where gain > margin × cost;
  `evict_cooldown`: positions evicted in the last N updates cannot be regrown.
- `delta_decay`: an L2-SP pull toward the pruned base: every step δ and the merged drift shrink by
  (1 − lr·delta_decay) (decoupled, like AdamW's decay); merges are kept apart from W for it
  (layer.py), so the pull acts on everything learned since pruning.
- Refill: slots a growth could not fill (too few candidates, an N:M swap refused) take the next
  best candidates inside A in the same update.
- Protection: positions grown at update u cannot be dropped or pruned back before update
  u + protect. Slots freed by prune-back are refilled at the next growth, so k stays constant.
- Initial η: `init="random"` (uniform over A, seeded) or `init="gradient"` (top-|g| over A from
  the first step's gradient, taken inside the first backward so step 0 already trains them).
- Under torchrun (distributed.py) each rank's δ gradient comes from its own batch and the engine
  (DDP or FSDP2) averages it; the statistics are reduced apart, only where a decision needs them,
  so every rank takes the same decisions: the dense gradient is averaged over the ranks when a
  statistic is not linear in it (the candidates at the window's start, the last-batch cost at the
  update, every window step for `window`/`fisher` costs, the gradient init), while the linear
  sums (candidate sums, the `window` growth sum) accumulate per rank and are averaged once, at the
  update. A checkpoint stores their average, which every rank resumes from.
- Between steps, W and δ may be FSDP2 shards: topology writes go to the part each rank holds
  (distributed.local_part); masks, slot positions and the merged store are replicated.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch

from seftc.prune.masks import Pattern
from seftc.prune.wanda import wanda_scores
from seftc.repair import topology
from seftc.repair.distributed import full_tensor, load_local, local_part
from seftc.repair.layer import SeftLinear
from seftc.repair.optim import SlotAdamW


@dataclass
class SeftOptions:
    density: float = 0.02  # ρ
    update_interval: int = 20  # T_upd
    accumulation: int = 5  # A_acc
    zeta0: float = 0.2  # ζ_0
    protect: int = 2
    regrow: bool = True  # False: growth only into active positions (ablation)
    candidates: float = 1.0  # candidate set size as a multiple of k
    init: str = "random"  # "random" | "gradient"
    reactivation: str = "gain"  # "gain" | "always"
    evict_score: str = "last"  # see topology.EVICT_SCORES
    evict_blend: float = 0.0
    grow_candidates: str = "first"  # "first" | "window"
    reactivation_cap: float | None = None
    row_cap: float | None = None
    reactivation_stop: float = 1.0
    reactivation_margin: float = 1.0
    evict_cooldown: int = 0
    delta_decay: float = 0.0
    seed: int = 0

    @property
    def needs_importance(self) -> bool:
        return self.evict_score == "wanda" or self.evict_blend > 0


@dataclass
class LayerStats:
    updates: int = 0
    dropped: int = 0
    grown: int = 0
    regrown: int = 0  # grown into the pruned region (reactivated)
    pruned_back: int = 0
    last_regrown: int = 0
    rows_emptied: int = 0  # output rows that lost every active weight in an update
    last_rows_emptied: int = 0


@dataclass
class _Pending:
    drop: torch.Tensor
    grow: torch.Tensor
    remove: torch.Tensor


@dataclass
class _LayerState:
    birth: torch.Tensor  # per slot: update index at which it was grown (−10**9 initially)
    cand_pos: torch.Tensor | None = None
    cand_sum: torch.Tensor | None = None
    cand_n: int = 0  # gradients summed into cand_sum
    # the eviction statistics are kept at the active positions only (A, in flat order; A does not change in a window)
    win_abs: torch.Tensor | None = None  # bf16 per active position, Σ |W_eff ⊙ g| over the window (evict_score window)
    win_sq: torch.Tensor | None = None  # bf16 per active position, Σ g² over the window (evict_score fisher)
    win_sum: torch.Tensor | None = None  # dense bf16, Σ g over the window (grow_candidates window)
    win_n: int = 0
    evicted_pos: torch.Tensor | None = None  # positions evicted in the last updates (evict_cooldown)
    evicted_at: torch.Tensor | None = None  # their update index
    pending: _Pending | None = None
    stats: LayerStats = field(default_factory=LayerStats)


class SeftController:
    """Owns the SEFT layers, their slot optimizer, and the topology schedule."""

    def __init__(self, layers: dict[str, SeftLinear], options: SeftOptions, pattern: Pattern, total_steps: int, lr: float,
                 weight_decay: float = 0.0, reduce=None):
        self.layers, self.options, self.pattern, self.total_steps = layers, options, pattern, total_steps
        self.names = list(layers)
        self.lr, self.weight_decay = lr, weight_decay
        self.state = {n: _LayerState(torch.full((l.delta.numel(),), -(10**9), dtype=torch.int32, device=l.delta.device),
                                     evicted_pos=torch.empty(0, dtype=torch.int32, device=l.delta.device),
                                     evicted_at=torch.empty(0, dtype=torch.int32, device=l.delta.device))
                      for n, l in layers.items()}
        self.update_index = 0
        self.step = 0
        self.micro = 0
        self.n_micro = 1
        self.reduce = reduce  # callable averaging a tensor across ranks, or None
        self.importance: dict[str, torch.Tensor] = {}  # per layer ‖X‖² per input column (needs_importance)
        for layer in layers.values():
            layer.observer = self._observe
        self.start()

    def start(self) -> None:
        """(Re)make the slot optimizer over each layer's δ as the model holds it now: repair calls it
        again once the engine has wrapped the model (under FSDP2, δ is then a shard)."""
        self.optimizer = None  # the old moments freed before the new ones are made
        self.optimizer = SlotAdamW([l.delta for l in self.layers.values()], lr=self.lr, weight_decay=self.weight_decay)

    # -- schedule -------------------------------------------------------------------------------
    def _is_update_step(self, step: int) -> bool:
        o = self.options
        return o.update_interval > 0 and (step + 1) % o.update_interval == 0 and step + 1 < self.total_steps

    def _in_window(self, step: int) -> bool:
        o = self.options
        if o.update_interval <= 0:
            return False
        until = o.update_interval - 1 - (step % o.update_interval)  # steps left until the update step
        return until < o.accumulation and (step - step % o.update_interval) + o.update_interval < self.total_steps

    def _window_start(self, step: int) -> bool:
        o = self.options
        return self._in_window(step) and (step % o.update_interval) == max(o.update_interval - o.accumulation, 0)

    # -- statistics, inside each layer's backward ------------------------------------------------
    def _observe(self, layer: SeftLinear, dense: torch.Tensor) -> torch.Tensor:
        """Statistics from this rank's dense gradient `dense` (returned unchanged: δ's gradient is
        averaged by the engine); decisions from statistics averaged over the ranks."""
        o = self.options
        init_now = o.init == "gradient" and self.step == 0 and self.micro == 0 and bool((layer.slots < 0).all())
        window = self._in_window(self.step)
        if not (window or init_now):
            return dense
        st = self.state[self._name_of(layer)]
        start = window and self._window_start(self.step) and self.micro == 0
        decide = window and self._is_update_step(self.step) and self.micro == self.n_micro - 1
        nonlinear = init_now or (start and o.grow_candidates == "first") or decide or o.evict_score in ("window", "fisher")
        mean = self.reduce(dense) if self.reduce is not None and nonlinear else dense  # averaged over the ranks
        if init_now:
            score = torch.where(layer.active, mean.abs(), torch.full_like(mean, -1.0))
            layer.slots.copy_(torch.topk(score, layer.delta.numel()).indices)
        if not window:
            return dense
        if start:
            if o.grow_candidates == "first":
                update_step = self.step - self.step % o.update_interval + o.update_interval - 1
                st.cand_pos = self._candidates(layer, st, mean.abs(), self._reactivates(update_step), layer.active)
                st.cand_sum = torch.zeros(st.cand_pos.numel(), dtype=torch.float32, device=dense.device)
            st.cand_n = 0
            zeros = lambda n: torch.zeros(n, dtype=torch.bfloat16, device=dense.device)  # noqa: E731
            n_active = layer.target if o.evict_score in ("window", "fisher") else 0
            st.win_abs = zeros(n_active) if o.evict_score == "window" else None
            st.win_sq = zeros(n_active) if o.evict_score == "fisher" else None
            st.win_sum = torch.zeros_like(dense, dtype=torch.bfloat16) if o.grow_candidates == "window" else None
            st.win_n = 0
        if st.cand_pos is not None:
            st.cand_sum += dense[st.cand_pos]  # this rank's sum; averaged at the update
        if st.cand_pos is not None or st.win_sum is not None:
            st.cand_n += 1
        if st.win_abs is not None or st.win_sq is not None:
            a = layer.active
            g = mean.reshape(-1)[a].float()
            if st.win_abs is not None:
                st.win_abs += (layer.effective_weight().reshape(-1)[a].float().abs() * g.abs()).to(torch.bfloat16)
            if st.win_sq is not None:
                st.win_sq += g.square().to(torch.bfloat16)
        if st.win_sum is not None:
            st.win_sum += dense.to(torch.bfloat16)  # this rank's sum; averaged at the update
        st.win_n += 1
        if decide:
            if self.reduce is not None:
                if st.cand_sum is not None:
                    st.cand_sum = self.reduce(st.cand_sum)
                if st.win_sum is not None:
                    st.win_sum = self.reduce(st.win_sum.float()).to(torch.bfloat16)
            st.pending = self._decide(layer, st, mean)
        return dense

    def _reactivates(self, update_step: int) -> bool:
        """Whether the update taken at `update_step` may grow into pruned positions."""
        return self.options.regrow and update_step + 1 < self.options.reactivation_stop * self.total_steps

    def _candidates(self, layer: SeftLinear, st: _LayerState, score: torch.Tensor, reactivate: bool, active: torch.Tensor) -> torch.Tensor:
        """The top-`candidates·k` positions by `score` outside η (inside A = `active` without
        reactivation), never a position still cooling down after its eviction."""
        outside = torch.ones_like(active)
        outside[layer.slots[layer.slots >= 0]] = False
        if not reactivate:
            outside &= active
        if self.options.evict_cooldown and st.evicted_pos.numel():
            outside[st.evicted_pos] = False
        score = torch.where(outside, score.float(), torch.full_like(score, -1.0, dtype=torch.float32))
        c = min(int(math.ceil(self.options.candidates * layer.delta.numel())), int(outside.sum()))
        if c == 0:
            return torch.empty(0, dtype=torch.int32, device=score.device)
        return torch.topk(score, c).indices.to(torch.int32)  # kept across the window: int32 (positions < 2**31 per layer)

    def _name_of(self, layer: SeftLinear) -> str:
        return layer._seft_name  # set by `attach`

    def _cost(self, layer: SeftLinear, st: _LayerState, dense: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Per position, the estimated loss increase of evicting it (options.evict_score)."""
        o = self.options
        n = max(st.win_n, 1)
        importance = None
        if o.needs_importance:
            importance = wanda_scores(layer.effective_weight(), self.importance[layer._seft_name])
        gen = None
        if o.evict_score == "random":  # seeded by (seed, update, layer): a resumed run draws the same
            gen = torch.Generator(device="cpu").manual_seed(o.seed * 1_000_003 + self.update_index * 1009 + self.names.index(layer._seft_name))
        def spread(values: torch.Tensor | None) -> torch.Tensor | None:  # the active positions' means, 0 elsewhere (dense, this layer only)
            if values is None:
                return None
            full = torch.zeros(active.numel(), dtype=torch.float32, device=active.device)
            full[active] = values.float() / n
            return full

        return topology.eviction_cost(o.evict_score, layer.effective_weight(), dense, active, abs_mean=spread(st.win_abs),
                                      sq_mean=spread(st.win_sq), importance=importance, blend=o.evict_blend, generator=gen)

    def _decide(self, layer: SeftLinear, st: _LayerState, dense: torch.Tensor) -> _Pending:
        o = self.options
        active = layer.active  # A, unpacked once for the whole decision
        k = layer.delta.numel()
        live = layer.slots >= 0
        protected_slot = live & (st.birth > self.update_index - o.protect)
        zeta = topology.drop_fraction(self.step + 1, self.total_steps, o.zeta0)
        drop = topology.select_drop(layer.delta, live, protected_slot, int(math.floor(zeta * k)))
        in_eta = torch.zeros_like(active)
        in_eta[layer.slots[live]] = True
        free = int((~live).sum()) + drop.numel()
        reactivate = self._reactivates(self.step)
        if o.grow_candidates == "window":
            st.cand_pos = self._candidates(layer, st, st.win_sum.float().abs(), reactivate, active)
            st.cand_sum = st.win_sum[st.cand_pos].float()
        cand = st.cand_pos.long()  # transient, for this decision
        score = st.cand_sum.abs()
        gain = score / max(st.cand_n, 1) * self._tau(layer, live & ~protected_slot)
        protected_pos = torch.zeros_like(active)
        protected_pos[layer.slots[protected_slot]] = True
        sens = self._cost(layer, st, dense, active)
        # pool: the pruned candidates a growth may reactivate
        pool = ~active[cand] & ~in_eta[cand] if reactivate else torch.zeros(cand.numel(), dtype=torch.bool, device=cand.device)
        cols = layer.in_features
        caps = topology.row_caps(active, cols, o.row_cap) if o.row_cap is not None else None
        limit = int(math.floor(o.reactivation_cap * layer.target)) if o.reactivation_cap is not None else None
        if self.pattern.is_nm:
            allowed = active.clone()
            allowed[cand[pool]] = True
            grow = topology.select_grow(cand, score, in_eta, free, allowed)
            protected_pos[grow] = True
            at = torch.isin(cand, grow)
            gain_at = gain[at] / o.reactivation_margin if o.reactivation == "gain" else None
            grown_out, remove = topology.nm_swaps(cand[at], score[at], active, sens, protected_pos, self.pattern.m, gain_at)
            keep = topology.cap_swaps(grown_out, remove, cols, caps, limit)
            grown_out, remove = grown_out[keep], remove[keep]
            grow = grow[active[grow] | torch.isin(grow, grown_out)]
        else:
            if o.reactivation == "gain" and bool(pool.any()):
                pool = self._paying(layer, active, cand, score, gain, pool, sens, protected_pos, free, o.reactivation_margin, caps)
            if limit is not None and int(pool.sum()) > limit:  # the best-scored `limit` reactivations
                ranked = pool.nonzero().flatten()[torch.argsort(score[pool], descending=True, stable=True)]
                pool[ranked[limit:]] = False
            allowed = active.clone()
            allowed[cand[pool]] = True
            grow = topology.select_grow(cand, score, in_eta, free, allowed)
            protected_pos[grow] = True
            regrow = grow[~active[grow]]  # in descending score (select_grow sorts)
            remove = topology.select_prune_back(active, sens, protected_pos, regrow.numel(), cols, caps)
            if remove.numel() < regrow.numel():  # the row caps bind: give up the weakest reactivations
                grow = grow[active[grow] | torch.isin(grow, regrow[: remove.numel()])]
        if grow.numel() < free and (self.pattern.is_nm or caps is not None):  # refill inside A
            taken = in_eta.clone()
            taken[grow] = True
            taken[remove] = True
            grow = torch.cat([grow, topology.select_grow(cand, score, taken, free - grow.numel(), active)])
        st.cand_pos = st.cand_sum = None
        st.win_abs = st.win_sq = st.win_sum = None
        st.win_n = 0
        return _Pending(drop, grow, remove)

    @staticmethod
    def _tau(layer: SeftLinear, learned: torch.Tensor) -> float:
        """Typical |δ| a slot learns: the mean over live slots past their protection."""
        return float(layer.delta.detach()[learned].abs().mean()) if bool(learned.any()) else 0.0

    @staticmethod
    def _paying(layer: SeftLinear, active: torch.Tensor, cand_pos: torch.Tensor, score: torch.Tensor, gain: torch.Tensor, pool: torch.Tensor,
                sens: torch.Tensor, protected_pos: torch.Tensor, free: int, margin: float,
                caps: torch.Tensor | None = None) -> torch.Tensor:
        """The part of `pool` (pruned candidates) whose reactivation pays: the best `free` of them by
        score, paired with the cheapest evictions (under the row caps, if any), while
        gain > margin × cost."""
        order = torch.argsort(score[pool], descending=True)[:free]
        idx = pool.nonzero().flatten()[order]
        n = min(idx.numel(), int((active & ~protected_pos).sum()))
        cost = sens[topology.select_prune_back(active, sens, protected_pos, n, layer.in_features, caps)]
        out = torch.zeros_like(pool)
        out[idx[: topology.paying_prefix(gain[idx], cost, margin)]] = True
        return out

    # -- after the optimizer step ------------------------------------------------------------------
    def has_pending(self) -> bool:
        """Whether this step's backward took topology decisions not applied yet."""
        return any(st.pending is not None for st in self.state.values())

    @torch.no_grad()
    def decay(self, lr: float) -> None:
        """The L2-SP pull (delta_decay): the merged drift shrinks toward the pruned base, as δ
        does in the optimizer step."""
        if self.options.delta_decay:
            for layer in self.layers.values():
                layer.merged_val.mul_(1 - lr * self.options.delta_decay)

    @torch.no_grad()
    def apply_pending(self) -> dict[str, int] | None:
        """Apply the decisions taken during this step's backward; returns the update's totals
        (regrown, evicted, rows_emptied), or None when this step had no topology update."""
        totals = {"regrown": 0, "evicted": 0, "rows_emptied": 0}
        applied = False
        for i, name in enumerate(self.names):
            layer, st = self.layers[name], self.state[name]
            p = st.pending
            if p is None:
                continue
            applied = True
            active = layer.active  # changed here, packed back below
            rows_before = active.view(layer.out_features, -1).any(dim=1)
            # 1. drop: merge δ into W (or the fp32 merged store), free the slot
            if p.drop.numel():
                layer.merge_slots(p.drop)
                self._free(i, layer, p.drop)
            # 2. prune back: zero W there, leave A, free any slot on it
            if p.remove.numel():
                local_part(layer.weight).fill_(p.remove, 0)
                layer.forget(p.remove)
                active[p.remove] = False
                on_slot = torch.isin(layer.slots, p.remove).nonzero().flatten()
                self._free(i, layer, on_slot)
            if self.options.evict_cooldown:
                keep = st.evicted_at > self.update_index - self.options.evict_cooldown
                st.evicted_pos = torch.cat([st.evicted_pos[keep], p.remove.to(torch.int32)])
                st.evicted_at = torch.cat([st.evicted_at[keep], torch.full((p.remove.numel(),), self.update_index, dtype=torch.int32,
                                                                           device=p.remove.device)])
            emptied = int((rows_before & ~active.view(layer.out_features, -1).any(dim=1)).sum())
            # 3. grow: enter A (W is 0 there if it was pruned), take free slots with δ = 0
            regrown = int((~active[p.grow]).sum())
            active[p.grow] = True
            layer.active = active
            del active
            free_slots = (layer.slots < 0).nonzero().flatten()[: p.grow.numel()]
            layer.slots[free_slots] = p.grow[: free_slots.numel()].to(layer.slots.dtype)
            local_part(layer.delta).fill_(free_slots, 0)
            st.birth[free_slots] = self.update_index
            self.optimizer.reset_slots(i, free_slots)
            s = st.stats
            s.updates += 1
            s.dropped += p.drop.numel()
            s.grown += p.grow.numel()
            s.regrown += regrown
            s.last_regrown = regrown
            s.pruned_back += p.remove.numel()
            s.rows_emptied += emptied
            s.last_rows_emptied = emptied
            totals["regrown"] += regrown
            totals["evicted"] += p.remove.numel()
            totals["rows_emptied"] += emptied
            st.pending = None
            self.check(name)
        if not applied:
            return None
        self.update_index += 1
        return totals

    def _free(self, i: int, layer: SeftLinear, slots: torch.Tensor) -> None:
        layer.slots[slots] = -1
        local_part(layer.delta).fill_(slots, 0)
        self.optimizer.reset_slots(i, slots)

    def check(self, name: str) -> None:
        """|A| == T, W zero outside A, η ⊆ A, and the N:M pattern on A; raises on any breach."""
        layer = self.layers[name]
        active = layer.active  # unpacked once
        n_active = int(active.sum())
        problems = []
        if n_active != layer.target:
            problems.append(f"|A| = {n_active} != T = {layer.target}")
        weight = local_part(layer.weight)  # the part of W this rank holds
        if bool((weight.flat[~weight.rows_of(active)] != 0).any()):
            problems.append("W non-zero outside A")
        if layer.merged_pos.numel() and not bool(active[layer.merged_pos.long()].all()):
            problems.append("merged δ outside A")
        if not bool(active[layer.slots[layer.slots >= 0]].all()):
            problems.append("a slot lies outside A")
        if self.pattern.is_nm and not bool((active.view(-1, self.pattern.m).sum(dim=1) == self.pattern.n).all()):
            problems.append(f"{self.pattern} broken")
        if problems:
            raise RuntimeError(f"SEFT invariant violated in {name}: {'; '.join(problems)}")

    def stats(self) -> dict[str, dict[str, Any]]:
        return {n: asdict(self.state[n].stats) for n in self.names}

    # -- checkpoint ------------------------------------------------------------------------------
    def state_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the state, whole and on the CPU, one at a time (gathered from FSDP2
        shards, the per-rank sums averaged: every rank iterates this alike)."""
        mean = self.reduce or (lambda t: t)
        for i, name in enumerate(self.names):
            layer, st = self.layers[name], self.state[name]
            yield f"{i}.weight", full_tensor(layer.weight)
            yield f"{i}.active", layer.active_bits  # packed bits
            yield f"{i}.slots", layer.slots
            yield f"{i}.delta", full_tensor(layer.delta)
            yield f"{i}.birth", st.birth
            if st.cand_pos is not None:
                yield f"{i}.cand_pos", st.cand_pos
                yield f"{i}.cand_sum", mean(st.cand_sum)
            yield f"{i}.cand_n", torch.tensor(st.cand_n, device="cpu")
            for key in ("win_abs", "win_sq"):
                if getattr(st, key) is not None:
                    yield f"{i}.{key}", getattr(st, key)
            if st.win_sum is not None:
                yield f"{i}.win_sum", mean(st.win_sum.float()).to(torch.bfloat16)
            yield f"{i}.win_n", torch.tensor(st.win_n, device="cpu")
            if st.evicted_pos.numel():
                yield f"{i}.evicted_pos", st.evicted_pos
                yield f"{i}.evicted_at", st.evicted_at
            if layer.merged_pos.numel():
                yield f"{i}.merged_pos", layer.merged_pos
                yield f"{i}.merged_val", layer.merged_val
            if name in self.importance:
                yield f"{i}.importance", self.importance[name]
        for key, t in self.optimizer.state_items():
            yield f"opt.{key}", t

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.to("cpu").contiguous() for k, v in self.state_items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for i, name in enumerate(self.names):
            layer, st = self.layers[name], self.state[name]
            device = layer.slots.device
            get = lambda key, empty_dtype=None: (  # noqa: E731  a saved tensor on this layer's device (or an empty one, or None)
                tensors[f"{i}.{key}"].to(device) if f"{i}.{key}" in tensors
                else torch.empty(0, dtype=empty_dtype, device=device) if empty_dtype is not None else None)
            load_local(layer.weight, tensors[f"{i}.weight"])
            layer.active_bits.copy_(tensors[f"{i}.active"])
            layer.slots.copy_(tensors[f"{i}.slots"])
            load_local(layer.delta, tensors[f"{i}.delta"])
            st.birth.copy_(tensors[f"{i}.birth"])
            st.cand_pos, st.cand_sum = get("cand_pos"), get("cand_sum")
            if st.cand_pos is not None:  # checkpoints written before the slim state hold int64 positions
                st.cand_pos = st.cand_pos.to(torch.int32)
            st.cand_n = int(tensors[f"{i}.cand_n"]) if f"{i}.cand_n" in tensors else 0
            st.win_abs, st.win_sq, st.win_sum = get("win_abs"), get("win_sq"), get("win_sum")
            for key in ("win_abs", "win_sq"):  # checkpoints written before these were kept per active position hold them dense
                if getattr(st, key) is not None and getattr(st, key).numel() == layer.numel != layer.target:
                    setattr(st, key, getattr(st, key)[layer.active])
            st.win_n = int(tensors[f"{i}.win_n"]) if f"{i}.win_n" in tensors else 0
            st.evicted_pos, st.evicted_at = get("evicted_pos", torch.int32).to(torch.int32), get("evicted_at", torch.int32)
            layer.merged_pos, layer.merged_val = get("merged_pos", torch.int32), get("merged_val", torch.float32)
            if f"{i}.importance" in tensors:
                self.importance[name] = tensors[f"{i}.importance"].to(device)
            st.stats = LayerStats(**meta["stats"][name])
        self.optimizer.load_state_tensors(tensors, prefix="opt.")
        self.update_index = meta["update_index"]
