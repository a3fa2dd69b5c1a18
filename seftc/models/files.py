"""The files of a model folder besides its weights: read them bounded, copy them safely.

Side files (config.json, tokenizer and generation files, seftc manifests) are read only when they
are regular files of at most `SIDE_FILE_LIMIT` bytes, and only where they live inside the folder:
a symlink may point within the folder, or into the `blobs/` of a Hugging Face hub cache snapshot
(`models--X/snapshots/REV/config.json -> ../../blobs/HASH`), nowhere else. So `config.json ->
/dev/zero` is refused instead of read until memory runs out, and `notes.txt -> /etc/hostname` is
never copied into an output. Weight files are checked before anything allocates: a safetensors
header must be complete and consistent with the file's size.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from seftc.errors import SeftcError

SIDE_FILE_LIMIT = 64 << 20
# Files transformers or seftc read from a model folder (besides weights); checked before loading.
READ_BY_LOADERS = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "model.safetensors.index.json",
    "seftc_manifest.json", "seftc_pack.json",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf")


def _inside(folder: Path, target: Path) -> bool:
    folder = folder.resolve()
    if folder == target.parent or folder in target.parents:
        return True
    # a Hugging Face hub cache snapshot: models--X/snapshots/REV/NAME -> models--X/blobs/HASH
    return folder.parent.name == "snapshots" and target.parent == folder.parent.parent / "blobs"


def side_file_problem(path: Path, folder: Path | None = None, limit: int = SIDE_FILE_LIMIT) -> str | None:
    """Why `path` may not be read as a side file of `folder` (None: it may)."""
    try:
        target = path.resolve()
    except (OSError, RuntimeError):  # a loop of links
        return f"{path} is a link that cannot be resolved; replace it with the file itself"
    if folder is not None and not _inside(folder, target):
        return f"{path} is a link to {target}, outside the model folder; copy the file into the folder"
    try:
        st = os.stat(target)
    except OSError as e:
        return f"{path} cannot be read ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file; replace it with the file itself"
    if st.st_size > limit:
        return f"{path} is {st.st_size / 2**20:.0f} MiB, more than a side file may be ({limit >> 20} MiB); is it the right file?"
    return None


def read_side_file(path: str | os.PathLike, folder: Path | None = None, limit: int = SIDE_FILE_LIMIT) -> bytes:
    """The bytes of a side file (see the module docstring); SeftcError when it may not be read."""
    path = Path(path)
    problem = side_file_problem(path, folder, limit)
    if problem:
        raise SeftcError(problem)
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # it grew since stat
        raise SeftcError(f"{path} is larger than a side file may be ({limit >> 20} MiB)")
    return data


def read_json(path: str | os.PathLike, folder: Path | None = None, fix: str = "restore it") -> Any:
    """A bounded side file parsed as JSON; SeftcError naming the file otherwise."""
    path = Path(path)
    data = read_side_file(path, folder)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SeftcError(f"{path} is not readable JSON ({e.__class__.__name__}); {fix}") from None


def check_folder_files(folder: Path) -> None:
    """Before a loader (transformers' or seftc's) reads `folder`: every side file it may read is a
    bounded regular file inside the folder, and every weight file is a regular file."""
    folder = Path(folder)
    for name in READ_BY_LOADERS:
        path = folder / name
        if os.path.lexists(path):
            problem = side_file_problem(path, folder)
            if problem:
                raise SeftcError(problem)
    for path in folder.glob("*.safetensors"):
        try:
            regular = stat.S_ISREG(os.stat(path).st_mode)
        except OSError:
            regular = False
        if not regular:
            raise SeftcError(f"{path} is not a regular file; replace it with the weights file itself")


def check_safetensors(path: Path) -> list[str]:
    """The tensor names of a safetensors file, after checking its header is complete and agrees
    with the file's size (nothing is allocated). SeftcError naming the file otherwise."""
    from safetensors import safe_open

    try:
        size = os.stat(path).st_size
        if size < 8:
            raise ValueError("the file is empty" if size == 0 else f"the file has only {size} bytes")
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except OSError as e:
        raise SeftcError(f"cannot read {path}: {e.strerror}") from None
    except Exception as e:  # safetensors' own errors: truncated, lying or malformed header
        first = str(e).splitlines()[0][:200] if str(e) else e.__class__.__name__
        raise SeftcError(f"{path} is not a valid safetensors file ({first}); re-save or re-download it") from None


def copy_side_files(src: Path, dst: Path, skip: set[str]) -> list[str]:
    """Copy `src`'s side files (tokenizer, generation config, manifests, notes; not weights, not
    hidden files, not `skip`) into `dst`. Returns the names left out because they are links out of
    the folder, not regular files, or too large (see `side_file_problem`)."""
    left_out = []
    for f in sorted(Path(src).iterdir()):
        if f.name.startswith(".") or f.name in skip or f.name.endswith(WEIGHT_SUFFIXES) or f.name.endswith(".safetensors.index.json"):
            continue
        if f.is_dir() and not f.is_symlink():
            continue
        if side_file_problem(f, src):
            left_out.append(f.name)
            continue
        shutil.copy2(f.resolve(), dst / f.name)
    for index in sorted(Path(dst).glob("*.index.json")):  # a sharded side file (the mask file) is copied whole or not at all
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            shards = None
        if shards is None or not all(isinstance(n, str) and "/" not in n and (Path(dst) / n).is_file() for n in shards):
            for name in [index.name, *sorted(n for n in shards or () if isinstance(n, str) and "/" not in n)]:
                if (Path(dst) / name).is_file():
                    (Path(dst) / name).unlink()
                    left_out.append(name)
    return sorted(set(left_out))
