"""A new user's first hour (issue 14): progress visible in logs, full-width tables when piped,
helpful errors (typo'd command, --set), what an interrupted run kept, file modes, pickle files,
packing a dense model."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from seftc.cli.main import cli

TEXT = str(Path(__file__).with_name("data") / "sonnets.txt")
FAST = ["--calib", TEXT, "--nsamples", "4", "--seqlen", "32"]


def run(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def seftc(*args, env=None):
    """The real CLI in a subprocess: stdout and stderr are pipes, not terminals."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "seftc.cli.main", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=600)


@pytest.fixture(scope="module")
def pruned(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ux") / "pruned"
    code, _, stderr = run("prune", tiny_dir, "-o", out, "--sparsity", "0.6", *FAST)
    assert code == 0, stderr
    return out


# -- progress in logs -------------------------------------------------------------------------------

def test_repair_in_a_log_prints_periodic_progress_lines(pruned, tmp_path):
    r = seftc("repair", pruned, "-o", tmp_path / "r", "--data", TEXT, "--eval-data", TEXT, "--steps", "6", "--seqlen", "32",
              "--update-interval", "3", "--accumulation", "1", "--eval-every", "3", env={"SEFTC_PROGRESS_EVERY": "0"})
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("repair (seft):")]
    assert len(lines) >= 5, r.stderr  # one per step with a 0 s period
    mid = next(line for line in lines if "3/6" in line)
    for part in ("(50%)", "loss=", "tokens_per_s=", "elapsed ", "ETA "):
        assert part in mid, mid
    assert "6/6 (100%)" in lines[-1] and "done" in lines[-1]
    assert "\x1b[" not in r.stderr  # no terminal control codes in a log


def test_line_progress_is_periodic_and_silent_for_short_tasks():
    import io

    from seftc.cli.plain_progress import LineProgress

    now = [0.0]
    out = io.StringIO()
    p = LineProgress(every=10, stream=out, clock=lambda: now[0])
    quick = p.task("quick", 3)
    for _ in range(3):
        quick()
    assert out.getvalue() == ""  # finished within the period: nothing printed
    slow = p.task("train", 100)
    for _ in range(100):
        now[0] += 1.0
        p.status(loss=2.5)
        slow()
    lines = out.getvalue().splitlines()
    assert 9 <= len(lines) <= 11 and all(line.startswith("train: ") and "loss=2.5" in line for line in lines)
    assert "100/100 (100%)" in lines[-1] and "ETA" in lines[0]


def test_piped_tables_and_lines_are_not_cut_at_80_columns(pruned):
    r = seftc("inspect", pruned)
    assert r.returncode == 0, r.stderr
    footer = [line for line in r.stdout.splitlines() if line.startswith("target sparsity")]
    assert len(footer) == 1 and "on disk" in footer[0] and len(footer[0]) > 80
    assert "…" not in r.stdout


def test_gguf_conversion_bar_follows_transformers_switch():
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from seftc.models.loading import _gguf_bar_follows_transformers

    original = gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    try:
        with _gguf_bar_follows_transformers():
            assert gguf_utils.tqdm(range(2)).disable
        assert gguf_utils.tqdm is original
    finally:
        hf_logging.enable_progress_bar()
    with _gguf_bar_follows_transformers():
        assert gguf_utils.tqdm is original


# -- errors ---------------------------------------------------------------------------------------------

def test_typo_in_a_command_suggests_the_closest():
    code, _, stderr = run("prun", "x")
    assert code == 2 and "did you mean 'prune'" in stderr and len(stderr.strip().splitlines()) == 1


def test_help_lists_whole_summaries():
    code, stdout, _ = run("--help")
    assert code == 0 and "..." not in stdout.split("Commands:")[1]


def test_error_line_comes_alone_without_a_blank_line(tiny_dir, tmp_path):
    r = seftc("compress", tiny_dir, "-o", tmp_path / "run", "--set", "repair.steps=0")
    assert r.returncode == 2
    assert r.stderr.startswith("error: --set repair.steps=0:") and len(r.stderr.splitlines()) == 1, repr(r.stderr)


def test_interrupted_compress_says_what_it_kept(tiny_dir, tmp_path, monkeypatch):
    import yaml

    import seftc.compress.pipeline as pipeline

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "evaluate_variant", interrupt)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"prune": {"sparsity": 0.5, "calib": TEXT, "nsamples": 2, "seqlen": 32}, "repair": False,
                                      "pack": False, "export": False, "bench": False, "eval": {"ppl": TEXT, "tasks": None}}))
    code, _, stderr = run("compress", tiny_dir, "--recipe", recipe, "-o", tmp_path / "run")
    assert code == 2 and "nothing was written" not in stderr
    assert "kept 1 finished stage" in stderr and "prune-" in stderr and "reuses them" in stderr


def test_interrupted_repair_names_its_checkpoint(tmp_path):
    from seftc.repair.api import interrupted_message

    out = tmp_path / "r"
    assert "nothing was written" in interrupted_message(out)
    ckpt = tmp_path / "r.checkpoint"
    (ckpt / "step-4").mkdir(parents=True)
    (ckpt / "step-4" / "meta.json").write_text("{}")
    (ckpt / "latest").write_text("step-4")
    assert "--resume" in interrupted_message(out) and "step-4" in interrupted_message(out)


# -- small correctness items ------------------------------------------------------------------------------

def test_written_files_follow_the_umask(tiny_dir, tmp_path):
    old = os.umask(0o022)
    try:
        code, _, stderr = run("prune", tiny_dir, "-o", tmp_path / "p", *FAST)
    finally:
        os.umask(old)
    assert code == 0, stderr
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "p").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) == 0o755


def test_standalone_pickle_file_loads_only_with_allow_pickle(tiny_dir, tmp_path):
    from seftc.errors import SeftcError
    from seftc.models.loading import load_model

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_dir / "config.json").read_bytes())
    reference = load_model(tiny_dir).model.state_dict()
    torch.save(reference, folder / "weights.bin")
    with pytest.raises(SeftcError, match="--allow-pickle"):
        load_model(folder / "weights.bin")
    loaded = load_model(folder / "weights.bin", allow_pickle=True, need_tokenizer=False).model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.items())
    code, stdout, stderr = run("inspect", folder / "weights.bin", "--allow-pickle")
    assert code == 0, stderr

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, folder / "evil.bin")
    with pytest.raises(SeftcError, match="weights-only pickle"):
        load_model(folder / "evil.bin", allow_pickle=True)


def test_pack_refuses_a_dense_model(tiny_dir, tmp_path):
    code, _, stderr = run("pack", tiny_dir, "-o", tmp_path / "packed")
    assert code == 2 and "nothing sparse to pack" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "packed").exists() and not list(tmp_path.iterdir())


def test_export_onnx_flag_is_accepted_but_not_advertised():
    code, stdout, _ = run("export", "--help")
    assert code == 0 and "--onnx" not in stdout.replace("`--onnx` is still", "")


# -- options declared once: recipe keys = command options, help and defaults ------------------------------

STAGE_COMMANDS = {"prune": "prune", "repair": "repair", "pack": "pack", "export": "export", "bench": "bench", "eval": "eval"}


def _command(name):
    return cli.get_command(None, name)


def _options(cmd):
    return [p for p in cmd.params if isinstance(p, __import__("click").Option)]


def _key(option):
    """The recipe key an option is spelled as: --batch-size -> batch_size."""
    return max(option.opts, key=len).removeprefix("--").replace("-", "_")


@pytest.mark.parametrize("stage", sorted(STAGE_COMMANDS))
def test_every_command_option_is_a_recipe_key_of_its_stage_and_back(stage):
    from seftc.compress.recipe import CLI_ONLY, STAGE_TYPES, ModelStage

    keys = {_key(p) for p in _options(_command(STAGE_COMMANDS[stage]))}
    fields = set(STAGE_TYPES[stage].model_fields)
    loading = (keys - fields) & set(ModelStage.model_fields)  # --trust-remote-code etc.: keys of the `model` stage
    assert keys - (CLI_ONLY - fields) - loading == fields, stage


def test_recipe_accepts_what_the_cli_accepts():
    from seftc.compress.recipe import load_recipe

    r = load_recipe(None, ["bench.warmup=0", "bench.prompt_tokens=8", "bench.layers=0", "eval.norm=tokens",
                           "export.opset=18", "pack.exact_zeros=true", "prune.owl_lambda=0.05", "repair.eval_windows=2"])
    assert (r.bench.warmup, r.bench.prompt_tokens, r.bench.layers) == (0, 8, 0)
    assert r.eval.norm == "tokens" and r.export.opset == 18 and r.pack.exact_zeros and r.prune.owl_lambda == 0.05
    assert r.repair.eval_windows == 2


def test_every_option_has_help_and_a_shown_default():
    from seftc.cli.main import COMMANDS

    for name in COMMANDS:
        for p in _options(_command(name)):
            if p.hidden:
                continue
            assert p.help, f"{name} {p.opts}: no help"
            if (p.is_flag and not p.secondary_opts) or p.required:
                continue  # an on/off flag is off unless given; a required option has no default
            assert p.show_default, f"{name} {p.opts}: default not shown"
            if p.show_default is True:  # click shows the value itself, so there must be one
                assert p.default not in (None, ()) and not p.multiple or p.default, f"{name} {p.opts}: shows an empty default"


def test_repair_cli_defaults_are_the_tuned_ones_and_lr_help_lists_them():
    from seftc.repair.config import DEFAULT_LR, RepairConfig

    params = {p.name: p for p in _options(_command("repair"))}
    assert (params["density"].default, params["init"].default, params["update_interval"].default) == (0.1, "gradient", 10)
    for name, field in RepairConfig.model_fields.items():
        assert params[name].default == (tuple(field.default) if isinstance(field.default, list) else field.default), name
    help_text = " ".join(CliRunner().invoke(cli, ["repair", "--help"]).stdout.split())
    for method, lr in DEFAULT_LR.items():
        assert f"{method} {lr:g}" in help_text
    compress_help = " ".join(CliRunner().invoke(cli, ["compress", "--help"]).stdout.split())
    assert "seftc/compress/default.yaml" in compress_help


def test_cli_option_errors_name_the_option(pruned, tmp_path):
    code, _, stderr = run("repair", pruned, "-o", tmp_path / "r", "--steps", "0")
    assert code == 2 and stderr.startswith("error: --steps: ") and len(stderr.splitlines()) == 1
    code, _, stderr = run("repair", pruned, "-o", tmp_path / "r", "--batch-size", "3", "--grad-accum", "2")
    assert code == 2 and "--batch-size (3) must be divisible by --grad-accum (2)" in stderr
    code, _, stderr = run("bench", pruned, "--batch", "0,x")
    assert code == 2 and stderr.startswith("error: --batch: ")


def test_warmup_not_below_steps_warns(pruned, tmp_path):
    code, _, stderr = run("repair", pruned, "-o", tmp_path / "r", "--data", TEXT, "--eval-data", TEXT, "--steps", "2",
                          "--seqlen", "32", "--warmup", "5", "--method", "static", "--eval-every", "0")
    assert code == 0, stderr
    assert "warning: warm-up (5 steps) is not below the 2 steps" in " ".join(stderr.split())


def test_optional_numbers_with_a_default_take_none():
    """`--row-cap none` turns SEFT's cap off (its default is a number); anything else that is no number is one clear line."""
    import click

    from seftc.cli.options import options_from
    from seftc.repair.config import RepairConfig

    @click.command()
    @options_from(RepairConfig, only=("row_cap", "reactivation_cap", "steps"))
    def probe(**kw):
        click.echo(repr((kw["row_cap"], kw["reactivation_cap"])))

    assert CliRunner().invoke(probe, []).stdout.strip() == repr((RepairConfig().row_cap, RepairConfig().reactivation_cap)) == "(0.02, 0.005)"
    assert CliRunner().invoke(probe, ["--row-cap", "none", "--reactivation-cap", "0.01"]).stdout.strip() == "(None, 0.01)"
    bad = CliRunner().invoke(probe, ["--row-cap", "lots"])
    assert bad.exit_code == 2 and "neither a number nor 'none'" in bad.output and "Traceback" not in bad.output
    assert CliRunner().invoke(probe, ["--steps", "none"]).exit_code == 2  # a number without a None: none is no value


def test_a_run_whose_loss_ends_above_its_start_warns():
    """A finite divergence passes the loop's non-finite check: the finished run says so (CLI, manifest, report)."""
    from seftc.repair.config import loss_warnings

    falling = [[s, 7.0 - 0.1 * s] for s in range(1, 31)]
    assert loss_warnings(falling, 1e-3) == [] and loss_warnings(falling[:1], 1e-3) == []
    diverged = [[s, 6.9 - 0.2 * s if s < 10 else 10.0] for s in range(1, 31)]  # down, then up and stuck above the start
    (warning,) = loss_warnings(diverged, 1e-2)
    assert "6.500 over the first 3 steps → 10.000 over the last 3" in warning and "lower --lr (was 0.01)" in warning


def test_a_finished_run_with_a_loss_warning_says_so_in_the_cli_and_the_manifest(pruned, tmp_path, monkeypatch):
    """The wiring of the check above (a tiny random model's loss sits at its uniform floor and cannot be made to
    diverge reliably): its lines reach stderr and the manifest's config."""
    import seftc.repair.api as api

    seen = []
    monkeypatch.setattr(api, "loss_warnings", lambda losses, lr: seen.append((len(losses), lr)) or [f"training loss ended above (lr {lr:g})"])
    code, _, stderr = run("repair", pruned, "-o", tmp_path / "r", "--data", TEXT, "--eval-data", TEXT, "--steps", "3", "--warmup", "0",
                          "--seqlen", "32", "--lr", "0.5", "--method", "static", "--eval-every", "0")
    assert code == 0, stderr
    assert seen == [(3, 0.5)] and "warning: training loss ended above (lr 0.5)" in " ".join(stderr.split())
    manifest = json.loads((tmp_path / "r" / "seftc_manifest.json").read_text())
    assert manifest["config"]["warnings"] == ["training loss ended above (lr 0.5)"]
