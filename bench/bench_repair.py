"""`make bench-repair`: repair methods on SmolLM2-135M from the same pruned model, same data, same
step budget, each run in its own process (peak memory and seconds per step are per run).

Protocol (printed into results/repair.md):
- pruned inputs: Wanda, calibration `shakespeare:calib` 128 × 512 tokens, seed 0, at each
  pattern in BENCH_PATTERNS (default: 70% unstructured and 2:4);
- training: `shakespeare:train` (23 plays), BENCH_STEPS steps × 4 sequences × 256 tokens, one
  seed per run (BENCH_SEEDS), each method's default learning rate;
- in-domain perplexity: `shakespeare:test` (5 tragedies, disjoint from calibration, training
  and validation); out-of-domain: LAMBADA passages; first BENCH_PPL_WINDOWS windows of 512;
- gap closed = (ppl_pruned − ppl_method) / (ppl_pruned − ppl_dense);
- accuracies: BENCH_TASKS, first BENCH_LIMIT eval items each, with standard errors;
- final sparsity counted from the saved weights;
- reference row `dense+train`: the dense model trained (all weights of the target layers,
  mask of ones) with the same data and budget.
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
STEPS = int(os.environ.get("BENCH_STEPS", 140))
PATTERNS = os.environ.get("BENCH_PATTERNS", "0.7,2:4").split(",")
METHODS = os.environ.get("BENCH_METHODS", "seft,static,masked-lora,lora-merge,seft-noregrow,lora-dense").split(",")
SEEDS = [int(s) for s in os.environ.get("BENCH_SEEDS", "0").split(",")]
PPL_WINDOWS = int(os.environ.get("BENCH_PPL_WINDOWS", 32))
TASKS = os.environ.get("BENCH_TASKS", "piqa,arc_easy,hellaswag")
LIMIT = int(os.environ.get("BENCH_LIMIT", 300))
DENSE_REF = os.environ.get("BENCH_DENSE_REF", "1") == "1"


def _pruned(pattern: str) -> Path:
    from seftc.prune.api import prune

    out = WORK / f"pruned-{pattern.replace(':', 'of')}"
    if not (out / "seftc_manifest.json").is_file():
        kw = {"pattern": pattern} if ":" in pattern else {"sparsity": float(pattern)}
        prune("default", method="wanda", calib={"nsamples": 128, "seqlen": 512}, output=out, force=True, **kw)
    return out


def _dense_as_pruned() -> Path:
    from seftc.prune.api import prune

    out = WORK / "dense-0"
    if not (out / "seftc_manifest.json").is_file():
        prune("default", method="magnitude", sparsity=0.0, output=out, force=True)
    return out


def evaluate(folder: str) -> dict:
    import torch
    from safetensors import safe_open

    from seftc.eval.multiple_choice import evaluate_tasks
    from seftc.eval.perplexity import perplexity
    from seftc.models.loading import load_model
    from seftc.models.manifest import Manifest

    loaded = load_model(folder)
    row = {}
    for key, source in (("ppl_in", "shakespeare:test"), ("ppl_out", "lambada")):
        row[key] = perplexity(loaded.model, loaded.tokenizer, source, seqlen=512, limit=PPL_WINDOWS).ppl
    res = evaluate_tasks(loaded.model, loaded.tokenizer, TASKS.split(","), limit=LIMIT)
    row["tasks"] = {k: {"acc": v.acc, "stderr": v.acc_stderr, "n": v.n} for k, v in res.items()}
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


def worker(src: str, method: str, seed: int, out: str) -> dict:
    import resource

    from seftc.repair.api import repair

    t0 = time.perf_counter()
    result = repair(src, method=method, seed=seed, steps=STEPS, output=out, force=True, eval_every=0, allow_dense=True)
    seconds = time.perf_counter() - t0
    row = {"method": method, "seed": seed, "s_per_step": seconds / STEPS,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "trainable": result.manifest.config.get("trainable_params")}
    row.update(evaluate(out))
    return row


def _spawn(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    results: dict = {"protocol": __doc__, "steps": STEPS, "patterns": {}}
    dense = _spawn(["--eval", "default"])
    results["dense"] = dense
    print(f"[bench-repair] dense {dense}", file=sys.stderr, flush=True)
    if DENSE_REF:
        ref = _spawn(["--worker", str(_dense_as_pruned()), "static", "0", str(WORK / "dense-trained")])
        results["dense_trained"] = ref
        print(f"[bench-repair] dense+train {ref}", file=sys.stderr, flush=True)
    for pattern in PATTERNS:
        src = _pruned(pattern)
        pruned = _spawn(["--eval", str(src)])
        rows = []
        for method in METHODS:
            for seed in SEEDS if method in ("seft", "static") else SEEDS[:1]:
                row = _spawn(["--worker", str(src), method, str(seed), str(WORK / f"{src.name}-{method}-s{seed}")])
                print(f"[bench-repair] {pattern} {row}", file=sys.stderr, flush=True)
                rows.append(row)
        results["patterns"][pattern] = {"pruned": pruned, "rows": rows}
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "repair.json").write_text(json.dumps(results, indent=2) + "\n")
    text = render(results)
    (ROOT / "results" / "repair.md").write_text(text)
    print(text)


def render(results: dict) -> str:
    dense = results["dense"]
    tasks = list(dense["tasks"])
    head = ("| pattern | method | seed | ppl in-domain | gap closed | ppl out-of-domain | gap closed | "
            + " | ".join(tasks) + " | sparsity (saved) | s/step | peak RSS MiB |")
    lines = [f"## Repair (`make bench-repair`, {results['steps']} steps × 4 × 256 tokens)", "", head,
             "|" + "---|" * (10 + len(tasks))]

    def acc(row):
        return [f"{row['tasks'][t]['acc']:.3f} ± {row['tasks'][t]['stderr']:.3f}" for t in tasks]

    def line(pattern, name, seed, row, pruned=None):
        gap = lambda k: "—" if pruned is None else f"{(pruned[k] - row[k]) / (pruned[k] - dense[k]):.0%}"
        return (f"| {pattern} | {name} | {seed} | {row['ppl_in']:.2f} | {gap('ppl_in')} | {row['ppl_out']:.2f} | {gap('ppl_out')} | "
                + " | ".join(acc(row)) + f" | {row.get('sparsity', 0):.4f} | {row.get('s_per_step', 0):.2f} | {row.get('peak_rss_mib', 0):.0f} |")

    lines.append(line("—", "dense", "—", dense))
    if "dense_trained" in results:
        lines.append(line("—", "dense+train (reference)", 0, results["dense_trained"]))
    for pattern, block in results["patterns"].items():
        lines.append(line(pattern, "pruned (no repair)", "—", block["pruned"]))
        for row in block["rows"]:
            lines.append(line(pattern, row["method"], row["seed"], row, block["pruned"]))
    return "\n".join(lines) + "\n\n" + results["protocol"].strip() + "\n"


if __name__ == "__main__":
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if len(sys.argv) == 3 and sys.argv[1] == "--eval":
        print(json.dumps(evaluate(sys.argv[2])))
    elif len(sys.argv) == 6 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])))
    else:
        main()
