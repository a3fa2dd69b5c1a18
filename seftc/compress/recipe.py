"""Recipes: YAML files whose top-level keys are the stages of `seftc compress`.

Each stage maps to a typed config whose keys are exactly that command's long options in
snake_case (the command's options are derived from the same model, see seftc.cli.options); a
stage set to `false` is skipped; a key left out takes the command's default; unknown keys at any
level are errors naming the key's path (`prune.sparsityy`). `--set stage.key=value` overrides a
recipe key; its value is read as YAML, then coerced by the key's type.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from seftc.config_types import Count, NonNegativeCount, PositiveFloat, SeqLen, Seed, Sparsity, Threads, described, parse_counts
from seftc.errors import SeftcError, validated
from seftc.repair.config import RepairConfig

STAGES = ("model", "prune", "repair", "pack", "export", "bench", "eval", "serve")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


PACK_FORMATS = ("auto", "2:4", "bitmask", "csr", "rice", "ct-sparse-bitmask", "ct-sparse-24-bitmask")  # = formats.registry.CHOICES
PACK_QUANTIZE = ("none", "int8")  # = formats.names.QUANTIZE


class ModelStage(_Strict):
    """The input model, and the loading options every command that reads a model shares."""

    path: str = described("default", "MODEL: a Hugging Face folder, a .safetensors beside its config.json, a .gguf, or 'default'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = described("auto", "Dtype to load the model in (auto: the checkpoint's).")
    trust_remote_code: bool = described(False, "Allow code named by the checkpoint (auto_map) to run.")
    allow_pickle: bool = described(False, "Allow pickle weights (.bin/.pt), read tensors-only; only for trusted files.")


class PruneStage(_Strict):
    """`seftc prune`'s options; `to_config()` gives the library's PruneConfig."""

    method: Literal["magnitude", "wanda", "sparsegpt"] = described("wanda", "One-shot pruning method.")
    sparsity: Sparsity | None = described(None, "Fraction of target weights removed, in [0, 1); N:M patterns imply their own.",
                                   show_default="0.5, or the N:M pattern's")
    pattern: str = described("unstructured", "'unstructured' or N:M, e.g. 2:4, 4:8.")
    calib: str = described("shakespeare:calib", "Calibration text: a .txt file or folder, a .jsonl, or a built-in source.")
    nsamples: Count = described(128, "Calibration sequences.")
    seqlen: SeqLen = described(512, "Tokens per calibration sequence (capped at the model's context).")
    seed: Seed = described(0, "Seed of the calibration sample.")
    include: list[str] = described(["*"], "Target module-name patterns (fnmatch; repeatable).")
    ignore: list[str] = described([], "Module-name patterns to skip (repeatable).", show_default="lm_head and embeddings")
    owl: bool = described(False, "Non-uniform per-block sparsity by outlier ratio (OWL), same overall sparsity.")
    owl_lambda: Sparsity = described(0.08, "OWL: largest deviation of a block's sparsity from the mean.")
    batch_size: Count | None = described(None, "Calibration sequences per forward pass.", show_default="all at once, one pass per block")

    def to_config(self) -> Any:
        from seftc.models.targets import DEFAULT_IGNORE
        from seftc.prune.config import make_config

        return make_config(method=self.method, sparsity=self.sparsity, pattern=self.pattern, include=self.include,
                           ignore=self.ignore or list(DEFAULT_IGNORE), owl=self.owl, owl_lambda=self.owl_lambda,
                           batch_size=self.batch_size,
                           calib={"source": self.calib, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed})


class PackStage(_Strict):
    """`seftc pack`'s options."""

    format: Literal[PACK_FORMATS] = described("auto", "auto: the smallest valid format per tensor; ct-*: compressed-tensors' "  # type: ignore[valid-type]
                                       "layouts, loadable by its tools.")
    exact_zeros: bool = described(False, "Keep -0.0 weights as stored values (bit-exact; costs space).")
    quantize: Literal[PACK_QUANTIZE] = described("none", "int8: store the sparse weights' values as int8 with one scale per "  # type: ignore[valid-type]
                                          "row (bitmask and 2:4 layouts; lossy; ~0.43 B/weight at 70% sparsity).")

    @model_validator(mode="after")
    def _quantize_applies(self) -> "PackStage":
        from seftc.formats.names import quantize_problem  # torch-free

        problem = quantize_problem(self.format, self.quantize)
        if problem:
            raise ValueError(problem)
        return self


class ExportStage(_Strict):
    """`seftc export`'s options."""

    onnx: bool = described(True, "Accepted for scripts that name the format; ONNX is the only one.", hidden=True)
    kv_cache: bool = described(True, "Take and return the KV cache (past_key_values.* / present.*) for decoding.")
    sparse_initializers: bool = described(True, "Store pruned weights as ONNX sparse initializers where that is smaller.",
                                   flag="--sparse-initializers/--dense-initializers")
    strict_onnx: bool = described(False, "int64 sparse indices, which the ONNX checker requires (larger files; onnxruntime also "
                           "takes the default int32).")
    opset: Count = described(17, "ONNX opset.")
    check: bool = described(True, "Compare onnxruntime's logits with PyTorch on fixed prompts.")
    tolerance: PositiveFloat = described(1e-3, "Largest max-abs logit error allowed, relative to the largest logit.")
    prompt: list[str] = described([], "A prompt for the check (repeatable).", show_default="three fixed sentences")

    @field_validator("onnx")
    @classmethod
    def _only_onnx(cls, v: bool) -> bool:
        if not v:
            raise ValueError("ONNX is the only export format; to skip the export, set the whole stage to false (export: false)")
        return v

    def export_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of seftc.export.onnx.export_onnx."""
        from seftc.export.onnx import DEFAULT_PROMPTS

        return {"kv_cache": self.kv_cache, "sparse_initializers": self.sparse_initializers,
                "sparse_index_dtype": "int64" if self.strict_onnx else "int32", "opset": self.opset, "check": self.check,
                "tolerance": self.tolerance, "prompts": tuple(self.prompt) or DEFAULT_PROMPTS}


class BenchStage(_Strict):
    """`seftc bench`'s options."""

    device: Literal["cpu", "cuda"] = described("cpu", "Device both models run on.")
    batch: str = described("1,4,16", "Comma-separated batch sizes.", metavar="B,B,...")
    dtype: Literal["auto", "float32", "bfloat16"] = described("auto", "Dtype of the sparse values and of the dense baseline "
                                                              "(auto: the checkpoint's).")
    prompt_tokens: Count = described(64, "Prompt length N for prefill.")
    new_tokens: Count = described(16, "Generated tokens M timed per decode repeat.")
    repeats: Count = described(5, "Timed repeats (medians reported, with min–max).")
    max_repeats: Count | None = described(None, "Repeat on, alternately, until the spread settles (interquartile range within "
                                                "10% of the median) or this many repeats.", show_default="3 x --repeats")
    warmup: NonNegativeCount = described(2, "Untimed warm-up runs before the repeats.")
    layers: NonNegativeCount = described(7, "Time the kernels of the first N sparse layers alone (0: skip; see --all-layers).")
    all_layers: bool = described(False, "Time every sparse layer's kernel.")
    threads: Threads | None = described(None, "CPU threads.", show_default="torch's")

    @field_validator("batch", mode="before")
    @classmethod
    def _batches(cls, v: Any) -> str:
        return ",".join(map(str, parse_counts(str(v))))

    def bench_kwargs(self) -> dict[str, Any]:
        """The fields of seftc.runtime.bench.BenchConfig."""
        return {"batches": parse_counts(self.batch), "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "repeats": self.repeats, "max_repeats": self.max_repeats, "warmup": self.warmup, "max_layers": None if self.all_layers else self.layers,
                "threads": self.threads}


class EvalStage(_Strict):
    """`seftc eval`'s options."""

    ppl: str | None = described(None, "Text for perplexity: a .txt, a folder of .txt, a .jsonl, or shakespeare:test / lambada / ...",
                         show_default="shakespeare:test when no tasks are given", metavar="PATH")
    tasks: str | None = described(None, "Comma-separated zero-shot tasks: boolq,piqa,siqa,hellaswag,winogrande,arc_easy,arc_challenge,"
                           "openbookqa,mmlu.", metavar="A,B,...", show_default="none")
    limit: Count | None = described(None, "Items per task (the first N of its eval part); also perplexity windows unless --ppl-limit.",
                             show_default="all")
    ppl_limit: Count | None = described(None, "Perplexity windows (the first N).", show_default="--limit, else all")
    seqlen: SeqLen = described(512, "Perplexity window length in tokens (capped at the model's maximum).")
    stride: Count | None = described(None, "Sliding-window stride for perplexity.", show_default="seqlen: non-overlapping windows")
    batch_size: Count | None = described(None, "Sequences per forward pass.", show_default="4 for perplexity, 16 for tasks")
    norm: Literal["bytes", "tokens", "none"] = described("bytes", "Length normalisation of choice log-likelihoods: per UTF-8 byte "
                                                  "(lm-eval acc_norm style), per token, or none.")


class ServeStage(_Strict):
    """Optional (off unless the recipe names it): the final model behind `seftc serve`, a few
    streamed requests, latency in the report. A smoke test of the server, not `seftc serve`'s
    options (those start a long-running server)."""

    requests: int = Field(4, ge=1, le=64)
    concurrency: int = Field(2, ge=1, le=16)
    max_tokens: int = Field(16, ge=1, le=512)
    prompt: str = "The quality of mercy is not strained;"
    device: str = "cpu"


STAGE_TYPES: dict[str, type[BaseModel]] = {
    "model": ModelStage, "prune": PruneStage, "repair": RepairConfig, "pack": PackStage,
    "export": ExportStage, "bench": BenchStage, "eval": EvalStage, "serve": ServeStage,
}
# Options of a command that are not keys of its stage: where output goes and how it is shown, and
# what the machine allows (memory cap, device, streaming, shard size), which a run_dir does not fix.
CLI_ONLY = frozenset({"output", "force", "json", "resume", "plot", "max_memory", "max_shard_size", "device", "stream", "fsdp"})


class Recipe(BaseModel):
    """Stage configs; a stage that is None is skipped (`false` in YAML)."""

    model_config = ConfigDict(extra="forbid")

    model: ModelStage = ModelStage()
    prune: PruneStage | None = PruneStage()
    repair: RepairConfig | None = RepairConfig()
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


DEFAULT_RECIPE = Path(__file__).with_name("default.yaml")  # the built-in recipe: `seftc compress`, `make demo`


def load_recipe(path: str | Path | None, overrides: list[str] = (), model: str | None = None) -> Recipe:
    """Read a YAML recipe (None: the built-in DEFAULT_RECIPE), apply `--set` overrides and MODEL; validate."""
    raw: dict[str, Any] = {}
    path = DEFAULT_RECIPE if path is None else path
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
