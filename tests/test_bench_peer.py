"""`make bench-peer` (bench/bench_peer.py, bench/peer_lib.py) without llama.cpp: the perplexity,
timing, machine-load and table helpers, and the seftc side of the benchmark on a tiny model."""
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, mod)
    spec.loader.exec_module(mod)
    return mod


lib = _module("peer_lib")
bench = _module("bench_peer")


def test_window_nll_is_cross_entropy_of_the_scored_tail():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 17, generator=gen) * 4
    window = torch.randint(0, 17, (9,), generator=gen).tolist()
    for scored in (8, 3, 1):
        want = torch.nn.functional.cross_entropy(logits[8 - scored:8].double(), torch.tensor(window[9 - scored:]), reduction="sum")
        assert lib.window_nll(logits.numpy(), window, scored) == pytest.approx(float(want), rel=1e-12)
    # large logits stay finite (log-sum-exp with the max taken out)
    assert math.isfinite(lib.window_nll(logits.numpy() * 1e4, window, 8))
    with pytest.raises(ValueError):
        lib.window_nll(logits.numpy(), window, 9)  # the first token has nothing to be predicted from
    with pytest.raises(ValueError):
        lib.window_nll(logits.numpy()[:8], window, 3)


def test_perplexity_and_rates():
    assert lib.perplexity(2 * math.log(5.0), 2) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        lib.perplexity(1.0, 0)
    assert lib.tokens_per_s(63, 0.5) == 126.0
    assert math.isnan(lib.tokens_per_s(63, 0.0))
    s = lib.summarize([10.0, 12.0, 8.0, 30.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (11.0, 8.0, 30.0, 4)
    assert s["spread"] == pytest.approx(22 / 11)


def test_first_mismatch():
    assert lib.first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert lib.first_mismatch([1, 2, 3], [1, 5, 3]) == 1
    assert lib.first_mismatch([1, 2], [1, 2, 3]) == 2
    assert lib.first_mismatch([], []) is None


def test_machine_load_from_proc_stat():
    text = "cpu  100 5 50 800 20 3 2 0 0 0\ncpu0 50 2 25 400 10 1 1 0 0 0\nintr 1\n"
    assert lib.parse_proc_stat(text) == (160, 980)
    with pytest.raises(ValueError):
        lib.parse_proc_stat("intr 1\n")
    # 200 jiffies passed, 120 busy, 100 of them ours: others used 10%
    assert lib.others_share((160, 980), (280, 1180), 100) == pytest.approx(0.1)
    assert lib.others_share((160, 980), (280, 1180), 500) == 0.0  # our count can run ahead of /proc/stat's
    assert lib.quiet_verdict(0.01, 2).startswith("quiet")
    assert lib.quiet_verdict(0.3, 2).startswith("BUSY")


def _row(name, engine, decode, ppl, spread=0.1, nbytes=2**20):
    stats = {"median": decode, "min": decode * (1 - spread / 2), "max": decode * (1 + spread / 2), "n": 3, "spread": spread}
    return {"name": name, "engine": engine, "label": name, "weights": "w", "weight_bytes": nbytes,
            "prefill_tps": dict(stats), "decode_tps": stats, "ppl": ppl}


def test_table_and_report():
    rows = [_row("llama.cpp Q8_0", "llama.cpp", 100.0, 30.0), _row("llama.cpp Q4_1", "llama.cpp", 150.0, 31.0),
            _row("seftc 70% int8", "seftc", 200.0, 45.5, spread=0.8, nbytes=3 * 2**20)]
    table = lib.render_table(rows)
    assert len(table) == 2 + len(rows)
    seftc_row = table[-1].split(" | ")
    assert seftc_row[3] == "3.0"  # MiB
    assert "⚠" in seftc_row[5]  # the wide spread is flagged
    assert seftc_row[6:8] == ["2.00×", "1.33×"]  # decode vs Q8_0 and vs Q4_1
    assert seftc_row[8].startswith("45.50")
    untimed = {**_row("seftc 70% int8", "seftc", 1.0, 45.6), "prefill_tps": None, "decode_tps": None}
    cells = lib.render_table(rows[:2] + [untimed])[-1].split(" | ")
    assert cells[4:8] == ["–", "–", "–", "–"] and cells[8].startswith("45.60")  # not timed: perplexity only
    summary = {"smoke": True, "elapsed_s": 90.0, "quiet": lib.quiet_verdict(0.0, 2), "models_note": "m", "notes": ["a note"],
               "settings": {"prompt_tokens": 128, "new_tokens": 64, "repeats": 3, "warmup": 1, "ppl_seqlen": 512,
                            "ppl_windows": 2, "ppl_tokens": 1022, "threads": 2, "text": "shakespeare:test"},
               "machine": {"cpu": "cpu", "cores": 2, "torch": "t", "isa": "avx512", "llama_cpp_python": "0.3.36", "cmake_args": "-DX=ON"},
               "rows": rows}
    md = lib.render_md(summary)
    assert "SMOKE RUN" in md and "1.5 min" in md and "quiet" in md and "- a note" in md
    assert "\n".join(table) in md
    assert "SMOKE RUN" not in lib.render_md({**summary, "smoke": False})


def test_settings_from_env():
    full, smoke = bench.settings_from_env({})
    assert not smoke and full == bench.Settings()
    quick, smoke = bench.settings_from_env({"BENCH_PEER_SMOKE": "1"})
    assert smoke and quick.repeats < full.repeats and quick.new_tokens < full.new_tokens
    s, _ = bench.settings_from_env({"BENCH_PEER_REPEATS": "3", "BENCH_PEER_THREADS": "1"})
    assert (s.repeats, s.threads) == (3, 1)
    for bad in ({"BENCH_PEER_NEW": "1"}, {"BENCH_PEER_REPEATS": "x"}):
        with pytest.raises(bench.BenchError):
            bench.settings_from_env(bad)


def test_seftc_perplexity_matches_seftc_eval():
    """The seftc side scores windows the way `seftc eval` does: same windows, same perplexity."""
    from seftc.data.corpus import TextSource
    from seftc.eval.perplexity import perplexity

    model, tok = build_tiny_model(), tiny_tokenizer()
    text = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 12
    want = perplexity(model, tok, TextSource("t", text), seqlen=32, limit=3)
    ids = tok(text, add_special_tokens=False).input_ids
    windows = bench.ppl_windows(ids, 32, 3)
    assert [n for _, n in windows] == [31, 31, 31] and all(len(w) == 32 for w, _ in windows)
    runner = bench.SeftcRunner("tiny", "tiny", "fp32", model)
    got = lib.perplexity(sum(runner.nll(windows)), sum(n for _, n in windows))
    assert got == pytest.approx(want.ppl, rel=1e-5)
    with pytest.raises(bench.BenchError):
        bench.ppl_windows(ids[:10], 32, 3)


def test_seftc_runner_generates_greedily_and_rounds_alternate():
    model = build_tiny_model()
    runner = bench.SeftcRunner("tiny", "tiny", "fp32", model)
    prompt = [5, 9, 17, 3, 8]
    out = runner.generate(prompt, 6)
    assert out["prefill_s"] > 0 and out["decode_s"] > 0 and len(out["tokens"]) == 6
    ids = torch.tensor([prompt])
    with torch.inference_mode():  # the same tokens as a plain greedy loop over the whole sequence
        for _ in range(6):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
    assert out["tokens"] == ids[0, len(prompt):].tolist()
    assert runner.weight_bytes == sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())

    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def generate(self, prompt, new_tokens):
            calls.append(self.name)
            return {"prefill_s": 1.0, "decode_s": 2.0, "tokens": [len(calls)]}

    samples = bench.run_rounds([Fake("a"), Fake("b"), Fake("c")], prompt, 4, repeats=2, warmup=1)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # the order rotates each round
    assert {k: len(v) for k, v in samples.items()} == {"a": 2, "b": 2, "c": 2}  # warm-up round not kept
    stats = bench.speed_stats(samples["a"], 128, 65)
    assert stats["prefill_tps"]["median"] == 128.0 and stats["decode_tps"]["median"] == 32.0


def test_kernels_of_names_what_runs_the_layers():
    from seftc.runtime import ops
    from seftc.runtime.convert import sparsify_model

    model = build_tiny_model()
    assert bench.kernels_of(model) == "torch"
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight[module.weight.abs() < module.weight.abs().median()] = 0
    assert sparsify_model(model).converted
    assert bench.kernels_of(model) == ops.backend()
