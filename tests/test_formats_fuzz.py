"""Fuzzing the readers: mutated headers, truncated files and flipped bytes either decode to the
exact original tensors or raise FormatError — never another exception, never a wrong tensor,
never a hang, never a large allocation."""
from __future__ import annotations

import importlib.util
import json
import os
import resource
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seftc.errors import FormatError
from seftc.formats.io import PackedReader

GOLDEN = Path(__file__).resolve().parents[1] / "formats" / "golden"
_spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
MG = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(MG)

FILES = {fmt: (GOLDEN / name).read_bytes() for fmt, name in MG.FILES.items()}
EXPECTED = MG.load_expected()
MAX_SECONDS = 10.0
MAX_RSS_GROWTH_KB = 256 * 1024  # a forged shape must not make the reader allocate for it

FIELDS = ["format", "version", "dtype", "shape", "params", "sha256"]
WEIRD = st.one_of(
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.lists(st.integers(min_value=-5, max_value=1 << 62), max_size=4),
    st.sampled_from(["F16", "BF16", "F32", "I64", "U8", "rice", "csr", "2:4", "bitmask", "dense", "bitmask-int8", "2:4-int8", "I8", "", "x" * 64, "0" * 64]),
    st.dictionaries(st.sampled_from(["k", "block_rows", "x"]), st.integers(min_value=-3, max_value=1 << 50), max_size=3),
    st.none(), st.booleans(), st.floats(allow_nan=True),
)


def split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict, body: bytes) -> bytes:
    blob = json.dumps(header).encode()
    blob += b" " * ((-len(blob)) % 8)
    return struct.pack("<Q", len(blob)) + blob + body


def read_each(data: bytes, on_tensor) -> None:
    """Open `data` as a packed file and call on_tensor(reader, name) for every tensor; a
    FormatError anywhere is a valid outcome. Fast, and no allocation beyond the file's size."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.safetensors"
        path.write_bytes(data)
        try:
            with PackedReader(path) as reader:
                for name in reader.names():
                    on_tensor(reader, name)
        except FormatError:
            pass
    assert time.perf_counter() - start < MAX_SECONDS
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < MAX_RSS_GROWTH_KB


def check(fmt: str, data: bytes) -> None:
    """Read every tensor of `data`: each must be exactly the golden tensor, or FormatError."""
    prefix = MG.prefix(fmt)

    def exact(reader: PackedReader, name: str) -> None:
        got = reader.read_dense(name)
        want = EXPECTED.get(f"{prefix}/{name}")
        assert want is not None, f"reader returned an unknown tensor {name!r}"
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got.contiguous().view(torch.uint8), want.view(torch.uint8)), f"wrong tensor {name!r}"

    read_each(data, exact)


# SEFTC_FUZZ_EXAMPLES=5000 for a long random run; the default run is short and reproducible
_LONG = int(os.environ.get("SEFTC_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_LONG or 60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=not _LONG,
                database=None)


@FUZZ
@given(fmt=st.sampled_from(list(FILES)), flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=6))
def test_flipped_bytes(fmt, flips):
    data = bytearray(FILES[fmt])
    for where, xor in flips:
        data[int(where * len(data))] ^= xor
    check(fmt, bytes(data))


@FUZZ
@given(fmt=st.sampled_from(list(FILES)), keep=st.floats(0, 1, exclude_max=True))
def test_truncated(fmt, keep):
    data = FILES[fmt]
    check(fmt, data[: int(keep * len(data))])


@FUZZ
@given(fmt=st.sampled_from(list(FILES)), which=st.integers(0, 100), field=st.sampled_from(FIELDS), value=WEIRD)
def test_mutated_seftc_metadata(fmt, which, field, value):
    header, body = split(FILES[fmt])
    entries = json.loads(header["__metadata__"]["seftc.tensors"])
    name = sorted(entries)[which % len(entries)]
    entries[name][field] = value
    header["__metadata__"]["seftc.tensors"] = json.dumps(entries)
    check(fmt, join(header, body))


@FUZZ
@given(fmt=st.sampled_from(list(FILES)), which=st.integers(0, 100), shape=st.lists(st.integers(0, 1 << 40), max_size=3),
       dtype=st.sampled_from(["U8", "U16", "U32", "U64", "I64", "I8", "F16", "BF16", "F32", "BOOL"]))
def test_mutated_component_headers(fmt, which, shape, dtype):
    """Change one component's safetensors dtype/shape (its byte range kept or not)."""
    header, body = split(FILES[fmt])
    keys = sorted(k for k in header if k != "__metadata__")
    key = keys[which % len(keys)]
    header[key]["dtype"] = dtype
    header[key]["shape"] = shape
    check(fmt, join(header, body))


@FUZZ
@given(fmt=st.sampled_from(list(FILES)), which=st.integers(0, 100), scale=st.integers(1, 1 << 30))
def test_forged_shapes(fmt, which, scale):
    """Huge shapes in the metadata: refused before anything the size of the shape is allocated."""
    header, body = split(FILES[fmt])
    entries = json.loads(header["__metadata__"]["seftc.tensors"])
    name = sorted(entries)[which % len(entries)]
    entries[name]["shape"] = [d * scale for d in entries[name]["shape"]]
    header["__metadata__"]["seftc.tensors"] = json.dumps(entries)
    check(fmt, join(header, body))


def _packed_goldens():
    out = []
    for fmt, name in MG.FILES.items():
        with PackedReader(GOLDEN / name) as reader:
            out += [(n, reader.read(n)) for n in reader.names() if reader.entries[n].format != "dense"]
    return out


PACKED = _packed_goldens()
_UINT = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}


@FUZZ
@given(which=st.integers(0, 1000), comp=st.integers(0, 10), flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=4),
       resize=st.integers(-3, 3), retype=st.sampled_from([None, 1, 2, 4, 8]), params=st.none() | st.dictionaries(st.sampled_from(["k", "block_rows"]), st.integers(-2, 70)))
def test_decoders_with_crafted_components(which, comp, flips, resize, retype, params):
    """No checksum in the way (as in a crafted file): the decoder may return some tensor, but it
    must never raise anything but FormatError, hang, or allocate beyond the data it was given."""
    from dataclasses import replace

    name, packed = PACKED[which % len(PACKED)]
    comps = dict(packed.components)
    key = sorted(comps)[comp % len(comps)]
    raw = bytearray(comps[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for where, xor in flips:
        if raw:
            raw[int(where * len(raw))] ^= xor
    item = comps[key].element_size() if retype is None else retype
    size = comps[key].element_size()
    n = max(len(raw) // size + resize, 0)
    raw = (raw + bytes(size * 4))[: n * size]
    raw = raw[: len(raw) - len(raw) % item]
    dtype = comps[key].dtype if retype is None else _UINT[item]
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype) if raw else torch.zeros(0, dtype=dtype)
    comps[key] = t if comps[key].dim() == 1 or retype is not None or resize else t.view(comps[key].shape)
    crafted = replace(packed, components=comps, params=packed.params if params is None else params)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        crafted.to_dense(name)
    except FormatError:
        pass
    assert time.perf_counter() - start < MAX_SECONDS
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < MAX_RSS_GROWTH_KB


@FUZZ
@given(fmt=st.sampled_from(["ct-sparse-bitmask", "ct-sparse-24-bitmask"]),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=4))
def test_foreign_ct_files(fmt, flips):
    """compressed-tensors' own files carry no checksums: a damaged one may decode to some other
    tensor, but the reader still raises nothing but FormatError, and fast."""
    header, body = split(FILES[fmt])
    header["__metadata__"] = {"format": "pt"}
    data = bytearray(join(header, body))
    for where, xor in flips:
        data[int(where * len(data))] ^= xor
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(bytes(data))
        try:
            with PackedReader(path, legacy=fmt) as reader:
                for name in reader.names():
                    reader.read_dense(name)
        except FormatError:
            pass
    assert time.perf_counter() - start < MAX_SECONDS


# --- mutants that get past the checksum ---------------------------------------------------------

def sha256_from_spec(name: str, entry: dict, header: dict, body: bytes) -> str:
    """The checksum of formats/README.md ("Checksum"), computed from the file's own header and
    bytes — written from the spec, independently of seftc's writer, as an attacker would."""
    import hashlib

    from seftc.formats.registry import get_codec

    codec = get_codec(entry["format"])
    h = hashlib.sha256()
    h.update(name.encode() + b"\n")
    params = ";".join(f"{k}={entry['params'][k]}" for k in sorted(entry["params"]))
    dims = "x".join(str(d) for d in entry["shape"])
    h.update(f"seftc/{entry['format']}/{entry['version']}/{entry['dtype']}/{dims}/{params}\n".encode())
    for comp in codec.components:
        info = header[codec.key(name, comp)]
        start, end = info["data_offsets"]
        h.update(f"{comp}/{info['dtype']}/{'x'.join(str(d) for d in info['shape'])}\n".encode() + body[start:end])
    return h.hexdigest()


def with_checksums(header: dict, body: bytes) -> bytes:
    """Recompute every entry's sha256 after a mutation; entries whose keys are gone keep theirs."""
    entries = json.loads(header["__metadata__"]["seftc.tensors"])
    for name, entry in entries.items():
        try:
            entry["sha256"] = sha256_from_spec(name, entry, header, body)
        except (KeyError, TypeError, ValueError, FormatError):
            pass
    header["__metadata__"]["seftc.tensors"] = json.dumps(entries)
    return join(header, body)


def check_canonical(data: bytes) -> None:
    """Read every tensor of a mutant whose checksums were recomputed: either FormatError, or a
    tensor whose re-encoding reproduces the stored components byte for byte (one encoding per
    tensor: nothing non-canonical is accepted)."""
    from seftc.formats.base import np_bits
    from seftc.formats.registry import get_codec

    def canonical(reader: PackedReader, name: str) -> None:
        stored = reader.read(name)
        dense = reader.read_dense(name)
        codec = get_codec(stored.format)
        if codec.quantized:  # lossy: the tensor is its (int8 q, scales) pair (formats/int8.md, Canonical form)
            q, scales = codec.quantized(stored, name)
            again = codec.from_quantized(q, scales, stored.dtype)
            assert torch.equal(codec.decode(again, name).view(torch.uint8), dense.view(torch.uint8)), name
        else:
            again = codec.from_dense(dense) if stored.format != "dense" else stored
        assert again.params == stored.params, (name, again.params, stored.params)
        for comp, t in stored.components.items():
            got = again.components[comp]
            assert got.dtype == t.dtype and got.shape == t.shape, (name, comp)
            assert np.array_equal(np_bits(got), np_bits(t)), f"non-canonical {comp!r} of {name!r} accepted"

    read_each(data, canonical)


@FUZZ
@given(fmt=st.sampled_from(list(FILES)), flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=6))
def test_body_mutants_with_recomputed_checksums(fmt, flips):
    """Flip bytes of the tensor data, then recompute the checksums (as formats/README.md lets
    anyone do): every mutant reaches the structural checks."""
    header, body = split(FILES[fmt])
    body = bytearray(body)
    for where, xor in flips:
        body[int(where * len(body))] ^= xor
    check_canonical(with_checksums(header, bytes(body)))


@FUZZ
@given(fmt=st.sampled_from(list(FILES)), which=st.integers(0, 100), field=st.sampled_from(["shape", "params"]),
       dims=st.lists(st.integers(0, 1 << 14), min_size=2, max_size=2), params=st.dictionaries(st.sampled_from(["k", "block_rows"]), st.integers(0, 80)),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=2))
def test_header_mutants_with_recomputed_checksums(fmt, which, field, dims, params, flips):
    """Forge a tensor's shape or params (and maybe some data bytes), checksums recomputed."""
    header, body = split(FILES[fmt])
    entries = json.loads(header["__metadata__"]["seftc.tensors"])
    name = sorted(entries)[which % len(entries)]
    entries[name][field] = dims if field == "shape" else {**entries[name]["params"], **params}
    header["__metadata__"]["seftc.tensors"] = json.dumps(entries)
    body = bytearray(body)
    for where, xor in flips:
        body[int(where * len(body))] ^= xor
    check_canonical(with_checksums(header, bytes(body)))
