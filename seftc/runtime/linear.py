"""`SparseLinear`: an `nn.Linear` replacement whose weight lives in a kernel layout and whose
forward calls the one entry point, `seftc.runtime.ops.sparse_linear` (on the CPU it runs the sparse
kernel or decompress + dense GEMM, whichever `seftc.runtime.dispatch` measured faster for that many
tokens).

On CUDA a 2:4 layer may also hold `prefill_weight`, a semi-structured copy of its weight chosen at
conversion by timing (`seftc.runtime.semistructured`, `seftc.runtime.convert.prepare_prefill`):
batches of more than 8 tokens then run `F.linear` with it; decode-sized batches keep the bitmap
kernel. The copy is a plain attribute: not saved, and dropped by any `.to()` / `.cuda()` / `.half()`
(run `prepare_prefill` again after moving or casting a model)."""
from __future__ import annotations

import torch
from torch import nn

from seftc.runtime import dispatch, ops
from seftc.runtime.cuda import MAX_KERNEL_TOKENS
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
        self.prefill_weight: torch.Tensor | None = None  # semi-structured 2:4 copy for prefill on CUDA
        self.router = dispatch.Router(ops.BITMASK)  # this layer's memo of the CPU path per token count

    def _apply(self, fn, recurse=True):  # moving or casting invalidates the semi-structured copy and the routes
        self.prefill_weight = None
        self.router.reset()
        return super()._apply(fn, recurse)

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

    def dispatch_args(self) -> tuple[dispatch.LayoutPaths, tuple[torch.Tensor, ...]]:
        """What `seftc.runtime.dispatch` needs: the layout's paths and its weight tensors."""
        return ops.BITMASK, (self.masks, self.values, self.row_offsets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        semi = self.prefill_weight
        if (semi is not None and x.is_cuda and x.dtype == semi.dtype and x.device == semi.device
                and x.numel() > MAX_KERNEL_TOKENS * self.in_features):
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            y = nn.functional.linear(x.reshape(-1, self.in_features), semi, bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        return ops.sparse_linear(x, self.masks, self.values, self.row_offsets, self.bias, router=self.router)

    def extra_repr(self) -> str:
        nnz = int(self.row_offsets[-1])
        return (f"in_features={self.in_features}, out_features={self.out_features}, layout={self.kind}, "
                f"stored={nnz / max(1, self.in_features * self.out_features):.1%}, dtype={self.values.dtype}, bias={self.bias is not None}"
                + (", prefill=semi-structured" if self.prefill_weight is not None else ""))
