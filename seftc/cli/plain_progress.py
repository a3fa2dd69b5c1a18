"""Progress for logs: when stderr is not a terminal (CI, `| tee`, nohup), the CLI reports through
plain lines instead of live bars. A task prints nothing until it has run `every` seconds, then one
line at most every `every` seconds and one when it ends, e.g.

    repair (seft): 12/40 (30%) step=12 loss=3.912 tokens_per_s=118.2 · elapsed 1m42s · ETA 3m58s
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, TextIO

ENV_EVERY = "SEFTC_PROGRESS_EVERY"
DEFAULT_EVERY = 15.0


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _every_from_env() -> float:
    try:
        return max(0.0, float(os.environ.get(ENV_EVERY, DEFAULT_EVERY)))
    except ValueError:
        return DEFAULT_EVERY


class _Task:
    def __init__(self, description: str, total: int | None, now: float):
        self.description, self.total, self.done = description, total, 0
        self.start = self.last_line = now
        self.fields: dict[str, Any] = {}
        self.printed = False


class LineProgress:
    """The ProgressSink of seftc.progress (plus `status`), writing periodic plain lines."""

    def __init__(self, every: float | None = None, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.every = _every_from_env() if every is None else every
        self._stream = stream
        self._clock = clock
        self._last: _Task | None = None

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def task(self, description: str, total: int | None) -> Callable[[int], None]:
        t = _Task(description, total, self._clock())
        self._last = t

        def advance(n: int = 1) -> None:
            t.done += n
            self._maybe_print(t)

        return advance

    def status(self, **fields: Any) -> None:
        """Live figures (step, loss, tokens/s, ...) shown on the last task's next line."""
        if self._last is not None:
            self._last.fields.update({k: v for k, v in fields.items() if v is not None})

    def _maybe_print(self, t: _Task) -> None:
        now = self._clock()
        finished = t.total is not None and t.done >= t.total
        if finished and t.printed:
            self._print(t, now)
        elif not finished and now - t.last_line >= self.every:
            self._print(t, now)

    def _print(self, t: _Task, now: float) -> None:
        elapsed = now - t.start
        parts = [f"{t.description}:"]
        if t.total:
            parts.append(f"{t.done}/{t.total} ({t.done / t.total:.0%})")
        else:
            parts.append(str(t.done))
        parts += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.fields.items()]
        tail = [f"elapsed {_clock(elapsed)}"]
        if t.total and 0 < t.done < t.total:
            tail.append(f"ETA {_clock(elapsed / t.done * (t.total - t.done))}")
        elif t.total and t.done >= t.total:
            tail.append("done")
        stream = self._stream or sys.stderr
        stream.write(" ".join(parts) + " · " + " · ".join(tail) + "\n")
        stream.flush()
        t.printed, t.last_line = True, now
