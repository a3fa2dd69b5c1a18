"""`make bench-repair`: repair methods on SmolLM2-135M from the same pruned model, same data, same
step budget, each run in its own process (peak memory and seconds per step are per run).

Protocol (printed into results/repair.md):
- pruned inputs: Wanda, calibration `shakespeare:calib` 128 × 512 tokens, seed 0, at each
  pattern in BENCH_PATTERNS (default: 70% unstructured and 2:4);
- training: BENCH_DATA (default `shakespeare:train`, 23 plays), BENCH_STEPS steps (default 40)
  × 4 sequences × 256 tokens, warm-up 10 steps then cosine decay to 10%, seeds BENCH_SEEDS
  (BENCH_NM_SEEDS on N:M patterns) for seft and static, the first seed for the other methods;
  options beyond each method's defaults from BENCH_SETTINGS (JSON: method -> options), chosen on
  `shakespeare:valid` only; a method written `seft@NAME` is a variant of `seft` with the options
  of BENCH_SETTINGS["seft@NAME"];
- in-domain perplexity: `shakespeare:test` (5 tragedies, disjoint from calibration, training
  and validation); out-of-domain: LAMBADA passages; first BENCH_PPL_WINDOWS windows of 512
  (BENCH_PPL_SOURCES names the two texts; with the commonsense mix both are out of its domain);
- gap closed = (ppl_pruned − ppl_method) / (ppl_pruned − ppl_dense);
- accuracies: BENCH_TASKS, first BENCH_LIMIT eval items each (0: the whole eval part), with
  standard errors, for the first seed of the methods in BENCH_TASK_METHODS; "mean acc" is their
  mean over the tasks, ± the pooled standard error sqrt(Σ se²) / number of tasks; rows keep which
  items they got right, and every two scored rows of a pattern get their paired difference of the
  mean (standard error from the per-item differences, pooled alike; BENCH_ITEMS_BACKFILL=1 scores
  the saved models of rows cached before this again, and stops unless their accuracies repeat);
- eviction damage (SEFT rows): held-out loss just before and after each topology update on
  BENCH_DAMAGE_WINDOWS windows of BENCH_EVAL_DATA (in-domain validation) and BENCH_OOD_DATA
  (out-of-domain validation), mean increase per update; 0 windows turns the log off;
- final sparsity counted from the saved weights; s/step is the training loop only; peak RSS is
  the run's process high-water mark (of the resumed process for a row with `resumed_from_step`:
  runs write a checkpoint every BENCH_CHECKPOINT_EVERY steps, default 10, and an interrupted run
  continues from it bit-identically; one interrupted in its evaluation is evaluated again without
  training); rows kept in the committed results/NAME.json that WORK lacks (a fresh clone) are
  taken from it and checked like any cached row, so a benchmark is extended, not measured again;
- reference row `dense+train`: the dense model trained (all weights of the target layers,
  mask of ones) with static's options, data and budget.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("BENCH_DIR", ROOT / "runs" / "bench-repair"))
RESULTS = Path(os.environ.get("BENCH_RESULTS_DIR", ROOT / "results"))
MODEL = os.environ.get("BENCH_MODEL", "default")  # SmolLM2-135M; a folder for tests on tiny models
CALIB = {"source": os.environ.get("BENCH_CALIB", "shakespeare:calib"), "nsamples": int(os.environ.get("BENCH_CALIB_N", 128)),
         "seqlen": int(os.environ.get("BENCH_CALIB_SEQLEN", 512))}
STEPS = int(os.environ.get("BENCH_STEPS", 40))
PATTERNS = os.environ.get("BENCH_PATTERNS", "0.7,2:4").split(",")
METHODS = os.environ.get("BENCH_METHODS", "seft,static,masked-lora,lora-merge,seft-noregrow,lora-dense").split(",")
NM_METHODS = os.environ.get("BENCH_NM_METHODS", ",".join(METHODS)).split(",")  # methods run on N:M patterns
SEEDS = [int(s) for s in os.environ.get("BENCH_SEEDS", "0").split(",")]
NM_SEEDS = [int(s) for s in os.environ.get("BENCH_NM_SEEDS", ",".join(map(str, SEEDS))).split(",")]
TASK_METHODS = os.environ.get("BENCH_TASK_METHODS", ",".join(METHODS)).split(",")  # accuracies for these (first seed)
RENDER_ONLY = os.environ.get("BENCH_RENDER_ONLY") == "1"  # table from the rows already measured
FAILED: list[str] = []  # rows whose run failed in this invocation
ITEMS_BACKFILL = os.environ.get("BENCH_ITEMS_BACKFILL") == "1"  # cached rows scored before per-item outcomes were kept: score again
PPL_WINDOWS = int(os.environ.get("BENCH_PPL_WINDOWS", 32))
PPL_SOURCES = os.environ.get("BENCH_PPL_SOURCES", "shakespeare:test,lambada").split(",")  # in-domain, out-of-domain
PPL_SEQLEN = int(os.environ.get("BENCH_PPL_SEQLEN", 512))
TASKS = os.environ.get("BENCH_TASKS", "piqa,arc_easy,winogrande")
LIMIT = int(os.environ.get("BENCH_LIMIT", 300)) or None  # 0: every item of the eval part
DATA = os.environ.get("BENCH_DATA", "shakespeare:train")
EVAL_DATA = os.environ.get("BENCH_EVAL_DATA", "shakespeare:valid")
OOD_DATA = os.environ.get("BENCH_OOD_DATA", "commonsense:valid")
DAMAGE_WINDOWS = int(os.environ.get("BENCH_DAMAGE_WINDOWS", 4))
SEQLEN = int(os.environ.get("BENCH_SEQLEN", 256))
# Per-method options chosen on shakespeare:valid (never on evaluation text); see the README.
SETTINGS: dict[str, dict] = json.loads(os.environ.get("BENCH_SETTINGS", "{}"))
DENSE_REF = os.environ.get("BENCH_DENSE_REF", "1") == "1"
# Runs side by side; with JOBS > 1 each run gets cores // JOBS threads (s/step is then per run
# while the others run: compare rows of one benchmark, not across machines).
JOBS = int(os.environ.get("BENCH_JOBS", 1))
NAME = os.environ.get("BENCH_NAME", "repair")  # results/NAME.md and results/NAME.json
# a repair run writes a checkpoint every N steps (0: never), so a run interrupted (a session's end) continues from it
CHECKPOINT_EVERY = int(os.environ.get("BENCH_CHECKPOINT_EVERY", 10))


def _pruned(pattern: str) -> Path:
    from seftc.prune.api import prune

    out = WORK / f"pruned-{pattern.replace(':', 'of')}"
    if not (out / "seftc_manifest.json").is_file():
        kw = {"pattern": pattern} if ":" in pattern else {"sparsity": float(pattern)}
        prune(MODEL, method="wanda", calib=CALIB, output=out, force=True, **kw)
    return out


def _dense_as_pruned() -> Path:
    from seftc.prune.api import prune

    out = WORK / "dense-0"
    if not (out / "seftc_manifest.json").is_file():
        prune(MODEL, method="magnitude", sparsity=0.0, output=out, force=True)
    return out


def evaluate(folder: str, tasks: bool = True) -> dict:
    import torch
    from safetensors import safe_open

    from seftc.eval.perplexity import perplexity
    from seftc.models.loading import load_model
    from seftc.models.manifest import Manifest

    loaded = load_model(folder)
    row = {}
    for key, source in zip(("ppl_in", "ppl_out"), PPL_SOURCES):
        row[key] = perplexity(loaded.model, loaded.tokenizer, source, seqlen=PPL_SEQLEN, limit=PPL_WINDOWS).ppl
    if tasks and TASKS:
        row["tasks"] = _task_scores(loaded)
    manifest = Manifest.load(Path(folder))
    if manifest is not None:
        names = {r.name + ".weight" for r in manifest.layers}
        total = nz = 0
        for f in Path(folder).glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                for k in st.keys():
                    if k in names:
                        t = st.get_tensor(k)
                        total += t.numel()
                        nz += int(torch.count_nonzero(t))
        row["sparsity"] = 1 - nz / total
    return row


def _task_scores(loaded) -> dict:
    """Accuracy of each of TASKS with its standard error, and which items it got right ("0"/"1" per item, in eval
    order) for paired comparisons of two rows."""
    from seftc.eval.multiple_choice import evaluate_tasks

    res = evaluate_tasks(loaded.model, loaded.tokenizer, TASKS.split(","), limit=LIMIT)
    return {k: {"acc": v.acc, "stderr": v.acc_stderr, "n": v.n, "correct": "".join("01"[c] for c in v.correct)} for k, v in res.items()}


def _backfill_items(row: dict, args: list[str], cached: Path) -> dict:
    """BENCH_ITEMS_BACKFILL=1: a cached row scored before rows kept their per-item outcomes gets them by scoring its
    saved model again; the accuracies must come out as cached (the evaluation is deterministic), else it stops."""
    folder = args[1] if args[0] == "--eval" else args[4]  # a model spec (the dense model) or a saved folder
    if args[0] == "--worker" and not (Path(folder) / "config.json").is_file():
        print(f"[bench-repair] {cached.stem}: {folder} is gone, per-item outcomes not backfilled", file=sys.stderr, flush=True)
        return row
    scores = _child(["--tasks", folder], cached.stem, f"{cached.stem}: scoring {folder} again")
    if scores is None:
        return row
    if {k: v["acc"] for k, v in scores.items()} != {k: v["acc"] for k, v in row["tasks"].items()}:
        raise SystemExit(f"bench-repair: {folder} scored again gives other accuracies than {cached} keeps; the row is left as it was")
    row = {**row, "tasks": {k: {**v, "correct": scores[k]["correct"]} for k, v in row["tasks"].items()}}
    _write_row(cached, row)
    return row


def _write_row(cached: Path, row: dict) -> None:
    from seftc.models.saving import atomic_file

    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(cached) as tmp:
        tmp.write_text(json.dumps(row))


def _child(args: list[str], key: str, what: str) -> dict | None:
    """This script on `args` in its own process (cores/JOBS threads); its last stdout line as JSON. A failure is
    said at once with its stderr's tail, recorded under `key` in FAILED, and gives None (the others go on)."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // JOBS))} if JOBS > 1 else {})}
    run = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    if run.returncode != 0:
        tail = "\n".join(run.stderr.strip().splitlines()[-8:])
        print(f"[bench-repair] {what} failed (exit {run.returncode}):\n{tail}", file=sys.stderr, flush=True)
        FAILED.append(key)
        return None
    return json.loads(run.stdout.strip().splitlines()[-1])


def _repair_options(method: str, seed: int) -> dict:
    """The repair options of one run (`method`: a method or NAME@variant)."""
    damage = {"damage_windows": DAMAGE_WINDOWS, "eval_data": EVAL_DATA, "ood_data": OOD_DATA} if DAMAGE_WINDOWS else {}
    return {"method": method.split("@")[0], "seed": seed, "steps": STEPS, "data": DATA, "seqlen": SEQLEN, "eval_every": 0, **damage,
            **SETTINGS.get(method, {})}


def _train(src: str, method: str, seed: int, out: str) -> dict:
    """Repair `src` into `out` (resuming from OUT.checkpoint when an interrupted run of the same options and
    code left one there) and the row's training part."""
    from seftc.errors import SeftcError
    from seftc.repair import checkpoint
    from seftc.repair.api import repair

    options = _repair_options(method, seed)
    ckpt = checkpoint.default_dir(Path(out))
    resumed_from = None
    latest = checkpoint.latest_step(ckpt) if CHECKPOINT_EVERY and ckpt.is_dir() else None
    if latest is not None:
        try:
            resumed_from = json.loads((latest / "meta.json").read_text())["step"]
            result = repair(src, output=out, force=True, allow_dense=True, resume=True, checkpoint_every=CHECKPOINT_EVERY, **options)
        except (SeftcError, OSError, KeyError, ValueError) as e:  # another run's checkpoint (options, input or code): start again
            print(f"[bench-repair] {out}: not resumed ({e}); training from step 0", file=sys.stderr, flush=True)
            latest = resumed_from = None
    if latest is None:
        result = repair(src, output=out, force=True, allow_dense=True, checkpoint_every=CHECKPOINT_EVERY, **options)
    cfg = result.manifest.config
    stats = result.manifest.layer_stats or {}
    return {"method": method, "seed": seed, "options": SETTINGS.get(method, {}), "lr": cfg["learning_rate"],
            "s_per_step": cfg["s_per_step"], "peak_rss_mib": cfg["peak_rss_mib"], "trainable": cfg.get("trainable_params"),
            "regrown": sum(v.get("regrown", 0) for v in stats.values()),
            "positions_moved": sum(v.get("positions_left", 0) for v in stats.values()),
            "rows_emptied": sum(v.get("rows_emptied", 0) for v in stats.values()),
            "update_damage": result.history.get("update_damage", []),
            **({"resumed_from_step": resumed_from} if resumed_from is not None else {})}


def worker(src: str, method: str, seed: int, out: str) -> dict:
    """One repair run and its evaluation. The training part of the row is kept beside OUT once OUT is written
    (OUT.trained.json, with the options and the repair code it ran with), so an evaluation that is interrupted
    is redone without training again; an interrupted training continues from its last checkpoint
    (every BENCH_CHECKPOINT_EVERY steps): both bit-identical to an uninterrupted run, and only s/step and peak
    RSS are then of the resumed process (the row says `resumed_from_step`)."""
    from seftc.models.saving import atomic_file
    from seftc.repair import checkpoint
    from seftc.repair.config import make_repair_config

    trained = Path(out).with_name(Path(out).name + ".trained.json")
    ident = {"config": make_repair_config(**_repair_options(method, seed)).model_dump(), "code": checkpoint.code_version(),
             "src": str(Path(src).resolve())}
    ident = json.loads(json.dumps(ident))
    kept = json.loads(trained.read_text()) if trained.is_file() else None
    if kept is not None and kept.get("identity") == ident and (Path(out) / "seftc_manifest.json").is_file():
        row = kept["row"]
        print(f"[bench-repair] {out}: trained already ({trained.name}); evaluating", file=sys.stderr, flush=True)
    else:
        trained.unlink(missing_ok=True)
        row = _train(src, method, seed, out)
        with atomic_file(trained) as tmp:
            tmp.write_text(json.dumps({"identity": ident, "row": row}))
    row = {**row, **evaluate(out, tasks=seed == SEEDS[0] and method in TASK_METHODS and "dense-0" not in src)}
    return row


def _relevant(inputs: dict) -> dict:
    """`inputs` without the resolved configuration's fields that its method never reads: a field is declared for
    one family by its description ("SEFT: ...", "static: ...", "LoRA baselines: ..."), so a changed SEFT default does
    not turn static's or LoRA's rows stale."""
    from seftc.repair.config import RepairConfig

    config = inputs.get("config")
    if not isinstance(config, dict):
        return inputs
    method = str(config.get("method", ""))
    family = "SEFT:" if method.startswith("seft") else "static:" if method == "static" else "LoRA baselines:"
    foreign = {name for name, f in RepairConfig.model_fields.items()
               if (f.description or "").startswith(("SEFT:", "static:", "LoRA baselines:")) and not (f.description or "").startswith(family)}
    return {**inputs, "config": {k: v for k, v in config.items() if k not in foreign}}


def _inputs(key: str, args: list[str]) -> dict:
    """What one row's measurement depends on besides the code; kept in its cached file and compared on reuse."""
    from seftc.device import resolve_device

    inputs = {"key": key, "model": MODEL, "calib": CALIB, "ppl": [PPL_SOURCES, PPL_WINDOWS, PPL_SEQLEN], "tasks": [TASKS, LIMIT],
              "device": resolve_device(None)}  # where the worker computes (CUDA when there is one): rows of two devices never mix
    if args[0] == "--worker":
        from seftc.repair.config import make_repair_config

        method, seed = args[2], int(args[3])
        # the whole resolved configuration, so a change of a default is seen too
        inputs.update(options=SETTINGS.get(method, {}), config=make_repair_config(**_repair_options(method, seed)).model_dump())
    return json.loads(json.dumps(inputs))  # as read back from the file (lists, not tuples)


def _spawn(args: list[str], key: str) -> dict:
    """Run one measurement in its own process; its row is kept in WORK/rows/KEY.json with the inputs it was
    measured with, so an interrupted benchmark resumes where it stopped, across sessions (delete the file to rerun
    that row). A cached row measured with other inputs stops the benchmark rather than be shown as this one."""
    cached = WORK / "rows" / f"{key}.json"
    inputs = _inputs(key, args)
    if cached.is_file():
        row = json.loads(cached.read_text())
        if "inputs" not in row:  # rows written before the inputs were kept: their settings are unknown
            if os.environ.get("BENCH_LEGACY_ROWS") != "1":
                raise SystemExit(f"bench-repair: {cached} does not record what it was measured with; delete it to measure again, "
                                 "or set BENCH_LEGACY_ROWS=1 to show it as measured")
            print(f"[bench-repair] {key}: cached row without its inputs, shown as measured (BENCH_LEGACY_ROWS=1)",
                  file=sys.stderr, flush=True)
        elif "device" not in row["inputs"]:  # rows kept before their device and resolved configuration (all on the CPU)
            if inputs["device"] != "cpu":
                raise SystemExit(f"bench-repair: {cached} was measured on the CPU (before rows kept their device); this run computes on "
                                 f"{inputs['device']}: set another BENCH_DIR")
            earlier = {k: v for k, v in inputs.items() if k not in ("config", "device")}
            if "config" in inputs:  # a repair run: what those rows kept instead of the resolved configuration
                earlier.update(steps=STEPS, data=DATA, seqlen=SEQLEN, damage=[DAMAGE_WINDOWS, EVAL_DATA, OOD_DATA] if DAMAGE_WINDOWS else None)
            if row["inputs"] != earlier:
                raise SystemExit(f"bench-repair: {cached} was measured with other inputs; delete it to measure again")
            print(f"[bench-repair] {key}: cached row without its device and resolved configuration, reused on what it kept",
                  file=sys.stderr, flush=True)
        elif _relevant(row["inputs"]) != _relevant(inputs):
            diff = sorted(k for k in inputs.keys() | row["inputs"].keys() if inputs.get(k) != row["inputs"].get(k))
            raise SystemExit(f"bench-repair: {cached} was measured with other {', '.join(diff)}; delete it to measure again "
                             "or set another BENCH_DIR")
        if ITEMS_BACKFILL and not RENDER_ONLY and any("correct" not in t for t in row.get("tasks", {}).values()):
            row = _backfill_items(row, args, cached)
        return row
    if RENDER_ONLY:
        return {}
    measured = _child(args, key, key)  # a failed run with checkpoints continues from them next time
    if measured is None:
        return {}
    row = {**measured, "inputs": inputs}
    _write_row(cached, row)
    print(f"[bench-repair] {key} {json.dumps(row)}", file=sys.stderr, flush=True)
    return row


def _seed_rows() -> int:
    """Rows of the committed RESULTS/NAME.json (and of each RESULTS/N.json for N in BENCH_SEED_NAMES: another
    benchmark's rows in the same BENCH_DIR) that WORK/rows lacks (a fresh clone, a cleaned runs/) are written there
    as they were measured; `_spawn` then checks their inputs like any cached row's. Returns how many."""
    seeded = 0
    for name in dict.fromkeys(filter(None, [NAME, *os.environ.get("BENCH_SEED_NAMES", "").split(",")])):
        committed = RESULTS / f"{name}.json"
        if not committed.is_file():
            continue
        results = json.loads(committed.read_text())
        found = [results.get("dense"), results.get("dense_trained")]
        for block in results.get("patterns", {}).values():
            found += [block.get("pruned"), *block.get("rows", [])]
        here = 0
        for row in found:
            key = (row or {}).get("inputs", {}).get("key")
            if key and not (WORK / "rows" / f"{key}.json").is_file():
                _write_row(WORK / "rows" / f"{key}.json", row)
                here += 1
        if here:
            print(f"[bench-repair] {here} row(s) taken from {committed} (not in {WORK / 'rows'})", file=sys.stderr, flush=True)
        seeded += here
    return seeded


def _write(results: dict) -> str:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(results, indent=2) + "\n")
    text = render(results)
    (RESULTS / f"{NAME}.md").write_text(text)
    return text


def main() -> None:
    from concurrent.futures import ThreadPoolExecutor

    WORK.mkdir(parents=True, exist_ok=True)
    _seed_rows()
    results: dict = {"protocol": __doc__, "steps": STEPS, "data": DATA, "settings": SETTINGS, "jobs": JOBS, "patterns": {},
                     "ppl_sources": PPL_SOURCES, "seqlen": SEQLEN}
    sources = {pattern: _pruned(pattern) for pattern in PATTERNS}  # one-shot pruning first, all cores
    jobs: list[tuple[str, list[str]]] = [("dense", ["--eval", MODEL])]
    if DENSE_REF:
        jobs.append((f"dense-trained-s{SEEDS[0]}", ["--worker", str(_dense_as_pruned()), "static", str(SEEDS[0]), str(WORK / "dense-trained")]))
    for pattern, src in sources.items():
        jobs.append((src.name, ["--eval", str(src)]))
        seeds = NM_SEEDS if ":" in pattern else SEEDS
        for method in NM_METHODS if ":" in pattern else METHODS:
            for seed in seeds if method.split("@")[0] in ("seft", "static", "seft-noregrow") else seeds[:1]:
                name = f"{src.name}-{method}-s{seed}"
                jobs.append((name, ["--worker", str(src), method, str(seed), str(WORK / name)]))
    with ThreadPoolExecutor(max_workers=JOBS) as pool:
        rows = dict(zip([k for k, _ in jobs], pool.map(lambda job: _spawn(job[1], job[0]), jobs)))
    rows = {k: v for k, v in rows.items() if v}  # BENCH_RENDER_ONLY or a failed run: what was measured
    if "dense" not in rows:
        raise SystemExit("bench-repair: the dense model has no row" + (f" ({FAILED[0]} failed, above)" if FAILED else ""))
    results["dense"] = rows["dense"]
    if f"dense-trained-s{SEEDS[0]}" in rows:
        results["dense_trained"] = rows[f"dense-trained-s{SEEDS[0]}"]
    for pattern, src in sources.items():
        if src.name in rows:
            results["patterns"][pattern] = {"pruned": rows[src.name],
                                            "rows": [rows[k] for k, _ in jobs if k.startswith(src.name + "-") and k in rows]}
    print(_write(results))
    if FAILED:
        raise SystemExit(f"bench-repair: {len(FAILED)} run(s) failed: {', '.join(FAILED)} (their errors above); the table shows the rest")


def _gap(pruned: dict, dense: dict, row: dict, key: str) -> float:
    """Share of the dense-to-pruned perplexity gap closed (1 = back to dense)."""
    return (pruned[key] - row[key]) / (pruned[key] - dense[key])


def mean_accuracy(tasks: dict) -> tuple[float, float]:
    """Mean accuracy over tasks and its pooled standard error sqrt(Σ se²) / n (tasks independent)."""
    n = len(tasks)
    return sum(t["acc"] for t in tasks.values()) / n, sum(t["stderr"] ** 2 for t in tasks.values()) ** 0.5 / n


def paired_difference(a: dict, b: dict) -> tuple[float, float] | None:
    """Mean over the tasks of acc(a) − acc(b), both scored on the same items, and its standard error from the
    per-item differences (sd/√n per task, pooled over the tasks as in mean_accuracy). Far tighter than the two
    unpaired errors when the models mostly agree. None unless both rows kept every task's per-item outcomes."""
    if not a or set(a) != set(b):
        return None
    diffs, var = [], 0.0
    for task, ta in a.items():
        ca, cb = ta.get("correct"), (b.get(task) or {}).get("correct")
        if not ca or not cb or len(ca) != len(cb):
            return None
        d = [int(x) - int(y) for x, y in zip(ca, cb)]
        m = sum(d) / len(d)
        diffs.append(m)
        var += (sum((x - m) ** 2 for x in d) / (len(d) - 1) if len(d) > 1 else 0.0) / len(d)
    return sum(diffs) / len(diffs), var**0.5 / len(diffs)


def render(results: dict) -> str:
    import statistics

    dense = results["dense"]
    tasks = list(dense.get("tasks", {}))
    ppl_in, ppl_out = results.get("ppl_sources", ["shakespeare:test", "lambada"])
    mean_col = len(tasks) > 1
    columns = (["pattern", "method", "seed", "lr", "trainable", f"ppl {ppl_in}", "gap closed", f"ppl {ppl_out}", "gap closed", *tasks]
               + ["mean acc"] * mean_col + ["sparsity (saved)", "regrown", "damage in / out per update", "s/step", "peak RSS MiB"])
    lines = [f"## Repair ({results['steps']} steps × 4 × {results.get('seqlen', 256)} tokens of {results.get('data', 'shakespeare:train')}; "
             f"results/{NAME}.md)", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]

    def acc(row):
        if "tasks" not in row:
            return ["—" for _ in tasks] + ["—"] * mean_col
        cells = [f"{row['tasks'][t]['acc']:.3f} ± {row['tasks'][t]['stderr']:.3f}" for t in tasks]
        if mean_col:
            mean, pooled = mean_accuracy(row["tasks"])
            cells.append(f"{mean:.3f} ± {pooled:.3f}")
        return cells

    def damage(row):
        d = row.get("update_damage") or []
        if not d:
            return "—"
        rise = lambda k: statistics.mean(x[f"{k}_after"] - x[f"{k}_before"] for x in d) if f"{k}_before" in d[0] else float("nan")  # noqa: E731
        return f"{rise('in'):+.4f} / {rise('out'):+.4f}"

    def line(pattern, name, seed, row, pruned=None):
        gap = lambda k: "—" if pruned is None else f"{_gap(pruned, dense, row, k):.1%}"
        lr = f"{row['lr']:.0e}" if "lr" in row else "—"
        trainable = f"{row['trainable'] / 1e6:.2f} M" if row.get("trainable") else "—"
        regrown = str(row["regrown"]) if row.get("method", "").startswith("seft") else "—"
        cells = [pattern, name, seed, lr, trainable, f"{row['ppl_in']:.2f}", gap("ppl_in"), f"{row['ppl_out']:.2f}", gap("ppl_out"),
                 *acc(row), f"{row.get('sparsity', 0):.4f}", regrown, damage(row),
                 *((f"{row['s_per_step']:.2f}", f"{row['peak_rss_mib']:.0f}") if "s_per_step" in row else ("—", "—"))]
        return "| " + " | ".join(map(str, cells)) + " |"

    lines.append(line("—", "dense", "—", dense))
    if "dense_trained" in results:
        lines.append(line("—", "dense+train (reference)", results["dense_trained"]["seed"], results["dense_trained"]))
    summary = []
    for pattern, block in results["patterns"].items():
        lines.append(line(pattern, "pruned (no repair)", "—", block["pruned"]))
        for row in block["rows"]:
            lines.append(line(pattern, row["method"], row["seed"], row, block["pruned"]))
        for method in dict.fromkeys(r["method"] for r in block["rows"]):
            rows = [r for r in block["rows"] if r["method"] == method]
            if len(rows) > 1:
                cells = []
                for key in ("ppl_in", "ppl_out"):
                    vals = [r[key] for r in rows]
                    gaps = [_gap(block["pruned"], dense, r, key) for r in rows]
                    cells.append(f"{statistics.mean(vals):.2f} (min {min(vals):.2f}, max {max(vals):.2f}; gap {statistics.mean(gaps):.1%})")
                summary.append(f"| {pattern} | {method} | {len(rows)} | " + " | ".join(cells) + " |")
    paired = []
    for pattern, block in results["patterns"].items():
        scored = [r for r in block["rows"] if r.get("tasks")]
        for i, a in enumerate(scored):
            for b in scored[i + 1:]:
                pd = paired_difference(a["tasks"], b["tasks"])
                if pd is not None:
                    paired.append(f"| {pattern} | {a['method']} (s{a['seed']}) − {b['method']} (s{b['seed']}) | {pd[0] * 100:+.2f} "
                                  f"| {pd[1] * 100:.2f} | {pd[0] / pd[1] if pd[1] else float('nan'):+.1f} |")
    if paired:
        lines += ["", "Paired differences of the mean accuracy (both rows scored on the same items; standard error from the "
                  "per-item differences, pooled over the tasks):", "", "| pattern | rows | difference (points) | ± (points) | z |",
                  "|---|---|---|---|---|", *paired]
    if summary:
        lines += ["", "Across seeds (mean, spread):", "", "| pattern | method | seeds | ppl in-domain | ppl out-of-domain |",
                  "|---|---|---|---|---|", *summary]
    if results.get("jobs", 1) > 1:
        lines += ["", f"{results['jobs']} runs side by side, each on cores/{results['jobs']} threads: s/step is per run while the others ran."]
    settings = results.get("settings") or {}
    lines += ["", "Options beyond each method's defaults: " + (json.dumps(settings) if settings else "none")]
    return "\n".join(lines) + "\n\n" + results["protocol"].strip() + "\n"


if __name__ == "__main__":
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if len(sys.argv) == 3 and sys.argv[1] == "--eval":
        print(json.dumps(evaluate(sys.argv[2])))
    elif len(sys.argv) == 3 and sys.argv[1] == "--tasks":
        from seftc.models.loading import load_model

        print(json.dumps(_task_scores(load_model(sys.argv[2]))))
    elif len(sys.argv) == 6 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])))
    else:
        main()
