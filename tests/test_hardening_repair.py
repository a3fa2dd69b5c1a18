"""Issue 11 (items 1, 2, 4, 10): repair never deletes what it did not create, resumes only the
run it checkpointed, refuses non-finite or out-of-range numbers on every command, stops on
divergence with nothing saved, and turns damaged checkpoints into one error line."""
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from seftc.cli.main import cli
from seftc.errors import SeftcError
from seftc.prune.api import prune
from seftc.repair.api import repair

TEXT = str(Path(__file__).with_name("data") / "sonnets.txt")
QUICK = dict(data=TEXT, eval_data=TEXT, steps=4, batch_size=2, seqlen=32, update_interval=2, accumulation=1, eval_every=0)


def run(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def one_error_line(code: int, stderr: str) -> str:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture(scope="module")
def pruned(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hard") / "p"
    prune(str(tiny_dir), method="wanda", sparsity=0.5, calib={"source": TEXT, "nsamples": 4, "seqlen": 32}, output=out)
    return out


# -- item 4: every numeric option is finite and in range ---------------------------------------
BAD_NUMBERS = [
    ("repair", ["--lr", "inf"], "finite"),
    ("repair", ["--lr", "nan"], "finite"),
    ("repair", ["--lr", "-1e-3"], "greater than 0"),
    ("repair", ["--lr", "0"], "greater than 0"),
    ("repair", ["--steps", "0"], "steps"),
    ("repair", ["--seed", str(2**70)], "seed"),
    ("repair", ["--seed", "-1"], "seed"),
    ("repair", ["--density", "0"], "density"),
    ("repair", ["--density", "1.5"], "density"),
    ("repair", ["--density", "nan"], "density"),
    ("repair", ["--zeta0", "inf"], "zeta0"),
    ("repair", ["--batch-size", "0"], "batch_size"),
    ("repair", ["--seqlen", "0"], "seqlen"),
    ("repair", ["--grad-accum", "0"], "grad_accum"),
    ("repair", ["--checkpoint-every", "-1"], "checkpoint_every"),
    ("repair", ["--eval-every", "-1"], "eval_every"),
    ("repair", ["--update-interval", "0"], "update_interval"),
    ("repair", ["--protect", "-1"], "protect"),
    ("repair", ["--lora-r", "0"], "lora_r"),
    ("prune", ["--sparsity", "nan"], "[0, 1)"),
    ("prune", ["--sparsity", "inf"], "[0, 1)"),
    ("prune", ["--nsamples", "0"], "nsamples"),
    ("prune", ["--seqlen", "0"], "seqlen"),
    ("prune", ["--seed", str(2**70)], "seed"),
    ("prune", ["--owl-lambda", "inf"], "owl_lambda"),
    ("prune", ["--owl-lambda", "1.5"], "owl_lambda"),
    ("prune", ["--batch-size", "0"], "batch_size"),
    ("eval", ["--limit", "0"], "--limit"),
    ("eval", ["--seqlen", "1"], "--seqlen"),
    ("eval", ["--seqlen", str(2**40)], "--seqlen"),
    ("eval", ["--stride", "0"], "--stride"),
    ("eval", ["--batch-size", "0"], "--batch-size"),
    ("bench", ["--prompt-tokens", "0"], "--prompt-tokens"),
    ("bench", ["--new-tokens", "0"], "--new-tokens"),
    ("bench", ["--repeats", "0"], "--repeats"),
    ("bench", ["--warmup", "-1"], "--warmup"),
    ("bench", ["--threads", "100000"], "--threads"),
    ("bench", ["--batch", "1,0"], "--batch"),
    ("bench", ["--batch", "1,x"], "--batch"),
    ("generate", ["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("generate", ["--prompt", "hi", "--threads", "0"], "--threads"),
    ("export", ["--tolerance", "inf"], "--tolerance"),
    ("export", ["--tolerance", "nan"], "--tolerance"),
    ("export", ["--tolerance", "0"], "--tolerance"),
    ("export", ["--opset", "0"], "--opset"),
    ("compress", ["--set", "repair.lr=.inf"], "repair.lr"),
    ("compress", ["--set", "prune.sparsity=.nan"], "prune.sparsity"),
    ("compress", ["--set", f"prune.seed={2**70}"], "prune.seed"),
    ("compress", ["--set", "bench.batch=1,x"], "bench.batch"),
    ("compress", ["--set", "eval.seqlen=0"], "eval.seqlen"),
]


@pytest.mark.parametrize("command,args,needle", BAD_NUMBERS, ids=[f"{c}{' '.join(a)}" for c, a, _ in BAD_NUMBERS])
def test_numeric_options_are_finite_and_in_range(command, args, needle, pruned, tmp_path):
    out = tmp_path / "out"
    target = ["-o", out] if command in ("repair", "prune", "export", "compress") else []
    line = one_error_line(*run(command, pruned, *target, *args)[::2])
    assert needle in line
    assert not out.exists() and sorted(tmp_path.iterdir()) == []


def test_library_configs_share_the_limits():
    from seftc.compress.recipe import recipe_from_dict
    from seftc.repair.config import make_repair_config

    for bad in ({"lr": float("inf")}, {"seed": 2**70}, {"density": float("nan")}, {"weight_decay": float("inf")}):
        with pytest.raises(SeftcError, match=next(iter(bad))):
            make_repair_config(**bad)
        with pytest.raises(SeftcError, match="repair." + next(iter(bad))):
            recipe_from_dict({"repair": bad})


def test_divergence_stops_training_and_saves_nothing(pruned, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(SeftcError, match="diverged at step"):
        repair(str(pruned), output=out, lr=1e30, **{**QUICK, "steps": 6})
    assert not out.exists() and not (tmp_path / "r.checkpoint").exists()
    assert sorted(tmp_path.iterdir()) == []


def test_cli_lr_huge_is_one_line_and_no_output(pruned, tmp_path):
    out = tmp_path / "r"
    code, _, stderr = run("repair", pruned, "-o", out, "--lr", "1e30", "--data", TEXT, "--eval-data", TEXT, "--steps", "4",
                          "--batch-size", "2", "--seqlen", "32", "--eval-every", "0", "--json")
    assert "diverged" in one_error_line(code, stderr)
    assert sorted(tmp_path.iterdir()) == []


def test_repair_seqlen_is_capped_at_the_model_context(pruned, tmp_path):
    r = repair(str(pruned), output=tmp_path / "r", method="static", **{**QUICK, "steps": 1, "seqlen": 10_000})
    assert r.manifest.config["seqlen"] == 256 == r.loaded.model.config.max_position_embeddings


def test_repair_accepts_the_largest_seed(pruned, tmp_path):
    r = repair(str(pruned), output=tmp_path / "r", method="static", **{**QUICK, "steps": 1, "seed": 2**63 - 1})
    assert r.manifest.seed == 2**63 - 1


def test_bench_prompt_tokens_are_capped_at_the_model_context(tiny_dir):
    from transformers import AutoModelForCausalLM

    from seftc.runtime.bench import BenchConfig, run_bench

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    cfg = BenchConfig(batches=(1,), prompt_tokens=10_000, new_tokens=2, repeats=1, warmup=0, max_layers=0, layers_in_model=False)
    result = run_bench(model, model, cfg)
    assert [r.tokens for r in result.results if r.phase == "prefill"] == [254]
    assert result.config["prompt_tokens"] == 254
    with pytest.raises(SeftcError, match="no room for a prompt"):
        run_bench(model, model, BenchConfig(batches=(1,), new_tokens=256, repeats=1, warmup=0, max_layers=0, layers_in_model=False))
