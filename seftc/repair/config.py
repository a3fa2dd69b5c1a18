"""Typed configuration of repair (the `repair` stage of a recipe)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from seftc.config_types import (Count, Fraction, NonNegativeCount, NonNegativeFloat, OpenFraction, PositiveFloat, PositiveFraction, SeqLen,
                                Seed)
from seftc.errors import SeftcError, validated

METHODS = ("seft", "static", "lora-merge", "masked-lora", "seft-noregrow", "lora-dense")
# Tuned on shakespeare:valid for SmolLM2-135M at Wanda 70% (results/repair-tuning.md).
DEFAULT_LR = {"seft": 2e-3, "seft-noregrow": 2e-3, "static": 1e-3, "lora-merge": 5e-4, "masked-lora": 5e-4, "lora-dense": 5e-4}


class RepairConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = "seft"
    data: str = "shakespeare:train"
    eval_data: str = "shakespeare:valid"
    steps: Count = 140
    batch_size: Count = 4
    grad_accum: Count = 1
    seqlen: SeqLen = 256
    lr: PositiveFloat | None = None
    warmup: NonNegativeCount = 10  # steps of linear warm-up (every method)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warm-up (every method)
    lr_min_ratio: Fraction = 0.1  # cosine/linear decay ends at lr × this
    weight_decay: NonNegativeFloat = 0.0
    seed: Seed = 0
    eval_every: NonNegativeCount = 20
    eval_windows: Count = 8
    checkpoint_every: NonNegativeCount = 0
    grad_checkpointing: bool = False
    # SEFT
    density: PositiveFraction = 0.02
    update_interval: Count = 20
    accumulation: Count = 5
    zeta0: Fraction = 0.2
    protect: NonNegativeCount = 2
    candidates: PositiveFloat = 1.0
    init: Literal["random", "gradient"] = "random"
    reactivation: Literal["gain", "always"] = "gain"
    # SEFT v2 (issue 16): eviction/growth scores, caps on how much one update moves, the pull toward the base
    evict_score: Literal["last", "window", "fisher", "wanda", "magnitude", "random"] = "last"
    evict_blend: Fraction = 0.0  # weight of the pruning-time importance |W|·‖X‖ in the eviction cost
    importance_windows: Count = 8  # calibration windows for ‖X‖ (evict_score wanda or evict_blend > 0)
    grow_candidates: Literal["first", "window"] = "first"  # candidates: top |g| of the window's first batch, or of its summed gradient
    reactivation_cap: PositiveFraction | None = None  # reactivations per update ≤ this × the layer's active count
    row_cap: OpenFraction | None = None  # evictions per output row and update ≤ floor(this × the row's active count)
    reactivation_stop: PositiveFraction = 1.0  # no reactivation once this fraction of the steps is done
    reactivation_margin: PositiveFloat = 1.0  # gain rule: reactivate only where gain > margin × eviction cost
    evict_cooldown: NonNegativeCount = 0  # positions evicted in the last N updates cannot be regrown (0 = off)
    delta_decay: NonNegativeFloat = 0.0  # L2-SP pull: decoupled decay of δ and merged δ toward the pruned base
    # eviction damage log: held-out loss just before and after each topology update (costs forward passes)
    damage_windows: NonNegativeCount = 0  # windows of eval_data (and ood_data) per measurement; 0 = off
    ood_data: str | None = None  # out-of-domain held-out text for the damage log
    # LoRA baselines
    lora_r: Count = 8
    lora_alpha: PositiveFloat = 16.0

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown repair method {v!r}; choose one of {', '.join(METHODS)}")
        return v

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


def make_repair_config(**kwargs) -> RepairConfig:
    cfg = validated(RepairConfig, "repair", **kwargs)
    if cfg.batch_size % cfg.grad_accum:
        raise SeftcError(f"repair.batch_size ({cfg.batch_size}) must be divisible by grad_accum ({cfg.grad_accum})")
    if cfg.accumulation > cfg.update_interval:
        raise SeftcError("repair.accumulation must not exceed repair.update_interval")
    return cfg
