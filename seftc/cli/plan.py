"""`seftc plan MODEL`: the peak memory each command will need, from the config alone."""
from __future__ import annotations

import click

from seftc.cli.common import Checked, print_json, stdout, user_errors
from seftc.config_types import Count


@click.command("plan")
@click.argument("model")
@click.option("--method", default=None, show_default="the usual ones",
              help="One prune method (magnitude, wanda, sparsegpt) or repair method (seft, static, lora-merge, ...).")
@click.option("--batch-size", type=Checked(Count), default=None, show_default="4 for repair/eval, all samples for prune",
              help="Repair/eval batch, prune calibration batch.")
@click.option("--seqlen", type=Checked(Count), default=None, show_default="512 for prune/eval, 256 for repair",
              help="Tokens per sequence.")
@click.option("--nsamples", type=Checked(Count), default=128, show_default=True, help="Prune calibration samples.")
@click.option("--calib", default=None, show_default="prune's default",
              help="Prune calibration text (tokenized whole: its tokens are counted with the model's tokenizer).")
@click.option("--nproc", type=Checked(Count), default=1, show_default=True, help="Ranks under torchrun (repair, per rank).")
@click.option("--fsdp", is_flag=True, help="Repair with the base, delta and optimizer state sharded over the ranks.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
              help="Dtype the model would be loaded in (auto: the checkpoint's).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--trust-remote-code", is_flag=True, help="Accept a config that names its own code (plan never runs it).")
@user_errors
def plan(model: str, method: str | None, batch_size: int | None, seqlen: int | None, nsamples: int, calib: str | None, nproc: int,
         fsdp: bool, dtype: str, as_json: bool, trust_remote_code: bool) -> None:
    """Estimate, per command, the peak memory MODEL needs (weights, gradients, optimizer state, SEFT slots, activations)."""
    from dataclasses import asdict

    from seftc.plan import PRUNE_METHODS, calibration_tokens, model_shape, plan_all, pruned_sparsity
    from seftc.sizes import format_size

    shape, kind = model_shape(model, dtype, trust_remote_code)
    tokens = calibration_tokens(model, calib, trust_remote_code) if method is None or method in PRUNE_METHODS else None
    plans = plan_all(shape, method=method, batch_size=batch_size, seqlen=seqlen, nsamples=nsamples, nproc=nproc, fsdp=fsdp,
                     gguf=kind == "gguf", sparsity=pruned_sparsity(model), calib_tokens=tokens)
    if as_json:
        print_json({"model": model, "shape": asdict(shape), "nproc": nproc, "fsdp": fsdp, "plans": [p.to_json() for p in plans]})
        return
    from rich.table import Table

    t = Table(title=f"seftc plan {model} · {shape.model_type} · {shape.params / 1e9:.3g} B params · {shape.dtype}"
                    + (f" · per rank of {nproc}{' (FSDP)' if fsdp else ''}" if nproc > 1 else ""))
    for col in ("command", "peak", "terms"):
        t.add_column(col, justify="right" if col == "peak" else "left")
    for p in plans:
        terms = ", ".join(f"{k} {format_size(v)}" for k, v in p.peak_terms().items() if v)
        when = [f"peak while {p.peak_phase}"] if p.peak_phase else []
        t.add_row(p.command + (f" {p.method}" if p.method else ""), format_size(p.total), terms + "".join(f" [{n}]" for n in when + p.notes))
    stdout.print(t)
