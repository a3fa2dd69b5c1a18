"""Symmetric per-output-row int8 quantization (formats/int8.md): pure math, no I/O.

A row r of a weight W [R, C] becomes int8 values q[r, :] in [-127, 127] and one float32 scale
s[r] = max|W[r, :]| / 127, with q = round-half-to-even(W / s), all in IEEE float32 arithmetic
(no calibration data). A row whose scale would not be a normal float32 (all zero, or all below
~1.5e-36 in magnitude) gets scale +0.0 and q = 0. Decoding is `dtype(float32(q) * s)`.
"""
from __future__ import annotations

import numpy as np
import torch

QMAX = 127  # symmetric: -128 is never used
MIN_SCALE = float(np.finfo(np.float32).tiny)  # the smallest normal float32; smaller scales become 0


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 [R, C], float32 [R]) for a 2-D float tensor, or None when it holds NaN or infinity."""
    x = w.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(x).all()):
        return None
    rows = x.shape[0]
    peak = x.abs().amax(dim=1) if x.shape[1] else torch.zeros(rows)
    scales = peak / QMAX
    scales = torch.where(scales >= MIN_SCALE, scales, torch.zeros_like(scales))
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(x / safe[:, None]).clamp_(-QMAX, QMAX)
    q[scales == 0] = 0
    return q.to(torch.int8), scales.contiguous()


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense tensor int8 q [R, C] and float32 scales [R] stand for: dtype(float32(q) * s)."""
    return (q.to(torch.float32) * scales.to(torch.float32)[:, None]).to(dtype)


def scale_problem(scales: np.ndarray, q_peak: np.ndarray, dtype: torch.dtype) -> str | None:
    """Why float32 `scales` (raw bits, uint32 [R]) with per-row peaks `q_peak` (max |q|, [R]) are
    not the canonical scales of formats/int8.md, or None: each is +0.0 for a row of zeros, or
    a finite normal positive float32 whose row reaches +-127, and 127 * s fits in `dtype`."""
    bits = scales.astype(np.uint32)
    s = bits.view(np.float32)
    zero = bits == 0
    bad = np.flatnonzero(~zero & ~(np.isfinite(s) & (s >= MIN_SCALE)))
    if bad.size:
        return f"row {int(bad[0])} has scale {s[bad[0]]!r}; a scale is +0.0 or a finite positive normal float32"
    bad = np.flatnonzero(zero & (q_peak != 0))
    if bad.size:
        return f"row {int(bad[0])} has scale 0 but stores non-zero values"
    bad = np.flatnonzero(~zero & (q_peak != QMAX))
    if bad.size:
        return f"row {int(bad[0])} peaks at |q| = {int(q_peak[bad[0]])}, not {QMAX} (its scale is not max|w| / 127; non-canonical)"
    if s.size and not bool(torch.isfinite((torch.from_numpy(s.copy()) * QMAX).to(dtype)).all()):
        return f"a scale times {QMAX} overflows {dtype}"
    return None
