"""A smoke test of a model behind the real server: `seftc compress`'s optional `serve:` stage.

The model is loaded once in this process and served by uvicorn on a loopback socket on a thread;
a few streamed completions go through HTTP (standard library client, `concurrency` at a time); the
result is their latency, time to first token, tokens and errors. The server is then stopped the
way SIGTERM stops it (in-flight requests drain)."""
from __future__ import annotations

import json
import socket
import statistics
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from seftc.errors import SeftcError


def _request(url: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    sent = time.perf_counter()
    first, tokens = None, 0
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"ok": False, "error": chunk["error"].get("message")}
                if chunk.get("choices") and chunk["choices"][0].get("finish_reason") is None:
                    tokens += 1
                    first = first or time.perf_counter()
    except OSError as e:  # HTTPError, URLError, a dropped connection
        return {"ok": False, "error": str(e)}
    end = time.perf_counter()
    return {"ok": tokens == max_tokens, "tokens": tokens, "latency_ms": (end - sent) * 1e3,
            "ttft_ms": ((first or end) - sent) * 1e3}


def smoke_test(model: str, *, requests: int = 4, concurrency: int = 2, max_tokens: int = 16,
               prompt: str = "The quality of mercy is not strained;", device: str = "cpu",
               dtype: str = "float32", trust_remote_code: bool = False) -> dict[str, Any]:
    """Serve `model`, send `requests` streamed completions, stop; returns the figures."""
    import uvicorn

    from seftc.serve.server import ServeConfig, build_app, load_served_model

    cfg = ServeConfig(model=model, device=device, dtype=dtype, max_batch=max(1, concurrency),
                      max_waiting=requests, max_tokens=max_tokens, model_name="smoke", trust_remote_code=trust_remote_code)
    served = load_served_model(cfg)
    app = build_app(cfg, served)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise SeftcError("serve: the server did not start")
            time.sleep(0.05)
        start = time.perf_counter()
        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            results = list(pool.map(lambda _: _request(url, "smoke", prompt, max_tokens), range(requests)))
        wall = time.perf_counter() - start
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
    good = [r for r in results if r["ok"]]
    out: dict[str, Any] = {"runtime": served.runtime, "sparse_layers": served.sparse_layers, "requests": requests,
                           "concurrency": concurrency, "max_tokens": max_tokens, "errors": requests - len(good),
                           "seconds": wall, "output_tokens_per_s": sum(r["tokens"] for r in good) / wall if wall else None}
    for key in ("latency_ms", "ttft_ms"):
        values = [r[key] for r in good]
        out[key] = {"p50": statistics.median(values), "max": max(values)} if values else None
    failures = [r["error"] for r in results if not r["ok"] and r.get("error")]
    if failures:
        out["first_error"] = failures[0]
    return out
