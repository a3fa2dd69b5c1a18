"""`make bench-prune`: one-shot pruning of SmolLM2-135M-Instruct, quality and cost.

Protocol (printed into results/prune.md):
- model: the embedded default (SmolLM2-135M-Instruct, dequantized Q4_1 GGUF, fp32, CPU);
- calibration: `shakespeare:calib` (8 comedies), NSAMPLES windows of SEQLEN tokens, seed 0,
  all samples through a block at once (one pass per block);
- perplexity: non-overlapping 512-token windows, the first PPL_WINDOWS of `shakespeare:test`
  (5 tragedies, disjoint from calibration) and of LAMBADA passages (novel prose);
- each pruning run happens in its own process: wall time of `seftc.prune`, its ratio to one
  plain forward pass of the decoder over the same calibration batch timed in the same process
  just before, and the peak resident memory during pruning (VmHWM after resetting it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

NSAMPLES = int(os.environ.get("BENCH_NSAMPLES", 64))
SEQLEN = int(os.environ.get("BENCH_SEQLEN", 512))
PPL_WINDOWS = int(os.environ.get("BENCH_PPL_WINDOWS", 32))
RUNS = [("dense", None, None)] + [
    (method, pattern, sparsity)
    for pattern, sparsity in (("unstructured", 0.5), ("2:4", None), ("unstructured", 0.7))
    for method in ("magnitude", "wanda", "sparsegpt")
]
ROOT = Path(__file__).resolve().parents[1]


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(method: str, pattern: str | None, sparsity: float | None) -> dict:
    import torch

    from seftc.data.calibration import CalibConfig, calibration_samples
    from seftc.eval.perplexity import perplexity
    from seftc.models.loading import load_model
    from seftc.prune.api import prune

    loaded = load_model("default")
    row: dict = {"method": method, "pattern": pattern, "sparsity": sparsity}
    if method != "dense":
        calib = CalibConfig(nsamples=NSAMPLES, seqlen=SEQLEN, seed=0)
        ids, _ = calibration_samples(loaded.tokenizer, calib, loaded.config.max_position_embeddings)
        with torch.no_grad():
            t0 = time.perf_counter()
            loaded.model.base_model(input_ids=ids, use_cache=False)
            row["forward_s"] = time.perf_counter() - t0
        del ids
        baseline = _rss_kb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        t0 = time.perf_counter()
        result = prune(loaded, method=method, pattern=pattern, sparsity=sparsity, calib=calib.model_dump())
        row["prune_s"] = time.perf_counter() - t0
        row["ratio_to_forward"] = row["prune_s"] / row["forward_s"]
        row["peak_rss_mib"] = _rss_kb("VmHWM") / 1024
        row["model_rss_mib"] = baseline / 1024
        row["measured_sparsity"] = result.manifest.sparsity
    for name, source in (("ppl_shakespeare_test", "shakespeare:test"), ("ppl_lambada", "lambada")):
        r = perplexity(loaded.model, loaded.tokenizer, source, seqlen=512, limit=PPL_WINDOWS)
        row[name] = r.ppl
        row[name + "_tokens"] = r.tokens
    return row


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def main() -> None:
    rows = []
    for method, pattern, sparsity in RUNS:
        label = f"{method} {pattern or ''} {sparsity or ''}".strip()
        print(f"[bench-prune] {label} ...", file=sys.stderr, flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps([method, pattern, sparsity])],
            check=True, capture_output=True, text=True, cwd=ROOT,
        ).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"[bench-prune]   {row}", file=sys.stderr, flush=True)
        rows.append(row)

    header = (
        "| method | pattern | sparsity (measured) | ppl Shakespeare test | ppl LAMBADA | prune s | × forward | peak RSS MiB (model alone) |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        pat = r["pattern"] or "—"
        if r["pattern"] == "unstructured":
            pat = f"unstructured {r['sparsity']:.0%}"
        lines.append(
            f"| {r['method']} | {pat} | {_fmt(r.get('measured_sparsity'), '.4f')} | {r['ppl_shakespeare_test']:.2f} | {r['ppl_lambada']:.2f} | "
            f"{_fmt(r.get('prune_s'), '.1f')} | {_fmt(r.get('ratio_to_forward'), '.2f')} | "
            + (f"{r['peak_rss_mib']:.0f} ({r['model_rss_mib']:.0f})" if "peak_rss_mib" in r else "—")
            + " |"
        )
    import platform

    import torch

    protocol = (
        f"SmolLM2-135M-Instruct (embedded default, fp32, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}). Calibration: `shakespeare:calib`, {NSAMPLES} × {SEQLEN} tokens, seed 0, "
        f"one pass per block. Perplexity: first {PPL_WINDOWS} non-overlapping 512-token windows of `shakespeare:test` and of `lambada`. "
        "`× forward` = pruning wall time over one plain decoder forward of the same calibration batch, timed in the same process. "
        "Peak RSS: VmHWM during pruning (model alone = RSS before pruning). Command: `make bench-prune`."
        + (" " + os.environ["BENCH_NOTE"] if os.environ.get("BENCH_NOTE") else "")
    )
    text = "## One-shot pruning (`make bench-prune`)\n\n" + protocol + "\n\n" + header + "\n".join(lines) + "\n"
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "prune.md").write_text(text)
    (ROOT / "results" / "prune.json").write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        print(json.dumps(worker(*json.loads(sys.argv[2]))))
    else:
        main()
