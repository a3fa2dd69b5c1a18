"""`make bench-serve`: `seftc serve` under load, SmolLM2-135M dense against its 70% sparse version.

Both models are served at once by `seftc serve` (two processes on loopback ports, the same flags);
a bounded load generator (asyncio + httpx, streaming /v1/completions) sends a fixed number of
requests at each concurrency, to dense and sparse in turn (the order alternates by level and round,
so that a change in machine load hits both): prompts of exactly --prompt-tokens token ids (windows
of shakespeare:test), --new-tokens new tokens (ignore_eos), temperature 0. Per model and
concurrency: requests/s, output tokens/s, time to first token and inter-token latency p50/p99,
errors, and the server's resident memory (after warm-up, peak, at the end). Writes
results/serve.md and results/serve.json (the servers' logs under runs/bench-serve/logs) and prints
the ratios against the issue's goals; exits 1 if any request failed or a server did not exit 0.

The sparse model: --sparse FOLDER (a repaired folder, say), else `seftc prune default --method wanda
--sparsity 0.7` into runs/bench-serve/wanda70 (cached).

    python bench/bench_serve.py                                   # the real run (~15 min on 2 cores)
    python bench/bench_serve.py --dense D --sparse S --concurrency 1,2 --requests 2 --new-tokens 4 \\
        --prompt-tokens 8 --text corpus.txt --out /tmp/x             # a smoke run on tiny models

Every option also reads an environment variable: BENCH_DENSE, BENCH_SPARSE, BENCH_CONCURRENCY,
BENCH_REQUESTS, BENCH_PROMPT_TOKENS, BENCH_NEW_TOKENS, BENCH_ROUNDS, BENCH_THREADS, BENCH_OUT.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(f"BENCH_{name}", default)


@dataclass
class LevelResult:
    model: str
    concurrency: int
    requests: int
    seconds: float
    output_tokens: int
    errors: int
    ttft_ms: list[float] = field(default_factory=list, repr=False)
    itl_ms: list[float] = field(default_factory=list, repr=False)
    rss_start_mib: float = 0.0
    rss_end_mib: float = 0.0
    mean_batch: float = float("nan")  # rows per decode step over the level, from the server's /metrics

    @property
    def requests_per_s(self) -> float:
        return (self.requests - self.errors) / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    def summary(self) -> dict:
        return {"model": self.model, "concurrency": self.concurrency, "requests": self.requests,
                "seconds": self.seconds, "requests_per_s": self.requests_per_s, "output_tokens": self.output_tokens,
                "output_tokens_per_s": self.tokens_per_s, "errors": self.errors,
                "ttft_ms_p50": _pct(self.ttft_ms, 50), "ttft_ms_p99": _pct(self.ttft_ms, 99),
                "itl_ms_p50": _pct(self.itl_ms, 50), "itl_ms_p99": _pct(self.itl_ms, 99),
                "rss_start_mib": self.rss_start_mib, "rss_end_mib": self.rss_end_mib, "mean_batch": self.mean_batch}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class ServerProcess:
    """`seftc serve` in a subprocess; its resident memory sampled on a thread (peak kept)."""

    def __init__(self, name: str, model: str, max_batch: int, max_queue: int, threads: int | None, log: Path):
        self.name = name
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "seftc.cli.main", "serve", model, "--port", str(self.port), "--model-name", name,
               "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--max-tokens", "4096"]
        if threads:
            cmd += ["--threads", str(threads)]
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.peak_rss = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def rss(self) -> int:
        import psutil

        try:
            return psutil.Process(self.proc.pid).memory_info().rss
        except psutil.Error:
            return 0

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak_rss = max(self.peak_rss, self.rss())

    def wait_healthy(self, timeout: float = 900) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"seftc serve ({self.name}) exited {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"seftc serve ({self.name}) not healthy after {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> int:
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


async def _one(client, url: str, name: str, prompt: list[int], new_tokens: int) -> tuple[list[float], float | None, int, bool]:
    """One streamed request: (token arrival times, send time, tokens, ok)."""
    body = {"model": name, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    sent = time.perf_counter()
    times: list[float] = []
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return times, sent, 0, False
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return times, sent, len(times), False
                choice = chunk["choices"][0] if chunk.get("choices") else None
                if choice is not None and choice.get("finish_reason") is None:
                    times.append(time.perf_counter())
    except Exception:  # a refused or broken connection is an error of the run, not of the script
        return times, sent, len(times), False
    return times, sent, len(times), len(times) == new_tokens


async def run_level(server: ServerProcess, prompts: list[list[int]], concurrency: int, requests: int,
                    new_tokens: int, headers: dict[str, str] | None = None) -> LevelResult:
    """`requests` streamed requests, at most `concurrency` in flight, against `server` (needs `name`,
    `url`, `rss()`)."""
    import httpx

    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(prompts[i % len(prompts)])
    result = LevelResult(server.name, concurrency, requests, 0.0, 0, 0, rss_start_mib=server.rss() / MIB)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits, headers=headers) as client:
        async def worker() -> None:
            while True:
                try:
                    prompt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                times, sent, tokens, ok = await _one(client, server.url, server.name, prompt, new_tokens)
                result.output_tokens += tokens
                result.errors += not ok
                if times:
                    result.ttft_ms.append((times[0] - sent) * 1e3)
                    result.itl_ms.extend((b - a) * 1e3 for a, b in zip(times, times[1:]))

        before = await _engine_counters(client, server.url)
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.seconds = time.perf_counter() - start
        after = await _engine_counters(client, server.url)
        steps = after.get("seftc_engine_decode_steps", 0) - before.get("seftc_engine_decode_steps", 0)
        if steps > 0:
            result.mean_batch = (after["seftc_engine_decode_rows"] - before["seftc_engine_decode_rows"]) / steps
    result.rss_end_mib = server.rss() / MIB
    return result


async def _engine_counters(client, url: str) -> dict[str, float]:
    """The engine's step counters from the server's Prometheus text (empty if unreadable)."""
    try:
        text = (await client.get(f"{url}/metrics")).text
    except Exception:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("seftc_engine_"):
            out[name] = float(value)
    return out


def make_prompts(tokenizer_dir: str, text_source: str, n: int, length: int) -> list[list[int]]:
    """`n` prompts of exactly `length` token ids: consecutive windows of the text's tokens."""
    from seftc.data.corpus import load_text
    from seftc.models.loading import resolve_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve_model(tokenizer_dir).path))
    source = load_text(text_source)
    ids = tok(getattr(source, "text", source)).input_ids
    if len(ids) < length:
        raise SystemExit(f"{text_source} has {len(ids)} tokens; need at least {length}")
    step = max(1, min(length, (len(ids) - length) // max(1, n)))
    return [ids[i * step: i * step + length] for i in range(n) if i * step + length <= len(ids)] or [ids[:length]]


def sparse_folder(arg: str | None) -> str:
    if arg:
        return arg
    out = ROOT / "runs" / "bench-serve" / "wanda70"
    if not (out / "seftc_manifest.json").is_file():
        print(f"pruning SmolLM2-135M to 70% (wanda) into {out} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "seftc.cli.main", "prune", "default", "-o", str(out), "--method", "wanda",
                        "--sparsity", "0.7", "--force"], check=True)
    return str(out)


def _fmt(v: float, digits: int = 1) -> str:
    return "–" if v != v else f"{v:.{digits}f}"


def write_report(path: Path, results: list[LevelResult], servers: dict[str, ServerProcess], args, meta: dict,
                 rss_warm: dict[str, float]) -> str:
    rows = {}
    for r in results:  # several rounds: keep every level's runs together, report the median of each figure
        rows.setdefault((r.model, r.concurrency), []).append(r.summary())
    table = {k: {f: (statistics.median(x[f] for x in v) if isinstance(v[0][f], (int, float)) else v[0][f])
                 for f in v[0]} for k, v in rows.items()}
    for k, v in rows.items():
        table[k]["errors"] = sum(x["errors"] for x in v)
    lines = [
        "# `seftc serve` under load: SmolLM2-135M dense vs 70% sparse",
        "",
        f"Generated by `make bench-serve` (`bench/bench_serve.py`); {meta['machine']}. Dense: `{args.dense}`; "
        f"sparse: `{meta['sparse']}`. Both served by `seftc serve` at once (loopback, --max-batch "
        f"{meta['max_batch']}), driven in turn (alternating order) by a bounded load generator: "
        f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, temperature 0, streamed; "
        f"{args.rounds} round(s), medians over rounds. TTFT: from sending the request to the first token; "
        f"ITL: between consecutive tokens of one request; mean batch: rows per decode step on the server over the level.",
        "",
        "| model | concurrency | requests | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors | mean batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, conc), s in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(f"| {model} | {conc} | {s['requests']} | {_fmt(s['requests_per_s'], 2)} | "
                     f"{_fmt(s['output_tokens_per_s'])} | {_fmt(s['ttft_ms_p50'])} | {_fmt(s['ttft_ms_p99'])} | "
                     f"{_fmt(s['itl_ms_p50'])} | {_fmt(s['itl_ms_p99'])} | {s['errors']} | {_fmt(s['mean_batch'])} |")
    lines += ["", "Server memory (resident, MiB): after warm-up, peak over the run, at the end.", "",
              "| model | after warm-up | peak | end | growth (end − warm-up) |", "|---|---|---|---|---|"]
    for name, srv in servers.items():
        last = [r.rss_end_mib for r in results if r.model == name][-1:] or [float("nan")]
        lines.append(f"| {name} | {_fmt(rss_warm[name])} | {_fmt(srv.peak_rss / MIB)} | {_fmt(last[0])} | "
                     f"{_fmt(last[0] - rss_warm[name])} |")
    levels = sorted({c for _, c in table})
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    lines += ["", "Ratios and the issue's goals:", ""]
    verdicts = []
    for c in levels:
        d, s = table.get(("dense", c)), table.get(("sparse", c))
        if d and s:
            lines.append(f"- concurrency {c}: sparse/dense output tok/s {ratio(s['output_tokens_per_s'], d['output_tokens_per_s']):.2f}×, "
                         f"TTFT p50 {ratio(d['ttft_ms_p50'], s['ttft_ms_p50']):.2f}× (dense/sparse), "
                         f"ITL p50 {ratio(d['itl_ms_p50'], s['itl_ms_p50']):.2f}× (dense/sparse)")
    lo, hi = min(levels), max(levels)
    for name in ("dense", "sparse"):
        a, b = table.get((name, lo)), table.get((name, hi))
        if a and b and hi != lo:
            lines.append(f"- {name}: concurrency {hi} aggregate tok/s / concurrency {lo}: "
                         f"{ratio(b['output_tokens_per_s'], a['output_tokens_per_s']):.2f}×")
    if ("dense", 1) in table and ("sparse", 1) in table:
        r1 = ratio(table[("sparse", 1)]["output_tokens_per_s"], table[("dense", 1)]["output_tokens_per_s"])
        verdicts.append(f"concurrency 1, sparse ≥ 1.8× dense output tok/s: {'met' if r1 >= 1.8 else 'NOT met'} ({r1:.2f}×)")
    if ("sparse", 16) in table and ("sparse", 1) in table:
        r16 = ratio(table[("sparse", 16)]["output_tokens_per_s"], table[("sparse", 1)]["output_tokens_per_s"])
        verdicts.append(f"concurrency 16, sparse aggregate ≥ 4× its concurrency-1 figure: "
                        f"{'met' if r16 >= 4 else 'NOT met'} ({r16:.2f}×)")
    if ("sparse", 16) in table and ("dense", 16) in table:
        a16 = ratio(table[("sparse", 16)]["output_tokens_per_s"], table[("dense", 16)]["output_tokens_per_s"])
        verdicts.append(f"concurrency 16, sparse ahead of dense: {'met' if a16 > 1 else 'NOT met'} ({a16:.2f}×)")
    errors = sum(r.errors for r in results)
    verdicts.append(f"zero errors: {'met' if errors == 0 else 'NOT met'} ({errors})")
    verdicts.append("server exit status after SIGTERM: " + ", ".join(f"{k} {v}" for k, v in meta["exit"].items()))
    lines += ["", "Goals:", ""] + [f"- {v}" for v in verdicts]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default=_env("DENSE", "default"), help="the dense model (default: SmolLM2-135M)")
    ap.add_argument("--sparse", default=_env("SPARSE", None), help="the sparse folder (default: prune it, cached)")
    ap.add_argument("--concurrency", default=_env("CONCURRENCY", "1,4,16"))
    ap.add_argument("--requests", default=_env("REQUESTS", None),
                    help="requests per level: one number, or one per level (default: 8, 16, 32 for 1, 4, 16)")
    ap.add_argument("--prompt-tokens", type=int, default=int(_env("PROMPT_TOKENS", "64")))
    ap.add_argument("--new-tokens", type=int, default=int(_env("NEW_TOKENS", "64")))
    ap.add_argument("--rounds", type=int, default=int(_env("ROUNDS", "1")))
    ap.add_argument("--threads", type=int, default=int(_env("THREADS", "0")) or None, help="server CPU threads")
    ap.add_argument("--text", default="shakespeare:test", help="where prompts come from")
    ap.add_argument("--out", default=_env("OUT", str(ROOT / "results" / "serve.md")))
    args = ap.parse_args()

    import torch

    levels = [int(c) for c in args.concurrency.split(",")]
    if args.requests is None:
        counts = [max(8, 2 * c) for c in levels]
    else:
        given = [int(n) for n in str(args.requests).split(",")]
        counts = given * len(levels) if len(given) == 1 else given
    if len(counts) != len(levels):
        raise SystemExit("--requests: give one number or one per concurrency level")
    sparse = sparse_folder(args.sparse)
    prompts = make_prompts(sparse, args.text, max(counts), args.prompt_tokens)
    out = Path(args.out)
    logs = ROOT / "runs" / "bench-serve" / "logs"  # the servers' output, not part of the results
    logs.mkdir(parents=True, exist_ok=True)
    max_batch = max(levels)
    servers = {name: ServerProcess(name, model, max_batch, max(counts), args.threads, logs / f"{name}.log")
               for name, model in (("dense", args.dense), ("sparse", sparse))}
    results: list[LevelResult] = []
    exits: dict[str, int] = {}
    start = time.time()
    try:
        for srv in servers.values():
            srv.wait_healthy()
        rss_warm = {}
        for name, srv in servers.items():  # warm-up: a few requests, not timed
            asyncio.run(run_level(srv, prompts, min(2, max_batch), 2, min(8, args.new_tokens)))
            rss_warm[name] = srv.rss() / MIB
        for rnd in range(args.rounds):
            for i, (conc, n) in enumerate(zip(levels, counts)):
                order = ["dense", "sparse"] if (i + rnd) % 2 == 0 else ["sparse", "dense"]
                for name in order:
                    r = asyncio.run(run_level(servers[name], prompts, conc, n, args.new_tokens))
                    results.append(r)
                    s = r.summary()
                    print(f"[{time.time() - start:6.0f}s] round {rnd + 1} {name:6s} c={conc:<3d} "
                          f"{s['output_tokens_per_s']:7.1f} tok/s  {s['requests_per_s']:.2f} req/s  "
                          f"TTFT p50 {s['ttft_ms_p50']:.0f} ms  ITL p50 {s['itl_ms_p50']:.1f} ms  errors {r.errors}",
                          file=sys.stderr, flush=True)
    finally:
        for name, srv in servers.items():
            exits[name] = srv.stop()
    meta = {"machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}", "sparse": sparse,
            "max_batch": max_batch, "exit": exits, "wall_s": time.time() - start}
    text = write_report(out, results, servers, args, meta, rss_warm)
    out.with_suffix(".json").write_text(json.dumps({
        "meta": meta, "args": vars(args), "results": [r.summary() for r in results],
        "peak_rss_mib": {k: s.peak_rss / MIB for k, s in servers.items()}, "rss_after_warmup_mib": rss_warm,
    }, indent=2) + "\n")
    print(text)
    print(f"wrote {out} and {out.with_suffix('.json')} in {time.time() - start:.0f} s", file=sys.stderr)
    failed = sum(r.errors for r in results) or any(code != 0 for code in exits.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
