"""The one op surface for sparse linear layers: `seftc::sparse_linear`, and `sparse_linear()`, the
entry point every `SparseLinear` calls.

    sparse_linear(Tensor x, Tensor masks, Tensor values, Tensor row_offsets, Tensor? bias) -> Tensor

computes `x @ W^T + bias` for a weight W held in the row-wise bitmask layout of
`seftc.runtime.layouts` (2:4 weights use the same layout). The schema, the fake (meta)
implementation and the reference are declared here; the CPU kernel comes from the compiled
extension (`seftc.runtime.cpu`), registered the first time the op is used on the CPU, and the CUDA
implementation (`seftc.runtime.cuda`: the bitmap kernel for decode-sized half-precision batches,
decompress + matmul otherwise; bound, verified on GPU: not yet) the first time it is used on CUDA.
`SEFTC_KERNELS=reference` forces the reference everywhere.

On the CPU, `sparse_linear()` runs per call whichever path is faster on this machine for that
many tokens — the kernel (`seftc::sparse_linear`) or `decompress()` into a reused scratch buffer
plus the dense GEMM — as measured and cached by `seftc.runtime.dispatch` (`SEFTC_DISPATCH` or
`path=` forces one). On CUDA the CUDA implementation chooses with its fixed rule (kernel up to
8 tokens), and `SEFTC_DISPATCH=dense` forces decompress + matmul there too.
"""
from __future__ import annotations

import os

import torch

from seftc.runtime import dispatch, reference
from seftc.runtime.layouts import PAD

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


def decompress(masks: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, out: torch.Tensor) -> None:
    """Write the dense weight of a bitmask layout into `out` [R, C] (float32 or bfloat16, contiguous)."""
    if out.device.type == "cpu" and backend() == "cpu-kernels":
        torch.ops.seftc_cpu.decompress(masks, values, row_offsets, out)
    else:
        out.copy_(reference.dense_weight(masks, values, row_offsets, out.shape[1]))


_FLOATS = (torch.float32, torch.bfloat16)


def _describe(masks: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor) -> tuple[int, int, torch.dtype]:
    return masks.shape[0], values.numel() - PAD, values.dtype


def _accepts(x: torch.Tensor, masks: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor) -> bool:
    """Dispatch only with the compiled kernels (the reference has no measured choice) and inputs the
    kernel takes (others go to it and get its error)."""
    return (backend() == "cpu-kernels" and x.dtype in _FLOATS and values.dtype in _FLOATS and x.dim() >= 1
            and masks.dim() == 2 and masks.shape[1] == (x.shape[-1] + 63) // 64)


BITMASK = dispatch.LayoutPaths("bitmask", torch.ops.seftc.sparse_linear.default, decompress, _describe, _accepts)


def sparse_linear(x: torch.Tensor, masks: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor,
                  bias: torch.Tensor | None = None, *, path: str | None = None,
                  router: dispatch.Router | None = None) -> torch.Tensor:
    """y = x @ W^T + bias for a bitmask layout. On the CPU `path` ('sparse': the kernel, 'dense':
    decompress + GEMM) defaults to the dispatcher's choice (memoised in `router`, a layer's own); on
    CUDA the CUDA implementation chooses."""
    if x.is_cuda:
        if _cuda_backend is None:
            cuda_backend()
        return torch.ops.seftc.sparse_linear.default(x, masks, values, row_offsets, bias)
    if _backend is None:
        backend()
    if path is None and router is not None:
        return router(x, (masks, values, row_offsets), bias)
    return dispatch.run(BITMASK, x, (masks, values, row_offsets), bias, path)
