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
- each measured row is kept in BENCH_DIR/rows.json with the seftc commit that measured it (shown in
  the table) and reused by later runs with the same settings, so a long benchmark can be completed in
  parts; BENCH_REMEASURE=1 measures every row again. `plan` is always computed by the current code.
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


def measured(args: list[str]) -> dict:
    """Run `seftc ARGS` in its own process: wall time, peak RSS (that child's ru_maxrss), stdout."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "seftc.cli.main", *args], stdout=out, stderr=err,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read().strip()
    if proc.returncode:
        raise SystemExit(f"seftc {' '.join(args)} failed ({proc.returncode}): {stderr.splitlines()[-1] if stderr else ''}")
    return {"wall_s": round(wall, 2), "peak_rss": usage.ru_maxrss * 1024, "stdout": stdout}


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

    def __init__(self, path: Path, remeasure: bool):
        self.path = path
        self.rows = {} if remeasure or not path.is_file() else json.loads(path.read_text())

    def get(self, key: dict, measure) -> dict:
        k = json.dumps(key, sort_keys=True)
        if k not in self.rows:
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
    clean = set(filter(None, os.environ.get("BENCH_CLEAN", "").split(",")))
    work.mkdir(parents=True, exist_ok=True)
    cache = RowCache(work / "rows.json", os.environ.get("BENCH_REMEASURE") == "1")
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
            print(json.dumps(rows[-1]), flush=True)
        if shape in ("7b", "tiny"):
            def pack_row():
                if not (work / f"pruned-{shape}-wanda" / "config.json").is_file():
                    raise SystemExit(f"pack row of {shape}: its pruned output is gone (BENCH_REMEASURE=1 measures the prune again)")
                run = measured(["pack", str(work / f"pruned-{shape}-wanda"), "-o", str(work / f"packed-{shape}"), "--force",
                                "--max-shard-size", shard, "--json"])
                return {"wall_s": run["wall_s"], "peak_rss": run["peak_rss"], "exact_sparsity": None,
                        "packed_bytes": json.loads(run["stdout"])["file_bytes"]}

            rows.append(cache.get({"shape": shape, "command": "pack", "method": None, **settings}, pack_row))
            print(json.dumps(rows[-1]), flush=True)
        if shape in clean:
            for folder in work.glob(f"*-{shape}*"):
                shutil.rmtree(folder, ignore_errors=True)
    for r in rows:  # the plan of the current code, from the shape alone
        from seftc.plan import plan_pack, plan_prune, shape_of

        cfg = shape_of(llama_model(r["shape"]))
        r["plan"] = (plan_pack(cfg) if r["command"] == "pack" else plan_prune(cfg, r["method"], nsamples=NSAMPLES, seqlen=SEQLEN)).total
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "scale.json").write_text(json.dumps({**settings, "rows": rows}, indent=2) + "\n")
    lines = ["| shape | command | method | wall (s) | peak RSS (GiB) | plan (GiB) | plan / peak | exact sparsity | measured at |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['command']} | {r['method'] or ''} | {r['wall_s']:.1f} | {r['peak_rss'] / 2**30:.2f} | "
                     f"{r['plan'] / 2**30:.2f} | {r['plan'] / r['peak_rss']:.2f} | {'' if r['exact_sparsity'] is None else r['exact_sparsity']} | "
                     f"{r['commit']}, {r['measured']} |")
    (results_dir / "scale.md").write_text(__doc__.split("\n", 1)[1] + "\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
