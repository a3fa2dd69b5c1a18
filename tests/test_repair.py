"""SEFT repair and its baselines on tiny models: exactness, math, resume, two-process training."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SEFT_V1
from seftc.models.manifest import Manifest
from seftc.prune.api import prune
from seftc.prune.masks import Pattern, nm_holds
from seftc.repair import topology
from seftc.repair.api import repair
from seftc.repair.layer import SeftLinear
from seftc.repair.optim import SlotAdamW

TEXT = str(Path(__file__).with_name("data") / "sonnets.txt")
QUICK = dict(data=TEXT, eval_data=TEXT, steps=12, batch_size=4, seqlen=32, update_interval=4, accumulation=2, eval_every=6)


@pytest.fixture(scope="module")
def pruned(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pruned")
    calib = {"source": TEXT, "nsamples": 4, "seqlen": 32}
    prune(str(tiny_dir), method="wanda", sparsity=0.7, calib=calib, output=root / "u70")
    prune(str(tiny_dir), method="wanda", pattern="2:4", calib=calib, output=root / "nm24")
    return root


def _saved_nonzero(folder: Path) -> dict[str, int]:
    state = load_file(folder / "model.safetensors")
    manifest = Manifest.load(folder)
    return {rec.name: int(torch.count_nonzero(state[rec.name + ".weight"])) for rec in manifest.layers}


# -- pure topology -------------------------------------------------------------------------------
def test_drop_takes_smallest_unprotected_live_slots():
    delta = torch.tensor([0.5, -0.01, 0.2, 0.0, -0.03])
    live = torch.tensor([True, True, True, False, True])
    protected = torch.tensor([False, True, False, False, False])
    assert sorted(topology.select_drop(delta, live, protected, 2).tolist()) == [2, 4]


def test_grow_skips_excluded_and_respects_allowed():
    cand = torch.tensor([0, 3, 5, 7])
    score = torch.tensor([9.0, 8.0, 7.0, 6.0])
    excluded = torch.zeros(8, dtype=torch.bool)
    excluded[0] = True
    assert topology.select_grow(cand, score, excluded, 2).tolist() == [3, 5]
    allowed = torch.ones(8, dtype=torch.bool)
    allowed[3] = False
    assert topology.select_grow(cand, score, excluded, 2, allowed).tolist() == [5, 7]


def test_prune_back_least_sensitive_unprotected():
    active = torch.tensor([True, True, True, False, True])
    sens = torch.tensor([0.1, 0.05, 3.0, 0.0, 0.01])
    protected = torch.tensor([False, False, False, False, True])
    assert sorted(topology.select_prune_back(active, sens, protected, 2).tolist()) == [0, 1]


def test_nm_swaps_keep_exact_group_counts():
    torch.manual_seed(0)
    m = 4
    active = torch.zeros(32, dtype=torch.bool)
    active.view(-1, m)[:, :2] = True  # 2:4
    grow = torch.tensor([2, 3, 6, 14])  # two in group 0, one in group 1, one in group 3
    score = torch.tensor([1.0, 2.0, 3.0, 4.0])
    sens = torch.rand(32)
    grown, removed = topology.nm_swaps(grow, score, active, sens, torch.zeros(32, dtype=torch.bool), m)
    assert sorted(grown.tolist()) == [3, 6, 14]  # group 0 keeps only its best candidate
    assert (removed // m).tolist() == (grown // m).tolist()
    active[removed] = False
    active[grown] = True
    assert (active.view(-1, m).sum(1) == 2).all()


def test_paying_prefix_pairs_best_gains_with_cheapest_evictions():
    gain = torch.tensor([5.0, 3.0, 1.0, 0.5])
    cost = torch.tensor([0.1, 2.0, 2.5, 9.0])
    assert topology.paying_prefix(gain, cost) == 2
    assert topology.paying_prefix(gain, torch.tensor([6.0])) == 0
    assert topology.paying_prefix(gain[:1], cost) == 1
    assert topology.paying_prefix(torch.empty(0), cost) == 0


def test_nm_swaps_refuse_swaps_that_do_not_pay():
    m = 4
    active = torch.zeros(16, dtype=torch.bool)
    active.view(-1, m)[:, :2] = True  # 2:4
    grow = torch.tensor([2, 6, 10])  # one pruned candidate in each of groups 0, 1, 2
    sens = torch.zeros(16)
    sens.view(-1, m)[:, :2] = torch.tensor([[0.5, 0.2], [4.0, 3.0], [0.1, 0.9], [1.0, 1.0]])
    gain = torch.tensor([1.0, 1.0, 1.0])
    grown, removed = topology.nm_swaps(grow, torch.tensor([3.0, 2.0, 1.0]), active, sens, torch.zeros(16, dtype=torch.bool), m, gain)
    assert grown.tolist() == [2, 10] and removed.tolist() == [1, 8]  # group 1's cheapest costs 3.0 > 1.0


def test_drop_fraction_cosine():
    assert topology.drop_fraction(0, 100, 0.2) == pytest.approx(0.2)
    assert topology.drop_fraction(50, 100, 0.2) == pytest.approx(0.1)
    assert topology.drop_fraction(100, 100, 0.2) == pytest.approx(0.0)


# -- layer and optimizer -------------------------------------------------------------------------
def test_seft_linear_gradient_equals_dense_gradient_at_slots():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 8)
    mask = torch.rand(8, 12) > 0.5
    base.weight.data *= mask
    slots = mask.reshape(-1).nonzero().flatten()[:10]
    layer = SeftLinear(base, mask, 10, slots)
    layer.delta.data.normal_()
    layer.observer = lambda l, g: g
    x = torch.randn(3, 5, 12)
    layer(x).square().sum().backward()
    w = layer.effective_weight().clone().requires_grad_(True)
    torch.nn.functional.linear(x, w, base.bias).square().sum().backward()
    assert torch.allclose(layer.delta.grad, w.grad.reshape(-1)[slots], atol=1e-5)


def test_slot_adam_bias_correction_is_per_slot():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = SlotAdamW([p], lr=0.1)
    for _ in range(50):
        p.grad = torch.tensor([1.0, 1.0])
        opt.step()
    opt.reset_slots(0, torch.tensor([1]))
    before = p.data.clone()
    p.grad = torch.tensor([1.0, 1.0])
    opt.step()
    # a fresh slot's first Adam step moves by ~lr, like any first step
    assert (before[1] - p.data[1]).item() == pytest.approx(0.1, rel=1e-3)


def test_packed_masks_are_the_mask_file_bits():
    """A mask is held as packed bits (1/8 of a bool tensor) in the layout of the mask file and its
    checksum, on any length (padding bits zero)."""
    import numpy as np

    from seftc.prune.masks import PackedMask, mask_checksum, pack_bits, unpack_bits

    torch.manual_seed(0)
    for n in (1, 7, 8, 9, 61, 64):
        flat = torch.rand(n) > 0.5
        bits = pack_bits(flat)
        assert bits.dtype == torch.uint8 and bits.numel() == (n + 7) // 8
        assert bits.tolist() == np.packbits(flat.numpy(), bitorder="little").tolist()
        assert torch.equal(unpack_bits(bits, n), flat)
    mask = torch.rand(6, 10) > 0.3
    packed = PackedMask.pack(mask)
    assert torch.equal(packed.unpack(), mask) and mask_checksum(packed) == mask_checksum(mask)


def test_seft_layer_holds_one_packed_mask_and_merges_in_place():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8, bias=True)
    mask = torch.rand(8, 16) > 0.5
    base.weight.data *= mask
    storage = base.weight.data.data_ptr()
    layer = SeftLinear(base, mask, 6, mask.reshape(-1).nonzero().flatten()[:6])
    assert not any(b.dtype == torch.bool for b in layer.buffers())  # no bool copy of the mask
    assert layer.active_bits.numel() == 16 and torch.equal(layer.active.reshape(8, 16), mask)
    layer.delta.data.normal_()
    want = layer.effective_weight() * mask
    merged = layer.merge()
    assert merged.weight.data_ptr() == storage  # merged into W itself: no second copy of the layer
    assert torch.equal(merged.weight.data, want) and merged.bias is base.bias and not merged.weight.requires_grad
    assert layer.delta.numel() == 0  # δ freed


@pytest.mark.parametrize("method", ["seft", "static", "masked-lora"])
def test_repair_keeps_packed_masks_and_merges_into_the_loaded_weights(pruned, tmp_path, method):
    """The run keeps every mask as packed bits, and the final merge writes into the weights the
    model was loaded with (no new layers built while the old are held). static frees the dense
    weights when it attaches (it holds the active values only) and builds each layer's weight back
    one at a time (test_active_values_linear_gathers_gradients_at_the_mask_and_merges_back)."""
    from seftc.models.loading import load_model, resolve_model
    from seftc.prune.masks import PackedMask

    loaded = load_model(resolve_model(str(pruned / "u70")))
    before = {n: m.weight.data_ptr() for n, m in loaded.model.named_modules() if n.endswith("proj")}
    r = repair(loaded, output=tmp_path / "r", method=method, density=0.05, device="cpu", **{**QUICK, "steps": 6})
    after = {n: m.weight.data_ptr() for n, m in r.loaded.model.named_modules() if n.endswith("proj")}
    assert before and (after == before) is (method != "static")
    assert r.masks and all(isinstance(m, PackedMask) for m in r.masks.values())
    assert [x.mask_sha256 for x in r.manifest.layers] == [x.mask_sha256 for x in Manifest.load(tmp_path / "r").layers]


def test_active_values_linear_gathers_gradients_at_the_mask_and_merges_back():
    """static's layer: one fp32 value per active weight; the forward and the gradients are those of
    the masked dense layer; nothing dense outlives the backward; merge gives back a plain layer in
    the base's dtype, zero outside the mask, and frees the values."""
    from seftc.prune.masks import PackedMask
    from seftc.repair.layer import ActiveValuesLinear

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        base = torch.nn.Linear(16, 8).to(dtype)
        mask = torch.rand(8, 16) < 0.4
        with torch.no_grad():
            base.weight.mul_(mask)
        ref_w = base.weight.detach().float().clone().requires_grad_(True)
        layer = ActiveValuesLinear(base, PackedMask.pack(mask), torch.float32)  # --static-precision fp32
        assert layer.values.dtype == torch.float32 and layer.values.numel() == int(mask.sum())
        assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["values"]
        x = torch.randn(3, 5, 16)
        y = layer(x.to(dtype))
        want = torch.nn.functional.linear(x, ref_w, base.bias.float())
        torch.testing.assert_close(y.float(), want, atol=0.05 if dtype == torch.bfloat16 else 1e-6, rtol=0.02 if dtype == torch.bfloat16 else 1e-5)
        y.float().square().sum().backward()
        want.square().sum().backward()
        assert layer.values.grad.shape == layer.values.shape  # the gradient lives on the active weights only
        if dtype == torch.float32:
            torch.testing.assert_close(layer.values.grad, ref_w.grad[mask])
        merged = layer.merge()
        assert isinstance(merged, torch.nn.Linear) and merged.weight.dtype == dtype and not merged.weight.requires_grad
        assert torch.equal(merged.weight != 0, mask & (base.weight != 0)) and merged.bias is base.bias
        assert layer.values.numel() == 0
        half = ActiveValuesLinear(base, PackedMask.pack(mask), dtype)  # --static-precision weights (default): the base's own dtype
        assert half.values.dtype == dtype and half(x.to(dtype)).dtype == dtype


def test_masked_lora_update_gradients_without_saving_the_dense_update():
    """masked-lora's update x·(M ⊙ s·B·A)ᵀ: output and gradients (x, A, B) are those of the plain
    expression, and autograd keeps no [out, in] tensor from the forward to the backward (the
    dense update is rebuilt one layer at a time in the backward)."""
    from seftc.prune.masks import PackedMask
    from seftc.repair.methods import _MaskedLoraUpdate

    torch.manual_seed(0)
    out_f, in_f, r, s = 12, 20, 3, 2.0
    mask = torch.rand(out_f, in_f) < 0.4
    for x_dtype, ad_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)):
        a0, b0 = torch.randn(r, in_f, dtype=ad_dtype), torch.randn(out_f, r, dtype=ad_dtype)
        x0 = torch.randn(2, 5, in_f).to(x_dtype)
        g = torch.randn(2, 5, out_f).to(x_dtype)
        ref = [t.clone().requires_grad_(True) for t in (x0, a0, b0)]
        want = torch.nn.functional.linear(ref[0], (((ref[2] @ ref[1]) * s) * mask).to(x_dtype))
        want.backward(g)
        got_in = [t.clone().requires_grad_(True) for t in (x0, a0, b0)]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            got = _MaskedLoraUpdate.apply(*got_in, s, PackedMask.pack(mask))
        got.backward(g)
        assert (out_f, in_f) not in saved and saved, saved
        tol = dict(atol=0, rtol=0) if x_dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
        torch.testing.assert_close(got, want, **tol)
        for mine, theirs in zip(got_in, ref):
            assert mine.grad.dtype == theirs.grad.dtype
            torch.testing.assert_close(mine.grad, theirs.grad, **(tol if x_dtype == torch.float32 else dict(atol=0.1, rtol=0.05)))


# -- end to end ----------------------------------------------------------------------------------
# SEFT v2 options (issue 16): window / Fisher eviction scores, importance blend, caps, cool-down, the pull to the base
V2 = dict(evict_score="fisher", grow_candidates="window", row_cap=0.2, reactivation_cap=0.05, evict_cooldown=1, delta_decay=0.5)
V2_BLEND = dict(evict_score="window", evict_blend=0.3, row_cap=0.2, reactivation_cap=0.05, reactivation_margin=0.5)
V1 = SEFT_V1


@pytest.mark.parametrize("which", ["u70", "nm24"])
@pytest.mark.parametrize("options", [dict(reactivation="gain", **V1), dict(reactivation="always", **V1), dict(reactivation="always", **V2),
                                     dict(reactivation="gain", **V2_BLEND)], ids=["gain", "always", "v2", "v2-blend"])
def test_seft_keeps_exact_per_layer_sparsity_and_regrows(pruned, tmp_path, which, options):
    src = pruned / which
    out = tmp_path / "r"
    r = repair(str(src), method="seft", output=out, density=0.05, **options, **QUICK)
    assert _saved_nonzero(out) == _saved_nonzero(src)
    m = Manifest.load(out)
    regrown = sum(s["regrown"] for s in m.layer_stats.values())
    assert regrown > 0 and all(s["updates"] == 2 for s in m.layer_stats.values())
    for key, value in options.items():  # every choice recorded in the manifest
        assert m.config[key] == value
    if options.get("row_cap") is not None:  # the caps held at every update
        assert all(s["rows_emptied"] == 0 for s in m.layer_stats.values())
        limit = sum(int(options["reactivation_cap"] * n) for n in _saved_nonzero(src).values())  # floor(cap × T) per layer
        assert all(u["regrown"] <= limit for u in r.history["updates"])
    if which == "nm24":
        state = load_file(out / "model.safetensors")
        assert all(nm_holds(state[rec.name + ".weight"], Pattern(2, 4)) for rec in m.layers)
    # the mask moved: some positions left, as many entered
    assert sum(s["positions_left"] for s in m.layer_stats.values()) > 0
    assert r.history["eval_loss"][-1][1] < r.history["eval_loss"][0][1]
    for key in ("density", "update_interval", "accumulation", "zeta0", "lr", "steps", "batch_size", "seqlen", "seed", "data", "reactivation"):
        assert key in m.config


def test_noregrow_never_enters_pruned_region(pruned, tmp_path):
    out = tmp_path / "r"
    repair(str(pruned / "u70"), method="seft-noregrow", output=out, density=0.05, **QUICK)
    m = Manifest.load(out)
    assert sum(s["regrown"] for s in m.layer_stats.values()) == 0
    src = Manifest.load(pruned / "u70")
    assert [r.mask_sha256 for r in m.layers] == [r.mask_sha256 for r in src.layers]


@pytest.mark.parametrize("method,keeps", [("static", True), ("masked-lora", True), ("lora-merge", True), ("lora-dense", False)])
def test_baselines(pruned, tmp_path, method, keeps):
    out = tmp_path / "r"
    repair(str(pruned / "u70"), method=method, output=out, **{**QUICK, "steps": 4})
    m = Manifest.load(out)
    if keeps:
        assert _saved_nonzero(out) == _saved_nonzero(pruned / "u70")
    else:
        assert m.sparsity < 0.1
    if method in ("static", "masked-lora"):  # the mask itself is unchanged
        assert [r.mask_sha256 for r in m.layers] == [r.mask_sha256 for r in Manifest.load(pruned / "u70").layers]


def _cli(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "seftc.cli.main", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _quick_args(**over):
    args = {**QUICK, "steps": 16, **over}
    out = []
    for k, v in args.items():
        out += [f"--{k.replace('_', '-')}", v]
    return out


@pytest.mark.parametrize("extra", [[], ["--evict-score", "fisher", "--grow-candidates", "window", "--evict-blend", "0.3", "--row-cap", "0.2",
                                     "--evict-cooldown", "1", "--delta-decay", "0.5", "--reactivation-cap", "0.05"]], ids=["default", "v2"])
def test_resume_after_kill_matches_uninterrupted_run(pruned, tmp_path, extra):
    """v2: the checkpoint lands inside an accumulation window (steps 2-3 of each 4), so the
    window accumulators, the cool-down list, the merged store and the importance travel in it."""
    src = pruned / "u70"
    ref = tmp_path / "ref"
    p = _cli("repair", src, "-o", ref, "--density", "0.05", *extra, *_quick_args())
    assert p.wait(timeout=300) == 0, p.stderr.read()
    out = tmp_path / "resumed"
    p = _cli("repair", src, "-o", out, "--density", "0.05", "--checkpoint-every", "3", *extra, *_quick_args())
    ckpt = tmp_path / "resumed.checkpoint" / "latest"
    deadline = time.time() + 300
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.kill()
    p.wait()
    assert ckpt.exists() and not out.exists(), "the run finished before it could be killed"
    p = _cli("repair", src, "-o", out, "--density", "0.05", "--checkpoint-every", "3", "--resume", *extra, *_quick_args())
    assert p.wait(timeout=300) == 0, p.stderr.read()
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "resumed.checkpoint").exists()


def _torchrun(*args, nproc=2):
    """`seftc ARGS` as `torchrun --standalone --nproc_per_node=NPROC` runs it (a free port each time), on the CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "seftc.cli.main",
           *map(str, args), "--device", "cpu"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("method,engine", [("seft", "ddp"), ("seft", "fsdp"), ("static", "fsdp"), ("masked-lora", "fsdp"),
                                           ("lora-merge", "fsdp")])
def test_two_process_training_matches_single_process(pruned, tmp_path, method, engine):
    """Two gloo ranks, each half the batch: DDP replicas, or FSDP2 shards of the base, the trained
    tensors and their optimizer state; the same masks and (to float tolerance) weights as one
    process, and every topology decision identical on both ranks (checked by the run itself)."""
    src = pruned / "u70"
    args = ["--method", method, "--density", "0.05", *_quick_args(steps=8)]
    single = tmp_path / "single"
    p = _cli("repair", src, "-o", single, *args, "--device", "cpu")
    assert p.wait(timeout=300) == 0, p.stderr.read()
    dual = tmp_path / "dual"
    r = _torchrun("repair", src, "-o", dual, *args, *(["--fsdp"] if engine == "fsdp" else []))
    assert r.returncode == 0, r.stderr[-3000:]
    m = Manifest.load(dual)
    assert m.config["ranks"] == 2 and m.config["ranks_agree"] is True and m.config["fsdp"] is (engine == "fsdp")
    assert [x.mask_sha256 for x in m.layers] == [x.mask_sha256 for x in Manifest.load(single).layers]
    if method == "seft":
        assert sum(s["grown"] for s in m.layer_stats.values()) > 0  # a topology update happened on the shards
    a, b = load_file(single / "model.safetensors"), load_file(dual / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a), worst
    assert any(not torch.equal(a[k], load_file(src / "model.safetensors")[k]) for k in a)  # it trained



_COUNT_BLOCKS = """
import json, os, sys
from seftc.models import streaming
from seftc.models.targets import find_blocks
from seftc.repair import distributed, onload
from seftc.repair.api import repair

blocks, seen, after = [], [], {}
materialize, shard, build = streaming.StreamingModel.materialize, distributed.Dist.shard, onload.build_sharded

def counted_materialize(self, keys, device="cpu"):
    if not blocks:
        blocks.extend(find_blocks(self.model)[1])
    materialize(self, keys, device)
    seen.append(onload.full_blocks(blocks))

def counted_shard(self, unit):
    seen.append(onload.full_blocks(blocks))
    shard(self, unit)

def counted_build(*a, **k):
    out = build(*a, **k)
    after["full"] = onload.full_blocks(blocks)
    after["local"] = sum(distributed.local_part(p).flat.numel() for b in blocks for p in b.parameters())
    after["whole"] = sum(p.numel() for b in blocks for p in b.parameters())
    return out

streaming.StreamingModel.materialize, distributed.Dist.shard, onload.build_sharded = counted_materialize, counted_shard, counted_build
src, out, method = sys.argv[1:4]
repair(src, output=out, fsdp=True, device="cpu", method=method, density=0.05, **{**%r, "steps": 8})
with open(out + ".rank" + os.environ["RANK"] + ".json", "w") as f:
    json.dump({"seen": seen, **after}, f)
"""


@pytest.mark.parametrize("method", ["seft", "masked-lora"])
def test_fsdp_load_holds_one_whole_block_per_rank(tmp_path, method):
    """Under --fsdp each rank builds its shard block by block from the checkpoint: at no point
    does it hold more than two decoder blocks whole (counted at every read and every
    fully_shard), none once loaded, about half of the blocks' parameters each; and the sharded
    run ends with the masks and (to float tolerance) the weights of a single-process run.
    Six layers and a tied LM head (read once, tied after the root is read)."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config, tiny_tokenizer

    cfg = tiny_config("llama")
    cfg.num_hidden_layers, cfg.tie_word_embeddings = 6, True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "deep")
    tiny_tokenizer().save_pretrained(tmp_path / "deep")
    src = tmp_path / "pruned"
    prune(str(tmp_path / "deep"), method="wanda", sparsity=0.7, calib={"source": TEXT, "nsamples": 4, "seqlen": 32}, output=src)
    script = tmp_path / "count.py"
    script.write_text(_COUNT_BLOCKS % (QUICK,))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dual = tmp_path / "dual"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(src),
                        str(dual), method], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        counts = json.loads(Path(f"{dual}.rank{rank}.json").read_text())
        assert counts["seen"] and 1 <= max(counts["seen"]) <= 2, counts
        assert counts["full"] == 0 and abs(counts["local"] * 2 - counts["whole"]) < 0.01 * counts["whole"], counts  # ± a row
    single = tmp_path / "single"
    repair(str(src), output=single, device="cpu", method=method, density=0.05, **{**QUICK, "steps": 8})
    assert [x.mask_sha256 for x in Manifest.load(dual).layers] == [x.mask_sha256 for x in Manifest.load(single).layers]
    a, b = load_file(single / "model.safetensors"), load_file(dual / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    assert any(not torch.equal(a[k], load_file(src / "model.safetensors")[k]) for k in a)  # it trained

_STOP_AND_RESUME = """
import sys
from seftc.repair.api import repair
src, out, ckpt, stop, fsdp, resume = sys.argv[1:7]
repair(src, output=out, checkpoint_dir=ckpt, stop_after=int(stop) or None, fsdp=fsdp == "1", resume=resume == "1", device="cpu",
       density=0.05, checkpoint_every=3, max_shard_size="30KB", **{**%r, "steps": 8})
"""


def test_fsdp_checkpoint_is_whole_and_resumes_on_one_process(pruned, tmp_path):
    """Under FSDP2 a checkpoint holds whole tensors (gathered from the shards, the per-rank window
    sums averaged), streamed into shards; a single process resumes it and ends where an
    uninterrupted single-process run does."""
    script = tmp_path / "run.py"
    script.write_text(_STOP_AND_RESUME % (QUICK,))
    src, ckpt = pruned / "u70", tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(src),
                        str(tmp_path / "stopped"), str(ckpt), "4", "1", "0"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    step = ckpt / (ckpt / "latest").read_text().strip()
    assert step.name == "step-00000003" and (step / "state.safetensors.index.json").is_file()
    from seftc.formats.shards import CheckpointReader, checkpoint_files

    stored = CheckpointReader(checkpoint_files(step, prefix="state"))
    slots = stored.get("0.slots").numel()  # replicated on every rank
    assert stored.get("0.delta").numel() == stored.get("opt.0.m").numel() == slots  # whole, not one rank's shard
    for out, resume in (("resumed", "1"), ("single", "0")):
        r = subprocess.run([sys.executable, str(script), str(src), str(tmp_path / out), str(tmp_path / f"ck-{out}" if resume == "0" else ckpt),
                            "0", "0", resume], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = (dict(CheckpointReader(checkpoint_files(tmp_path / name)).items()) for name in ("single", "resumed"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    assert [x.mask_sha256 for x in Manifest.load(tmp_path / "single").layers] == \
        [x.mask_sha256 for x in Manifest.load(tmp_path / "resumed").layers]


def test_repair_bad_inputs(tiny_dir, pruned, tmp_path):
    from click.testing import CliRunner

    from seftc.cli.main import cli

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    cases = [
        ([tiny_dir, "-o", tmp_path / "o"], "no seftc_manifest.json"),
        ([pruned / "u70", "-o", tmp_path / "o", "--method", "qlora"], "--method"),
        ([pruned / "u70", "-o", tmp_path / "o", "--data", empty], "empty"),
        ([pruned / "u70", "-o", tmp_path / "o", "--data", binary], "not a text file"),
        ([pruned / "u70", "-o", tmp_path / "o", "--resume"], "no checkpoint"),
        ([pruned / "u70", "-o", tmp_path / "o", "--batch-size", "3", "--grad-accum", "2"], "divisible"),
    ]
    for args, expect in cases:
        r = CliRunner().invoke(cli, ["repair", *map(str, args)])
        assert r.exit_code == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0], r.stderr
        assert not (tmp_path / "o").exists()


def test_mask_is_explicit_when_kept_weights_are_zero(tiny_dir, tmp_path):
    """Dequantized checkpoints hold exact zeros, so a 2:4 group can keep a zero: the mask file,
    not W != 0, carries the active set, and repair keeps it exact."""
    from transformers import AutoModelForCausalLM

    from seftc.models.manifest import load_masks

    src = tmp_path / "zeros"
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, :4] = 0  # whole groups of four are zero
    model.save_pretrained(src)
    for f in tiny_dir.glob("tokenizer*"):
        (src / f.name).write_bytes(f.read_bytes())
    pruned = tmp_path / "p"
    r = prune(str(src), method="wanda", pattern="2:4", calib={"source": TEXT, "nsamples": 4, "seqlen": 32}, output=pruned)
    masks = load_masks(pruned)
    name = "model.layers.0.mlp.up_proj"
    rec = next(x for x in r.manifest.layers if x.name == name)
    assert int(masks[name].sum()) == masks[name].numel() // 2 > rec.nonzero
    out = tmp_path / "r"
    repair(str(pruned), method="seft", output=out, density=0.05, **QUICK)
    final = load_masks(out)
    assert all(int(final[k].sum()) == int(masks[k].sum()) for k in masks)
    assert all(bool((final[k].reshape(-1, 4).sum(1) == 2).all()) for k in masks)


class _FactorySpy(torch.overrides.TorchFunctionMode):
    """Records tensor factory calls made from seftc/repair without naming a device."""

    FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.tensor, torch.as_tensor, torch.rand, torch.randn,
                 torch.randperm, torch.randint}

    def __init__(self):
        super().__init__()
        self.unnamed: list[str] = []
        self.seen = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES:
            frame = sys._getframe(1)
            if "/seftc/repair/" in frame.f_code.co_filename.replace(os.sep, "/"):
                self.seen += 1
                if "device" not in kwargs:
                    self.unnamed.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} torch.{func.__name__}")
        return func(*args, **kwargs)


def test_every_tensor_repair_creates_names_its_device(pruned, tmp_path):
    """--device cuda must not leave a tensor on the CPU by accident: every tensor seftc.repair
    creates (SEFT with the v2 statistics, its checkpoint and resume; static; the LoRA baselines)
    names its device or copies another tensor's (`*_like`)."""
    v2 = dict(evict_score="fisher", grow_candidates="window", evict_blend=0.3, row_cap=0.2, evict_cooldown=1, delta_decay=0.5,
              reactivation_cap=0.05, init="random")
    spy = _FactorySpy()
    with spy:
        ckpt = tmp_path / "ckpt"
        repair(str(pruned / "u70"), output=tmp_path / "a", device="cpu", density=0.05, checkpoint_every=3, checkpoint_dir=ckpt,
               stop_after=5, **{**QUICK, "steps": 8}, **v2)
        repair(str(pruned / "u70"), output=tmp_path / "b", device="cpu", density=0.05, checkpoint_every=3, checkpoint_dir=ckpt,
               resume=True, **{**QUICK, "steps": 8}, **v2)
        repair(str(pruned / "nm24"), output=tmp_path / "c", device="cpu", density=0.05, **{**QUICK, "steps": 8})
        for i, method in enumerate(("static", "masked-lora", "lora-merge")):
            repair(str(pruned / "u70"), output=tmp_path / f"m{i}", device="cpu", method=method, checkpoint_every=3,
                   checkpoint_dir=tmp_path / f"k{i}", **{**QUICK, "steps": 4})
    assert spy.seen > 20, spy.seen  # the spy sees repair's factory calls
    assert not spy.unnamed, sorted(set(spy.unnamed))


def test_checkpoint_state_is_streamed_into_shards_and_resumes_exactly(pruned, tmp_path):
    """A checkpoint's state is written tensor by tensor into shards of at most --max-shard-size
    (with the index), and a resume reads it back one tensor at a time: the result is the
    uninterrupted run's, bit for bit."""
    args = dict(density=0.05, device="cpu", checkpoint_every=3, max_shard_size="20KB", **{**QUICK, "steps": 8})
    whole = repair(str(pruned / "u70"), output=tmp_path / "whole", **args)
    ckpt = tmp_path / "ckpt"
    repair(str(pruned / "u70"), output=tmp_path / "stopped", checkpoint_dir=ckpt, stop_after=4, **args)
    step = ckpt / (ckpt / "latest").read_text().strip()
    shards = sorted(p.name for p in step.glob("state*.safetensors"))
    assert len(shards) > 2 and (step / "state.safetensors.index.json").is_file(), shards
    from seftc.sizes import parse_size

    for f in step.glob("state*.safetensors"):  # each shard's tensors within the bound, or one tensor alone
        stored = load_file(f)
        assert sum(t.numel() * t.element_size() for t in stored.values()) <= parse_size("20KB", "") or len(stored) == 1
    resumed = repair(str(pruned / "u70"), output=tmp_path / "resumed", checkpoint_dir=ckpt, resume=True, **args)
    from seftc.formats.shards import CheckpointReader, checkpoint_files

    a, b = (dict(CheckpointReader(checkpoint_files(tmp_path / name)).items()) for name in ("whole", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [x.mask_sha256 for x in whole.manifest.layers] == [x.mask_sha256 for x in resumed.manifest.layers]


# -- static: state on the active weights only ------------------------------------------------------
def _dense_masked_adamw_reference(src: Path, steps: int, **cfg_over) -> dict[str, torch.Tensor]:
    """What `static` computed before its state moved onto the active weights: every target's whole
    weight trained by stock AdamW, its gradient masked before each step, the weight masked after
    (dense gradients, dense moments); same data, schedule and loss as `repair`."""
    from seftc.models.loading import load_model, resolve_model
    from seftc.models.manifest import load_masks
    from seftc.repair.api import lr_at
    from seftc.repair.config import make_repair_config
    from seftc.repair.data import TokenWindows

    cfg = make_repair_config(method="static", **{**QUICK, "steps": steps, **cfg_over})
    loaded = load_model(resolve_model(str(src)))
    model = loaded.model.eval()
    masks = {n: m.unpack() for n, m in load_masks(src, packed=True).items()}
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {n: model.get_submodule(n).weight for n in masks}
    for w in weights.values():
        w.requires_grad_(True)
    opt = torch.optim.AdamW(list(weights.values()), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    train = TokenWindows.from_source(loaded.tokenizer, cfg.data, cfg.seqlen, cfg.seed)
    for step in range(cfg.steps):
        ids = train.batch(step, cfg.batch_size)
        model(input_ids=ids, labels=ids).loss.backward()
        with torch.no_grad():
            for n, w in weights.items():
                w.grad.mul_(masks[n])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, w in weights.items():
                w.masked_fill_(~masks[n], 0.0)
    return {n + ".weight": w.detach() for n, w in weights.items()}


@pytest.mark.parametrize("which", ["u70", "nm24"])
def test_static_on_active_weights_matches_dense_masked_adamw(pruned, tmp_path, which):
    """static's trainable state is one fp32 value per active weight (its gradient and AdamW's two
    moments alike: no dense gradient or dense moment survives a step), and it trains exactly what
    dense AdamW under a fixed mask trains (to float tolerance)."""
    src = pruned / which
    over = dict(weight_decay=0.1)
    r = repair(str(src), method="static", output=tmp_path / "r", device="cpu", **{**QUICK, "steps": 5}, **over)
    want = _dense_masked_adamw_reference(src, 5, **over)
    got = load_file(tmp_path / "r" / "model.safetensors")
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert all(torch.allclose(got[k], want[k], atol=1e-6, rtol=1e-5) for k in want), worst
    assert any(not torch.equal(got[k], load_file(src / "model.safetensors")[k]) for k in want)  # it trained
    active = sum(_saved_nonzero(src).values())
    assert r.manifest.config["trainable_params"] == active  # one trainable value per active weight, not per weight


def test_seft_slot_state_is_int32_and_old_int64_checkpoints_resume(pruned, tmp_path):
    """Slot state kept across steps holds int32 positions (slots, the window's growth candidates,
    the cool-down list): a checkpoint inside a statistics window has SEFT_SLOT_BYTES per slot, less
    δ's gradient (not saved). A checkpoint written before (int64 positions) still resumes to the
    uninterrupted run's result, bit for bit."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from seftc.plan import SEFT_SLOT_BYTES

    args = dict(density=0.05, device="cpu", checkpoint_every=7, **{**SEFT_V1, "evict_cooldown": 2}, **{**QUICK, "steps": 9})
    whole = repair(str(pruned / "u70"), output=tmp_path / "whole", **args)
    ckpt = tmp_path / "ckpt"
    repair(str(pruned / "u70"), output=tmp_path / "stopped", checkpoint_dir=ckpt, stop_after=7, **args)
    step = ckpt / (ckpt / "latest").read_text().strip()
    assert step.name == "step-00000007"  # inside the second window (steps 7-8), after one update (an eviction list)
    (state_file,) = step.glob("state*.safetensors")
    with safe_open(str(state_file), "pt") as f:
        meta = f.metadata()
    state = load_file(state_file)
    positions = [key for key in state if key.endswith(("slots", "cand_pos", "evicted_pos"))]
    assert any(key.endswith("evicted_pos") for key in positions) and all(state[key].dtype == torch.int32 for key in positions)
    k = state["0.slots"].numel()
    per_slot = sum(state[key].numel() * state[key].element_size()
                   for key in ("0.slots", "0.delta", "0.birth", "0.cand_pos", "0.cand_sum", "opt.0.m", "opt.0.v", "opt.0.t")) / k
    assert per_slot == SEFT_SLOT_BYTES - 4
    old = {key: t.long() if key.endswith(("cand_pos", "evicted_pos")) else t for key, t in state.items()}  # as written before
    save_file(old, str(state_file), metadata=meta)
    resumed = repair(str(pruned / "u70"), output=tmp_path / "resumed", checkpoint_dir=ckpt, resume=True, **args)
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [x.mask_sha256 for x in whole.manifest.layers] == [x.mask_sha256 for x in resumed.manifest.layers]
