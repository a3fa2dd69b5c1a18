"""One-shot pruning end to end on tiny random models of several architectures."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from seftc.models.loading import LoadedModel, ModelRef, load_model
from seftc.models.manifest import Manifest
from seftc.models.targets import find_targets
from seftc.prune.api import expected_nonzero, prune
from seftc.prune.masks import mask_checksum, nm_holds, parse_pattern

from conftest import ARCHS, build_tiny_model, tiny_tokenizer

TEXT = Path(__file__).with_name("data") / "sonnets.txt"
CALIB = {"source": str(TEXT), "nsamples": 4, "seqlen": 32}
CASES = [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None), ("4:8", None)]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _loaded(arch, tok):
    return LoadedModel(build_tiny_model(arch), tok, ModelRef("folder", Path("."), f"tiny-{arch}"))


MATRIX = [("llama", m, p, s) for m in ("magnitude", "wanda", "sparsegpt") for p, s in CASES] + [
    (a, m, p, s) for a in ARCHS[1:] for m, p, s in (("wanda", "unstructured", 0.5), ("sparsegpt", "2:4", None), ("magnitude", "4:8", None))
]


@pytest.mark.parametrize("arch,method,pattern,sparsity", MATRIX)
def test_exact_sparsity_every_method_pattern_arch(arch, method, pattern, sparsity, tok):
    result = prune(_loaded(arch, tok), method=method, pattern=pattern, sparsity=sparsity, calib=CALIB)
    p = parse_pattern(pattern)
    target = p.sparsity if p.is_nm else sparsity
    targets = find_targets(result.loaded.model)
    assert len(result.manifest.layers) == len(targets)
    for t, rec in zip(targets, result.manifest.layers):
        w = t.module.weight.data
        assert int(torch.count_nonzero(w)) == expected_nonzero(w.numel(), target) == rec.nonzero
        assert torch.equal(w != 0, result.masks[t.name])
        assert not torch.signbit(w[w == 0]).any()  # pruned weights are +0.0, never -0.0
        assert rec.mask_sha256 == mask_checksum(result.masks[t.name])
        if p.is_nm:
            assert nm_holds(w, p) and rec.pattern == pattern
    # embeddings and lm_head untouched
    fresh = build_tiny_model(arch)
    assert torch.equal(result.loaded.model.get_input_embeddings().weight, fresh.get_input_embeddings().weight)
    assert torch.equal(result.loaded.model.get_output_embeddings().weight, fresh.get_output_embeddings().weight)


def test_sequential_inputs_come_from_pruned_blocks(tok):
    """Block 1's statistics must differ when block 0 is pruned first (sequential calibration)."""
    from seftc.prune import api

    seen = {}
    orig = api._PruneHandler.observe

    def spy(self, target, x):
        if target.name.endswith("1.self_attn.q_proj"):
            seen.setdefault("x", x.clone())
        return orig(self, target, x)

    api._PruneHandler.observe = spy
    try:
        loaded = _loaded("llama", tok)
        dense_model = build_tiny_model("llama")
        prune(loaded, method="wanda", sparsity=0.7, calib=CALIB)
    finally:
        api._PruneHandler.observe = orig
    # recompute block-1 input on the dense model
    captured = {}
    h = dense_model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda m, i: captured.setdefault("x", i[0]))
    from seftc.data.calibration import CalibConfig, calibration_samples

    ids, _ = calibration_samples(tok, CalibConfig(**CALIB), 256)
    with torch.no_grad():
        dense_model(ids)
    h.remove()
    assert seen["x"].shape == captured["x"].shape
    assert not torch.allclose(seen["x"], captured["x"], atol=1e-4)


def test_batched_calibration_matches_counts_and_single_pass_masks_for_magnitude(tok):
    a = prune(_loaded("llama", tok), method="wanda", sparsity=0.5, calib=CALIB, batch_size=2)
    b = prune(_loaded("llama", tok), method="wanda", sparsity=0.5, calib=CALIB)
    assert a.manifest.sparsity == b.manifest.sparsity == 0.5
    # the first layer sees the same inputs either way, so its Wanda mask is identical
    first = a.manifest.layers[0].name
    assert torch.equal(a.masks[first], b.masks[first])


def test_owl_same_overall_sparsity_nonuniform_layers(tok):
    r = prune(_loaded("llama", tok), method="wanda", sparsity=0.6, owl=True, owl_lambda=0.1, owl_m=1.5, calib=CALIB)
    alloc = r.manifest.config["owl_allocation"]
    assert len(set(round(s, 6) for s in alloc["block_sparsity"])) > 1
    assert abs(r.manifest.sparsity - 0.6) < 1e-3


def test_include_ignore_patterns(tok):
    r = prune(_loaded("llama", tok), method="magnitude", sparsity=0.5, include=["*mlp*"], ignore=["down_proj"])
    names = [l.name.rsplit(".", 1)[-1] for l in r.manifest.layers]
    assert set(names) == {"gate_proj", "up_proj"}
    assert torch.count_nonzero(r.loaded.model.model.layers[0].self_attn.q_proj.weight) == 64 * 64


def test_saved_folder_loads_with_plain_transformers_and_manifest_round_trips(tiny_dir, tmp_path):
    before = {p.name: p.read_bytes() for p in tiny_dir.iterdir() if p.is_file()}
    out = tmp_path / "pruned"
    r = prune(str(tiny_dir), method="sparsegpt", pattern="2:4", calib=CALIB, output=out)
    assert {p.name: p.read_bytes() for p in tiny_dir.iterdir() if p.is_file()} == before  # input untouched
    model = AutoModelForCausalLM.from_pretrained(out)
    manifest = Manifest.load(out)
    assert manifest == Manifest.from_json(r.manifest.to_json())
    raw = json.loads((out / "seftc_manifest.json").read_text())
    assert raw["calibration"]["nsamples"] == 4 and raw["calibration"]["seed"] == 0
    assert raw["versions"]["torch"] == torch.__version__
    mods = dict(model.named_modules())
    for rec in manifest.layers:
        w = mods[rec.name].weight.data
        assert int(torch.count_nonzero(w)) == rec.nonzero
        assert mask_checksum(w != 0) == rec.mask_sha256
        assert nm_holds(w, parse_pattern("2:4"))
    assert not list(tmp_path.glob(".*tmp*"))


def test_calibration_is_seeded_and_recorded(tiny_dir):
    a = prune(str(tiny_dir), method="wanda", calib={**CALIB, "seed": 1})
    b = prune(str(tiny_dir), method="wanda", calib={**CALIB, "seed": 1})
    c = prune(str(tiny_dir), method="wanda", calib={**CALIB, "seed": 2})
    assert a.manifest.calibration["sample_sha256"] == b.manifest.calibration["sample_sha256"]
    assert a.manifest.calibration["sample_sha256"] != c.manifest.calibration["sample_sha256"]
    assert [l.mask_sha256 for l in a.manifest.layers] == [l.mask_sha256 for l in b.manifest.layers]


def test_seqlen_is_capped_by_model_positions(tiny_dir):
    r = prune(str(tiny_dir), method="wanda", calib={**CALIB, "seqlen": 100_000})
    assert r.manifest.calibration["seqlen"] == 256


def test_load_model_sources(tiny_dir, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    for name in ("config.json", "model.safetensors"):
        (single / name).write_bytes((tiny_dir / name).read_bytes())
    a = load_model(str(tiny_dir))
    b = load_model(str(single / "model.safetensors"), need_tokenizer=False)
    assert a.ref.kind == "folder" and b.ref.kind == "safetensors"
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
