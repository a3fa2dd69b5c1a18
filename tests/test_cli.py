"""CLI conduct: prune/inspect work, and every bad input gives one line on stderr and exit 2,
with nothing left on disk."""
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from seftc.cli.main import cli

TEXT = str(Path(__file__).with_name("data") / "sonnets.txt")
FAST = ["--calib", TEXT, "--nsamples", "4", "--seqlen", "32"]


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_prune_then_inspect_json(tiny_dir, tmp_path):
    out = tmp_path / "p"
    code, stdout, stderr = run("prune", tiny_dir, "-o", out, "--method", "sparsegpt", "--pattern", "2:4", "--json", *FAST)
    assert code == 0, stderr
    manifest = json.loads(stdout)
    assert manifest["pattern"] == "2:4" and manifest["sparsity"] == 0.5
    code, stdout, _ = run("inspect", out, "--json")
    assert code == 0
    info = json.loads(stdout)
    assert info["sparsity"] == 0.5 and info["claimed_pattern"] == "2:4" and info["claimed_pattern_holds"] is True
    assert {layer["pattern"] for layer in info["layers"]} == {"2:4"}
    assert {layer["name"] for layer in info["layers"]} == {layer["name"] for layer in manifest["layers"]}
    for layer in info["layers"]:
        assert set(layer) >= {"name", "shape", "nonzero", "sparsity", "pattern"}
    code, stdout, _ = run("inspect", out)
    assert code == 0 and "2:4" in stdout


def test_inspect_flags_a_broken_claim(tiny_dir, tmp_path):
    out = tmp_path / "p"
    assert run("prune", tiny_dir, "-o", out, "--pattern", "2:4", *FAST)[0] == 0
    from safetensors.torch import load_file, save_file

    state = load_file(out / "model.safetensors")
    name = next(k for k in state if k.endswith("q_proj.weight"))
    state[name][0, :4] = 1.0
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    info = json.loads(run("inspect", out, "--json")[1])
    assert info["claimed_pattern_holds"] is False


def test_existing_output_needs_force(tiny_dir, tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, stderr = run("prune", tiny_dir, "-o", out, *FAST)
    assert code == 2 and "--force" in stderr and len(stderr.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "mine"
    code, _, stderr = run("prune", tiny_dir, "-o", out, "--force", *FAST)
    assert code == 0, stderr
    assert not (out / "keep.txt").exists() and (out / "seftc_manifest.json").exists()


def test_output_onto_input_is_refused(tiny_dir, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(tiny_dir, src)
    code, _, stderr = run("prune", src, "-o", src, "--force", *FAST)
    assert code == 2 and "overwrite the input" in stderr


def _bad_folder(tmp_path, tiny_dir, kind):
    d = tmp_path / kind
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    if kind == "unknown-arch":
        cfg["model_type"] = "no_such_arch"
    elif kind == "remote-code":
        cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    elif kind == "pickle-only":
        (d / "model.safetensors").rename(d / "pytorch_model.bin")
    elif kind == "bad-config":
        (d / "config.json").write_text("{not json")
        return d
    (d / "config.json").write_text(json.dumps(cfg))
    return d


BAD = [
    (lambda t, d: ["prune", t / "missing", "-o", t / "o"], "does not exist"),
    (lambda t, d: ["prune", d, "-o", t / "o", "--sparsity", "1.0"], "[0, 1)"),
    (lambda t, d: ["prune", d, "-o", t / "o", "--sparsity", "-0.1"], "[0, 1)"),
    (lambda t, d: ["prune", d, "-o", t / "o", "--pattern", "2:3", *FAST], "divisible by 3"),
    (lambda t, d: ["prune", d, "-o", t / "o", "--pattern", "4:2"], "0 < N < M"),
    (lambda t, d: ["prune", d, "-o", t / "o", "--pattern", "2:4", "--sparsity", "0.7"], "fixes the sparsity"),
    (lambda t, d: ["prune", d, "-o", t / "o", "--method", "random"], "--method"),
    (lambda t, d: ["prune", d, "-o", t / "o", "--dtype", "int8"], "--dtype"),
    (lambda t, d: ["prune", d, "-o", t / "o", "--calib", t / "nope.txt"], "does not exist"),
    (lambda t, d: ["prune", d, "-o", t / "o", "--calib", d / "model.safetensors"], "not a text file"),
    (lambda t, d: ["prune", d, "-o", t / "o", "--include", "nothing_matches"], "no linear layer"),
    (lambda t, d: ["prune", _bad_folder(t, d, "unknown-arch"), "-o", t / "o"], "unknown architecture"),
    (lambda t, d: ["prune", _bad_folder(t, d, "remote-code"), "-o", t / "o"], "--trust-remote-code"),
    (lambda t, d: ["prune", _bad_folder(t, d, "pickle-only"), "-o", t / "o"], "pickle"),
    (lambda t, d: ["inspect", _bad_folder(t, d, "bad-config")], "not readable JSON"),
    (lambda t, d: ["inspect", t / "weights.pt"], "does not exist"),
]


@pytest.mark.parametrize("make_args,expect", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_one_line_exit_2_nothing_written(make_args, expect, tiny_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    args = make_args(tmp_path, tiny_dir)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, stderr = run(*args)
    assert code == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expect in lines[0]
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temp folder


def test_pickle_file_is_refused(tmp_path):
    f = tmp_path / "model.pt"
    f.write_bytes(b"\x80\x04not really")
    code, _, stderr = run("inspect", f)
    assert code == 2 and "pickle" in stderr


def test_import_seftc_is_light():
    import subprocess
    import sys

    code = "import sys, seftc; assert 'torch' not in sys.modules and 'onnx' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
