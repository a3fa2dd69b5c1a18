"""`seftc serve MODEL`: an OpenAI-compatible HTTP server on the sparse runtime."""
from __future__ import annotations

import click

from seftc.cli.common import Checked, note_checksums, stderr, user_errors
from seftc.config_types import Count, NonNegativeCount, NonNegativeFloat, Threads
from seftc.errors import SeftcError


@click.command("serve")
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told otherwise).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port (0: any free port).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Device the model runs on.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Dtype of the weights.")
@click.option("--max-batch", type=Checked(Count), default=16, show_default=True,
              help="Sequences decoded together; more wait in the queue.")
@click.option("--max-queue", "max_waiting", type=Checked(NonNegativeCount), default=64, show_default=True,
              help="Requests waiting beyond the free batch slots; above it the server answers 429.")
@click.option("--max-prefill-tokens", type=Checked(Count), default=256, show_default=True,
              help="Prompt tokens admitted per engine step (one prompt always); more wait a step, so running "
                   "streams keep flowing while a burst of prompts is prefilled.")
@click.option("--max-tokens", type=Checked(Count), default=1024, show_default=True,
              help="Most new tokens one request may ask for (above it: 400).")
@click.option("--api-key", default=None, envvar="SEFTC_API_KEY", show_envvar=True, show_default="none: no authentication",
              help="Require 'Authorization: Bearer KEY' on /v1 requests.")
@click.option("--model-name", default=None, show_default="the folder's name", help="The model id clients send.")
@click.option("--dense", is_flag=True, help="Serve the dense model instead of the sparse runtime (for comparison).")
@click.option("--threads", type=Checked(Threads), default=None, show_default="torch's", help="CPU threads.")
@click.option("--drain-timeout", type=Checked(NonNegativeFloat), default=60.0, show_default=True,
              help="Seconds in-flight requests get to finish after SIGTERM.")
@click.option("--access-log", is_flag=True, help="Log every request on stderr.")
@click.option("--trust-remote-code", is_flag=True, help="Allow code named by the checkpoint to run.")
@user_errors
def serve(model: str, **options) -> None:
    """Serve MODEL (a pruned, repaired or packed folder, or `default`) over the OpenAI HTTP API:
    /v1/completions, /v1/chat/completions (streamed or not), /v1/models, /health, /metrics.
    Concurrent requests are batched; SIGTERM drains in-flight requests, then exits 0."""
    try:
        from seftc.serve.server import ServeConfig, check_port, load_served_model, run
    except ImportError as e:
        raise SeftcError(f"seftc serve needs its extra ({e.name} is missing): pip install 'seftc[serve]'") from None

    cfg = ServeConfig(model=model, **options)
    check_port(cfg.host, cfg.port)  # before the model loads: a busy port fails at once
    with stderr.status(f"loading {model}…"):
        served = load_served_model(cfg)
    if served.checksums:
        note_checksums(served.checksums)
    where = f"sparse runtime, {served.sparse_layers} sparse layers" if served.runtime == "sparse" else "dense"
    if served.runtime == "dense" and not cfg.dense:
        where += f" (no layer is sparse enough to run sparse; prune it first for the sparse runtime)"
    stderr.print(f"[bold]seftc serve[/bold] {served.name} ({where}, {cfg.dtype}, {cfg.device}), "
                 f"max batch {cfg.max_batch}")
    run(cfg, served, on_started=lambda url: stderr.print(f"listening on {url} (OpenAI API at {url}/v1)"))
