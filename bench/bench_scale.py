"""`make bench-scale`: prune models larger than the machine, block by block.

Protocol (written into results/scale.md and results/scale.json):
- models: random-weight LLaMA-shaped checkpoints in bfloat16 (vocab 32000), written shard by
  shard (2 GB shards, one tensor in memory at a time, never the whole model):
  0.5 B (hidden 1536, 16 layers, MLP 4096), 1.1 B (TinyLlama: 2048, 22, 5632, 4 KV heads),
  3 B (the 7 B width with 14 layers: 4096, 14, 11008) and the LLaMA-2-7B shape (4096, 32, 11008);
- runs, each in its own process (`seftc ... --device cpu`), peak RSS = that process's ru_maxrss:
  Wanda 50% with 8 × 128 calibration tokens on every shape, SparseGPT 50% on the 1.1 B, and
  `seftc pack` of the 7 B output; wall time of the whole command;
- every pruned output is checked for exact sparsity tensor by tensor (each target keeps exactly
  numel − round(0.5 · numel) weights), and `seftc plan`'s estimate is printed beside each peak.
- repair of the Wanda-50% output of the 0.5 B and 1.1 B shapes: SEFT (default ρ), static (the
  weights' dtype, and with an fp32 master copy) and masked LoRA, 2 steps of batch 1 × 256 tokens of
  shakespeare:train, each in its own process; then SEFT and static under `torchrun
  --nproc_per_node=2 ... --fsdp` (batch 2: one sequence per rank), each rank's own peak
  (bench/rank_peak.py) and their maximum. Beside them `plan`'s repair estimate, SEFT's bytes per
  slot and the base's bytes, and `plan`'s projection of each method to the LLaMA-2-7B shape
  (bf16 base; the SEFT slots and static's fp32 variant with fp32 optimizer state).
- each measured row is kept in BENCH_DIR/rows.json with the seftc commit that measured it (shown in
  the table) and reused by later runs with the same settings, so a long benchmark can be completed in
  parts; BENCH_REMEASURE=1 measures every row again, BENCH_ONLY_CACHED=1 writes the table from the
  measured rows alone (the rows still missing are left out). `plan` is always computed by the current code.
Disk: about 3 × 13.5 GB for the 7 B shape (model, pruned, packed); BENCH_CLEAN (comma list of shapes)
deletes those shapes' folders once their rows are measured. BENCH_SHAPES (comma list of
0.5b,1.1b,3b,7b or tiny), BENCH_DIR and BENCH_SHARD override the defaults.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # name: (hidden, layers, intermediate, heads, kv heads, vocab)
    "tiny": (64, 3, 160, 4, 2, 512),
    "0.5b": (1536, 16, 4096, 16, 16, 32000),
    "1.1b": (2048, 22, 5632, 32, 4, 32000),
    "3b": (4096, 14, 11008, 32, 32, 32000),
    "7b": (4096, 32, 11008, 32, 32, 32000),
}
NSAMPLES, SEQLEN = int(os.environ.get("BENCH_NSAMPLES", 8)), int(os.environ.get("BENCH_SEQLEN", 128))
CALIB = "shakespeare:calib"
REPAIR_SHAPES = ("0.5b", "1.1b", "tiny")
REPAIR_RUNS = (  # (label, `seftc repair` options, ranks); 2 ranks: torchrun with --fsdp
    ("seft", ("--method", "seft"), 1),
    ("static", ("--method", "static"), 1),
    ("static fp32", ("--method", "static", "--static-precision", "fp32"), 1),
    ("masked-lora", ("--method", "masked-lora"), 1),
    ("seft", ("--method", "seft"), 2),
    ("static", ("--method", "static"), 2),
)
REPAIR_STEPS, REPAIR_BATCH = 2, 1  # batch per rank
REPAIR_SEQLEN = int(os.environ.get("BENCH_REPAIR_SEQLEN", 256))
REPAIR_DATA = "shakespeare:train"
PROJECTION_SEQLEN = 256  # the 7 B projection's, whatever BENCH_REPAIR_SEQLEN says


def byte_tokenizer():
    """A byte-level tokenizer (256 ids, no merges): enough to feed calibration text, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sorted(alphabet)[0])


def llama_model(shape: str):
    """A meta-device (no memory) bf16 LLaMA model of `shape`."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False)
    with init_empty_weights():
        return LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)


def write_random_model(folder: Path, shape: str, shard: str) -> Path:
    """A random LLaMA checkpoint of `shape`, written tensor by tensor into shards."""
    import torch

    from seftc.formats.shards import ShardedWriter
    from seftc.models.saving import atomic_folder, saved_names, write_config
    from seftc.sizes import parse_size

    if (folder / "config.json").is_file():
        return folder
    model = llama_model(shape)
    gen = torch.Generator().manual_seed(0)
    with atomic_folder(folder) as tmp:
        with ShardedWriter(tmp, "model", parse_size(shard)) as writer:
            for key, ckpt_key in saved_names(model).items():
                meta = model.get_parameter(key)
                if meta.dim() == 1:
                    t = torch.ones(meta.shape, dtype=torch.bfloat16)
                else:
                    t = (torch.randn(meta.shape, generator=gen) * 0.02).to(torch.bfloat16)
                writer.add(ckpt_key, t)
                del t
        write_config(model, tmp)
        byte_tokenizer().save_pretrained(tmp)
    return folder


def measured(args: list[str], ranks: int = 1) -> dict:
    """Run `seftc ARGS` in its own process: wall time, peak RSS (that child's ru_maxrss), stdout.
    With `ranks` > 1, under `torchrun --nproc_per_node=RANKS`, each rank run by rank_peak.py: the
    peak is the largest of the ranks' own peaks (`rank_peaks`: each one), not the launcher's."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, tempfile.TemporaryDirectory() as peaks:
        cmd = [sys.executable, "-m", "seftc.cli.main", *args] if ranks == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", str(ROOT / "bench" / "rank_peak.py"),
             peaks, *args]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read().strip()
        rank_peaks = [json.loads(f.read_text())["peak_rss"] for f in sorted(Path(peaks).glob("rank-*.json"))]
    if proc.returncode:
        raise SystemExit(f"seftc {' '.join(args)} failed ({proc.returncode}): {stderr.splitlines()[-1] if stderr else ''}")
    if ranks == 1:
        return {"wall_s": round(wall, 2), "peak_rss": usage.ru_maxrss * 1024, "stdout": stdout}
    if len(rank_peaks) != ranks:
        raise SystemExit(f"seftc {' '.join(args)}: {len(rank_peaks)} of {ranks} ranks reported their peak")
    return {"wall_s": round(wall, 2), "peak_rss": max(rank_peaks), "rank_peaks": rank_peaks, "stdout": stdout}


def exact_sparsity(folder: Path, sparsity: float = 0.5) -> bool:
    """Every target tensor keeps exactly numel − round(s · numel) weights (read one at a time)."""
    import torch

    from seftc.formats.shards import CheckpointReader, checkpoint_files
    from seftc.models.manifest import Manifest
    from seftc.prune.api import expected_nonzero

    manifest = Manifest.load(folder)
    reader = CheckpointReader(checkpoint_files(folder))
    for layer in manifest.layers:
        w = reader.get(layer.name + ".weight")
        if int(torch.count_nonzero(w)) != expected_nonzero(w.numel(), sparsity) or layer.nonzero != int(torch.count_nonzero(w)):
            return False
    return bool(manifest.layers)


def measured_by() -> str:
    """The seftc commit this benchmark runs (short hash, `+dirty` when seftc/ differs from it)."""
    from seftc.compress.report import software

    sw = software()
    if not sw["commit"]:
        return f"seftc {sw['seftc']}"
    return sw["commit"][:7] + ("+dirty" if sw["dirty"] else "")


class RowCache:
    """Measured rows by their settings, in BENCH_DIR/rows.json (written after every row)."""

    def __init__(self, path: Path, remeasure: bool, only_cached: bool = False):
        self.path = path
        self.only_cached = only_cached
        self.rows = {} if remeasure or not path.is_file() else json.loads(path.read_text())

    def get(self, key: dict, measure) -> dict | None:
        """The row measured with `key`'s settings; measured now if missing (None with only_cached)."""
        k = json.dumps(key, sort_keys=True)
        if k not in self.rows:
            if self.only_cached:
                return None
            self.rows[k] = {**key, **measure(), "commit": measured_by(), "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.rows, indent=1) + "\n")
            tmp.replace(self.path)
        return self.rows[k]


def main() -> None:
    shapes = [s for s in os.environ.get("BENCH_SHAPES", "0.5b,1.1b,3b,7b").split(",") if s]
    work = Path(os.environ.get("BENCH_DIR", ROOT / "runs" / "bench-scale"))
    results_dir = Path(os.environ.get("BENCH_RESULTS", ROOT / "results"))
    shard = os.environ.get("BENCH_SHARD", "2GB")
    calib = os.environ.get("BENCH_CALIB", CALIB)
    repair_data = os.environ.get("BENCH_REPAIR_DATA", REPAIR_DATA)
    clean = set(filter(None, os.environ.get("BENCH_CLEAN", "").split(",")))
    work.mkdir(parents=True, exist_ok=True)
    cache = RowCache(work / "rows.json", os.environ.get("BENCH_REMEASURE") == "1", os.environ.get("BENCH_ONLY_CACHED") == "1")
    settings = {"nsamples": NSAMPLES, "seqlen": SEQLEN, "shard": shard, "calib": calib}
    rows = []
    for shape in shapes:
        model = work / f"model-{shape}"
        methods = ["wanda"] + (["sparsegpt"] if shape in ("1.1b", "tiny") else [])
        for method in methods:
            def prune_row(method=method):
                write_random_model(model, shape, shard)
                out = work / f"pruned-{shape}-{method}"
                run = measured(["prune", str(model), "-o", str(out), "--force", "--method", method, "--sparsity", "0.5",
                                "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--calib", calib, "--device", "cpu",
                                "--max-shard-size", shard, "--json"])
                return {"wall_s": run["wall_s"], "peak_rss": run["peak_rss"], "exact_sparsity": exact_sparsity(out),
                        "checkpoint_bytes": sum(f.stat().st_size for f in model.glob("*.safetensors"))}

            rows.append(cache.get({"shape": shape, "command": "prune", "method": method, **settings}, prune_row))
            print(json.dumps(rows[-1]), flush=True) if rows[-1] else rows.pop()
        if shape in ("7b", "tiny"):
            def pack_row():
                if not (work / f"pruned-{shape}-wanda" / "config.json").is_file():
                    raise SystemExit(f"pack row of {shape}: its pruned output is gone (BENCH_REMEASURE=1 measures the prune again)")
                run = measured(["pack", str(work / f"pruned-{shape}-wanda"), "-o", str(work / f"packed-{shape}"), "--force",
                                "--max-shard-size", shard, "--json"])
                return {"wall_s": run["wall_s"], "peak_rss": run["peak_rss"], "exact_sparsity": None,
                        "packed_bytes": json.loads(run["stdout"])["file_bytes"]}

            rows.append(cache.get({"shape": shape, "command": "pack", "method": None, **settings}, pack_row))
            print(json.dumps(rows[-1]), flush=True) if rows[-1] else rows.pop()
        for label, options, ranks in REPAIR_RUNS if shape in REPAIR_SHAPES else ():
            def repair_row(options=options, ranks=ranks):
                pruned = work / f"pruned-{shape}-wanda"
                if not (pruned / "config.json").is_file():
                    raise SystemExit(f"repair rows of {shape}: its pruned output is gone (BENCH_REMEASURE=1 measures the prune again)")
                out = work / f"repaired-{shape}"
                run = measured(["repair", str(pruned), "-o", str(out), "--force", *options, "--steps", str(REPAIR_STEPS), "--warmup", "1",
                                "--batch-size", str(REPAIR_BATCH * ranks), "--seqlen", str(REPAIR_SEQLEN), "--eval-every", "0",
                                "--data", repair_data, "--eval-data", repair_data, "--device", "cpu", "--max-shard-size", shard, "--json",
                                *(["--fsdp"] if ranks > 1 else [])], ranks)
                shutil.rmtree(out, ignore_errors=True)
                return {k: v for k, v in run.items() if k != "stdout"}

            key = {"shape": shape, "command": "repair", "method": label, "ranks": ranks, "steps": REPAIR_STEPS, "batch_per_rank": REPAIR_BATCH,
                   "repair_seqlen": REPAIR_SEQLEN, "data": repair_data, "shard": shard}
            rows.append(cache.get(key, repair_row))
            print(json.dumps(rows[-1]), flush=True) if rows[-1] else rows.pop()
        if shape in clean:
            for folder in work.glob(f"*-{shape}*"):
                shutil.rmtree(folder, ignore_errors=True)
    from seftc.data.calibration import tokenize_text
    from seftc.data.corpus import load_text
    from seftc.plan import SEFT_SLOT_BYTES, plan_pack, plan_prune, shape_of

    calib_tokens = int(tokenize_text(byte_tokenizer(), load_text(calib).text).numel())  # prune tokenizes the whole text once

    shapes_of = {name: shape_of(llama_model(name)) for name in {r["shape"] for r in rows}}  # one meta build per shape
    for r in rows:  # the plan of the current code, from the shape alone
        cfg = shapes_of[r["shape"]]
        if r["command"] == "repair":
            r["plan"] = repair_plan(cfg, r["method"], r["ranks"], r["repair_seqlen"]).total
            r["slot_bytes"] = SEFT_SLOT_BYTES if r["method"] == "seft" else None
            r["base_bytes"] = cfg.params * cfg.dtype_bytes
        else:
            r["plan"] = (plan_pack(cfg) if r["command"] == "pack" else plan_prune(cfg, r["method"], nsamples=NSAMPLES, seqlen=SEQLEN,
                                                                                              calib_tokens=calib_tokens)).total
    projection = seven_b_projection()
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "scale.json").write_text(json.dumps({**settings, "rows": rows, "projection_7b": projection}, indent=2) + "\n")
    lines = ["| shape | command | method | wall (s) | peak RSS (GiB) | plan (GiB) | plan / peak | exact sparsity | measured at |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        if r["command"] == "repair":
            continue
        lines.append(f"| {r['shape']} | {r['command']} | {r['method'] or ''} | {r['wall_s']:.1f} | {r['peak_rss'] / 2**30:.2f} | "
                     f"{r['plan'] / 2**30:.2f} | {r['plan'] / r['peak_rss']:.2f} | {'' if r['exact_sparsity'] is None else r['exact_sparsity']} | "
                     f"{r['commit']}, {r['measured']} |")
    repairs = [r for r in rows if r["command"] == "repair"]
    if repairs:
        lines += ["", f"Repair, {REPAIR_STEPS} steps × {REPAIR_BATCH} × {REPAIR_SEQLEN} tokens per rank (peak: the largest rank's own):", "",
                  "| shape | method | ranks | wall (s) | peak RSS (GiB) | per rank (GiB) | plan (GiB) | plan / peak | SEFT bytes / slot | "
                  "base (GiB) | measured at |",
                  "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
        for r in repairs:
            per_rank = ", ".join(f"{p / 2**30:.2f}" for p in r.get("rank_peaks", []))
            lines.append(f"| {r['shape']} | {r['method']} | {r['ranks']}{' (FSDP)' if r['ranks'] > 1 else ''} | {r['wall_s']:.1f} | "
                         f"{r['peak_rss'] / 2**30:.2f} | {per_rank} | {r['plan'] / 2**30:.2f} | {r['plan'] / r['peak_rss']:.2f} | "
                         f"{r['slot_bytes'] or ''} | {r['base_bytes'] / 2**30:.2f} | {r['commit']}, {r['measured']} |")
    lines += ["", f"Projection to the LLaMA-2-7B shape (`plan`, bf16 base, batch {REPAIR_BATCH} × {PROJECTION_SEQLEN} per rank, "
                  "Wanda 50% input):", ""]
    lines += [f"- {p['method']}{' per rank of 2 (FSDP)' if p['ranks'] > 1 else ''}: {p['total'] / 2**30:.1f} GiB ({p['terms']})"
              for p in projection]
    (results_dir / "scale.md").write_text(__doc__.split("\n", 1)[1] + "\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


def repair_plan(shape, label: str, ranks: int, seqlen: int):
    """`plan`'s repair estimate for a REPAIR_RUNS row (`label`: a method, or 'static fp32')."""
    from seftc.plan import plan_repair

    method, _, precision = label.partition(" ")
    return plan_repair(shape, method, batch_size=REPAIR_BATCH * ranks, seqlen=seqlen, nproc=ranks, fsdp=ranks > 1, sparsity=0.5,
                       static_precision=precision or "weights")


def seven_b_projection() -> list[dict]:
    """`plan`'s repair estimate of each REPAIR_RUNS setting (and lora-merge) at the LLaMA-2-7B shape."""
    from seftc.plan import shape_of
    from seftc.sizes import format_size

    shape = shape_of(llama_model("7b"))
    out = []
    for label, ranks in [(label, ranks) for label, _, ranks in REPAIR_RUNS] + [("lora-merge", 1)]:
        p = repair_plan(shape, label, ranks, PROJECTION_SEQLEN)
        out.append({"method": label, "ranks": ranks, "total": p.total,
                    "terms": ", ".join(f"{k} {format_size(v)}" for k, v in p.peak_terms().items() if v)})
    return out


if __name__ == "__main__":
    main()
