"""The sparse inference runtime: one op (`seftc::sparse_linear`) with a PyTorch reference and
compiled CPU kernels and a CUDA kernel (bound; verified on GPU: not yet), `SparseLinear`, model
conversion (with 2:4 semi-structured prefill on CUDA), benchmarking and generation.

    from seftc.runtime import SparseLinear, sparsify_model
    sparsify_model(model)              # pruned nn.Linear / PackedLinear -> SparseLinear
"""
from __future__ import annotations

from typing import Any

__all__ = ["SparseLinear", "SparseLayout", "sparsify_model", "load_runtime_pair"]


def __getattr__(name: str) -> Any:  # lazy: importing seftc.runtime does not import torch
    if name == "SparseLinear":
        from seftc.runtime.linear import SparseLinear

        return SparseLinear
    if name == "SparseLayout":
        from seftc.runtime.layouts import SparseLayout

        return SparseLayout
    if name in ("sparsify_model", "load_runtime_pair"):
        from seftc.runtime import convert

        return getattr(convert, name)
    raise AttributeError(name)
