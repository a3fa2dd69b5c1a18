"""Building and loading the C++ CPU kernels (`kernels/cpu/`), and choosing their instruction set.

The extension is compiled once with torch's extension loader into `$SEFTC_CACHE/kernels` (default
`~/.cache/seftc/kernels`). It registers the CPU implementations of `seftc::sparse_linear` and
(sparse_int8.cpp) `seftc::sparse_linear_int8`, and a few `seftc_cpu::` helpers (`decompress`: a layout's dense weight into a caller's buffer). The instruction
set (AVX-512 with AVX512-BF16 / AVX-512 / AVX2 / scalar) is picked at run time inside the library;
`SEFTC_ISA=avx512|avx2|scalar` or `force_isa()` caps it (tests use this to check all paths).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator

ISA_LEVELS = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512bf16": 3}
ISA_NAMES = {v: k for k, v in ISA_LEVELS.items()}
SOURCES = ("sparse_linear.cpp", "sparse_int8.cpp")


def source_dir() -> Path:
    """kernels/cpu in a source checkout, or the copy shipped inside the package."""
    for candidate in (Path(__file__).resolve().parents[2] / "kernels" / "cpu", Path(__file__).resolve().parent / "kernels" / "cpu"):
        if (candidate / SOURCES[0]).is_file():
            return candidate
    raise FileNotFoundError("kernels/cpu sources not found")


def build_dir() -> Path:
    from seftc.models.loading import cache_dir

    return cache_dir() / "kernels"


BUILD_LOCK = ".seftc-build.lock"
TORCH_BATON = "lock"  # torch.utils.cpp_extension's FileBaton: a plain file, left behind by a killed build


def _say(message: str) -> None:
    print(f"seftc: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def build_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder`'s build lock (seftc.locking: it dies with its holder) around torch's extension
    loader. torch guards the folder with a plain `lock` file that a killed build leaves behind and
    every later load waits on forever. torch keeps that file open while it builds, so with our lock
    held a `lock` that no process has open is stale and is removed. Says on stderr when it waits for
    another process's build and when it starts a first-use build."""
    from seftc import locking

    folder.mkdir(parents=True, exist_ok=True)
    held = locking.wait_lock(folder / BUILD_LOCK, lambda pid: _say(f"waiting for another process's {what} build (pid {pid}) to finish…"))
    try:
        baton = folder / TORCH_BATON
        if os.path.lexists(baton):
            # torch keeps its baton open while it builds: one nobody has open was left by a killed
            # build (a process without our lock, e.g. an older seftc, may still hold a live one)
            users = locking.openers(baton)
            if users:
                _say(f"waiting for another process's {what} build (pid {users[0]}, torch's lock {baton}) to finish…")
            else:
                baton.unlink()
                _say(f"removed a stale build lock left by an interrupted {what} build ({baton})")
        if not any(folder.glob("*.so")):
            _say(f"building the {what} (first use; this takes a minute or two)…")
        yield
    finally:
        held.release()


def extension_folder() -> tuple[str, list[str], Path]:
    """The extension's name, its source paths, and its build folder (keyed by sources + torch)."""
    import torch

    src = source_dir()
    paths = [str(src / s) for s in SOURCES]
    digest = hashlib.sha256(b"".join(Path(p).read_bytes() for p in paths) + torch.__version__.encode()).hexdigest()[:12]
    return f"seftc_cpu_{digest}", paths, build_dir() / f"sparse_linear_{digest}"


_state: dict[str, object] = {}


def load() -> bool:
    """Compile (first time) and load the extension; False, with one warning, if that fails."""
    if "loaded" in _state:
        return bool(_state["loaded"])
    try:
        import torch
        from torch.utils.cpp_extension import load as load_ext

        name, paths, folder = extension_folder()
        with build_lock(folder, "CPU sparse kernels"):
            load_ext(name=name, sources=paths, build_directory=str(folder), is_python_module=False,
                     extra_cflags=["-O3", "-fopenmp", "-std=c++17"], extra_ldflags=["-fopenmp"], verbose=False)
        forced = os.environ.get("SEFTC_ISA")
        if forced:
            if forced not in ISA_LEVELS:
                raise ValueError(f"SEFTC_ISA={forced!r}: choose one of {', '.join(ISA_LEVELS)}")
            torch.ops.seftc_cpu.set_isa(ISA_LEVELS[forced])
        _state["isa"] = ISA_NAMES[int(torch.ops.seftc_cpu.isa())]
        _state["loaded"] = True
    except Exception as e:  # no compiler, no headers, build error: the reference still works
        warnings.warn(f"seftc: CPU sparse kernels unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                      "using the slower PyTorch reference", RuntimeWarning, stacklevel=2)
        _state["loaded"] = False
    return bool(_state["loaded"])


def isa() -> str:
    """The instruction set the kernels use now ('reference' when they are not loaded)."""
    if not _state.get("loaded"):
        return "reference"
    return str(_state["isa"])


def best_isa() -> str:
    import torch

    if not _state.get("loaded"):
        return "reference"
    return ISA_NAMES[int(torch.ops.seftc_cpu.best_isa())]


@contextlib.contextmanager
def force_isa(name: str) -> Iterator[str]:
    """Cap the kernels' instruction set (avx512bf16 | avx512 | avx2 | scalar) inside the block."""
    import torch

    if not load():
        yield "reference"
        return
    from seftc.runtime import dispatch

    previous = os.environ.get("SEFTC_ISA")
    try:
        _state["isa"] = ISA_NAMES[int(torch.ops.seftc_cpu.set_isa(ISA_LEVELS[name]))]
        dispatch.invalidate()  # layers choose their path again for this instruction set
        yield str(_state["isa"])
    finally:
        _state["isa"] = ISA_NAMES[int(torch.ops.seftc_cpu.set_isa(ISA_LEVELS[previous] if previous in ISA_LEVELS else -1))]
        dispatch.invalidate()
