"""Where a decode step's time goes: the linear layers against everything else (attention, norms,
rotary, the KV cache, the engine's Python and the dispatch), at batch 1, dense and sparse, per dtype.

Method: the engine (`seftc.runtime.engine`, what `seftc generate` and `seftc serve` run) decodes the
same greedy continuation twice per round, alternating: as is, and with every linear layer
(`nn.Linear` and `SparseLinear`, the LM head included) replaced by a stub returning zeros of the
right shape. The stubbed step is the per-token overhead; the difference is the linear layers.
Figures are medians over rounds of the per-step median. `--clock cpu` times the thread's CPU time
instead of the wall clock (with `--threads 1` only): on a machine other processes share, it counts
the work done, not the waits for a core.

    python bench/profile_decode.py MODEL [--dtypes float32,bfloat16] [--steps 32] [--rounds 3] [--threads 2] [--clock wall|cpu]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def stub_linears(model) -> list:
    """Replace every linear layer's forward by a zeros-returning stub; returns what to restore."""
    import torch
    from torch import nn

    from seftc.runtime.linear import SparseLinear

    stubbed = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, SparseLinear)):
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


def profile(model, tokenizer, prompt: list[int], steps: int, rounds: int, clock=time.perf_counter) -> dict[str, float]:
    from seftc.runtime.engine import Engine

    engine = Engine(model, tokenizer)
    engine.warmup()
    full, bare = [], []
    for _ in range(rounds):
        full.append(step_ms(engine, prompt, steps, clock))
        stubbed = stub_linears(model)
        try:
            bare.append(step_ms(engine, prompt, steps, clock))
        finally:
            restore(stubbed)
    f, b = statistics.median(full), statistics.median(bare)
    return {"step_ms": f, "outside_linear_ms": b, "linear_ms": f - b, "outside_share": b / f if f > 0 else float("nan"),
            "step_ms_spread": [min(full), max(full)], "outside_ms_spread": [min(bare), max(bare)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a pruned or packed folder")
    ap.add_argument("--dtypes", default="float32,bfloat16")
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
        for which, model in (("dense", pair.dense), ("sparse", pair.sparse)):
            rec = {"dtype": dtype, "model": which, **profile(model, pair.tokenizer, prompt, args.steps, args.rounds, CLOCKS[args.clock])}
            records.append(rec)
            print(f"{dtype:9s} {which:6s} step {rec['step_ms']:7.2f} ms  linear {rec['linear_ms']:7.2f} ms  "
                  f"outside {rec['outside_linear_ms']:6.2f} ms ({rec['outside_share']:.0%})", file=sys.stderr, flush=True)
    print(json.dumps({"threads": torch.get_num_threads(), "clock": args.clock, "load_average": os.getloadavg(), "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
