"""`seftc generate MODEL --prompt TEXT`: text out, on the sparse runtime."""
from __future__ import annotations

import click

from seftc.cli.common import Checked, note_checksums, print_json, stderr, user_errors
from seftc.config_types import Count, Threads
from seftc.errors import SeftcError


@click.command("generate")
@click.argument("model")
@click.option("--prompt", required=True, help="The text to continue.")
@click.option("--max-new-tokens", type=Checked(Count), default=32, show_default=True, help="Tokens to generate (greedy).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="Dtype of the weights (sparse values, or the dense model with --dense).")
@click.option("--dense", is_flag=True, help="Run the dense model instead (for comparison).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@click.option("--threads", type=Checked(Threads), default=None, show_default="torch's", help="CPU threads.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--trust-remote-code", is_flag=True, help="Allow code named by the checkpoint to run.")
@user_errors
def generate(model: str, prompt: str, max_new_tokens: int, dtype: str, dense: bool, chat: bool, threads: int | None, as_json: bool,
             trust_remote_code: bool) -> None:
    """Greedy generation from MODEL (a pruned or packed folder) on the sparse runtime."""
    import torch

    from seftc.runtime.convert import load_runtime_pair
    from seftc.runtime.generate import generate as run

    if threads:
        torch.set_num_threads(threads)
    pair = load_runtime_pair(model, dtype, need_dense=dense, need_sparse=not dense, trust_remote_code=trust_remote_code)
    if pair.checksums:
        note_checksums(pair.checksums)
    if pair.tokenizer is None:
        raise SeftcError(f"{model} has no tokenizer files; seftc generate needs one to turn the prompt into tokens")
    result = run(pair.dense if dense else pair.sparse, pair.tokenizer, prompt, max_new_tokens, chat=chat)
    if as_json:
        print_json({"prompt": prompt, "text": result.text, "tokens": result.tokens, "seconds": result.seconds,
                    "tokens_per_s": result.tokens_per_s, "runtime": "dense" if dense else "sparse", "checksums": pair.checksums})
        return
    click.echo(result.text)
    stderr.print(f"[dim]{len(result.tokens)} tokens in {result.seconds:.2f} s ({result.tokens_per_s:.1f} tok/s, "
                 f"{'dense' if dense else 'sparse runtime'}, {dtype})[/dim]")
