"""The repair benchmarks' scripts on tiny settings (never on SmolLM2 here): the one-update replay
(bench/replay_update.py) and `make bench-repair-commonsense` as wired in the Makefile."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TEXT = str(Path(__file__).with_name("data") / "sonnets.txt")


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_replay_update_on_tiny_model(tiny_dir, tmp_path, calib_file):
    replay = _module("replay_update")
    rows = replay.main(["--model", str(tiny_dir), "--work", str(tmp_path / "work"), "--calib", TEXT, "--calib-n", "4",
                        "--calib-seqlen", "32", "--data", TEXT, "--in-data", TEXT, "--out-data", str(calib_file), "--windows", "2",
                        "--steps-in", "3", "--total-steps", "12", "--seqlen", "32", "--options", '{"density": 0.05, "init": "gradient"}',
                        "--name", "replay", "--results-dir", str(tmp_path / "results")])
    assert [r["score"] for r in rows] == list(replay.SCORES)
    # the same run up to the update: identical loss before it, and (reactivation always) the same number evicted
    assert len({(r["in_before"], r["out_before"]) for r in rows}) == 1
    assert len({r["evicted"] for r in rows}) == 1 and rows[0]["evicted"] > 0
    assert len({(r["in_after"], r["out_after"]) for r in rows}) > 1  # the scores evicted different positions
    text = (tmp_path / "results" / "replay.md").read_text()
    assert all(label in text for label in replay.LABELS.values())
    assert json.loads((tmp_path / "results" / "replay.json").read_text())["rows"] == rows


def _make_env(target: str) -> dict[str, str]:
    """The BENCH_* assignments `make TARGET` runs bench_repair.py with (parsed as bench-repair-curve parses them)."""
    return _module("bench_repair_curve").make_env(target)


def test_cached_rows_compare_only_their_method_family_fields():
    """A changed SEFT default leaves static's and LoRA's cached rows valid; a field of the row's own family does not."""
    from seftc.repair.config import make_repair_config

    bench = _module("bench_repair")
    for method, foreign, own in (("static", "evict_score", "static_precision"), ("masked-lora", "density", "lora_r"),
                                 ("seft", "lora_r", "evict_score")):
        config = make_repair_config(method=method).model_dump()
        row = {"key": "k", "config": config}
        other = {**config, foreign: "changed"}
        assert bench._relevant({"key": "k", "config": other}) == bench._relevant(row)
        assert bench._relevant({"key": "k", "config": {**config, own: "changed"}}) != bench._relevant(row)
        assert bench._relevant({"key": "k", "config": {**config, "steps": 1}}) != bench._relevant(row)


def test_bench_140_covers_noregrow_and_2of4():
    env = _make_env("bench-repair-140")
    # masked LoRA at its tuned default lr (1e-2; ahead of static on validation at 40 steps), seed 0 only
    assert env["BENCH_METHODS"].split(",") == ["seft", "static", "seft-noregrow", "seft@r30l", "masked-lora"]
    assert env["BENCH_PATTERNS"].split(",") == ["0.7", "2:4"] and env["BENCH_SEEDS"] == "0,1,2"
    settings = json.loads(env["BENCH_SETTINGS"])
    assert set(settings) == {"seft", "static", "seft-noregrow", "seft@r30l"}
    # SEFT at static's capacity: the SEFT options with ρ 0.3 and lr 1e-3 (the later keys win)
    assert settings["seft@r30l"] == {**settings["seft"], "density": 0.3, "lr": 0.001}


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["seft-2-tasks", "all"])
def test_bench_repair_commonsense_on_tiny_settings(tiny_dir, tmp_path, full):
    """The target's own settings on a tiny model (fast tier: SEFT and two of the eight tasks;
    the slow tier runs the four methods and all eight)."""
    env = _make_env("bench-repair-commonsense")
    assert env["BENCH_DATA"] == "commonsense:train" and env["BENCH_LIMIT"] == "1200"  # standard error ≤ 1.44 points per task
    tasks = env["BENCH_TASKS"].split(",")
    methods = env["BENCH_METHODS"].split(",")
    assert len(tasks) == 8 and set(methods) == {"seft", "static", "masked-lora", "lora-merge"}
    assert env["BENCH_PATTERNS"] == "0.5,0.7"
    if not full:
        tasks, methods = tasks[:2], ["seft"]
        env.update(BENCH_TASKS=",".join(tasks), BENCH_METHODS="seft")
    tiny = {"BENCH_MODEL": str(tiny_dir), "BENCH_STEPS": "3", "BENCH_PATTERNS": "0.7", "BENCH_LIMIT": "2", "BENCH_PPL_WINDOWS": "1",
            "BENCH_PPL_SEQLEN": "32", "BENCH_SEQLEN": "32", "BENCH_CALIB": TEXT, "BENCH_CALIB_N": "4", "BENCH_CALIB_SEQLEN": "32",
            "BENCH_DIR": str(tmp_path / "work"), "BENCH_RESULTS_DIR": str(tmp_path / "results"), "BENCH_JOBS": "1",
            "BENCH_DAMAGE_WINDOWS": "1", "BENCH_SETTINGS": json.dumps({"seft": {"update_interval": 2, "accumulation": 1, "density": 0.05}})}
    run_env = {**os.environ, **env, **tiny, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_repair.py")], cwd=ROOT, env=run_env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "results" / "repair-commonsense.json").read_text())
    rows = results["patterns"]["0.7"]["rows"]
    assert {row["method"] for row in rows} == set(methods)
    assert all(set(row["tasks"]) == set(tasks) and all("stderr" in t for t in row["tasks"].values()) for row in rows)
    # which items each row got right, for paired comparisons: as many as were scored, and as many right as the accuracy says
    assert all(len(t["correct"]) == t["n"] and t["correct"].count("1") == round(t["acc"] * t["n"]) for row in rows for t in row["tasks"].values())
    seft = next(row for row in rows if row["method"] == "seft")
    assert len(seft["update_damage"]) == 1 and "out_before" in seft["update_damage"][0]
    table = (tmp_path / "results" / "repair-commonsense.md").read_text()
    assert "mean acc" in table and "commonsense:train" in table and "±" in table
    if full:
        return
    # rows are cached with their inputs: the same settings measure nothing again, other settings stop the benchmark
    bench = [sys.executable, str(ROOT / "bench" / "bench_repair.py")]
    again = subprocess.run(bench, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "[bench-repair]" not in again.stderr, again.stderr[-2000:]
    assert json.loads((tmp_path / "results" / "repair-commonsense.json").read_text())["patterns"] == results["patterns"]
    # a fresh clone (no runs/): the rows come back from the committed results file and nothing is measured again
    shutil.rmtree(tmp_path / "work" / "rows")
    fresh = subprocess.run(bench, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=300)
    notes = [line for line in fresh.stderr.splitlines() if line.startswith("[bench-repair]")]
    assert fresh.returncode == 0 and len(notes) == 1 and "row(s) taken from" in notes[0], fresh.stderr[-2000:]
    assert json.loads((tmp_path / "results" / "repair-commonsense.json").read_text())["patterns"] == results["patterns"]
    # rows cached before per-item outcomes were kept get them by scoring their saved model again (the same accuracies)
    cached = tmp_path / "work" / "rows" / "pruned-0.7-seft-s0.json"
    full_row = json.loads(cached.read_text())
    cached.write_text(json.dumps({**full_row, "tasks": {k: {f: v for f, v in t.items() if f != "correct"} for k, t in full_row["tasks"].items()}}))
    backfill = subprocess.run(bench, cwd=ROOT, env={**run_env, "BENCH_ITEMS_BACKFILL": "1"}, capture_output=True, text=True, timeout=300)
    assert backfill.returncode == 0, backfill.stderr[-2000:]
    assert json.loads(cached.read_text()) == full_row
    task = tasks[0]
    tampered = {**full_row, "tasks": {**full_row["tasks"], task: {"acc": 1.5 - full_row["tasks"][task]["acc"], "stderr": 0.0, "n": 2}}}
    cached.write_text(json.dumps(tampered))
    refused = subprocess.run(bench, cwd=ROOT, env={**run_env, "BENCH_ITEMS_BACKFILL": "1"}, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "scored again gives other accuracies" in refused.stderr and "Traceback" not in refused.stderr
    assert json.loads(cached.read_text()) == tampered  # left as it was
    cached.write_text(json.dumps(full_row))
    # a run that fails says why at once, the others go on, the table shows what was measured, and the benchmark exits non-zero
    broken = {**run_env, "BENCH_METHODS": "seft,static", "BENCH_SETTINGS": json.dumps(
        {**json.loads(run_env["BENCH_SETTINGS"]), "static": {"data": str(tmp_path / "no-such-text.txt")}})}
    failed = subprocess.run(bench, cwd=ROOT, env=broken, capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0 and "[bench-repair] pruned-0.7-static-s0 failed (exit" in failed.stderr
    assert "no-such-text.txt" in failed.stderr and "1 run(s) failed: pruned-0.7-static-s0" in failed.stderr
    assert "Traceback (most recent call last)" not in failed.stderr.split("failed (exit")[0]
    assert [r["method"] for r in json.loads((tmp_path / "results" / "repair-commonsense.json").read_text())["patterns"]["0.7"]["rows"]] == ["seft"]
    other = {**run_env, "BENCH_SETTINGS": json.dumps({"seft": {"update_interval": 2, "accumulation": 1, "density": 0.1}})}
    changed = subprocess.run(bench, cwd=ROOT, env=other, capture_output=True, text=True, timeout=300)
    assert changed.returncode != 0 and "pruned-0.7-seft-s0.json was measured with other config, options;" in changed.stderr
    assert "Traceback" not in changed.stderr


def test_bench_repair_curve_on_tiny_settings(tiny_dir, tmp_path, monkeypatch):
    """`make bench-repair-curve` on a tiny model and the tiny random shape: each point's quality (bench_repair.py
    with bench-repair-140's settings, ρ or rank changed) and memory (2 steps, own process), the Pareto marks, the plot."""
    curve = _module("bench_repair_curve")
    settings = json.loads(_make_env("bench-repair-140")["BENCH_SETTINGS"])
    pts = curve.points(settings)
    assert [p["label"] for p in pts if p["method"] == "seft"] == [f"seft ρ={r:g}" for r in curve.DENSITIES]
    assert {p["name"] for p in pts} >= {"seft", "static", "masked-lora"}  # bench-repair-140's own rows at its ρ and default rank
    assert all(p["options"]["evict_score"] == "window" for p in pts if p["method"] == "seft")
    # the target's own rows (ρ 0.1, rank 8, static) run with the target's options exactly, so their cached rows are reused
    ran = curve.bench_settings(pts, settings)
    assert {n: ran[n] for n in ("seft", "static", "masked-lora")} == {n: settings.get(n, {}) for n in ("seft", "static", "masked-lora")}
    assert ran["masked-lora@r16"]["lora_r"] == 16 and ran["seft@rho0.02"]["density"] == 0.02
    # a rank whose learning rate validation chose apart from the method's runs at it, under its own name
    monkeypatch.setattr(curve, "RANK_LR", {"masked-lora": {"16": 0.005, "64": 0.01}})
    tuned = {p["name"]: p for p in curve.points(settings)}
    monkeypatch.setattr(curve, "RANK_LR", {})
    assert tuned["masked-lora@r16lr5e-3"]["options"] == {"lora_r": 16, "lr": 0.005} and "masked-lora@r16" not in tuned
    assert tuned["masked-lora@r16lr5e-3"]["label"] == "masked-lora r=16 lr=5e-3"
    assert tuned["masked-lora@r64lr1e-2"]["options"]["lr"] == 0.01 and tuned["lora-merge@r16"]["options"] == {"lora_r": 16}
    assert curve.pareto({"a": (1.0, 5.0), "b": (2.0, 4.0), "c": (2.0, 6.0), "d": (1.0, 5.0)}) == {"a", "b", "d"}
    env = {**os.environ, "BENCH_MODEL": str(tiny_dir), "BENCH_STEPS": "2", "BENCH_SEQLEN": "32", "BENCH_CALIB": TEXT, "BENCH_CALIB_N": "4",
           "BENCH_CALIB_SEQLEN": "32", "BENCH_PPL_WINDOWS": "1", "BENCH_PPL_SEQLEN": "32", "BENCH_TASKS": "", "BENCH_JOBS": "1",
           "BENCH_DAMAGE_WINDOWS": "0", "BENCH_DIR": str(tmp_path / "work"), "BENCH_RESULTS_DIR": str(tmp_path / "results"),
           "BENCH_DENSITIES": "0.05,0.1", "BENCH_RANKS": "4", "BENCH_LORAS": "masked-lora", "BENCH_SHAPE": "tiny", "BENCH_SCALE_DIR": str(tmp_path / "scale"),
           "BENCH_NSAMPLES": "2", "BENCH_REPAIR_DATA": TEXT, "BENCH_REPAIR_SEQLEN": "32", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_repair_curve.py")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "results" / "repair-curve.json").read_text())
    labels = [p["label"] for p in out["points"]]
    assert labels == ["seft ρ=0.05", "seft ρ=0.1", "masked-lora r=4", "static"]
    for p in out["points"]:
        assert p["ppl_in"] > 0 and p["peak_gib"] >= p["train_peak_gib"] > 0 and p["plan_7b"] > 0 and p["front_ppl_in"] in (True, False)
        assert p["plan_front_ppl_out"] in (True, False)
    for key in ("ppl_in", "ppl_out"):  # the 7B-plan front is taken on the projected memory, not the measured one
        for p in out["points"]:
            dominated = any(o["plan_7b"] <= p["plan_7b"] and o[key] <= p[key] and (o["plan_7b"] < p["plan_7b"] or o[key] < p[key])
                            for o in out["points"] if o is not p)
            assert p[f"plan_front_{key}"] is not dominated
    assert any(p["front_ppl_out"] for p in out["points"])
    seft = [p for p in out["points"] if p["method"] == "seft"]
    assert seft[0]["trainable"] < seft[1]["trainable"] and seft[0]["plan_7b"] < seft[1]["plan_7b"]
    text = (tmp_path / "results" / "repair-curve.md").read_text()
    assert "Pareto front" in text and "Not yet measured" not in text and (tmp_path / "results" / "repair-curve.png").is_file()
    # a fresh clone (no runs/): both kinds of rows come from the committed results, nothing is measured again
    shutil.rmtree(tmp_path / "work")
    (tmp_path / "scale" / "rows.json").unlink()
    again = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_repair_curve.py")], cwd=ROOT, env={**env, "BENCH_ONLY_CACHED": "1"},
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "memory row(s) taken from" in again.stderr
    assert re.search(r"\[bench-repair\] \d+ row\(s\) taken from \S*repair-curve-runs\.json", again.stderr)
    redrawn = json.loads((tmp_path / "results" / "repair-curve.json").read_text())
    assert [(p["ppl_in"], p["ppl_out"], p["peak_gib"], p["memory_commit"]) for p in redrawn["points"]] == \
        [(p["ppl_in"], p["ppl_out"], p["peak_gib"], p["memory_commit"]) for p in out["points"]]
    assert "Not yet measured" not in (tmp_path / "results" / "repair-curve.md").read_text()


def test_interrupted_bench_run_resumes_and_an_interrupted_evaluation_skips_training(tiny_dir, tmp_path, monkeypatch):
    """A benchmark run killed mid-training (a session's end) continues from its last checkpoint, and one killed
    during its evaluation is evaluated again without training: both give the uninterrupted run's row."""
    from safetensors.torch import load_file

    from seftc.repair import checkpoint

    tiny = {"BENCH_MODEL": str(tiny_dir), "BENCH_STEPS": "6", "BENCH_TASKS": "", "BENCH_PPL_WINDOWS": "1", "BENCH_PPL_SEQLEN": "32",
            "BENCH_SEQLEN": "32", "BENCH_CALIB": TEXT, "BENCH_CALIB_N": "4", "BENCH_CALIB_SEQLEN": "32", "BENCH_DIR": str(tmp_path / "work"),
            "BENCH_DAMAGE_WINDOWS": "1", "BENCH_CHECKPOINT_EVERY": "2",
            "BENCH_SETTINGS": json.dumps({"seft": {"update_interval": 2, "accumulation": 1, "density": 0.05, "init": "gradient",
                                                "reactivation": "always", "row_cap": 0.2, "reactivation_cap": 0.05}})}
    for k, v in tiny.items():
        monkeypatch.setenv(k, v)
    bench = _module("bench_repair")
    bench.WORK.mkdir()
    src = str(bench._pruned("0.7"))
    ref = bench.worker(src, "seft", 0, str(tmp_path / "ref"))
    assert ref["regrown"] > 0 and len(ref["update_damage"]) == 2 and "resumed_from_step" not in ref

    save = checkpoint.Checkpoints.save

    def save_then_die(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == 4:
            raise KeyboardInterrupt

    out = tmp_path / "work" / "run"
    monkeypatch.setattr(checkpoint.Checkpoints, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        bench.worker(src, "seft", 0, str(out))
    assert not out.exists() and checkpoint.latest_step(checkpoint.default_dir(out)) is not None
    monkeypatch.setattr(checkpoint.Checkpoints, "save", save)
    row = bench.worker(src, "seft", 0, str(out))
    assert row.pop("resumed_from_step") == 4
    keys = ("regrown", "positions_moved", "rows_emptied", "trainable", "update_damage", "ppl_in", "ppl_out", "sparsity")
    assert {k: row[k] for k in keys} == {k: ref[k] for k in keys}
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not checkpoint.default_dir(out).exists()

    # killed during the evaluation: the kept training part is reused, nothing is trained again
    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(bench, "_train", no_training)
    again = bench.worker(src, "seft", 0, str(out))
    assert again == {**row, "resumed_from_step": 4}
    # other options: the kept part is not theirs, so the run trains
    bench.SETTINGS["seft"] = {**bench.SETTINGS["seft"], "density": 0.1}
    with pytest.raises(AssertionError, match="trained again"):
        bench.worker(src, "seft", 0, str(out))


def test_paired_difference_of_two_rows_on_the_same_items():
    """The mean over tasks of the per-item differences, its error from their spread; drawn for every two scored rows."""
    bench = _module("bench_repair")
    a = {"x": {"acc": 0.5, "stderr": 0.29, "n": 4, "correct": "1100"}, "y": {"acc": 1.0, "stderr": 0.0, "n": 2, "correct": "11"}}
    b = {"x": {"acc": 0.25, "stderr": 0.25, "n": 4, "correct": "1000"}, "y": {"acc": 0.5, "stderr": 0.5, "n": 2, "correct": "10"}}
    diff, se = bench.paired_difference(a, b)
    # x: d = 0,1,0,0 (mean .25, variance .25 → .0625 over 4 items); y: d = 0,1 (mean .5, variance .5 → .25 over 2)
    assert diff == pytest.approx(0.375) and se == pytest.approx((0.0625 + 0.25) ** 0.5 / 2)
    assert bench.paired_difference(a, a) == (0.0, 0.0)
    assert bench.paired_difference(a, {"x": b["x"]}) is None  # other tasks
    assert bench.paired_difference(a, {**b, "y": {"acc": 0.5, "stderr": 0.5, "n": 2}}) is None  # a row without its items
    row = lambda method, tasks: {"method": method, "seed": 0, "ppl_in": 10.0, "ppl_out": 20.0, "regrown": 0, "tasks": tasks}  # noqa: E731
    results = {"protocol": "p", "steps": 1, "dense": {**row("dense", a), "ppl_in": 5.0, "ppl_out": 6.0}, "patterns": {"0.7": {"pruned": row("pruned", b),
               "rows": [row("masked-lora", a), row("seft", b), row("static", {k: {f: v for f, v in t.items() if f != "correct"}
                                                                                for k, t in b.items()})]}}}
    text = bench.render(results)
    assert "| 0.7 | masked-lora (s0) − seft (s0) | +37.50 | 27.95 | +1.3 |" in text
    assert "static (s0) |" not in text.split("Paired differences")[1]  # scored before rows kept their items: no pair
