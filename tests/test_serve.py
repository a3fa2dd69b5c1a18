"""`seftc serve` end to end: a real server process on a free loopback port, driven by the real
`openai` client (and httpx for what the client cannot send). One server for the module; the SIGTERM
test starts its own."""
import json
from pathlib import Path
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from click.testing import CliRunner

from conftest import build_tiny_model, tiny_tokenizer

KEY = "test-key"
NAME = "tiny70"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PROMPT = "Shall I compare thee"
MAX_TOKENS = 900  # the server's --max-tokens; the tiny model's context is 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny llama (fp32, fixed seed) with a 1024-token context and a chat template, 70% pruned."""
    from seftc.prune.api import prune

    root = tmp_path_factory.mktemp("serve")
    model = build_tiny_model("llama")
    model.config.max_position_embeddings = 1024
    model.config.eos_token_id = model.generation_config.eos_token_id = 0  # the tokenizer's <eos>
    model.save_pretrained(root / "dense")
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(root / "dense")
    prune(str(root / "dense"), output=root / NAME, method="magnitude", sparsity=0.7)
    return root / NAME


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder, *args):
        import tempfile

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "seftc.cli.main", "serve", str(folder), "--port", str(self.port), *args]
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")  # a file, not a pipe nobody drains
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"seftc serve exited {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError("seftc serve did not become healthy")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def client(self, key=KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + " ") or line.startswith(name + "{"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(model_dir):
    srv = Server(model_dir, "--api-key", KEY, "--model-name", NAME, "--max-batch", "2", "--max-queue", "1",
                 "--max-tokens", str(MAX_TOKENS))
    yield srv
    assert srv.stop() == 0


def _until(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _generate(folder, *extra):
    from seftc.cli.generate import generate

    r = CliRunner().invoke(generate, [str(folder), "--prompt", PROMPT, "--json", *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _stream_text(stream) -> tuple[list[str], str | None]:
    pieces, finish = [], None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        text = choice.text if hasattr(choice, "text") else (choice.delta.content or "")
        if choice.finish_reason is None:
            pieces.append(text)
        finish = choice.finish_reason or finish
    return pieces, finish


def test_models_and_health_on_loopback(server):
    assert [m.id for m in server.client().models.list()] == [NAME]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok"
    assert f"listening on http://127.0.0.1:{server.port}" in server.output()  # no --host: loopback only
    assert "sparse runtime, 14 sparse layers" in server.output()


def test_greedy_completion_is_seftc_generate(server, model_dir):
    expected = _generate(model_dir, "--max-new-tokens", "12")
    r = server.client().completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == expected["text"]
    assert r.usage.completion_tokens == len(expected["tokens"]) and r.choices[0].finish_reason == "length"


def test_streamed_completion_is_one_chunk_per_token_and_same_text(server):
    client = server.client()
    whole = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0)
    pieces, finish = _stream_text(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0,
                                                            stream=True))
    assert len(pieces) == 20 and "".join(pieces) == whole.choices[0].text and finish == "length"


def test_chat_streamed_and_not_follow_the_chat_template(server, model_dir):
    expected = _generate(model_dir, "--max-new-tokens", "10", "--chat")
    client = server.client()
    messages = [{"role": "user", "content": PROMPT}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected["text"]
    pieces, finish = _stream_text(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10,
                                                                 temperature=0, stream=True))
    # the first chunk carries the role; then one per token
    assert "".join(pieces) == expected["text"] and len(pieces) == 1 + 10 and finish == "length"


def test_seed_makes_sampling_repeatable(server):
    client = server.client()
    ask = lambda seed: client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=1.0,  # noqa: E731
                                                 seed=seed, extra_body={"ignore_eos": True}).choices[0].text
    assert ask(5) == ask(5)


def test_two_concurrent_streams_equal_each_alone(server):
    client = server.client()
    long_args = dict(model=NAME, prompt=PROMPT, max_tokens=400, temperature=0, extra_body={"ignore_eos": True})
    short_args = dict(model=NAME, prompt="Rough winds do shake", max_tokens=24, temperature=0)
    long_alone = client.completions.create(**long_args).choices[0].text
    short_alone = client.completions.create(**short_args).choices[0].text
    peak_before = server.metric("seftc_engine_peak_batch")
    long_stream = client.completions.create(stream=True, **long_args)
    first = next(iter(long_stream))  # the long one is decoding; the short one joins its batch
    short_pieces, _ = _stream_text(client.completions.create(stream=True, **short_args))
    rest, _ = _stream_text(long_stream)
    assert "".join(short_pieces) == short_alone
    assert first.choices[0].text + "".join(rest) == long_alone
    assert server.metric("seftc_engine_peak_batch") == 2 >= peak_before


def _post(server, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", headers=headers, timeout=60,
                      **({"content": raw} if raw is not None else {"json": body}))


BAD = [  # (what, path, body or raw text, status, param)
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("malformed JSON", "/v1/completions", '{"model": "tiny70", "prompt": ', 400, None),
    ("not an object", "/v1/completions", "[1, 2]", 400, None),
    ("max_tokens 0", "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", "/v1/chat/completions",
     {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": -3}, 400, "max_tokens"),
    ("max_tokens above the limit", "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": MAX_TOKENS + 1}, 400,
     "max_tokens"),
    ("prompt longer than the context", "/v1/completions", {"model": NAME, "prompt": "Shall I " * 600}, 400, "prompt"),
    ("prompt and max_tokens beyond the context", "/v1/completions",
     {"model": NAME, "prompt": list(range(1, 200)), "max_tokens": MAX_TOKENS}, 400, "max_tokens"),
    ("prompt of the wrong type", "/v1/completions", {"model": NAME, "prompt": 42}, 400, "prompt"),
    ("max_tokens a string", "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("temperature out of range", "/v1/completions", {"model": NAME, "prompt": "x", "temperature": 5}, 400, "temperature"),
    ("token id outside the vocabulary", "/v1/completions", {"model": NAME, "prompt": [1, 99999]}, 400, "prompt"),
    ("missing prompt", "/v1/completions", {"model": NAME}, 400, "prompt"),
    ("no messages", "/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("unknown role", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages"),
    ("n above 1", "/v1/completions", {"model": NAME, "prompt": "x", "n": 3}, 400, "n"),
    ("unknown route", "/v1/embeddings", {"model": NAME, "input": "x"}, 404, None),
]


def test_bad_requests_get_openai_errors_and_leave_the_batch_alone(server):
    client = server.client()
    args = dict(model=NAME, prompt=PROMPT, max_tokens=300, temperature=0, extra_body={"ignore_eos": True})
    alone = client.completions.create(**args).choices[0].text
    stream = client.completions.create(stream=True, **args)
    first = next(iter(stream))
    for what, path, body, status, param in BAD:
        r = _post(server, path, None if isinstance(body, str) else body, raw=body if isinstance(body, str) else None)
        assert r.status_code == status, (what, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], what
        assert err["type"] == "invalid_request_error" and err["param"] == param, (what, err)
        assert "Traceback" not in r.text
    rest, finish = _stream_text(stream)
    assert first.choices[0].text + "".join(rest) == alone and finish == "length"


def test_the_client_raises_the_right_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x", max_tokens=0)
    assert e.value.status_code == 400 and e.value.body["param"] == "max_tokens"


def test_api_key_is_required(server):
    with pytest.raises(openai.AuthenticationError) as e:
        server.client(key="wrong").completions.create(model=NAME, prompt="x", max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = _post(server, "/v1/completions", {"model": NAME, "prompt": "x"}, key=None)
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server.url}/health").status_code == 200  # health and metrics stay open


def test_a_client_that_disconnects_mid_stream_is_dropped(server):
    cancelled = server.metric("seftc_requests_cancelled_total")
    tokens = server.metric("seftc_generation_tokens_total")
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=body,
                         headers={"Authorization": f"Bearer {KEY}"}) as r:
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data: ")
                if got == 3:
                    break  # leaving the block closes the connection mid-stream
    assert _until(lambda: server.metric("seftc_requests_cancelled_total") == cancelled + 1)
    assert _until(lambda: server.metric("seftc_requests_running") == 0)
    assert server.metric("seftc_generation_tokens_total") - tokens < MAX_TOKENS
    assert server.client().completions.create(model=NAME, prompt="x", max_tokens=3, temperature=0).choices


def test_overload_answers_429(server):
    """--max-batch 2 --max-queue 1: two running, one waiting, the next is refused."""
    client = server.client()
    args = dict(model=NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    streams = [client.completions.create(stream=True, **args) for _ in range(2)]
    for s in streams:
        next(iter(s))
    waiting = []
    t = threading.Thread(target=lambda: waiting.append(client.completions.create(**args)))
    t.start()
    try:
        assert _until(lambda: server.metric("seftc_requests_waiting") == 1)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=NAME, prompt="x", max_tokens=2)
        assert e.value.status_code == 429 and e.value.body["code"] == "rate_limit_exceeded"
    finally:
        for s in streams:
            s.close()
        t.join(120)
    assert waiting and waiting[0].usage.completion_tokens == MAX_TOKENS
    assert _until(lambda: server.metric("seftc_requests_running") == 0)


def test_metrics_in_prometheus_text(server):
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("seftc_requests_total", "seftc_prompt_tokens_total", "seftc_generation_tokens_total",
                 "seftc_requests_waiting", "seftc_time_to_first_token_seconds_bucket",
                 "seftc_inter_token_latency_seconds_bucket"):
        assert f"\n{name}" in text, name
    assert server.metric("seftc_time_to_first_token_seconds_count") >= 1


def test_sigterm_drains_in_flight_requests_then_exits_0(model_dir):
    srv = Server(model_dir)
    try:
        stream = srv.client().completions.create(model=NAME, prompt=PROMPT, max_tokens=300, temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True})
        first = next(iter(stream))
        srv.proc.send_signal(signal.SIGTERM)
        rest, finish = _stream_text(stream)
        assert len(rest) + 1 == 300 and finish == "length" and first.choices
        assert srv.proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{srv.url}/health")
    finally:
        srv.stop()


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "seftc.cli.main", *args], capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout, r.stderr


def test_help_lists_serve_without_importing_torch_or_fastapi():
    code = ("import sys\nfrom seftc.cli.main import cli\ntry:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert not {'torch', 'fastapi', 'uvicorn'} & set(sys.modules), sorted(sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "serve" in r.stdout


@pytest.mark.parametrize("args, expect", [
    (["/no/such/model"], "does not exist"),
    (["{model}", "--dtype", "float16"], "float16 needs --device cuda"),
    (["{model}", "--port", "{busy}"], "choose another --port"),
])
def test_serve_bad_input_is_one_line_exit_2(args, expect, model_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        argv = [a.format(model=model_dir, busy=busy.getsockname()[1]) for a in args]
        code, _, err = _cli("serve", *argv)
    assert code == 2 and expect in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_load_generator_and_report(server, tmp_path):
    """`make bench-serve`'s load generator against this module's server, and its report."""
    import asyncio
    from types import SimpleNamespace

    bench = _bench_module()
    target = SimpleNamespace(name=NAME, url=server.url, rss=lambda: 100 << 20, peak_rss=120 << 20)
    headers = {"Authorization": f"Bearer {KEY}"}
    results = []
    for label, conc in (("dense", 1), ("sparse", 1), ("dense", 2), ("sparse", 2)):
        r = asyncio.run(bench.run_level(target, [[5, 6, 7, 8], [9, 10, 11]], conc, 3, 4, headers))
        assert r.errors == 0 and r.output_tokens == 12 and len(r.ttft_ms) == 3 and len(r.itl_ms) == 9
        assert 1.0 <= r.mean_batch <= conc  # read from the server's /metrics around the level
        r.model = label
        results.append(r)
    args = SimpleNamespace(dense="D", prompt_tokens=4, new_tokens=4, rounds=1)
    meta = {"machine": "test", "sparse": "S", "max_batch": 2, "exit": {"dense": 0, "sparse": 0}}
    text = bench.write_report(tmp_path / "serve.md", results, {"dense": target, "sparse": target}, args, meta,
                              {"dense": 100.0, "sparse": 100.0})
    assert (tmp_path / "serve.md").read_text() == text
    assert "| sparse | 2 | 3 |" in text and "zero errors: met (0)" in text and "concurrency 1, sparse" in text


@pytest.mark.slow
def test_bench_serve_script_end_to_end(model_dir, tmp_path):
    """The whole script on tiny folders (two servers, pruning skipped): `make test-slow`."""
    from conftest import _TEXT

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_TEXT)
    out = tmp_path / "serve.md"
    r = subprocess.run([sys.executable, "bench/bench_serve.py", "--dense", str(model_dir.parent / "dense"),
                        "--sparse", str(model_dir), "--concurrency", "1,2", "--requests", "2", "--new-tokens", "4",
                        "--prompt-tokens", "8", "--text", str(corpus), "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=str(Path(__file__).resolve().parents[1]))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "zero errors: met (0)" in out.read_text() and json.loads(out.with_suffix(".json").read_text())["results"]


def test_compress_serve_stage_reports_latency(tiny_dir, tmp_path):
    """`seftc compress` with a `serve:` stage: the packed model behind the real server, in the report."""
    from seftc.compress.pipeline import compress
    from seftc.compress.recipe import recipe_from_dict

    text = str(Path(__file__).with_name("data") / "sonnets.txt")
    recipe = recipe_from_dict({"model": {"path": str(tiny_dir)},
                               "prune": {"method": "magnitude", "sparsity": 0.7, "calib": text, "nsamples": 2, "seqlen": 16},
                               "repair": False, "pack": {"format": "auto"}, "export": False, "bench": False, "eval": False,
                               "serve": {"requests": 3, "concurrency": 2, "max_tokens": 4}})
    result = compress(recipe=recipe, run_dir=tmp_path / "run")
    srv = result.report["serve"]
    assert srv["model"] == "packed" and srv["runtime"] == "sparse" and srv["sparse_layers"] > 0
    assert srv["errors"] == 0 and srv["latency_ms"]["p50"] > 0 and srv["ttft_ms"]["max"] <= srv["latency_ms"]["max"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Serving smoke test" in md and "| 3 | 0 |" in md
    assert recipe_from_dict({}).serve is None  # off unless a recipe asks for it
