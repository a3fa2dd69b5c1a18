"""`seftc repair PRUNED_MODEL -o OUT`."""
from __future__ import annotations

import click

from seftc.cli.common import max_memory_option, max_shard_size_option, print_json, progress_bars, stderr, user_errors


@click.command("repair")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder for the repaired model.")
@click.option("--method", type=click.Choice(["seft", "static", "lora-merge", "masked-lora", "seft-noregrow", "lora-dense"]), default="seft", show_default=True)
@click.option("--data", default="shakespeare:train", show_default=True, help="Training text: .txt file/folder, .jsonl, or a built-in source.")
@click.option("--eval-data", default="shakespeare:valid", show_default=True, help="Held-out text for the loss logged during training.")
@click.option("--steps", type=int, default=140, show_default=True)
@click.option("--seqlen", type=int, default=256, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True, help="Sequences per optimizer step (global, over all ranks).")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per step.")
@click.option("--lr", type=float, default=None, help="Learning rate (default per method).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--density", type=float, default=0.02, show_default=True, help="SEFT: trainable delta density ρ.")
@click.option("--update-interval", type=int, default=20, show_default=True, help="SEFT: steps between topology updates.")
@click.option("--accumulation", type=int, default=5, show_default=True, help="SEFT: steps of gradient statistics before an update.")
@click.option("--zeta0", type=float, default=0.2, show_default=True, help="SEFT: initial drop fraction (cosine-decayed).")
@click.option("--protect", type=int, default=2, show_default=True, help="SEFT: updates a grown position is protected for.")
@click.option("--init", type=click.Choice(["random", "gradient"]), default="random", show_default=True, help="SEFT: initial delta positions.")
@click.option("--reactivation", type=click.Choice(["gain", "always"]), default="gain", show_default=True,
              help="SEFT: grow into pruned positions only where the gain pays for the eviction, or always.")
@click.option("--evict-score", type=click.Choice(["last", "window", "fisher", "wanda", "magnitude", "random"]), default="last",
              show_default=True, help="SEFT: eviction (prune-back) cost: last batch |W·g|, window-mean |W·g|, Fisher/OBD, or an importance.")
@click.option("--evict-blend", type=float, default=0.0, show_default=True, help="SEFT: weight of the pruning-time importance |W|·‖X‖ in the eviction cost.")
@click.option("--importance-windows", type=int, default=8, show_default=True, help="SEFT: calibration windows for ‖X‖ (wanda score or blend).")
@click.option("--grow-candidates", type=click.Choice(["first", "window"]), default="first", show_default=True,
              help="SEFT: growth candidates from the window's first batch or its summed gradient.")
@click.option("--reactivation-cap", type=float, default=None, help="SEFT: reactivations per update ≤ this fraction of a layer's active weights.")
@click.option("--row-cap", type=float, default=None, help="SEFT: evictions per output row and update ≤ this fraction of the row's active weights.")
@click.option("--reactivation-stop", type=float, default=1.0, show_default=True, help="SEFT: no reactivation after this fraction of the steps.")
@click.option("--reactivation-margin", type=float, default=1.0, show_default=True, help="SEFT: gain rule reactivates only where gain > margin × cost.")
@click.option("--evict-cooldown", type=int, default=0, show_default=True, help="SEFT: positions evicted in the last N updates are not regrown.")
@click.option("--delta-decay", type=float, default=0.0, show_default=True, help="SEFT: decay of δ and merged δ toward the pruned base (L2-SP pull).")
@click.option("--lr-schedule", type=click.Choice(["cosine", "linear", "constant"]), default="cosine", show_default=True,
              help="Decay after the warm-up (every method).")
@click.option("--warmup", type=int, default=10, show_default=True, help="Warm-up steps (every method).")
@click.option("--damage-windows", type=int, default=0, show_default=True,
              help="Log held-out loss before/after each SEFT topology update on this many windows (0 = off).")
@click.option("--ood-data", default=None, help="Out-of-domain held-out text for the damage log.")
@click.option("--lora-r", type=int, default=8, show_default=True)
@click.option("--eval-every", type=int, default=20, show_default=True)
@click.option("--grad-checkpointing", is_flag=True, help="Activation checkpointing (less memory, more compute).")
@click.option("--checkpoint-every", type=int, default=0, show_default=True, help="Write a resumable checkpoint every N steps (OUT.checkpoint/).")
@click.option("--resume", is_flag=True, help="Continue from OUT.checkpoint/.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as one JSON object on stdout.")
@max_memory_option
@max_shard_size_option
@user_errors
def repair(model: str, output: str, method: str, data: str, eval_data: str, steps: int, seqlen: int, batch_size: int,
           grad_accum: int, lr: float | None, seed: int, density: float, update_interval: int, accumulation: int, zeta0: float,
           protect: int, init: str, reactivation: str, lora_r: int, eval_every: int, grad_checkpointing: bool, checkpoint_every: int,
           resume: bool, force: bool, as_json: bool, max_memory: str | None, max_shard_size: str,
           **v2: object) -> None:
    """Repair a pruned MODEL (written by `seftc prune`) while keeping its sparsity."""
    from seftc.errors import SeftcError
    from seftc.repair.api import interrupted_message, repair as run_repair
    from seftc.repair.config import make_repair_config

    cfg = make_repair_config(
        method=method, data=data, eval_data=eval_data, steps=steps, seqlen=seqlen, batch_size=batch_size, grad_accum=grad_accum,
        lr=lr, seed=seed, density=density, update_interval=update_interval, accumulation=accumulation, zeta0=zeta0,
        protect=protect, init=init, reactivation=reactivation, lora_r=lora_r, eval_every=eval_every, grad_checkpointing=grad_checkpointing,
        checkpoint_every=checkpoint_every, **v2,
    )
    if max_memory is not None:
        import os

        from seftc.plan import check_fits, model_shape, plan_repair

        check_fits(plan_repair(model_shape(model)[0], method, batch_size=batch_size, seqlen=seqlen, density=density, lora_r=lora_r,
                               grad_checkpointing=grad_checkpointing, nproc=int(os.environ.get("WORLD_SIZE", "1"))), max_memory)
    try:
        with progress_bars(not as_json) as bars:
            result = run_repair(model, cfg, output=output, force=force, resume=resume, progress=bars, max_shard_size=max_shard_size)
    except KeyboardInterrupt:
        raise SeftcError(interrupted_message(output)) from None
    if result.output is None:  # a non-main rank under torchrun
        return
    m = result.manifest
    if as_json:
        import json

        print_json(json.loads(m.to_json()))
    else:
        regrown = sum(s.get("regrown", 0) for s in m.layer_stats.values())
        last = result.history["eval_loss"][-1][1] if result.history["eval_loss"] else float("nan")
        stderr.print(f"[green]repaired[/green] with {m.method}: sparsity {m.sparsity:.4f} (target {m.target_sparsity:.4f}), "
                     f"held-out loss {last:.4f}, {regrown} positions regrown, {m.elapsed_s:.1f} s → {result.output}")
