"""Putting `SparseLinear` in place of pruned (or packed) linear layers of a loaded model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from seftc.runtime.layouts import is_24
from seftc.runtime.linear import SparseLinear
from seftc.runtime.semistructured import PREFILL_TOKENS, PrefillDecision, decide_layer

# Below this fraction of zeros the bitmask layout reads more bytes than the dense weight saves.
MIN_SPARSITY = 0.25


@dataclass
class ConversionResult:
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it stayed dense
    dense_bytes: int = 0  # of the converted layers' weights
    sparse_bytes: int = 0
    prefill: list[PrefillDecision] = field(default_factory=list)  # 2:4 layers on CUDA (prepare_prefill)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def sparsify_model(model: nn.Module, targets: Sequence[str] | None = None, *, kind: str = "auto",
                   min_sparsity: float = MIN_SPARSITY) -> ConversionResult:
    """Replace layers in place: every `PackedLinear` (from `seftc.formats.load_sparse`), and every
    `nn.Linear` among `targets` (default: the decoder blocks' linear layers) at least `min_sparsity`
    sparse. kind: "auto" (2:4 layout for 2:4-packed weights, bitmask otherwise), "bitmask", "2:4".
    A converted `nn.Linear` keeps its device and dtype; when the model is on CUDA, 2:4 layers also get
    their prefill decision (`prepare_prefill`, recorded in `result.prefill`)."""
    from seftc.models.targets import find_targets

    result = ConversionResult()
    names = list(targets) if targets is not None else [t.name for t in find_targets(model)]
    modules = dict(model.named_modules())
    for name, module in list(modules.items()):
        if type(module).__name__ == "PackedLinear" and hasattr(module, "packed"):
            packed = module.packed
            if packed.codec.quantized:  # int8 values: their own kernels (seftc.runtime.int8)
                from seftc.runtime.int8 import SparseInt8Linear

                sparse = SparseInt8Linear.from_packed(packed, module.bias, name)
            else:
                sparse = SparseLinear.from_packed(packed, module.bias, name)
            _set_module(model, name, sparse)
            result.converted.append(name)
            result.dense_bytes += packed.dense_bytes
            result.sparse_bytes += sparse.layout.nbytes
    for name in names:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight.data
        sparsity = 1.0 - float((weight != 0).sum()) / max(1, weight.numel())
        if sparsity < min_sparsity:
            result.skipped[name] = f"only {sparsity:.0%} sparse"
            continue
        layout_kind = kind
        if kind == "auto":  # a full 2:4 weight is labelled 2:4 (same bytes); otherwise bitmask stores fewer values
            layout_kind = "2:4" if is_24(weight) and int((weight != 0).sum()) * 2 == weight.numel() else "bitmask"
        # the layout is built on the CPU (fp16 values as fp32); put it back where the layer was, in its dtype
        sparse = SparseLinear.from_dense(module, layout_kind).to(device=weight.device, dtype=weight.dtype)
        _set_module(model, name, sparse)
        result.converted.append(name)
        result.dense_bytes += weight.numel() * weight.element_size()
        result.sparse_bytes += sparse.layout.nbytes
    if any(p.is_cuda for p in model.buffers()):
        result.prefill = prepare_prefill(model)
    return result


def prepare_prefill(model: nn.Module, tokens: int = PREFILL_TOKENS, min_speedup: float = 1.0) -> list[PrefillDecision]:
    """For every 2:4 `SparseLinear` on CUDA (float16/bfloat16, a shape torch's semi-structured
    backend takes), time semi-structured against dense `F.linear` at `tokens` tokens, once per
    distinct shape, and keep a semi-structured prefill weight where it is faster
    (`seftc.runtime.semistructured`). Other layers are listed with the reason they stay on
    decompress + matmul for prefill. Call again after moving or casting the model.
    `SEFTC_KERNELS=reference` keeps no semi-structured weight (everything on the reference)."""
    import os

    decisions: list[PrefillDecision] = []
    timings: dict = {}
    forced_reference = os.environ.get("SEFTC_KERNELS", "").lower() == "reference"
    for name, module in model.named_modules():
        if not isinstance(module, SparseLinear):
            continue
        module.prefill_weight = None
        if module.kind != "2:4" or not module.values.is_cuda or forced_reference:
            continue
        decision, semi = decide_layer(name, module, tokens, min_speedup, timings)
        module.prefill_weight = semi
        decisions.append(decision)
    return decisions


def is_sparse_linear(module: nn.Module) -> bool:
    """A layer of the sparse runtime: `SparseLinear`, or `SparseInt8Linear` (int8 values)."""
    from seftc.runtime.int8 import SparseInt8Linear

    return isinstance(module, (SparseLinear, SparseInt8Linear))


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights a decode step reads: every linear-like layer's weight (the tied LM head
    counts the embedding matrix once), plus one embedding row per embedding table."""
    total = 0
    seen: set[int] = set()
    for module in model.modules():
        if is_sparse_linear(module):
            total += module.layout.nbytes
        elif isinstance(module, nn.Linear):
            w = module.weight
            if id(w) not in seen:
                seen.add(id(w))
                total += w.numel() * w.element_size()
        elif isinstance(module, nn.Embedding):
            total += module.weight.shape[1] * module.weight.element_size()
    return total


def model_nbytes(model: nn.Module) -> int:
    """Memory held by the model's parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


@dataclass
class RuntimePair:
    """The same model twice, in one dtype: dense (the baseline) and on the sparse runtime."""

    dense: Any
    sparse: Any
    tokenizer: Any | None
    conversion: ConversionResult
    source: str  # "pruned" | "packed"
    checksums: str | None = None  # packed folders: "verified", or how a foreign one was read (seftc.formats.packing.FOREIGN)


def is_packed_folder(folder) -> bool:
    """Whether `folder` is a packed model (seftc's, or a compressed-tensors one): read with load_sparse."""
    import os
    from pathlib import Path

    from seftc.errors import SeftcError
    from seftc.formats.packing import seftc_markers
    from seftc.models.files import read_json

    folder = Path(folder)
    if os.path.lexists(folder / "seftc_pack.json"):
        return True
    try:
        config = read_json(folder / "config.json", folder)
    except SeftcError:
        return False
    return isinstance(config, dict) and ("compression_config" in config or "quantization_config" in config or bool(seftc_markers(config)))


def shared_twin(model: nn.Module) -> nn.Module:
    """A second copy of `model`'s module tree that shares every parameter and buffer with it (no
    weight is copied): replacing a module in the twin (`sparsify_model`) leaves `model` as it
    was, and moving or casting either moves both (parameters are converted in place)."""
    import copy

    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo=shared)


def load_runtime_pair(spec: str, dtype: str = "auto", *, need_dense: bool = True, need_sparse: bool = True,
                      require_sparse: bool = True, min_sparsity: float = MIN_SPARSITY,
                      trust_remote_code: bool = False) -> RuntimePair:
    """Load MODEL (a pruned folder or a packed folder) as a dense model and a sparse-runtime model
    in `dtype`. Sparse layers come from the packed components when the folder is packed, and from
    the pruned dense weights otherwise. Without `need_dense` (or `need_sparse`) that side is None.
    With `require_sparse` (the default) a model with no layer sparse enough is an error; without it,
    such a model comes back unconverted as `sparse` (dense, `conversion.converted` empty). Code a
    checkpoint names runs only with `trust_remote_code`."""
    from pathlib import Path

    from seftc.errors import SeftcError
    from seftc.models.loading import _torch_dtype, resolve_model

    if not (need_dense or need_sparse):
        raise ValueError("load_runtime_pair: ask for the dense model, the sparse one, or both")
    torch_dtype = None if dtype == "auto" else _torch_dtype(dtype, torch.float32)  # auto: the checkpoint's dtype
    path = Path(str(spec)).expanduser()
    conversion = ConversionResult()
    if path.is_dir() and is_packed_folder(path):
        from seftc.formats.packing import packed_files
        from seftc.formats.sparse_model import load_sparse

        try:
            checksums = packed_files(path).checksums
            sparse = load_sparse(path, trust_remote_code=trust_remote_code) if need_sparse else None
            dense = load_sparse(path, dense=True, trust_remote_code=trust_remote_code) if need_dense else None
        except SeftcError:
            raise
        except Exception as e:  # FormatError subclasses SeftcError; anything else is a bad folder
            raise SeftcError(f"cannot load packed folder {path}: {str(e).splitlines()[0][:200]}") from None
        if sparse is not None:
            conversion = sparsify_model(sparse, targets=[], min_sparsity=min_sparsity)
            sparse = sparse.to(torch_dtype) if torch_dtype is not None else sparse
        dense = dense.to(torch_dtype) if dense is not None and torch_dtype is not None else dense
        source = "packed"
        tokenizer = _tokenizer(path, trust_remote_code)
    else:
        from seftc.models.loading import load_model

        checksums = None
        loaded = load_model(resolve_model(spec, trust_remote_code=trust_remote_code), dtype=dtype, trust_remote_code=trust_remote_code)
        dense = loaded.model if need_dense else None
        sparse = None
        if need_sparse:
            sparse = shared_twin(loaded.model) if need_dense else loaded.model
            conversion = sparsify_model(sparse, min_sparsity=min_sparsity)
        source = "pruned"
        tokenizer = loaded.tokenizer
    if need_sparse and require_sparse and not conversion.converted:
        raise SeftcError(f"{spec}: no linear layer is sparse enough (>= {min_sparsity:.0%} zeros) to run sparse; prune it first (seftc prune)")
    return RuntimePair(dense, sparse.eval() if sparse is not None else None, tokenizer, conversion, source, checksums)


def _tokenizer(folder, trust_remote_code: bool = False) -> Any | None:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        return None
