"""Fast tests for `seftc eval`: task loaders, MC scoring, perplexity, the CLI (tiny random LLaMA)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from seftc.data.corpus import TextSource
from click.testing import CliRunner

from conftest import _TEXT, build_tiny_model, tiny_tokenizer
from seftc.cli.main import cli
from seftc.data.tasks import TASKS, in_train_part, load_task
from seftc.errors import SeftcError


@pytest.fixture(scope="module")
def mt():
    return build_tiny_model("llama"), tiny_tokenizer()


# ---------------------------------------------------------------- task loaders

@pytest.mark.parametrize("name", TASKS)
def test_task_items_well_formed_and_parts_disjoint(name):
    ev, tr = load_task(name, "eval"), load_task(name, "train")
    assert ev and tr
    ids_ev, ids_tr = {i.id for i in ev}, {i.id for i in tr}
    assert len(ids_ev) == len(ev) and len(ids_tr) == len(tr)
    assert not ids_ev & ids_tr
    assert all(not in_train_part(i) for i in ids_ev) and all(in_train_part(i) for i in ids_tr)
    assert 0.1 < len(tr) / (len(ev) + len(tr)) < 0.3
    for it in ev[:300] + tr[:50]:
        assert it.context and len(it.choices) >= 2 and 0 <= it.label < len(it.choices)
        assert all(isinstance(c, str) and c for c in it.choices)
        reqs = it.requests()
        assert len(reqs) == len(it.choices)
        assert all(cont.startswith(" ") and ctx.strip() for ctx, cont in reqs)
    assert load_task(name, "eval", limit=5) == ev[:5]  # deterministic order, limit = prefix


def test_commonsense_mix_is_disjoint_from_every_scored_item():
    from seftc.data.corpus import load_text
    from seftc.data.tasks import COMMONSENSE, answered, commonsense_mix

    train, valid = commonsense_mix("train"), commonsense_mix("valid")
    assert len(train) > 1000 and len(valid) > 200 and not set(train) & set(valid)
    scored = {answered(it) for t in COMMONSENSE for it in load_task(t, "eval")}
    trained = {answered(it) for t in COMMONSENSE for it in load_task(t, "train")}
    assert not (set(train) | set(valid)) & scored  # no scored text, even where a file duplicates a row
    assert set(train) | set(valid) == trained - scored  # the rest of the train part, nothing else
    assert load_text("commonsense:valid").text == "\n\n".join(valid)  # fixed order, deterministic
    piqa = load_task("piqa", "train", limit=1)[0]
    assert answered(piqa) in train + valid and answered(piqa).startswith("Question: ")
    with pytest.raises(SeftcError, match="unknown text source"):
        load_text("commonsense:test")


def test_task_prompts():
    it = load_task("winogrande", limit=1)[0]
    assert it.target and "_" not in it.context + it.target
    (c0, t0), (c1, t1) = it.requests()
    assert t0 == t1 == it.target and c0.endswith(it.choices[0]) and c1.endswith(it.choices[1])
    assert load_task("boolq", limit=1)[0].choices == [" no", " yes"]
    assert load_task("arc_easy", limit=1)[0].context.startswith("Question: ")
    assert load_task("piqa", limit=1)[0].context.endswith("\nAnswer:")
    assert "[" not in "".join(i.context for i in load_task("hellaswag", limit=200))
    mmlu = load_task("mmlu") + load_task("mmlu", "train")
    assert len({i.id.split("/")[1] for i in mmlu}) == 57
    assert mmlu[0].context.startswith("The following are questions (with answers) about ")


def test_task_bad_names():
    with pytest.raises(SeftcError, match="valid tasks"):
        load_task("pica")
    with pytest.raises(SeftcError):
        load_task("piqa", part="test")


# ---------------------------------------------------------------- multiple choice

def test_score_matches_manual_logprob(mt):
    import torch

    from seftc.eval.multiple_choice import score_requests

    model, tok = mt
    ctx, cont = "Shall I compare thee", " to a summer's day?"
    ((score, n_tok),) = score_requests(model, tok, [(ctx, cont)])
    c_ids, k_ids = tok(ctx).input_ids, tok(cont).input_ids
    with torch.no_grad():
        logp = model(torch.tensor([c_ids + k_ids])).logits[0].log_softmax(-1)
    manual = sum(logp[len(c_ids) - 1 + j, t].item() for j, t in enumerate(k_ids))
    assert score == pytest.approx(manual, abs=1e-4) and n_tok == len(k_ids)


def test_mc_batch_size_invariance(mt):
    from seftc.eval.multiple_choice import evaluate_tasks, score_requests

    model, tok = mt
    items = load_task("piqa", limit=4) + load_task("winogrande", limit=3) + load_task("boolq", limit=2)  # boolq > 256 tokens: truncated
    reqs = [r for it in items for r in it.requests()]
    one, many = score_requests(model, tok, reqs, batch_size=1), score_requests(model, tok, reqs, batch_size=16)
    assert all(math.isfinite(a) and n >= 1 for a, n in one)
    assert [n for _, n in one] == [n for _, n in many]
    assert [a for a, _ in one] == pytest.approx([a for a, _ in many], abs=1e-3)
    r1 = evaluate_tasks(model, tok, ["piqa", "siqa"], limit=6, batch_size=1)
    r16 = evaluate_tasks(model, tok, ["piqa", "siqa"], limit=6, batch_size=16)
    assert r1 == r16 and r1["piqa"].n == 6 and 0 <= r1["siqa"].acc <= 1
    assert evaluate_tasks(model, tok, ["piqa"], limit=6, norm="tokens")["piqa"].n == 6
    with pytest.raises(SeftcError, match="normalisation"):
        evaluate_tasks(model, tok, ["piqa"], limit=1, norm="chars")


def test_shared_prefix_scores_equal_one_full_pass_per_request(mt):
    """An item's choices run their common prefix once (KV cache copied per choice): same scores as a
    whole forward per request, for every grouping, batch size and left-cut (boolq) request."""
    import torch

    from seftc.eval.multiple_choice import _bos, _encode, max_length, score_requests

    model, tok = mt
    items = (load_task("piqa", limit=3) + load_task("winogrande", limit=2) + load_task("boolq", limit=2)
             + load_task("hellaswag", limit=2) + load_task("arc_easy", limit=2))
    reqs = [r for it in items for r in it.requests()] + [("Shall I", " compare"), ("Shall I", " compare thee")]
    limit, bos = max_length(model, tok), _bos(tok)
    manual = []
    with torch.no_grad():
        for ctx, cont in reqs:
            ids, n = _encode(tok, ctx, cont, bos)
            ids = ids[-(limit + 1):]
            n = min(n, len(ids) - 1)
            logp = model(torch.tensor([ids[:-1]])).logits[0].log_softmax(-1)
            manual.append((sum(logp[len(ids) - 1 - n + j, t].item() for j, t in enumerate(ids[-n:])), n))
    by_item = [i for i, it in enumerate(items) for _ in it.requests()] + [-1, -1]
    for share in (None, by_item, [0] * len(reqs), list(range(len(reqs)))):  # by context, by item, all, none
        for bs in (1, 5, 16):
            got = score_requests(model, tok, reqs, batch_size=bs, share=share)
            assert [n for _, n in got] == [n for _, n in manual]
            assert [a for a, _ in got] == pytest.approx([a for a, _ in manual], abs=1e-3)
    with pytest.raises(SeftcError, match="sharing keys"):
        score_requests(model, tok, reqs, share=[0])


# ---------------------------------------------------------------- perplexity

def _manual_nll(model, ids, seqlen, stride):
    import torch

    total, count, start, prev_end = 0.0, 0, 0, 0
    while start + seqlen <= len(ids):
        window = torch.tensor([ids[start:start + seqlen]])
        with torch.no_grad():
            logp = model(window).logits[0].log_softmax(-1)
        new = min(start + seqlen - prev_end, seqlen - 1)
        for pos in range(seqlen - new, seqlen):
            total -= logp[pos - 1, ids[start + pos]].item()
            count += 1
        prev_end, start = start + seqlen, start + stride
    return total / count, count


def test_perplexity_non_overlapping_by_hand(mt):
    from seftc.eval.perplexity import perplexity

    model, tok = mt
    text = _TEXT[:600]
    ids = tok(text, add_special_tokens=False).input_ids
    r = perplexity(model, tok, TextSource("<text>", text), seqlen=16, batch_size=3)
    nll, count = _manual_nll(model, ids, 16, 16)
    assert (r.windows, r.tokens, r.stride) == (len(ids) // 16, count, 16) and count == r.windows * 15
    assert r.nll == pytest.approx(nll, rel=1e-5) and r.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    assert perplexity(model, tok, TextSource("<text>", text), seqlen=16, limit=2).windows == 2


def test_perplexity_strided(mt):
    from seftc.eval.perplexity import perplexity, plan_windows

    model, tok = mt
    text = _TEXT[:400]
    ids = tok(text, add_special_tokens=False).input_ids
    r = perplexity(model, tok, TextSource("<text>", text), seqlen=16, stride=5, batch_size=4)
    nll, count = _manual_nll(model, ids, 16, 5)
    assert r.windows == (len(ids) - 16) // 5 + 1 and r.tokens == count == 15 + 5 * (r.windows - 1)
    assert r.nll == pytest.approx(nll, rel=1e-5)
    # sliding windows score every token after the first exactly once, up to the last window's end
    for n, L, s in ((100, 16, 5), (50, 10, 1), (40, 8, 7)):
        scored = [st + L - k + j for st, k in plan_windows(n, L, s) for j in range(k)]
        assert scored == list(range(1, len(scored) + 1))
    # non-overlapping windows score all but each window's first token
    scored = [st + 8 - k + j for st, k in plan_windows(64, 8, 8) for j in range(k)]
    assert scored == [i for i in range(64) if i % 8]


def test_perplexity_caps_seqlen_and_rejects_short_text(mt):
    from seftc.eval.perplexity import perplexity

    model, tok = mt
    r = perplexity(model, tok, TextSource("<text>", _TEXT * 3), seqlen=10_000, limit=1)
    assert r.seqlen == 256 == model.config.max_position_embeddings
    with pytest.raises(SeftcError, match="shorter than one window"):
        perplexity(model, tok, TextSource("<text>", "too short"), seqlen=64)
    with pytest.raises(SeftcError, match="stride"):
        perplexity(model, tok, TextSource("<text>", _TEXT), seqlen=16, stride=17)


# ---------------------------------------------------------------- CLI

def test_cli_eval_json(tiny_dir: Path, calib_file: Path):
    res = CliRunner().invoke(cli, ["eval", str(tiny_dir), "--ppl", str(calib_file), "--tasks", "piqa,winogrande",
                                   "--limit", "3", "--seqlen", "32", "--batch-size", "4", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["model"] == str(tiny_dir) and out["ppl"] > 1
    assert out["ppl_protocol"]["windows"] == 3 and out["ppl_protocol"]["seqlen"] == 32
    assert out["ppl_protocol"]["tokens"] == 3 * 31 and out["ppl_protocol"]["source"] == str(calib_file.resolve())
    assert set(out["tasks"]) == {"piqa", "winogrande"}
    assert out["tasks"]["piqa"]["n"] == 3 and 0 <= out["tasks"]["piqa"]["acc"] <= 1 and "acc_stderr" in out["tasks"]["piqa"]


def test_cli_eval_table(tiny_dir: Path):
    res = CliRunner().invoke(cli, ["eval", str(tiny_dir), "--tasks", "arc_easy", "--limit", "2"])
    assert res.exit_code == 0, res.output
    assert "arc_easy" in res.stdout and "perplexity" not in res.stdout


@pytest.mark.parametrize("args, needle", [
    (["--tasks", "piqa,nope"], "valid tasks"),
    (["--ppl", "/no/such/file.txt"], "does not exist"),
    (["--ppl", "SHORT"], "shorter than one window"),
    (["--limit", "0"], "--limit"),
])
def test_cli_eval_bad_input(tiny_dir: Path, tmp_path: Path, args, needle):
    if "SHORT" in args:
        short = tmp_path / "short.txt"
        short.write_text("only a few words")
        args = [str(short) if a == "SHORT" else a for a in args]
    res = CliRunner().invoke(cli, ["eval", str(tiny_dir), *args, "--json"])
    assert res.exit_code == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]


def test_cli_eval_missing_model(tmp_path: Path):
    res = CliRunner().invoke(cli, ["eval", str(tmp_path / "nope")])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
