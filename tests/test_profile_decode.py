"""bench/profile_decode.py's pure parts on a tiny model (never SmolLM2 here): stubbing every linear
layer leaves the rest of the step running, and restoring brings the same logits back."""
import importlib.util
from pathlib import Path

import torch

from seftc.runtime.convert import sparsify_model
from seftc.runtime.linear import SparseLinear

from conftest import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("profile_decode", ROOT / "bench" / "profile_decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stubbed_linears_run_the_step_and_restore():
    pd = _module()
    model = build_tiny_model("llama")
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            p.data[p.data.abs() < p.data.abs().median()] = 0
    sparsify_model(model)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        stubbed = pd.stub_linears(model)
        assert any(isinstance(m, SparseLinear) for m in stubbed) and any(type(m) is torch.nn.Linear for m in stubbed)
        out = model(input_ids=ids).logits
        assert out.shape == before.shape and not out.any()  # the LM head is a stub too
        pd.restore(stubbed)
        torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_profile_reports_the_share_outside_the_linear_layers():
    pd = _module()
    from conftest import tiny_tokenizer

    model = build_tiny_model("llama")
    rec = pd.profile(model, tiny_tokenizer(), [1, 2, 3], steps=3, rounds=2)
    assert rec["step_ms"] > 0 and rec["outside_linear_ms"] > 0
    assert abs(rec["linear_ms"] + rec["outside_linear_ms"] - rec["step_ms"]) < 1e-9
    assert rec["outside_share"] == rec["outside_linear_ms"] / rec["step_ms"]


def test_both_forwards_are_profiled_and_the_fused_layers_stubbed():
    pd = _module()
    from seftc.runtime import fastpath
    from seftc.runtime.int8 import SparseInt8Linear

    model = build_tiny_model("llama")
    attn = model.model.layers[0].self_attn
    attn.o_proj = SparseInt8Linear.from_dense(attn.o_proj)  # int8 layers are stubbed too
    per = pd.profile(model, None, [1, 2, 3], steps=3, rounds=1, forwards=("fastpath", "transformers"))
    assert [per[f]["forward"] for f in ("fastpath", "transformers")] == ["fastpath", "transformers"]
    assert all(r["step_ms"] > 0 and r["tokens_per_s"] == 1e3 / r["step_ms"] for r in per.values())
    fast = fastpath.built(model)
    stubbed = pd.stub_linears(model)
    try:
        assert all(m in stubbed for m in fast.linears()) and attn.o_proj in stubbed
        with torch.inference_mode():
            out = fast.forward(torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 2]]), fast.new_cache(1, 3))
        assert not out.any()
    finally:
        pd.restore(stubbed)
