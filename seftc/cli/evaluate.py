"""`seftc eval`: perplexity and zero-shot multiple-choice accuracy, offline. Its options are the
fields of the recipe's EvalStage (declared once); the work is seftc.eval.suite, as in `compress`."""
from __future__ import annotations

from typing import Any

import click

from seftc.cli.common import device_option, max_memory_option, print_json, progress_bars, stdout, user_errors
from seftc.cli.options import from_options, options_from
from seftc.compress.recipe import EvalStage, ModelStage


@click.command("eval")
@click.argument("model")
@options_from(EvalStage)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@options_from(ModelStage, only=("trust_remote_code",))
@max_memory_option
@device_option
@user_errors
def evaluate(model: str, as_json: bool, trust_remote_code: bool, max_memory: str | None, device: str | None, **options: Any) -> None:
    """Perplexity and zero-shot accuracy of MODEL (a folder, a packed folder (run on the sparse runtime), .safetensors, .gguf, or 'default')."""
    from seftc.errors import SeftcError
    from seftc.eval.suite import plan, run

    todo = plan(**from_options(EvalStage, "eval", options).model_dump())

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr carries only our bars, or one error line
    hf_logging.set_verbosity_error()
    from seftc.device import resolve_device

    dev = resolve_device(device)
    if max_memory is not None:
        from seftc.plan import check_fits, model_shape, plan_eval

        shape = model_shape(model, trust_remote_code=trust_remote_code)[0]
        check_fits(plan_eval(shape, batch_size=todo.batch_size or (4 if todo.text is not None else 16), seqlen=todo.seqlen), max_memory)
    net, tokenizer = _load(model, trust_remote_code)
    net.to(dev)
    if tokenizer is None:
        raise SeftcError(f"{model} has no tokenizer; save one beside the model (tokenizer.json / tokenizer_config.json)")
    with progress_bars() as bars:
        out = run(net, tokenizer, todo, bars)
    out["model"] = model
    if as_json:
        print_json(out)
        return
    from rich.table import Table

    table = Table(title=f"seftc eval {model}")
    for col, justify in (("metric", "left"), ("value", "right"), ("± stderr", "right"), ("n", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    if out["ppl"] is not None:
        p = out["ppl_protocol"]
        table.add_row(f"perplexity ({p['source']}, seqlen {p['seqlen']}, stride {p['stride']})", f"{out['ppl']:.3f}", "",
                      f"{p['windows']} windows / {p['tokens']} tokens")
    for k, r in out["tasks"].items():
        table.add_row(f"{k} acc", f"{r['acc']:.4f}", f"{r['acc_stderr']:.4f}", str(r["n"]))
    stdout.print(table)


def _load(model: str, trust_remote_code: bool) -> tuple[Any, Any]:
    """MODEL and its tokenizer. A packed folder (`seftc pack`, int8 included) runs on the sparse
    runtime, as `seftc.load_sparse` + `sparsify_model` run it: what is measured is what is served."""
    from pathlib import Path

    from seftc.runtime.convert import is_packed_folder

    path = Path(model).expanduser()
    if path.is_dir() and is_packed_folder(path):
        from seftc.cli.common import note_checksums
        from seftc.runtime.convert import load_runtime_pair

        pair = load_runtime_pair(model, need_dense=False, require_sparse=False, trust_remote_code=trust_remote_code)
        note_checksums(pair.checksums or "verified")
        return pair.sparse, pair.tokenizer
    from seftc.models.loading import load_model

    loaded = load_model(model, trust_remote_code=trust_remote_code)
    return loaded.model, loaded.tokenizer
