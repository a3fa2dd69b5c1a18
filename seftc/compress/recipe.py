"""Recipes: YAML files whose top-level keys are the stages of `seftc compress`.

Each stage maps to a typed config whose keys are that command's long options in snake_case; a
stage set to `false` is skipped; unknown keys at any level are errors naming the key's path
(`prune.sparsityy`). CLI `--set stage.key=value` overrides a recipe key.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from seftc.config_types import Count, NonNegativeCount, SeqLen, Seed, Sparsity, parse_counts
from seftc.errors import SeftcError, validated
from seftc.repair.config import RepairConfig

STAGES = ("model", "prune", "repair", "pack", "export", "bench", "eval", "serve")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelStage(_Strict):
    path: str = "default"
    dtype: str = "auto"
    trust_remote_code: bool = False


class PruneStage(_Strict):
    method: str = "wanda"
    sparsity: Sparsity | None = 0.5
    pattern: str = "unstructured"
    calib: str = "shakespeare:calib"
    nsamples: Count = 64
    seqlen: SeqLen = 256
    seed: Seed = 0
    include: list[str] = ["*"]
    ignore: list[str] | None = None
    owl: bool = False


class RepairStage(RepairConfig):
    """`seftc repair`'s options (one definition: `RepairConfig`), with a shorter default run."""

    steps: Count = 40
    eval_every: NonNegativeCount = 10


class PackStage(_Strict):
    format: str = "auto"


class ExportStage(_Strict):
    onnx: bool = True
    sparse_initializers: bool = True


class BenchStage(_Strict):
    device: str = "cpu"
    batch: str = "1,4"
    repeats: Count = 5

    @field_validator("batch", mode="before")
    @classmethod
    def _batches(cls, v: Any) -> str:
        return ",".join(map(str, parse_counts(str(v))))


class EvalStage(_Strict):
    ppl: str | None = "shakespeare:test"
    tasks: str | None = "piqa,arc_easy,hellaswag"
    limit: Count | None = 100
    ppl_limit: Count | None = 16
    seqlen: SeqLen = 512


class ServeStage(_Strict):
    """Optional (off unless the recipe names it): the final model behind `seftc serve`, a few
    streamed requests, latency in the report."""

    requests: int = Field(4, ge=1, le=64)
    concurrency: int = Field(2, ge=1, le=16)
    max_tokens: int = Field(16, ge=1, le=512)
    prompt: str = "The quality of mercy is not strained;"
    device: str = "cpu"


STAGE_TYPES: dict[str, type[BaseModel]] = {
    "model": ModelStage, "prune": PruneStage, "repair": RepairStage, "pack": PackStage,
    "export": ExportStage, "bench": BenchStage, "eval": EvalStage, "serve": ServeStage,
}


class Recipe(BaseModel):
    """Stage configs; a stage that is None is skipped (`false` in YAML)."""

    model_config = ConfigDict(extra="forbid")

    model: ModelStage = ModelStage()
    prune: PruneStage | None = PruneStage()
    repair: RepairStage | None = RepairStage()
    pack: PackStage | None = PackStage()
    export: ExportStage | None = ExportStage()
    bench: BenchStage | None = BenchStage()
    eval: EvalStage | None = EvalStage()
    serve: ServeStage | None = None


@dataclass(frozen=True)
class _SetValue:
    """A `--set stage.key=value` value: its text, and the text read as a YAML scalar."""

    label: str  # how the user wrote it, e.g. "--set bench.batch=1"
    text: str
    parsed: Any


def _coerce(stage: type[BaseModel], key: str, value: _SetValue) -> Any:
    """The YAML reading of a `--set` value, or its plain text where the key's type wants text
    (`--set bench.batch=1` is the string "1"); the stage's own validation reports anything else."""
    field = stage.model_fields.get(key)
    if field is None:
        return value.parsed
    adapter = TypeAdapter(Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation)
    for candidate in (value.parsed, value.text):
        try:
            return adapter.validate_python(candidate)
        except ValidationError:
            continue
    return value.parsed


def _validate_stage(name: str, value: Any) -> BaseModel | None:
    if value is False or value is None:
        if name == "model":
            raise SeftcError("model: cannot be skipped; give a path or leave it out for the default model")
        return None
    if value is True:
        value = {}
    if isinstance(value, _SetValue):
        raise SeftcError(f"{value.label}: a whole stage takes true or false (or set one key: --set {name}.KEY=VALUE)")
    if not isinstance(value, dict):
        raise SeftcError(f"{name}: expected a mapping of options or false, got {type(value).__name__}")
    stage = STAGE_TYPES[name]
    labels = {k: v.label for k, v in value.items() if isinstance(v, _SetValue)}
    values = {k: _coerce(stage, k, v) if isinstance(v, _SetValue) else v for k, v in value.items()}
    return validated(stage, name, "recipe key ", labels=labels, **values)


def recipe_from_dict(raw: dict[str, Any] | None) -> Recipe:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise SeftcError("a recipe must be a YAML mapping of stages (model, prune, repair, pack, export, bench, eval)")
    unknown = [k for k in raw if k not in STAGES]
    if unknown:
        raise SeftcError(f"recipe key {unknown[0]}: unknown stage; stages are {', '.join(STAGES)}")
    defaults = Recipe()
    stages = {name: getattr(defaults, name) for name in STAGES}
    for name, value in raw.items():
        stages[name] = _validate_stage(name, value)
    return Recipe.model_construct(**stages)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise SeftcError(f"--set {text!r}: expected stage.key=value, e.g. --set prune.sparsity=0.7")
    key, value = text.split("=", 1)
    path = key.strip().split(".")
    if not 1 <= len(path) <= 2 or not all(path):
        raise SeftcError(f"--set {text!r}: expected stage.key=value or stage=false")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    if len(path) == 1 and (parsed is None or isinstance(parsed, (bool, dict))):
        return path, parsed
    return path, _SetValue(f"--set {text}", value, parsed)


def load_recipe(path: str | Path | None, overrides: list[str] = (), model: str | None = None) -> Recipe:
    """Read a YAML recipe (or the defaults), apply `--set` overrides and MODEL; validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SeftcError(f"recipe {path} does not exist")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise SeftcError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise SeftcError(f"recipe {path} must be a mapping of stages")
    for text in overrides:
        keys, value = _parse_override(text)
        if len(keys) == 1:
            raw[keys[0]] = value
        else:
            stage = raw.get(keys[0])
            if stage in (None, True):
                stage = {}
            if stage is False:
                raise SeftcError(f"--set {text}: stage {keys[0]} is disabled in the recipe")
            raw[keys[0]] = {**stage, keys[1]: value}
    if model is not None:
        raw["model"] = {**(raw.get("model") or {}), "path": model}
    return recipe_from_dict(raw)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return {name: (False if getattr(recipe, name) is None else getattr(recipe, name).model_dump()) for name in STAGES}
