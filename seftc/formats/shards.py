"""Sharded safetensors checkpoints, the Hugging Face layout: `PREFIX.safetensors` when everything
fits in one file, else `PREFIX-00001-of-0000N.safetensors` … plus `PREFIX.safetensors.index.json`
(`{"metadata": {"total_size": bytes}, "weight_map": {key: file}}`). See formats/sharded.md.

`ShardedWriter` streams: each tensor goes to the current shard's spool as soon as it is added and
a shard is closed when the next tensor would take it past `max_shard_size`, so writing a model
holds one tensor in memory, never the model (a tensor larger than the bound gets a shard of its
own, as in `save_pretrained`). `CheckpointReader` opens a folder's shards lazily (safetensors
memory-maps them) and reads one tensor at a time.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch

from seftc.errors import SeftcError

DEFAULT_MAX_SHARD_SIZE = "5GB"  # like save_pretrained before transformers 5


class CloseOrAbort:
    """A writer used as a context manager: `close()` on success, `abort()` (nothing left) on an
    exception. Subclasses define both."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class FileWriter(Protocol):
    nbytes: int
    keys: set[str]

    def add(self, name: str, obj: Any) -> Any: ...

    def close(self) -> Path: ...

    def abort(self) -> None: ...


def shard_name(prefix: str, i: int, n: int, suffix: str = ".safetensors") -> str:
    return f"{prefix}-{i:05d}-of-{n:05d}{suffix}" if n > 1 else f"{prefix}{suffix}"


def index_name(prefix: str, suffix: str = ".safetensors") -> str:
    return f"{prefix}{suffix}.index.json"


class ShardedWriter(CloseOrAbort):
    """Write tensors into `folder` as PREFIX shards of at most `max_shard_size` bytes, with the
    index when there is more than one. `open_file(path)` makes one shard's writer (default: a
    plain safetensors file; `PackedWriter` for packed models). `suffix` ends the file names
    (`.st` for seftc's mask file, which no weight loader may pick up). Use as a context manager."""

    def __init__(self, folder: str | os.PathLike, prefix: str = "model", max_shard_size: int = 5 * 10**9,
                 open_file: Callable[[Path], FileWriter] | None = None, suffix: str = ".safetensors"):
        from seftc.formats.io import SafetensorsWriter

        if max_shard_size <= 0:
            raise SeftcError(f"the shard size bound must be positive, got {max_shard_size}")
        self.folder = Path(folder)
        self.prefix, self.suffix = prefix, suffix
        self.max_shard_size = int(max_shard_size)
        self._open = open_file or SafetensorsWriter
        self._current: FileWriter | None = None
        self._closed: list[Path] = []  # shards written under provisional names
        self.weight_map: dict[str, int] = {}  # stored key -> shard number (0-based)
        self.total_size = 0
        self.files: list[str] = []  # final names, after close

    def add(self, name: str, obj: Any, nbytes: int | None = None) -> Any:
        """Store `obj` (whatever the shard writer takes) under `name`; `nbytes` is its stored size
        (default: the tensor's bytes)."""
        size = int(nbytes if nbytes is not None else obj.numel() * obj.element_size())
        if self._current is not None and self._current.nbytes > 0 and self._current.nbytes + size > self.max_shard_size:
            self._close_current()
        if self._current is None:
            self._current = self._open(self.folder / f".{self.prefix}.shard-{len(self._closed) + 1:05d}{self.suffix}")
        before = set(self._current.keys)
        result = self._current.add(name, obj)
        for key in self._current.keys - before:
            if key in self.weight_map:
                raise SeftcError(f"key {key!r} is written twice")
            self.weight_map[key] = len(self._closed)
        self.total_size += size
        return result

    def _close_current(self) -> None:
        assert self._current is not None
        self._closed.append(self._current.close())
        self._current = None

    def close(self) -> list[str]:
        """Close the last shard, give the shards their final names, write the index."""
        if self._current is not None or not self._closed:
            if self._current is None:
                self._current = self._open(self.folder / f".{self.prefix}.shard-00001{self.suffix}")
            self._close_current()
        n = len(self._closed)
        self.files = [shard_name(self.prefix, i + 1, n, self.suffix) for i in range(n)]
        for path, final in zip(self._closed, self.files):
            os.replace(path, self.folder / final)
        if n > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {k: self.files[i] for k, i in sorted(self.weight_map.items())}}
            (self.folder / index_name(self.prefix, self.suffix)).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return self.files

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None
        for path in self._closed:
            path.unlink(missing_ok=True)


def read_index(path: Path, suffix: str = ".safetensors") -> dict[str, str]:
    """The weight map of an index file, validated: file names (ending in `suffix`) inside the
    folder, all present."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        weight_map = raw["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise SeftcError(f"{path} is not a valid safetensors index (JSON with a 'weight_map')") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise SeftcError(f"{path}: 'weight_map' must map tensor names to file names")
    for name in set(weight_map.values()):
        if "/" in name or "\\" in name or name in ("", ".", "..") or not name.endswith(suffix):
            raise SeftcError(f"{path}: shard {name!r} is not a {suffix} file name inside the folder")
        if not (path.parent / name).is_file():
            raise SeftcError(f"{path.parent}: shard {name} named in {path.name} is missing; copy the whole checkpoint")
    return weight_map


def checkpoint_files(folder: Path, single: Path | None = None, prefix: str = "model") -> list[Path]:
    """The weight files of a checkpoint: `single` when given; the shards the folder's index names
    (in shard order) when it has one; else every `*.safetensors` of the folder."""
    if single is not None:
        return [Path(single)]
    folder = Path(folder)
    index = folder / index_name(prefix)
    if index.is_file():
        names = sorted(set(read_index(index).values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SeftcError(f"{folder} holds no *.safetensors weights")
    return files


class CheckpointReader:
    """Every tensor of a (possibly sharded) safetensors checkpoint by key, one at a time.

    Each file is validated by safetensors' own parser when opened; tensors are then read with
    plain positioned reads into fresh memory, not through a memory map: pages of a mapped file stay
    in the process's resident set while the map is open, so reading a whole checkpoint through
    one would grow the peak RSS to the checkpoint's size, however little the caller holds."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.files = files
        self._where: dict[str, tuple[int, str, tuple[int, ...], int, int]] = {}  # key -> file, dtype, shape, start, end
        for n, path in enumerate(files):
            try:
                with safe_open(str(path), framework="pt") as handle:
                    keys = list(handle.keys())
                with open(path, "rb") as f:
                    size = struct.unpack("<Q", f.read(8))[0]
                    header = json.loads(f.read(size))
            except Exception as e:  # the safetensors parser rejects malformed files with assorted errors
                raise SeftcError(f"cannot read {path}: {str(e).splitlines()[0][:200] if str(e) else e.__class__.__name__}") from None
            for key in keys:
                if key in self._where:
                    raise SeftcError(f"tensor {key!r} appears in more than one weight file of {path.parent}")
                info = header[key]
                start, end = info["data_offsets"]
                self._where[key] = (n, info["dtype"], tuple(info["shape"]), 8 + size + start, 8 + size + end)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key][2]

    def dtype(self, key: str) -> torch.dtype:
        from seftc.formats.base import ST_DTYPES

        return ST_DTYPES[self._where[key][1]]

    def get(self, key: str) -> torch.Tensor:
        from seftc.formats.base import ST_DTYPES

        n, dtype, shape, start, end = self._where[key]
        buf = bytearray(end - start)
        try:
            with open(self.files[n], "rb") as f:
                f.seek(start)
                if f.readinto(buf) != len(buf):
                    raise OSError("the file ends early")
        except OSError as e:
            raise SeftcError(f"cannot read tensor {key!r} from {self.files[n]}: {e}") from None
        if not buf:
            return torch.empty(shape, dtype=ST_DTYPES[dtype])
        return torch.frombuffer(buf, dtype=ST_DTYPES[dtype]).reshape(shape)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._where:
            yield key, self.get(key)
