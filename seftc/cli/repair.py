"""`seftc repair PRUNED_MODEL -o OUT`: its options are the fields of RepairConfig (declared once)."""
from __future__ import annotations

from typing import Any

import click

from seftc.cli.common import device_option, max_memory_option, max_shard_size_option, print_json, progress_bars, stderr, user_errors
from seftc.cli.options import cli_labels, options_from, take
from seftc.compress.recipe import ModelStage
from seftc.repair.config import RepairConfig


@click.command("repair")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder for the repaired model.")
@options_from(RepairConfig)
@options_from(ModelStage, only=("trust_remote_code",))
@click.option("--resume", is_flag=True, help="Continue from OUT.checkpoint/ (written by --checkpoint-every).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as one JSON object on stdout.")
@max_memory_option
@max_shard_size_option
@device_option
@click.option("--fsdp", is_flag=True, help="Under torchrun: shard the base, the trained tensors and their optimizer state over the ranks "
              "(FSDP2) instead of a replica per rank (DDP).")
@user_errors
def repair(model: str, output: str, resume: bool, force: bool, as_json: bool, max_memory: str | None, max_shard_size: str, trust_remote_code: bool,
           device: str | None, fsdp: bool, **options: Any) -> None:
    """Repair a pruned MODEL (written by `seftc prune`) while keeping its sparsity."""
    from seftc.errors import SeftcError
    from seftc.repair.api import interrupted_message, repair as run_repair
    from seftc.repair.config import make_repair_config, schedule_warnings

    values = take(RepairConfig, options)
    cfg = make_repair_config(labels=cli_labels(values), **values)
    if max_memory is not None:
        import os

        from seftc.plan import check_fits, model_shape, plan_repair, pruned_sparsity

        check_fits(plan_repair(model_shape(model)[0], cfg.method, batch_size=cfg.batch_size, seqlen=cfg.seqlen, density=cfg.density,
                               lora_r=cfg.lora_r, grad_checkpointing=cfg.grad_checkpointing,
                               nproc=int(os.environ.get("WORLD_SIZE", "1")), fsdp=fsdp, sparsity=pruned_sparsity(model),
                               static_precision=cfg.static_precision, evict_score=cfg.evict_score,
                               grow_candidates=cfg.grow_candidates), max_memory)
    try:
        with progress_bars(not as_json) as bars:
            result = run_repair(model, cfg, output=output, force=force, resume=resume, trust_remote_code=trust_remote_code, max_shard_size=max_shard_size,
                                device=device, fsdp=fsdp,
                                progress=_WarnOnStart(bars, [] if as_json else schedule_warnings(cfg)))
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
        for warning in m.config.get("warnings", []):
            stderr.print(f"[yellow]warning:[/yellow] {warning}")
        stderr.print(f"[green]repaired[/green] with {m.method}: sparsity {m.sparsity:.4f} (target {m.target_sparsity:.4f}), "
                     f"held-out loss {last:.4f}, {regrown} positions regrown, {m.elapsed_s:.1f} s → {result.output}")


class _WarnOnStart:
    """The progress sink, but the first task first prints the warnings: training has started, so
    every input check passed (bad input still gets its one error line alone)."""

    def __init__(self, sink: Any, warnings: list[str]):
        self._sink, self._warnings = sink, warnings

    def task(self, description: str, total: int | None):
        for warning in self._warnings:
            stderr.print(f"[yellow]warning:[/yellow] {warning}")
        self._warnings = []
        return self._sink.task(description, total)

    def __getattr__(self, name: str) -> Any:  # status(...) and the rest
        return getattr(self._sink, name)
