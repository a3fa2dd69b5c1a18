"""`seftc compress [MODEL] [--recipe FILE] [-o RUN_DIR]`."""
from __future__ import annotations

import click

from seftc.cli.common import print_json, progress_bars, stderr, stdout, user_errors
from seftc.errors import SeftcError


@click.command("compress")
@click.argument("model", required=False)
@click.option("--recipe", type=click.Path(), default=None, show_default="the built-in demo recipe, seftc/compress/default.yaml",
              help="YAML recipe: stages model, prune, repair, pack, export, bench, eval, each keyed by its command's long options.")
@click.option("-o", "--output", "run_dir", type=click.Path(), default="runs/compress", show_default=True, help="Run folder.")
@click.option("--set", "overrides", multiple=True, metavar="STAGE.KEY=VALUE", show_default="none",
              help="Override a recipe key (repeatable; the value is read as YAML, e.g. --set prune.sparsity=0.7, --set bench.batch=1, --set export=false).")
@click.option("--json", "as_json", is_flag=True, help="Print report.json on stdout.")
@user_errors
def compress(model: str | None, recipe: str | None, run_dir: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Prune → repair → pack → export → bench → eval → report, in one go (default: SmolLM2-135M)."""
    from rich.table import Table

    from seftc.compress.pipeline import compress as run_compress

    from seftc.compress.stages import interrupted_message

    try:
        with progress_bars(not as_json) as bars:
            result = run_compress(model, recipe, run_dir=run_dir, overrides=list(overrides), progress=bars,
                                  log=lambda s: stderr.print(f"[cyan]stage[/cyan] {s}"))
    except KeyboardInterrupt:
        raise SeftcError(interrupted_message(run_dir)) from None
    report = result.report
    if as_json:
        print_json(report)
        return
    table = Table(title=f"seftc compress → {result.run_dir}/report.md")
    tasks = sorted({t for v in report.get("quality", {}).values() for t in v.get("tasks", {})})
    for col in ["model", "sparsity", "ppl", *tasks]:
        table.add_column(col, justify="right" if col != "model" else "left")
    for v, res in report.get("quality", {}).items():
        sp = report["sparsity"].get(v, {}).get("sparsity", 0.0)
        table.add_row(v, f"{sp:.4f}", f"{res['ppl']:.2f}" if res.get("ppl") else "—",
                      *[f"{res['tasks'][t]['acc']:.3f}" if t in res.get("tasks", {}) else "—" for t in tasks])
    stdout.print(table)
    size = report.get("size", {})
    if size.get("packed_file_bytes"):
        stdout.print(f"packed: {size['packed_file_bytes'] / 2**20:.1f} MiB on disk (pruned model stored dense: "
                     f"{size.get('pruned_safetensors', 0) / 2**20:.1f} MiB)")
    if report.get("speed"):
        for x in report["speed"]["results"]:
            stdout.print(f"{x['phase']} batch {x['batch']}: {x['speedup']:.2f}× vs dense")
