"""Building and loading the CUDA bitmap SpMV (`kernels/cuda/`), and the CUDA implementation of
`seftc::sparse_linear`. Bound; verified on GPU: not yet (`make gpu-check` runs every check on a GPU).

The extension (binding.cpp + bitmask_spmv.cu) is compiled once with torch's extension loader into
`$SEFTC_CACHE/kernels/cuda_spmv_<digest>` (beside the CPU kernels), for sm_80 and sm_90 plus
compute_90 PTX (so later GPUs JIT it), and only when `torch.cuda.is_available()`. It registers
`seftc_cuda::bitmask_spmv`, which `sparse_linear_cuda` calls for the inputs the kernel handles.

Decisions:
- The kernel takes x and values both float16 or both bfloat16 and 1..8 tokens (its template
  instantiations). Anything else falls back inside the op, never raises: half-precision inputs with
  more tokens (prefill) or none decompress the weight to their dtype and run one dense matmul
  (cuBLAS, fp32 accumulation); other dtypes or mixed dtypes run `seftc.runtime.reference` exactly.
- A build failure (no nvcc, headers, arch) warns once and leaves the reference in place.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Literal

import torch

from seftc.runtime import cpu

SOURCES = ("binding.cpp", "bitmask_spmv.cu")
# Keep in sync with kernels/cuda/Makefile (GENCODE).
GENCODE = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
           "-gencode=arch=compute_90,code=compute_90")
MAX_KERNEL_TOKENS = 8  # bitmask_spmv.cu: kMaxBatch
KERNEL_DTYPES = (torch.float16, torch.bfloat16)

KernelPath = Literal["bitmap", "dense", "reference"]


def source_dir() -> Path:
    """kernels/cuda in a source checkout, or the copy shipped inside the package."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "kernels" / "cuda", here.parent / "kernels" / "cuda"):
        if all((candidate / s).is_file() for s in SOURCES):
            return candidate
    raise FileNotFoundError("kernels/cuda sources not found")


def build_dir() -> Path:
    return cpu.build_dir()


def sparse_linear_path(x_dtype: torch.dtype, values_dtype: torch.dtype, tokens: int, in_features: int,
                       mode: str = "auto") -> KernelPath:
    """Which implementation `seftc::sparse_linear` runs on CUDA for these inputs (pure).

    "bitmap": the compiled kernel (x and values the same half dtype, 1..8 tokens, >= 1 feature);
    "dense": decompress to that half dtype + one dense matmul (prefill-sized or empty batches, or
    every batch when `mode` (`seftc.runtime.dispatch.mode()`) is "dense");
    "reference": the fp32 PyTorch reference (any other dtype, or x and values of different dtypes).
    The crossover is this fixed rule, not measured as on the CPU (no GPU has timed it yet); "sparse"
    changes nothing here: the kernel takes at most 8 tokens.
    """
    if x_dtype != values_dtype or x_dtype not in KERNEL_DTYPES or in_features < 1:
        return "reference"
    if 1 <= tokens <= MAX_KERNEL_TOKENS and mode != "dense":
        return "bitmap"
    return "dense"


_state: dict[str, object] = {}


def available() -> bool:
    """The extension is loaded (False before the first `load()`)."""
    return bool(_state.get("loaded"))


def load() -> bool:
    """Compile (first time) and load the extension; False without a CUDA device (silently) or,
    with one warning line, when the build fails."""
    if "loaded" in _state:
        return bool(_state["loaded"])
    if not torch.cuda.is_available():
        _state["loaded"] = False
        return False
    try:
        from torch.utils.cpp_extension import load as load_ext

        src = source_dir()
        paths = [str(src / s) for s in SOURCES]
        key = b"".join(Path(p).read_bytes() for p in paths) + torch.__version__.encode() + str(torch.version.cuda).encode()
        digest = hashlib.sha256(key + " ".join(GENCODE).encode()).hexdigest()[:12]
        folder = build_dir() / f"cuda_spmv_{digest}"
        with cpu.build_lock(folder, "CUDA sparse kernel"):
            load_ext(name=f"seftc_cuda_{digest}", sources=paths, build_directory=str(folder), is_python_module=False,
                     extra_cflags=["-O3"], extra_cuda_cflags=["-O3", *GENCODE], verbose=False)
        _state["loaded"] = hasattr(torch.ops.seftc_cuda, "bitmask_spmv")
        if not _state["loaded"]:
            raise RuntimeError("the extension loaded but registered no seftc_cuda::bitmask_spmv")
    except Exception as e:  # no nvcc, no headers, unsupported arch, build error: the reference still works
        warnings.warn(f"seftc: CUDA sparse kernel unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                      "using the PyTorch reference on CUDA", RuntimeWarning, stacklevel=2)
        _state["loaded"] = False
    return bool(_state["loaded"])


def dense_linear(x: torch.Tensor, masks: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """Decompress the weight to the values' dtype and run one dense matmul in x's dtype."""
    from seftc.runtime import reference

    weight = reference.dense_weight(masks, values, row_offsets, x.shape[-1]).to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias.to(x.dtype) if bias is not None else None)


def sparse_linear_cuda(x: torch.Tensor, masks: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """The CUDA implementation of `seftc::sparse_linear` once the extension is loaded."""
    from seftc.runtime import dispatch, reference

    features = int(x.shape[-1]) if x.dim() else 0
    tokens = x.numel() // features if features else 0
    same_device = masks.device == x.device and values.device == x.device and row_offsets.device == x.device
    path = sparse_linear_path(x.dtype, values.dtype, tokens, features, dispatch.mode()) if same_device else "reference"
    if path == "bitmap":
        return torch.ops.seftc_cuda.bitmask_spmv.default(x, masks, values, row_offsets, bias)
    if path == "dense":
        return dense_linear(x, masks, values, row_offsets, bias)
    return reference.sparse_linear(x, masks, values, row_offsets, bias)
