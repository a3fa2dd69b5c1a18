"""What a valid number is, defined once: the constrained types every typed config uses (repair,
prune, calibration, recipe stages) and that the CLI applies to options without a config model
(`seftc.cli.common.checked`). Floats are finite; counts are positive and bounded, so a typo like
`--steps 1e30` or `--seed 2**70` is one error line, not an overflow deep inside torch."""
from __future__ import annotations

import os
from typing import Annotated, Any

from pydantic import AfterValidator, Field, TypeAdapter, ValidationError

from seftc.errors import validation_message

MAX_COUNT = 2**31 - 1  # beyond any real step, sample, batch or token count; fits int32 indices
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes any int64 ≥ 0


def _below_one(x: float) -> float:
    if not 0 <= x < 1:
        raise ValueError(f"must be in [0, 1), got {x}")
    return x


Count = Annotated[int, Field(ge=1, le=MAX_COUNT)]
NonNegativeCount = Annotated[int, Field(ge=0, le=MAX_COUNT)]
SeqLen = Annotated[int, Field(ge=8, le=MAX_COUNT)]  # tokens per window (capped later at the model's context)
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Threads = Annotated[int, Field(ge=1, le=max(os.cpu_count() or 1, 1))]  # more threads than cores only stalls
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]  # [0, 1]
Sparsity = Annotated[float, AfterValidator(_below_one)]  # [0, 1): no weights left is no model
PositiveFraction = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]  # (0, 1], e.g. a density
OpenFraction = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]  # (0, 1)


def check(kind: Any, value: Any, name: str) -> Any:
    """Validate one value against a type above; raises ValueError naming `name` on failure."""
    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError as e:
        raise ValueError(f"{name}: {validation_message(e.errors()[0])}, got {value!r}") from None


def parse_counts(text: str) -> tuple[int, ...]:
    """A comma-separated list of counts, e.g. bench batch sizes "1,4,16"."""
    try:
        values = tuple(check(Count, int(p), "") for p in str(text).split(",") if p.strip())
    except ValueError:
        values = ()
    if not values:
        raise ValueError(f"give comma-separated positive integers, e.g. 1,4,16, got {text!r}")
    return values


def described(default: Any, description: str, **cli: Any) -> Any:
    """A config field with its help text: an option is declared once, as a field, and both the
    command's click option and the recipe key come from it (`cli` details: see seftc.cli.options)."""
    return Field(default, description=description, json_schema_extra={"cli": cli} if cli else None)
