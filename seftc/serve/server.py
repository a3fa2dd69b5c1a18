"""`seftc serve`'s lifecycle: load the model once (sparse runtime where its layers are sparse, dense
otherwise or with `dense`), build the engine and the app, run uvicorn until SIGTERM/SIGINT, drain.

Shutdown: uvicorn stops accepting connections and waits (up to `drain_timeout`) for the responses in
flight, which the engine keeps decoding; then the app's lifespan drains the engine and stops its
thread. The signal is then absorbed (uvicorn re-raises it after a graceful exit), so the process
exits 0."""
from __future__ import annotations

import copy
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import uvicorn
from pydantic import BaseModel, ConfigDict, Field

from seftc.config_types import Count, NonNegativeCount, NonNegativeFloat, Threads
from seftc.errors import SeftcError
from seftc.serve.app import AppSettings, create_app


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_batch: Count = 16
    max_waiting: NonNegativeCount = 64  # queued beyond the free batch slots; above it: 429
    max_prefill_tokens: Count = 256  # prompt tokens admitted per engine step
    max_tokens: Count = 1024  # per request
    api_key: str | None = None
    model_name: str | None = None  # the id clients send; default: the folder's name
    dense: bool = False
    threads: Threads | None = None
    drain_timeout: NonNegativeFloat = 60.0
    access_log: bool = False
    trust_remote_code: bool = False


@dataclass
class ServedModel:
    model: Any
    tokenizer: Any
    name: str
    runtime: str  # "sparse" | "dense"
    sparse_layers: int
    checksums: str | None = None  # a packed folder's checksum status


def served_name(spec: str) -> str:
    path = Path(spec).expanduser()
    return path.name if path.name and spec != "default" else "default"


def load_served_model(cfg: ServeConfig) -> ServedModel:
    """The model once, on `cfg.device` in `cfg.dtype`: on the sparse runtime unless `cfg.dense` or
    no layer is sparse enough (then dense, as the original model would run)."""
    import torch

    from seftc.runtime.convert import load_runtime_pair, prepare_prefill

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SeftcError("--device cuda: no CUDA device is visible; use --device cpu")
    if cfg.device == "cpu" and cfg.dtype == "float16":
        raise SeftcError("--dtype float16 needs --device cuda; on the CPU use float32 or bfloat16")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pair = load_runtime_pair(cfg.model, cfg.dtype, need_dense=cfg.dense, need_sparse=not cfg.dense, require_sparse=False,
                             trust_remote_code=cfg.trust_remote_code)
    if pair.tokenizer is None:
        raise SeftcError(f"{cfg.model} has no tokenizer files; seftc serve needs one to read prompts")
    model = pair.dense if cfg.dense else pair.sparse
    model = model.to(cfg.device).eval()
    if cfg.device == "cuda" and not cfg.dense:
        prepare_prefill(model)
    converted = len(pair.conversion.converted)
    return ServedModel(model, pair.tokenizer, cfg.model_name or served_name(cfg.model),
                       "sparse" if converted else "dense", converted, pair.checksums)


def build_app(cfg: ServeConfig, served: ServedModel) -> Any:
    from seftc.runtime.engine import Engine

    # the engine thread detokenizes with its own tokenizer: fast tokenizers are not safe to share
    # between a thread that encodes and one that decodes
    engine = Engine(served.model, copy.deepcopy(served.tokenizer), max_batch=cfg.max_batch, max_waiting=cfg.max_waiting,
                    max_prefill_tokens=cfg.max_prefill_tokens)
    engine.warmup()
    settings = AppSettings(served.name, cfg.max_tokens, cfg.api_key, cfg.drain_timeout)
    return create_app(engine, served.tokenizer, settings)


class _Server(uvicorn.Server):
    """uvicorn's server, telling `on_started` its address once it listens."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[str], None] | None):
        super().__init__(config)
        self.on_started = on_started

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            port = self.servers[0].sockets[0].getsockname()[1] if self.servers else self.config.port
            self.on_started(f"http://{self.config.host}:{port}")


def check_port(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise SeftcError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise SeftcError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port") from None


def run(cfg: ServeConfig, served: ServedModel, on_started: Callable[[str], None] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; returns 0 after a graceful drain."""
    check_port(cfg.host, cfg.port)
    app = build_app(cfg, served)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info", access_log=cfg.access_log,
                            timeout_graceful_shutdown=cfg.drain_timeout, lifespan="on")
    server = _Server(config, on_started)
    # uvicorn restores the handlers it found and raises the signal again after its graceful exit;
    # these absorb it there, so a drained shutdown exits 0
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    except SystemExit:  # uvicorn exits 1 when it cannot bind or start
        if server.started:
            raise
        raise SeftcError(f"could not serve on {cfg.host}:{cfg.port}; see the log above") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
