"""`make bench-repair-curve`: repair quality against repair memory, SEFT at several densities ρ
against LoRA and masked LoRA at several ranks, static masked fine-tuning as the ceiling (issue 16).

Protocol (written into results/repair-curve.md and .json, the plot into results/repair-curve.png):
- quality: each point is one `make bench-repair-140` run (bench/bench_repair.py with that target's
  settings: SmolLM2-135M, Wanda 70%, 140 steps × 4 × 256 tokens of shakespeare:train, seed 0,
  perplexity on shakespeare:test in-domain and LAMBADA out-of-domain); its rows are cached in the
  same folder, so the SEFT (ρ 0.1), masked LoRA (rank 8) and static points are that benchmark's own seed-0 rows;
  every point keeps its method's options of that target and changes only ρ or the rank (and a rank's learning
  rate where validation chose another for it: BENCH_RANK_LR, the point then named by it);
- memory: the same method and options, 2 steps × 1 × 256 tokens on the random-weight 1.1 B
  LLaMA shape (bench/bench_scale.py's, bf16) pruned by Wanda to the same 70%, each run in its own
  process: that process's peak RSS, the x axis (and, beside it, the manifest's peak before the
  save: load and training); SEFT updates its topology after the first step, so its candidates and
  window statistics are held as in every window of a quality run; `plan`'s projection to the
  LLaMA-2-7B shape in the last memory column;
- a point is on the Pareto front of a text when no other point has both less or equal peak
  memory and lower or equal perplexity on it (one of them strictly); "front (7B plan)" is the same
  with the LLaMA-2-7B projection as the memory (there the optimizer state, which SEFT slims, is
  most of the total; at 1.1 B the process's base load is);
- each measured row is cached (quality: BENCH_DIR/rows, memory: BENCH_SCALE_DIR/rows.json) with
  the inputs it was measured with, so the curve can be completed over several sittings; rows kept in the committed
  results (results/repair-140.json, repair-curve-runs.json, repair-curve.json) are taken from there when the cache
  lacks them (a fresh clone), so only what was never measured is measured;
  BENCH_ONLY_CACHED=1 draws what is measured and lists what is missing; BENCH_QUALITY_CACHED=1 measures
  the memory rows only (they can run beside the quality runs: peak RSS does not depend on the load).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

DENSITIES = [float(x) for x in os.environ.get("BENCH_DENSITIES", "0.005,0.02,0.05,0.1").split(",")]
RANKS = [int(x) for x in os.environ.get("BENCH_RANKS", "8,16,64").split(",")]
LORAS = os.environ.get("BENCH_LORAS", "masked-lora,lora-merge").split(",")
# a rank's own learning rate where validation chose one other than the method's (`make bench-repair-curve` sets it from
# results/repair-val40-lora-rank.md): {"masked-lora": {"16": 0.005}}; the point is then named METHOD@rRlrLR
RANK_LR: dict[str, dict[str, float]] = json.loads(os.environ.get("BENCH_RANK_LR") or "{}")
# 2 steps hold no SEFT statistics window at the quality runs' interval: the memory runs update the topology after step 1
# (a 1-step window), so the candidates and the window statistics every window of a quality run holds are in the peak
MEMORY_OVERRIDES = {"seft": {"update_interval": 1, "accumulation": 1}}
SHAPE = os.environ.get("BENCH_SHAPE", "1.1b")
ONLY_CACHED = os.environ.get("BENCH_ONLY_CACHED") == "1"
QUALITY_CACHED = ONLY_CACHED or os.environ.get("BENCH_QUALITY_CACHED") == "1"  # measure memory only (quality: cached rows)


def make_env(target: str = "bench-repair-140") -> dict[str, str]:
    """The BENCH_* assignments `make TARGET` runs bench_repair.py with."""
    out = subprocess.run(["make", "-n", "--always-make", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.replace("\\\n", " ").splitlines() if "bench/bench_repair.py" in x)
    env = {}
    for word in shlex.split(line):
        if "=" not in word or not word.startswith("BENCH_"):
            break
        key, value = word.split("=", 1)
        env[key] = value
    return env


def points(settings: dict) -> list[dict]:
    """Each point: its label, the bench_repair method name (NAME@variant), the method, and its options."""
    from seftc.repair.config import RepairConfig

    out = []
    seft = settings.get("seft", {})
    default_rank = RepairConfig.model_fields["lora_r"].default
    for rho in DENSITIES:
        name = "seft" if rho == seft.get("density") else f"seft@rho{rho:g}"
        out.append({"label": f"seft ρ={rho:g}", "name": name, "method": "seft", "options": {**seft, "density": rho}})
    for method in LORAS:
        for r in RANKS:
            base = settings.get(method, {})
            name = method if r == base.get("lora_r", default_rank) else f"{method}@r{r}"
            label, options = f"{method} r={r}", {**base, "lora_r": r}
            lr = RANK_LR.get(method, {}).get(str(r))
            if lr is not None and lr != base.get("lr"):
                tag = f"{lr:.0e}".replace("e-0", "e-")
                name, label, options = f"{method}@r{r}lr{tag}", f"{label} lr={tag}", {**options, "lr": lr}
            out.append({"label": label, "name": name, "method": method, "options": options})
    out.append({"label": "static", "name": "static", "method": "static", "options": settings.get("static", {})})
    return out


def bench_settings(pts: list[dict], target: dict) -> dict:
    """BENCH_SETTINGS of the quality runs. A point named as its method is the target's own row: the target's options
    exactly (a rank left at its default is not written there), so its cached row is reused, not refused as measured
    with other options."""
    return {p["name"]: target.get(p["name"], {}) if p["name"] == p["method"] else p["options"] for p in pts}


def quality(env: dict, pts: list[dict]) -> dict:
    """bench_repair.py on the points (rows cached in its BENCH_DIR); the rows by point name."""
    settings = bench_settings(pts, json.loads(env["BENCH_SETTINGS"]))
    name = os.environ.get("BENCH_QUALITY_NAME", "repair-curve-runs")
    run = {**os.environ, **env, "BENCH_METHODS": ",".join(p["name"] for p in pts), "BENCH_PATTERNS": env["BENCH_PATTERNS"].split(",")[0],
           "BENCH_SEEDS": env["BENCH_SEEDS"].split(",")[0], "BENCH_SETTINGS": json.dumps(settings), "BENCH_NAME": name,
           "BENCH_TASK_METHODS": os.environ.get("BENCH_TASK_METHODS", "seft,static"), "PYTHONPATH": str(ROOT),
           "BENCH_SEED_NAMES": f"{env['BENCH_NAME']},{name}",  # the target's committed rows too (its own points)
           **({"BENCH_RENDER_ONLY": "1"} if QUALITY_CACHED else {})}
    for key in ("BENCH_DIR", "BENCH_MODEL", "BENCH_STEPS", "BENCH_SEQLEN", "BENCH_CALIB", "BENCH_CALIB_N", "BENCH_CALIB_SEQLEN",
                "BENCH_PPL_WINDOWS", "BENCH_PPL_SEQLEN", "BENCH_LIMIT", "BENCH_TASKS", "BENCH_DAMAGE_WINDOWS", "BENCH_RESULTS_DIR",
                "BENCH_JOBS"):  # test and partial-run overrides of the target's settings
        if key in os.environ:
            run[key] = os.environ[key]
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench_repair.py")], cwd=ROOT, env=run, check=True)
    results_dir = Path(run.get("BENCH_RESULTS_DIR", ROOT / "results"))
    results = json.loads((results_dir / f"{name}.json").read_text())
    block = next(iter(results["patterns"].values()), {"rows": [], "pruned": None})
    return {"dense": results.get("dense"), "pruned": block["pruned"], "rows": {r["method"]: r for r in block["rows"]},
            "sources": results["ppl_sources"]}


def cli_options(options: dict) -> list[str]:
    """A repair options dict as `seftc repair` flags."""
    return [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def memory_key(p: dict, sparsity: float) -> dict:
    """What one point's memory row depends on besides the code (its key in the row cache)."""
    import bench_scale as scale

    return {"shape": SHAPE, "command": "repair-curve", "method": p["method"], "options": p["options"], "sparsity": sparsity,
            "overrides": MEMORY_OVERRIDES.get(p["method"], {}), "steps": scale.REPAIR_STEPS, "batch_per_rank": scale.REPAIR_BATCH,
            "repair_seqlen": scale.REPAIR_SEQLEN, "data": os.environ.get("BENCH_REPAIR_DATA", scale.REPAIR_DATA)}


def seed_memory_rows(cache, committed: Path, sparsity: float) -> int:
    """Memory rows of the committed results (a fresh clone, a cleaned runs/) that the row cache lacks, as they were
    measured: a point's kept key, or for a file written before keys were kept, its key under the present settings
    (the settings those rows were measured with; their commits are in the file). Returns how many."""
    if not committed.is_file():
        return 0
    results = json.loads(committed.read_text())
    if results.get("shape") != SHAPE or results.get("sparsity") != sparsity:
        return 0
    seeded = 0
    for p in results.get("points", []):
        if "peak_gib" not in p:
            continue
        key = p.get("memory_key") or memory_key(p, sparsity)
        k = json.dumps(key, sort_keys=True)
        if k not in cache.rows:
            cache.rows[k] = {**key, "peak_rss": p["peak_gib"] * 2**30, "commit": p.get("memory_commit"),
                             **({"train_peak": p["train_peak_gib"] * 2**30} if "train_peak_gib" in p else {}),
                             "seeded_from": str(committed.relative_to(ROOT) if committed.is_relative_to(ROOT) else committed)}
            seeded += 1
    if seeded:
        print(f"[bench-repair-curve] {seeded} memory row(s) taken from {committed}", file=sys.stderr, flush=True)
    return seeded


def memory(pts: list[dict], sparsity: float) -> dict:
    """Peak RSS of 2 steps of each point on the SHAPE model pruned to `sparsity` (cached rows)."""
    import bench_scale as scale

    work = Path(os.environ.get("BENCH_SCALE_DIR", ROOT / "runs" / "bench-scale"))
    work.mkdir(parents=True, exist_ok=True)
    cache = scale.RowCache(work / "rows.json", False, ONLY_CACHED)
    seed_memory_rows(cache, Path(os.environ.get("BENCH_RESULTS_DIR", ROOT / "results")) / "repair-curve.json", sparsity)
    model, pruned = work / f"model-{SHAPE}", work / f"pruned-{SHAPE}-wanda{sparsity:g}"
    data = os.environ.get("BENCH_REPAIR_DATA", scale.REPAIR_DATA)
    out = {}
    for p in pts:
        def measure(p=p):
            if not (model / "config.json").is_file():
                scale.write_random_model(model, SHAPE, "2GB")
            if not (pruned / "seftc_manifest.json").is_file():
                scale.measured(["prune", str(model), "--method", "wanda", "--sparsity", str(sparsity), "--calib",
                                os.environ.get("BENCH_CALIB", scale.CALIB), "--nsamples", str(scale.NSAMPLES), "--seqlen",
                                str(scale.SEQLEN), "-o", str(pruned), "--force", "--device", "cpu"])
            target = work / f"repaired-{SHAPE}-curve"
            run = scale.measured(["repair", str(pruned), "-o", str(target), "--force", "--method", p["method"],
                                  *cli_options({**p["options"], **MEMORY_OVERRIDES.get(p["method"], {})}),
                                  "--steps", str(scale.REPAIR_STEPS), "--warmup", "1", "--batch-size", str(scale.REPAIR_BATCH),
                                  "--seqlen", str(scale.REPAIR_SEQLEN), "--eval-every", "0", "--data", data, "--eval-data", data,
                                  "--device", "cpu", "--damage-windows", "0", "--json"])
            shutil.rmtree(target, ignore_errors=True)
            train_peak = json.loads(run["stdout"])["config"]["peak_rss_mib"] * 2**20  # the manifest's: load + training, before the save
            return {**{k: v for k, v in run.items() if k != "stdout"}, "train_peak": train_peak}

        key = memory_key(p, sparsity)
        row = cache.get(key, measure)
        if row:
            out[p["name"]] = {**row, "key": key}
    return out


def projection(p: dict, sparsity: float) -> int:
    """`plan`'s repair estimate of the point at the LLaMA-2-7B shape (bf16 base, batch 1 × 256)."""
    import bench_scale as scale
    from seftc.plan import plan_repair, shape_of

    o = p["options"]
    return plan_repair(shape_of(scale.llama_model("7b")), p["method"], batch_size=1, seqlen=256, sparsity=sparsity,
                       density=o.get("density"), lora_r=o.get("lora_r", 8), evict_score=o.get("evict_score"),
                       grow_candidates=o.get("grow_candidates")).total


def pareto(values: dict[str, tuple[float, float]]) -> set[str]:
    """Names whose (memory, ppl) no other point dominates (≤ on both, < on one)."""
    front = set()
    for name, (m, q) in values.items():
        if not any((m2 <= m and q2 <= q) and (m2 < m or q2 < q) for other, (m2, q2) in values.items() if other != name):
            front.add(name)
    return front


def plot(table: list[dict], sources: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = {"seft": "#c44e52", "masked-lora": "#4c72b0", "lora-merge": "#55a868", "static": "#000000"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, source in zip(axes, ("ppl_in", "ppl_out"), sources):
        for method, color in colors.items():
            pts = sorted((r["peak_gib"], r[key], r["label"]) for r in table if r["method"] == method and r.get(key) and r.get("peak_gib"))
            if pts:
                ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], "o-", color=color, label=method)
                for x, y, label in pts:
                    ax.annotate(label.split(" ", 1)[-1], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"peak RSS of 2 repair steps at the {SHAPE} shape (GiB)")
        ax.set_ylabel(f"perplexity, {source} (lower is better)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # plain numbers, not 6.8×10¹
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    env = make_env()
    settings = json.loads(env["BENCH_SETTINGS"])
    pts = points(settings)
    pattern = env["BENCH_PATTERNS"].split(",")[0]
    sparsity = float(os.environ.get("BENCH_SPARSITY", pattern))
    q = quality(env, pts)
    mem = memory(pts, sparsity)
    table = []
    for p in pts:
        row = {"label": p["label"], "name": p["name"], "method": p["method"], "options": p["options"],
               "plan_7b": projection(p, sparsity)}
        if p["name"] in q["rows"]:
            r = q["rows"][p["name"]]
            row.update(ppl_in=r["ppl_in"], ppl_out=r["ppl_out"], trainable=r.get("trainable"))
        if p["name"] in mem:
            row.update(peak_gib=mem[p["name"]]["peak_rss"] / 2**30, memory_commit=mem[p["name"]]["commit"], memory_key=mem[p["name"]]["key"])
            if "train_peak" in mem[p["name"]]:
                row["train_peak_gib"] = mem[p["name"]]["train_peak"] / 2**30
        table.append(row)
    for key in ("ppl_in", "ppl_out"):
        measured = {r["name"]: (r["peak_gib"], r[key]) for r in table if "peak_gib" in r and key in r}
        front = pareto(measured)
        planned = {r["name"]: (r["plan_7b"], r[key]) for r in table if key in r}  # the projected 7B memory as the x axis
        plan_front = pareto(planned)
        for r in table:
            r[f"front_{key}"] = r["name"] in front if r["name"] in measured else None
            r[f"plan_front_{key}"] = r["name"] in plan_front if r["name"] in planned else None
    results_dir = Path(os.environ.get("BENCH_RESULTS_DIR", ROOT / "results"))
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "repair-curve.json").write_text(json.dumps({"protocol": __doc__, "settings": settings, "sparsity": sparsity,
                                                               "shape": SHAPE, "dense": q["dense"], "pruned": q["pruned"],
                                                               "sources": q["sources"], "points": table}, indent=2) + "\n")
    mark = {True: "yes", False: "no", None: "—"}
    lines = [f"| point | trainable | peak GiB ({SHAPE}, 2 steps) | before the save | plan GiB (LLaMA-2-7B) | ppl {q['sources'][0]} | "
             f"front | front (7B plan) | ppl {q['sources'][1]} | front | front (7B plan) |", "|---|---:|---:|---:|---:|---:|---|---|---:|---|---|"]
    for r in table:
        lines.append(f"| {r['label']} | {r['trainable'] / 1e6:.2f} M | " if r.get("trainable") else f"| {r['label']} | — | ")
        lines[-1] += (f"{r['peak_gib']:.2f} | " if "peak_gib" in r else "— | ") + \
            (f"{r['train_peak_gib']:.2f} | " if "train_peak_gib" in r else "— | ") + f"{r['plan_7b'] / 2**30:.1f} | "
        lines[-1] += " | ".join(f"{r[k]:.2f} | {mark[r[f'front_{k}']]} | {mark[r[f'plan_front_{k}']]}" if k in r else "— | — | —"
                                for k in ("ppl_in", "ppl_out")) + " |"
    missing = [r["label"] for r in table if "ppl_in" not in r or "peak_gib" not in r]
    seft = [r for r in table if r["method"] == "seft" and r["front_ppl_in"] is not None]
    verdict = []
    for key, source in zip(("ppl_in", "ppl_out"), q["sources"]):
        off = [r["label"] for r in seft if r.get(f"front_{key}") is False]
        verdict.append(f"- {source}: " + ("no SEFT point measured on both axes" if not seft else
                                          ("every measured SEFT point is on the Pareto front" if not off else
                                           f"off the front: {', '.join(off)}")))
    for key, source in zip(("ppl_in", "ppl_out"), q["sources"]):
        on = [r["label"] for r in table if r["method"] == "seft" and r.get(f"plan_front_{key}")]
        off = [r["label"] for r in table if r["method"] == "seft" and r.get(f"plan_front_{key}") is False]
        verdict.append(f"- {source}, against the LLaMA-2-7B projection instead: on the front {', '.join(on) or 'none'}; "
                       f"off {', '.join(off) or 'none'}")
    dense, pruned = q["dense"], q["pruned"]
    head = [f"Dense {q['sources'][0]} / {q['sources'][1]}: {dense['ppl_in']:.2f} / {dense['ppl_out']:.2f}; "
            f"pruned (no repair): {pruned['ppl_in']:.2f} / {pruned['ppl_out']:.2f}." if dense and pruned else "", ""]
    text = (__doc__.split("\n", 1)[1] + "\n" + "\n".join(head + lines) + "\n\nSEFT on the Pareto front (goal: at every memory level "
            "it covers):\n" + "\n".join(verdict) + "\n" + (f"\nNot yet measured (quality or memory): {', '.join(missing)}.\n" if missing else "")
            + f"\nOptions of each point: {json.dumps({r['label']: r['options'] for r in table}, ensure_ascii=False)}\n")
    (results_dir / "repair-curve.md").write_text(text)
    if any("peak_gib" in r and "ppl_in" in r for r in table):
        plot(table, q["sources"], results_dir / "repair-curve.png")
    print(text)


if __name__ == "__main__":
    main()
