"""`seftc inspect MODEL`."""
from __future__ import annotations

import click

from seftc.cli.common import print_json, stdout, user_errors


@click.command("inspect")
@click.argument("model")
@click.option("--include", multiple=True, default=("*",), show_default=True, help="Target module-name patterns.")
@click.option("--ignore", multiple=True, show_default="lm_head and embeddings", help="Module-name patterns to skip (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--trust-remote-code", is_flag=True, help="Allow code named by the checkpoint to run.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle weights (.bin); only for trusted files.")
@user_errors
def inspect_cmd(model: str, include: tuple[str, ...], ignore: tuple[str, ...], as_json: bool, trust_remote_code: bool, allow_pickle: bool) -> None:
    """Per-layer sparsity, N:M validity, parameter and byte counts of MODEL."""
    from rich.table import Table

    from seftc.inspect import inspect_model
    from seftc.models.targets import DEFAULT_IGNORE

    info = inspect_model(model, include, ignore or DEFAULT_IGNORE, trust_remote_code, allow_pickle)
    if as_json:
        print_json(info)
        return
    table = Table(title=f"{info['model']} ({info['architecture']})")
    cols = ("layer", "shape", "nonzero", "sparsity", "pattern") + (("format", "B/weight") if info["packed"] else ())
    for col in cols:
        table.add_column(col, justify="left" if col in ("layer", "pattern", "format") else "right")
    for row in info["layers"]:
        ok = row.get("claimed_pattern_holds", True)
        pattern = row["pattern"] if ok else f"[red]{row['pattern']} (claimed {info['claimed_pattern']} broken)[/red]"
        stored = (row["format"], f"{row['bytes_per_weight']:.3f}") if info["packed"] else ()
        table.add_row(row["name"], "×".join(map(str, row["shape"])), f"{row['nonzero']:,}", f"{row['sparsity']:.2%}", pattern, *stored)
    stdout.print(table)
    p, b = info["params"], info["bytes"]
    stdout.print(
        f"target sparsity {info['sparsity']:.2%} over {p['target']:,} weights · parameters {p['total']:,} ({p['nonzero']:,} non-zero) · "
        f"tensors {b['tensors_in_memory'] / 2**20:.1f} MiB in memory, {b['on_disk'] / 2**20:.1f} MiB on disk · "
        f"{b['per_target_weight']:.3f} B/weight stored in the target layers"
        + (f" (packed, quantize {info['packed']['quantize']})" if info["packed"] else "")
    )
    if info["claimed_pattern_holds"] is False:
        stdout.print(f"[red]the manifest claims {info['claimed_pattern']}, but some layers break it[/red]")
