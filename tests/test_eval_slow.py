"""Real-model checks of `seftc eval` (SmolLM2-135M-Instruct, CPU, a minute or two)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    from seftc.models.loading import load_model

    return load_model("default")


def test_smollm_perplexity_shakespeare(smollm):
    from seftc.eval.perplexity import perplexity

    r = perplexity(smollm.model, smollm.tokenizer, "shakespeare:test", seqlen=512, limit=2)
    assert r.windows == 2 and r.tokens == 2 * 511
    assert 10 < r.ppl < 100


def test_smollm_piqa(smollm):
    from seftc.eval.multiple_choice import evaluate_tasks

    r = evaluate_tasks(smollm.model, smollm.tokenizer, ["piqa"], limit=100)["piqa"]
    assert r.n == 100 and r.acc > 0.55
