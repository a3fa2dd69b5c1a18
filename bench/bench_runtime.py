"""`make bench-runtime`: the sparse CPU runtime against dense, SmolLM2-135M at 50%, 2:4 and 70%
(and 70% with int8 values once `seftc pack --quantize int8` exists).

For each sparsity and dtype (fp32, bf16) one `seftc.runtime.bench.run_bench` run times dense and
sparse side by side, alternating, in one process: per-layer time inside batch-1 decode (with each
layer's byte bound), prefill of 64 tokens and decode at batch 1/4/16, memory. The sparse model runs
with the dispatcher in `auto` (per layer and token count the faster of the sparse kernel and
decompress + dense GEMM, `seftc.runtime.dispatch`); its plans are measured afresh at the start of
each run (`calibrate(remeasure=True)`), so they come from this machine in this state, and are
reported. The int8 rows (bf16 only) compare against the dense bf16 model. The machine's load
average is recorded before and after. Writes results/runtime.md, results/runtime.json and
results/runtime.png. Pruning is magnitude (speed depends on the sparsity structure, not on which
weights are kept); the pruned and packed folders are cached under runs/bench-runtime/.

    python bench/bench_runtime.py [--quick] [--configs 70] [--dtypes float32]
    SEFTC_BENCH_QUICK=1 make bench-runtime      # the same smoke setting as --quick
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"50": dict(sparsity=0.5), "2:4": dict(pattern="2:4"), "70": dict(sparsity=0.7)}
INT8_CONFIGS = {"70-int8": "70"}  # packed with --quantize int8 from the pruned folder named
INT8_DTYPES = ("bfloat16",)  # int8 values against the dense bf16 model
GOALS = {"50": 1.35, "70": 2.2, "70-int8": 3.5}  # per-layer batch-1 decode speedup goals (vs dense, same dtype)
E2E_GOAL = 0.75  # end-to-end batch-1 decode speedup over the model's byte bound
NEVER_SLOWER = 0.95  # every phase and batch: sparse at least this fraction of dense speed
QUICK_ENV = "SEFTC_BENCH_QUICK"


def quick_requested(flag: bool, environ=os.environ) -> bool:
    """--quick, or SEFTC_BENCH_QUICK set to anything but '', 0, no, false."""
    return flag or environ.get(QUICK_ENV, "").strip().lower() not in ("", "0", "no", "false")


def int8_supported() -> bool:
    """Whether `seftc pack --quantize int8` exists in this checkout (the int8 layout has landed)."""
    from seftc.compress.recipe import PackStage

    return "quantize" in PackStage.model_fields


def configs_to_run(requested: str, int8: bool) -> list[str]:
    """The requested configs in order; int8 ones only when supported (said on stderr otherwise)."""
    names = [n.strip() for n in requested.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS and n not in INT8_CONFIGS]
    if unknown:
        raise SystemExit(f"error: unknown config {', '.join(unknown)}; choose from {', '.join([*CONFIGS, *INT8_CONFIGS])}")
    if not int8:
        for n in names:
            if n in INT8_CONFIGS:
                print(f"note: skipping {n}: `seftc pack --quantize int8` is not in this checkout yet", file=sys.stderr)
        names = [n for n in names if n not in INT8_CONFIGS]
    return names


def dtypes_for(config: str, dtypes: list[str]) -> list[str]:
    return [d for d in dtypes if d in INT8_DTYPES] if config in INT8_CONFIGS else dtypes


def pruned_folder(name: str, runs: Path) -> Path:
    from seftc.models.manifest import MANIFEST_NAME
    from seftc.prune.api import prune

    runs.mkdir(parents=True, exist_ok=True)
    out = runs / name.replace(":", "of")
    if not (out / MANIFEST_NAME).is_file():
        prune("default", output=out, method="magnitude", force=True, **CONFIGS[name])
    return out


def packed_int8_folder(name: str, runs: Path) -> Path:
    """`seftc pack --quantize int8` of the pruned folder INT8_CONFIGS names (cached)."""
    src = pruned_folder(INT8_CONFIGS[name], runs)
    out = runs / name.replace(":", "of")
    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "seftc.cli.main", "pack", str(src), "-o", str(out), "--quantize", "int8", "--force"],
                       check=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join([*CONFIGS, *INT8_CONFIGS]), help="comma-separated: 50,2:4,70,70-int8")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch", default="1,4,16")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help=f"a smoke run: batch 1, few tokens, 2 repeats (also {QUICK_ENV}=1)")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args()

    import torch

    from seftc.cli.bench import summarize_layers
    from seftc.runtime import cpu, dispatch
    from seftc.runtime.bench import BenchConfig, run_bench
    from seftc.runtime.convert import load_runtime_pair

    quick = quick_requested(args.quick)
    batches = tuple(int(b) for b in args.batch.split(","))
    cfg = BenchConfig(batches=batches, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
                      warmup=2, max_layers=0, threads=args.threads)
    if quick:
        cfg = BenchConfig(batches=(1,), prompt_tokens=16, new_tokens=4, repeats=2, max_repeats=2, warmup=1, max_layers=0,
                          threads=args.threads)
    runs = ROOT / "runs" / "bench-runtime"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    start = time.time()
    load_before = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in configs_to_run(args.configs, int8_supported()):
        folder = packed_int8_folder(name, runs) if name in INT8_CONFIGS else pruned_folder(name, runs)
        for dtype in dtypes_for(name, args.dtypes.split(",")):
            pair = load_runtime_pair(str(folder), dtype)
            print(f"[{time.time() - start:6.0f}s] {name} {dtype}: {len(pair.conversion.converted)} sparse layers", file=sys.stderr, flush=True)
            plans = dispatch.calibrate(pair.sparse, remeasure=not quick)  # measured on this machine, now
            res = run_bench(pair.dense, pair.sparse, cfg)
            layer_kinds = summarize_layers(res.layers_in_model)
            speedups = [r.speedup for r in res.layers_in_model]
            records.append({"config": name, "dtype": dtype, "bench": res.to_json(), "layer_kinds": layer_kinds,
                            "layer_speedup_median": statistics.median(speedups) if speedups else None,
                            "dispatch": {"mode": dispatch.mode(), "plans": plans}})
            del pair
    summary = {"machine": {"threads": torch.get_num_threads(), "isa": cpu.isa(), "torch": torch.__version__,
                           "load_average_before": list(load_before), "load_average_after": list(os.getloadavg())},
               "quick": quick, "records": records}
    (out_dir / "runtime.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "runtime.md").write_text(render_md(summary))
    plot(records, out_dir / "runtime.png")
    print((out_dir / "runtime.md").read_text())
    return 0


def _load(m: dict) -> str:
    before, after = m.get("load_average_before"), m.get("load_average_after")
    if not before or not after:
        return ""
    return f" Load average (1/5/15 min) {before[0]:.2f}/{before[1]:.2f}/{before[2]:.2f} before, {after[0]:.2f}/{after[1]:.2f}/{after[2]:.2f} after."


def render_md(summary: dict) -> str:
    from seftc.runtime.bench import distortion

    m = summary["machine"]
    lines = ["# Sparse CPU runtime vs dense (SmolLM2-135M)", "",
             f"Generated by `make bench-runtime` (`bench/bench_runtime.py`{' --quick' if summary['quick'] else ''}); "
             f"{m['threads']} threads, kernels {m['isa']}, torch {m['torch']}. Dense and sparse are timed alternately in "
             "one run, same dtype (int8 rows: against dense bf16); figures are medians (spread in runtime.json), repeated "
             "until they settle. The sparse model dispatches per layer and token count (sparse kernel or decompress + dense "
             f"GEMM, plans measured at the start of each run). Magnitude-pruned weights.{_load(m)}", "",
             "## Batch-1 decode: per layer (inside the model) and end to end", "",
             "| config | dtype | layer speedup (median) | goal | e2e decode speedup | byte bound | e2e / bound | goal |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["records"]:
        b = r["bench"]
        dec1 = next((x for x in b["results"] if x["phase"] == "decode" and x["batch"] == 1), None)
        e2e = dec1["speedup"] if dec1 else float("nan")
        goal = GOALS.get(r["config"])
        layer = r["layer_speedup_median"]
        layer_text = f"{layer:.2f}×" if layer is not None else "–"
        lines.append(f"| {r['config']} | {r['dtype']} | {layer_text} | {'≥ %.2f×' % goal if goal else '–'} | {e2e:.2f}× | "
                     f"{b['byte_bound']:.2f}× | {e2e / b['byte_bound']:.0%} | ≥ {E2E_GOAL:.0%} |")
    lines += ["", f"## Prefill and decode, all batch sizes (goal: sparse ≥ {NEVER_SLOWER:.2f}× dense everywhere)", "",
              "| config | dtype | phase | batch | dense ms | sparse ms | speedup | ≥ goal | dense tok/s | sparse tok/s | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["records"]:
        for x in r["bench"]["results"]:
            bound = r["bench"]["byte_bound"] if x["phase"] == "decode" else None
            note = distortion(x, bound) or ""
            lines.append(f"| {r['config']} | {r['dtype']} | {x['phase']} | {x['batch']} | {x['dense_ms']:.2f} | {x['sparse_ms']:.2f} | "
                         f"{x['speedup']:.2f}× | {'yes' if x['speedup'] >= NEVER_SLOWER else '**no**'} | "
                         f"{x['dense_tokens_per_s']:.1f} | {x['sparse_tokens_per_s']:.1f} | {'distorted: ' + note if note else ''} |")
    lines += ["", "## Per-layer batch-1 decode by module (median over the 30 blocks)", "",
              "| config | dtype | module | dense ms | sparse ms | speedup | byte bound | speedup / bound |", "|---|---|---|---|---|---|---|---|"]
    for r in summary["records"]:
        for kind, k in r["layer_kinds"].items():
            lines.append(f"| {r['config']} | {r['dtype']} | {kind} | {k['dense_ms']:.4f} | {k['sparse_ms']:.4f} | {k['speedup']:.2f}× | "
                         f"{k['byte_bound']:.2f}× | {k['speedup'] / k['byte_bound']:.0%} |")
    plan_rows = [(r, p) for r in summary["records"] for p in r.get("dispatch", {}).get("plans", [])]
    if plan_rows:
        lines += ["", "## Dispatch plans (measured at the start of each run)", "",
                  "Per layer class: the token counts timed, and from which the decompress + dense GEMM path was faster "
                  "(`seftc.runtime.dispatch`; – : the sparse kernel at every count timed).", "",
                  "| config | dtype | shape | density | tokens timed | first dense at | sparse / dense ms at the largest |",
                  "|---|---|---|---|---|---|---|"]
        for r, p in plan_rows:
            first = p["first_dense_tokens"]
            lines.append(f"| {r['config']} | {r['dtype']} | {p['shape'][0]}×{p['shape'][1]} | {p['density']:.2f} | "
                         f"{p['tokens'][0]}–{p['tokens'][-1]} | {first if first is not None else '–'} | "
                         f"{p['sparse_ms'][-1]:.3f} / {p['dense_ms'][-1]:.3f} |")
    lines += ["", "## Memory", "", "| config | dtype | dense MiB | sparse MiB | bytes/token dense MiB | sparse MiB |", "|---|---|---|---|---|---|"]
    for r in summary["records"]:
        mem = r["bench"]["memory"]
        lines.append(f"| {r['config']} | {r['dtype']} | {mem['dense_model_bytes'] / 2**20:.1f} | {mem['sparse_model_bytes'] / 2**20:.1f} | "
                     f"{mem['dense_bytes_per_token'] / 2**20:.1f} | {mem['sparse_bytes_per_token'] / 2**20:.1f} |")
    return "\n".join(lines) + "\n"


def plot(records: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, bounds = [], [], []
    for r in records:
        for x in r["bench"]["results"]:
            labels.append(f"{r['config']} {r['dtype'][:4]}\n{x['phase'][:3]} b{x['batch']}")
            values.append(x["speedup"])
            bounds.append(r["bench"]["byte_bound"] if x["phase"] == "decode" else float("nan"))
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(labels) + 2), 4))
    ax.bar(range(len(values)), values, color=["#dd8452" if "dec" in l else "#4c72b0" for l in labels])
    ax.plot(range(len(values)), bounds, "g_", ms=14, label="byte bound (decode)")
    ax.axhline(1.0, color="grey", lw=1)
    ax.set_xticks(range(len(values)), labels, fontsize=6)
    ax.set_ylabel("speedup (dense / sparse)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
