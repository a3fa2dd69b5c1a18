"""Slow tier: the real SmolLM2-135M-Instruct end to end (run with `make test-slow`)."""
import json

import pytest
import torch
from click.testing import CliRunner

from seftc.cli.main import cli

pytestmark = pytest.mark.slow


def test_gguf_and_default_load_the_same_weights():
    from seftc.data.resources import smollm2_gguf
    from seftc.models.loading import load_model

    a = load_model("default", need_tokenizer=False).model.state_dict()
    b = load_model(str(smollm2_gguf())).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prune_inspect_eval_real_model(tmp_path):
    out = tmp_path / "wanda24"
    runner = CliRunner()
    r = runner.invoke(cli, ["prune", "default", "-o", str(out), "--method", "wanda", "--pattern", "2:4", "--nsamples", "8", "--seqlen", "256", "--json"])
    assert r.exit_code == 0, r.stderr
    manifest = json.loads(r.stdout)
    # the dequantized GGUF weights hold exact zeros, some of which 2:4 keeps: measured sparsity >= 0.5
    assert len(manifest["layers"]) == 30 * 7 and 0.5 <= manifest["sparsity"] < 0.5001
    r = runner.invoke(cli, ["inspect", str(out), "--json"])
    info = json.loads(r.stdout)
    assert info["claimed_pattern_holds"] is True and info["sparsity"] == manifest["sparsity"]
    dense = json.loads(runner.invoke(cli, ["eval", "default", "--ppl", "shakespeare:test", "--limit", "4", "--json"]).stdout)
    pruned = json.loads(runner.invoke(cli, ["eval", str(out), "--ppl", "shakespeare:test", "--limit", "4", "--json"]).stdout)
    assert 10 < dense["ppl"] < 100
    assert dense["ppl"] < pruned["ppl"] < 20 * dense["ppl"]


def test_seft_repair_real_model_keeps_exact_sparsity(tmp_path):
    from safetensors.torch import load_file

    from seftc.prune.api import prune
    from seftc.repair.api import repair

    pruned = tmp_path / "w50"
    prune("default", method="wanda", sparsity=0.5, calib={"nsamples": 4, "seqlen": 128}, output=pruned)
    out = tmp_path / "seft"
    r = repair(str(pruned), method="seft", steps=4, batch_size=2, seqlen=128, update_interval=2, accumulation=1,
               eval_every=2, eval_windows=2, output=out)
    before, after = load_file(pruned / "model.safetensors"), load_file(out / "model.safetensors")
    for rec in r.manifest.layers:
        key = rec.name + ".weight"
        assert int(torch.count_nonzero(before[key])) == int(torch.count_nonzero(after[key]))
    assert sum(s["regrown"] for s in r.manifest.layer_stats.values()) > 0
