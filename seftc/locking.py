"""Locks that die with their holder, and process identities that survive pid reuse.

A lock is `fcntl.flock` on a small file holding the holder's pid: the kernel drops it when the
holder exits, however it exits (kill -9 included), so a crashed run never blocks the next one.
The file is removed on release; a waiter that locked a file removed meanwhile retries on the new
one. Output folders (seftc.models.saving) and kernel builds (seftc.runtime.cpu) use these.

A process identity is `pid-starttime` (Linux: /proc/PID/stat field 22), so a temporary left by a
killed run is recognised as stale even when its pid has been reused by another process since.
"""
from __future__ import annotations

import fcntl
import os
import weakref
from pathlib import Path
from typing import Callable


def process_start(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks after boot), None when it does not exist
    (or the platform has no /proc: then 0 while the pid exists)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return 0


def identity(pid: int | None = None) -> str:
    """`PID-START` of this process (or of `pid`)."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{process_start(pid) or 0}"


def is_alive(pid: int, start: int) -> bool:
    """Whether the process that had identity `pid-start` still runs."""
    now = process_start(pid)
    return now is not None and (now == start or now == 0 or start == 0)


def openers(path: Path) -> list[int] | None:
    """The pids of processes that have `path` open (Linux: /proc/PID/fd), None where that cannot
    be told. Processes of other users are not visible; they are not seftc runs of this user."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target = os.path.realpath(path)
    found = []
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
        except OSError:
            continue
        with fds:
            for fd in fds:
                try:
                    if os.readlink(fd.path) == target:
                        found.append(int(entry.name))
                        break
                except OSError:
                    continue
    return found


class HeldLock:
    """An acquired lock; `release()` (or garbage collection, or process exit) gives it up."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._finalizer = weakref.finalize(self, _release, str(path), fd)

    def release(self) -> None:
        self._finalizer()

    @property
    def held(self) -> bool:
        return self._finalizer.alive


def _release(path: str, fd: int) -> None:
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    except OSError:
        pass
    os.close(fd)


def holder(path: Path) -> int | None:
    """The pid written in the lock file `path` (None when unreadable)."""
    try:
        with open(path, "rb") as f:
            return int(f.read(64).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def try_lock(path: Path) -> HeldLock | None:
    """Take the lock at once, or None when another process holds it."""
    return _lock(Path(path), blocking=False)


def wait_lock(path: Path, on_wait: Callable[[int | None], None] = lambda pid: None) -> HeldLock:
    """Take the lock, waiting for the holder; `on_wait(holder_pid)` is called once before waiting."""
    held = _lock(Path(path), blocking=False)
    if held is None:
        on_wait(holder(Path(path)))
        held = _lock(Path(path), blocking=True)
    assert held is not None
    return held


def _lock(path: Path, blocking: bool) -> HeldLock | None:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed this file on release: lock the new one
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {identity()}\n".encode())
        return HeldLock(path, fd)
