"""The run report: report.json (everything, machine-readable), report.md (what a person reads),
and the PNG plots it cites. Sparsity figures are counted from the saved tensors, never copied from
a manifest."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from seftc.compress.recipe import Recipe, recipe_to_dict
from seftc.compress.stages import StageOutcome


def saved_sparsity(folder: str | Path) -> dict[str, Any]:
    """Per-layer sparsity counted from the model's safetensors, for the manifest's target layers."""
    import torch
    from safetensors import safe_open

    from seftc.models.manifest import Manifest

    folder = Path(folder)
    manifest = Manifest.load(folder)
    if manifest is None:
        return {}
    names = {rec.name + ".weight" for rec in manifest.layers}
    layers: dict[str, float] = {}
    total = nonzero = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if key in names:
                    t = st.get_tensor(key)
                    nz = int(torch.count_nonzero(t))
                    layers[key[: -len(".weight")]] = 1 - nz / t.numel()
                    total += t.numel()
                    nonzero += nz
    return {"sparsity": 1 - nonzero / max(total, 1), "layers": layers}


def _folder_bytes(folder: str | Path) -> int:
    p = Path(folder)
    if not p.exists():
        return 0
    return sum(f.stat().st_size for f in p.glob("*.safetensors"))


def write_report(run: Path, recipe: Recipe, models: dict[str, str], outcomes: list[StageOutcome]) -> dict[str, Any]:
    by = {o.name: o for o in outcomes}
    report: dict[str, Any] = {
        "recipe": recipe_to_dict(recipe),
        "models": {k: v for k, v in models.items()},
        "final_model": models.get("repaired") or models.get("pruned") or models["dense"],
        "stages": [{"name": o.name, "key": o.key, "folder": str(o.folder), "cached": o.cached, "seconds": o.result.get("seconds")}
                   for o in outcomes],
    }
    report["sparsity"] = {v: saved_sparsity(models[v]) for v in ("pruned", "repaired") if v in models}
    report["quality"] = {v: by[f"eval-{v}"].result for v in ("dense", "pruned", "repaired") if f"eval-{v}" in by}
    from seftc.models.loading import resolve_model

    sizes = {"dense_safetensors": _folder_bytes(resolve_model(models["dense"]).folder)}
    if "pruned" in models:
        sizes["pruned_safetensors"] = _folder_bytes(models["pruned"])
    if "pack" in by:
        s = by["pack"].result["summary"]
        sizes["packed_file_bytes"] = s["file_bytes"]
        sizes["packed_tensor_bytes"] = s["bytes"]
        sizes["dense_tensor_bytes"] = s["dense_bytes"]
        per_format: dict[str, dict[str, int]] = {}
        for rec in by["pack"].result["tensors"].values():
            f = per_format.setdefault(rec["format"], {"tensors": 0, "bytes": 0, "dense_bytes": 0})
            f["tensors"] += 1
            f["bytes"] += rec["bytes"]
            f["dense_bytes"] += rec["dense_bytes"]
        sizes["per_format"] = per_format
    report["size"] = sizes
    if "repair" in by:
        report["training"] = by["repair"].result.get("history", {})
        m = by["repair"].result.get("manifest", {})
        report["regrown_per_layer"] = {k: v.get("regrown", 0) for k, v in m.get("layer_stats", {}).items()}
    if "bench" in by:
        report["speed"] = by["bench"].result.get("summary")
    if "export" in by:
        report["export"] = by["export"].result.get("summary")
    report["plots"] = _plots(run, report)
    (run / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (run / "report.md").write_text(_markdown(report))
    return report


def _plots(run: Path, report: dict[str, Any]) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    plots: dict[str, str] = {}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(run / name, dpi=110)
        plt.close(fig)
        plots[name.removesuffix(".png")] = name

    sp = report.get("sparsity", {})
    if sp:
        fig, ax = plt.subplots(figsize=(10, 3.5))
        for variant, data in sp.items():
            vals = list(data["layers"].values())
            ax.plot(range(len(vals)), vals, marker=".", lw=1, label=f"{variant} (overall {data['sparsity']:.4f})")
        ax.set_xlabel("target layer (model order)")
        ax.set_ylabel("sparsity")
        ax.set_title("Per-layer sparsity, counted from the saved tensors")
        ax.legend()
        save(fig, "sparsity_per_layer.png")
    regrown = report.get("regrown_per_layer")
    if regrown:
        fig, ax = plt.subplots(figsize=(10, 3.5))
        ax.bar(range(len(regrown)), list(regrown.values()))
        ax.set_xlabel("target layer (model order)")
        ax.set_ylabel("positions regrown")
        ax.set_title("Positions regrown into the pruned region over repair (sum over topology updates)")
        save(fig, "regrown_per_layer.png")
    tr = report.get("training")
    if tr and tr.get("train_loss"):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(*zip(*tr["train_loss"]), lw=1, label="training loss (per step)")
        if tr.get("eval_loss"):
            ax.plot(*zip(*tr["eval_loss"]), marker="o", label="held-out loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title("Repair: training and held-out loss")
        ax.legend()
        save(fig, "loss_curves.png")
    q = report.get("quality", {})
    if q:
        names = list(q)
        metrics = (["ppl"] if any(q[n].get("ppl") for n in names) else []) + sorted({t for n in names for t in q[n].get("tasks", {})})
        fig, axes = plt.subplots(1, len(metrics), figsize=(3 * max(len(metrics), 1), 3.2), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            vals = [q[n]["ppl"] if metric == "ppl" else q[n]["tasks"].get(metric, {}).get("acc", 0) for n in names]
            errs = [0 if metric == "ppl" else q[n]["tasks"].get(metric, {}).get("acc_stderr", 0) for n in names]
            ax.bar(names, vals, yerr=errs, color=["#888", "#c55", "#5a5"][: len(names)])
            ax.set_title("perplexity ↓" if metric == "ppl" else f"{metric} acc ↑")
        save(fig, "quality.png")
    size = report.get("size", {})
    if size.get("per_format"):
        fig, ax = plt.subplots(figsize=(6, 3.2))
        labels = ["dense (same dtype)"] + [f"{f} ({d['tensors']})" for f, d in size["per_format"].items()]
        vals = [size["dense_tensor_bytes"] / 2**20] + [d["bytes"] / 2**20 for d in size["per_format"].values()]
        ax.bar(labels, vals)
        ax.set_ylabel("MiB")
        ax.set_title("Bytes per format after `pack` (dense = all tensors unpacked)")
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
        save(fig, "bytes.png")
    speed = report.get("speed")
    if speed and speed.get("results"):
        fig, ax = plt.subplots(figsize=(6, 3.2))
        labels = [f"{r['phase']} b{r['batch']}" for r in speed["results"]]
        ax.bar(labels, [r["speedup"] for r in speed["results"]])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("speedup (dense ms / sparse ms)")
        ax.set_title(f"Sparse vs dense, same run, {speed.get('device', '')}")
        save(fig, "speedup.png")
    return plots


def _markdown(report: dict[str, Any]) -> str:
    r = report["recipe"]
    lines = ["# seftc compress report", ""]
    lines += [f"Model: `{r['model']['path']}` → final model `{report['final_model']}`", ""]
    if r.get("prune"):
        p = r["prune"]
        lines.append(f"- prune: {p['method']} {p['pattern']}" + (f" {p['sparsity']}" if p["pattern"] == "unstructured" else "")
                     + f", calibration {p['calib']} {p['nsamples']}×{p['seqlen']} tokens, seed {p['seed']}")
    if r.get("repair"):
        p = r["repair"]
        lines.append(f"- repair: {p['method']}, {p['steps']} steps × {p['batch_size']} × {p['seqlen']} tokens of {p['data']}, seed {p['seed']}")
    lines.append("")
    q = report.get("quality", {})
    if q:
        tasks = sorted({t for v in q.values() for t in v.get("tasks", {})})
        proto = next((v.get("ppl_protocol") for v in q.values() if v.get("ppl_protocol")), None)
        lines += ["## Quality", ""]
        if proto:
            lines.append(f"Perplexity: {proto['windows']} windows × {proto['seqlen']} tokens (stride {proto['stride']}) of `{proto['source']}`, "
                         f"{proto['tokens']} tokens scored. Accuracy: zero-shot, length-normalised log-likelihood, first "
                         f"{r['eval']['limit']} items of each task's eval part (± standard error).")
            lines.append("")
        lines.append("| model | sparsity | ppl | " + " | ".join(tasks) + " |")
        lines.append("|---|---|---|" + "---|" * len(tasks))
        for v, res in q.items():
            sp = report["sparsity"].get(v, {}).get("sparsity", 0.0)
            ppl = f"{res['ppl']:.2f}" if res.get("ppl") else "—"
            accs = [f"{res['tasks'][t]['acc']:.3f} ± {res['tasks'][t]['acc_stderr']:.3f}" if t in res.get("tasks", {}) else "—" for t in tasks]
            lines.append(f"| {v} | {sp:.4f} | {ppl} | " + " | ".join(accs) + " |")
        lines.append("")
        if "quality" in report["plots"]:
            lines += ["![quality](quality.png)", ""]
    if report.get("sparsity"):
        lines += ["## Sparsity", "", "Counted from the saved tensors of each model folder, per target layer.", ""]
        for v, d in report["sparsity"].items():
            lines.append(f"- {v}: {d['sparsity']:.4f} over {len(d['layers'])} layers "
                         f"(min {min(d['layers'].values()):.4f}, max {max(d['layers'].values()):.4f})")
        lines.append("")
        if "sparsity_per_layer" in report["plots"]:
            lines += ["![sparsity per layer](sparsity_per_layer.png)", ""]
    if report.get("training"):
        tr = report["training"]
        lines += ["## Repair", ""]
        if tr.get("eval_loss"):
            lines.append(f"Held-out loss {tr['eval_loss'][0][1]:.4f} → {tr['eval_loss'][-1][1]:.4f} "
                         f"(fixed windows of `{r['repair']['eval_data']}`).")
        total = sum(report.get("regrown_per_layer", {}).values())
        lines.append(f"Positions regrown into the pruned region: {total} in all.")
        lines.append("")
        for plot in ("loss_curves", "regrown_per_layer"):
            if plot in report["plots"]:
                lines += [f"![{plot}]({plot}.png)", ""]
    size = report.get("size", {})
    if size.get("per_format"):
        lines += ["## Size on disk", "", "| what | bytes |", "|---|---|"]
        if size.get("dense_safetensors"):
            lines.append(f"| dense model safetensors | {size['dense_safetensors']:,} |")
        if size.get("pruned_safetensors"):
            lines.append(f"| pruned model, stored dense | {size['pruned_safetensors']:,} |")
        lines.append(f"| packed (`seftc pack`, auto) | {size['packed_file_bytes']:,} |")
        for f, d in size["per_format"].items():
            lines.append(f"| — {f}: {d['tensors']} tensors | {d['bytes']:,} (dense {d['dense_bytes']:,}) |")
        lines.append("")
        if "bytes" in report["plots"]:
            lines += ["![bytes](bytes.png)", ""]
    speed = report.get("speed")
    if speed and speed.get("results"):
        cfg = speed.get("config", {})
        bound = f", model byte bound (dense / sparse weight bytes per token) {speed['byte_bound']:.2f}×" if speed.get("byte_bound") else ""
        lines += ["## Speed", "", f"Dense and sparse in {speed.get('dtype', '')}, timed side by side in one run on {speed.get('device')} "
                  f"({speed.get('threads', '?')} threads, {speed.get('isa', '')} kernels): prompt {cfg.get('prompt_tokens', '?')} tokens, "
                  f"{cfg.get('new_tokens', '?')} decoded tokens, medians of {cfg.get('repeats', '?')} repeats after {cfg.get('warmup', '?')} "
                  f"warm-up{bound}. Other processes on the machine distort these times.", "",
                  "| phase | batch | dense ms | sparse ms | speedup |", "|---|---|---|---|---|"]
        for x in speed["results"]:
            lines.append(f"| {x['phase']} | {x['batch']} | {x['dense_ms']:.2f} | {x['sparse_ms']:.2f} | {x['speedup']:.2f}× |")
        lines.append("")
        if "speedup" in report["plots"]:
            lines += ["![speedup](speedup.png)", ""]
    lines += ["## Stages", "", "| stage | cached | seconds | folder |", "|---|---|---|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['name']} | {'yes' if s['cached'] else 'no'} | {s['seconds'] or 0:.1f} | `{Path(s['folder']).name}` |")
    return "\n".join(lines) + "\n"
