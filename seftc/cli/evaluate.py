"""`seftc eval`: perplexity and zero-shot multiple-choice accuracy, offline."""
from __future__ import annotations

from typing import Any

import click

from seftc.cli.common import Checked, device_option, max_memory_option, print_json, progress_bars, stdout, user_errors
from seftc.config_types import Count, SeqLen


@click.command("eval")
@click.argument("model")
@click.option("--ppl", "ppl_source", metavar="PATH", help="Text for perplexity: a .txt, a folder of .txt, a .jsonl, or shakespeare:test / lambada / ... (default shakespeare:test when --tasks is not given).")
@click.option("--tasks", metavar="A,B,...", help="Comma-separated zero-shot tasks: boolq,piqa,siqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,mmlu.")
@click.option("--limit", type=Checked(Count), help="Items per task (the first N of its eval part), and windows for --ppl.")
@click.option("--seqlen", type=Checked(SeqLen), default=512, show_default=True, help="Perplexity window length in tokens (capped to the model's maximum).")
@click.option("--stride", type=Checked(Count), help="Sliding-window stride for perplexity (default: seqlen, non-overlapping windows).")
@click.option("--batch-size", type=Checked(Count), help="Sequences per forward pass (default 4 for perplexity, 16 for tasks).")
@click.option("--norm", type=click.Choice(["bytes", "tokens", "none"]), default="bytes", show_default=True,
              help="Length normalisation of choice log-likelihoods: per UTF-8 byte (lm-eval acc_norm style), per token, or none.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--trust-remote-code", is_flag=True, help="Allow code named by the checkpoint to run.")
@max_memory_option
@device_option
@user_errors
def evaluate(model: str, ppl_source: str | None, tasks: str | None, limit: int | None, seqlen: int,
             stride: int | None, batch_size: int | None, norm: str, as_json: bool, trust_remote_code: bool,
             max_memory: str | None, device: str | None) -> None:
    """Perplexity and zero-shot accuracy of MODEL (a folder, .safetensors, .gguf, or 'default')."""
    from seftc.data.corpus import DEFAULT_PPL, load_text
    from seftc.data.tasks import check_task_names
    from seftc.errors import SeftcError

    task_names = check_task_names(tasks.split(",")) if tasks is not None else []
    if ppl_source is None and not task_names:
        ppl_source = DEFAULT_PPL
    text = load_text(ppl_source) if ppl_source is not None else None

    from transformers.utils import logging as hf_logging

    from seftc.eval.multiple_choice import evaluate_tasks
    from seftc.eval.perplexity import perplexity
    from seftc.models.loading import load_model

    hf_logging.disable_progress_bar()  # stderr carries only our bars, or one error line
    hf_logging.set_verbosity_error()
    from seftc.device import resolve_device

    dev = resolve_device(device)
    if max_memory is not None:
        from seftc.plan import check_fits, model_shape, plan_eval

        shape = model_shape(model, trust_remote_code=trust_remote_code)[0]
        check_fits(plan_eval(shape, batch_size=batch_size or (4 if text is not None else 16), seqlen=seqlen), max_memory)
    loaded = load_model(model, trust_remote_code=trust_remote_code)
    loaded.model.to(dev)
    if loaded.tokenizer is None:
        raise SeftcError(f"{model} has no tokenizer; save one beside the model (tokenizer.json / tokenizer_config.json)")
    ppl = None
    with progress_bars() as bars:
        if text is not None:
            ppl = perplexity(loaded.model, loaded.tokenizer, text, seqlen=seqlen, stride=stride, limit=limit,
                             batch_size=batch_size or 4, progress=bars)
        results = evaluate_tasks(loaded.model, loaded.tokenizer, task_names, limit=limit, batch_size=batch_size or 16,
                                 progress=bars, norm=norm) if task_names else {}

    out: dict[str, Any] = {
        "ppl": ppl.ppl if ppl else None,
        "ppl_protocol": {"source": ppl.source, "seqlen": ppl.seqlen, "stride": ppl.stride, "windows": ppl.windows,
                         "tokens": ppl.tokens, "nll": ppl.nll} if ppl else None,
        "tasks": {k: {"acc": r.acc, "acc_stderr": r.acc_stderr, "n": r.n} for k, r in results.items()},
        "tasks_protocol": {"part": "eval", "limit": limit, "norm": norm, "shots": 0} if results else None,
        "model": model,
    }
    if as_json:
        print_json(out)
        return
    from rich.table import Table

    table = Table(title=f"seftc eval {model}")
    for col, justify in (("metric", "left"), ("value", "right"), ("± stderr", "right"), ("n", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    if ppl:
        table.add_row(f"perplexity ({ppl.source}, seqlen {ppl.seqlen}, stride {ppl.stride})", f"{ppl.ppl:.3f}", "",
                      f"{ppl.windows} windows / {ppl.tokens} tokens")
    for k, r in results.items():
        table.add_row(f"{k} acc", f"{r.acc:.4f}", f"{r.acc_stderr:.4f}", str(r.n))
    stdout.print(table)
