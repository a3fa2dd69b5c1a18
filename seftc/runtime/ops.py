"""The one op surface for sparse linear layers: `seftc::sparse_linear`.

    sparse_linear(Tensor x, Tensor masks, Tensor values, Tensor row_offsets, Tensor? bias) -> Tensor

computes `x @ W^T + bias` for a weight W held in the row-wise bitmask layout of
`seftc.runtime.layouts` (2:4 weights use the same layout). The schema, the fake (meta)
implementation and the reference are declared here; the CPU kernel comes from the compiled
extension (`seftc.runtime.cpu`), registered the first time the op is used on the CPU, and the CUDA
implementation (`seftc.runtime.cuda`: the bitmap kernel for decode-sized half-precision batches,
decompress + matmul otherwise; bound, verified on GPU: not yet) the first time it is used on CUDA.
`SEFTC_KERNELS=reference` forces the reference everywhere.
"""
from __future__ import annotations

import os

import torch

from seftc.runtime import reference

_lib = torch.library.Library("seftc", "DEF")
_lib.define("sparse_linear(Tensor x, Tensor masks, Tensor values, Tensor row_offsets, Tensor? bias=None) -> Tensor")


@torch.library.register_fake("seftc::sparse_linear")
def _sparse_linear_fake(x, masks, values, row_offsets, bias=None):
    torch._check(masks.dim() == 2, lambda: "masks must be [R, W]")
    torch._check(masks.shape[1] * 64 >= x.shape[-1], lambda: "masks are narrower than x")
    return x.new_empty((*x.shape[:-1], masks.shape[0]))


_backend: str | None = None
_cuda_backend: str | None = None


def _first_call(x, masks, values, row_offsets, bias=None):
    """CPU kernel until the first call: decides the backend (compiling the extension on first
    use), which replaces this registration, then runs the call again through the dispatcher."""
    backend()
    return torch.ops.seftc.sparse_linear.default(x, masks, values, row_offsets, bias)


_lazy = torch.library.Library("seftc", "IMPL")
_lazy.impl("sparse_linear", _first_call, "CPU")


def _first_cuda_call(x, masks, values, row_offsets, bias=None):
    """CUDA implementation until the first CUDA call: decides the CUDA backend (compiling the
    extension on first use), which replaces this registration, then runs the call again."""
    cuda_backend()
    return torch.ops.seftc.sparse_linear.default(x, masks, values, row_offsets, bias)


_lazy_cuda = torch.library.Library("seftc", "IMPL")
_lazy_cuda.impl("sparse_linear", _first_cuda_call, "CUDA")


def backend() -> str:
    """'cpu-kernels' or 'reference': what `seftc::sparse_linear` runs on the CPU. Decided once."""
    global _backend
    if _backend is None:
        from seftc.runtime import cpu

        _lazy._destroy()

        if os.environ.get("SEFTC_KERNELS", "").lower() != "reference" and cpu.load():
            _backend = "cpu-kernels"
        else:
            _lib.impl("sparse_linear", reference.sparse_linear, "CPU")
            _backend = "reference"
    return _backend


def cuda_backend() -> str:
    """'cuda-kernels' or 'reference': what `seftc::sparse_linear` runs on CUDA. Decided once, on the
    first CUDA call (or here); the extension is built only when `torch.cuda.is_available()`."""
    global _cuda_backend
    if _cuda_backend is None:
        from seftc.runtime import cuda

        _lazy_cuda._destroy()
        if os.environ.get("SEFTC_KERNELS", "").lower() != "reference" and cuda.load():
            _lib.impl("sparse_linear", cuda.sparse_linear_cuda, "CUDA")
            _cuda_backend = "cuda-kernels"
        else:
            _lib.impl("sparse_linear", reference.sparse_linear, "CUDA")
            _cuda_backend = "reference"
    return _cuda_backend


def sparse_linear(x: torch.Tensor, masks: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.is_cuda:
        if _cuda_backend is None:
            cuda_backend()
    elif _backend is None:
        backend()
    return torch.ops.seftc.sparse_linear.default(x, masks, values, row_offsets, bias)
