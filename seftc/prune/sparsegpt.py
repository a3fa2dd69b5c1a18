"""SparseGPT (Frantar & Alistarh, 2023): prune column block by column block while updating the
remaining weights to compensate, using the inverse Hessian H^-1 of the layer-wise least-squares
problem (H = 2 X^T X / n).

Our choices: the Hessian is damped by `damp * mean(diag H)`; columns that never see input get
diag 1 (their weights are still pruned by magnitude like any other, so exact counts hold);
unstructured selection is per column block across all rows with the layer's prune count split
exactly over the blocks; N:M selection is per group of M columns inside the block.
"""
from __future__ import annotations

import torch

from seftc.prune.masks import Pattern, lowest_per_row, prune_count, split_counts


def hessian(x: torch.Tensor) -> torch.Tensor:
    """2 X^T X / n for activations `x` shaped [tokens, in]."""
    x = x.reshape(-1, x.shape[-1]).float()
    return (2.0 / x.shape[0]) * (x.T @ x)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    h = h.clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    mean = diag.mean()
    for scale in (damp, damp * 10, damp * 100, 1.0):
        try:
            reg = h + scale * mean * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            inv = torch.cholesky_inverse(torch.linalg.cholesky(reg))
            return torch.linalg.cholesky(inv, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError("Hessian is not positive definite even with strong damping")


def sparsegpt_prune(
    weight: torch.Tensor,
    h: torch.Tensor,
    sparsity: float,
    pattern: Pattern,
    blocksize: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (updated weight in the input dtype, keep-mask)."""
    rows, cols = weight.shape
    w = weight.detach().float().clone()
    u = _inverse_cholesky(h.float(), damp)
    if pattern.is_nm:
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    starts = list(range(0, cols, blocksize))
    sizes = [min(blocksize, cols - s) * rows for s in starts]
    block_prune = split_counts(prune_count(w.numel(), sparsity), sizes) if not pattern.is_nm else None
    keep = torch.ones_like(w, dtype=torch.bool)

    threads = torch.get_num_threads()
    try:
        for b, i1 in enumerate(starts):
            i2 = min(i1 + blocksize, cols)
            # The column loop is many tiny ops: one thread avoids parallel-region overhead that
            # otherwise dominates (5-13x measured on 2 cores); the block update below uses them all.
            torch.set_num_threads(1)
            w1 = w[:, i1:i2].clone()
            u1 = u[i1:i2, i1:i2]
            err = torch.zeros_like(w1)
            d = torch.diagonal(u1)
            if not pattern.is_nm:
                scores = (w1**2) / (d**2)[None, :]
                keep[:, i1:i2] = lowest_per_row(scores.reshape(1, -1), torch.tensor([block_prune[b]])).reshape(rows, i2 - i1)
            for i in range(i2 - i1):
                if pattern.is_nm and i % pattern.m == 0:
                    g = slice(i, i + pattern.m)
                    scores = (w1[:, g] ** 2) / (d[g] ** 2)[None, :]
                    counts = torch.full((rows,), pattern.m - pattern.n)
                    keep[:, i1 + i : i1 + i + pattern.m] = lowest_per_row(scores, counts)
                col = w1[:, i]
                q = torch.where(keep[:, i1 + i], col, torch.zeros_like(col))
                e = (col - q) / d[i]
                w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
                w1[:, i] = q
                err[:, i] = e
            torch.set_num_threads(threads)
            w[:, i1:i2] = w1
            w[:, i2:] -= err @ u[i1:i2, i2:]
    finally:
        torch.set_num_threads(threads)
    w = torch.where(keep, w, torch.zeros_like(w))
    return w.to(weight.dtype), keep
