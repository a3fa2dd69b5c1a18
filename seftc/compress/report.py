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


def software() -> dict[str, Any]:
    """What produced the run: package versions and, when seftc runs from a git checkout, its commit
    (with `dirty` if the working tree differs from it), so a published report names the code it came from."""
    import subprocess

    import torch
    import transformers

    import seftc

    info: dict[str, Any] = {"seftc": seftc.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                            "commit": None, "dirty": None}
    root = Path(seftc.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            info["commit"] = head.stdout.strip()
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "seftc"],
                                    capture_output=True, text=True, timeout=10)
            info["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass  # no git, or not a checkout: the versions alone are recorded
    return info


def _software_line(sw: dict[str, Any] | None) -> list[str]:
    if not sw:
        return []
    code = f"commit `{sw['commit'][:12]}`" + (" with local changes to seftc/" if sw.get("dirty") else "") if sw.get("commit") \
        else "not a git checkout"
    return [f"Software: seftc {sw['seftc']} ({code}), torch {sw['torch']}, transformers {sw['transformers']}.", ""]


def write_report(run: Path, recipe: Recipe, models: dict[str, str], outcomes: list[StageOutcome],
                 wall_s: float | None = None) -> dict[str, Any]:
    by = {o.name: o for o in outcomes}
    report: dict[str, Any] = {
        "recipe": recipe_to_dict(recipe),
        "models": {k: v for k, v in models.items()},
        "final_model": models.get("repaired") or models.get("pruned") or models["dense"],
        "stages": [{"name": o.name, "key": o.key, "folder": str(o.folder), "cached": o.cached, "seconds": o.result.get("seconds"),
                    "this_run_s": o.seconds} for o in outcomes],
        "wall_s": wall_s,
        "software": software(),
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
        report["repair_warnings"] = m.get("config", {}).get("warnings", [])
    if "bench" in by:
        report["speed"] = by["bench"].result.get("summary")
        if report["speed"]:
            _flag_distorted(report["speed"])
    if "export" in by:
        report["export"] = by["export"].result.get("summary")
    if "serve" in by:
        report["serve"] = {"model": by["serve"].result.get("model"), **(by["serve"].result.get("summary") or {})}
    report["plot_captions"] = _captions(report)
    report["plots"] = _plots(run, report)
    (run / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (run / "report.md").write_text(_markdown(report))
    return report


def _flag_distorted(speed: dict[str, Any]) -> None:
    """Mark each timed row whose figure cannot be taken at face value (see runtime.bench.distortion)."""
    from seftc.runtime.bench import distortion

    for row in speed.get("results", []):
        row["distorted"] = distortion(row, speed.get("byte_bound"))
    for key in ("layers", "layers_in_model"):
        for row in speed.get(key, []):
            row["distorted"] = distortion(row, row.get("byte_bound"))


def _updates(report: dict[str, Any]) -> int:
    return len((report.get("training") or {}).get("regrown", []))


def _captions(report: dict[str, Any]) -> dict[str, str]:
    """The protocol of each plot, printed on the figure and under it in report.md."""
    r = report["recipe"]
    out: dict[str, str] = {}
    if report.get("sparsity"):
        out["sparsity_per_layer"] = "Counted from each saved model's safetensors, per target layer, in model order."
    rep = r.get("repair") or {}
    if report.get("training"):
        lr = rep.get("lr") if rep.get("lr") is not None else _default_lr(rep.get("method"))
        out["loss_curves"] = (f"{rep['method']}: {rep['steps']} steps × {rep['batch_size']} × {rep['seqlen']} tokens of {rep['data']}, "
                              f"peak lr {lr:g} after {rep.get('warmup', 0)} warm-up steps, seed {rep['seed']}; held-out loss on "
                              f"{rep.get('eval_windows', '?')} fixed windows of {rep['eval_data']} every {rep.get('eval_every')} steps.")
        if report.get("regrown_per_layer") is not None:
            out["regrown_per_layer"] = (f"Positions grown back into the pruned region, summed over {_updates(report)} topology "
                                        f"update(s) (one every {rep.get('update_interval')} steps, ρ {rep.get('density')}).")
    q = report.get("quality", {})
    if q:
        proto = next((v.get("ppl_protocol") for v in q.values() if v.get("ppl_protocol")), None)
        ppl = (f"Perplexity: {proto['windows']} windows × {proto['seqlen']} tokens of {proto['source']}. " if proto else "")
        limit = (r.get("eval") or {}).get("limit")
        out["quality"] = ppl + (f"Accuracy: zero-shot, first {limit} eval items per task; " if limit else "Accuracy: zero-shot, all eval items; ") + \
            "error bars ± 1 standard error."
    size = report.get("size", {})
    if size.get("per_format"):
        fmt = (r.get("pack") or {}).get("format", "auto")
        out["bytes"] = (f"Weight bytes on disk per model; the packed model (seftc pack --format {fmt}) split by storage format, "
                        "plus the file's index and headers.")
    speed = report.get("speed")
    if speed and speed.get("results"):
        out["speedup"] = _speed_caption(speed)
    return out


def _speed_caption(speed: dict[str, Any]) -> str:
    cfg = speed.get("config", {})
    return (f"{speed.get('dtype')}, {speed.get('device')}, {speed.get('threads')} threads, {speed.get('isa')} kernels; "
            f"prompt {cfg.get('prompt_tokens', '?')} tokens, {cfg.get('new_tokens', '?')} decoded; medians of "
            f"{cfg.get('repeats', '?')} repeats after {cfg.get('warmup', '?')} warm-up; whiskers: the range the repeats "
            f"allow; dashed: byte bound {speed.get('byte_bound', float('nan')):.2f}×; hatched: distorted.")


def _default_lr(method: str | None) -> float:
    from seftc.repair.config import DEFAULT_LR

    return DEFAULT_LR.get(method or "seft", float("nan"))


def _plots(run: Path, report: dict[str, Any]) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    plots: dict[str, str] = {}
    captions = report.get("plot_captions", {})

    def save(fig, name: str) -> None:
        key = name.removesuffix(".png")
        _save_figure(plt, fig, run / name, captions.get(key))
        plots[key] = name

    sp = report.get("sparsity", {})
    if sp:
        fig, ax = plt.subplots(figsize=(10, 3.8))
        for variant, data in sp.items():
            vals = list(data["layers"].values())
            ax.plot(range(len(vals)), vals, marker=".", lw=1, label=f"{variant} (overall {data['sparsity']:.4f})")
        ax.set_xlabel("target layer (model order)")
        ax.set_ylabel("sparsity")
        ax.set_title("Per-layer sparsity, counted from the saved tensors")
        ax.legend()
        save(fig, "sparsity_per_layer.png")
    regrown = report.get("regrown_per_layer")
    if regrown and _updates(report) and any(regrown.values()):  # else report.md says why there is no plot
        fig, ax = plt.subplots(figsize=(10, 3.8))
        ax.bar(range(len(regrown)), list(regrown.values()))
        ax.set_ylim(bottom=0)
        ax.set_xlabel("target layer (model order)")
        ax.set_ylabel("positions regrown")
        ax.set_title("Positions regrown into the pruned region over repair (sum over topology updates)")
        save(fig, "regrown_per_layer.png")
    tr = report.get("training")
    if tr and tr.get("train_loss"):
        fig, ax = plt.subplots(figsize=(7, 3.8))
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
        fig, axes = plt.subplots(1, len(metrics), figsize=(3 * max(len(metrics), 2), 3.6), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            vals = [q[n]["ppl"] if metric == "ppl" else q[n]["tasks"].get(metric, {}).get("acc", 0) for n in names]
            errs = [0 if metric == "ppl" else q[n]["tasks"].get(metric, {}).get("acc_stderr", 0) for n in names]
            ax.bar(names, vals, yerr=errs, color=["#888", "#c55", "#5a5"][: len(names)])
            ax.set_title("perplexity ↓" if metric == "ppl" else f"{metric} acc ↑")
        save(fig, "quality.png")
    size = report.get("size", {})
    if size.get("per_format"):
        _bytes_plot(plt, save, size)
    speed = report.get("speed")
    if speed and speed.get("results"):
        _speedup_plot(plt, save, speed)
    return plots


def _save_figure(plt, fig, path: Path, caption: str | None) -> None:
    """Save with the plot's protocol printed along the bottom of the figure."""
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    if caption:
        fig.text(0.01, 0.01, caption, fontsize=7, color="#444", wrap=True, va="bottom")
    from seftc.models.saving import atomic_file

    with atomic_file(path) as tmp:  # the suffix is kept: matplotlib picks the format from it
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_speedup_plot(speed: dict[str, Any], path: str | Path) -> None:
    """`seftc bench --plot`: the figure of the report's speedup.png for one bench result (to_json())."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = json.loads(json.dumps(speed))
    _flag_distorted(speed)
    _speedup_plot(plt, lambda fig, name: _save_figure(plt, fig, Path(path), _speed_caption(speed)), speed)


_FORMAT_COLORS = {"dense": "#999999", "rice": "#4c72b0", "bitmask": "#dd8452", "csr": "#55a868", "2:4": "#c44e52",
                  "index and headers": "#dddddd"}


def _bytes_plot(plt, save, size: dict[str, Any]) -> None:
    """One horizontal stacked bar per model: dense, pruned (stored dense), packed by format."""
    bars: list[tuple[str, list[tuple[str, int]]]] = [("dense model", [("dense", size["dense_safetensors"])])]
    if size.get("pruned_safetensors"):
        bars.append(("pruned, stored dense", [("dense", size["pruned_safetensors"])]))
    parts = [(f, d["bytes"]) for f, d in size["per_format"].items()]
    overhead = size["packed_file_bytes"] - sum(b for _, b in parts)
    if overhead > 0:
        parts.append(("index and headers", overhead))
    bars.append(("packed", parts))
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.7 * len(bars)))
    seen: set[str] = set()
    for y, (label, segments) in enumerate(reversed(bars)):
        left = 0.0
        for fmt, nbytes in segments:
            mib = nbytes / 2**20
            ax.barh(y, mib, left=left, color=_FORMAT_COLORS.get(fmt, None), edgecolor="white",
                    label=None if fmt in seen else fmt)
            seen.add(fmt)
            left += mib
        ax.text(left, y, f" {left:.1f} MiB", va="center", fontsize=8)
    ax.set_yticks(range(len(bars)), [b[0] for b in reversed(bars)])
    ax.set_xlabel("MiB on disk")
    ax.set_xlim(right=ax.get_xlim()[1] * 1.15)
    ax.set_title("Bytes on disk per model (packed: by storage format)")
    ax.legend(fontsize=7, loc="lower right")
    save(fig, "bytes.png")


def _speedup_plot(plt, save, speed: dict[str, Any]) -> None:
    from seftc.runtime.bench import speedup_range

    rows = speed["results"]
    labels = [f"{r['phase']}\nbatch {r['batch']}" for r in rows]
    values = [r["speedup"] for r in rows]
    ranges = [speedup_range(r) for r in rows]
    low = [max(v - lo, 0) for v, (lo, _) in zip(values, ranges)]
    high = [max(hi - v, 0) for v, (_, hi) in zip(values, ranges)]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) + 2), 3.8))
    bars = ax.bar(labels, values, yerr=[low, high], capsize=4,
                  color=["#4c72b0" if r["phase"] == "prefill" else "#dd8452" for r in rows])
    for bar, r in zip(bars, rows):
        if r.get("distorted"):
            bar.set_hatch("//")
            bar.set_edgecolor("#c00")
    ax.axhline(1.0, color="k", lw=0.8)
    if speed.get("byte_bound"):
        ax.axhline(speed["byte_bound"], color="green", ls="--", lw=1, label=f"byte bound {speed['byte_bound']:.2f}×")
        ax.legend(fontsize=8)
    ax.set_ylabel("speedup (dense ms / sparse ms)")
    ax.set_title(f"Sparse vs dense, same run: {speed.get('dtype')}, {speed.get('device')}, {speed.get('threads')} threads")
    save(fig, "speedup.png")


def _image(report: dict[str, Any], name: str) -> list[str]:
    if name not in report["plots"]:
        return []
    caption = report.get("plot_captions", {}).get(name)
    return [f"![{name}]({report['plots'][name]})", ""] + ([f"*{caption}*", ""] if caption else [])


def _seconds(s: float | None) -> str:
    s = s or 0.0
    return f"{s:.1f} s" if s < 120 else f"{s:.0f} s ({s / 60:.1f} min)"


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
    lines += _wall_time(report)
    lines += _software_line(report.get("software"))
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
        lines += _image(report, "quality")
    if report.get("sparsity"):
        lines += ["## Sparsity", "", "Counted from the saved tensors of each model folder, per target layer.", ""]
        for v, d in report["sparsity"].items():
            lines.append(f"- {v}: {d['sparsity']:.4f} over {len(d['layers'])} layers "
                         f"(min {min(d['layers'].values()):.4f}, max {max(d['layers'].values()):.4f})")
        lines.append("")
        lines += _image(report, "sparsity_per_layer")
    if report.get("training"):
        lines += _repair_section(report)
    size = report.get("size", {})
    if size.get("per_format"):
        lines += ["## Size on disk", "", "| what | bytes |", "|---|---|"]
        if size.get("dense_safetensors"):
            lines.append(f"| dense model safetensors | {size['dense_safetensors']:,} |")
        if size.get("pruned_safetensors"):
            lines.append(f"| pruned model, stored dense | {size['pruned_safetensors']:,} |")
        lines.append(f"| packed (`seftc pack`, {(r.get('pack') or {}).get('format', 'auto')}) | {size['packed_file_bytes']:,} |")
        for f, d in size["per_format"].items():
            lines.append(f"| — {f}: {d['tensors']} tensors | {d['bytes']:,} (dense {d['dense_bytes']:,}) |")
        lines.append("")
        lines += _image(report, "bytes")
    if report.get("export"):
        lines += _export_section(report)
    speed = report.get("speed")
    if speed and speed.get("results"):
        lines += _speed_section(report, speed)
    lines += _serve_section(report)
    lines += ["## Stages", "", "| stage | this run | seconds | folder |", "|---|---|---|---|"]
    for s in report["stages"]:
        if s["cached"]:
            how, secs = "from cache", f"original run took {_seconds(s['seconds'])}"
        else:
            how, secs = "ran", _seconds(s["seconds"])
        lines.append(f"| {s['name']} | {how} | {secs} | `{Path(s['folder']).name}` |")
    return "\n".join(lines) + "\n"


def _wall_time(report: dict[str, Any]) -> list[str]:
    stages = report["stages"]
    ran = [s for s in stages if not s["cached"]]
    cached = [s for s in stages if s["cached"]]
    text = f"Wall time of this run: {_seconds(report['wall_s'])}" if report.get("wall_s") is not None else "Wall time: not recorded"
    text += f"; {len(ran)} stage(s) ran ({_seconds(sum(s['seconds'] or 0 for s in ran))})"
    if cached:
        text += (f", {len(cached)} came from cache (their original runs took {_seconds(sum(s['seconds'] or 0 for s in cached))}; "
                 f"all stages together {_seconds(sum(s['seconds'] or 0 for s in stages))})")
    return [text + ".", ""]


def _repair_section(report: dict[str, Any]) -> list[str]:
    tr, rep = report["training"], report["recipe"].get("repair") or {}
    lines = ["## Repair", ""]
    for warning in report.get("repair_warnings", []):
        lines += [f"**Warning**: {warning}.", ""]
    if tr.get("eval_loss"):
        lines.append(f"Held-out loss {tr['eval_loss'][0][1]:.4f} → {tr['eval_loss'][-1][1]:.4f} "
                     f"(fixed windows of `{rep.get('eval_data')}`).")
    updates = _updates(report)
    total = sum(report.get("regrown_per_layer", {}).values())
    if rep.get("method", "").startswith("seft"):
        if updates == 0:
            lines.append(f"**No topology update happened**: {rep.get('steps')} steps with an update every {rep.get('update_interval')} "
                         "steps, so the sparse delta kept its initial positions and nothing was regrown (no regrowth plot). "
                         "Raise `repair.steps` above `repair.update_interval` to see SEFT's topology at work.")
        else:
            lines.append(f"Topology updates: {updates} (every {rep.get('update_interval')} steps); positions regrown into the "
                         f"pruned region: {total} in all." + ("" if total else " No update found a pruned position worth its "
                                                               "eviction, so there is no regrowth plot."))
    lines.append("")
    for plot in ("loss_curves", "regrown_per_layer"):
        lines += _image(report, plot)
    return lines


def _export_section(report: dict[str, Any]) -> list[str]:
    e, cfg = report["export"], report["recipe"].get("export") or {}
    lines = ["## Export (ONNX)", ""]
    lines.append(f"`{Path(e['model_file']).name}`: {e['bytes']:,} bytes on disk (the same graph with every initializer dense: "
                 f"{e['dense_bytes']:,}); opset {e['opset']}, {'with' if e.get('kv_cache') else 'without'} KV cache.")
    if e.get("max_abs_error") is not None:
        lines.append(f"onnxruntime vs PyTorch on {len(e.get('checks') or []) or 'the fixed'} prompts: max abs logit error "
                     f"{e['max_abs_error']:.3g} (largest logit {e['logit_scale']:.3g}, relative {e['relative_error']:.3g}, "
                     f"tolerance {e['tolerance']:.3g}).")
    else:
        lines.append("onnxruntime vs PyTorch: not checked.")
    if e.get("sparse_tensors"):
        lines.append(f"Sparse initializers: {e['sparse_tensors']} weights stored as ONNX sparse initializers "
                     f"({e.get('sparse_index_dtype')} indices), where that is smaller than dense.")
    elif cfg.get("sparse_initializers") is False:
        lines.append("Sparse initializers: not used (turned off: `export.sparse_initializers: false`).")
    else:
        index = 8 if cfg.get("strict_onnx") else 4
        need = index / (4 + index)
        sp = (report.get("sparsity") or {})
        final = sp.get("repaired") or sp.get("pruned") or {}
        at = f"; this model's target weights are at {final['sparsity']:.1%} sparsity" if final else ""
        lines.append(f"Sparse initializers: none used. A weight is stored sparse only when its values plus {index * 8}-bit indices "
                     f"take fewer bytes than dense: {4 + index} bytes per non-zero against 4 per float32 weight, so only above "
                     f"{need:.0%} sparsity{at}.")
    lines.append("")
    return lines


def _speed_section(report: dict[str, Any], speed: dict[str, Any]) -> list[str]:
    cfg = speed.get("config", {})
    bound = f", model byte bound (dense / sparse weight bytes per token) {speed['byte_bound']:.2f}×" if speed.get("byte_bound") else ""
    distorted = [x for x in speed["results"] if x.get("distorted")]
    lines = ["## Speed", "", f"Dense and sparse in {speed.get('dtype', '')}, timed side by side in one run on {speed.get('device')} "
             f"({speed.get('threads', '?')} threads, {speed.get('isa', '')} kernels): prompt {cfg.get('prompt_tokens', '?')} tokens, "
             f"{cfg.get('new_tokens', '?')} decoded tokens, medians of {cfg.get('repeats', '?')} repeats after {cfg.get('warmup', '?')} "
             f"warm-up{bound}.", ""]
    if distorted:
        from seftc.runtime.bench import DISTORTION_NOTE

        lines += [f"**{len(distorted)} of {len(speed['results'])} rows are marked distorted**: {DISTORTION_NOTE}", ""]
    lines += ["| phase | batch | dense ms (min–max) | sparse ms (min–max) | speedup | note |", "|---|---|---|---|---|---|"]
    for x in speed["results"]:
        (dl, dh), (sl, sh) = x["dense_spread_ms"], x["sparse_spread_ms"]
        lines.append(f"| {x['phase']} | {x['batch']} | {x['dense_ms']:.2f} ({dl:.2f}–{dh:.2f}) | {x['sparse_ms']:.2f} ({sl:.2f}–{sh:.2f}) "
                     f"| {x['speedup']:.2f}× | {'distorted: ' + x['distorted'] if x.get('distorted') else ''} |")
    lines.append("")
    layers = [x for x in speed.get("layers", []) if x.get("distorted")]
    if layers:
        lines += [f"Per-layer kernel timings: {len(layers)} of {len(speed['layers'])} distorted "
                  f"(e.g. {layers[0]['name']}: {layers[0]['distorted']}).", ""]
    lines += _image(report, "speedup")
    return lines


def _serve_section(report: dict[str, Any]) -> list[str]:
    srv = report.get("serve")
    if not srv:
        return []
    lat, ttft = srv.get("latency_ms") or {}, srv.get("ttft_ms") or {}
    nan = float("nan")
    lines = ["## Serving smoke test", "",
             f"The {srv.get('model')} model behind `seftc serve` ({srv.get('runtime')}, {srv.get('sparse_layers')} sparse "
             f"layers) on loopback: {srv['requests']} streamed completions, {srv['concurrency']} at a time, "
             f"{srv['max_tokens']} new tokens each, temperature 0.", "",
             "| requests | errors | latency p50 ms | latency max ms | TTFT p50 ms | TTFT max ms | output tok/s |",
             "|---|---|---|---|---|---|---|",
             f"| {srv['requests']} | {srv['errors']} | {lat.get('p50', nan):.1f} | {lat.get('max', nan):.1f} | "
             f"{ttft.get('p50', nan):.1f} | {ttft.get('max', nan):.1f} | {srv.get('output_tokens_per_s') or 0:.1f} |", ""]
    if srv.get("first_error"):
        lines += [f"First error: {srv['first_error']}", ""]
    return lines
