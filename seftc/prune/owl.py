"""OWL (Yin et al., 2024): non-uniform per-block sparsity from outlier ratios.

A block's outlier ratio is the share of its Wanda scores |W|·||X|| that exceed `m` times their
layer's mean score. Blocks with more outliers are pruned less: sparsities are spread linearly over
[s − λ, s + λ] by outlier ratio (highest ratio → lowest sparsity), then shifted so that the
parameter-weighted mean equals the requested overall sparsity `s` exactly (up to integer rounding
of per-layer counts).
"""
from __future__ import annotations

import torch

from seftc.errors import SeftcError


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Share of scores above m × their own layer's mean, over all layers of a block."""
    above = sum(int((s > m * s.mean()).sum()) for s in scores)
    total = sum(s.numel() for s in scores)
    return above / max(total, 1)


def allocate(ratios: list[float], params: list[int], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsities with the same parameter-weighted mean as `sparsity`."""
    if not 0 <= lam < 1:
        raise SeftcError(f"OWL lambda must be in [0, 1), got {lam}")
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = r.max() - r.min()
    norm = (r - r.min()) / spread if spread > 0 else torch.zeros_like(r)
    s = sparsity + lam - 2 * lam * norm  # most outliers -> s - lam
    w = torch.tensor(params, dtype=torch.float64)
    s = s + (sparsity - (s * w).sum() / w.sum())
    s = s.clamp(0.0, 0.99)
    return [float(x) for x in s]
