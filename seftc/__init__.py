"""seftc: a compression-and-deployment toolchain for sparse LLMs.

Importing seftc is cheap: the public API below loads its modules on first use, so
`import seftc` touches neither CUDA nor onnx.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# `prune`, `repair` and `compress` are subpackages that are also callable (see seftc/_callable.py).
_CALLABLE_PACKAGES = ("prune", "repair", "compress")

_API = {
    "load_model": "seftc.models.loading",
    "resolve_model": "seftc.models.loading",
    "PruneConfig": "seftc.prune.config",
    "CalibConfig": "seftc.data.calibration",
    "perplexity": "seftc.eval.perplexity",
    "evaluate_tasks": "seftc.eval.multiple_choice",
    "inspect_model": "seftc.inspect",
    "RepairConfig": "seftc.repair.config",
    "load_sparse": "seftc.formats.sparse_model",
    "SeftcError": "seftc.errors",
    "FormatError": "seftc.errors",
}

__all__ = sorted([*_API, *_CALLABLE_PACKAGES]) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _CALLABLE_PACKAGES:
        return importlib.import_module(f"seftc.{name}")
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'seftc' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
