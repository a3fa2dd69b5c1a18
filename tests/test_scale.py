"""Models larger than the machine: sharded checkpoints in and out, the streaming prune (one block
in memory at a time, bit-identical to the in-memory prune), sizes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from seftc.cli.main import cli
from seftc.errors import SeftcError
from seftc.models.manifest import load_masks
from seftc.prune.api import prune
from seftc.sizes import parse_size

from conftest import build_tiny_model, tiny_config, tiny_tokenizer

TEXT = Path(__file__).with_name("data") / "sonnets.txt"
CALIB = {"source": str(TEXT), "nsamples": 4, "seqlen": 32}


def _state(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of a (possibly sharded) model folder, by checkpoint key."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _save(folder: Path, arch: str = "llama", layers: int = 2, dtype=torch.float32, shard: str | None = None) -> Path:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch)
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _run(*args: str, ok: bool = True):
    r = CliRunner().invoke(cli, list(args))
    if ok:
        assert r.exit_code == 0, r.output
    return r


def test_parse_size():
    assert parse_size("500MB") == 500 * 10**6 and parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1.5 GiB") == 3 * 2**29 and parse_size(1234) == 1234
    assert parse_size("8g") == 8 * 2**30
    for bad in ("", "lots", "5 parsecs", "0", "-1GB"):
        with pytest.raises(SeftcError, match="size"):
            parse_size(bad, "--max-shard-size")


STREAM_CASES = [
    ("llama", dict(method="magnitude", sparsity=0.6)),
    ("llama", dict(method="wanda", sparsity=0.5)),
    ("llama", dict(method="sparsegpt", sparsity=0.5)),
    ("llama", dict(method="wanda", pattern="2:4")),
    ("llama", dict(method="sparsegpt", pattern="2:4")),
    ("llama", dict(method="wanda", sparsity=0.6, owl=True, owl_m=1.5, owl_lambda=0.1)),
    ("llama", dict(method="sparsegpt", sparsity=0.5, owl=True, owl_m=1.5, batch_size=2)),
    ("llama", dict(method="wanda", sparsity=0.5, batch_size=2)),
    ("gpt_neox", dict(method="wanda", sparsity=0.5)),  # its LM head is saved under another name (embed_out)
    ("opt", dict(method="sparsegpt", pattern="2:4")),  # tied LM head, learned positions
    ("qwen2", dict(method="magnitude", pattern="4:8")),
]


@pytest.mark.parametrize("arch,kw", STREAM_CASES, ids=[f"{a}-{'-'.join(str(v) for v in k.values())}" for a, k in STREAM_CASES])
def test_streaming_prune_is_identical_to_in_memory(tiny_dirs, tmp_path, arch, kw):
    src = tiny_dirs[arch]
    whole = prune(str(src), calib=CALIB, output=tmp_path / "whole", stream=False, **kw)
    streamed = prune(str(src), calib=CALIB, output=tmp_path / "streamed", stream=True, **kw)
    assert streamed.streamed and not whole.streamed
    a, b = _state(tmp_path / "whole"), _state(tmp_path / "streamed")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ma, mb = load_masks(tmp_path / "whole"), load_masks(tmp_path / "streamed")
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    strip = lambda m: [{k: v for k, v in vars(r).items()} for r in m.layers]  # noqa: E731
    assert strip(whole.manifest) == strip(streamed.manifest)  # same counts, patterns and mask checksums
    assert whole.manifest.sparsity == streamed.manifest.sparsity
    assert whole.manifest.config == streamed.manifest.config
    ca, cb = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("whole", "streamed"))
    assert ca == cb
    # and plain transformers loads the streamed folder
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "streamed"))
    state = reloaded.state_dict()
    target = streamed.manifest.layers[0]
    assert int(torch.count_nonzero(state[target.name + ".weight"])) == target.nonzero


def test_streaming_holds_at_most_two_blocks(tmp_path, monkeypatch):
    """Count the decoder blocks holding real (non-meta) tensors at every block forward and every
    load: never more than two, whatever the depth; and none is left at the end."""
    from seftc.models import streaming
    from seftc.models.targets import find_blocks
    from seftc.prune import sequential

    src = _save(tmp_path / "deep", layers=6)
    seen: list[int] = []
    skeletons: list = []
    original_init, original_materialize, original_forward = (streaming.StreamingModel.__init__,
                                                             streaming.StreamingModel.materialize, sequential._block_forward)

    def count() -> None:
        seen.append(streaming.materialized_blocks(find_blocks(skeletons[-1])[1]))

    def init(self, *a, **k):
        original_init(self, *a, **k)
        skeletons.append(self.model)
        count()

    def materialize(self, keys, device="cpu"):
        original_materialize(self, keys, device)
        count()

    def forward(block, x, call):
        count()
        return original_forward(block, x, call)

    monkeypatch.setattr(streaming.StreamingModel, "__init__", init)
    monkeypatch.setattr(streaming.StreamingModel, "materialize", materialize)
    monkeypatch.setattr(sequential, "_block_forward", forward)
    for kw in (dict(method="wanda"), dict(method="sparsegpt", batch_size=2), dict(method="wanda", owl=True, owl_m=1.5), dict(method="magnitude")):
        seen.clear()
        r = prune(str(src), calib=CALIB, output=tmp_path / "out", force=True, **kw)
        assert r.streamed
        assert seen[0] == 0 and max(seen) >= 1 and max(seen) <= 2, (kw, seen)
        assert streaming.materialized_blocks(find_blocks(skeletons[-1])[1]) == 0
        assert all(p.is_meta for p in skeletons[-1].parameters())  # everything went to the output, nothing stayed
    assert len(skeletons) == 4


def test_streaming_keeps_bf16(tmp_path):
    src = _save(tmp_path / "bf16", dtype=torch.bfloat16)
    r = prune(str(src), method="wanda", calib=CALIB, output=tmp_path / "out")
    assert r.streamed
    state = _state(tmp_path / "out")
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_checkpoints_in_and_out(tmp_path):
    """A sharded input (index + shards) is read by prune (streamed), inspect, pack; prune and
    unpack write sharded output with the HF index that plain transformers loads."""
    from transformers import AutoModelForCausalLM

    single = _save(tmp_path / "single")
    sharded = _save(tmp_path / "sharded", shard="40KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("model-*-of-*.safetensors"))) > 2

    a = prune(str(single), method="wanda", calib=CALIB, output=tmp_path / "p1")
    b = prune(str(sharded), method="wanda", calib=CALIB, output=tmp_path / "p2", max_shard_size="50KB")
    assert a.streamed and b.streamed
    assert (tmp_path / "p1" / "model.safetensors").is_file() and not (tmp_path / "p1" / "model.safetensors.index.json").exists()
    index = json.loads((tmp_path / "p2" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "p2").glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    for s in shards:  # within the bound, or one tensor alone that is bigger than it
        keys = [k for k, f in index["weight_map"].items() if f == s]
        assert (tmp_path / "p2" / s).stat().st_size <= 50_000 + 4096 or len(keys) == 1, s
    sa, sb = _state(tmp_path / "p1"), _state(tmp_path / "p2")
    assert sa.keys() == sb.keys() == index["weight_map"].keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sb.values())
    m1 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "p1")).state_dict()
    m2 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "p2")).state_dict()
    assert all(torch.equal(m1[k], m2[k]) for k in m1)

    info = json.loads(_run("inspect", str(tmp_path / "p2"), "--json").output)
    assert abs(info["sparsity"] - 0.5) < 1e-9 and info["bytes"]["on_disk"] >= index["metadata"]["total_size"]

    _run("pack", str(tmp_path / "p2"), "-o", str(tmp_path / "packed"), "--max-shard-size", "30KB")
    pack_manifest = json.loads((tmp_path / "packed" / "seftc_pack.json").read_text())
    assert len(pack_manifest["files"]) > 1 and all(f.startswith("packed-") for f in pack_manifest["files"])
    _run("unpack", str(tmp_path / "packed"), "-o", str(tmp_path / "unpacked"), "--max-shard-size", "60KB")
    assert (tmp_path / "unpacked" / "model.safetensors.index.json").is_file()
    su = _state(tmp_path / "unpacked")
    assert su.keys() == sb.keys() and all(torch.equal(su[k], sb[k]) for k in sb)
    m3 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "unpacked")).state_dict()
    assert all(torch.equal(m1[k], m3[k]) for k in m1)


def test_sharded_input_with_a_missing_shard_is_refused(tmp_path):
    src = _save(tmp_path / "m", shard="40KB")
    next(iter(sorted(src.glob("model-*.safetensors")))).unlink()
    for args in (("prune", str(src), "-o", str(tmp_path / "o"), "--method", "magnitude"), ("pack", str(src), "-o", str(tmp_path / "o"))):
        r = _run(*args, ok=False)
        assert r.exit_code == 2 and "missing" in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "o").exists()


def test_bad_max_shard_size_is_refused_before_work(tiny_dir, tmp_path):
    for cmd in ("prune", "pack"):
        r = _run(cmd, str(tiny_dir), "-o", str(tmp_path / "o"), "--max-shard-size", "huge", ok=False)
        assert r.exit_code == 2 and "--max-shard-size" in r.output, r.output
        assert not (tmp_path / "o").exists()


def test_plan_cli_json_adds_up_from_the_config(tiny_dir):
    from seftc.plan import SEFT_SLOT_BYTES
    from seftc.repair.config import RepairConfig

    out = json.loads(_run("plan", str(tiny_dir), "--json").output)
    model = build_tiny_model("llama")
    shape = out["shape"]
    assert shape["params"] == sum(p.numel() for p in model.parameters()) and shape["blocks"] == 2
    assert shape["target_params"] == sum(m.weight.numel() for n, m in model.named_modules()
                                         if isinstance(m, torch.nn.Linear) and ".layers." in n)
    plans = {(p["command"], p["method"]): p for p in out["plans"]}
    assert {("prune", "wanda"), ("prune", "sparsegpt"), ("repair", "seft"), ("repair", "static"), ("repair", "lora-merge"),
            ("pack", None), ("eval", None), ("bench", None)} <= set(plans)
    for p in plans.values():
        assert p["total"] == sum(p["terms"].values()) > 0
    density = RepairConfig.model_fields["density"].default  # the plan assumes repair's own default ρ
    assert plans[("repair", "seft")]["terms"]["SEFT slots"] == int(density * shape["target_params"]) * SEFT_SLOT_BYTES
    fsdp = {(p["command"], p["method"]): p for p in json.loads(_run("plan", str(tiny_dir), "--json", "--nproc", "2", "--fsdp",
                                                                     "--method", "static").output)["plans"]}
    assert fsdp[("repair", "static")]["per_rank"] and ("prune", "wanda") not in fsdp
    assert fsdp[("repair", "static")]["terms"]["optimizer state"] * 2 == plans[("repair", "static")]["terms"]["optimizer state"]
    # each rank reads one block at a time and keeps its shard of the weights (repair/onload.py), not the whole model
    assert 0 < fsdp[("repair", "static")]["held"]["weights (this rank's shard)"] <= shape["params"] * shape["dtype_bytes"] // 2
    assert "weights" not in fsdp[("repair", "static")]["terms"]
    # prune's peak: what it holds throughout plus the largest of its phases (tokenizing the calibration text, one block, the head)
    wanda = plans[("prune", "wanda")]
    assert set(wanda["phases"]) >= {"tokenizing the calibration text", "pruning a block"}
    assert wanda["total"] == sum(wanda["held"].values()) + max(sum(ph.values()) for ph in wanda["phases"].values())
    assert wanda["terms"] == {**wanda["held"], **wanda["phases"][wanda["peak_phase"]]}
    r = _run("plan", str(tiny_dir), "--method", "nope", ok=False)
    assert r.exit_code == 2 and "unknown method" in r.output


def test_plan_static_state_is_per_active_weight_of_the_pruned_input(tiny_dir, tmp_path):
    """static holds values, gradients and AdamW moments for the active weights only: `plan` reads
    the pruned input's sparsity from its manifest (4 values per active weight, here fp32)."""
    from seftc.models.manifest import Manifest
    from seftc.plan import STATIC_ACTIVE_VALUES

    prune(str(tiny_dir), method="magnitude", sparsity=0.7, output=tmp_path / "p")
    out = json.loads(_run("plan", str(tmp_path / "p"), "--json", "--method", "static").output)
    (plan,) = [p for p in out["plans"] if p["command"] == "repair"]
    active = int(out["shape"]["target_params"] * (1 - Manifest.load(tmp_path / "p").sparsity))
    assert active < 0.31 * out["shape"]["target_params"]
    terms = plan["terms"]
    assert terms["gradients"] + terms["optimizer state"] == active * (STATIC_ACTIVE_VALUES - 1) * 4  # the values are in "weights"
    dense = json.loads(_run("plan", str(tiny_dir), "--json", "--method", "static").output)["plans"][0]["terms"]  # no manifest: 50%
    assert dense["optimizer state"] > terms["optimizer state"]


def test_plan_streamed_prune_is_flat_with_depth():
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from seftc.plan import plan_prune, shape_of

    def shape(layers: int):
        cfg = tiny_config("llama")
        cfg.num_hidden_layers = layers
        with init_empty_weights():
            return shape_of(AutoModelForCausalLM.from_config(cfg))

    shallow, deep = shape(2), shape(32)
    assert deep.params > 4 * shallow.params
    assert plan_prune(deep, "wanda").total == plan_prune(shallow, "wanda").total  # streamed: one block at a time
    assert plan_prune(deep, "wanda", streamed=False).total > plan_prune(shallow, "wanda", streamed=False).total


def test_max_memory_refuses_up_front(tiny_dir, tmp_path):
    r = _run("prune", str(tiny_dir), "-o", str(tmp_path / "o"), "--max-memory", "1MB", ok=False)
    assert r.exit_code == 2 and "would need about" in r.output and "--max-memory" in r.output, r.output
    assert not (tmp_path / "o").exists()
    r = _run("eval", str(tiny_dir), "--ppl", str(TEXT), "--max-memory", "1MB", ok=False)
    assert r.exit_code == 2 and "eval would need about" in r.output, r.output
    r = _run("prune", str(tiny_dir), "-o", str(tmp_path / "o"), "--max-memory", "lots", ok=False)
    assert r.exit_code == 2 and "--max-memory" in r.output
    _run("prune", str(tiny_dir), "-o", str(tmp_path / "o"), "--max-memory", "64GiB", "--method", "magnitude")
    assert (tmp_path / "o" / "seftc_manifest.json").is_file()
    pruned = tmp_path / "o"
    r = _run("repair", str(pruned), "-o", str(tmp_path / "r"), "--steps", "1", "--max-memory", "10MB", ok=False)
    assert r.exit_code == 2 and "repair would need about" in r.output, r.output
    assert not (tmp_path / "r").exists()


def test_plan_is_near_the_measured_peak_of_a_streamed_prune(tmp_path):
    """Loose on purpose (the benchmark holds the real check): a streamed Wanda prune of a ~17 M
    parameter model, in its own process, peaks within a wide band around the plan."""
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=8000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                      num_key_value_heads=6, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    args = ["prune", str(tmp_path / "m"), "-o", str(tmp_path / "o"), "--nsamples", "8", "--seqlen", "128", "--calib", str(TEXT)]
    # VmHWM is the child's own peak (ru_maxrss would carry the forking parent's over exec)
    code = ("import sys\nfrom seftc.cli.main import main\nsys.argv = ['seftc'] + sys.argv[1:]\ntry:\n    main()\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('PEAK', next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
    peak = int(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("PEAK")))
    plan = {(p["command"], p["method"]): p for p in json.loads(_run("plan", str(tmp_path / "m"), "--json", "--nsamples", "8",
                                                                    "--seqlen", "128", "--calib", str(TEXT)).output)["plans"]}
    assert 0.6 < peak / plan[("prune", "wanda")]["total"] < 1.5, (peak, plan[("prune", "wanda")])


def test_bench_scale_script_on_a_tiny_shape(tmp_path):
    """`make bench-scale` end to end on the tiny shape only (the real sizes are scheduled runs)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "BENCH_SHAPES": "tiny", "BENCH_DIR": str(tmp_path / "work"), "BENCH_RESULTS": str(tmp_path / "results"),
           "BENCH_SHARD": "40KB", "BENCH_CALIB": str(TEXT), "BENCH_NSAMPLES": "2", "BENCH_SEQLEN": "32", "BENCH_REPAIR_DATA": str(TEXT),
           "BENCH_REPAIR_SEQLEN": "32"}
    out = subprocess.run([sys.executable, str(root / "bench" / "bench_scale.py")], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    model = tmp_path / "work" / "model-tiny"
    assert (model / "model.safetensors.index.json").is_file() and len(list(model.glob("model-*.safetensors"))) > 1
    result = json.loads((tmp_path / "results" / "scale.json").read_text())
    rows = result["rows"]
    assert [(r["command"], r["method"]) for r in rows if r["command"] != "repair"] == [("prune", "wanda"), ("prune", "sparsegpt"), ("pack", None)]
    for r in rows:
        assert r["peak_rss"] > 0 and r["plan"] > 0 and r["wall_s"] > 0
        assert r.get("exact_sparsity") in (True, None)
    # repair of the pruned output: each method in its own process, then SEFT and static on 2 FSDP ranks (each rank's own peak)
    repairs = {(r["method"], r["ranks"]): r for r in rows if r["command"] == "repair"}
    assert set(repairs) == {("seft", 1), ("static", 1), ("static fp32", 1), ("masked-lora", 1), ("seft", 2), ("static", 2)}
    for (method, ranks), r in repairs.items():
        assert r["base_bytes"] > 0 and (r["slot_bytes"] is not None) is (method == "seft") and (r["slot_bytes"] or 1) > 0
        if ranks > 1:
            assert len(r["rank_peaks"]) == 2 and all(p > 0 for p in r["rank_peaks"]) and r["peak_rss"] == max(r["rank_peaks"])
    assert {(p["method"], p["ranks"]) for p in result["projection_7b"]} >= set(repairs)
    assert all(p["total"] > 2**30 for p in result["projection_7b"])  # the 7 B shape, whatever the measured one
    report = (tmp_path / "results" / "scale.md").read_text()
    assert "| tiny | prune | wanda |" in report and "| tiny | seft | 2 (FSDP) |" in report and "LLaMA-2-7B" in report
    assert all(r["commit"] for r in rows)
    # a second run reuses the measured rows (completing a long benchmark in parts), then BENCH_CLEAN frees the disk
    again = subprocess.run([sys.executable, str(root / "bench" / "bench_scale.py")], env={**env, "BENCH_CLEAN": "tiny"},
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    reused = json.loads((tmp_path / "results" / "scale.json").read_text())["rows"]
    assert [(r["peak_rss"], r["measured"]) for r in reused] == [(r["peak_rss"], r["measured"]) for r in rows]
    assert not model.exists() and not list((tmp_path / "work").glob("pruned-tiny-*"))


def test_bench_shares_weights_and_keeps_the_checkpoint_dtype(tmp_path):
    """bench's dense and sparse models share every tensor but the converted layers (no deep copy),
    in the checkpoint's dtype by default."""
    from seftc.runtime.convert import load_runtime_pair
    from seftc.runtime.linear import SparseLinear

    src = _save(tmp_path / "bf16", dtype=torch.bfloat16)
    prune(str(src), method="magnitude", sparsity=0.5, output=tmp_path / "p")
    pair = load_runtime_pair(str(tmp_path / "p"))
    assert {p.dtype for p in pair.dense.parameters()} == {torch.bfloat16}
    dense, sparse = dict(pair.dense.named_parameters()), dict(pair.sparse.named_parameters())
    emb = "model.embed_tokens.weight"
    assert dense[emb].data_ptr() == sparse[emb].data_ptr()
    assert all(dense[n].data_ptr() == p.data_ptr() for n, p in sparse.items() if n in dense)
    modules = dict(pair.sparse.named_modules())
    assert isinstance(modules["model.layers.0.mlp.up_proj"], SparseLinear)
    assert isinstance(dict(pair.dense.named_modules())["model.layers.0.mlp.up_proj"], torch.nn.Linear)
    assert pair.conversion.converted


def test_device_choice(tiny_dir, tmp_path, monkeypatch):
    from seftc.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(SeftcError, match="no CUDA device"):
        resolve_device("cuda")
    r = prune(str(tiny_dir), method="wanda", calib=CALIB, output=tmp_path / "o", device="cpu")
    assert r.streamed and r.manifest.layers
    for args in (("prune", str(tiny_dir), "-o", str(tmp_path / "c"), "--device", "cuda"), ("eval", str(tiny_dir), "--device", "cuda")):
        res = _run(*args, ok=False)
        assert res.exit_code == 2 and "no CUDA device" in res.output, res.output
    assert not (tmp_path / "c").exists()


def test_repair_writes_sharded_output(tmp_path):
    from transformers import AutoModelForCausalLM

    src = _save(tmp_path / "m")
    prune(str(src), method="wanda", sparsity=0.5, calib=CALIB, output=tmp_path / "p")
    r = _run("repair", str(tmp_path / "p"), "-o", str(tmp_path / "r"), "--steps", "2", "--seqlen", "32", "--batch-size", "2",
             "--data", str(TEXT), "--eval-data", str(TEXT), "--max-shard-size", "50KB", "--json")
    index = json.loads((tmp_path / "r" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "r"))
    rec = json.loads(r.output)["layers"][0]
    assert int(torch.count_nonzero(model.state_dict()[rec["name"] + ".weight"])) == rec["nonzero"]
    bad = _run("repair", str(tmp_path / "p"), "-o", str(tmp_path / "r2"), "--max-shard-size", "big", ok=False)
    assert bad.exit_code == 2 and "--max-shard-size" in bad.output and not (tmp_path / "r2").exists()


def test_mask_file_is_sharded_at_the_bound_and_read_in_both_layouts(tmp_path):
    """The mask file, like the weights, is written in shards of at most --max-shard-size
    (`seftc_masks-0000i-of-0000n.st` + `seftc_masks.st.index.json`), by the streamed prune, by
    save_model (repair) and carried whole by pack/unpack; one file keeps the old single name, which
    is still read; a shard the index names but the folder lacks is an error naming it."""
    from seftc.models.manifest import MASKS_NAME, save_masks

    masks = {f"layer{i}": torch.rand(48, 64) < 0.5 for i in range(5)}  # 384 bytes of bits each
    (tmp_path / "one").mkdir()
    save_masks(tmp_path / "one", masks)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [MASKS_NAME]  # the old layout, one file
    (tmp_path / "many").mkdir()
    save_masks(tmp_path / "many", masks, max_shard_size=800)
    index = json.loads((tmp_path / "many" / "seftc_masks.st.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "many").glob("seftc_masks-*.st"))
    assert len(files) == 3 and sorted(set(index["weight_map"].values())) == files
    assert all((tmp_path / "many" / f).stat().st_size <= 800 + 1024 for f in files)  # bits + header
    for folder in ("one", "many"):
        back, packed = load_masks(tmp_path / folder), load_masks(tmp_path / folder, packed=True)
        assert back.keys() == masks.keys() and all(torch.equal(back[k], masks[k]) and torch.equal(packed[k].unpack(), masks[k]) for k in masks)
    (tmp_path / "many" / files[1]).unlink()
    with pytest.raises(SeftcError, match="missing"):
        load_masks(tmp_path / "many")

    src = _save(tmp_path / "m")
    prune(str(src), method="wanda", sparsity=0.5, calib=CALIB, output=tmp_path / "p", max_shard_size="3KB")
    assert len(list((tmp_path / "p").glob("seftc_masks-*.st"))) > 1 and not (tmp_path / "p" / MASKS_NAME).exists()
    pruned = load_masks(tmp_path / "p")
    _run("repair", str(tmp_path / "p"), "-o", str(tmp_path / "r"), "--method", "static", "--steps", "2", "--seqlen", "32",
         "--batch-size", "2", "--data", str(TEXT), "--eval-data", str(TEXT), "--max-shard-size", "3KB")
    assert len(list((tmp_path / "r").glob("seftc_masks-*.st"))) > 1
    repaired = load_masks(tmp_path / "r")
    assert repaired.keys() == pruned.keys() and all(torch.equal(repaired[k], pruned[k]) for k in pruned)  # static keeps the mask
    _run("pack", str(tmp_path / "p"), "-o", str(tmp_path / "packed"))
    _run("unpack", str(tmp_path / "packed"), "-o", str(tmp_path / "unpacked"))
    for folder in ("packed", "unpacked"):
        carried = load_masks(tmp_path / folder)
        assert carried is not None and all(torch.equal(carried[k], pruned[k]) for k in pruned), folder


def test_a_sharded_side_file_is_copied_whole_or_not_at_all(tmp_path):
    """pack/unpack copy the mask file's shards with the other side files; when one shard cannot
    be copied (here a link out of the folder) neither its index nor the other shards are, so the
    output never holds an index that names a missing shard."""
    from seftc.models.files import copy_side_files

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    (tmp_path / "outside.st").write_bytes(b"x")
    (src / "seftc_masks-00001-of-00002.st").write_bytes(b"x")
    (src / "seftc_masks-00002-of-00002.st").symlink_to(tmp_path / "outside.st")
    (src / "seftc_masks.st.index.json").write_text(json.dumps({"weight_map": {"a": "seftc_masks-00001-of-00002.st",
                                                                              "b": "seftc_masks-00002-of-00002.st"}}))
    (src / "notes.txt").write_text("kept")
    left_out = copy_side_files(src, dst, set())
    assert sorted(p.name for p in dst.iterdir()) == ["notes.txt"]
    assert set(left_out) == {"seftc_masks-00001-of-00002.st", "seftc_masks-00002-of-00002.st", "seftc_masks.st.index.json"}


def test_plan_phases_do_not_add_up():
    """Prune tokenizes its whole calibration text before the first block is read, and writes an
    untied LM head after the last block is freed: the plan adds the largest of those moments, not
    all of them; the tokenizing phase grows with the text (336 bytes per token, measured)."""
    from seftc.plan import TOKENIZE_BYTES_PER_TOKEN, plan_prune, shape_of
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    with init_empty_weights():
        s = shape_of(AutoModelForCausalLM.from_config(cfg))
    assert s.head_params == cfg.vocab_size * cfg.hidden_size  # untied
    small, big = (plan_prune(s, "wanda", nsamples=8, seqlen=32, calib_tokens=n) for n in (1000, 10**6))
    assert small.peak_phase == "pruning a block" and big.peak_phase == "tokenizing the calibration text"
    assert big.total == sum(big.terms.values()) + 10**6 * TOKENIZE_BYTES_PER_TOKEN
    assert "weights (LM head)" in big.phases["writing the LM head"] and "weights (LM head)" not in big.peak_terms()
    assert plan_prune(s, "magnitude", nsamples=8, seqlen=32, calib_tokens=10**6).peak_phase == "pruning a block"  # no calibration


def test_plan_counts_seft_window_statistics():
    """SEFT's window statistics are in the repair plan: Σ g² / Σ |W·g| per active weight, Σ g per weight (bf16)."""
    from seftc.plan import plan_repair, shape_of

    s = shape_of(build_tiny_model("llama"))
    base = plan_repair(s, "seft", sparsity=0.7, evict_score="last")
    v2 = plan_repair(s, "seft", sparsity=0.7, evict_score="fisher", grow_candidates="window")
    assert plan_repair(s, "seft", sparsity=0.7).terms["eviction statistics"] == v2.terms["eviction statistics"]  # the default (window): as many as fisher
    assert "eviction statistics" not in base.terms and "growth statistics" not in base.terms
    assert v2.terms["eviction statistics"] == int(s.target_params * 0.3) * 2 and v2.terms["growth statistics"] == s.target_params * 2
    assert v2.total == base.total + v2.terms["eviction statistics"] + v2.terms["growth statistics"]
