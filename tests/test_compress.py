"""`seftc compress` on a tiny model: every stage, the report, recipe validation, stage caching."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from seftc.cli.main import cli
from seftc.compress.recipe import load_recipe, recipe_from_dict
from seftc.errors import SeftcError
from seftc.models.manifest import Manifest

TEXT = str(Path(__file__).with_name("data") / "sonnets.txt")
RECIPE = {
    "prune": {"method": "wanda", "sparsity": 0.6, "calib": TEXT, "nsamples": 4, "seqlen": 32},
    "repair": {"method": "seft", "data": TEXT, "eval_data": TEXT, "steps": 8, "seqlen": 32, "update_interval": 4,
               "accumulation": 2, "density": 0.05, "eval_every": 4},
    "pack": {"format": "auto"},
    "export": {"onnx": True},
    "bench": False,
    "eval": {"ppl": TEXT, "ppl_limit": 2, "seqlen": 64, "tasks": "piqa", "limit": 4},
}


def _run(model, run_dir, recipe_path, *extra):
    r = CliRunner().invoke(cli, ["compress", str(model), "--recipe", str(recipe_path), "-o", str(run_dir), *extra])
    return r


@pytest.fixture()
def recipe_file(tmp_path):
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(RECIPE))
    return p


def test_compress_every_stage_and_report_matches_saved_tensors(tiny_dir, tmp_path, recipe_file):
    run = tmp_path / "run"
    r = _run(tiny_dir, run, recipe_file)
    assert r.exit_code == 0, r.stderr
    report = json.loads((run / "report.json").read_text())
    md = (run / "report.md").read_text()
    for plot in report["plots"].values():
        assert (run / plot).is_file() and plot in md
    assert {"sparsity_per_layer", "regrown_per_layer", "loss_curves", "quality", "bytes"} <= set(report["plots"])
    final = Path(report["final_model"])
    assert final.is_dir() and final == Path(report["models"]["repaired"])
    # sparsity in the report equals sparsity counted from the saved tensors
    state = load_file(final / "model.safetensors")
    manifest = Manifest.load(final)
    counted = {rec.name: 1 - int(torch.count_nonzero(state[rec.name + ".weight"])) / state[rec.name + ".weight"].numel()
               for rec in manifest.layers}
    assert report["sparsity"]["repaired"]["layers"] == pytest.approx(counted)
    assert report["sparsity"]["repaired"]["sparsity"] == pytest.approx(0.6, abs=1e-3) == manifest.sparsity
    assert set(report["quality"]) == {"dense", "pruned", "repaired"}
    assert report["size"]["packed_file_bytes"] < report["size"]["pruned_safetensors"]
    assert "| repaired | 0.6000 |" in md
    assert report["export"]["relative_error"] < 1e-3 and (Path(report["export"]["path"]) / "model.onnx").is_file()
    # the sections a reader needs, and each plot's protocol under it
    for section in ("## Export (ONNX)", "max abs logit error", "Sparse initializers:", "Wall time of this run:",
                    "Topology updates: 1 (every 4 steps)", "| prune | ran |"):
        assert section in md, section
    for name, caption in report["plot_captions"].items():
        if name in report["plots"]:
            assert f"*{caption}*" in md
    assert set(report["plots"]) <= set(report["plot_captions"])
    # the code that produced the run is named (a published report must say which commit made it)
    import seftc
    import subprocess
    sw = report["software"]
    assert sw["seftc"] == seftc.__version__ and sw["torch"] == torch.__version__
    head = subprocess.run(["git", "-C", str(Path(seftc.__file__).resolve().parents[1]), "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode == 0:
        assert sw["commit"] == head.stdout.strip() and f"commit `{sw['commit'][:12]}`" in md
    else:
        assert sw["commit"] is None and "not a git checkout" in md


def test_rerun_is_cached_and_late_change_redoes_only_late_stages(tiny_dir, tmp_path, recipe_file):
    run = tmp_path / "run"
    assert _run(tiny_dir, run, recipe_file).exit_code == 0
    r = _run(tiny_dir, run, recipe_file, "--json")
    stages = {s["name"]: s["cached"] for s in json.loads(r.stdout)["stages"]}
    assert all(stages.values()), stages
    r = _run(tiny_dir, run, recipe_file, "--json", "--set", "eval.limit=3")
    stages = {s["name"]: s["cached"] for s in json.loads(r.stdout)["stages"]}
    assert stages["prune"] and stages["repair"] and stages["pack"]
    assert "| repair | from cache | original run took" in (run / "report.md").read_text()
    assert not stages["eval-dense"] and not stages["eval-repaired"]
    # a deleted stage is redone, and only it (and what depends on it keeps its key)
    pack = next(p for p in (run / "stages").iterdir() if p.name.startswith("pack-"))
    shutil.rmtree(pack)
    r = _run(tiny_dir, run, recipe_file, "--json", "--set", "eval.limit=3")
    stages = {s["name"]: s["cached"] for s in json.loads(r.stdout)["stages"]}
    assert not stages["pack"] and stages["repair"] and stages["eval-repaired"]
    assert "running" in r.stderr


@pytest.mark.parametrize("raw,expect", [
    ({"prune": {"sparsityy": 0.5}}, "prune.sparsityy"),
    ({"prunee": {}}, "prunee"),
    ({"repair": {"steps": 0}}, "repair.steps"),
    ({"model": False}, "model"),
    ({"eval": {"limit": "many"}}, "eval.limit"),
    ({"repair": [1, 2]}, "repair"),
])
def test_recipe_errors_name_the_key(raw, expect):
    with pytest.raises(SeftcError, match=expect.replace(".", r"\.")):
        recipe_from_dict(raw)


def test_cli_recipe_errors(tiny_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    for text, expect in [("prune: {method: nope}", "method"), ("prune: {sparsityy: 1}", "prune.sparsityy"),
                         ("eval: {tasks: 'piqa,nope'}", "nope"), ("[1, 2", "not valid YAML")]:
        bad.write_text(text)
        r = _run(tiny_dir, tmp_path / "run", bad)
        assert r.exit_code == 2 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "run" / "stages").exists()


def test_set_overrides_and_shipped_recipes():
    r = load_recipe(None, ["prune.sparsity=0.7", "export=false"])
    assert r.prune.sparsity == 0.7 and r.export is None
    for path in sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.yaml")):
        load_recipe(path)


def _speed(dense_spread, sparse_spread, speedup, bound=1.6):
    row = {"phase": "decode", "batch": 1, "tokens": 16, "dense_ms": 10.0, "sparse_ms": 10.0 / speedup, "speedup": speedup,
           "dense_spread_ms": dense_spread, "sparse_spread_ms": sparse_spread}
    return {"device": "cpu", "dtype": "float32", "threads": 2, "isa": "avx2", "byte_bound": bound,
            "config": {"repeats": 5, "warmup": 2, "prompt_tokens": 64, "new_tokens": 16}, "results": [row], "layers": []}


def _report(tiny_dir, tmp_path, outcomes, **recipe):
    from seftc.compress.report import write_report
    from seftc.compress.stages import StageOutcome

    outs = [StageOutcome(name, "k", tmp_path / name, result, True, 0.0) for name, result in outcomes]
    return write_report(tmp_path, recipe_from_dict(recipe), {"dense": str(tiny_dir)}, outs, wall_s=1.0), (tmp_path / "report.md").read_text()


def test_speedups_above_the_byte_bound_or_spread_wide_are_flagged_distorted(tiny_dir, tmp_path):
    report, md = _report(tiny_dir, tmp_path, [("bench", {"summary": _speed([9.9, 10.1], [7.9, 8.1], 1.25), "seconds": 30.0})])
    assert report["speed"]["results"][0]["distorted"] is None
    assert "distorted" not in md.split("## Speed")[1].split("![")[0] and "Other processes" not in md
    assert "| bench | from cache | original run took 30.0 s |" in md
    assert "whiskers" in report["plot_captions"]["speedup"] and "speedup" in report["plots"]
    report, md = _report(tiny_dir, tmp_path, [("bench", {"summary": _speed([9.9, 10.1], [0.2, 0.3], 45.5), "seconds": 30.0})])
    assert "above the byte bound 1.60" in report["speed"]["results"][0]["distorted"]
    assert "1 of 1 rows are marked distorted" in md
    _, md = _report(tiny_dir, tmp_path, [("bench", {"summary": _speed([2.0, 30.0], [7.9, 8.1], 1.25), "seconds": 30.0})])
    assert "distorted: dense repeats spread" in md


def test_no_topology_update_gives_a_note_instead_of_an_empty_plot(tiny_dir, tmp_path):
    repair = {"history": {"train_loss": [[1, 3.0], [2, 2.9]], "eval_loss": [[0, 3.1], [2, 3.0]], "regrown": []},
              "manifest": {"layer_stats": {"a": {"regrown": 0}, "b": {"regrown": 0}}}, "seconds": 5.0}
    report, md = _report(tiny_dir, tmp_path, [("repair", repair)], repair={"steps": 6, "update_interval": 10})
    assert "regrown_per_layer" not in report["plots"] and "loss_curves" in report["plots"]
    assert "No topology update happened" in md and "6 steps with an update every 10 steps" in md
    assert "Warning" not in md
    repair["manifest"]["config"] = {"warnings": ["training loss ended above where it started (3.000 → 9.000)"]}
    _, md = _report(tiny_dir, tmp_path, [("repair", repair)], repair={"steps": 6, "update_interval": 10})
    assert "**Warning**: training loss ended above where it started (3.000 → 9.000)." in md.split("## Repair")[1]


def test_export_section_says_why_no_sparse_initializers(tiny_dir, tmp_path):
    summary = {"model_file": "x/model.onnx", "bytes": 1000, "dense_bytes": 1000, "opset": 17, "kv_cache": True, "sparse_tensors": 0,
               "max_abs_error": 1e-5, "logit_scale": 10.0, "relative_error": 1e-6, "tolerance": 1e-3, "checks": [{}, {}]}
    _, md = _report(tiny_dir, tmp_path, [("export", {"summary": summary, "seconds": 4.0})])
    section = md.split("## Export (ONNX)")[1]
    assert "1,000 bytes" in section and "max abs logit error 1e-05" in section
    assert "none used" in section and "above 50% sparsity" in section


@pytest.mark.parametrize("text,check", [
    ("bench.batch=1", lambda r: r.bench.batch == "1"),
    ("bench.batch=1,4", lambda r: r.bench.batch == "1,4"),
    ("prune.sparsity=0.7", lambda r: r.prune.sparsity == 0.7),
    ("repair.lr=1e-3", lambda r: r.repair.lr == 1e-3),
    ("eval.limit=3", lambda r: r.eval.limit == 3),
    ("eval.tasks=null", lambda r: r.eval.tasks is None),
    ("export=false", lambda r: r.export is None),
    ("prune.owl=yes", lambda r: r.prune.owl is True),
])
def test_set_values_are_yaml_scalars_coerced_by_the_stage(text, check):
    assert check(load_recipe(None, [text]))


@pytest.mark.parametrize("text,expect", [
    ("repair.steps=0", "--set repair.steps=0: "),
    ("repair.method=nope", "--set repair.method=nope: unknown repair method"),
    ("repair.stepz=3", "--set repair.stepz=3: unknown key"),
    ("prune.sparsity=abc", "--set prune.sparsity=abc: "),
    ("export=3", "--set export=3: "),
])
def test_set_errors_name_the_set_key(text, expect):
    with pytest.raises(SeftcError) as e:
        load_recipe(None, [text])
    assert str(e.value).startswith(expect) and "Value error" not in str(e.value)


def test_builtin_demo_recipe_end_to_end_on_a_tiny_model(tiny_dir, tmp_path):
    """`make demo`'s recipe (the built-in default) as shipped, only the texts swapped for a small file:
    every stage runs and the repair reaches two topology updates."""
    from seftc.compress.recipe import DEFAULT_RECIPE

    raw = yaml.safe_load(DEFAULT_RECIPE.read_text())
    assert raw["repair"]["steps"] > 2 * load_recipe(None).repair.update_interval  # two updates, with a margin
    texts = [f"prune.calib={TEXT}", f"repair.data={TEXT}", f"repair.eval_data={TEXT}", f"eval.ppl={TEXT}"]
    r = CliRunner().invoke(cli, ["compress", str(tiny_dir), "-o", str(tmp_path / "run"), "--json",
                                 *[a for t in texts for a in ("--set", t)]])
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert [s["name"] for s in report["stages"]] == ["prune", "repair", "pack", "export", "bench", "eval-dense", "eval-pruned",
                                                    "eval-repaired"]
    assert len(report["training"]["regrown"]) == 2
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Topology updates: 2 (every 10 steps)" in md and "## Speed" in md and "## Export (ONNX)" in md
