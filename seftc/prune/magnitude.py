"""Magnitude pruning: drop the smallest |W| of each layer (or of each N:M group)."""
from __future__ import annotations

import torch

from seftc.prune.masks import Pattern, nm_mask, unstructured_mask


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    scores = weight.detach().abs().float()
    if pattern.is_nm:
        return nm_mask(scores, pattern)
    return unstructured_mask(scores, sparsity, per_row=False)
