"""Atomic output writes. Everything goes to a temporary sibling folder that is renamed into place
only when complete, so a failure leaves nothing behind and never touches the input.

While a run writes OUT it holds the lock `.OUT.lock` beside it (seftc.locking: it dies with the
process), so a second run into the same OUT fails at once instead of mixing files. Temporaries are
named `.OUT.tmp-seftc-PID-START-XXXX` (and `.OUT.old-…` for a replaced folder); those of a process
that no longer runs are removed from the output's parent when the next run writes there."""
from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, ParamSpec, TypeVar

from seftc import locking
from seftc.errors import SeftcError, no_space
from seftc.formats.shards import DEFAULT_MAX_SHARD_SIZE
from seftc.sizes import parse_size

_TEMP = re.compile(r"^\..+\.(?:tmp|old)-seftc-(\d+)-(\d+)-[A-Za-z0-9_]+(?:\.[A-Za-z0-9]+)?$")
_held: dict[str, locking.HeldLock] = {}
P = ParamSpec("P")
R = TypeVar("R")


def _overlap(out: Path, src: Path) -> bool:
    """Whether writing the folder `out` (both resolved) would replace or change the input `src`:
    a folder input is replaced, entered or contained; a file input (.gguf, .safetensors) is only
    the file itself, or anything holding it."""
    if src.is_dir():
        return out == src or src in out.parents or out in src.parents
    return out == src or out in src.parents


def check_output(out: str | os.PathLike, force: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """Validate an output folder before any work starts and claim it (`lock_output`) for this run.

    A file input's side files (config.json, tokenizer) are read from its folder, so that folder
    may not be the output either: it holds the file."""
    out = Path(out).expanduser()
    resolved = out.resolve()
    for src in inputs:
        if _overlap(resolved, Path(src).resolve()):
            raise SeftcError(f"output {out} would overwrite the input model; choose another -o folder")
    if out.exists() and not force:
        raise SeftcError(f"output {out} already exists; pass --force to replace it or choose another -o folder")
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise SeftcError(f"output {out} exists and is not a folder; remove it or choose another -o folder")
    check_parent(out)
    lock_output(out)
    return out


def _follow_umask(folder: Path, umask: int) -> None:
    """Writers that go through a temporary file (transformers' save_pretrained among them) leave
    0600 files; give every file the mode the user's umask asks for, like any other file they write."""
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def check_parent(out: Path) -> Path:
    """The (resolved) folder `out` will be created in: it must exist and be writable."""
    parent = Path(out).expanduser().resolve().parent
    if not parent.is_dir():
        raise SeftcError(f"the parent folder of {out} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SeftcError(f"cannot write into {parent}; check its permissions")
    return parent


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """Validate an output file (e.g. `bench --plot`) before any work starts."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise SeftcError(f"{option} {path} is a folder; give a file name")
    check_parent(path)
    return path


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed."""
    path = Path(path).expanduser()
    clean_stale_temporaries(path.resolve().parent)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-seftc-{locking.identity()}-", suffix=path.suffix, dir=path.resolve().parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; an output file should get the usual mode
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def lock_output(out: str | os.PathLike) -> locking.HeldLock:
    """Hold `.OUT.lock` beside OUT until OUT is written (`atomic_folder` releases it) or the
    process exits; another process holding it fails this call at once. Re-entrant within a process.
    Also removes stale temporaries of dead seftc runs from OUT's parent."""
    resolved = Path(out).expanduser().resolve()
    key = str(resolved)
    held = _held.get(key)
    if held is not None and held.held:
        return held
    path = resolved.parent / f".{resolved.name}.lock"
    held = locking.try_lock(path)
    if held is None:
        pid = locking.holder(path)
        raise SeftcError(f"another seftc run is writing {out} (pid {pid if pid is not None else 'unknown'}); "
                         "wait for it to finish or choose another -o folder")
    _held[key] = held
    clean_stale_temporaries(resolved.parent)
    return held


def release_output(out: str | os.PathLike) -> None:
    held = _held.pop(str(Path(out).expanduser().resolve()), None)
    if held is not None:
        held.release()


def writes_outputs(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a library entry point that claims outputs (`check_output`, `lock_output`): every
    lock it took and still holds is released when it returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        before = set(_held)
        try:
            return fn(*args, **kwargs)
        finally:
            for key in set(_held) - before:
                release_output(key)

    return wrapper


def clean_stale_temporaries(parent: Path) -> list[Path]:
    """Remove seftc's own temporary folders in `parent` whose process has died; nothing else."""
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or entry.is_symlink():
            continue
        if locking.is_alive(int(m.group(1)), int(m.group(2))):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
        removed.append(Path(entry.path))
    return removed


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _temp_folder(out: Path, kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-seftc-{locking.identity()}-", dir=out.parent))


@contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out`, on any failure it is removed (and a
    replaced `out` is put back). Holds `out`'s lock throughout and releases it at the end."""
    out = Path(out).expanduser()
    out = out.resolve().parent / out.name
    lock_output(out)
    tmp: Path | None = None
    try:
        tmp = _temp_folder(out, "tmp")
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; a model folder should get the usual mode
        try:
            yield tmp
        except Exception as e:  # a full disk, wherever the writer noticed it: name the output
            space = no_space(e)
            if space is None:
                raise
            raise SeftcError(f"no space left on the device of {out.parent} writing {out.name}{space}; "
                             "free some space or write somewhere else (nothing was kept)") from None
        _follow_umask(tmp, current_umask())
        if out.exists() or out.is_symlink():
            trash = _temp_folder(out, "old")
            os.replace(out, trash / "old")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(trash / "old", out)
                raise
            finally:
                shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        release_output(out)


def saved_names(model) -> dict[str, str]:
    """State-dict key -> checkpoint key of every tensor `save_pretrained` would write: tied copies
    left out, transformers' per-architecture renamings reverted (e.g. GPT-NeoX `lm_head.` ->
    `embed_out.`). Works on a meta-device skeleton. Raises SeftcError for architectures whose
    checkpoint layout is not a renaming of the state dict (fused or split tensors)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict(keep_vars=True)
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    by_id = {id(t): k for k, t in state.items()}
    reverted = revert_weight_conversion(model, dict(state))
    names = {}
    for ckpt_key, t in reverted.items():
        key = by_id.get(id(t))
        if key is None:
            raise SeftcError(f"{type(model).__name__}: its checkpoint layout converts tensors (not only renames them); seftc cannot stream it")
        names[key] = ckpt_key
    return names


def write_config(model, folder: Path) -> None:
    """config.json (+ generation_config.json) as `save_pretrained` writes them."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is not None:
        model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def save_model(model, tokenizer, out: Path, extra_files: dict[str, str] | None = None, masks: dict | None = None,
               max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write a folder that plain `AutoModelForCausalLM.from_pretrained` loads (+ the masks file),
    its weights and its masks streamed into shards of at most `max_shard_size` bytes."""
    from seftc.formats.shards import ShardedWriter

    shard_bytes = parse_size(max_shard_size, "--max-shard-size")
    names = saved_names(model)
    state = model.state_dict()
    with atomic_folder(out) as tmp:
        write_config(model, tmp)
        with ShardedWriter(tmp, "model", shard_bytes) as writer:
            for key, ckpt_key in names.items():
                writer.add(ckpt_key, state[key])
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if masks:
            from seftc.models.manifest import save_masks

            save_masks(tmp, masks, shard_bytes)
    return Path(out)
