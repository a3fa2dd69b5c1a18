"""seftc: a compression-and-deployment toolchain for sparse LLMs.

Importing seftc is cheap: the public API below loads its modules on first use, so
`import seftc` touches neither CUDA nor onnx.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# `prune`, `repair`, `compress` and `export` are subpackages that are also callable (see
# seftc/_callable.py); the rest load their module on first use.
_CALLABLE_PACKAGES = ("prune", "repair", "compress", "export")

_API = {
    "load_model": "seftc.models.loading:load_model",
    "resolve_model": "seftc.models.loading:resolve_model",
    "PruneConfig": "seftc.prune.config:PruneConfig",
    "CalibConfig": "seftc.data.calibration:CalibConfig",
    "RepairConfig": "seftc.repair.config:RepairConfig",
    "perplexity": "seftc.eval.perplexity:perplexity",
    "evaluate_tasks": "seftc.eval.multiple_choice:evaluate_tasks",
    "inspect_model": "seftc.inspect:inspect_model",
    "pack": "seftc.formats.packing:pack_folder",
    "unpack": "seftc.formats.packing:unpack_folder",
    "load_sparse": "seftc.formats.sparse_model:load_sparse",
    "bench": "seftc.runtime.bench:bench_model",
    "generate": "seftc.runtime.generate:generate",
    "SeftcError": "seftc.errors:SeftcError",
    "FormatError": "seftc.errors:FormatError",
}

__all__ = sorted([*_API, *_CALLABLE_PACKAGES]) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _CALLABLE_PACKAGES:
        return importlib.import_module(f"seftc.{name}")
    target = _API.get(name)
    if target is None:
        raise AttributeError(f"module 'seftc' has no attribute {name!r}")
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)
