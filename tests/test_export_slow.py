"""`seftc export --onnx` on the real SmolLM2-135M-Instruct: onnxruntime matches PyTorch on real
prompts, for a full forward and for greedy decoding with the exported KV cache (~2 min)."""
import numpy as np
import pytest

pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.slow

PROMPTS = ("The capital of France is", "Once upon a time, in a small village by the sea, there lived")


def test_smollm2_onnx_parity(tmp_path):
    import torch

    from seftc.export.onnx import OnnxCausalLM, export_onnx
    from seftc.models.loading import load_model

    loaded = load_model("default", dtype="float32")
    r = export_onnx(loaded, tmp_path / "smollm2", prompts=PROMPTS)
    assert r.num_layers == 30 and r.kv_heads == 3 and r.head_dim == 64
    assert r.max_abs_error < 1e-3 and r.relative_error < 1e-4, r.checks
    assert {c["prompt"] for c in r.checks} == {0, 1}
    assert r.bytes < 600e6  # fp32 weights once (the tied lm_head is not stored twice)

    runner = OnnxCausalLM(r.path)
    ids = loaded.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    logits, past = runner(ids.numpy())
    with torch.no_grad():
        for _ in range(3):
            ref = loaded.model(input_ids=ids).logits[0, -1]
            assert np.abs(ref.numpy() - logits[0, -1]).max() < 1e-3
            nxt = int(ref.argmax())
            assert nxt == int(logits[0, -1].argmax())
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            logits, past = runner(np.array([[nxt]]), past=past)
