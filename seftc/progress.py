"""The progress protocol library code reports through; the CLI plugs rich bars into it."""
from __future__ import annotations

from typing import Callable, Protocol


class ProgressSink(Protocol):
    def task(self, description: str, total: int | None) -> Callable[[int], None]: ...


class NoProgress:
    def task(self, description: str, total: int | None) -> Callable[[int], None]:
        return lambda n=1: None


NO_PROGRESS = NoProgress()
