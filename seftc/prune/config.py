"""Typed configuration of one-shot pruning (the `prune` stage of a recipe)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from seftc.config_types import Count, PositiveFloat, Sparsity
from seftc.data.calibration import CalibConfig
from seftc.errors import SeftcError, validated
from seftc.models.targets import DEFAULT_IGNORE
from seftc.prune.masks import Pattern, check_sparsity, parse_pattern
from seftc.prune.methods import PRUNERS


class PruneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = "wanda"
    sparsity: Sparsity | None = Field(None, description="fraction of target weights removed; implied by N:M patterns")
    pattern: str = "unstructured"
    calib: CalibConfig = CalibConfig()
    include: list[str] = ["*"]
    ignore: list[str] = list(DEFAULT_IGNORE)
    owl: bool = False
    owl_lambda: Sparsity = Field(0.08, description="OWL: largest deviation of a block's sparsity from the mean, [0, 1)")
    owl_m: PositiveFloat = 5.0
    batch_size: Count | None = Field(None, description="calibration batch; None = all samples at once (one pass)")
    blocksize: Count = 128
    damp: PositiveFloat = 0.01

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in PRUNERS:
            raise ValueError(f"unknown method {v!r}; choose one of {', '.join(PRUNERS)}")
        return v

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, v: str) -> str:
        return str(parse_pattern(v))

    @property
    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        p = self.parsed_pattern
        if p.is_nm:
            return p.sparsity
        return check_sparsity(0.5 if self.sparsity is None else self.sparsity)

    def checked(self) -> "PruneConfig":
        """Cross-field checks; raises SeftcError."""
        p = self.parsed_pattern
        if p.is_nm:
            if self.sparsity is not None and abs(self.sparsity - p.sparsity) > 1e-9:
                raise SeftcError(f"pattern {p} fixes the sparsity at {p.sparsity:g}; drop --sparsity or set it to {p.sparsity:g}")
            if self.owl:
                raise SeftcError("OWL allocates per-layer sparsity and cannot be combined with an N:M pattern")
        else:
            check_sparsity(self.target_sparsity)
        return self


def make_config(**kwargs) -> PruneConfig:
    """Build and validate a PruneConfig, turning validation errors into one SeftcError line."""
    return validated(PruneConfig, "prune", **kwargs).checked()
