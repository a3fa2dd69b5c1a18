"""Pure-PyTorch reference of `seftc::sparse_linear`: the oracle every kernel is tested against,
and the implementation used where no compiled kernel is available."""
from __future__ import annotations

import torch

_SHIFTS = torch.arange(64, dtype=torch.int64)


def unpack_masks(masks: torch.Tensor, cols: int) -> torch.Tensor:
    """int64 [R, W] mask words -> bool [R, cols]; bit i of word w is column 64*w + i."""
    rows, words = masks.shape
    bits = (masks.unsqueeze(-1) >> _SHIFTS.to(masks.device)) & 1
    return bits.reshape(rows, words * 64)[:, :cols].bool()


def dense_weight(masks: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, cols: int) -> torch.Tensor:
    """The dense [R, cols] weight a layout stands for, in the values' dtype."""
    keep = unpack_masks(masks, cols)
    rank = keep.to(torch.int64).cumsum(dim=1) - 1
    index = row_offsets[:-1].unsqueeze(1) + rank
    weight = torch.zeros(keep.shape, dtype=values.dtype, device=values.device)
    if keep.any():
        weight[keep] = values[index[keep]]
    return weight


def sparse_linear(x: torch.Tensor, masks: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias, accumulated in fp32, returned in x's dtype."""
    weight = dense_weight(masks, values, row_offsets, x.shape[-1]).float()
    y = x.float() @ weight.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def sparse_linear_int8(x: torch.Tensor, masks: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                       row_offsets: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = (x @ Q^T) * scales + bias for int8 values Q in the same layout (formats/int8.md): the
    products accumulate in fp32 and each row's sum is scaled once, as the kernels do."""
    q = dense_weight(masks, values, row_offsets, x.shape[-1]).float()
    y = (x.float() @ q.t()) * scales.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
