"""`seftc inspect`: per-layer sparsity, N:M validity, parameter and byte counts, from the saved
tensors (never from the manifest's claims, which are checked against them)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from seftc.models.loading import load_model, resolve_model
from seftc.models.manifest import Manifest
from seftc.models.targets import DEFAULT_IGNORE, find_targets
from seftc.prune.masks import detect_pattern, nm_holds, parse_pattern


def inspect_model(
    model: str | os.PathLike,
    include: Sequence[str] = ("*",),
    ignore: Sequence[str] = DEFAULT_IGNORE,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    ref = resolve_model(model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    manifest = Manifest.load(ref.folder) if ref.kind in ("folder", "safetensors", "default") else None
    claimed = parse_pattern(manifest.pattern) if manifest else None
    pack = _pack_manifest(ref)
    if pack is not None:  # a packed folder: its weights decoded (int8 ones dequantized); sizes from seftc_pack.json
        from seftc.formats.sparse_model import load_sparse

        net = load_sparse(ref.folder, dense=True, trust_remote_code=trust_remote_code)
    else:
        net = load_model(ref, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, need_tokenizer=False).model
    stored = pack.get("tensors", {}) if pack else {}
    layers = []
    target_params = target_nonzero = target_bytes = 0
    holds_all = True
    for t in find_targets(net, include, ignore):
        w = t.module.weight.data
        nonzero = int(torch.count_nonzero(w))
        row: dict[str, Any] = {
            "name": t.name,
            "shape": list(w.shape),
            "nonzero": nonzero,
            "sparsity": 1 - nonzero / w.numel(),
            "pattern": detect_pattern(w),
            "dtype": str(w.dtype).removeprefix("torch."),
        }
        record = stored.get(f"{t.name}.weight")
        bytes_ = record["bytes"] if isinstance(record, dict) else w.numel() * w.element_size()
        row.update(format=record["format"] if isinstance(record, dict) else "dense", bytes=bytes_,
                   bytes_per_weight=bytes_ / max(1, w.numel()))
        if claimed is not None and claimed.is_nm:
            row["claimed_pattern_holds"] = nm_holds(w, claimed)
            holds_all &= row["claimed_pattern_holds"]
        layers.append(row)
        target_params += w.numel()
        target_nonzero += nonzero
        target_bytes += bytes_
    params = sum(p.numel() for p in net.parameters())
    nonzero_params = sum(int(torch.count_nonzero(p)) for p in net.parameters())
    tensor_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    files = [ref.path] if ref.path.is_file() else sorted(Path(ref.folder).glob("*.safetensors"))
    return {
        "model": ref.spec,
        "architecture": type(net).__name__,
        "packed": {"format": pack.get("format"), "quantize": pack.get("quantize", "none")} if pack else None,
        "layers": layers,
        "sparsity": 1 - target_nonzero / max(target_params, 1),
        "claimed_pattern": str(claimed) if claimed else None,
        "claimed_pattern_holds": (holds_all if claimed is not None and claimed.is_nm else None),
        "params": {"total": params, "nonzero": nonzero_params, "target": target_params, "target_nonzero": target_nonzero},
        "bytes": {"tensors_in_memory": tensor_bytes, "on_disk": sum(f.stat().st_size for f in files),
                  "target": target_bytes, "per_target_weight": target_bytes / max(target_params, 1)},
        "manifest": manifest is not None,
    }


def _pack_manifest(ref: Any) -> dict[str, Any] | None:
    """seftc_pack.json of a packed folder (`{}` for a foreign compressed-tensors one), or None when
    MODEL is not packed. A folder seftc packed whose manifest is gone is refused (formats/README.md)."""
    import os

    from seftc.formats.ct import ct_format
    from seftc.formats.packing import PACK_MANIFEST, _read_config, packed_files, seftc_markers

    folder = Path(ref.folder)
    if ref.kind != "folder" or not (folder / "config.json").is_file():
        return None
    config = _read_config(folder)
    if not (os.path.lexists(folder / PACK_MANIFEST) or seftc_markers(config) or ct_format(config)):
        return None
    manifest = packed_files(folder).manifest
    if manifest is None:  # a foreign compressed-tensors folder: formats and sizes from its files
        from seftc.formats.packing import iter_packed

        tensors = {name: {"format": r.entries[name].format, "bytes": r.read(name).nbytes} for r, name in iter_packed(folder)}
        manifest = {"format": next((t["format"] for t in tensors.values() if t["format"] != "dense"), None), "tensors": tensors}
    return manifest
