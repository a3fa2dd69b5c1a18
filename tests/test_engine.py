"""The decode engine (`seftc.runtime.engine`): a batch of one decodes as transformers' greedy
`generate`; rows that join, leave or fail mid-run leave the others' tokens unchanged."""
import threading

import pytest
import torch

from seftc.runtime.convert import sparsify_model
from seftc.runtime.engine import Engine, EngineClosed, EngineFull
from seftc.runtime.sampling import SamplingParams

from conftest import build_tiny_model, tiny_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def sparse_llama():
    model = build_tiny_model("llama")
    for name, module in model.named_modules():  # 70% magnitude pruning, then the sparse runtime
        if isinstance(module, torch.nn.Linear) and "layers" in name:
            w = module.weight.data
            w[w.abs() < w.abs().flatten().kthvalue(int(0.7 * w.numel())).values] = 0
    assert sparsify_model(model).converted
    return model


def _prompts(tok):
    return [tok(t).input_ids for t in ("Shall I compare thee", "Rough winds do shake the darling buds of May, and", "summer")]


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "opt"])
def test_batch_of_one_is_transformers_greedy(arch, tok):
    model = build_tiny_model(arch)
    engine = Engine(model, tok)
    for ids in _prompts(tok)[:2]:
        seq = engine.generate(ids, GREEDY)
        with torch.inference_mode():
            x = torch.tensor([ids])
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
        assert seq.tokens == out[0, len(ids):].tolist() and seq.finish_reason == "length"


def test_rows_join_leave_and_cancel_without_changing_the_others(sparse_llama, tok):
    engine = Engine(sparse_llama, tok, max_batch=8)
    prompts = _prompts(tok)
    alone = [engine.generate(p, GREEDY).tokens for p in prompts]
    a = engine.submit(prompts[0], GREEDY)
    b = engine.submit(prompts[1], GREEDY.model_copy(update={"max_tokens": 6}))  # leaves early
    doomed = engine.submit(prompts[2], GREEDY)
    for _ in range(3):
        engine.step()
    engine.cancel(doomed)
    c = engine.submit(prompts[2], GREEDY)  # joins mid-run, shorter prompt: padded on the left
    engine.step()
    assert doomed.finish_reason == "cancelled" and len(doomed.tokens) < 16 and engine.running == 3
    while not (a.done and c.done):
        engine.step()
    assert a.tokens == alone[0] and b.tokens == alone[1][:6] and c.tokens == alone[2]
    assert b.finish_reason == "length" and engine.stats.peak_batch == 3 and engine.stats.cancelled == 1
    assert engine.running == 0 and engine._mask is None  # nothing left behind


def test_padding_columns_are_cut_when_the_long_row_leaves(sparse_llama, tok):
    engine = Engine(sparse_llama, tok)
    long, short = tok("Rough winds do shake the darling buds of May, and summer").input_ids, tok("May").input_ids
    a = engine.submit(long, GREEDY.model_copy(update={"max_tokens": 2}))
    b = engine.submit(short, GREEDY)
    while not a.done:
        engine.step()
    assert engine._mask.shape[1] == len(short) + len(b.tokens) - 1  # only b's own columns remain
    assert bool(engine._mask.all())


def test_stop_strings_end_the_text_before_them(sparse_llama, tok):
    engine = Engine(sparse_llama, tok)
    ids = _prompts(tok)[0]
    alone = engine.generate(ids, GREEDY)
    text = alone.text
    assert len(text) >= 4, text
    stop = text[2:4]
    pieces = []
    seq = engine.submit(ids, GREEDY.model_copy(update={"stop": (stop,)}), lambda e: pieces.append(e.text))
    while not seq.done:
        engine.step()
    assert seq.finish_reason == "stop" and seq.text == text[:text.find(stop)] and "".join(pieces) == seq.text


def test_eos_ends_a_sequence_unless_ignored(sparse_llama, tok):
    ids = _prompts(tok)[0]
    alone = Engine(sparse_llama, tok).generate(ids, GREEDY)
    fifth = alone.tokens[4]
    engine = Engine(sparse_llama, tok, eos={fifth})
    seq = engine.generate(ids, GREEDY.model_copy(update={"ignore_eos": False}))
    first = alone.tokens.index(fifth)
    assert seq.finish_reason == "stop" and seq.tokens == alone.tokens[:first + 1]
    assert engine.generate(ids, GREEDY).tokens == alone.tokens  # ignore_eos decodes on


def test_seeded_sampling_repeats_alone_and_in_a_batch(sparse_llama, tok):
    engine = Engine(sparse_llama, tok)
    prompts = _prompts(tok)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=123, ignore_eos=True)
    alone = engine.generate(prompts[0], params).tokens
    assert engine.generate(prompts[0], params).tokens == alone
    assert engine.generate(prompts[0], params.model_copy(update={"seed": 124})).tokens != alone
    seqs = [engine.submit(prompts[0], params), engine.submit(prompts[1], GREEDY)]
    while not all(s.done for s in seqs):
        engine.step()
    assert seqs[0].tokens == alone


def test_a_failing_prefill_fails_only_its_own_sequence(sparse_llama, tok):
    engine = Engine(sparse_llama, tok)
    good = _prompts(tok)[0]
    alone = engine.generate(good, GREEDY).tokens
    a = engine.submit(good, GREEDY)
    engine.step()
    bad = engine.submit([1, 2, 10_000], GREEDY)  # an id outside the vocabulary: the embedding raises
    while not a.done:
        engine.step()
    assert bad.finish_reason == "error" and "prefill failed" in bad.error and engine.stats.errors == 1
    assert a.tokens == alone


def test_a_raising_sink_cancels_only_its_sequence(sparse_llama, tok):
    engine = Engine(sparse_llama, tok)
    good = _prompts(tok)[0]
    alone = engine.generate(good, GREEDY).tokens

    def broken(event):
        raise RuntimeError("client gone")

    a, b = engine.submit(good, GREEDY), engine.submit(good, GREEDY, broken)
    while not a.done:
        engine.step()
    assert b.finish_reason == "cancelled" and len(b.tokens) == 1 and a.tokens == alone


def test_waiting_queue_is_bounded(sparse_llama, tok):
    engine = Engine(sparse_llama, tok, max_batch=1, max_waiting=1)
    ids = _prompts(tok)[0]
    engine.submit(ids, GREEDY)  # the free batch slot
    engine.submit(ids, GREEDY)  # the one waiting place
    with pytest.raises(EngineFull):
        engine.submit(ids, GREEDY)


def test_worker_thread_drains_on_shutdown(sparse_llama, tok):
    engine = Engine(sparse_llama, tok, max_batch=2)
    thread = threading.Thread(target=engine.run_forever)
    thread.start()
    seqs = [engine.submit(p, GREEDY) for p in _prompts(tok)]
    engine.shutdown(drain=True)
    thread.join(60)
    assert not thread.is_alive()
    assert [s.finish_reason for s in seqs] == ["length"] * 3 and all(len(s.tokens) == 16 for s in seqs)
    with pytest.raises(EngineClosed):
        engine.submit(_prompts(tok)[0], GREEDY)


def test_prompt_beyond_the_context_is_refused(sparse_llama, tok):
    from seftc.errors import SeftcError

    engine = Engine(sparse_llama, tok)
    with pytest.raises(SeftcError, match="context"):
        engine.submit([1] * engine.context, GREEDY)


def test_a_failing_step_fails_its_batch_but_not_the_worker(sparse_llama, tok):
    engine = Engine(sparse_llama, tok)
    good = _prompts(tok)[0]
    alone = engine.generate(good, GREEDY).tokens
    real, calls = engine._advance, []

    def broken_once(rows, logits):
        if not calls:
            calls.append(1)
            raise RuntimeError("bug")
        return real(rows, logits)

    engine._advance = broken_once
    thread = threading.Thread(target=engine.run_forever)
    thread.start()
    first = engine.submit(good, GREEDY)
    assert first.wait(60) and first.finish_reason == "error" and "bug" in first.error
    second = engine.submit(good, GREEDY)
    assert second.wait(60) and second.tokens == alone
    engine.shutdown()
    thread.join(60)
    assert engine.running == 0


def test_prefill_token_budget_spreads_a_burst_over_steps(sparse_llama, tok):
    prompts = _prompts(tok)  # 5, 14 and 1 tokens, say: lengths are read below
    lengths = [len(p) for p in prompts]
    budget = lengths[0] + lengths[2]  # the first and the third fit together, the second only alone
    engine = Engine(sparse_llama, tok, max_prefill_tokens=budget)
    alone = [engine.generate(p, GREEDY).tokens for p in prompts]
    engine.stats.prefills = engine.stats.prefill_rows = 0
    seqs = [engine.submit(p, GREEDY) for p in prompts]
    engine.step()  # the first fits; the second does not, and nothing behind it jumps the queue
    assert (engine.stats.prefills, engine.running, engine.waiting) == (1, 1, 2)
    engine.step()  # the second, over the budget, is admitted alone
    assert (engine.stats.prefills, engine.running, engine.waiting) == (2, 2, 1)
    while not all(s.done for s in seqs):
        engine.step()
    assert [s.tokens for s in seqs] == alone and engine.stats.prefill_rows == 3
