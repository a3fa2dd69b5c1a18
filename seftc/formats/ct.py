"""Interop with compressed-tensors' legacy sparse layouts, `sparse-bitmask` and `sparse-24-bitmask`.

Tensors follow that project's layout bit-exactly (formats/ct.md): for a weight `P.weight` the keys
are `P.shape` (int64), `P.compressed` (values in row order), `P.bitmask` (per-row
`numpy.packbits(mask, bitorder="little")`) and, for sparse-bitmask, `P.row_offsets` (int64, where
each row starts). The only deliberate difference: the mask marks non-zero *bit patterns*, so
-0.0 survives the round trip (compressed-tensors drops it); without -0.0 the bytes are identical.

Format names met in files or configs are mapped through the fixed table `CT_FORMATS`; nothing
read from a file ever selects code by name.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from seftc.errors import FormatError
from seftc.formats.base import KEEP24_MASK, Analysis, Codec, Errors, PackedTensor, pack_bits, padding_is_zero, scatter_dense, unpack_bits, values_tensor

# compressed-tensors' format name -> seftc's format name (fixed; the only names accepted)
CT_FORMATS = {"sparse-bitmask": "ct-sparse-bitmask", "sparse-24-bitmask": "ct-sparse-24-bitmask"}
CT_STRUCTURE = {"ct-sparse-bitmask": "unstructured", "ct-sparse-24-bitmask": "2:4"}
_INTS = (torch.int64, torch.int32)


class _CtCodec(Codec):
    shape_dims: tuple[int, ...]  # the `shape` component's shape as seftc writes it
    def key(self, name: str, comp: str) -> str:
        prefix = name[: -len(".weight")] if name.endswith(".weight") else name
        return f"{prefix}.{comp}"

    def _shape(self, p: PackedTensor, err: Errors) -> None:
        t = p.components["shape"]
        err.comp(p, "shape", _INTS if p.foreign else (torch.int64,))
        if t.numel() != 2 or t.dim() not in (1, 2) or [int(v) for v in t.reshape(-1)] != list(p.shape):
            err(f"component 'shape' is {t.reshape(-1).tolist()[:4]}, not the tensor's shape {list(p.shape)}")
        if not p.foreign and tuple(t.shape) != self.shape_dims:
            err(f"component 'shape' has shape {list(t.shape)}, expected {list(self.shape_dims)}")


class CtBitmask(_CtCodec):
    name = "ct-sparse-bitmask"
    components = ("shape", "compressed", "bitmask", "row_offsets")
    shape_dims = (2,)

    def nbytes(self, a: Analysis) -> int:
        return 16 + a.nnz * a.itemsize + a.rows * ((a.cols + 7) // 8) + 8 * a.rows

    def encode(self, a: Analysis) -> PackedTensor:
        return self.packed(a, {
            "shape": torch.tensor([a.rows, a.cols], dtype=torch.int64),
            "compressed": values_tensor(a.values, a.dtype),
            "bitmask": pack_bits(a.mask),
            "row_offsets": a.row_offsets[:-1].copy(),
        })

    def _decode(self, p: PackedTensor, err: Errors) -> torch.Tensor:
        rows, cols = p.shape
        self._shape(p, err)
        mask = err.comp(p, "bitmask", (torch.uint8,), (rows, (cols + 7) // 8))
        t = p.components["compressed"]
        if t.dim() != 1 and not (p.foreign and t.dim() == 2 and t.shape[0] == 1):
            err(f"component 'compressed' has shape {list(t.shape)}, expected one dimension")
        values = err.comp(p, "compressed", (p.dtype,)).reshape(-1)
        err.no_zero_values("compressed", values)
        starts = _signed(p, "row_offsets", err, rows)
        if not padding_is_zero(mask, cols):
            err("component 'bitmask' has bits set past the last column")
        bits = unpack_bits(mask, cols)
        counts = np.count_nonzero(bits, axis=1)
        if int(counts.sum()) != values.size:
            err(f"component 'bitmask' has {int(counts.sum())} bits set, but there are {values.size} values")
        if not np.array_equal(starts, np.cumsum(counts) - counts):
            err("component 'row_offsets' does not match the bitmask's row counts")
        return scatter_dense((rows, cols), p.dtype, np.flatnonzero(bits), values)


class Ct24Bitmask(_CtCodec):
    name = "ct-sparse-24-bitmask"
    components = ("shape", "compressed", "bitmask")
    shape_dims = (2, 1)

    def nbytes(self, a: Analysis) -> int | None:
        if not a.is_24:
            return None
        return 16 + a.rows * (a.cols // 2) * a.itemsize + a.rows * ((a.cols + 7) // 8)

    def encode(self, a: Analysis) -> PackedTensor:
        from seftc.formats.two_four import kept_values

        return self.packed(a, {
            "shape": torch.tensor([[a.rows], [a.cols]], dtype=torch.int64),
            "compressed": values_tensor(kept_values(a), a.dtype),
            "bitmask": a.keep24(KEEP24_MASK),
        })

    def _decode(self, p: PackedTensor, err: Errors) -> torch.Tensor:
        rows, cols = p.shape
        self._shape(p, err)
        if cols % 4:
            err(f"has {cols} columns, not a multiple of 4")
        values = err.comp(p, "compressed", (p.dtype,), (rows, cols // 2))
        mask = err.comp(p, "bitmask", (torch.uint8,), (rows, (cols + 7) // 8))
        if not padding_is_zero(mask, cols):
            err("component 'bitmask' has bits set past the last column")
        bits = unpack_bits(mask, cols)
        if bool((bits.reshape(rows, cols // 4, 4).sum(-1) != 2).any()):
            err("component 'bitmask' has a group of four without exactly two bits set")
        out = scatter_dense((rows, cols), p.dtype, np.flatnonzero(bits), values)
        # compressed-tensors keeps zeros by topk's tie-breaking; seftc's files keep the lowest-index ones
        if not p.foreign and not np.array_equal(Analysis(out).keep24(KEEP24_MASK), mask):
            err("component 'bitmask' is not canonical: a group keeps a zero other than its lowest-index ones (formats/ct.md)")
        return out


def _signed(p: PackedTensor, comp: str, err: Errors, rows: int) -> np.ndarray:
    """An I64 (in foreign files also I32) component of `rows` entries as int64."""
    err.comp(p, comp, _INTS if p.foreign else (torch.int64,), (rows,))
    return p.components[comp].detach().cpu().to(torch.int64).numpy()


CT_BITMASK = CtBitmask()
CT_24_BITMASK = Ct24Bitmask()


def ct_format(config: dict[str, Any]) -> str | None:
    """seftc's format name for a config.json's compressed-tensors sparsity, or None if it has none.

    Raises FormatError for a compressed-tensors config seftc cannot read (quantization, or a
    sparsity format outside the table)."""
    q = config.get("quantization_config") or config.get("compression_config")
    if not q:
        return None
    if not isinstance(q, dict) or q.get("quant_method") != "compressed-tensors":
        raise FormatError(f"config.json has a quantization_config ({q.get('quant_method') if isinstance(q, dict) else q!r}) seftc cannot unpack")
    if q.get("config_groups"):
        raise FormatError("config.json describes a quantized compressed-tensors model; seftc reads sparsity-only ones")
    sparsity = q.get("sparsity_config") or {}
    fmt = sparsity.get("format") if isinstance(sparsity, dict) else None
    if fmt in (None, "dense"):
        return "dense"
    if not isinstance(fmt, str) or fmt not in CT_FORMATS:
        raise FormatError(f"compressed-tensors sparsity format {fmt!r} is not one of {', '.join(CT_FORMATS)}")
    return CT_FORMATS[fmt]


def sparsity_config(fmt: str, targets: list[str], global_sparsity: float) -> dict[str, Any]:
    """The `quantization_config` block to put in config.json for tensors packed in `fmt`."""
    ct_name = {v: k for k, v in CT_FORMATS.items()}[fmt]
    return {
        "quant_method": "compressed-tensors",
        "format": "dense",
        "quantization_status": "compressed",
        "config_groups": {},
        "ignore": [],
        "sparsity_config": {
            "format": ct_name,
            "global_sparsity": round(global_sparsity, 6),
            "sparsity_structure": CT_STRUCTURE[fmt],
            "targets": sorted(targets),
            "ignore": [],
            "registry_requires_subclass": False,
        },
    }


def legacy_entries(keys: list[str], fmt: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Which tensors a compressed-tensors file holds, from its key names alone.

    Returns (packed: weight name -> {"prefix"}, dense keys). A weight is packed when every
    component of `fmt` is present under one prefix."""
    from seftc.formats.registry import get_codec

    codec = get_codec(fmt)
    comps = codec.components
    by_prefix: dict[str, set[str]] = {}
    for key in keys:
        prefix, _, comp = key.rpartition(".")
        if comp in comps:
            by_prefix.setdefault(prefix, set()).add(comp)
    packed = {f"{p}.weight": {"prefix": p} for p, found in by_prefix.items() if found == set(comps)}
    used = {f"{p}.{c}" for p in (v["prefix"] for v in packed.values()) for c in comps}
    dense = [k for k in keys if k not in used]
    for p, found in by_prefix.items():
        if found != set(comps) and found >= {"compressed", "bitmask"}:
            raise FormatError(f"tensor {p + '.weight'!r} ({fmt}): components {sorted(found)} are not {list(comps)}")
    return packed, dense
