"""`seftc pack MODEL -o OUT` and `seftc unpack PACKED -o OUT`."""
from __future__ import annotations

from typing import Any

import click

from seftc.cli.common import max_shard_size_option, note_checksums, print_json, progress_bars, stderr, user_errors
from seftc.cli.options import from_options, options_from
from seftc.compress.recipe import PackStage

@click.command("pack")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (config + packed safetensors + seftc_pack.json).")
@options_from(PackStage)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a summary as one JSON object on stdout.")
@click.option("--trust-remote-code", is_flag=True, help="Accept a MODEL whose config.json names its own code (pack never runs it).")
@max_shard_size_option
@user_errors
def pack(model: str, output: str, force: bool, as_json: bool, trust_remote_code: bool, max_shard_size: str, **options: Any) -> None:
    """Store MODEL's sparse weights in compact formats (dense tensors stay dense)."""
    from seftc.formats.packing import pack_folder

    opts = from_options(PackStage, "pack", options)
    with progress_bars(not as_json) as bars:
        result = pack_folder(model, output, opts.format, force=force, exact_zeros=opts.exact_zeros, quantize=opts.quantize,
                             trust_remote_code=trust_remote_code,
                             progress=bars, max_shard_size=max_shard_size)
    for w in result.warnings:
        stderr.print(f"[yellow]note:[/yellow] {w}")
    s = result.summary()
    if as_json:
        print_json(s)
    else:
        formats = ", ".join(f"{n} {f}" for f, n in sorted(s["formats"].items()))
        ratio = f"{s['ratio']:.3f}" if s["ratio"] is not None else "n/a"
        per_weight = f", {s['bytes_per_weight']:.3f} B/weight in the sparse tensors" if s["bytes_per_weight"] is not None else ""
        stderr.print(f"[green]packed[/green] {s['tensors']} tensors ({formats}): {s['file_bytes']:,} bytes on disk, "
                     f"{ratio} of dense{per_weight}, in {s['elapsed_s']:.1f} s → {result.output}")


@click.command("unpack")
@click.argument("packed")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder: a dense Hugging Face model folder.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a summary as one JSON object on stdout.")
@max_shard_size_option
@user_errors
def unpack(packed: str, output: str, force: bool, as_json: bool, max_shard_size: str) -> None:
    """Decode a packed folder (seftc or compressed-tensors sparse) back to dense weights."""
    from seftc.formats.packing import unpack_folder

    with progress_bars(not as_json) as bars:
        result = unpack_folder(packed, output, force=force, progress=bars, max_shard_size=max_shard_size)
    note_checksums(result.checksums)
    if as_json:
        print_json(result.summary())
    else:
        stderr.print(f"[green]unpacked[/green] {result.tensors} tensors ({result.file_bytes:,} bytes) in {result.elapsed_s:.1f} s → {result.output}")
