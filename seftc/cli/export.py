"""`seftc export MODEL -o OUT [--onnx]`."""
from __future__ import annotations

from typing import Any

import click

from seftc.cli.common import print_json, progress_bars, stderr, user_errors
from seftc.cli.options import from_options, options_from
from seftc.compress.recipe import ExportStage, ModelStage


@click.command("export")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (model.onnx, export.json, config and tokenizer).")
@options_from(ExportStage)
@options_from(ModelStage, only=("trust_remote_code", "allow_pickle"))
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
@user_errors
def export(model: str, output: str, force: bool, as_json: bool, **options: Any) -> None:
    """Export MODEL to ONNX in OUT and check onnxruntime against PyTorch.

    ONNX is the only export format, so no flag selects it (`--onnx` is still accepted)."""
    from seftc.export.onnx import export_onnx

    opts = from_options(ExportStage, "export", options)
    loading = from_options(ModelStage, "model", options)
    with progress_bars(not as_json) as bars:
        result = export_onnx(model, output, force=force, trust_remote_code=loading.trust_remote_code,
                             allow_pickle=loading.allow_pickle, progress=bars, **opts.export_kwargs())
    if as_json:
        print_json(result.to_dict())
        return
    sparse = f", {result.sparse_tensors} sparse initializers" if result.sparse_tensors else ""
    checked = (f"; onnxruntime vs PyTorch max abs logit error {result.max_abs_error:.3g} (scale {result.logit_scale:.3g})"
               if result.max_abs_error is not None else "; not checked")
    stderr.print(f"[green]exported[/green] {result.model_file} ({result.bytes / 1e6:.1f} MB{sparse}, "
                 f"{'with' if result.kv_cache else 'without'} KV cache, opset {result.opset}){checked}", soft_wrap=True)
