"""The lean forward (`seftc.runtime.fastpath`): logits as transformers' forward gives them (dense, and
sparse bitmask / 2:4 / int8 layers), fused projections equal to the unfused layers, the static cache
(growth, joins and leaves in the engine, the end of the context), and the fallback to transformers."""
import pytest
import torch
from torch import nn

from seftc.runtime import fastpath
from seftc.runtime.convert import sparsify_model
from seftc.runtime.engine import Engine, FastRunner, TransformersRunner, runner_for
from seftc.runtime.int8 import SparseInt8Linear
from seftc.runtime.linear import SparseLinear
from seftc.runtime.sampling import SamplingParams

from conftest import build_tiny_model, tiny_config, tiny_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _prune(model, sparsity=0.6, two_four=False):
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and "layers" in name:
                w = module.weight
                if two_four:
                    groups = w.reshape(-1, 4)
                    drop = groups.abs().argsort(-1)[:, :2]
                    groups.scatter_(-1, drop, 0.0)
                else:
                    w[w.abs() < w.abs().flatten().kthvalue(int(sparsity * w.numel())).values] = 0
    return model


def _int8(model):
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and "layers" in name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, SparseInt8Linear.from_dense(module))
    return model


def _model(kind: str, arch: str = "llama"):
    model = build_tiny_model(arch)
    if kind == "bitmask":
        sparsify_model(_prune(model), kind="bitmask")
    elif kind == "2:4":
        sparsify_model(_prune(model, two_four=True), kind="2:4")
    elif kind == "int8":
        _int8(_prune(model))
    return model


def _reference_logits(model, ids, mask=None):
    """transformers' forward, every position's logits."""
    mask = torch.ones_like(ids) if mask is None else mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


@pytest.mark.parametrize("kind,arch", [("dense", "llama"), ("dense", "mistral"), ("dense", "qwen2"),
                                       ("bitmask", "llama"), ("2:4", "llama"), ("int8", "llama")])
@torch.inference_mode()
def test_prefill_and_decode_logits_match_transformers(kind, arch):
    model = _model(kind, arch)
    ids = torch.randint(0, 320, (2, 14), generator=torch.Generator().manual_seed(1))
    reference = _reference_logits(model, ids)
    fast = fastpath.for_model(model)
    assert fast is not None and all(isinstance(layer.qkv, type(model.model.layers[0].self_attn.q_proj)) for layer in fast.layers)
    cache = fast.new_cache(2, 8)
    positions = torch.arange(14).expand(2, 14)
    out = fast.forward(ids[:, :8], positions[:, :8], cache)
    torch.testing.assert_close(out, reference[:, 7], atol=1e-4, rtol=0)
    for j in range(8, 14):
        out = fast.forward(ids[:, j:j + 1], positions[:, j:j + 1], cache)
        torch.testing.assert_close(out, reference[:, j], atol=1e-4, rtol=0)
    assert cache.length == 14
    torch.testing.assert_close(_reference_logits(model, ids), reference, atol=0, rtol=0)  # the views changed nothing


@torch.inference_mode()
def test_left_padded_rows_match_each_row_alone():
    model = build_tiny_model("llama")
    fast = fastpath.for_model(model)
    long, short = torch.arange(3, 13)[None], torch.arange(40, 44)[None]
    ids = torch.zeros(2, 10, dtype=torch.long)
    ids[0], ids[1, 6:] = long[0], short[0]
    mask = (ids != 0).long()
    mask[0] = 1
    cache = fast.new_cache(2, 10)
    out = fast.forward(ids, (mask.cumsum(-1) - 1).clamp(min=0), cache, mask)
    torch.testing.assert_close(out[0], _reference_logits(model, long)[0, -1], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1], _reference_logits(model, short)[0, -1], atol=1e-4, rtol=0)
    assert cache.padded and not bool(cache.used_mask()[1, :6].any())


@pytest.mark.parametrize("kind", ["dense", "bitmask", "2:4", "int8"])
@torch.inference_mode()
def test_fused_projections_equal_the_unfused_layers(kind):
    model = _model(kind)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    before = [p(x) for p in parts]
    fused = fastpath.fuse(parts)
    torch.testing.assert_close(fused(x), torch.cat(before, dim=-1), atol=1e-6, rtol=0)
    for p, y in zip(parts, before):  # the parts now read views of the fused weight, with the same result
        torch.testing.assert_close(p(x), y, atol=0, rtol=0)
    shared = fused.weight if kind == "dense" else fused.values
    own = parts[1].weight if kind == "dense" else parts[1].values
    assert own.untyped_storage().data_ptr() == shared.untyped_storage().data_ptr()
    gate_up = fastpath.fuse([mlp.gate_proj, mlp.up_proj])
    torch.testing.assert_close(gate_up(x), torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1), atol=1e-6, rtol=0)


def test_a_mixed_group_stays_unfused_and_still_matches():
    model = _prune(build_tiny_model("llama"))
    attn = model.model.layers[0].self_attn
    attn.k_proj = SparseLinear.from_dense(attn.k_proj)  # q and v stay nn.Linear
    assert fastpath.fuse([attn.q_proj, attn.k_proj, attn.v_proj]) is None
    fast = fastpath.for_model(model)
    assert fast.layers[0].qkv is None and fast.layers[1].qkv is not None
    ids = torch.arange(1, 9)[None]
    with torch.inference_mode():
        out = fast.forward(ids, torch.arange(8)[None], fast.new_cache(1, 8))
        torch.testing.assert_close(out, _reference_logits(model, ids)[:, -1], atol=1e-4, rtol=0)


@torch.inference_mode()
def test_bfloat16_stays_close_to_transformers():
    model = build_tiny_model("llama").to(torch.bfloat16)
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(3))
    reference = _reference_logits(model, ids).float()
    fast = fastpath.for_model(model)
    cache = fast.new_cache(1, 8)
    positions = torch.arange(12)[None]
    outs = [fast.forward(ids[:, :8], positions[:, :8], cache)]
    outs += [fast.forward(ids[:, j:j + 1], positions[:, j:j + 1], cache) for j in range(8, 12)]
    got = torch.stack([o.float()[0] for o in outs])
    want = reference[0, 7:]
    assert cache.keys.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)


def test_engine_takes_the_fast_path_and_falls_back(monkeypatch):
    llama = build_tiny_model("llama")
    assert isinstance(runner_for(llama), FastRunner) and Engine(llama).runner.name == "fastpath"
    assert isinstance(runner_for(build_tiny_model("gpt_neox")), TransformersRunner)
    monkeypatch.setenv(fastpath.ENV, "0")
    assert isinstance(runner_for(llama), TransformersRunner) and fastpath.why_not(llama) == "SEFTC_FASTPATH=0"


def test_unsupported_configs_are_refused():
    from transformers import AutoModelForCausalLM

    config = tiny_config("mistral")
    config.sliding_window = 16  # below the context: attention is windowed
    windowed = AutoModelForCausalLM.from_config(config)
    assert "sliding" in fastpath.unsupported(windowed) and fastpath.for_model(windowed) is None
    assert isinstance(runner_for(windowed), TransformersRunner)
    hooked = build_tiny_model("llama")
    handle = hooked.model.layers[0].register_forward_hook(lambda *a: None)
    assert "hooks" in fastpath.unsupported(hooked)
    handle.remove()
    assert fastpath.unsupported(hooked) is None
    assert "model type" in fastpath.unsupported(build_tiny_model("opt"))


def _engine_tokens(model, prompts, schedule, monkeypatch, fast: bool):
    """Run `prompts` through one engine: prompt i is submitted before step schedule[i]."""
    monkeypatch.setenv(fastpath.ENV, "1" if fast else "0")
    engine = Engine(model, None, max_batch=8)
    assert engine.runner.name == ("fastpath" if fast else "transformers")
    seqs, step = [], 0
    while len(seqs) < len(prompts) or not all(s.done for s in seqs):
        for i, p in enumerate(prompts):
            if schedule[i] == step:
                params = GREEDY.model_copy(update={"max_tokens": 4 + 3 * i})
                seqs.append(engine.submit(p, params))
        engine.step()
        step += 1
    assert engine.running == 0 and engine._mask is None
    return [s.tokens for s in seqs]


def test_engine_joins_and_leaves_give_transformers_tokens(monkeypatch):
    model = _model("bitmask")
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 320, (n,), generator=gen).tolist() for n in (5, 17, 1, 9, 30)]
    schedule = [0, 0, 2, 5, 6]  # rows join while others run, shorter and longer than the batch
    fast = _engine_tokens(model, prompts, schedule, monkeypatch, True)
    slow = _engine_tokens(model, prompts, schedule, monkeypatch, False)
    assert fast == slow and [len(t) for t in fast] == [4, 7, 10, 13, 16]


def test_cache_grows_past_its_capacity(monkeypatch):
    model = build_tiny_model("llama")
    prompt = list(range(1, 6))
    params = GREEDY.model_copy(update={"max_tokens": 3 * fastpath.MIN_CAPACITY})
    engine = Engine(model, None)
    seq = engine.submit(prompt, params)
    capacities = set()
    while not seq.done:
        engine.step()
        if engine._batch is not None:
            capacities.add(engine._batch.cache.capacity)
    assert capacities == {64, 128, 256}
    with torch.inference_mode():
        x = torch.tensor([prompt])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=params.max_tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    assert seq.tokens == out[0, len(prompt):].tolist()


def test_the_context_end_finishes_as_on_transformers(monkeypatch):
    model = build_tiny_model("llama")  # context 256
    prompt = torch.randint(1, 320, (240,), generator=torch.Generator().manual_seed(5)).tolist()
    params = GREEDY.model_copy(update={"max_tokens": 100})
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(fastpath.ENV, flag)
        seq = Engine(model, None).generate(prompt, params)
        results[flag] = seq
    assert results["1"].tokens == results["0"].tokens and len(results["1"].tokens) == 256 - 240
    assert results["1"].finish_reason == results["0"].finish_reason == "length"


def test_the_fast_path_is_rebuilt_after_a_cast():
    model = build_tiny_model("llama")
    first = fastpath.for_model(model)
    assert fastpath.for_model(model) is first
    model.to(torch.bfloat16)
    again = fastpath.for_model(model)
    assert again is not first and again.layers[0].qkv.weight.dtype == torch.bfloat16


def test_generate_with_a_tokenizer_matches_transformers():
    from seftc.runtime.generate import generate

    model, tok = _model("int8"), tiny_tokenizer()
    result = generate(model, tok, "Shall I compare thee", max_new_tokens=10)
    ids = tok("Shall I compare thee").input_ids
    with torch.inference_mode():
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False,
                             pad_token_id=0, eos_token_id=tok.eos_token_id)
    assert result.tokens == out[0, len(ids):].tolist()


def test_bench_decode_times_the_engine_forward(monkeypatch):
    from seftc.runtime import bench
    from seftc.runtime.bench import BenchConfig, run_bench

    dense, sparse = build_tiny_model("llama"), _model("bitmask")
    seen = []
    real = bench._decode_samples

    def spy(model, ids, new_tokens, device, runner=None):
        seen.append(runner.name if runner is not None else runner_for(model).name)
        return real(model, ids, new_tokens, device, runner)

    monkeypatch.setattr(bench, "_decode_samples", spy)
    cfg = BenchConfig(batches=(1, 2), prompt_tokens=6, new_tokens=3, repeats=1, warmup=0, max_layers=1)
    result = run_bench(dense, sparse, cfg)
    assert result.config["decode_forward"] == {"dense": "fastpath", "sparse": "fastpath"}
    assert {p.phase for p in result.results} == {"prefill", "decode"}
    assert "fastpath" in seen and "transformers" in seen  # end to end: the engine's; per layer in the model: hooks
    assert len(result.layers_in_model) == len([m for m in sparse.modules() if isinstance(m, SparseLinear)])
    monkeypatch.setenv(fastpath.ENV, "0")
    assert run_bench(dense, sparse, cfg).config["decode_forward"] == {"dense": "transformers", "sparse": "transformers"}


def test_calibrate_measures_the_fused_layers_the_engine_runs():
    from seftc.runtime import dispatch

    model = _model("bitmask")
    shapes = {tuple(r["shape"]) for r in dispatch.calibrate(model)}
    fast = fastpath.built(model)
    assert fast is not None
    assert (fast.layers[0].qkv.out_features, 64) in shapes and (2 * fast.intermediate, 64) in shapes  # 128x64, 256x64
    assert (64, 64) in shapes and (64, 128) in shapes  # o_proj, down_proj: unfused
