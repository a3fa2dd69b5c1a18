"""Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, compared within each output row."""
from __future__ import annotations

import torch

from seftc.prune.masks import Pattern, nm_mask, unstructured_mask


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """`input_sq_norm[j]` is the sum over calibration tokens of x_j^2."""
    return weight.detach().abs().float() * input_sq_norm.float().sqrt()[None, :]


def wanda_mask(weight: torch.Tensor, input_sq_norm: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    scores = wanda_scores(weight, input_sq_norm)
    if pattern.is_nm:
        return nm_mask(scores, pattern)
    return unstructured_mask(scores, sparsity, per_row=True)
