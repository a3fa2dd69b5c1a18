"""Where a decode step's time goes: the linear layers against everything else (attention, norms,
rotary, the KV cache, the engine's Python and the dispatch), at batch 1, dense and sparse, per dtype,
for each forward the engine can run: the lean pass (`seftc.runtime.fastpath`, "fastpath") and
transformers' forward ("transformers", what `SEFTC_FASTPATH=0` runs).

Method: the engine (`seftc.runtime.engine`, what `seftc generate` and `seftc serve` run) decodes the
same greedy continuation twice per round, alternating: as is, and with every linear layer
(`nn.Linear`, `SparseLinear`, `SparseInt8Linear`, the lean pass's fused layers and the LM head)
replaced by a stub returning zeros of the right shape. The stubbed step is the per-token overhead;
the difference is the linear layers. The two forwards alternate round by round in one process.
Figures are medians over rounds of the per-step median. `--clock cpu` times the thread's CPU time
instead of the wall clock (with `--threads 1` only): on a machine other processes share, it counts
the work done, not the waits for a core.

    python bench/profile_decode.py MODEL [--dtypes float32,bfloat16] [--forwards fastpath,transformers]
        [--steps 32] [--rounds 3] [--threads 2] [--clock wall|cpu]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


FORWARDS = ("fastpath", "transformers")


def stub_linears(model) -> list:
    """Replace every linear layer's forward (the model's, and the fused ones of its lean pass) by a
    zeros-returning stub; returns what to restore."""
    import torch
    from torch import nn

    from seftc.runtime import fastpath
    from seftc.runtime.convert import is_sparse_linear

    fast = fastpath.built(model)
    modules = list(model.modules()) + (fast.linears() if fast is not None else [])
    stubbed, seen = [], set()
    for module in modules:
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, nn.Linear) or is_sparse_linear(module):
            out = module.out_features

            def stub(x, out=out):
                return torch.zeros(*x.shape[:-1], out, dtype=x.dtype)

            module.forward = stub
            stubbed.append(module)
    return stubbed


def restore(stubbed: list) -> None:
    for module in stubbed:
        del module.forward


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def step_ms(engine, prompt: list[int], steps: int, clock=time.perf_counter) -> float:
    """Median milliseconds per decode step of one greedy generation (the prefill excluded)."""
    from seftc.runtime.sampling import SamplingParams

    times: list[float] = []
    seq = engine.submit(prompt, SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True))
    engine.step()  # prefill + first token
    while not seq.done:
        t = clock()
        engine.step()
        times.append(clock() - t)
    return statistics.median(times) * 1e3


def engine_for(model, tokenizer, forward: str):
    """An engine running `forward` ("fastpath" or "transformers"; the lean pass falls back to
    transformers' forward for a model it does not cover: the engine's `runner.name` says which)."""
    import os

    from seftc.runtime import fastpath
    from seftc.runtime.engine import Engine

    if forward not in FORWARDS:
        raise ValueError(f"forward {forward!r}: choose one of {', '.join(FORWARDS)}")
    before = os.environ.get(fastpath.ENV)
    os.environ[fastpath.ENV] = "1" if forward == "fastpath" else "0"
    try:
        engine = Engine(model, tokenizer)
    finally:
        if before is None:
            os.environ.pop(fastpath.ENV, None)
        else:
            os.environ[fastpath.ENV] = before
    engine.warmup()
    return engine


def profile(model, tokenizer, prompt: list[int], steps: int, rounds: int, clock=time.perf_counter,
            forwards: tuple[str, ...] = ("fastpath",)) -> dict[str, dict[str, float]] | dict[str, float]:
    """Per forward: the step's median time, the part outside the linear layers, their share. With one
    forward (the default) its record alone; with several, {forward: record}, measured alternately."""
    engines = {f: engine_for(model, tokenizer, f) for f in forwards}
    full: dict[str, list[float]] = {f: [] for f in forwards}
    bare: dict[str, list[float]] = {f: [] for f in forwards}
    for _ in range(rounds):
        for f, engine in engines.items():
            full[f].append(step_ms(engine, prompt, steps, clock))
        stubbed = stub_linears(model)
        try:
            for f, engine in engines.items():
                bare[f].append(step_ms(engine, prompt, steps, clock))
        finally:
            restore(stubbed)
    records = {}
    for f in forwards:
        a, b = statistics.median(full[f]), statistics.median(bare[f])
        records[f] = {"forward": engines[f].runner.name, "step_ms": a, "outside_linear_ms": b, "linear_ms": a - b,
                      "outside_share": b / a if a > 0 else float("nan"), "tokens_per_s": 1e3 / a if a > 0 else float("nan"),
                      "step_ms_spread": [min(full[f]), max(full[f])], "outside_ms_spread": [min(bare[f]), max(bare[f])]}
    return records[forwards[0]] if len(forwards) == 1 else records


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a pruned or packed folder")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--forwards", default=",".join(FORWARDS), help="fastpath, transformers, or both (alternating)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall")
    args = ap.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu counts one thread's time: use it with --threads 1")

    import os

    import torch

    from seftc.runtime.convert import load_runtime_pair

    if args.threads:
        torch.set_num_threads(args.threads)
    records = []
    for dtype in args.dtypes.split(","):
        pair = load_runtime_pair(args.model, dtype)
        vocab = int(pair.dense.config.vocab_size)
        prompt = [(i * 7919) % vocab for i in range(1, args.prompt_tokens + 1)]
        forwards = tuple(args.forwards.split(","))
        for which, model in (("dense", pair.dense), ("sparse", pair.sparse)):
            per = profile(model, pair.tokenizer, prompt, args.steps, args.rounds, CLOCKS[args.clock], forwards)
            for rec in (per.values() if len(forwards) > 1 else [per]):
                rec = {"dtype": dtype, "model": which, **rec}
                records.append(rec)
                print(f"{dtype:9s} {which:6s} {rec['forward']:12s} step {rec['step_ms']:7.2f} ms ({rec['tokens_per_s']:5.1f} tok/s)  "
                      f"linear {rec['linear_ms']:7.2f} ms  outside {rec['outside_linear_ms']:6.2f} ms ({rec['outside_share']:.0%})",
                      file=sys.stderr, flush=True)
    print(json.dumps({"threads": torch.get_num_threads(), "clock": args.clock, "load_average": os.getloadavg(), "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
