"""`seftc export MODEL -o OUT [--onnx]`."""
from __future__ import annotations

import click

from seftc.cli.common import Checked, print_json, progress_bars, stderr, user_errors
from seftc.config_types import Count, PositiveFloat


@click.command("export")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (model.onnx, export.json, config and tokenizer).")
@click.option("--onnx", "onnx_format", is_flag=True, hidden=True,
              help="Accepted for scripts that name the format; ONNX is the only one, so it changes nothing.")
@click.option("--kv-cache/--no-kv-cache", default=True, show_default=True, help="Take and return the KV cache (past_key_values.* / present.*) for decoding.")
@click.option("--sparse-initializers/--dense-initializers", default=True, show_default=True,
              help="Store pruned weights as ONNX sparse initializers where that is smaller.")
@click.option("--strict-onnx", is_flag=True, help="int64 sparse indices, which the ONNX checker requires (larger files; onnxruntime also takes the default int32).")
@click.option("--opset", type=Checked(Count), default=17, show_default=True)
@click.option("--check/--no-check", default=True, show_default=True, help="Compare onnxruntime's logits with PyTorch on fixed prompts.")
@click.option("--tolerance", type=Checked(PositiveFloat), default=1e-3, show_default=True, help="Largest max-abs logit error allowed, relative to the largest logit.")
@click.option("--prompt", "prompts", multiple=True, help="A prompt for the check (repeatable; default: three fixed sentences).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
@click.option("--trust-remote-code", is_flag=True, help="Allow code named by the checkpoint to run.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle weights (.bin); only for trusted files.")
@user_errors
def export(model: str, output: str, onnx_format: bool, kv_cache: bool, sparse_initializers: bool, strict_onnx: bool, opset: int,
           check: bool, tolerance: float, prompts: tuple[str, ...], force: bool, as_json: bool, trust_remote_code: bool,
           allow_pickle: bool) -> None:
    """Export MODEL to ONNX in OUT and check onnxruntime against PyTorch.

    ONNX is the only export format, so no flag selects it (`--onnx` is still accepted)."""
    from seftc.export.onnx import DEFAULT_PROMPTS, export_onnx

    with progress_bars(not as_json) as bars:
        result = export_onnx(
            model, output, kv_cache=kv_cache, sparse_initializers=sparse_initializers,
            sparse_index_dtype="int64" if strict_onnx else "int32", opset=opset, check=check, tolerance=tolerance,
            prompts=prompts or DEFAULT_PROMPTS, force=force, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
            progress=bars,
        )
    if as_json:
        print_json(result.to_dict())
        return
    sparse = f", {result.sparse_tensors} sparse initializers" if result.sparse_tensors else ""
    checked = (f"; onnxruntime vs PyTorch max abs logit error {result.max_abs_error:.3g} (scale {result.logit_scale:.3g})"
               if result.max_abs_error is not None else "; not checked")
    stderr.print(f"[green]exported[/green] {result.model_file} ({result.bytes / 1e6:.1f} MB{sparse}, "
                 f"{'with' if result.kv_cache else 'without'} KV cache, opset {result.opset}){checked}", soft_wrap=True)
