"""`make bench-runtime`'s pure parts (never run on SmolLM2 here) and the honest-timing rounds of
`seftc.runtime.bench` (repeat alternately until the spread settles, else say so)."""
import importlib.util
import itertools
from pathlib import Path

import pytest

from seftc.runtime.bench import LayerResult, PhaseResult, Timing, _rounds, distortion, settled

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_runtime():
    spec = importlib.util.spec_from_file_location("bench_runtime", ROOT / "bench" / "bench_runtime.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_setting_from_the_flag_or_the_environment(bench_runtime):
    env = bench_runtime.QUICK_ENV
    assert bench_runtime.quick_requested(True, {})
    assert bench_runtime.quick_requested(False, {env: "1"}) and bench_runtime.quick_requested(False, {env: "yes"})
    assert not any(bench_runtime.quick_requested(False, {env: v}) for v in ("", "0", "no", "false", " False "))
    assert not bench_runtime.quick_requested(False, {})


def test_int8_rows_only_when_the_int8_layout_exists(bench_runtime, capsys):
    assert bench_runtime.configs_to_run("50,70-int8,70", int8=False) == ["50", "70"]
    assert "skipping 70-int8" in capsys.readouterr().err
    assert bench_runtime.configs_to_run("50,70-int8,70", int8=True) == ["50", "70-int8", "70"]
    with pytest.raises(SystemExit, match="unknown config 60"):
        bench_runtime.configs_to_run("60", int8=True)
    assert bench_runtime.dtypes_for("70-int8", ["float32", "bfloat16"]) == ["bfloat16"]
    assert bench_runtime.dtypes_for("70", ["float32", "bfloat16"]) == ["float32", "bfloat16"]
    from seftc.compress.recipe import PackStage

    assert bench_runtime.int8_supported() == ("quantize" in PackStage.model_fields)


def _t(ms, spread=0.02, n=5):
    return Timing(ms, ms * (1 - spread), ms * (1 + spread), n, True)


def test_report_tables(bench_runtime):
    results = [PhaseResult("prefill", 1, 64, _t(100.0), _t(80.0)).to_json(),
               PhaseResult("prefill", 16, 64, _t(100.0), _t(110.0)).to_json(),  # 0.91x: below the never-slower goal
               PhaseResult("decode", 1, 16, _t(60.0), _t(20.0)).to_json()]  # 3x: above the 2.11x byte bound
    layer = LayerResult("model.layers.0.mlp.up_proj", (1536, 576), "bitmask", 0.7, 1, _t(0.4), _t(0.1), 3_538_944, 1_183_000)
    summary = {"machine": {"threads": 2, "isa": "avx512bf16", "torch": "x", "load_average_before": [0.5, 0.4, 0.3],
                           "load_average_after": [1.5, 1.0, 0.5]},
               "quick": False,
               "records": [{"config": "70", "dtype": "bfloat16", "layer_speedup_median": 4.0,
                            "bench": {"results": results, "byte_bound": 2.11,
                                      "memory": {"dense_model_bytes": 2**20, "sparse_model_bytes": 2**19,
                                                 "dense_bytes_per_token": 2**20, "sparse_bytes_per_token": 2**19}},
                            "layer_kinds": {"up_proj": {"n": 1, "dense_ms": 0.4, "sparse_ms": 0.1, "speedup": 4.0,
                                                        "byte_bound": layer.byte_bound}},
                            "dispatch": {"mode": "auto", "plans": [
                                {"shape": [1536, 576], "density": 0.3, "tokens": [1, 2, 4], "sparse_ms": [0.1, 0.2, 0.4],
                                 "dense_ms": [0.3, 0.3, 0.35], "first_dense_tokens": 4}]}}]}
    md = bench_runtime.render_md(summary)
    assert "0.50/0.40/0.30 before, 1.50/1.00/0.50 after" in md
    rows = {line.split("|")[3].strip() + " " + line.split("|")[4].strip(): line for line in md.splitlines()
            if line.startswith("| 70 | bfloat16 | prefill") or line.startswith("| 70 | bfloat16 | decode")}
    assert "| yes |" in rows["prefill 1"] and "**no**" in rows["prefill 16"]
    assert "distorted" in rows["decode 1"] and "byte bound" in rows["decode 1"] and "distorted" not in rows["prefill 1"]
    assert "| 70 | bfloat16 | 1536×576 | 0.30 | 1–4 | 4 | 0.400 / 0.350 |" in md
    assert f"| {layer.byte_bound:.2f}× |" in md and "≥ 2.20×" in md


def test_rounds_stop_once_settled_and_say_when_they_never_did():
    steady = itertools.cycle([1.00, 1.01, 0.99])
    calls = {"a": 0}

    def a():
        calls["a"] += 1
        return next(steady)

    t = _rounds({"a": a, "b": lambda: 2.0}, repeats=3, max_repeats=20)
    assert calls["a"] == 3 and t["a"].n == 3 and t["a"].settled and t["b"].settled

    noisy = itertools.cycle([1.0, 3.0, 0.5, 2.0])
    t = _rounds({"a": lambda: next(noisy), "b": lambda: 1.0}, repeats=3, max_repeats=8)
    assert t["a"].n == 8 and not t["a"].settled and t["b"].n == 8  # alternating: both sides get every round
    row = PhaseResult("decode", 1, 16, t["b"], t["a"]).to_json()
    assert row["settled"] is False and row["repeats"] == 8
    assert "had not settled after 8 rounds" in distortion(row, None)

    assert not settled([1.0, 1.0]) and settled([1.0, 1.05, 0.97]) and not settled([1.0, 2.0, 3.0])
