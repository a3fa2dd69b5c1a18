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
