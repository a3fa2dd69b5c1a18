"""Typed configuration of repair (the `repair` stage of a recipe)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from seftc.errors import SeftcError, validated

METHODS = ("seft", "static", "lora-merge", "masked-lora", "seft-noregrow", "lora-dense")
# Tuned on shakespeare:valid for SmolLM2-135M at Wanda 70% (results/repair-tuning.md).
DEFAULT_LR = {"seft": 2e-3, "seft-noregrow": 2e-3, "static": 1e-3, "lora-merge": 5e-4, "masked-lora": 5e-4, "lora-dense": 5e-4}


class RepairConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = "seft"
    data: str = "shakespeare:train"
    eval_data: str = "shakespeare:valid"
    steps: int = Field(140, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    seqlen: int = Field(256, ge=8)
    lr: float | None = Field(None, gt=0)
    warmup: int = Field(10, ge=0)  # steps of linear warm-up (every method)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warm-up (every method)
    lr_min_ratio: float = Field(0.1, ge=0, le=1)  # cosine/linear decay ends at lr × this
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    eval_every: int = Field(20, ge=0)
    eval_windows: int = Field(8, ge=1)
    checkpoint_every: int = Field(0, ge=0)
    grad_checkpointing: bool = False
    # SEFT
    density: float = Field(0.02, gt=0, le=1)
    update_interval: int = Field(20, ge=1)
    accumulation: int = Field(5, ge=1)
    zeta0: float = Field(0.2, ge=0, le=1)
    protect: int = Field(2, ge=0)
    candidates: float = Field(1.0, gt=0)
    init: Literal["random", "gradient"] = "random"
    reactivation: Literal["gain", "always"] = "gain"
    # SEFT v2 (issue 16): eviction/growth scores, caps on how much one update moves, the pull toward the base
    evict_score: Literal["last", "window", "fisher", "wanda", "magnitude", "random"] = "last"
    evict_blend: float = Field(0.0, ge=0, le=1)  # weight of the pruning-time importance |W|·‖X‖ in the eviction cost
    importance_windows: int = Field(8, ge=1)  # calibration windows for ‖X‖ (evict_score wanda or evict_blend > 0)
    grow_candidates: Literal["first", "window"] = "first"  # candidates: top |g| of the window's first batch, or of its summed gradient
    reactivation_cap: float | None = Field(None, gt=0, le=1)  # reactivations per update ≤ this × the layer's active count
    row_cap: float | None = Field(None, gt=0, lt=1)  # evictions per output row and update ≤ floor(this × the row's active count)
    reactivation_stop: float = Field(1.0, gt=0, le=1)  # no reactivation once this fraction of the steps is done
    reactivation_margin: float = Field(1.0, gt=0)  # gain rule: reactivate only where gain > margin × eviction cost
    evict_cooldown: int = Field(0, ge=0)  # positions evicted in the last N updates cannot be regrown (0 = off)
    delta_decay: float = Field(0.0, ge=0)  # L2-SP pull: decoupled decay of δ and merged δ toward the pruned base
    # eviction damage log: held-out loss just before and after each topology update (costs forward passes)
    damage_windows: int = Field(0, ge=0)  # windows of eval_data (and ood_data) per measurement; 0 = off
    ood_data: str | None = None  # out-of-domain held-out text for the damage log
    # LoRA baselines
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = 16.0

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
