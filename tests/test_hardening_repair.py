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
    ("repair", ["--steps", "0"], "--steps"),
    ("repair", ["--seed", str(2**70)], "--seed"),
    ("repair", ["--seed", "-1"], "--seed"),
    ("repair", ["--density", "0"], "--density"),
    ("repair", ["--density", "1.5"], "--density"),
    ("repair", ["--density", "nan"], "--density"),
    ("repair", ["--zeta0", "inf"], "--zeta0"),
    ("repair", ["--batch-size", "0"], "--batch-size"),
    ("repair", ["--seqlen", "0"], "--seqlen"),
    ("repair", ["--grad-accum", "0"], "--grad-accum"),
    ("repair", ["--checkpoint-every", "-1"], "--checkpoint-every"),
    ("repair", ["--eval-every", "-1"], "--eval-every"),
    ("repair", ["--update-interval", "0"], "--update-interval"),
    ("repair", ["--protect", "-1"], "--protect"),
    ("repair", ["--lora-r", "0"], "--lora-r"),
    ("repair", ["--delta-decay", "inf"], "--delta-decay"),
    ("repair", ["--reactivation-margin", "inf"], "--reactivation-margin"),
    ("repair", ["--row-cap", "nan"], "--row-cap"),
    ("prune", ["--sparsity", "nan"], "[0, 1)"),
    ("prune", ["--sparsity", "inf"], "[0, 1)"),
    ("prune", ["--nsamples", "0"], "--nsamples"),
    ("prune", ["--seqlen", "0"], "--seqlen"),
    ("prune", ["--seed", str(2**70)], "--seed"),
    ("prune", ["--owl-lambda", "inf"], "--owl-lambda"),
    ("prune", ["--owl-lambda", "1.5"], "--owl-lambda"),
    ("prune", ["--batch-size", "0"], "--batch-size"),
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
    ("serve", ["--drain-timeout", "inf"], "--drain-timeout"),
    ("serve", ["--threads", "100000"], "--threads"),
    ("serve", ["--max-batch", "0"], "--max-batch"),
    ("plan", ["--nsamples", str(2**70)], "--nsamples"),
    ("plan", ["--batch-size", "0"], "--batch-size"),
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
                          "--batch-size", "2", "--seqlen", "32", "--eval-every", "0", "--json",
                          "--warmup", "0", "--update-interval", "2", "--accumulation", "1")  # no schedule warnings
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


# -- items 1, 2, 10: checkpoints -------------------------------------------------------------------
CKPT = {**QUICK, "steps": 6, "checkpoint_every": 2}


class _KillAfter:
    """A progress sink that interrupts training once `step` steps (and their checkpoint) are done."""

    def __init__(self, step: int):
        self.step = step

    def task(self, description, total):
        return lambda n=1: None

    def status(self, step, **fields):
        if step > self.step:
            raise KeyboardInterrupt


def _interrupted(src: Path, out: Path, at: int = 2, **over) -> Path:
    with pytest.raises(KeyboardInterrupt):
        repair(str(src), output=out, progress=_KillAfter(at), **{**CKPT, **over})
    ckpt = out.with_name(out.name + ".checkpoint")
    assert (ckpt / "latest").is_file() and not out.exists()
    return ckpt


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_input_named_like_the_checkpoint_is_refused_and_kept(pruned, tmp_path):
    import shutil

    src = tmp_path / "q.checkpoint"
    shutil.copytree(pruned, src)
    before = _tree(src)
    line = one_error_line(*run("repair", src, "-o", tmp_path / "q", "--data", TEXT, "--eval-data", TEXT, "--steps", "2",
                                "--batch-size", "2", "--seqlen", "32", "--json")[::2])
    assert "collides with the repair checkpoint folder" in line
    assert _tree(src) == before and not (tmp_path / "q").exists()


def test_success_never_deletes_a_folder_seftc_did_not_create(pruned, tmp_path):
    user = tmp_path / "r.checkpoint"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    repair(str(pruned), output=tmp_path / "r", **QUICK)  # no checkpoints asked for: the folder is not touched
    assert (user / "notes.txt").read_text() == "mine"
    with pytest.raises(SeftcError, match="not written by seftc repair"):  # asked for: refused up front
        repair(str(pruned), output=tmp_path / "r2", force=True, checkpoint_dir=user, **CKPT)
    with pytest.raises(SeftcError, match="not written by seftc repair"):
        repair(str(pruned), output=tmp_path / "r", force=True, resume=True, **CKPT)
    assert _tree(user) == {"notes.txt": b"mine"} and not (tmp_path / "r2").exists()


def test_own_checkpoint_is_removed_after_success_an_earlier_one_needs_force(pruned, tmp_path):
    out = tmp_path / "r"
    repair(str(pruned), output=out, **CKPT)
    assert out.is_dir() and not (tmp_path / "r.checkpoint").exists()
    ckpt = _interrupted(pruned, tmp_path / "s")
    with pytest.raises(SeftcError, match="checkpoint of an earlier run; pass --resume"):
        repair(str(pruned), output=tmp_path / "s", **CKPT)
    repair(str(pruned), output=tmp_path / "s", force=True, **CKPT)
    assert not ckpt.exists()
    with pytest.raises(SeftcError, match="is a repair checkpoint folder"):
        repair(str(pruned), output=_interrupted(pruned, tmp_path / "t"), force=True, **QUICK)


def test_divergence_removes_only_this_runs_checkpoint(pruned, tmp_path):
    with pytest.raises(SeftcError, match="diverged"):
        repair(str(pruned), output=tmp_path / "r", lr=1e30, **{**CKPT, "checkpoint_every": 1})
    assert sorted(tmp_path.iterdir()) == []


def test_resume_continues_bit_identically(pruned, tmp_path):
    from safetensors.torch import load_file

    ref = repair(str(pruned), output=tmp_path / "ref", **CKPT)
    _interrupted(pruned, tmp_path / "r", at=4, checkpoint_every=2)
    res = repair(str(pruned), output=tmp_path / "r", resume=True, **{**CKPT, "checkpoint_every": 3})
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "r" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert res.history == ref.history
    assert not (tmp_path / "r.checkpoint").exists()


def _copy_input(pruned: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(pruned, dst)
    return dst


def test_resume_refuses_a_checkpoint_of_another_input(tiny_dir, pruned, tmp_path):
    src = _copy_input(pruned, tmp_path / "in")
    _interrupted(src, tmp_path / "r")
    import shutil

    shutil.rmtree(src)
    prune(str(tiny_dir), method="wanda", sparsity=0.6, calib={"source": TEXT, "nsamples": 4, "seqlen": 32}, output=src)
    code, _, stderr = run("repair", src, "-o", tmp_path / "r", "--resume", "--json",
                          *[x for k, v in CKPT.items() for x in (f"--{k.replace('_', '-')}", v)])
    line = one_error_line(code, stderr)
    assert "was made from a different input (mask checksum of model.layers.0." in line and "rerun without --resume" in line
    assert not (tmp_path / "r").exists()


def test_resume_refuses_other_weights_options_or_code(pruned, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from seftc.repair import checkpoint

    src = _copy_input(pruned, tmp_path / "in")
    _interrupted(src, tmp_path / "r")
    with pytest.raises(SeftcError, match=r"other options \(lr None → 0.001\)"):
        repair(str(src), output=tmp_path / "r", resume=True, **{**CKPT, "lr": 1e-3})
    monkeypatch.setattr(checkpoint, "code_version", lambda: {"seftc": "9.9", "torch": "x", "repair_source": "y"})
    with pytest.raises(SeftcError, match="was made by other code"):
        repair(str(src), output=tmp_path / "r", resume=True, **CKPT)
    monkeypatch.undo()
    state = load_file(src / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    state[name] = state[name] * 2  # same mask, other weights
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SeftcError, match=r"different input \(its weights differ\)"):
        repair(str(src), output=tmp_path / "r", resume=True, **CKPT)
    assert (tmp_path / "r.checkpoint" / "latest").is_file()  # a refused resume keeps the checkpoint


def _step_dir(ckpt: Path) -> Path:
    return ckpt / (ckpt / "latest").read_text().strip()


def _garble_meta_missing_key(ckpt):
    import json

    meta = json.loads((_step_dir(ckpt) / "meta.json").read_text())
    del meta["history"]
    (_step_dir(ckpt) / "meta.json").write_text(json.dumps(meta))


def _garble_method_state(ckpt):
    import json

    meta = json.loads((_step_dir(ckpt) / "meta.json").read_text())
    meta["method"] = {"stats": {}, "update_index": 0}
    (_step_dir(ckpt) / "meta.json").write_text(json.dumps(meta))


def _wrong_shape(ckpt):
    from safetensors.torch import load_file, save_file

    f = _step_dir(ckpt) / "state.safetensors"
    state = load_file(f)
    state["0.delta"] = torch.zeros(3)
    save_file(state, str(f))


def _truncate(name):
    def fn(ckpt):
        f = ckpt / "seftc_checkpoint.json" if name == "marker" else _step_dir(ckpt) / name
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    return fn


def _pickle_state(ckpt):
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(ckpt.parent / "PWNED"), "w"))

    (_step_dir(ckpt) / "state.safetensors").write_bytes(pickle.dumps({"0.delta": Evil()}))


DAMAGE = {
    "meta truncated": _truncate("meta.json"),
    "meta missing key": _garble_meta_missing_key,
    "method state": _garble_method_state,
    "state truncated": _truncate("state.safetensors"),
    "wrong shape": _wrong_shape,
    "marker truncated": _truncate("marker"),
    "latest outside": lambda ckpt: (ckpt / "latest").write_text("../../etc"),
    "pickle state": _pickle_state,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_one_line(damage, pruned, tmp_path):
    ckpt = _interrupted(pruned, tmp_path / "r")
    DAMAGE[damage](ckpt)
    code, _, stderr = run("repair", pruned, "-o", tmp_path / "r", "--resume", "--json",
                          *[x for k, v in CKPT.items() for x in (f"--{k.replace('_', '-')}", v)])
    line = one_error_line(code, stderr)
    assert f"checkpoint {ckpt} is damaged (" in line and "delete it or rerun without --resume" in line, line
    assert not (tmp_path / "r").exists() and not (tmp_path / "PWNED").exists()


def test_checkpoint_holds_only_json_and_safetensors(pruned, tmp_path):
    ckpt = _interrupted(pruned, tmp_path / "r")
    names = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    step = _step_dir(ckpt).name
    assert names == ["latest", "seftc_checkpoint.json", f"{step}/meta.json", f"{step}/state.safetensors"]
