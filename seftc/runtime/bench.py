"""Dense vs sparse timing of the same model in one run: per-layer kernel time, prefill latency,
decode latency per token, memory. Returns result objects; prints nothing.

Dense and sparse are timed alternately (repeat by repeat) so that a change in machine load hits
both; every figure is the median of its samples after `warmup` untimed runs, with its spread
(min, max). Repeats continue past `repeats`, alternately, until the samples settle (interquartile
range within `SETTLED` of the median, for both sides) or `max_repeats` is reached; a figure that
did not settle says so (`settled: false`, with the number of repeats it took).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
from torch import nn

from seftc.errors import SeftcError
from seftc.runtime.convert import is_sparse_linear, model_nbytes, prepare_prefill, weight_bytes_per_token
from seftc.runtime.engine import TransformersRunner, runner_for


@dataclass
class BenchConfig:
    batches: Sequence[int] = (1, 4, 16)
    prompt_tokens: int = 64
    new_tokens: int = 16
    repeats: int = 5
    max_repeats: int | None = None  # None: 3 x repeats
    warmup: int = 2
    layer_batches: Sequence[int] = (1,)
    max_layers: int | None = 7  # per-layer timing for the first N sparse layers (None: all)
    layer_iters: int = 20  # kernel calls per per-layer sample
    layers_in_model: bool = True  # also time every sparse layer inside batch-1 decode steps
    threads: int | None = None
    seed: int = 0


SETTLED = 0.10  # relative interquartile range of a figure's samples below which more repeats change little


def settled(samples: Sequence[float]) -> bool:
    """At least 3 samples whose interquartile range is within SETTLED of their median."""
    if len(samples) < 3:
        return False
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    median = statistics.median(samples)
    return median > 0 and (q3 - q1) / median <= SETTLED


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    n: int
    settled: bool = True

    @classmethod
    def of(cls, samples_s: Sequence[float]) -> "Timing":
        ms = [s * 1e3 for s in samples_s]
        return cls(statistics.median(ms), min(ms), max(ms), len(ms), settled(ms))


@dataclass
class PhaseResult:
    phase: str  # "prefill" | "decode"
    batch: int
    tokens: int  # prompt length (prefill) or generated tokens timed (decode)
    dense: Timing
    sparse: Timing

    @property
    def speedup(self) -> float:
        return self.dense.median_ms / self.sparse.median_ms if self.sparse.median_ms > 0 else float("nan")

    def tokens_per_s(self, which: str) -> float:
        t = (self.dense if which == "dense" else self.sparse).median_ms
        per_step = self.batch if self.phase == "decode" else self.batch * self.tokens
        return per_step / (t / 1e3) if t > 0 else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "phase": self.phase, "batch": self.batch, "tokens": self.tokens,
            "dense_ms": self.dense.median_ms, "sparse_ms": self.sparse.median_ms, "speedup": self.speedup,
            "dense_spread_ms": [self.dense.min_ms, self.dense.max_ms], "sparse_spread_ms": [self.sparse.min_ms, self.sparse.max_ms],
            "dense_tokens_per_s": self.tokens_per_s("dense"), "sparse_tokens_per_s": self.tokens_per_s("sparse"),
            "repeats": self.dense.n, "settled": self.dense.settled and self.sparse.settled,
        }


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, int]
    kind: str
    sparsity: float
    batch: int
    dense: Timing
    sparse: Timing
    dense_bytes: int
    sparse_bytes: int

    @property
    def speedup(self) -> float:
        return self.dense.median_ms / self.sparse.median_ms if self.sparse.median_ms > 0 else float("nan")

    @property
    def byte_bound(self) -> float:
        return self.dense_bytes / self.sparse_bytes

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "layout": self.kind, "sparsity": self.sparsity, "batch": self.batch,
                "dense_ms": self.dense.median_ms, "sparse_ms": self.sparse.median_ms, "speedup": self.speedup,
                "dense_spread_ms": [self.dense.min_ms, self.dense.max_ms], "sparse_spread_ms": [self.sparse.min_ms, self.sparse.max_ms],
                "dense_bytes": self.dense_bytes, "sparse_bytes": self.sparse_bytes, "byte_bound": self.byte_bound,
                "repeats": self.dense.n, "settled": self.dense.settled and self.sparse.settled}


@dataclass
class BenchResult:
    device: str
    dtype: str
    threads: int
    backend: str
    isa: str
    results: list[PhaseResult] = field(default_factory=list)
    layers: list[LayerResult] = field(default_factory=list)  # each kernel alone, weights hot in cache
    layers_in_model: list[LayerResult] = field(default_factory=list)  # timed inside batch-1 decode steps
    memory: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def byte_bound(self) -> float:
        """Dense over sparse weight bytes read per decoded token (LM head and embeddings included)."""
        return self.memory["dense_bytes_per_token"] / self.memory["sparse_bytes_per_token"]

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "dtype": self.dtype, "threads": self.threads, "backend": self.backend, "isa": self.isa,
                "byte_bound": self.byte_bound, "memory": self.memory, "config": self.config,
                "results": [r.to_json() for r in self.results], "layers": [r.to_json() for r in self.layers],
                "layers_in_model": [r.to_json() for r in self.layers_in_model]}


WIDE_SPREAD = 0.5  # (max - min) / median of the repeats above which a median is not trusted
DISTORTION_NOTE = ("a speedup above the byte bound means the two paths did not stream their weights equally fast (the dense "
                   "path below its memory bandwidth, or other processes took the cores while one path ran); repeats more "
                   f"than {WIDE_SPREAD:.0%} of their median apart, or repeats that never settled (interquartile range "
                   f"above {SETTLED:.0%} of the median after --max-repeats), mean other processes took the cores. Rerun `seftc bench` "
                   "on a quiet machine before quoting a flagged figure.")


def speedup_range(row: dict[str, Any]) -> tuple[float, float]:
    """The speedups the repeats allow: slowest dense over fastest sparse and the reverse."""
    (d_lo, d_hi), (s_lo, s_hi) = row["dense_spread_ms"], row["sparse_spread_ms"]
    return (d_lo / s_hi if s_hi > 0 else float("nan"), d_hi / s_lo if s_lo > 0 else float("nan"))


def distortion(row: dict[str, Any], byte_bound: float | None) -> str | None:
    """Why a timed row (a `to_json()` of PhaseResult or LayerResult) cannot be taken at face value:
    a speedup above the byte bound (sparse cannot read fewer bytes than that, so the dense path ran
    below the bandwidth the sparse one reached), repeats that disagree by more than WIDE_SPREAD of
    their median (another process took the cores), or repeats that never settled (see `settled`);
    None if none of these. DISTORTION_NOTE explains them."""
    reasons = []
    if byte_bound and row["speedup"] > byte_bound * 1.02:
        reasons.append(f"{row['speedup']:.2f}× is above the byte bound {byte_bound:.2f}× (dense slower than its bytes explain)")
    for which in ("dense", "sparse"):
        lo, hi = row[f"{which}_spread_ms"]
        median = row[f"{which}_ms"]
        if median > 0 and (hi - lo) / median > WIDE_SPREAD:
            reasons.append(f"{which} repeats spread {lo:.3g}–{hi:.3g} ms around {median:.3g}")
    if row.get("settled") is False:
        reasons.append(f"the repeats had not settled after {row.get('repeats')} rounds")
    return "; ".join(reasons) or None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str) -> Callable[[], float]:
    def run() -> float:
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t

    return run


def _rounds(samplers: dict[str, Callable[[], float]], repeats: int, max_repeats: int | None) -> dict[str, Timing]:
    """Call each sampler once per round, alternately, for `repeats` rounds and then on until every
    side's samples have settled or `max_repeats` rounds are done."""
    limit = max(repeats, max_repeats if max_repeats is not None else 3 * repeats)
    samples: dict[str, list[float]] = {k: [] for k in samplers}
    for n in range(1, limit + 1):
        for k, sample in samplers.items():
            samples[k].append(sample())
        if n >= repeats and all(settled(v) for v in samples.values()):
            break
    return {k: Timing.of(v) for k, v in samples.items()}


def _alternate(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: str,
               max_repeats: int | None = None) -> dict[str, Timing]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    return _rounds({k: _timed(fn, device) for k, fn in fns.items()}, repeats, max_repeats)


def _prefill(model: nn.Module, ids: torch.Tensor) -> Callable[[], Any]:
    return lambda: model(input_ids=ids, use_cache=False)


def _decode_samples(model: nn.Module, ids: torch.Tensor, new_tokens: int, device: str, runner: Any = None) -> list[float]:
    """Prefill `ids`, then time each of `new_tokens` single-token greedy steps, through the decode
    engine's own forward (`seftc.runtime.engine.runner_for`: the lean pass where it covers the model,
    dense and sparse alike), or `runner`."""
    runner = runner if runner is not None else runner_for(model)
    rows, width = ids.shape
    mask = torch.ones_like(ids)
    logits, batch = runner.prefill(ids, mask, torch.arange(width, device=ids.device).expand(rows, width))
    nxt = logits.argmax(-1)
    positions = torch.full((rows,), width, dtype=torch.long, device=ids.device)
    times = []
    for _ in range(new_tokens):
        _sync(device)
        t = time.perf_counter()
        logits = runner.decode(batch, nxt, positions)
        _sync(device)
        times.append(time.perf_counter() - t)
        nxt = logits.argmax(-1)
        positions = positions + 1
    return times


def _decode(dense: nn.Module, sparse: nn.Module, ids: torch.Tensor, cfg: BenchConfig, device: str) -> dict[str, Timing]:
    models = {"dense": dense, "sparse": sparse}
    for _ in range(cfg.warmup):
        for m in models.values():
            _decode_samples(m, ids, min(2, cfg.new_tokens), device)
    return _rounds({k: (lambda m=m: statistics.median(_decode_samples(m, ids, cfg.new_tokens, device))) for k, m in models.items()},
                   cfg.repeats, cfg.max_repeats)


def bench_layers(dense: nn.Module, sparse: nn.Module, cfg: BenchConfig, device: str, dtype: torch.dtype) -> list[LayerResult]:
    dense_modules = dict(dense.named_modules())
    results = []
    layers = [(n, m) for n, m in sparse.named_modules() if is_sparse_linear(m)]
    if cfg.max_layers is not None:
        layers = layers[: cfg.max_layers]
    gen = torch.Generator().manual_seed(cfg.seed)
    for name, sl in layers:
        dl = dense_modules.get(name)
        if dl is None or not hasattr(dl, "weight"):
            continue
        w = dl.weight.detach()
        if type(dl).__name__ == "PackedLinear":
            w = w.to(dtype)
        for batch in cfg.layer_batches:
            x = torch.randn(batch, sl.in_features, generator=gen).to(device=device, dtype=dtype)
            iters = cfg.layer_iters

            def run_dense(x=x, w=w, b=dl.bias):
                for _ in range(iters):
                    nn.functional.linear(x, w, b)

            def run_sparse(x=x):
                for _ in range(iters):
                    sl(x)

            t = _alternate({"dense": run_dense, "sparse": run_sparse}, cfg.repeats, cfg.warmup, device, cfg.max_repeats)
            scale = [replace(v, median_ms=v.median_ms / iters, min_ms=v.min_ms / iters, max_ms=v.max_ms / iters) for v in (t["dense"], t["sparse"])]
            nnz = int((w != 0).sum())
            results.append(LayerResult(name, (sl.out_features, sl.in_features), sl.kind, 1 - nnz / max(1, w.numel()), batch,
                                       scale[0], scale[1], w.numel() * w.element_size(), sl.layout.nbytes))
    return results


def bench_layers_in_model(dense: nn.Module, sparse: nn.Module, cfg: BenchConfig, device: str, vocab: int) -> list[LayerResult]:
    """Per-layer time inside real batch-1 decode steps (forward hooks), where each layer's weights
    come from memory as in serving, not from a cache kept hot by repetition. The steps run through
    transformers' forward, whose separate q/k/v and gate/up layers the hooks can time (the lean
    pass calls fused layers)."""
    names = [n for n, m in sparse.named_modules() if is_sparse_linear(m)]
    dense_modules, sparse_modules = dict(dense.named_modules()), dict(sparse.named_modules())
    times: dict[str, dict[str, list[float]]] = {"dense": {n: [] for n in names}, "sparse": {n: [] for n in names}}
    handles = []
    for which, modules in (("dense", dense_modules), ("sparse", sparse_modules)):
        for n in names:
            start: list[float] = []

            def pre(_m, _a, start=start):
                _sync(device)
                start.append(time.perf_counter())

            def post(_m, _a, _o, start=start, sink=times[which][n]):
                _sync(device)
                sink.append(time.perf_counter() - start.pop())

            handles += [modules[n].register_forward_pre_hook(pre), modules[n].register_forward_hook(post)]
    try:
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        ids = torch.randint(0, vocab, (1, min(cfg.prompt_tokens, 16)), generator=gen).to(device)
        steps = max(2, cfg.new_tokens)
        runners = {"dense": TransformersRunner(dense), "sparse": TransformersRunner(sparse)}
        for which, m in (("dense", dense), ("sparse", sparse)):
            _decode_samples(m, ids, 1, device, runners[which])
        for which in times:
            for n in names:
                times[which][n].clear()
        for _ in range(max(1, cfg.repeats // 2)):
            for which, m in (("dense", dense), ("sparse", sparse)):
                # keep only the decode steps' samples (the prompt pass is the first call of each layer)
                before = {n: len(times[which][n]) for n in names}
                _decode_samples(m, ids, steps, device, runners[which])
                for n in names:
                    del times[which][n][before[n]]
    finally:
        for h in handles:
            h.remove()
    results = []
    for n in names:
        sl, dl = sparse_modules[n], dense_modules[n]
        w = dl.weight.detach()
        nnz = int((w != 0).sum())
        results.append(LayerResult(n, (sl.out_features, sl.in_features), sl.kind, 1 - nnz / max(1, w.numel()), 1,
                                   Timing.of(times["dense"][n]), Timing.of(times["sparse"][n]),
                                   w.numel() * w.element_size(), sl.layout.nbytes))
    return results


@torch.inference_mode()
def run_bench(dense: nn.Module, sparse: nn.Module, cfg: BenchConfig, device: str = "cpu") -> BenchResult:
    """Time `dense` against `sparse` (the same model on the sparse runtime) on `device`."""
    from seftc.eval.multiple_choice import max_length
    from seftc.runtime import cpu, ops

    context = max_length(dense)
    if cfg.new_tokens >= context:
        raise SeftcError(f"--new-tokens {cfg.new_tokens} leaves no room for a prompt in the model's context of {context} tokens")
    if cfg.prompt_tokens + cfg.new_tokens > context:  # capped at the model's context, as prune and eval cap --seqlen
        cfg = replace(cfg, prompt_tokens=context - cfg.new_tokens)
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        dense = dense.to(device).eval()
        sparse = sparse.to(device).eval()
        dtype = next(p for p in dense.parameters() if p.is_floating_point()).dtype
        backend = ops.backend() if device == "cpu" else ops.cuda_backend()
        prefill = prepare_prefill(sparse) if device.startswith("cuda") else []
        result = BenchResult(device=device, dtype=str(dtype).replace("torch.", ""), threads=torch.get_num_threads(),
                             backend=backend, isa=cpu.isa() if device == "cpu" else "n/a", config=asdict(cfg))
        result.config["batches"] = list(cfg.batches)
        result.config["layer_batches"] = list(cfg.layer_batches)
        # the forward end-to-end decode runs (the engine's): "fastpath" (seftc.runtime.fastpath) or "transformers"
        result.config["decode_forward"] = {"dense": runner_for(dense).name, "sparse": runner_for(sparse).name}
        if prefill:  # 2:4 layers on CUDA: semi-structured or dense prefill, with the timings behind the choice
            result.config["prefill_24"] = [d.to_json() for d in prefill]
        result.memory = {
            "dense_model_bytes": model_nbytes(dense), "sparse_model_bytes": model_nbytes(sparse),
            "dense_bytes_per_token": weight_bytes_per_token(dense), "sparse_bytes_per_token": weight_bytes_per_token(sparse),
        }
        vocab = int(getattr(dense.config, "vocab_size", 256))
        gen = torch.Generator().manual_seed(cfg.seed)
        result.layers = bench_layers(dense, sparse, cfg, device, dtype)
        if cfg.layers_in_model:
            result.layers_in_model = bench_layers_in_model(dense, sparse, cfg, device, vocab)
        for batch in cfg.batches:
            ids = torch.randint(0, vocab, (batch, cfg.prompt_tokens), generator=gen).to(device)
            t = _alternate({"dense": _prefill(dense, ids), "sparse": _prefill(sparse, ids)}, cfg.repeats, cfg.warmup, device, cfg.max_repeats)
            result.results.append(PhaseResult("prefill", batch, cfg.prompt_tokens, t["dense"], t["sparse"]))
            t = _decode(dense, sparse, ids, cfg, device)
            result.results.append(PhaseResult("decode", batch, cfg.new_tokens, t["dense"], t["sparse"]))
        return result
    finally:
        torch.set_num_threads(threads_before)


def bench_model(model: str, *, device: str = "cpu", dtype: str = "auto", batches: Sequence[int] = (1, 4, 16),
                repeats: int = 5, trust_remote_code: bool = False, **options: Any) -> BenchResult:
    """`seftc.bench`: load MODEL (pruned or packed folder) dense and sparse, and time both in one run
    (code MODEL's config names runs only with `trust_remote_code`)."""
    from seftc.runtime.convert import load_runtime_pair

    pair = load_runtime_pair(model, dtype, trust_remote_code=trust_remote_code)
    return run_bench(pair.dense, pair.sparse, BenchConfig(batches=tuple(batches), repeats=repeats, **options), device)
