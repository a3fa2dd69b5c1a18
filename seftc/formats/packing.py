"""Pack a model folder into compact sparse formats and unpack it back, tensor by tensor.

`pack_folder` reads each safetensors tensor on its own (memory: one tensor, never the model
twice), stores each 2-D float `*.weight` that has zeros in the chosen format (or the smallest
one, `auto`), everything else dense, and writes the output folder atomically. `unpack_folder`
reverses it into a folder `transformers.AutoModelForCausalLM.from_pretrained` loads.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch

from seftc.errors import FormatError, SeftcError
from seftc.formats.base import ST_DTYPES, VALUE_DTYPES, Analysis, PackedTensor, np_bits, st_name, values_tensor
from seftc.formats.ct import ct_format, sparsity_config
from seftc.formats.io import PackedReader, PackedWriter
from seftc.formats.shards import DEFAULT_MAX_SHARD_SIZE, CheckpointReader, ShardedWriter, checkpoint_files
from seftc.formats.registry import CHOICES, CT_LAYOUT, candidates, choose, get_codec, quantize_problem
from seftc.models.saving import writes_outputs
from seftc.progress import NO_PROGRESS, ProgressSink
from seftc.sizes import parse_size

PACK_MANIFEST = "seftc_pack.json"
PACK_VERSION = 1
PACK_MARKER = "seftc_pack"  # config.json key naming the writer; unpack removes it
FOREIGN = "none (foreign compressed-tensors folder)"  # how a folder read without checksums is reported
FOREIGN_NOTE = "read without checksums (foreign compressed-tensors folder)"
SEFTC_PREFIX = "packed"  # packed[-0000i-of-0000n].safetensors, not model.*: plain transformers must not half-load it
CT_PREFIX = "model"
DENSE_PREFIX = "model"


@dataclass
class TensorRecord:
    format: str
    shape: list[int]
    dtype: str
    nonzero: int
    bytes: int
    dense_bytes: int
    negative_zeros: int = 0


@dataclass
class PackResult:
    output: Path
    layout: str  # "seftc" | "compressed-tensors"
    format: str  # what was asked: auto or a format name
    files: list[str]
    tensors: dict[str, TensorRecord]
    file_bytes: int
    elapsed_s: float
    warnings: list[str] = field(default_factory=list)
    quantize: str = "none"  # or "int8": the sparse tensors' values (formats/int8.md)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.tensors.values())

    @property
    def bytes_per_weight(self) -> float | None:
        """Stored bytes per weight of the tensors kept in a sparse format (values, positions,
        scales: everything stored for them), e.g. ~0.43 at 70 % sparsity with int8."""
        return bytes_per_weight(self.tensors.values())

    @property
    def dense_bytes(self) -> int:
        return sum(r.dense_bytes for r in self.tensors.values())

    def manifest(self) -> dict[str, Any]:
        return {
            "seftc_pack": PACK_VERSION,
            "layout": self.layout,
            "format": self.format,
            "quantize": self.quantize,
            "files": self.files,
            "bytes": self.bytes,
            "dense_bytes": self.dense_bytes,
            "tensors": {n: asdict(r) for n, r in self.tensors.items()},
        }

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for r in self.tensors.values():
            counts[r.format] = counts.get(r.format, 0) + 1
        return {
            "output": str(self.output), "layout": self.layout, "format": self.format, "quantize": self.quantize, "formats": counts,
            "tensors": len(self.tensors), "bytes": self.bytes, "dense_bytes": self.dense_bytes, "file_bytes": self.file_bytes,
            "ratio": round(self.bytes / self.dense_bytes, 6) if self.dense_bytes else None,
            "bytes_per_weight": None if self.bytes_per_weight is None else round(self.bytes_per_weight, 4),
            "elapsed_s": round(self.elapsed_s, 3),
            "warnings": self.warnings,
        }


@dataclass
class UnpackResult:
    output: Path
    tensors: int
    file_bytes: int
    elapsed_s: float
    checksums: str = "verified"  # or FOREIGN

    def summary(self) -> dict[str, Any]:
        return {"output": str(self.output), "tensors": self.tensors, "file_bytes": self.file_bytes, "elapsed_s": round(self.elapsed_s, 3),
                "checksums": self.checksums}


def bytes_per_weight(records: Any) -> float | None:
    """Stored bytes per weight over the records (TensorRecord or manifest dicts) kept in a sparse format."""
    sparse = [r if isinstance(r, dict) else asdict(r) for r in records]
    sparse = [r for r in sparse if r["format"] != "dense"]
    weights = sum(int(np.prod(r["shape"])) for r in sparse)
    return sum(r["bytes"] for r in sparse) / weights if weights else None


def is_candidate(name: str, t: torch.Tensor) -> bool:
    """Whether pack considers storing `t` sparse: a 2-D float weight with at least one zero."""
    return name.endswith(".weight") and t.dim() == 2 and t.dtype in VALUE_DTYPES and t.numel() > 0


def clear_negative_zeros(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`t` with every -0.0 made +0.0 (numerically the same), and how many there were."""
    bits = np_bits(t)
    neg = bits == bits.dtype.type(1 << (8 * bits.itemsize - 1))
    n = int(np.count_nonzero(neg))
    if n == 0:
        return t, 0
    return values_tensor(np.where(neg, bits.dtype.type(0), bits), t.dtype), n


def pack_tensor(name: str, t: torch.Tensor, fmt: str = "auto", exact_zeros: bool = False,
                only_if_smaller: bool = True, quantize: str = "none") -> tuple[PackedTensor, TensorRecord]:
    """Choose a format for one tensor and pack it: dense when it is not a candidate or has no
    zeros, and (unless `only_if_smaller` is False) when no format is smaller than dense. With
    quantize="int8" a sparse tensor goes into the int8 variant of its layout (formats/int8.md)."""
    negative = 0
    if is_candidate(name, t):
        if not exact_zeros:
            t, negative = clear_negative_zeros(t)
        a = Analysis(t)
        chosen = _choose(a, name, fmt, only_if_smaller)
        if quantize != "none" and chosen != "dense":  # int8 values over the layout of a tensor stored sparse
            if a.int8 is None:
                raise SeftcError(f"tensor {name!r} holds NaN or infinite values, which int8 cannot represent; pack without --quantize")
            chosen = _choose(a, name, fmt, only_if_smaller, quantize)
        packed = get_codec(chosen).encode(a)
        nonzero = a.nnz
    else:
        packed = get_codec("dense").wrap(t)  # type: ignore[attr-defined]
        nonzero = int(torch.count_nonzero(t)) if t.is_floating_point() else t.numel()
    rec = TensorRecord(packed.format, list(packed.shape), st_name(packed.dtype), nonzero, packed.nbytes, packed.dense_bytes, negative)
    return packed, rec


def _choose(a: Analysis, name: str, fmt: str, only_if_smaller: bool, quantize: str = "none") -> str:
    """The format of one candidate tensor: dense without zeros; a named format wherever it holds
    the tensor when not `only_if_smaller`; otherwise `registry.choose` (smallest, or dense)."""
    named = candidates(fmt, quantize)[0] if fmt != "auto" else None
    if a.nnz == a.numel:
        return "dense"
    if not only_if_smaller and named is not None and get_codec(named).fits(a):
        return named
    return choose(a, fmt, name, quantize)


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of `files` (one checkpoint's shards), one at a time."""
    yield from CheckpointReader(files).items()


def _read_config(folder: Path) -> dict[str, Any]:
    from seftc.models.files import read_json

    path = folder / "config.json"
    if not os.path.lexists(path):
        raise SeftcError(f"{folder} has no config.json")
    config = read_json(path, folder)
    if not isinstance(config, dict):
        raise SeftcError(f"{path} is not a JSON object")
    return config


def seftc_markers(config: dict[str, Any]) -> list[str]:
    """The seftc fingerprints in a config.json: any key starting with `seftc`, at the top level or
    in its compressed-tensors block."""
    found = [k for k in config if isinstance(k, str) and k.startswith("seftc")]
    for block in ("quantization_config", "compression_config"):
        q = config.get(block)
        if isinstance(q, dict):
            found += [f"{block}.{k}" for k in q if isinstance(k, str) and k.startswith("seftc")]
            sc = q.get("sparsity_config")
            if isinstance(sc, dict):
                found += [f"{block}.sparsity_config.{k}" for k in sc if isinstance(k, str) and k.startswith("seftc")]
    return found


def _file_header(path: Path) -> tuple[list[str], dict[str, str]] | None:
    """A safetensors file's keys and metadata, or None when it is unreadable (reported when read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), f.metadata() or {}
    except Exception:
        return None


def _already_packed(folder: Path, files: list[Path], config: dict[str, Any]) -> str | None:
    """Why MODEL looks like the output of `seftc pack` (or of compressed-tensors), or None."""
    from seftc.formats.ct import legacy_entries
    from seftc.formats.io import META_TENSORS
    from seftc.formats.registry import CODECS

    if (folder / PACK_MANIFEST).is_file():
        return f"it holds {PACK_MANIFEST}"
    if seftc_markers(config):
        return f"config.json has {seftc_markers(config)[0]!r}"
    q = config.get("quantization_config") or config.get("compression_config")
    if isinstance(q, dict) and isinstance(q.get("sparsity_config"), dict) and not q.get("config_groups"):
        return "config.json has a compressed-tensors sparsity_config"
    for path in files:
        header = _file_header(path)
        if header is None:
            continue
        keys, meta = header
        try:
            entries = json.loads(meta.get(META_TENSORS, "{}"))
            packed = [n for n, e in entries.items() if isinstance(e, dict) and e.get("format") != "dense"]
        except (ValueError, AttributeError):
            packed = []
        if packed:
            return f"{path.name} stores {packed[0]!r} in format {entries[packed[0]]['format']!r}"
        for codec in CODECS.values():
            if not codec.sparse:
                continue
            try:  # keys `PREFIX.comp` covering a format's components (for seftc's formats PREFIX is the name)
                found, _ = legacy_entries(keys, codec.name)
            except FormatError as e:
                return str(e)
            if found:
                prefix = next(iter(found.values()))["prefix"]
                return f"{path.name} holds the {codec.name} components of {prefix!r}"
    return None


def _copy_side_files(src: Path, dst: Path, skip: set[str]) -> list[str]:
    """Copy config-like files (tokenizer, generation config, manifests), not weights, and never
    links out of the folder; returns a note naming what was left out, if anything."""
    from seftc.models.files import copy_side_files

    left_out = copy_side_files(src, dst, skip)
    if not left_out:
        return []
    return [f"not copied (links out of the folder, not regular files, or too large): {', '.join(left_out)}"]


@writes_outputs
def pack_folder(model: str | os.PathLike, output: str | os.PathLike, fmt: str = "auto", *, force: bool = False,
                exact_zeros: bool = False, only_if_smaller: bool = True, quantize: str = "none", trust_remote_code: bool = False,
                progress: ProgressSink = NO_PROGRESS, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> PackResult:
    """Pack MODEL (a folder, sharded or not, a .safetensors beside its config.json, or `default`)
    into OUTPUT, in shards of at most `max_shard_size` bytes.

    `fmt` is `auto` or a format name (see `registry.CHOICES`); a named format is used for every
    candidate tensor it can hold and, with `only_if_smaller`, where it is smaller than dense.
    `quantize="int8"` stores the sparse tensors' values as int8 with per-row scales (the `bitmask`
    and `2:4` layouts only: `fmt` auto, bitmask or 2:4; formats/int8.md)."""
    from seftc.models.loading import resolve_model
    from seftc.models.saving import atomic_folder, check_output

    if fmt not in CHOICES:
        raise SeftcError(f"unknown format {fmt!r}; choose one of {', '.join(CHOICES)}")
    problem = quantize_problem(fmt, quantize)
    if problem:
        raise SeftcError(problem)
    ref = resolve_model(model, trust_remote_code=trust_remote_code)
    if ref.kind == "gguf":
        raise SeftcError("pack reads safetensors weights; load the .gguf and save it as a model folder first")
    folder = ref.folder
    files = checkpoint_files(folder, ref.path if ref.kind == "safetensors" else None)
    shard_bytes = parse_size(max_shard_size, "--max-shard-size")
    config = _read_config(folder)
    why = _already_packed(folder, files, config)
    if why:
        raise SeftcError(f"{ref.spec} is already packed; unpack it first or pass the original folder ({why})")
    if config.get("quantization_config") or config.get("compression_config"):
        raise SeftcError(f"{folder} is already compressed or quantized (config.json has a quantization_config); unpack it first")
    out = check_output(output, force, inputs=(folder,))
    ct = fmt in CT_LAYOUT
    prefix = CT_PREFIX if ct else SEFTC_PREFIX
    start = time.perf_counter()
    records: dict[str, TensorRecord] = {}
    total = _count_tensors(files)
    advance = progress.task(f"packing ({fmt})", total)
    with atomic_folder(out) as tmp:
        with ShardedWriter(tmp, prefix, shard_bytes, PackedWriter) as writer:
            for key, tensor in iter_tensors(files):
                packed, rec = pack_tensor(key, tensor, fmt, exact_zeros, only_if_smaller, quantize)
                writer.add(key, packed, packed.nbytes)
                records[key] = rec
                del tensor, packed
                advance(1)
        warnings = _check_result(records, fmt)
        if ct:
            targets = [n[: -len(".weight")] for n, r in records.items() if r.format == fmt]
            elems = sum(r.dense_bytes // _itemsize(r.dtype) for r in records.values() if r.format == fmt)
            nonzero = sum(r.nonzero for r in records.values() if r.format == fmt)
            config["quantization_config"] = sparsity_config(fmt, targets, 1 - nonzero / elems if elems else 0.0)
        # the writer's fingerprint: a folder carrying it is never read as a foreign, unchecksummed one
        config[PACK_MARKER] = {"version": PACK_VERSION, "layout": "compressed-tensors" if ct else "seftc", "checksums": "sha256"}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        warnings += _copy_side_files(folder, tmp, {"config.json", PACK_MANIFEST})
        result = PackResult(out, "compressed-tensors" if ct else "seftc", fmt, writer.files, records,
                            sum((tmp / f).stat().st_size for f in writer.files), time.perf_counter() - start, warnings, quantize)
        (tmp / PACK_MANIFEST).write_text(json.dumps(result.manifest(), indent=2) + "\n", encoding="utf-8")
    return result


def _count_tensors(files: list[Path]) -> int | None:
    from safetensors import safe_open

    try:
        return sum(len(safe_open(str(f), framework="pt").keys()) for f in files)
    except Exception:
        return None


def _itemsize(st: str) -> int:
    return ST_DTYPES[st].itemsize


def _check_result(records: dict[str, TensorRecord], fmt: str) -> list[str]:
    sparse = [r for r in records.values() if r.nonzero < r.dense_bytes // _itemsize(r.dtype) and r.shape and len(r.shape) == 2]
    packed = [r for r in records.values() if r.format not in ("dense",)]
    if not sparse:
        raise SeftcError("nothing sparse to pack: every weight matrix of this model is dense; prune it first (seftc prune)")
    if fmt == "auto" and not packed:
        raise SeftcError("nothing to pack: no weight matrix is smaller in a sparse format than dense (too few zeros); prune it further")
    if fmt != "auto" and sparse and not packed:
        need = " (it needs at most 2 non-zeros in every aligned group of 4 columns)" if "24" in fmt or fmt == "2:4" else ""
        raise SeftcError(f"no tensor of this model is smaller in format {fmt!r} than dense{need}; use --format auto")
    warnings = []
    negative = sum(r.negative_zeros for r in records.values())
    if negative:
        warnings.append(f"{negative} weights were -0.0 and are stored as +0.0 (numerically equal); pass --exact-zeros to keep their sign bits")
    return warnings


class PackedFolder(NamedTuple):
    files: list[Path]
    legacy: str | None  # the compressed-tensors format to read a foreign folder with; None: seftc's
    manifest: dict[str, Any] | None  # seftc_pack.json (None for foreign folders)

    @property
    def checksums(self) -> str:
        """How the folder's tensors are verified: "verified" (sha256) or FOREIGN."""
        return FOREIGN if self.legacy is not None else "verified"


def packed_files(folder: Path) -> PackedFolder:
    """The weight files of a packed folder, the legacy format to read them with (None for
    seftc files), and its seftc_pack.json (None for foreign compressed-tensors folders).

    A folder without seftc_pack.json is read as a foreign compressed-tensors folder (structure
    checks only) only when nothing in it says seftc wrote it: a seftc marker in config.json or
    seftc metadata in a weight file means its checksums were stripped, and it is refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"{folder} is not a folder")
    manifest_path = folder / PACK_MANIFEST
    if os.path.lexists(manifest_path):
        from seftc.models.files import read_side_file

        try:
            manifest = json.loads(read_side_file(manifest_path, folder))
            files = manifest["files"]
            layout = manifest["layout"]
        except SeftcError as e:
            raise FormatError(str(e)) from None
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            raise FormatError(f"{manifest_path} is not a valid pack manifest") from None
        if not isinstance(files, list) or not all(isinstance(f, str) and f and "/" not in f and "\\" not in f and f not in (".", "..") for f in files):
            raise FormatError(f"{manifest_path}: 'files' must list file names inside the folder")
        if layout not in ("seftc", "compressed-tensors"):
            raise FormatError(f"{manifest_path}: unknown layout {layout!r}")
        paths = [folder / f for f in files]
        for p in paths:
            if not p.is_file():
                raise FormatError(f"{folder}: packed file {p.name} named in {PACK_MANIFEST} is missing")
        return PackedFolder(paths, None, manifest)
    config = _read_config(folder) if (folder / "config.json").is_file() else {}
    legacy = ct_format(config)
    markers = seftc_markers(config)
    if markers:
        raise FormatError(f"{folder} was written by seftc (config.json has {markers[0]!r}) but its {PACK_MANIFEST} is gone: "
                          "its checksums may have been stripped, so it is not read unverified; pack the original model again")
    if legacy is None:
        raise FormatError(f"{folder} is not a packed model: no {PACK_MANIFEST} and no compressed-tensors sparsity_config in config.json")
    try:
        files = checkpoint_files(folder)
    except SeftcError as e:
        raise FormatError(str(e)) from None
    for path in files:
        seftc_keys = sorted(k for k in (_file_header(path) or ([], {}))[1] if k.startswith("seftc."))
        if seftc_keys:
            raise FormatError(f"{folder} was written by seftc ({path.name} has '{seftc_keys[0]}' metadata) but its {PACK_MANIFEST} "
                              "is gone; restore it or pack the original model again")
    return PackedFolder(files, legacy, None)


def iter_packed(folder: Path) -> Iterator[tuple[PackedReader, str]]:
    """(reader, tensor name) for every stored tensor of a packed folder, file by file."""
    files, legacy, _ = packed_files(folder)
    seen: set[str] = set()
    for path in files:
        with PackedReader(path, legacy) as reader:
            for name in reader.names():
                if name in seen:
                    raise FormatError(f"{folder}: tensor {name!r} is stored twice")
                seen.add(name)
                yield reader, name


@writes_outputs
def unpack_folder(packed: str | os.PathLike, output: str | os.PathLike, *, force: bool = False,
                  progress: ProgressSink = NO_PROGRESS, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> UnpackResult:
    """Decode a packed folder (seftc's, or a compressed-tensors sparse one) into a dense HF folder,
    in shards of at most `max_shard_size` bytes (with the index when there is more than one)."""
    from seftc.models.saving import atomic_folder, check_output

    folder = Path(packed).expanduser()
    out = check_output(output, force, inputs=(folder,))
    source = packed_files(folder)
    files = source.files
    shard_bytes = parse_size(max_shard_size, "--max-shard-size")
    config = _read_config(folder)
    removed = [config.pop(k, None) for k in ("quantization_config", "compression_config", PACK_MARKER)]
    rewrite = any(v is not None for v in removed)
    start = time.perf_counter()
    count = 0
    advance = progress.task("unpacking", None)
    with atomic_folder(out) as tmp:
        with ShardedWriter(tmp, DENSE_PREFIX, shard_bytes) as writer:
            for reader, name in iter_packed(folder):
                writer.add(name, reader.read_dense(name))
                count += 1
                advance(1)
        if rewrite:
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copy2(folder / "config.json", tmp / "config.json")
        _copy_side_files(folder, tmp, {"config.json", PACK_MANIFEST, *(f.name for f in files)})
        size = sum((tmp / f).stat().st_size for f in writer.files)
    return UnpackResult(out, count, size, time.perf_counter() - start, source.checksums)
