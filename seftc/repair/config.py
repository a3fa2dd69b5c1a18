"""Typed configuration of repair (the `repair` stage of a recipe)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from seftc.config_types import (Count, Fraction, NonNegativeCount, NonNegativeFloat, OpenFraction, PositiveFloat, PositiveFraction, SeqLen,
                                Seed, described)
from seftc.errors import SeftcError, validated

METHODS = ("seft", "static", "lora-merge", "masked-lora", "seft-noregrow", "lora-dense")
# Tuned on shakespeare:valid for SmolLM2-135M at Wanda 70% (results/repair-tuning.md).
# LoRA baselines: tuned on validation text in session 10 (results/repair-val40-lora.md); lora-dense (a reference) is not tuned.
# lora-merge: 1e-2 was best at 40 steps but diverged at 140 steps of the commonsense mix (training loss 4.9 → 10.8, session 11),
# so its default is the next rate of the grid, 5e-3
DEFAULT_LR = {"seft": 2e-3, "seft-noregrow": 2e-3, "static": 1e-3, "lora-merge": 5e-3, "masked-lora": 1e-2, "lora-dense": 5e-4}


_LR_HELP = ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items())


class RepairConfig(BaseModel):
    """`seftc repair`'s options and the `repair` stage of a recipe: declared once, here. The
    defaults are the settings tuned on validation text (results/repair-tuning.md)."""

    model_config = ConfigDict(extra="forbid")

    method: str = described("seft", "seft: a sparse delta whose positions move (topology updates); static: fine-tune the kept weights "
                     "under the mask; seft-noregrow: SEFT that never grows into pruned positions; lora-merge, masked-lora, "
                     "lora-dense: LoRA baselines.", choices=list(METHODS))
    data: str = described("shakespeare:train", "Training text: a .txt file or folder, a .jsonl, or a built-in source.")
    eval_data: str = described("shakespeare:valid", "Held-out text for the loss logged during training.")
    steps: Count = described(140, "Optimizer steps.")
    batch_size: Count = described(4, "Sequences per optimizer step (global, over all ranks).")
    grad_accum: Count = described(1, "Micro-batches per step (batch-size must be divisible by it).")
    seqlen: SeqLen = described(256, "Tokens per training sequence (capped at the model's context).")
    lr: PositiveFloat | None = described(None, f"Peak learning rate; by default the one tuned per method: {_LR_HELP}.",
                                  show_default="per method")
    warmup: NonNegativeCount = described(10, "Linear warm-up steps (every method); keep it below --steps.")
    lr_schedule: Literal["cosine", "linear", "constant"] = described("cosine", "Decay after the warm-up (every method).")
    lr_min_ratio: Fraction = described(0.1, "The cosine/linear decay ends at the peak lr × this.")
    weight_decay: NonNegativeFloat = described(0.0, "Decoupled weight decay of the trained parameters.")
    seed: Seed = described(0, "Seed of the data order and of the initialisation.")
    eval_every: NonNegativeCount = described(20, "Held-out loss every N steps (0: never).")
    eval_windows: Count = described(8, "Held-out windows (of seqlen tokens) per held-out loss.")
    checkpoint_every: NonNegativeCount = described(0, "Write a resumable checkpoint every N steps to OUT.checkpoint/ (0: never).")
    grad_checkpointing: bool = described(False, "Activation checkpointing (less memory, more compute).")
    # SEFT
    density: PositiveFraction = described(0.10, "SEFT: trainable delta density ρ, a fraction of each target layer's weights.")
    update_interval: Count = described(10, "SEFT: steps between topology updates (a run needs more than twice this for two).")
    accumulation: Count = described(5, "SEFT: steps of gradient statistics before each update (at most update-interval).")
    zeta0: Fraction = described(0.2, "SEFT: fraction of slots dropped at the first update (cosine-decayed).")
    protect: NonNegativeCount = described(2, "SEFT: updates a newly grown position is protected from dropping.")
    candidates: PositiveFloat = described(1.0, "SEFT: growth candidates kept per slot, as a multiple of the slots (memory O(k)).")
    init: Literal["random", "gradient"] = described("gradient", "SEFT: initial delta positions: largest first gradients, or random.")
    reactivation: Literal["gain", "always"] = described("gain", "SEFT: grow into pruned positions only where the gain pays for the "
                                                 "eviction (gain), or always.")
    # SEFT v2 (issue 16): eviction/growth scores, caps on how much one update moves, the pull toward the base
    evict_score: Literal["last", "window", "fisher", "wanda", "magnitude", "random"] = described(
        "window", "SEFT: eviction (prune-back) cost: last batch |W·g|, window-mean |W·g|, Fisher/OBD, or an importance. The "
                  "gain rule weighs it against a first-order gain, so only the first-order costs (last, window) bind it.")
    evict_blend: Fraction = described(0.0, "SEFT: weight of the pruning-time importance |W|·‖X‖ in the eviction cost.")
    importance_windows: Count = described(8, "SEFT: calibration windows for ‖X‖ (evict-score wanda or evict-blend > 0).")
    grow_candidates: Literal["first", "window"] = described(
        "first", "SEFT: growth candidates from the top |g| of the window's first batch, or of its summed gradient.")
    reactivation_cap: PositiveFraction | None = described(
        0.005, "SEFT: reactivations per update ≤ this fraction of a layer's active weights (none: no cap).")
    row_cap: OpenFraction | None = described(
        0.02, "SEFT: evictions per output row and update ≤ this fraction of the row's active weights (none: no cap).")
    reactivation_stop: PositiveFraction = described(0.75, "SEFT: no reactivation after this fraction of the steps.")
    reactivation_margin: PositiveFloat = described(1.0, "SEFT: the gain rule reactivates only where gain > margin × cost.")
    evict_cooldown: NonNegativeCount = described(0, "SEFT: positions evicted in the last N updates are not regrown (0: off).")
    delta_decay: NonNegativeFloat = described(2.0, "SEFT: decay of δ and merged δ toward the pruned base (L2-SP pull; 0: off).")
    # eviction damage log: held-out loss just before and after each topology update (costs forward passes)
    damage_windows: NonNegativeCount = described(
        0, "Log held-out loss before/after each SEFT topology update on this many windows (0: off).")
    ood_data: str | None = described(None, "Out-of-domain held-out text for the damage log.", show_default="none")
    # static
    static_precision: Literal["weights", "fp32"] = described(
        "weights", "static: dtype of the trained values, their gradient and AdamW's moments (active weights only): the weights' "
                   "own dtype, or fp32 (on a bf16/fp16 base an fp32 master copy, as SEFT's δ: small updates kept, twice the state).")
    # LoRA baselines
    lora_r: Count = described(8, "LoRA baselines: adapter rank.")
    lora_alpha: PositiveFloat = described(16.0, "LoRA baselines: scaling α.")

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown repair method {v!r}; choose one of {', '.join(METHODS)}")
        return v

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


def make_repair_config(labels: dict[str, str] | None = None, **kwargs) -> RepairConfig:
    """Validate repair options; `labels` names keys as the user gave them (`--steps`)."""
    cfg = validated(RepairConfig, "repair", labels=labels, **kwargs)
    name = (labels or {}).get
    if cfg.batch_size % cfg.grad_accum:
        raise SeftcError(f"{name('batch_size', 'repair.batch_size')} ({cfg.batch_size}) must be divisible by "
                         f"{name('grad_accum', 'repair.grad_accum')} ({cfg.grad_accum})")
    if cfg.accumulation > cfg.update_interval:
        raise SeftcError(f"{name('accumulation', 'repair.accumulation')} ({cfg.accumulation}) must not exceed "
                         f"{name('update_interval', 'repair.update_interval')} ({cfg.update_interval})")
    return cfg


def schedule_warnings(cfg: RepairConfig) -> list[str]:
    """Settings that are valid but probably not what the user meant."""
    out = []
    if cfg.warmup >= cfg.steps:
        out.append(f"warm-up ({cfg.warmup} steps) is not below the {cfg.steps} steps: the learning rate never reaches its "
                   f"peak after warm-up nor decays; lower warmup below steps")
    seft = cfg.method.startswith("seft")
    if seft and cfg.steps <= cfg.update_interval:
        out.append(f"{cfg.steps} steps with an update every {cfg.update_interval}: no topology update will happen; "
                   f"raise steps above update_interval")
    return out


def loss_warnings(train_loss: list[list[float]], lr: float) -> list[str]:
    """A finished run whose training loss ended above where it started: it most likely diverged (a finite
    divergence passes the loop's non-finite check). Compares the means of the first and the last tenth of
    the steps (at least one step each)."""
    losses = [loss for _, loss in train_loss]
    k = max(1, len(losses) // 10)
    if len(losses) < 2 * k:
        return []
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    if last <= first:
        return []
    return [f"training loss ended above where it started ({first:.3f} over the first {k} steps → {last:.3f} over the last {k}): "
            f"the run most likely diverged; lower --lr (was {lr:g})"]
