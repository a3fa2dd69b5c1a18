"""`seftc prune MODEL -o OUT`: its options are the fields of the recipe's PruneStage (declared once)."""
from __future__ import annotations

from typing import Any

import click

from seftc.cli.common import device_option, max_memory_option, max_shard_size_option, print_json, progress_bars, stderr, user_errors
from seftc.cli.options import from_options, options_from
from seftc.compress.recipe import ModelStage, PruneStage


@click.command("prune")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (a Hugging Face model folder + seftc_manifest.json).")
@options_from(PruneStage)
@options_from(ModelStage, only=("dtype", "trust_remote_code", "allow_pickle"))
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as one JSON object on stdout.")
@click.option("--stream/--no-stream", default=None, show_default="on for safetensors checkpoints",
              help="Read, prune, write and free one decoder block at a time (GGUF loads whole).")
@max_shard_size_option
@max_memory_option
@device_option
@user_errors
def prune(model: str, output: str, force: bool, as_json: bool, stream: bool | None, max_shard_size: str, max_memory: str | None,
          device: str | None, **options: Any) -> None:
    """Prune MODEL one-shot (magnitude, Wanda or SparseGPT) and save it to OUT."""
    from seftc.prune.api import prune as run_prune

    cfg = from_options(PruneStage, "prune", options).to_config()
    loading = from_options(ModelStage, "model", options)
    with progress_bars(not as_json) as bars:
        result = run_prune(model, cfg, output=output, force=force, progress=bars, dtype=loading.dtype,
                           trust_remote_code=loading.trust_remote_code, allow_pickle=loading.allow_pickle, stream=stream,
                           max_shard_size=max_shard_size, max_memory=max_memory, device=device)
    m = result.manifest
    if as_json:
        import json

        print_json(json.loads(m.to_json()))
    else:
        stderr.print(
            f"[green]pruned[/green] {len(m.layers)} layers with {m.method} {m.pattern}: "
            f"sparsity {m.sparsity:.4f} (target {m.target_sparsity:.4f}) in {m.elapsed_s:.1f} s → {result.output}"
        )
