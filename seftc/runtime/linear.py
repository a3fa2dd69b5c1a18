"""`SparseLinear`: an `nn.Linear` replacement whose weight lives in a kernel layout and whose
forward calls the one op, `seftc::sparse_linear`."""
from __future__ import annotations

import torch
from torch import nn

from seftc.runtime import ops
from seftc.runtime.layouts import SparseLayout


class SparseLinear(nn.Module):
    def __init__(self, layout: SparseLayout, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = layout.shape
        self.kind = layout.kind
        self.register_buffer("masks", layout.masks)
        self.register_buffer("values", layout.values)
        self.register_buffer("row_offsets", layout.row_offsets)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_dense(cls, linear: nn.Linear, kind: str = "bitmask") -> "SparseLinear":
        """From an `nn.Linear` whose weight is pruned (zeros are not stored)."""
        return cls(SparseLayout.from_dense(linear.weight.data, kind), linear.bias)

    @classmethod
    def from_packed(cls, packed, bias: torch.Tensor | None = None, name: str = "<tensor>") -> "SparseLinear":
        """From a `seftc.formats` PackedTensor (bitmask and 2:4 map directly; others are re-laid out)."""
        return cls(SparseLayout.from_packed(packed, name), bias)

    @property
    def layout(self) -> SparseLayout:
        return SparseLayout(self.kind, (self.out_features, self.in_features), self.masks, self.values, self.row_offsets)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (decoded on every access: for inspection, not for the hot path)."""
        return self.layout.to_dense()

    @property
    def nbytes(self) -> int:
        bias = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        return self.layout.nbytes + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.sparse_linear(x, self.masks, self.values, self.row_offsets, self.bias)

    def extra_repr(self) -> str:
        nnz = int(self.row_offsets[-1])
        return (f"in_features={self.in_features}, out_features={self.out_features}, layout={self.kind}, "
                f"stored={nnz / max(1, self.in_features * self.out_features):.1%}, dtype={self.values.dtype}, bias={self.bias is not None}")
