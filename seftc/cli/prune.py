"""`seftc prune MODEL -o OUT`."""
from __future__ import annotations

import click

from seftc.cli.common import device_option, max_memory_option, max_shard_size_option, print_json, progress_bars, stderr, user_errors


@click.command("prune")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (a Hugging Face model folder + seftc_manifest.json).")
@click.option("--method", type=click.Choice(["magnitude", "wanda", "sparsegpt"]), default="wanda", show_default=True)
@click.option("--sparsity", type=float, default=None, help="Fraction of target weights removed, in [0, 1) (default 0.5; implied by N:M).")
@click.option("--pattern", default="unstructured", show_default=True, help="'unstructured' or N:M, e.g. 2:4, 4:8.")
@click.option("--calib", default="shakespeare:calib", show_default=True, help="Calibration text: a .txt file or folder, a .jsonl, or a built-in source.")
@click.option("--nsamples", type=int, default=128, show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per calibration sample (capped at the model's max positions).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--include", multiple=True, default=("*",), show_default=True, help="Target module-name patterns (fnmatch).")
@click.option("--ignore", multiple=True, help="Module-name patterns to skip (default: lm_head and embeddings).")
@click.option("--owl", is_flag=True, help="Non-uniform per-block sparsity by outlier ratio (OWL), same overall sparsity.")
@click.option("--owl-lambda", type=float, default=0.08, show_default=True)
@click.option("--batch-size", type=int, default=None, help="Calibration batch (default: all samples at once, one pass per block).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as one JSON object on stdout.")
@click.option("--trust-remote-code", is_flag=True, help="Allow code named by the checkpoint to run.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle weights (.bin); only for trusted files.")
@click.option("--stream/--no-stream", default=None,
              help="Read, prune, write and free one decoder block at a time (default for safetensors checkpoints; GGUF loads whole).")
@max_shard_size_option
@max_memory_option
@device_option
@user_errors
def prune(model: str, output: str, method: str, sparsity: float | None, pattern: str, calib: str, nsamples: int, seqlen: int, seed: int,
          include: tuple[str, ...], ignore: tuple[str, ...], owl: bool, owl_lambda: float, batch_size: int | None, dtype: str,
          force: bool, as_json: bool, trust_remote_code: bool, allow_pickle: bool, stream: bool | None, max_shard_size: str,
          max_memory: str | None, device: str | None) -> None:
    """Prune MODEL one-shot (magnitude, Wanda or SparseGPT) and save it to OUT."""
    from seftc.models.targets import DEFAULT_IGNORE
    from seftc.prune.api import prune as run_prune
    from seftc.prune.config import make_config

    cfg = make_config(
        method=method, sparsity=sparsity, pattern=pattern, include=list(include), ignore=list(ignore or DEFAULT_IGNORE),
        owl=owl, owl_lambda=owl_lambda, batch_size=batch_size,
        calib={"source": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed},
    )
    with progress_bars(not as_json) as bars:
        result = run_prune(model, cfg, output=output, force=force, progress=bars, dtype=dtype,
                           trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, stream=stream,
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
