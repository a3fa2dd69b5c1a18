"""Dispatch that never loses: for each sparse layer and number of tokens (rows of x), the faster of
its two paths on this machine — its sparse kernel, or its weight decompressed into a reused scratch
buffer followed by the dense GEMM (`F.linear`: torch's oneDNN / MKL path, bf16 dot products where
the CPU has them).

How the choice is made — **measured, not modelled**. The first time a layer of a new *class* runs in
`auto` mode, both paths are timed on that layer's own weight at a ladder of token counts
(`LADDER`: 1, 2, 4, … 1024), alternating, best of `REPEATS` samples each; a rung goes to the dense
path only when it is more than `TIE` faster (sparse reads fewer bytes, which a loaded server values).
The ladder stops early once one call takes longer than `CALL_BUDGET_S`; larger rungs keep the last
measured decision. A call with T tokens takes the decision of the rung nearest T on a log scale
(beyond the last rung, the last rung's). No cost model is fitted: the measured table is the decision.

A class is: the machine (CPU model, the kernels' active instruction set, torch version, kernel
source digest, torch threads), the layout (`LayoutPaths.name`), x's and the weight's dtypes, the
shape (out × in) and the density (nearest `DENSITY_STEP`). Measured tables are cached on disk in
`$SEFTC_DISPATCH_CACHE/dispatch.json` (default: `dispatch/` under the seftc cache, `$SEFTC_CACHE` or
~/.cache/seftc), so a machine measures each class once. An unreadable or corrupt cache is ignored
with one note on stderr (and rewritten); an unwritable one keeps the decisions for this process only,
with one note. `calibrate(model, remeasure=True)` measures again (benchmarks do, on a quiet machine).

Forcing a path: `SEFTC_DISPATCH=sparse|dense|auto` (read once, at first use) or `forced(mode)`
(tests, benchmarks). A call whose x requires grad (with grad enabled) always takes the sparse
kernel in `auto`, and a forced dense path then decompresses into a fresh tensor, never the scratch.

Layout-agnostic: a layout plugs in with a `LayoutPaths` (its kernel and its "decompress into this
buffer"); `seftc.runtime.ops` defines the bitmask one (2:4 uses the same layout).

Scratch: one flat buffer per (dtype, device, inference mode) per thread, grown to the largest
weight decompressed so far and viewed as [rows, cols]: one weight's worth of memory, shared by
every layer and shape, reused on every call (it also stays hot in cache).
"""
from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from seftc.errors import SeftcError
from seftc.runtime import cpu

MODES = ("auto", "sparse", "dense")
ENV_MODE = "SEFTC_DISPATCH"
ENV_CACHE = "SEFTC_DISPATCH_CACHE"
CACHE_FILE = "dispatch.json"
CACHE_FORMAT = "seftc-dispatch"
CACHE_VERSION = 1
LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
REPEATS = 3
TIE = 0.03  # dense must be this much faster to be chosen
SAMPLE_S = 0.001  # a timing sample repeats a call until it lasts about this long
CALL_BUDGET_S = 0.1  # stop climbing the ladder once one call of either path takes longer
DENSITY_STEP = 0.05


def _always(x: torch.Tensor, *weight: torch.Tensor) -> bool:
    return True


@dataclass(frozen=True)
class LayoutPaths:
    """What the dispatcher needs from a layout, whose weight is a tuple of tensors: `name` (part of
    the cache key); the sparse kernel `kernel(x, *weight, bias) -> y`; `decompress(*weight, out)`,
    filling `out` ([rows, cols], float32 or bfloat16, contiguous) with the dense weight in out's
    dtype; `describe(*weight) -> (rows, stored values, weight dtype)`; and `accepts(x, *weight)`,
    False for calls not to dispatch at all (they go to the kernel, which raises its own errors)."""

    name: str
    kernel: Callable[..., torch.Tensor]
    decompress: Callable[..., None]
    describe: Callable[..., tuple[int, int, torch.dtype]]
    accepts: Callable[..., bool] = _always


@dataclass(frozen=True)
class Plan:
    """A measured table for one class: per rung, the best time of each path, and the choices."""

    tokens: tuple[int, ...]
    sparse_ms: tuple[float, ...]
    dense_ms: tuple[float, ...]
    rungs: tuple[str, ...] = field(init=False, compare=False)  # the choice at each rung
    bounds: tuple[float, ...] = field(init=False, compare=False, repr=False)  # geometric midpoints between rungs

    def __post_init__(self) -> None:
        if not (self.tokens and len(self.tokens) == len(self.sparse_ms) == len(self.dense_ms)):
            raise ValueError("a plan needs one sparse and one dense time per rung")
        if any(b <= a for a, b in zip(self.tokens, self.tokens[1:])) or self.tokens[0] < 1:
            raise ValueError("a plan's rungs must be increasing token counts >= 1")
        if not all(math.isfinite(t) and t >= 0 for t in (*self.sparse_ms, *self.dense_ms)):
            raise ValueError("a plan's times must be finite and >= 0")
        object.__setattr__(self, "rungs", tuple(rung_path(s, d) for s, d in zip(self.sparse_ms, self.dense_ms)))
        object.__setattr__(self, "bounds", tuple(math.sqrt(a * b) for a, b in zip(self.tokens, self.tokens[1:])))

    def path(self, tokens: int) -> str:
        """'sparse' or 'dense' for a call with `tokens` rows of x: the rung nearest on a log scale
        (the lower one on a tie; the last beyond the ladder)."""
        return self.rungs[bisect.bisect_left(self.bounds, tokens)]

    def to_json(self) -> dict[str, Any]:
        return {"tokens": list(self.tokens), "sparse_ms": list(self.sparse_ms), "dense_ms": list(self.dense_ms)}

    @classmethod
    def from_json(cls, data: Any) -> "Plan":
        if not isinstance(data, dict) or set(data) != {"tokens", "sparse_ms", "dense_ms"}:
            raise ValueError("an entry needs exactly tokens, sparse_ms and dense_ms")
        tokens, sparse, dense = data["tokens"], data["sparse_ms"], data["dense_ms"]
        if not all(isinstance(v, list) for v in (tokens, sparse, dense)):
            raise ValueError("tokens, sparse_ms and dense_ms must be lists")
        if not all(type(t) is int for t in tokens) or not all(type(t) in (int, float) for t in (*sparse, *dense)):
            raise ValueError("token counts must be integers and times numbers")
        return cls(tuple(tokens), tuple(float(t) for t in sparse), tuple(float(t) for t in dense))


def rung_path(sparse_ms: float, dense_ms: float) -> str:
    """The choice at one rung: dense only when it is more than TIE faster."""
    return "dense" if dense_ms < sparse_ms * (1 - TIE) else "sparse"


# --- mode --------------------------------------------------------------------------------------
_forced: str | None = None
_env: str | None = None
_generation = 0  # bumped whenever a memoised route may have changed (mode, plans, instruction set)


def invalidate() -> None:
    """Make every layer's `Router` choose again at its next call."""
    global _generation
    _generation += 1


def mode() -> str:
    """'auto', 'sparse' or 'dense': `forced()` inside its block, else SEFTC_DISPATCH (read once)."""
    global _env
    if _forced is not None:
        return _forced
    if _env is None:
        raw = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
        if raw not in MODES:
            raise SeftcError(f"{ENV_MODE}={raw!r}: choose one of {', '.join(MODES)} (or unset it for auto)")
        _env = raw
    return _env


@contextlib.contextmanager
def forced(which: str) -> Iterator[str]:
    """Run every sparse layer on one path inside the block (process-wide): 'sparse', 'dense' or 'auto'."""
    global _forced
    if which not in MODES:
        raise ValueError(f"dispatch mode {which!r}: choose one of {', '.join(MODES)}")
    before = _forced
    _forced = which
    invalidate()
    try:
        yield which
    finally:
        _forced = before
        invalidate()


# --- scratch -----------------------------------------------------------------------------------
_local = threading.local()


def scratch(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's reused [rows, cols] buffer of `dtype` on `device` (contents undefined). One flat
    buffer per (dtype, device, inference mode) backs every shape; a bigger shape grows it."""
    pool: dict = _local.__dict__.setdefault("pool", {})
    key = (dtype, device, torch.is_inference_mode_enabled())
    entry = pool.get(key)
    need = rows * cols
    if entry is None or entry[0].numel() < need:
        entry = (torch.empty(max(need, 1), dtype=dtype, device=device), {})
        pool[key] = entry
    view = entry[1].get((rows, cols))
    if view is None:
        view = entry[0][:need].view(rows, cols)
        entry[1][(rows, cols)] = view
    return view


def scratch_nbytes() -> int:
    """Bytes this thread's scratch buffers hold."""
    pool: dict = _local.__dict__.get("pool", {})
    return sum(flat.numel() * flat.element_size() for flat, _ in pool.values())


def dense(paths: LayoutPaths, x: torch.Tensor, weight: Sequence[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """The decompress + dense GEMM path, computed in the wider of x's and the weight's dtypes (the
    kernel never rounds a float32 weight to bfloat16 either), returned in x's dtype."""
    rows, _, weight_dtype = paths.describe(*weight)
    cols = x.shape[-1]
    dtype = torch.promote_types(x.dtype, weight_dtype)
    if torch.is_grad_enabled() and x.requires_grad:  # autograd keeps the weight: never hand it the scratch
        buf = torch.empty(rows, cols, dtype=dtype, device=x.device)
    else:
        buf = scratch(rows, cols, dtype, x.device)
    paths.decompress(*weight, buf)
    y = torch.nn.functional.linear(x.to(dtype), buf, None if bias is None else bias.to(dtype))
    return y.to(x.dtype)


def run(paths: LayoutPaths, x: torch.Tensor, weight: Sequence[torch.Tensor], bias: torch.Tensor | None,
        path: str | None = None) -> torch.Tensor:
    """y = x @ W^T + bias on the path `path` ('sparse' | 'dense'), or the one `choose` picks."""
    if path is None:
        path = choose(paths, x, weight)
    if path == "dense":
        return dense(paths, x, weight, bias)
    if path != "sparse":
        raise ValueError(f"path {path!r}: choose 'sparse' or 'dense'")
    return paths.kernel(x, *weight, bias)


class Router:
    """One layer's memo of `choose`: per (x dtype, x size, threads) the path, so that a layer's
    forward costs one dict lookup beyond its kernel. Calls that autograd records are not memoised."""

    __slots__ = ("paths", "_routes", "_generation")

    def __init__(self, paths: LayoutPaths):
        self.paths = paths
        self._routes: dict[tuple, str] = {}
        self._generation = _generation

    def reset(self) -> None:
        self._routes.clear()

    def __call__(self, x: torch.Tensor, weight: Sequence[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return run(self.paths, x, weight, bias)
        if self._generation != _generation:
            self._routes.clear()
            self._generation = _generation
        key = (x.dtype, x.numel(), torch.get_num_threads())
        path = self._routes.get(key)
        if path is None:
            path = choose(self.paths, x, weight)
            if len(self._routes) >= 256:
                self._routes.clear()
            self._routes[key] = path
        if path == "dense":
            return dense(self.paths, x, weight, bias)
        return self.paths.kernel(x, *weight, bias)


# --- choosing ----------------------------------------------------------------------------------
_plans: dict[tuple, Plan] = {}
_lock = threading.RLock()


def density_bucket(stored: int, rows: int, cols: int) -> float:
    density = stored / max(1, rows * cols)
    return round(round(min(max(density, 0.0), 1.0) / DENSITY_STEP) * DENSITY_STEP, 2)


def class_key(paths: LayoutPaths, x_dtype: torch.dtype, weight: Sequence[torch.Tensor], cols: int) -> tuple:
    """The in-process key of a class (the machine part is added on disk)."""
    from seftc.runtime import ops

    ops.backend()  # the kernels' instruction set is part of the key: load them first
    rows, stored, weight_dtype = paths.describe(*weight)
    return (paths.name, x_dtype, weight_dtype, rows, cols, density_bucket(stored, rows, cols), torch.get_num_threads(), cpu.isa())


def choose(paths: LayoutPaths, x: torch.Tensor, weight: Sequence[torch.Tensor]) -> str:
    """'sparse' or 'dense' for this call (measuring the class first if it is new)."""
    which = mode()
    if which != "auto":
        return which
    if (torch.is_grad_enabled() and x.requires_grad) or not paths.accepts(x, *weight):
        return "sparse"
    cols = x.shape[-1]
    tokens = x.numel() // cols if cols else 0
    key = class_key(paths, x.dtype, weight, cols)
    if tokens == 0 or key[3] == 0:
        return "sparse"
    plan = _plans.get(key)
    if plan is None:
        plan = plan_for(paths, key, weight, x.device)
    return plan.path(tokens)


def plan_for(paths: LayoutPaths, key: tuple, weight: Sequence[torch.Tensor], device: torch.device, remeasure: bool = False) -> Plan:
    """The plan of a class: from memory, the disk cache, or measured now (and cached)."""
    with _lock:
        plan = None if remeasure else _plans.get(key)
        if plan is not None:
            return plan
        disk = _disk_key(key)
        if not remeasure:
            plan = _read_cache().get(disk)
        if plan is None:
            _note_once("measuring", f"timing the sparse kernel against decompress + dense for this machine "
                                    f"(once per layer shape and dtype; cached in {cache_path()})")
            plan = measure(paths, weight, x_dtype=key[1], cols=key[4], device=device)
            _write_cache(disk, plan)
        _plans[key] = plan
        invalidate()
        return plan


def measure(paths: LayoutPaths, weight: Sequence[torch.Tensor], *, x_dtype: torch.dtype, cols: int,
            device: torch.device | str = "cpu", ladder: Sequence[int] = LADDER) -> Plan:
    """Time both paths on `weight` at each rung of `ladder` (alternating; best of REPEATS)."""
    gen = torch.Generator().manual_seed(0)
    tokens: list[int] = []
    sparse_ms: list[float] = []
    dense_ms: list[float] = []
    with torch.inference_mode():
        for t in ladder:
            x = torch.randn(t, cols, generator=gen).to(device=device, dtype=x_dtype)
            s, d = _time_pair(lambda: paths.kernel(x, *weight, None), lambda: dense(paths, x, weight, None))
            tokens.append(t)
            sparse_ms.append(s * 1e3)
            dense_ms.append(d * 1e3)
            if max(s, d) > CALL_BUDGET_S:
                break
    return Plan(tuple(tokens), tuple(sparse_ms), tuple(dense_ms))


def _time_pair(a: Callable[[], Any], b: Callable[[], Any]) -> tuple[float, float]:
    """Seconds per call of a and b: each sample repeats a call for about SAMPLE_S, a and b
    alternate, the best of REPEATS samples counts."""
    iters = []
    for fn in (a, b):
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
        iters.append(max(1, min(256, math.ceil(SAMPLE_S / max(once, 1e-7)))))
    best = [math.inf, math.inf]
    for _ in range(REPEATS):
        for i, fn in enumerate((a, b)):
            start = time.perf_counter()
            for _ in range(iters[i]):
                fn()
            best[i] = min(best[i], (time.perf_counter() - start) / iters[i])
    return best[0], best[1]


def calibrate(model: torch.nn.Module, x_dtype: torch.dtype | None = None, remeasure: bool = False) -> list[dict[str, Any]]:
    """Make sure every sparse layer class of `model` (any module with `dispatch_args() -> (paths,
    weight)`, on the CPU) has a plan, measuring new classes (all of them with `remeasure`); x's
    dtype defaults to the weight's (an integer weight's: the model's first float parameter's).
    The fused layers of the model's lean forward (`seftc.runtime.fastpath`, built here if it covers
    the model) are layers the engine runs, so they are measured too.
    Returns one record per class: its key and table (`describe`)."""
    from seftc.runtime import fastpath  # not at the top: fastpath builds on the layers, which use this module

    seen: dict[tuple, Plan] = {}
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    fast = fastpath.for_model(model)
    for module in [*model.modules(), *(fast.linears() if fast is not None else [])]:
        if not callable(getattr(module, "dispatch_args", None)):
            continue
        paths, weight = module.dispatch_args()
        if weight[0].device.type != "cpu":
            continue
        wdtype = paths.describe(*weight)[2]  # an int8 weight's activations: the model's float dtype
        dtype = x_dtype or (wdtype if wdtype.is_floating_point else (floats[0] if floats else torch.float32))
        key = class_key(paths, dtype, weight, module.in_features)
        if key not in seen:
            seen[key] = plan_for(paths, key, weight, weight[0].device, remeasure=remeasure)
    return [describe(key, plan) for key, plan in seen.items()]


def describe(key: tuple, plan: Plan) -> dict[str, Any]:
    layout, x_dtype, w_dtype, rows, cols, density, threads, isa = key
    crossover = next((t for t, p in zip(plan.tokens, plan.rungs) if p == "dense"), None)
    return {"layout": layout, "x_dtype": str(x_dtype).replace("torch.", ""), "weight_dtype": str(w_dtype).replace("torch.", ""),
            "shape": [rows, cols], "density": density, "threads": threads, "isa": isa, **plan.to_json(),
            "paths": list(plan.rungs), "first_dense_tokens": crossover}


def plans() -> list[dict[str, Any]]:
    """The plans this process uses, described (for reports)."""
    with _lock:
        return [describe(k, p) for k, p in _plans.items()]


def forget() -> None:
    """Drop the plans held in memory (the disk cache is re-read at the next need) and the record of
    notes already given."""
    global _cache
    with _lock:
        _plans.clear()
        _noted.clear()
        _cache = None
        invalidate()


# --- the disk cache ----------------------------------------------------------------------------
_cache: dict[str, Plan] | None = None
_noted: set[str] = set()
_machine: str | None = None


def cache_path() -> Path:
    root = os.environ.get(ENV_CACHE)
    if root:
        return Path(root).expanduser() / CACHE_FILE
    from seftc.models.loading import cache_dir

    return cache_dir() / "dispatch" / CACHE_FILE


def machine() -> str:
    """CPU model, torch version and kernel build: the part of a class key that names the machine."""
    global _machine
    if _machine is None:
        import platform

        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        try:
            build = cpu.extension_folder()[0]
        except Exception:  # no sources: the reference build
            build = "no-kernels"
        _machine = f"{model} | {os.cpu_count()} cpus | torch {torch.__version__} | {build}"
    return _machine


def _disk_key(key: tuple) -> str:
    layout, x_dtype, w_dtype, rows, cols, density, threads, isa = key
    return (f"{machine()} | {isa} | threads {threads} | {layout} | x {str(x_dtype).replace('torch.', '')} | "
            f"w {str(w_dtype).replace('torch.', '')} | {rows}x{cols} | density {density:.2f}")


def _note_once(what: str, message: str) -> None:
    if what not in _noted:
        _noted.add(what)
        print(f"seftc: {message}", file=sys.stderr, flush=True)


def _parse(text: str) -> dict[str, Plan]:
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
        raise ValueError(f"not a {CACHE_FORMAT} version {CACHE_VERSION} file")
    entries = data.get("entries")
    if not isinstance(entries, dict):
        raise ValueError("no entries")
    return {str(k): Plan.from_json(v) for k, v in entries.items()}


def _load(path: Path, note: bool) -> dict[str, Plan]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        if note:
            _note_once("unreadable", f"cannot read the dispatch cache {path} ({e.strerror or e}); measuring again")
        return {}
    try:
        return _parse(text)
    except (ValueError, TypeError, RecursionError) as e:
        if note:
            _note_once("corrupt", f"ignoring the dispatch cache {path}: it is corrupt ({str(e).splitlines()[0][:120]}); "
                                  "measuring again and rewriting it")
        return {}


def _read_cache() -> dict[str, Plan]:
    global _cache
    if _cache is None:
        _cache = _load(cache_path(), note=True)
    return _cache


def _write_cache(disk_key: str, plan: Plan) -> None:
    """Add one entry (merged with what another process may have written since); never raises."""
    from seftc.models.saving import atomic_file

    path = cache_path()
    cache = _read_cache()
    cache[disk_key] = plan
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_load(path, note=False), **cache}
        body = {"format": CACHE_FORMAT, "version": CACHE_VERSION,
                "entries": {k: p.to_json() for k, p in sorted(merged.items())}}
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
    except (OSError, SeftcError) as e:
        _note_once("unwritable", f"cannot write the dispatch cache {path} ({getattr(e, 'strerror', None) or e}); "
                                 "decisions are kept for this process only")
