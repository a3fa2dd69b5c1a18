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


def test_rerun_is_cached_and_late_change_redoes_only_late_stages(tiny_dir, tmp_path, recipe_file):
    run = tmp_path / "run"
    assert _run(tiny_dir, run, recipe_file).exit_code == 0
    r = _run(tiny_dir, run, recipe_file, "--json")
    stages = {s["name"]: s["cached"] for s in json.loads(r.stdout)["stages"]}
    assert all(stages.values()), stages
    r = _run(tiny_dir, run, recipe_file, "--json", "--set", "eval.limit=3")
    stages = {s["name"]: s["cached"] for s in json.loads(r.stdout)["stages"]}
    assert stages["prune"] and stages["repair"] and stages["pack"]
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
