"""Which device a command computes on: `--device cpu|cuda`, default CUDA when one is visible."""
from __future__ import annotations

from seftc.errors import SeftcError

DEVICES = ("cpu", "cuda")


def resolve_device(device: str | None = None) -> str:
    """'cpu' or 'cuda' (or 'cuda:N'); None picks CUDA when available. Raises SeftcError when CUDA
    is asked for and none is visible."""
    import torch

    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = str(device).split(":")[0]
    if kind not in DEVICES:
        raise SeftcError(f"unknown device {device!r}; choose cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SeftcError("--device cuda: no CUDA device is visible; use --device cpu")
    return str(device)
