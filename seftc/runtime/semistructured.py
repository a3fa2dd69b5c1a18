"""2:4 prefill on CUDA through torch's semi-structured sparse tensors (cuSPARSELt, or CUTLASS where
cuSPARSELt is missing). Verified on GPU: not yet (`make gpu-check` runs the checks on a GPU).

Decode (1..8 tokens) always runs the bitmap kernel of `seftc::sparse_linear`. For larger token
batches (prefill) a 2:4 `SparseLinear` on CUDA in float16/bfloat16, whose shape torch's backend
accepts, may also keep a semi-structured copy of its weight. Whether it does is decided per layer
shape and dtype by timing both at conversion: `F.linear` with the semi-structured weight against
`F.linear` with the dense weight (cuBLAS) on a representative batch (2048 tokens by default).

Decisions:
- The copy is kept only when it beats the dense matmul itself (`choose_prefill`), not merely the
  decompress + matmul that prefill runs without it: it costs about as much memory again as the
  bitmap layout, worth it for a real speedup only. Untimed (unsupported, or conversion failed) and
  ties choose dense.
- Each distinct (rows, cols, dtype) is timed once per call (median of CUDA-event samples after a
  warm-up), so a model pays a few milliseconds per distinct shape.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

PREFILL_TOKENS = 2048
HALF_DTYPES = (torch.float16, torch.bfloat16)
# The strictest of torch's fp16/bf16 constraints (CUTLASS: rows % 32, cols % 64; cuSPARSELt: 16, 16),
# used when torch does not expose its own table.
FALLBACK_MIN_SHAPE = (32, 64)

Choice = Literal["semi-structured", "dense"]


def choose_prefill(semi_ms: float | None, dense_ms: float | None, min_speedup: float = 1.0) -> Choice:
    """'semi-structured' when it was timed and dense_ms / semi_ms > min_speedup; 'dense' otherwise
    (not timed, a non-positive or NaN time, a tie, or slower)."""
    if semi_ms is None or dense_ms is None or not semi_ms > 0 or not dense_ms > 0:
        return "dense"
    return "semi-structured" if dense_ms / semi_ms > min_speedup else "dense"


def shape_allowed(rows: int, cols: int, min_rows: int, min_cols: int) -> bool:
    """torch's rule for the sparse operand: each dimension at least, and a multiple of, its minimum."""
    return rows >= min_rows and cols >= min_cols and rows % min_rows == 0 and cols % min_cols == 0


def backend_class() -> Any:
    """The SparseSemiStructuredTensor subclass to build with: cuSPARSELt when this torch has it,
    CUTLASS otherwise (`to_sparse_semi_structured` would pick cuSPARSELt without checking)."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is not None and cusparselt.is_available() and not torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS:
        return SparseSemiStructuredTensorCUSPARSELT
    return SparseSemiStructuredTensorCUTLASS


def min_shape(cls: Any, dtype: torch.dtype) -> tuple[int, int] | None:
    """(min_rows, min_cols) of the sparse operand for `dtype` under backend `cls`; None: unsupported."""
    table = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", None)
    if table is None:
        return FALLBACK_MIN_SHAPE if dtype in HALF_DTYPES else None
    config = table.get(dtype)
    return None if config is None else (int(config.sparse_min_rows), int(config.sparse_min_cols))


def unsupported_reason(kind: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device,
                       limits: tuple[int, int] | None) -> str | None:
    """Why a layer cannot have a semi-structured prefill weight, or None when it can (pure)."""
    if kind != "2:4":
        return f"layout {kind}, not 2:4"
    if device.type != "cuda":
        return f"on {device.type}, not CUDA"
    if dtype not in HALF_DTYPES:
        return f"{str(dtype).replace('torch.', '')}, not float16/bfloat16"
    if limits is None:
        return "dtype not supported by torch's semi-structured backend"
    if not shape_allowed(rows, cols, *limits):
        return f"shape {rows}x{cols} is not a multiple of {limits[0]}x{limits[1]}"
    return None


def cuda_time_ms(fn: Callable[[], Any], repeats: int = 10, warmup: int = 3) -> float:
    """Median time of `fn` in milliseconds, by CUDA events, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


@dataclass
class PrefillDecision:
    name: str
    shape: tuple[int, int]
    dtype: str
    choice: Choice
    semi_ms: float | None = None
    dense_ms: float | None = None
    reason: str = ""  # why it stays dense without timing, or what failed

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "choice": self.choice,
                "semi_ms": self.semi_ms, "dense_ms": self.dense_ms, "reason": self.reason}


def time_prefill(weight: torch.Tensor, semi: torch.Tensor, tokens: int = PREFILL_TOKENS, repeats: int = 10) -> tuple[float, float]:
    """(semi_ms, dense_ms): `F.linear` on `tokens` random rows with the semi-structured and the dense weight."""
    x = torch.randn(tokens, weight.shape[1], device=weight.device, dtype=weight.dtype)
    linear = torch.nn.functional.linear
    with torch.inference_mode():
        semi_ms = cuda_time_ms(lambda: linear(x, semi), repeats)
        dense_ms = cuda_time_ms(lambda: linear(x, weight), repeats)
    return semi_ms, dense_ms


def decide_layer(name: str, layer: Any, tokens: int = PREFILL_TOKENS, min_speedup: float = 1.0,
                 timings: dict[tuple[int, int, torch.dtype], tuple[float, float]] | None = None) -> tuple[PrefillDecision, torch.Tensor | None]:
    """Decide one `SparseLinear`: (decision, the semi-structured weight to keep or None).
    `timings` caches (semi_ms, dense_ms) per (rows, cols, dtype) across layers."""
    rows, cols = layer.out_features, layer.in_features
    dtype, device = layer.values.dtype, layer.values.device
    label = str(dtype).replace("torch.", "")
    cls = backend_class() if device.type == "cuda" else None
    reason = unsupported_reason(layer.kind, rows, cols, dtype, device, min_shape(cls, dtype) if cls is not None else None)
    if reason is not None:
        return PrefillDecision(name, (rows, cols), label, "dense", reason=reason), None
    try:
        weight = layer.layout.to_dense().contiguous()
        semi = cls.from_dense(weight)
        key = (rows, cols, dtype)
        if timings is not None and key in timings:
            semi_ms, dense_ms = timings[key]
        else:
            semi_ms, dense_ms = time_prefill(weight, semi, tokens)
            if timings is not None:
                timings[key] = (semi_ms, dense_ms)
    except Exception as e:  # backend missing at run time, arch without sparse tensor cores, ...
        return PrefillDecision(name, (rows, cols), label, "dense", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"), None
    choice = choose_prefill(semi_ms, dense_ms, min_speedup)
    return PrefillDecision(name, (rows, cols), label, choice, semi_ms, dense_ms), (semi if choice == "semi-structured" else None)
