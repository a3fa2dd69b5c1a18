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
    loaded = load_model(ref, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, need_tokenizer=False)
    layers = []
    target_params = target_nonzero = 0
    holds_all = True
    for t in find_targets(loaded.model, include, ignore):
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
        if claimed is not None and claimed.is_nm:
            row["claimed_pattern_holds"] = nm_holds(w, claimed)
            holds_all &= row["claimed_pattern_holds"]
        layers.append(row)
        target_params += w.numel()
        target_nonzero += nonzero
    params = sum(p.numel() for p in loaded.model.parameters())
    nonzero_params = sum(int(torch.count_nonzero(p)) for p in loaded.model.parameters())
    tensor_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    files = [ref.path] if ref.path.is_file() else sorted(Path(ref.folder).glob("*.safetensors"))
    return {
        "model": ref.spec,
        "architecture": type(loaded.model).__name__,
        "layers": layers,
        "sparsity": 1 - target_nonzero / max(target_params, 1),
        "claimed_pattern": str(claimed) if claimed else None,
        "claimed_pattern_holds": (holds_all if claimed is not None and claimed.is_nm else None),
        "params": {"total": params, "nonzero": nonzero_params, "target": target_params, "target_nonzero": target_nonzero},
        "bytes": {"tensors_in_memory": tensor_bytes, "on_disk": sum(f.stat().st_size for f in files)},
        "manifest": manifest is not None,
    }
