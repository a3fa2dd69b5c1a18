"""SEFT v2 (issue 16): eviction scores, caps, cool-down, the pull toward the base, fp32 drift on a
bf16 base, the learning-rate schedules, the eviction-damage log, the importance pass."""
import math
from pathlib import Path

import pytest
import torch

from conftest import SEFT_V1
from seftc.models.manifest import Manifest
from seftc.prune.api import prune
from seftc.prune.masks import Pattern
from seftc.repair import topology
from seftc.repair.api import lr_at, repair
from seftc.repair.config import make_repair_config
from seftc.repair.layer import SeftLinear
from seftc.repair.seft import SeftController, SeftOptions

TEXT = str(Path(__file__).with_name("data") / "sonnets.txt")
QUICK = dict(data=TEXT, eval_data=TEXT, steps=12, batch_size=4, seqlen=32, update_interval=4, accumulation=2, eval_every=0)


@pytest.fixture(scope="module")
def pruned(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "u70"
    prune(str(tiny_dir), method="wanda", sparsity=0.7, calib={"source": TEXT, "nsamples": 4, "seqlen": 32}, output=out)
    return out


# -- pure functions --------------------------------------------------------------------------------
def test_eviction_cost_kinds():
    torch.manual_seed(0)
    w = torch.randn(4, 6)
    g = torch.randn(24)
    active = torch.rand(24) > 0.3
    abs_mean, sq_mean, imp = torch.rand(24), torch.rand(24), torch.rand(4, 6)
    kw = dict(abs_mean=abs_mean, sq_mean=sq_mean, importance=imp)
    first = (w.reshape(-1).abs() * g.abs())
    assert torch.allclose(topology.eviction_cost("last", w, g, active, **kw), first)
    assert torch.allclose(topology.eviction_cost("window", w, g, active, **kw), abs_mean)
    assert torch.allclose(topology.eviction_cost("fisher", w, g, active, **kw), 0.5 * w.reshape(-1) ** 2 * sq_mean)
    for kind in ("wanda", "magnitude", "random"):  # rescaled to the last-batch cost's mean over A
        cost = topology.eviction_cost(kind, w, g, active, generator=torch.Generator().manual_seed(1), **kw)
        assert float(cost[active].mean()) == pytest.approx(float(first[active].mean()), rel=1e-5)
    wanda = topology.eviction_cost("wanda", w, g, active, **kw)
    assert torch.equal(torch.argsort(wanda), torch.argsort(imp.reshape(-1)))
    blended = topology.eviction_cost("fisher", w, g, active, blend=0.25, **kw)
    fisher = 0.5 * w.reshape(-1) ** 2 * sq_mean
    assert torch.allclose(blended, 0.75 * fisher + 0.25 * topology.rescale(imp.reshape(-1), fisher, active))


def test_rank_within_groups():
    assert topology.rank_within(torch.tensor([3, 1, 3, 3, 1, 0])).tolist() == [0, 0, 1, 2, 1, 0]


def test_prune_back_row_cap_never_empties_a_row():
    cols = 5
    active = torch.ones(20, dtype=torch.bool)
    sens = torch.arange(20, dtype=torch.float32)  # row 0 holds the five cheapest positions
    caps = topology.row_caps(active, cols, 0.4)  # floor(0.4 × 5) = 2 per row
    assert caps.tolist() == [2, 2, 2, 2]
    none = torch.zeros(20, dtype=torch.bool)
    assert topology.select_prune_back(active, sens, none, 5).tolist() == [0, 1, 2, 3, 4]  # uncapped: row 0 emptied
    got = topology.select_prune_back(active, sens, none, 5, cols, caps)
    assert got.tolist() == [0, 1, 5, 6, 10]
    assert topology.select_prune_back(active, sens, none, 50, cols, caps).numel() == 8  # fewer when the caps bind


def test_cap_swaps_bounds_rows_and_total():
    grown = torch.tensor([2, 6, 3, 18])
    removed = torch.tensor([0, 5, 1, 17])  # rows of 8: 0, 0, 0, 2
    caps = torch.tensor([2, 2, 2])
    assert topology.cap_swaps(grown, removed, 8, caps, None).tolist() == [True, True, False, True]
    assert topology.cap_swaps(grown, removed, 8, caps, 2).tolist() == [True, True, False, False]
    assert topology.cap_swaps(grown, removed, 8, None, 3).tolist() == [True, True, True, False]


def test_paying_prefix_margin():
    gain, cost = torch.tensor([5.0, 3.0, 1.5]), torch.tensor([1.0, 1.0, 1.0])
    assert topology.paying_prefix(gain, cost) == 3
    assert topology.paying_prefix(gain, cost, margin=2.0) == 2
    assert topology.paying_prefix(gain, cost, margin=4.0) == 1


# -- a controller on one layer, driven by a toy loss -----------------------------------------------
def _drive(options: SeftOptions, steps=16, pattern=Pattern(0, 0), dtype=torch.float32, out=32, inp=32, seed=0, total=None):
    """Train one SeftLinear for `steps` on a regression target; returns (layer, controller, log),
    log[u] = the pending decisions of update u and the active mask before it."""
    torch.manual_seed(seed)
    base = torch.nn.Linear(inp, out, bias=False)
    if pattern.is_nm:
        mask = torch.zeros(out * inp // pattern.m, pattern.m, dtype=torch.bool)
        mask[:, : pattern.n] = True
        mask = mask.reshape(out, inp)
    else:
        mask = torch.rand(out, inp) > 0.7
    base.weight.data = (base.weight.data * mask).to(dtype)
    k = math.ceil(options.density * out * inp)
    where = mask.reshape(-1).nonzero().flatten()
    layer = SeftLinear(base, mask, k, where[torch.randperm(where.numel())[:k]], defer=options.delta_decay > 0)
    layer._seft_name = "l"
    ctl = SeftController({"l": layer}, options, pattern, total or steps, lr=1e-2, weight_decay=options.delta_decay)
    target = torch.nn.Linear(inp, out, bias=False)
    log = []
    for step in range(steps):
        ctl.step, ctl.n_micro, ctl.micro = step, 1, 0
        x = torch.randn(16, inp, dtype=dtype)
        loss = (layer(x).float() - target(x.float()).detach()).square().mean()
        loss.backward()
        ctl.optimizer.step(1e-2)
        ctl.optimizer.zero_grad()
        ctl.decay(1e-2)
        if ctl.has_pending():
            log.append((ctl.state["l"].pending, layer.active.clone()))
        ctl.apply_pending()
    return layer, ctl, log


def test_row_and_global_caps_hold_at_every_update():
    opts = SeftOptions(density=0.1, update_interval=4, accumulation=2, reactivation="always", evict_score="fisher",
                       row_cap=0.25, reactivation_cap=0.02)
    layer, ctl, log = _drive(opts)
    assert len(log) == 3
    for pending, active in log:
        regrown = int((~active[pending.grow]).sum())
        assert 0 < regrown <= int(0.02 * layer.target) and pending.remove.numel() == regrown
        per_row = torch.bincount(pending.remove // layer.in_features, minlength=layer.out_features)
        assert (per_row <= topology.row_caps(active, layer.in_features, 0.25)).all()
    assert ctl.stats()["l"]["rows_emptied"] == 0 and int(layer.active.sum()) == layer.target


def test_nm_swaps_under_caps_keep_the_pattern():
    opts = SeftOptions(density=0.1, update_interval=4, accumulation=2, reactivation="always", evict_score="window",
                       row_cap=0.1, reactivation_cap=0.01)
    layer, ctl, log = _drive(opts, pattern=Pattern(2, 4))
    for pending, active in log:
        assert int((~active[pending.grow]).sum()) <= int(0.01 * layer.target)
        per_row = torch.bincount(pending.remove // layer.in_features, minlength=layer.out_features)
        assert (per_row <= topology.row_caps(active, layer.in_features, 0.1)).all()
    assert (layer.active.view(-1, 4).sum(1) == 2).all()
    assert ctl.stats()["l"]["regrown"] > 0


def test_reactivation_stop_and_cooldown():
    opts = SeftOptions(density=0.1, update_interval=4, accumulation=2, reactivation="always", evict_cooldown=2)
    layer, ctl, log = _drive(opts, steps=20)
    evicted = set()
    for pending, active in log:
        assert not (set(pending.grow.tolist()) & evicted)  # never regrown within the cool-down
        evicted |= set(pending.remove.tolist())
    stopped = SeftOptions(density=0.1, update_interval=4, accumulation=2, reactivation="always", reactivation_stop=0.5)
    _, _, log = _drive(stopped, steps=20)  # updates after steps 4, 8 (< 10) reactivate; 12, 16 do not
    regrown = [int((~active[p.grow]).sum()) for p, active in log]
    assert regrown[0] > 0 and regrown[2:] == [0, 0]


def test_delta_decay_pulls_the_drift_toward_the_pruned_base():
    opts = SeftOptions(density=0.1, update_interval=4, accumulation=2, delta_decay=5.0)
    layer, ctl, _ = _drive(opts)
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 32, bias=False)
    mask = torch.rand(32, 32) > 0.7
    pruned = (base.weight.data * mask).reshape(-1)
    # merges are kept apart: W is still the pruned base, except where prune-back zeroed it
    w = layer.weight.data.reshape(-1)
    assert (w[w != pruned] == 0).all()
    assert layer.merged_pos.numel() > 0
    before = layer.merged_val.clone()
    ctl.decay(1e-2)
    assert torch.allclose(layer.merged_val, before * (1 - 1e-2 * 5.0))
    weak, _, _ = _drive(SeftOptions(density=0.1, update_interval=4, accumulation=2, delta_decay=1e-9))  # same path, no pull
    assert float(layer.drift().abs().sum()) < 0.9 * float(weak.drift().abs().sum())


def test_bf16_base_keeps_small_updates():
    """A drop-merge of 1e-3 into a bf16 weight of 1.0 (half an ulp is 2**-8 ≈ 0.0039) used to round
    away; the fp32 merged store keeps it and the final merge applies the sum once."""
    base = torch.nn.Linear(4, 2, bias=False)
    base.weight.data = torch.ones(2, 4, dtype=torch.bfloat16)
    mask = torch.ones(2, 4, dtype=torch.bool)
    layer = SeftLinear(base, mask, 1, torch.tensor([5]))
    assert layer.defer
    for _ in range(10):
        layer.slots[0] = 5
        layer.delta.data[0] = 1e-3
        layer.merge_slots(torch.tensor([0]))
        layer.slots[0], layer.delta.data[0] = -1, 0.0
    assert layer.merged_val.tolist() == pytest.approx([0.01], rel=1e-5)
    x = torch.zeros(1, 4, dtype=torch.bfloat16)
    x[0, 1] = 1.0
    y = layer(x).detach()  # the drift reaches the forward (merged into W, row 1 would equal row 0)
    assert float(y[0, 1]) > float(y[0, 0]) == 1.0
    merged = layer.merge().weight.data
    assert merged.dtype == torch.bfloat16 and float(merged[1, 1]) == float(torch.tensor(1.01).to(torch.bfloat16)) != 1.0
    direct = torch.ones((), dtype=torch.bfloat16)
    for _ in range(10):
        direct += torch.tensor(1e-3).to(torch.bfloat16)
    assert float(direct) == 1.0  # what merging into the bf16 weight did


def test_bf16_controller_keeps_exactness():
    opts = SeftOptions(density=0.1, update_interval=4, accumulation=2, reactivation="always", evict_score="fisher", row_cap=0.25)
    layer, ctl, log = _drive(opts, dtype=torch.bfloat16)
    assert layer.defer and layer.weight.dtype == torch.bfloat16 and len(log) == 3
    assert int(layer.active.sum()) == layer.target and layer.merged_pos.numel() > 0
    assert bool(layer.active[layer.merged_pos.long()].all())


# -- learning-rate schedule ------------------------------------------------------------------------
def test_lr_schedules():
    for sched in ("cosine", "linear", "constant"):
        cfg = make_repair_config(method="static", lr=1.0, steps=11, warmup=2, lr_schedule=sched, lr_min_ratio=0.0)
        lrs = [lr_at(s, cfg) for s in range(11)]
        assert lrs[:2] == [0.5, 1.0] and lrs[2] == 1.0
        if sched == "constant":
            assert lrs[2:] == [1.0] * 9
        elif sched == "linear":
            assert lrs[2:] == pytest.approx([1 - i / 9 for i in range(9)])
        else:
            assert lrs[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 9)) for i in range(9)])
    cfg = make_repair_config(method="seft", lr=1.0, steps=11, warmup=0, lr_schedule="linear", lr_min_ratio=0.1)
    assert lr_at(0, cfg) == 1.0 and lr_at(9, cfg) == pytest.approx(0.1 + 0.9 / 11 * 2)


@pytest.mark.parametrize("method", ["seft", "static", "masked-lora", "lora-merge", "seft-noregrow", "lora-dense"])
def test_every_method_follows_the_schedule(pruned, tmp_path, method):
    r = repair(str(pruned), method=method, output=tmp_path / "r", lr=1e-3, lr_schedule="linear", warmup=1,
               **{**QUICK, "steps": 4, "update_interval": 2, "accumulation": 1})
    cfg = make_repair_config(method=method, lr=1e-3, lr_schedule="linear", warmup=1, **{**QUICK, "steps": 4, "update_interval": 2, "accumulation": 1})
    assert [lr for _, lr in r.history["lr"]] == [lr_at(s, cfg) for s in range(4)]
    assert Manifest.load(tmp_path / "r").config["lr_schedule"] == "linear"


# -- eviction damage log, importance ---------------------------------------------------------------
class _Sink:
    def __init__(self):
        self.fields = []

    def task(self, description, total):
        return lambda n=1: None

    def status(self, **fields):
        self.fields.append(fields)


def test_update_damage_is_logged_in_and_out_of_domain(pruned, tmp_path, calib_file):
    sink = _Sink()
    r = repair(str(pruned), method="seft", output=tmp_path / "r", density=0.05, damage_windows=2, ood_data=str(calib_file),
               reactivation="always", progress=sink, **SEFT_V1, **QUICK)
    damage = r.history["update_damage"]
    assert [d["step"] for d in damage] == [u["step"] for u in r.history["updates"]] == [4, 8]
    assert all({"in_before", "in_after", "out_before", "out_after"} <= d.keys() for d in damage)
    assert any(d["in_after"] != d["in_before"] for d in damage)  # evictions changed the loss
    m = Manifest.load(tmp_path / "r")
    assert m.training["update_damage"] == damage and m.config["damage_windows"] == 2
    shown = [f for f in sink.fields if "damage_in" in f]
    assert len(shown) == 2 and shown[0]["damage_in"] == pytest.approx(damage[0]["in_after"] - damage[0]["in_before"])
    plain = repair(str(pruned), method="seft", output=tmp_path / "p", density=0.05, reactivation="always", **SEFT_V1, **QUICK)
    assert plain.history["update_damage"] == []  # off by default
    a, b = (Manifest.load(tmp_path / x).layers for x in ("r", "p"))
    assert [x.mask_sha256 for x in a] == [x.mask_sha256 for x in b]  # logging does not change the run


def test_importance_pass_matches_wanda_statistic(pruned):
    from seftc.data.calibration import CalibConfig, calibration_samples
    from seftc.models.loading import load_model
    from seftc.repair.importance import input_sq_norms

    loaded = load_model(str(pruned))
    name = "model.layers.0.mlp.down_proj"
    module = loaded.model.get_submodule(name)
    calib = CalibConfig(source=TEXT, nsamples=3, seqlen=16)
    norms = input_sq_norms(loaded.model, loaded.tokenizer, {name: module}, calib)
    seen = []
    h = module.register_forward_pre_hook(lambda m, i: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    samples, _ = calibration_samples(loaded.tokenizer, calib, None)
    with torch.no_grad():
        loaded.model(input_ids=samples)
    h.remove()
    assert torch.allclose(norms[name], torch.cat(seen).pow(2).sum(0), rtol=1e-4)


def test_wanda_eviction_score_runs_end_to_end(pruned, tmp_path):
    r = repair(str(pruned), method="seft", output=tmp_path / "r", density=0.05, reactivation="always", importance_windows=2,
               **{**SEFT_V1, "evict_score": "wanda"}, **QUICK)
    m = Manifest.load(tmp_path / "r")
    assert m.config["evict_score"] == "wanda" and sum(s["pruned_back"] for s in m.layer_stats.values()) > 0
    assert all(u["rows_emptied"] >= 0 for u in r.history["updates"])


def test_bf16_model_repairs_end_to_end(tmp_path):
    """A bf16 model: the drift stays fp32 during training, the saved weights are bf16, exact sparsity."""
    from safetensors.torch import load_file

    from conftest import build_tiny_model, tiny_tokenizer

    build_tiny_model().to(torch.bfloat16).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    src = tmp_path / "p"
    prune(str(tmp_path / "m"), method="wanda", sparsity=0.7, calib={"source": TEXT, "nsamples": 4, "seqlen": 32}, output=src)
    r = repair(str(src), method="seft", output=tmp_path / "r", density=0.05, reactivation="always", **SEFT_V1,
               **{**QUICK, "eval_every": 6})
    m = Manifest.load(tmp_path / "r")
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "r" / "model.safetensors")
    for rec in m.layers:
        w = after[rec.name + ".weight"]
        assert w.dtype == torch.bfloat16 and int(torch.count_nonzero(w)) == int(torch.count_nonzero(before[rec.name + ".weight"]))
    assert sum(s["regrown"] for s in m.layer_stats.values()) > 0
    assert r.history["eval_loss"][-1][1] < r.history["eval_loss"][0][1]


@pytest.mark.parametrize("score", ["fisher", "window"])
def test_window_statistics_kept_per_active_position(score):
    """The window's eviction statistics hold one value per active position (not one per weight), and
    they are what the dense statistics would be there: Σ g² (fisher) of the gradients seen."""
    opts = SeftOptions(density=0.1, update_interval=4, accumulation=3, reactivation="always", evict_score=score)
    layer, ctl, _ = _drive(opts, steps=2, total=16)  # step 1 of the first window (steps 1..3, the update after 3) is in
    st = ctl.state["l"]
    kept = st.win_sq if score == "fisher" else st.win_abs
    assert kept.numel() == layer.target == int(layer.active.sum()) and st.win_n == 1
    assert (st.win_abs if score == "fisher" else st.win_sq) is None
    grads, seen = [], layer.observer  # one more step by hand, recording the dense gradient the controller sees
    layer.observer = lambda lyr, g: grads.append(g.clone()) or seen(lyr, g)
    before = kept.float().clone()
    ctl.step, ctl.n_micro, ctl.micro = 2, 1, 0
    x = torch.randn(16, layer.in_features)
    layer(x).square().mean().backward()
    a = layer.active
    expected = grads[0].reshape(-1)[a].float().square() if score == "fisher" else \
        (layer.effective_weight().reshape(-1)[a].float().abs() * grads[0].reshape(-1)[a].float().abs())
    added = (st.win_sq if score == "fisher" else st.win_abs).float() - before
    assert st.win_n == 2 and bool((added - expected).abs().le(2**-7 * (before.abs() + expected.abs()) + 1e-12).all())
