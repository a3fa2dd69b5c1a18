"""`seftc.compress`: prune → repair → pack → export → bench → eval → report, from one recipe.

Every stage is a call into the library (the same functions behind the subcommands), cached under
`RUN_DIR/stages/` by a hash of its config and inputs (see stages.py)."""
from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from seftc.compress.recipe import Recipe, load_recipe, recipe_to_dict
from seftc.compress.stages import StageOutcome, model_identity, run_stage
from seftc.errors import SeftcError
from seftc.models.saving import writes_outputs
from seftc.progress import NO_PROGRESS, ProgressSink


@dataclass
class CompressResult:
    run_dir: Path
    report: dict[str, Any]
    stages: list[StageOutcome] = field(default_factory=list)


def _validate(recipe: Recipe, log: Callable[[str], None]) -> None:
    """Check every stage's options up front, so a bad value fails before hours of work."""
    from seftc.models.loading import resolve_model
    from seftc.repair.config import make_repair_config, schedule_warnings

    m = recipe.model
    resolve_model(m.path, trust_remote_code=m.trust_remote_code, allow_pickle=m.allow_pickle)
    if recipe.prune:
        recipe.prune.to_config()
    warnings = []
    if recipe.repair:
        if not recipe.prune:
            raise SeftcError("recipe: repair needs a prune stage before it (or run `seftc repair` on a pruned folder)")
        warnings += schedule_warnings(make_repair_config(**recipe.repair.model_dump()))
    if recipe.eval:
        from seftc.eval.suite import plan

        plan(**recipe.eval.model_dump())
    for warning in warnings:  # after every check: bad input gets its one error line alone
        log(f"repair: warning: {warning}")


def _claim_run_dir(run: Path) -> None:
    """Create RUN_DIR (or reuse it: its stages are a cache) and hold its lock for this run, so a
    second `compress` into it fails at once instead of mixing its report with this run's recipe."""
    from seftc.models.saving import check_parent, lock_output

    if run.exists() and not run.is_dir():
        raise SeftcError(f"run folder {run} exists and is not a folder; choose another -o")
    if not run.exists():
        if not run.parent.exists():
            run.parent.mkdir(parents=True, exist_ok=True)
        check_parent(run)
    lock_output(run)
    run.mkdir(exist_ok=True)
    if not os.access(run, os.W_OK | os.X_OK):
        raise SeftcError(f"cannot write into the run folder {run}; check its permissions or choose another -o")


def _manifest_summary(folder: Path) -> dict[str, Any]:
    from seftc.models.manifest import Manifest

    m = Manifest.load(folder)
    return json.loads(m.to_json()) if m else {}


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@writes_outputs
def compress(
    model: str | os.PathLike | None = None,
    recipe: Recipe | str | os.PathLike | None = None,
    *,
    run_dir: str | os.PathLike = "runs/compress",
    overrides: list[str] = (),
    progress: ProgressSink = NO_PROGRESS,
    log: Callable[[str], None] = lambda s: None,
) -> CompressResult:
    """Run the whole pipeline; returns the report (also written to RUN_DIR/report.{md,json})."""
    started = time.perf_counter()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides), None if model is None else str(model))
    _validate(recipe, log)
    run = Path(run_dir).expanduser()
    _claim_run_dir(run)
    (run / "recipe.yaml").write_text(_yaml(recipe_to_dict(recipe)))
    spec = recipe.model.path
    outcomes: list[StageOutcome] = []
    models: dict[str, str] = {"dense": spec}
    keys: dict[str, str] = {"dense": model_identity(spec)}

    def stage(name: str, config: Any, inputs: list[str], work: Callable[[Path], dict[str, Any]]) -> StageOutcome:
        out = run_stage(run, name, config, inputs, work, log)
        outcomes.append(out)
        return out

    m = recipe.model
    if recipe.prune:
        cfg = recipe.prune.to_config()

        def do_prune(tmp: Path) -> dict[str, Any]:
            from seftc.prune.api import prune

            prune(spec, cfg, output=tmp / "model", progress=progress, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                  allow_pickle=m.allow_pickle)
            return {"manifest": _manifest_summary(tmp / "model")}

        o = stage("prune", cfg.model_dump(), [keys["dense"]], do_prune)
        models["pruned"], keys["pruned"] = str(o.folder / "model"), o.key

    if recipe.repair and "pruned" in models:
        rcfg = recipe.repair.model_dump()

        def do_repair(tmp: Path) -> dict[str, Any]:
            from seftc.repair.api import repair

            result = repair(models["pruned"], output=tmp / "model", progress=progress, **rcfg)
            return {"manifest": _manifest_summary(tmp / "model"), "history": result.history}

        o = stage("repair", rcfg, [keys["pruned"]], do_repair)
        models["repaired"], keys["repaired"] = str(o.folder / "model"), o.key

    final = "repaired" if "repaired" in models else "pruned" if "pruned" in models else "dense"

    if recipe.pack and final != "dense":
        pack_opts = recipe.pack

        def do_pack(tmp: Path) -> dict[str, Any]:
            from seftc.formats.packing import pack_folder

            result = pack_folder(models[final], tmp / "model", pack_opts.format, exact_zeros=pack_opts.exact_zeros, quantize=pack_opts.quantize,
                                 trust_remote_code=m.trust_remote_code, progress=progress)
            return {"summary": result.summary(), "tensors": {k: vars(v) for k, v in result.tensors.items()}}

        o = stage("pack", pack_opts.model_dump(), [keys[final]], do_pack)
        models["packed"], keys["packed"] = str(o.folder / "model"), o.key

    if recipe.export:
        export_opts = recipe.export
        if _available("seftc.export.onnx") and _available("onnxruntime"):
            def do_export(tmp: Path) -> dict[str, Any]:
                from seftc.export.onnx import export_onnx

                result = export_onnx(models[final], tmp / "onnx", progress=progress, **export_opts.export_kwargs())
                return {"summary": _plain(result)}

            stage("export", export_opts.model_dump(), [keys[final]], do_export)
        else:
            log("export: skipped (install the [onnx] extra for ONNX export)")

    if recipe.bench and final != "dense":
        bench_opts = recipe.bench
        if _available("seftc.runtime.bench"):
            def do_bench(tmp: Path) -> dict[str, Any]:
                from seftc.runtime.bench import bench_model

                result = bench_model(models[final], device=bench_opts.device, dtype=bench_opts.dtype,
                                     trust_remote_code=m.trust_remote_code, **bench_opts.bench_kwargs())
                return {"summary": _plain(result)}

            stage("bench", bench_opts.model_dump(), [keys[final]], do_bench)
        else:
            log("bench: skipped (the sparse runtime is not available in this build)")

    if recipe.eval:
        ecfg = recipe.eval.model_dump()
        for variant in ("dense", "pruned", "repaired"):
            if variant not in models:
                continue

            def do_eval(tmp: Path, variant=variant) -> dict[str, Any]:
                return evaluate_variant(models[variant], ecfg, progress)

            stage(f"eval-{variant}", ecfg, [keys[variant]], do_eval)

    if recipe.serve:
        scfg = recipe.serve.model_dump()
        if _available("fastapi") and _available("uvicorn"):
            served = "packed" if "packed" in models else final

            def do_serve(tmp: Path) -> dict[str, Any]:
                from seftc.serve.smoke import smoke_test

                return {"model": served, "summary": smoke_test(models[served], trust_remote_code=recipe.model.trust_remote_code,
                                                               **scfg)}

            stage("serve", scfg, [keys[served]], do_serve)
        else:
            log("serve: skipped (install the [serve] extra for the server)")

    from seftc.compress.report import write_report

    report = write_report(run, recipe, models, outcomes, wall_s=time.perf_counter() - started)
    return CompressResult(run, report, outcomes)


def evaluate_variant(spec: str, cfg: dict[str, Any], progress: ProgressSink) -> dict[str, Any]:
    from seftc.eval.suite import plan, run
    from seftc.models.loading import load_model

    loaded = load_model(spec)
    return run(loaded.model, loaded.tokenizer, plan(**cfg), progress)


def _plain(obj: Any) -> Any:
    for method in ("to_dict", "to_json", "summary"):
        if callable(getattr(obj, method, None)):
            return getattr(obj, method)()
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return json.loads(json.dumps(asdict(obj), default=str))
    return obj


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
