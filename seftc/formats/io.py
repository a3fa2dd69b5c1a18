"""Safetensors files of packed tensors: a streaming, atomic writer and a validating reader.

The container (formats/README.md) is a plain safetensors file. Its `__metadata__` holds
`seftc.container` ("1") and `seftc.tensors`, a JSON object giving every stored tensor its format,
format version, dtype, shape, params and sha256 checksum. Component tensors sit under the keys
their codec names (`NAME.values`, ...; a dense tensor under its own name).

The writer streams: each tensor's bytes go to a spool file as soon as it is added, so writing a
model holds one tensor in memory, not the model. The file appears under its final name only once
complete (temp file + rename). The reader verifies each tensor's checksum before decoding it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

import torch

from seftc.errors import FormatError, SeftcError
from seftc.formats.base import ST_DTYPES, VALUE_DTYPES, PackedTensor, name_problem, raw_bytes, st_name
from seftc.formats.dense import DENSE
from seftc.formats.registry import get_codec
from seftc.formats.shards import CloseOrAbort
from seftc.models.saving import current_umask

CONTAINER_VERSION = "1"
META_TENSORS = "seftc.tensors"
META_CONTAINER = "seftc.container"
_ENTRY_KEYS = {"format", "version", "dtype", "shape", "params", "sha256"}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_COPY_CHUNK = 16 << 20

if sys.byteorder != "little":  # safetensors data is little-endian; so are torch's buffers here
    raise ImportError("seftc.formats needs a little-endian machine")


@dataclass
class Entry:
    """What the metadata says about one stored tensor."""

    format: str
    version: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    params: dict[str, int] = field(default_factory=dict)
    sha256: str | None = None
    prefix: str | None = None  # legacy compressed-tensors files: the key prefix

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "version": self.version, "dtype": st_name(self.dtype), "shape": list(self.shape),
                "params": dict(sorted(self.params.items())), "sha256": self.sha256}


class SafetensorsWriter(CloseOrAbort):
    """Write one safetensors file key by key: each tensor's bytes go to a spool file as soon as it
    is added (one spool per alignment, so every tensor stays aligned to its element size), and
    `close()` writes header + spools to a temp file beside the target and renames it into place.
    Holds no tensor in memory; on `abort()` (or an exception in a `with` block) nothing is left."""

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._spools: dict[int, IO[bytes]] = {}
        self._index: list[tuple[str, str, list[int], int, int, int]] = []  # key, dtype, shape, align, start, end
        self.keys: set[str] = set()
        self.nbytes = 0  # tensor bytes added so far
        self.bytes_written = 0  # file size after close

    def add(self, key: str, t: torch.Tensor) -> None:
        if key in self.keys:
            raise SeftcError(f"key {key!r} is written twice")
        align = min(t.element_size(), 8)
        spool = self._spools.get(align)
        if spool is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            spool = self._spools[align] = tempfile.TemporaryFile(dir=self.path.parent, prefix=".spool-")
        start = spool.tell()
        spool.write(raw_bytes(t))
        self._index.append((key, st_name(t.dtype), [int(d) for d in t.shape], align, start, spool.tell()))
        self.keys.add(key)
        self.nbytes += spool.tell() - start

    def close(self) -> Path:
        header: dict[str, Any] = {"__metadata__": {"format": "pt", **self.metadata}}
        base, order = 0, (8, 4, 2, 1)
        for align in order:
            for key, dtype, shape, a, start, end in self._index:
                if a == align:
                    header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [base + start, base + end]}
            if align in self._spools:
                base += self._spools[align].tell()
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * ((-len(blob)) % 8)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(struct.pack("<Q", len(blob)))
                out.write(blob)
                for align in order:
                    spool = self._spools.get(align)
                    if spool is not None:
                        spool.seek(0)
                        shutil.copyfileobj(spool, out, _COPY_CHUNK)
                out.flush()
                os.fsync(out.fileno())
                self.bytes_written = out.tell()
            os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            self._close_spools()
        return self.path

    def abort(self) -> None:
        self._close_spools()

    def _close_spools(self) -> None:
        for spool in self._spools.values():
            spool.close()
        self._spools.clear()


class PackedWriter(CloseOrAbort):
    """Write a file of packed tensors (the container above) tensor by tensor; `close()` renames it
    into place. Use as a context manager: on an exception nothing is left on disk."""

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._file = SafetensorsWriter(self.path)
        self.entries: dict[str, Entry] = {}

    @property
    def nbytes(self) -> int:
        return self._file.nbytes

    @property
    def keys(self) -> set[str]:
        return self._file.keys

    @property
    def bytes_written(self) -> int:
        return self._file.bytes_written

    def add(self, name: str, packed: PackedTensor | torch.Tensor) -> Entry:
        """Store one tensor: a PackedTensor in its format, a plain tensor as `dense`."""
        if isinstance(packed, torch.Tensor):
            packed = DENSE.wrap(packed)
        problem = name_problem(name)
        if problem:
            raise FormatError(f"tensor name {name!r} {problem}; it cannot be stored")
        if name in self.entries:
            raise SeftcError(f"tensor {name!r} is written twice")
        codec = packed.codec
        keys = [codec.key(name, c) for c in codec.components]
        clash = [k for k in keys if k in self._file.keys]
        if clash:
            raise SeftcError(f"tensor {name!r}: its key {clash[0]!r} is already taken by another tensor")
        for key, comp in zip(keys, codec.components):
            self._file.add(key, packed.components[comp])
        entry = Entry(packed.format, codec.version, packed.dtype, tuple(packed.shape), dict(packed.params), packed.sha256(name))
        self.entries[name] = entry
        return entry

    def close(self) -> Path:
        """Write the file with its `seftc.tensors` metadata and rename it into place."""
        self._file.metadata = {**self.metadata, META_CONTAINER: CONTAINER_VERSION,
                               META_TENSORS: json.dumps({n: e.to_json() for n, e in self.entries.items()}, separators=(",", ":"))}
        return self._file.close()

    def abort(self) -> None:
        self._file.abort()


def save_packed(path: str | os.PathLike, tensors: dict[str, PackedTensor | torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` (packed or plain) to one safetensors file, atomically."""
    with PackedWriter(path, metadata) as w:
        for name, t in tensors.items():
            w.add(name, t)
    return w.path


class PackedReader:
    """Read and verify the tensors of one file written by PackedWriter.

    `legacy` reads a file without seftc metadata: a compressed-tensors format name from the
    fixed table (`ct-sparse-bitmask`, `ct-sparse-24-bitmask`) or `dense` (every key a plain
    tensor). Such files carry no checksums; only their structure is validated."""

    def __init__(self, path: str | os.PathLike, legacy: str | None = None):
        self.path = Path(path)
        try:
            from safetensors import safe_open

            self._file = safe_open(str(self.path), framework="pt")
            keys = list(self._file.keys())
            meta = self._file.metadata() or {}
        except FileNotFoundError:
            raise FormatError(f"{self.path}: no such file") from None
        except Exception as e:  # the safetensors parser rejects malformed files with assorted errors
            raise FormatError(f"{self.path}: not a readable safetensors file ({_first_line(e)})") from None
        self._keys = set(keys)
        if META_TENSORS in meta:
            self.entries = self._parse(meta)
            self.checksummed = True
        elif any(k.startswith("seftc.") for k in meta):
            seftc_keys = sorted(k for k in meta if k.startswith("seftc."))
            self._fail(f"was written by seftc (metadata {', '.join(seftc_keys)}) but its '{META_TENSORS}' checksums are gone; "
                       "refusing to read it unverified")
        elif legacy is not None:
            self.entries = self._legacy(keys, legacy)
            self.checksummed = False
        else:
            raise FormatError(f"{self.path}: has no '{META_TENSORS}' metadata; it was not written by seftc")
        for name in self.entries:
            problem = name_problem(name)
            if problem:
                self._fail(f"tensor name {name!r} {problem}")
        self._check_keys()

    def __enter__(self) -> "PackedReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._file = None

    def names(self) -> list[str]:
        return list(self.entries)

    def _fail(self, what: str) -> "NoReturn":  # type: ignore[name-defined]
        raise FormatError(f"{self.path.name}: {what}")

    def _parse(self, meta: dict[str, str]) -> dict[str, Entry]:
        if meta.get(META_CONTAINER) != CONTAINER_VERSION:
            self._fail(f"container version {meta.get(META_CONTAINER)!r} is not supported (expected {CONTAINER_VERSION!r})")
        try:
            raw = json.loads(meta[META_TENSORS], object_pairs_hook=_unique_keys)
        except _DuplicateKey as e:
            self._fail(f"metadata '{META_TENSORS}' names {str(e)!r} twice")
        except (ValueError, RecursionError):
            self._fail(f"metadata '{META_TENSORS}' is not valid JSON")
        if not isinstance(raw, dict):
            self._fail(f"metadata '{META_TENSORS}' is not a JSON object")
        return {name: self._entry(name, e) for name, e in raw.items()}

    def _entry(self, name: str, e: Any) -> Entry:
        def bad(what: str) -> "NoReturn":  # type: ignore[name-defined]
            self._fail(f"tensor {name!r}: {what}")

        if not isinstance(e, dict) or set(e) != _ENTRY_KEYS:
            bad(f"metadata entry must have exactly the keys {sorted(_ENTRY_KEYS)}")
        try:
            codec = get_codec(e["format"])
        except FormatError:
            bad(f"unknown format {e['format']!r}")
        if not _is_int(e["version"]) or e["version"] != codec.version:
            bad(f"format {codec.name!r} version {e['version']!r} is not supported (this seftc reads version {codec.version})")
        dtype = ST_DTYPES.get(e["dtype"]) if isinstance(e["dtype"], str) else None
        if dtype is None or (codec.sparse and dtype not in VALUE_DTYPES):
            bad(f"dtype {e['dtype']!r} is not valid for format {codec.name!r}")
        shape = e["shape"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            bad(f"shape {shape!r} is not a list of non-negative integers")
        params = e["params"]
        if not isinstance(params, dict) or not all(isinstance(k, str) and _is_int(v) for k, v in params.items()):
            bad(f"params {params!r} is not an object of integers")
        if not isinstance(e["sha256"], str) or not _HEX64.fullmatch(e["sha256"]):
            bad("sha256 is not 64 lowercase hex digits")
        return Entry(codec.name, e["version"], dtype, tuple(shape), dict(params), e["sha256"])

    def _legacy(self, keys: list[str], fmt: str) -> dict[str, Entry]:
        from seftc.formats.ct import legacy_entries

        if fmt == "dense":
            packed, dense = {}, keys
        else:
            packed, dense = legacy_entries(keys, fmt)
        entries: dict[str, Entry] = {}
        for name, info in packed.items():
            prefix = info["prefix"]
            shape_key, values_key = f"{prefix}.shape", f"{prefix}.compressed"
            if self._slice_numel(shape_key) != 2:
                self._fail(f"tensor {name!r} ({fmt}): component 'shape' does not hold two numbers")
            shape_t = self._get(name, shape_key)
            if shape_t.dtype not in (torch.int64, torch.int32):
                self._fail(f"tensor {name!r} ({fmt}): component 'shape' is not an integer tensor")
            shape = tuple(int(d) for d in shape_t.reshape(-1))
            dtype = self._slice_dtype(values_key)
            if dtype not in VALUE_DTYPES or any(d < 0 for d in shape):
                self._fail(f"tensor {name!r} ({fmt}): values dtype {dtype} or shape {list(shape)} is not valid")
            entries[name] = Entry(fmt, 1, dtype, shape, prefix=prefix)
        for key in dense:
            dtype = self._slice_dtype(key)
            shape = tuple(self._file.get_slice(key).get_shape())
            entries[key] = Entry("dense", 1, dtype, shape)
        return entries

    def _slice_dtype(self, key: str) -> torch.dtype | None:
        try:
            return ST_DTYPES.get(self._file.get_slice(key).get_dtype())
        except Exception as e:
            self._fail(f"key {key!r}: {_first_line(e)}")

    def _slice_numel(self, key: str) -> int:
        n = 1
        for d in self._file.get_slice(key).get_shape():
            n *= d
        return n

    def _check_keys(self) -> None:
        expected: dict[str, str] = {}
        for name, e in self.entries.items():
            codec = get_codec(e.format)
            for comp in codec.components:
                key = codec.key(name, comp)
                if key in expected:
                    self._fail(f"tensors {expected[key]!r} and {name!r} both claim key {key!r}")
                expected[key] = name
                if key not in self._keys:
                    self._fail(f"tensor {name!r} ({e.format}): component {comp!r} (key {key!r}) is missing")
        stray = sorted(self._keys - set(expected))
        if stray:
            self._fail(f"key {stray[0]!r} belongs to no tensor in the metadata")

    def _get(self, name: str, key: str) -> torch.Tensor:
        try:
            return self._file.get_tensor(key)
        except Exception as e:
            self._fail(f"tensor {name!r}: cannot read key {key!r} ({_first_line(e)})")

    def read(self, name: str, verify: bool = True) -> PackedTensor:
        """The stored tensor `name` in its packed form, checksum verified (not yet decoded)."""
        e = self.entries.get(name)
        if e is None:
            raise FormatError(f"{self.path.name}: holds no tensor {name!r}")
        codec = get_codec(e.format)
        comps = {c: self._get(name, codec.key(name, c)) for c in codec.components}
        packed = PackedTensor(e.format, e.shape, e.dtype, comps, dict(e.params), foreign=not self.checksummed)
        if verify and e.sha256 is not None and packed.sha256(name) != e.sha256:
            self._fail(f"tensor {name!r} ({e.format}): checksum mismatch; the file is corrupt")
        return packed

    def read_dense(self, name: str) -> torch.Tensor:
        """The stored tensor `name`, verified and decoded."""
        try:
            return self.read(name).to_dense(name)
        except FormatError as e:
            if str(e).startswith(self.path.name):
                raise
            raise FormatError(f"{self.path.name}: {e}") from None

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.entries:
            yield name, self.read_dense(name)


def load_packed(path: str | os.PathLike, legacy: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a packed file, decoded to dense."""
    with PackedReader(path, legacy) as r:
        return dict(r.items())


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: a key given twice is an error (json.loads would keep the last)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else e.__class__.__name__)[:200]
