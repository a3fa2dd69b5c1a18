"""Pure helpers of `make bench-peer` (bench/bench_peer.py): perplexity from logits, timing
summaries, machine load from /proc/stat, and the report table.

Only numpy and the standard library: the llama.cpp worker (bench/peer_worker.py) imports this
module too, and it runs in its own venv (.venv-peer) without torch or seftc. Both engines score
perplexity through `window_nll`, so the two sides differ only in the logits they produce.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

import numpy as np

# A timed phase whose repeats differ by more than this fraction of their median is flagged
# (the same threshold `seftc bench` uses for its own spread warning).
WIDE_SPREAD = 0.5
# Other processes using more than this share of all cores during the timed runs make the machine "busy".
QUIET_SHARE = 0.05


def window_nll(logits: Any, window: Sequence[int], scored: int) -> float:
    """Summed negative log-likelihood (nats) of the last `scored` tokens of `window`, given the
    logits a causal LM produced at every position of it ([len(window), vocab], row i predicting
    token i + 1); the convention of `seftc.eval.perplexity` (its windows come from `plan_windows`)."""
    x = np.asarray(logits, dtype=np.float64)
    n = len(window)
    if x.ndim != 2 or x.shape[0] != n:
        raise ValueError(f"logits of shape {x.shape} for a window of {n} tokens")
    if not 1 <= scored <= n - 1:
        raise ValueError(f"cannot score {scored} tokens of a {n}-token window")
    pred = x[n - 1 - scored:n - 1]
    targets = np.asarray(window[n - scored:], dtype=np.int64)
    top = pred.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(pred - top).sum(axis=1))
    return float((lse - pred[np.arange(scored), targets]).sum())


def perplexity(total_nll: float, tokens: int) -> float:
    """exp(mean NLL per scored token)."""
    if tokens < 1:
        raise ValueError("no scored tokens")
    return math.exp(total_nll / tokens)


def tokens_per_s(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("nan")


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median, min, max and relative spread ((max - min) / median) of repeated measurements."""
    if not samples:
        raise ValueError("no samples")
    med = statistics.median(samples)
    lo, hi = min(samples), max(samples)
    return {"median": med, "min": lo, "max": hi, "n": len(samples), "spread": (hi - lo) / med if med else float("nan")}


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where two token lists differ (a shorter list differs where it
    ends); None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def parse_proc_stat(text: str) -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from the text of /proc/stat (idle and iowait are not busy)."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(v) for v in parts[1:]]
            # user nice system idle iowait irq softirq steal [guest guest_nice, already inside user/nice]
            total = sum(values[:8])
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            return total - idle, total
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def others_share(start: tuple[int, int], end: tuple[int, int], own_jiffies: float) -> float:
    """Share of all CPU time between two /proc/stat samples that processes other than ours used:
    (busy jiffies - our own jiffies) / total jiffies, clipped to [0, 1]."""
    busy, total = end[0] - start[0], end[1] - start[1]
    if total <= 0:
        return 0.0
    return min(1.0, max(0.0, (busy - own_jiffies) / total))


def quiet_verdict(share: float, cores: int) -> str:
    if share < QUIET_SHARE:
        return f"quiet (other processes used {share:.1%} of the {cores} cores during the timed runs)"
    return (f"BUSY: other processes used {share:.0%} of the {cores} cores during the timed runs; "
            "speeds are low and the spread wide; rerun on a quiet machine")


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _rate(stats: dict[str, float] | None) -> str:
    """Median tokens/s with the range of the repeats, flagged when they spread widely."""
    if not stats:
        return "–"
    flag = " ⚠" if stats["spread"] > WIDE_SPREAD else ""
    return f"{stats['median']:.1f} ({stats['min']:.0f}–{stats['max']:.0f}){flag}"


def render_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The side-by-side table: one row per model (engine, weights, bytes, prompt and decode
    tokens/s with their range over the repeats, perplexity, decode speed relative to a reference)."""
    lines = ["| engine | model | weights | MiB | prompt tok/s | decode tok/s | decode vs llama.cpp Q8_0 | vs Q4_1 | perplexity |",
             "|---|---|---|---|---|---|---|---|---|"]
    by_name = {r["name"]: r for r in rows}

    def ratio(row: dict[str, Any], ref: str) -> str:
        other = by_name.get(ref)
        if not other or not row.get("decode_tps") or not other.get("decode_tps"):
            return "–"
        return f"{row['decode_tps']['median'] / other['decode_tps']['median']:.2f}×"

    for r in rows:
        mib = r["weight_bytes"] / 2**20 if r.get("weight_bytes") else None
        lines.append(f"| {r['engine']} | {r['label']} | {r['weights']} | {_fmt(mib, '.1f')} | {_rate(r.get('prefill_tps'))} | "
                     f"{_rate(r.get('decode_tps'))} | {ratio(r, 'llama.cpp Q8_0')} | {ratio(r, 'llama.cpp Q4_1')} | "
                     f"{_fmt(r.get('ppl'), '.2f')} |")
    return lines


def render_md(summary: dict[str, Any]) -> str:
    """results/peer.md from the run's summary (see bench_peer.main for its keys)."""
    s = summary["settings"]
    m = summary["machine"]
    head = ["# seftc beside llama.cpp (SmolLM2-135M-Instruct, same weights, same threads)", ""]
    if summary.get("smoke"):
        head += ["**SMOKE RUN** (BENCH_PEER_SMOKE=1: few tokens and repeats) — a check that the pipeline works, not a measurement.", ""]
    head += [
        f"Generated by `make bench-peer` (`bench/bench_peer.py`) in {summary['elapsed_s'] / 60:.1f} min. "
        f"Machine: {m['cpu']}, {m['cores']} cores; {s['threads']} threads for every engine; torch {m['torch']}, "
        f"seftc kernels {m['isa']}; llama-cpp-python {m['llama_cpp_python']} built with `CMAKE_ARGS=\"{m['cmake_args']}\"`.",
        "",
        f"Machine during the timed runs: {summary['quiet']}.",
        "",
        "## Protocol",
        "",
        f"- Prompt: the first {s['prompt_tokens']} tokens of `{s['text']}`, as token ids (the same ids for every engine); "
        f"{s['new_tokens']} new tokens, greedy, end-of-sequence ignored; batch 1.",
        f"- Runs alternate between all models ({s['repeats']} rounds after {s['warmup']} untimed one(s); the model order "
        "rotates each round). Figures are medians with the range over the rounds; ⚠ marks a range wider than "
        f"{WIDE_SPREAD:.0%} of the median.",
        "- prompt tok/s = prompt tokens / time from submitting the prompt to the first sampled token (one prefill "
        "forward and the first argmax); decode tok/s = (new tokens - 1) / time from the first to the last token "
        "(one single-token forward per token). No detokenization on either side.",
        "- llama.cpp: `llama_cpp.Llama(n_threads=n_threads_batch=2)`, `eval` of the prompt then of each token, argmax of the "
        "last logits, in a worker process in its own venv. seftc: the decode engine `seftc generate` and `seftc serve` run "
        "(`seftc.runtime.engine.Engine`, batch of one), torch threads = 2.",
        f"- Perplexity: {s['ppl_windows']} non-overlapping windows of {s['ppl_seqlen']} tokens of the same text "
        f"({s['ppl_tokens']} scored tokens), the same token ids for every model, each window scored from the logits "
        "of one forward (llama.cpp with `logits_all=True`), the NLL computed by the same function for both engines.",
        "- Weights: llama.cpp `llama_model_size` (all tensors as stored); seftc: the loaded model's parameters and buffers "
        "(sparse layers as their packed layouts). The output head is tied to the embedding in both (counted once).",
        f"- Models: {summary['models_note']}",
        "",
        "## Results",
        "",
    ]
    lines = head + render_table(summary["rows"])
    notes = summary.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
