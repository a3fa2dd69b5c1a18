"""Let a subpackage double as the API function of the same name: `seftc.prune(...)` calls
`seftc.prune.api.prune` while `seftc.prune.masks` stays importable. (Importing a submodule sets
the package as the parent's attribute, so a plain function of the same name cannot coexist.)"""
from __future__ import annotations

import importlib
import sys
import types


def make_callable(package: str, target: str) -> None:
    module_name, attr = target.split(":")

    class _CallablePackage(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(importlib.import_module(module_name), attr)(*args, **kwargs)

    sys.modules[package].__class__ = _CallablePackage
