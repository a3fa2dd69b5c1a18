"""`seftc bench MODEL`: dense vs sparse runtime, same model, same device, one run."""
from __future__ import annotations

from typing import Any

import click

from seftc.cli.common import note_checksums, print_json, stderr, stdout, user_errors
from seftc.cli.options import from_options, options_from
from seftc.compress.recipe import BenchStage, ModelStage
from seftc.errors import SeftcError


@click.command("bench")
@click.argument("model")
@options_from(BenchStage)
@click.option("--plot", type=click.Path(dir_okay=False), default=None, show_default="no plot", help="Write a PNG of the speedups (the report's speedup.png).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@options_from(ModelStage, only=("trust_remote_code",))
@user_errors
def bench(model: str, plot: str | None, as_json: bool, trust_remote_code: bool, **options: Any) -> None:
    """Time MODEL (a pruned or packed folder) dense and on the sparse runtime: per-layer kernels,
    prefill of N tokens, decode per token, memory; speedup = dense / sparse, same run."""
    import torch

    from seftc.runtime.bench import BenchConfig, run_bench
    from seftc.runtime.convert import load_runtime_pair

    opts = from_options(BenchStage, "bench", options)
    if plot:
        check_plot_path(plot)
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SeftcError("--device cuda: no CUDA device is visible; use --device cpu")
    pair = load_runtime_pair(model, opts.dtype, trust_remote_code=trust_remote_code)
    if pair.checksums:
        note_checksums(pair.checksums)
    cfg = BenchConfig(**opts.bench_kwargs())
    with stderr.status("benchmarking dense vs sparse…") if not as_json else _null():
        result = run_bench(pair.dense, pair.sparse, cfg, opts.device)
    if plot:
        from seftc.compress.report import write_speedup_plot

        write_speedup_plot(result.to_json(), plot)
    if as_json:
        out = result.to_json()
        out["model"] = model
        out["source"] = pair.source
        out["checksums"] = pair.checksums
        out["sparse_layers"] = len(pair.conversion.converted)
        print_json(out)
        return
    render(result, model)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def render(result, model: str) -> None:
    from rich.table import Table

    from seftc.runtime.bench import DISTORTION_NOTE, distortion

    head = f"{model} · {result.device} · {result.dtype} · {result.threads} threads · kernels: {result.backend} ({result.isa})"
    flagged = 0
    if result.layers:
        t = Table(title=f"per-layer kernel time (ms) — {head}")
        for col in ("layer", "shape", "layout", "sparsity", "batch", "dense", "sparse", "speedup", "byte bound", "note"):
            t.add_column(col, justify="left" if col in ("layer", "layout", "note") else "right")
        for r in result.layers:
            bad = distortion(r.to_json(), r.byte_bound)
            flagged += bad is not None
            t.add_row(r.name, "×".join(map(str, r.shape)), r.kind, f"{r.sparsity:.0%}", str(r.batch),
                      f"{r.dense.median_ms:.4f}", f"{r.sparse.median_ms:.4f}", _ratio(r.speedup), f"{r.byte_bound:.2f}×",
                      "[red]distorted[/red]" if bad else "")
        stdout.print(t)
    if result.layers_in_model:
        t = Table(title="per-layer time inside batch-1 decode (ms, median over layers of each kind)")
        for col in ("module", "layers", "dense", "sparse", "speedup", "byte bound"):
            t.add_column(col, justify="left" if col == "module" else "right")
        for kind, rows in summarize_layers(result.layers_in_model).items():
            t.add_row(kind, str(rows["n"]), f"{rows['dense_ms']:.4f}", f"{rows['sparse_ms']:.4f}", _ratio(rows["speedup"]), f"{rows['byte_bound']:.2f}×")
        stdout.print(t)
    t = Table(title=f"end to end — {head}")
    for col in ("phase", "batch", "dense ms (min–max)", "sparse ms (min–max)", "speedup", "dense tok/s", "sparse tok/s", "note"):
        t.add_column(col, justify="left" if col in ("phase", "note") else "right")
    for r in result.results:
        bad = distortion(r.to_json(), result.byte_bound)
        flagged += bad is not None
        label = f"prefill {r.tokens} tok" if r.phase == "prefill" else "decode /token"
        t.add_row(label, str(r.batch), f"{r.dense.median_ms:.2f} ({r.dense.min_ms:.2f}–{r.dense.max_ms:.2f})",
                  f"{r.sparse.median_ms:.2f} ({r.sparse.min_ms:.2f}–{r.sparse.max_ms:.2f})", _ratio(r.speedup),
                  f"{r.tokens_per_s('dense'):.1f}", f"{r.tokens_per_s('sparse'):.1f}", "[red]distorted[/red]" if bad else "")
    stdout.print(t)
    if flagged:
        stdout.print(f"[red]{flagged} rows distorted[/red]: {DISTORTION_NOTE}")
    m = result.memory
    stdout.print(f"weights in memory: dense {m['dense_model_bytes'] / 2**20:.1f} MiB, sparse {m['sparse_model_bytes'] / 2**20:.1f} MiB · "
                 f"bytes read per decoded token: dense {m['dense_bytes_per_token'] / 2**20:.1f} MiB, sparse "
                 f"{m['sparse_bytes_per_token'] / 2**20:.1f} MiB → byte bound {result.byte_bound:.2f}×")


def summarize_layers(layers) -> dict[str, dict[str, float]]:
    """Per module kind (q_proj, ..., down_proj): medians of dense and sparse time, their ratio."""
    import statistics

    groups: dict[str, list] = {}
    for r in layers:
        groups.setdefault(r.name.rsplit(".", 1)[-1], []).append(r)
    out = {}
    for kind, rows in groups.items():
        d = statistics.median(r.dense.median_ms for r in rows)
        s = statistics.median(r.sparse.median_ms for r in rows)
        out[kind] = {"n": len(rows), "dense_ms": d, "sparse_ms": s, "speedup": d / s if s > 0 else float("nan"),
                     "byte_bound": statistics.median(r.byte_bound for r in rows)}
    return out


def _ratio(x: float) -> str:
    color = "green" if x >= 1.0 else "red"
    return f"[{color}]{x:.2f}×[/{color}]"


def check_plot_path(path: str) -> None:
    """Before any timing: the --plot file can be written, in a format matplotlib knows."""
    from matplotlib.figure import Figure

    from seftc.models.saving import check_output_file

    target = check_output_file(path, "--plot")
    suffix = target.suffix.lower().lstrip(".")
    supported = Figure().canvas.get_supported_filetypes()
    if suffix and suffix not in supported:
        raise SeftcError(f"--plot {path}: matplotlib cannot write .{suffix} files; use one of {', '.join('.' + k for k in sorted(supported))}")
