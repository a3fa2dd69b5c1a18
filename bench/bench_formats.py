"""Bytes on disk and throughput of the sparse formats on SmolLM2-135M (`make bench-formats`).

Protocol
- The model (default: the embedded SmolLM2-135M-Instruct) is cast to float16. Its transformer
  Linear weights (q/k/v/o/gate/up/down of every layer) are pruned in memory by magnitude:
  per row (keep the largest |w| of each row) at 50 %, 70 %, 90 %, and per aligned group of four
  (keep two) for 2:4. Pruned entries are +0.0. Embeddings and norms stay dense.
- Scope "layer": the seven Linear weights of layer 0, packed into one file per format, each
  format applied to every weight. Scope "model": the whole checkpoint packed by
  `seftc.formats.packing.pack_folder` (what `seftc pack --format F` runs: a named format where
  it is smaller than dense, `auto` the smallest per tensor), from a folder in a temporary
  directory.
- Bytes are file sizes on disk (safetensors header included). "dense" is the fp16 payload.
  "bound" is the information bound: for each pruned weight, 16 bits per non-zero plus
  numel × H(density) bits (binary entropy of its mask); tensors that stay dense count at their
  dense size. "—": the format cannot hold the weights (2:4 layouts on unstructured sparsity),
  or `seftc pack` refuses it because it is larger than dense for all of them.
- Pack MB/s: dense fp16 MB / wall time of `pack_folder` (read, analyse, encode, checksum,
  write). Load MB/s: dense fp16 MB / wall time to read, verify and decode every tensor of the
  packed folder. Single process; the machine's CPU count is printed with the results.

    python bench/bench_formats.py [--model PATH] [--out results/formats.md] [--sparsities 0.5,2:4,0.7,0.9]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

FORMATS = ["2:4", "bitmask", "csr", "rice", "ct-sparse-bitmask", "ct-sparse-24-bitmask", "auto"]
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def prune(w: torch.Tensor, sparsity: str) -> torch.Tensor:
    """Magnitude pruning per row (unstructured) or per aligned group of four (2:4); zeros are +0.0."""
    mag = w.abs().float()
    if sparsity == "2:4":
        groups = mag.view(w.shape[0], -1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=-1).indices, True).view_as(w)
    else:
        k = round((1 - float(sparsity)) * w.shape[1])
        keep = torch.zeros_like(mag, dtype=torch.bool).scatter_(1, mag.topk(k, dim=1).indices, True)
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype))


def entropy_bound_bits(t: torch.Tensor) -> float:
    n, nnz = t.numel(), int(torch.count_nonzero(t))
    d = nnz / n
    h = 0.0 if d in (0.0, 1.0) else -(d * math.log2(d) + (1 - d) * math.log2(1 - d))
    return nnz * t.element_size() * 8 + n * h


def is_target_name(name: str) -> bool:
    return name.endswith(".weight") and any(f".{p}." in name for p in LINEAR)


def is_target(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and is_target_name(name)


def load_fp16(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                state[k] = t.half() if t.is_floating_point() else t
    return state


def pack_layer(tensors: dict[str, torch.Tensor], fmt: str, path: Path) -> int | None:
    from seftc.formats.io import PackedWriter
    from seftc.formats.packing import pack_tensor

    with PackedWriter(path) as w:
        for name, t in tensors.items():
            packed, _ = pack_tensor(name, t, fmt, only_if_smaller=False)
            if fmt != "auto" and packed.format != fmt:
                w.abort()
                return None
            w.add(name, packed)
    size = path.stat().st_size
    path.unlink()
    return size


def bench_model(src: Path, fmt: str, work: Path) -> tuple[int, float, float, int] | None:
    """(bytes on disk, pack seconds, load seconds, pruned weights left dense) as `seftc pack --format fmt`."""
    from seftc.errors import SeftcError
    from seftc.formats.packing import iter_packed, pack_folder

    out = work / f"packed-{fmt.replace(':', '')}"
    start = time.perf_counter()
    try:
        result = pack_folder(src, out, fmt)
    except SeftcError:
        return None  # the format holds none of the tensors (2:4 layouts on unstructured sparsity)
    pack_s = time.perf_counter() - start
    left_dense = sum(r.format == "dense" for n, r in result.tensors.items() if is_target_name(n))
    size = sum((out / f).stat().st_size for f in result.files)
    start = time.perf_counter()
    for reader, name in iter_packed(out):
        reader.read_dense(name)
    load_s = time.perf_counter() - start
    shutil.rmtree(out)
    return size, pack_s, load_s, left_dense


def fmt_bytes(n: float | None, star: bool = False) -> str:
    return "—" if n is None else f"{n / 1e6:.3f}" + ("*" if star else "")


def main() -> None:
    ap = argparse.ArgumentParser(description="Sparse format sizes and throughput on SmolLM2-135M.")
    ap.add_argument("--model", default="default", help="model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--out", type=Path, default=Path("results/formats.md"))
    ap.add_argument("--sparsities", default="0.5,2:4,0.7,0.9")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw numbers as JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)  # numpy does the work; torch's thread pool only adds overhead here

    from seftc.models.loading import resolve_model

    folder = resolve_model(args.model).folder
    config = json.loads((folder / "config.json").read_text())
    base = load_fp16(folder)
    targets = [n for n, t in base.items() if is_target(n, t)]
    layer0 = [n for n in targets if ".layers.0." in n]
    dense_total = sum(t.numel() * t.element_size() for t in base.values())
    print(f"{folder.name}: {len(base)} tensors, {len(targets)} pruned Linear weights, {dense_total / 1e6:.1f} MB fp16", file=sys.stderr)

    rows = {"layer": [], "model": []}
    work = Path(tempfile.mkdtemp(prefix="bench-formats-"))
    try:
        for sp in args.sparsities.split(","):
            pruned = {n: (prune(t, sp) if n in targets else t) for n, t in base.items()}
            label = "2:4" if sp == "2:4" else f"{float(sp):.0%}"
            # one layer
            layer = {n: pruned[n] for n in layer0}
            dense = sum(t.numel() * 2 for t in layer.values())
            bound = sum(entropy_bound_bits(t) for t in layer.values()) / 8
            sizes = {f: pack_layer(layer, f, work / "layer.safetensors") for f in FORMATS}
            rows["layer"].append({"sparsity": label, "dense": dense, "bound": bound, "sizes": sizes})
            print(f"layer {label}: " + ", ".join(f"{f} {fmt_bytes(s)}" for f, s in sizes.items()), file=sys.stderr)
            # whole model, through pack_folder
            src = work / "src"
            src.mkdir()
            from safetensors.torch import save_file

            save_file(pruned, str(src / "model.safetensors"), metadata={"format": "pt"})
            (src / "config.json").write_text(json.dumps({**config, "torch_dtype": "float16"}))
            sparse_bound = sum(entropy_bound_bits(pruned[n]) for n in targets) / 8
            other = sum(t.numel() * t.element_size() for n, t in pruned.items() if n not in targets)
            results = {}
            for f in FORMATS:
                results[f] = bench_model(src, f, work)
                if results[f]:
                    size, ps, ls, _ = results[f]
                    print(f"model {label} {f}: {size / 1e6:.2f} MB, pack {dense_total / 1e6 / ps:.0f} MB/s, load {dense_total / 1e6 / ls:.0f} MB/s", file=sys.stderr)
            rows["model"].append({"sparsity": label, "dense": dense_total, "bound": sparse_bound + other, "sparse_bound": sparse_bound,
                                  "other": other, "results": results})
            shutil.rmtree(src)
            del pruned
    finally:
        shutil.rmtree(work, ignore_errors=True)

    text = render(rows, folder.name)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    print(f"wrote {args.out}", file=sys.stderr)


def render(rows: dict, model: str) -> str:
    protocol = __doc__.split("Protocol\n", 1)[1].split("\n\n", 1)[0]
    out = [f"# Sparse formats on {model} (fp16)", "", "Protocol (`make bench-formats`, `bench/bench_formats.py`):", "", protocol, "",
           f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}, torch {torch.__version__}, "
           f"numpy {__import__('numpy').__version__}.", "",
           "## One layer (the 7 Linear weights of layer 0): MB on disk", "",
           "| sparsity | dense fp16 | bound | " + " | ".join(FORMATS) + " | auto / bound |",
           "|" + " --- |" * (len(FORMATS) + 4)]
    for r in rows["layer"]:
        auto = r["sizes"]["auto"]
        out.append(f"| {r['sparsity']} | {fmt_bytes(r['dense'])} | {fmt_bytes(r['bound'])} | "
                   + " | ".join(fmt_bytes(r["sizes"][f]) for f in FORMATS) + f" | {auto / r['bound']:.3f} |")
    out += ["", "Each format is applied to every pruned weight, even where it is larger than dense (csr at 50 %).",
            "", "## Whole model: MB on disk as `seftc pack --format ...` writes it (embeddings and norms stay dense)", "",
            "| sparsity | dense fp16 | bound | " + " | ".join(FORMATS) + " | auto / bound | auto / bound, pruned weights only |",
            "|" + " --- |" * (len(FORMATS) + 5)]
    for r in rows["model"]:
        res = r["results"]
        auto = res["auto"][0]
        out.append(f"| {r['sparsity']} | {fmt_bytes(r['dense'])} | {fmt_bytes(r['bound'])} | "
                   + " | ".join(fmt_bytes(res[f][0], res[f][3] > 0) if res[f] else "—" for f in FORMATS)
                   + f" | {auto / r['bound']:.3f} | {(auto - r['other']) / r['sparse_bound']:.3f} |")
    out += ["", "—: `seftc pack` refuses the format: it holds none of the pruned weights more compactly than dense "
            "(2:4 layouts on unstructured sparsity; csr at 50 %, where 16-bit column indices cost more than the values saved)."]
    if any(res[3] for r in rows["model"] for res in r["results"].values() if res):
        out += ["\\* some pruned weights stay dense: this format is larger than dense for them."]
    out += ["", "## Whole model: throughput (MB of dense fp16 per second)", "",
            "| sparsity | " + " | ".join(f"{f} pack / load" for f in FORMATS) + " |", "|" + " --- |" * (len(FORMATS) + 1)]
    for r in rows["model"]:
        res, mb = r["results"], r["dense"] / 1e6
        out.append(f"| {r['sparsity']} | " + " | ".join("—" if not res[f] else f"{mb / res[f][1]:.0f} / {mb / res[f][2]:.0f}" for f in FORMATS) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
