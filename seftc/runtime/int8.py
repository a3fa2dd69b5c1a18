"""Sparse + int8 weights on the runtime (formats/int8.md): `SparseInt8Linear` and its op

    seftc::sparse_linear_int8(Tensor x, Tensor masks, Tensor values, Tensor scales, Tensor row_offsets, Tensor? bias=None) -> Tensor

computes `(x @ Q^T) * scales + bias`, where the int8 weight Q is held in the bitmask kernel layout
of `seftc.runtime.layouts` (a 2:4 weight: exactly two slots per aligned group of four) and
`scales` is float32 [R]. Activations float32 or bfloat16; the result in x's dtype.

- CPU: `kernels/cpu/sparse_int8.cpp`, compiled into the same extension as the other CPU kernels
  (`seftc.runtime.cpu`): int8 values widened to fp32 in registers, fp32 accumulation, the row's
  scale applied once; AVX-512 / AVX2 / scalar, capped by `cpu.force_isa`. Where the extension is
  unavailable (or `SEFTC_KERNELS=reference`) the reference, `seftc.runtime.reference`.
- CUDA: there is no int8 kernel. A layer on a GPU dequantizes its values once per device and dtype
  (kept until it is moved or cast) and runs the bitmask path, `seftc::sparse_linear` (the bitmap
  kernel for decode, decompress + matmul for prefill): the int8 saving does not apply on the GPU.
  The op itself runs the reference on CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from seftc.runtime import dispatch, ops, reference
from seftc.runtime.layouts import PAD, SparseLayout

KINDS = ("bitmask-int8", "2:4-int8")  # the packed formats, which are also the layout kinds
INT8_PAD = 64  # zero bytes after the last value: the AVX-512 kernel loads 64 values at a time

_lib = torch.library.Library("seftc", "FRAGMENT")
_lib.define("sparse_linear_int8(Tensor x, Tensor masks, Tensor values, Tensor scales, Tensor row_offsets, Tensor? bias=None) -> Tensor")
_lib.impl("sparse_linear_int8", reference.sparse_linear_int8, "CUDA")  # no int8 CUDA kernel (see above)


@torch.library.register_fake("seftc::sparse_linear_int8")
def _sparse_linear_int8_fake(x, masks, values, scales, row_offsets, bias=None):
    torch._check(masks.dim() == 2, lambda: "masks must be [R, W]")
    torch._check(masks.shape[1] * 64 >= x.shape[-1], lambda: "masks are narrower than x")
    return x.new_empty((*x.shape[:-1], masks.shape[0]))


_backend: str | None = None


def backend() -> str:
    """'cpu-kernels' or 'reference': what `seftc::sparse_linear_int8` runs on the CPU. Decided once,
    with `seftc::sparse_linear`'s backend: loading the extension registers both CPU kernels."""
    global _backend
    if _backend is None:
        if ops.backend() == "cpu-kernels" and torch._C._dispatch_has_kernel_for_dispatch_key("seftc::sparse_linear_int8", "CPU"):
            _backend = "cpu-kernels"
        else:
            _lib.impl("sparse_linear_int8", reference.sparse_linear_int8, "CPU")
            _backend = "reference"
    return _backend


def sparse_linear_int8(x: torch.Tensor, masks: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                       row_offsets: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if _backend is None and not x.is_cuda:
        backend()
    return torch.ops.seftc.sparse_linear_int8.default(x, masks, values, scales, row_offsets, bias)


def decompress_int8(masks: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, row_offsets: torch.Tensor,
                    out: torch.Tensor) -> None:
    """Write the dequantized dense weight (q * scale, rounded to out's dtype) into `out` [R, C]."""
    if out.device.type == "cpu" and backend() == "cpu-kernels":
        torch.ops.seftc_cpu.decompress_int8(masks, values, scales, row_offsets, out)
    else:
        q = reference.dense_weight(masks, values, row_offsets, out.shape[1])
        out.copy_((q.float() * scales.float()[:, None]).to(out.dtype))


def _describe(masks, values, scales, row_offsets) -> tuple[int, int, torch.dtype]:
    return masks.shape[0], values.numel() - INT8_PAD, values.dtype


def _accepts(x, masks, values, scales, row_offsets) -> bool:
    return (backend() == "cpu-kernels" and x.dtype in (torch.float32, torch.bfloat16) and x.dim() >= 1
            and masks.dim() == 2 and masks.shape[1] == (x.shape[-1] + 63) // 64)


# the int8 layout's paths for seftc.runtime.dispatch: its kernel, or dequantize into the scratch + dense GEMM
INT8 = dispatch.LayoutPaths("bitmask-int8", sparse_linear_int8, decompress_int8, _describe, _accepts)


@dataclass
class Int8Layout:
    """The kernel layout of an int8 weight: `SparseLayout`'s masks and row offsets, int8 values
    (ending in `INT8_PAD` zeros) and float32 per-row scales."""

    kind: str  # "bitmask-int8" | "2:4-int8"
    shape: tuple[int, int]
    masks: torch.Tensor  # int64 [R, W]
    values: torch.Tensor  # int8 [n + INT8_PAD]
    scales: torch.Tensor  # float32 [R]
    row_offsets: torch.Tensor  # int64 [R + 1]

    @property
    def nbytes(self) -> int:
        """Bytes a matrix-vector product reads: stored values, mask words, row offsets, scales."""
        return int(self.row_offsets[-1]) + self.masks.numel() * 8 + self.row_offsets.numel() * 8 + self.scales.numel() * 4

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scales: torch.Tensor, kind: str = "bitmask-int8") -> "Int8Layout":
        """From int8 q [R, C] and float32 scales [R] (see seftc.formats.quantize)."""
        base = SparseLayout.from_dense(q.float(), "2:4" if kind == "2:4-int8" else "bitmask")  # small integers: exact in fp32
        values = torch.cat([base.values[: base.nnz_stored].to(torch.int8), torch.zeros(INT8_PAD, dtype=torch.int8)])
        return cls(kind, base.shape, base.masks, values, scales.to(torch.float32).contiguous(), base.row_offsets)

    @classmethod
    def from_packed(cls, packed, name: str = "<tensor>") -> "Int8Layout":
        """From a `bitmask-int8` / `2:4-int8` PackedTensor (validated as the reader does)."""
        q, scales = packed.codec.quantized(packed, name)
        return cls.from_quantized(q, scales, packed.format)

    @classmethod
    def concat(cls, layouts: "list[Int8Layout]") -> "Int8Layout":
        """The layout of the weights stacked by rows (as `SparseLayout.concat`; scales stack too)."""
        base = SparseLayout.concat([SparseLayout(l.kind.removesuffix("-int8"), l.shape, l.masks, l.values, l.row_offsets)
                                    for l in layouts])
        values = torch.cat([base.values[: base.nnz_stored], base.values.new_zeros(INT8_PAD)])
        return cls(base.kind + "-int8", base.shape, base.masks, values, torch.cat([l.scales for l in layouts]), base.row_offsets)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = reference.dense_weight(self.masks, self.values, self.row_offsets, self.shape[1])
        return (q.float() * self.scales.float()[:, None]).to(dtype)


class SparseInt8Linear(nn.Module):
    """An `nn.Linear` replacement for a sparse weight with int8 values and per-row scales."""

    def __init__(self, layout: Int8Layout, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = layout.shape
        self.kind = layout.kind
        self.register_buffer("masks", layout.masks)
        self.register_buffer("values", layout.values)
        self.register_buffer("scales", layout.scales)
        self.register_buffer("row_offsets", layout.row_offsets)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._dequantized: tuple[torch.device, torch.dtype, torch.Tensor] | None = None  # CUDA: the bitmask path's values
        self.router = dispatch.Router(INT8)  # this layer's memo of the CPU path per token count

    def _apply(self, fn, recurse=True):
        """Moving moves the scales; casting the model leaves them float32 (they are part of the format)."""
        scales = self.scales
        self._dequantized = None
        self.router.reset()
        out = super()._apply(fn, recurse)
        self.scales = scales.to(self.values.device)
        return out

    @classmethod
    def from_packed(cls, packed, bias: torch.Tensor | None = None, name: str = "<tensor>") -> "SparseInt8Linear":
        return cls(Int8Layout.from_packed(packed, name), bias)

    @classmethod
    def from_dense(cls, linear: nn.Linear, kind: str = "bitmask-int8") -> "SparseInt8Linear":
        """Quantize a pruned `nn.Linear`'s weight (formats/int8.md) and hold it in this layout."""
        from seftc.errors import SeftcError
        from seftc.formats.quantize import quantize_rows

        qs = quantize_rows(linear.weight.data)
        if qs is None:
            raise SeftcError("the weight holds NaN or infinite values, which int8 cannot represent")
        return cls(Int8Layout.from_quantized(*qs, kind), linear.bias)

    @property
    def layout(self) -> Int8Layout:
        return Int8Layout(self.kind, (self.out_features, self.in_features), self.masks, self.values, self.scales, self.row_offsets)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized dense weight (decoded on every access: for inspection, not the hot path)."""
        return self.layout.to_dense(self.bias.dtype if self.bias is not None else torch.float32)

    @property
    def nbytes(self) -> int:
        bias = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        return self.layout.nbytes + bias

    def _dequantized_values(self, dtype: torch.dtype) -> torch.Tensor:
        """values * their row's scale, in `dtype`, in the bitmask layout (CUDA path; cached)."""
        cached = self._dequantized
        if cached is None or cached[0] != self.values.device or cached[1] != dtype:
            counts = (self.row_offsets[1:] - self.row_offsets[:-1])
            per_value = torch.repeat_interleave(self.scales, counts)
            n = per_value.numel()
            values = torch.cat([self.values[:n].float() * per_value, per_value.new_zeros(PAD)]).to(dtype)
            self._dequantized = cached = (self.values.device, dtype, values)
        return cached[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return ops.sparse_linear(x, self.masks, self._dequantized_values(x.dtype), self.row_offsets, self.bias)
        return self.router(x, (self.masks, self.values, self.scales, self.row_offsets), self.bias)

    def dispatch_args(self) -> tuple[dispatch.LayoutPaths, tuple[torch.Tensor, ...]]:
        """What `seftc.runtime.dispatch` needs: the layout's paths and its weight tensors."""
        return INT8, (self.masks, self.values, self.scales, self.row_offsets)

    def extra_repr(self) -> str:
        nnz = int(self.row_offsets[-1])
        return (f"in_features={self.in_features}, out_features={self.out_features}, layout={self.kind}, "
                f"stored={nnz / max(1, self.in_features * self.out_features):.1%}, bias={self.bias is not None}")
