"""Sparse formats: bit-exact round trips, sizes, the automatic choice, compressed-tensors layouts,
the container (checksums, atomic writes) and a clear FormatError for malformed input."""
from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch

from seftc.errors import FormatError
from seftc.formats import bitmask, csr, rice, two_four
from seftc.formats.base import Analysis, PackedTensor, pack_bits, unpack_bits
from seftc.formats.io import PackedReader, PackedWriter, load_packed, save_packed
from seftc.formats.registry import AUTO_CANDIDATES, CODECS, choose, get_codec

SPARSE = [n for n, c in CODECS.items() if c.sparse and not c.quantized]  # lossless; the int8 formats: test_formats_int8.py
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 8), (7, 13), (16, 36), (70, 24)]  # widths 13 and 36 are not multiples of 8; 70 rows span two rice blocks
SPARSITIES = [0.0, 0.5, "2:4", 0.7, 0.9, 1.0]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def make_sparse(shape: tuple[int, int], dtype: torch.dtype, sparsity: float | str, seed: int = 0) -> torch.Tensor:
    """A random matrix at the given sparsity (or 2:4), with row 0 empty when there are rows to spare."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    w = torch.randn(shape, generator=g).to(dtype)
    if sparsity == "2:4":
        groups = w.view(rows, cols // 4, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.abs().float().topk(2, -1).indices, True)
        w = torch.where(keep, groups, torch.zeros((), dtype=dtype)).view(shape)
    else:
        w = torch.where(torch.rand(shape, generator=g) < sparsity, torch.zeros((), dtype=dtype), w)
    if rows > 1:
        w[0] = 0
    return w


def cases():
    for fmt in SPARSE:
        for dtype in DTYPES:
            for shape in SHAPES:
                for sp in SPARSITIES:
                    if sp == "2:4" and shape[1] % 4:
                        continue
                    yield pytest.param(fmt, dtype, shape, sp, id=f"{fmt}-{str(dtype)[6:]}-{shape[0]}x{shape[1]}-{sp}")


@pytest.mark.parametrize("fmt,dtype,shape,sparsity", list(cases()))
def test_round_trip_bit_exact(fmt, dtype, shape, sparsity):
    w = make_sparse(shape, dtype, sparsity)
    codec = get_codec(fmt)
    a = Analysis(w)
    size = codec.nbytes(a)
    if size is None:  # 2:4 layouts where the pattern does not hold
        assert fmt in ("2:4", "ct-sparse-24-bitmask") and not a.is_24
        with pytest.raises(FormatError):
            codec.from_dense(w)
        return
    packed = codec.from_dense(w)
    assert packed.nbytes == size
    assert same_bits(codec.decode(packed, "t"), w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_survive(dtype):
    w = torch.zeros(3, 16, dtype=dtype)
    w[0, 1], w[0, 2], w[1, 5], w[2, 15] = -0.0, float("nan"), float("inf"), 1e-40 if dtype == torch.float32 else 1e-7
    for fmt in SPARSE:
        codec = get_codec(fmt)
        if codec.nbytes(Analysis(w)) is not None:
            assert same_bits(codec.decode(codec.from_dense(w)), w), fmt


def test_module_level_pairs():
    w = make_sparse((8, 24), torch.float16, "2:4")
    assert same_bits(bitmask.to_dense(bitmask.from_dense(w), w.shape, w.dtype), w)
    assert same_bits(csr.to_dense(csr.from_dense(w), w.shape, w.dtype), w)
    assert same_bits(two_four.to_dense(two_four.from_dense(w), w.shape, w.dtype), w)
    p = rice.RICE.from_dense(w)
    assert same_bits(rice.to_dense(p.components, w.shape, w.dtype, p.params), w)


def test_pack_bits_matches_numpy_little():
    bits = np.random.default_rng(0).random((5, 19)) < 0.4
    packed = pack_bits(bits)
    assert packed.shape == (5, 3) and all(int(packed[0, i // 8] >> (i % 8)) & 1 == bits[0, i] for i in range(19))  # LSB first
    assert np.array_equal(unpack_bits(packed, 19), bits)


@pytest.mark.parametrize("cols,width", [(1, torch.uint8), (256, torch.uint8), (257, torch.uint16), (65536, torch.uint16), (65537, torch.uint32)])
def test_csr_index_width(cols, width):
    w = torch.zeros(2, cols)
    w[1, cols - 1] = 1.0
    assert csr.from_dense(w)["col_indices"].dtype == width


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rice_is_near_the_information_bound(sparsity, dtype):
    w = make_sparse((512, 576), dtype, sparsity, seed=1)
    a = Analysis(w)
    d = a.nnz / a.numel
    bound = (a.nnz * a.itemsize * 8 + a.numel * -(d * math.log2(d) + (1 - d) * math.log2(1 - d))) / 8
    assert rice.RICE.nbytes(a) <= 1.03 * bound


def test_choose():
    assert choose(Analysis(make_sparse((64, 64), torch.float16, 0.0))) == "dense"
    assert choose(Analysis(make_sparse((64, 64), torch.float16, "2:4"))) == "2:4"
    assert choose(Analysis(make_sparse((64, 64), torch.float16, 0.9))) == "rice"
    # a named format is used only where it holds the tensor and beats dense
    assert choose(Analysis(make_sparse((64, 64), torch.float16, 0.5)), "2:4") == "dense"
    assert choose(Analysis(make_sparse((64, 64), torch.float16, 0.05, seed=3)), "csr") == "dense"
    for sp in (0.5, 0.7, 0.9, "2:4"):
        a = Analysis(make_sparse((128, 96), torch.bfloat16, sp))
        sizes = {n: get_codec(n).nbytes(a) for n in AUTO_CANDIDATES}
        chosen = choose(a)
        assert sizes[chosen] <= min(s for s in sizes.values() if s is not None) * 1.01


# --- compressed-tensors layouts -------------------------------------------------------------

def ct_reference(w: torch.Tensor, structured: bool) -> dict[str, np.ndarray]:
    """The legacy compressed-tensors layout, written out with numpy as that project does."""
    mask = (w != 0).numpy()
    if structured:
        g = mask.reshape(w.shape[0], -1, 4)
        assert (g.sum(-1) == 2).all()  # the reference keeps exactly two per group
    values = w.float().numpy()[mask]
    out = {"shape": np.array(list(w.shape), dtype=np.int64), "compressed": values, "bitmask": np.packbits(mask, axis=-1, bitorder="little")}
    if structured:
        out["shape"] = out["shape"].reshape(-1, 1)
        out["compressed"] = values.reshape(w.shape[0], w.shape[1] // 2)
    else:
        counts = mask.sum(-1)
        out["row_offsets"] = (np.cumsum(counts) - counts).astype(np.int64)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt,sparsity", [("ct-sparse-bitmask", 0.7), ("ct-sparse-bitmask", 1.0), ("ct-sparse-24-bitmask", "2:4")])
def test_ct_layout_is_compressed_tensors(fmt, sparsity, dtype):
    w = make_sparse((9, 20), dtype, sparsity, seed=5)
    if sparsity == "2:4":  # compressed-tensors keeps two per group; give every group two non-zeros
        w = make_sparse((9, 20), dtype, "2:4", seed=5)
        w[0] = make_sparse((2, 20), dtype, "2:4", seed=6)[1]
    packed = get_codec(fmt).from_dense(w)
    ref = ct_reference(w, sparsity == "2:4")
    assert sorted(packed.components) == sorted(ref)
    for comp, expect in ref.items():
        got = packed.components[comp]
        assert list(got.shape) == list(expect.shape), comp
        got = got.float().numpy() if got.is_floating_point() else got.numpy()
        assert np.array_equal(got, expect), comp
    assert str(packed.components["shape"].dtype) == "torch.int64"
    keys = [get_codec(fmt).key("model.layers.0.mlp.up_proj.weight", c) for c in get_codec(fmt).components]
    assert keys[0] == "model.layers.0.mlp.up_proj.shape"


def test_ct_foreign_file_read_without_metadata(tmp_path):
    """A file as compressed-tensors writes it (no seftc metadata) reads with structural checks."""
    from safetensors.torch import save_file

    w = make_sparse((6, 12), torch.float16, 0.6)
    ref = ct_reference(w, False)
    tensors = {f"layer.{k}": torch.from_numpy(v) for k, v in ref.items()}
    tensors["layer.compressed"] = tensors["layer.compressed"].half()
    tensors["norm.weight"] = torch.ones(4)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    got = load_packed(tmp_path / "model.safetensors", legacy="ct-sparse-bitmask")
    assert same_bits(got["layer.weight"], w) and torch.equal(got["norm.weight"], torch.ones(4))
    tensors["layer.row_offsets"][2] += 1
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(FormatError, match="layer.weight.*row_offsets"):
        load_packed(tmp_path / "bad.safetensors", legacy="ct-sparse-bitmask")


def test_ct_config_names_use_fixed_table():
    from seftc.formats.ct import ct_format

    assert ct_format({}) is None
    assert ct_format({"quantization_config": {"quant_method": "compressed-tensors", "sparsity_config": {"format": "sparse-bitmask"}}}) == "ct-sparse-bitmask"
    for bad in ("os.system", "sparse-24", "seftc.formats.io:save_packed"):
        with pytest.raises(FormatError, match="not one of"):
            ct_format({"quantization_config": {"quant_method": "compressed-tensors", "sparsity_config": {"format": bad}}})
    with pytest.raises(FormatError, match="quantized"):
        ct_format({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"g": {}}}})


# --- container ---------------------------------------------------------------------------------

def sample_file(tmp_path, fmt="rice"):
    w = make_sparse((20, 24), torch.float16, 0.8, seed=2)
    path = tmp_path / "t.safetensors"
    save_packed(path, {"a.weight": get_codec(fmt).from_dense(w), "b": torch.arange(5)})
    return path, w


def test_container_round_trip_and_metadata(tmp_path):
    path, w = sample_file(tmp_path)
    with PackedReader(path) as r:
        assert r.names() == ["a.weight", "b"]
        e = r.entries["a.weight"]
        assert (e.format, e.version, e.dtype, e.shape) == ("rice", 1, torch.float16, (20, 24))
        assert same_bits(r.read_dense("a.weight"), w)
        assert torch.equal(r.read_dense("b"), torch.arange(5))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:  # a plain safetensors file
        meta = f.metadata()
        assert meta["seftc.container"] == "1" and json.loads(meta["seftc.tensors"])["a.weight"]["format"] == "rice"
        assert "a.weight.values" in f.keys()


def test_writer_is_atomic(tmp_path):
    path = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError):
        with PackedWriter(path) as w:
            w.add("x", torch.ones(3))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    save_packed(path, {"x": torch.ones(3)})
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_writer_refuses_key_clash(tmp_path):
    from seftc.errors import SeftcError

    w = make_sparse((4, 8), torch.float32, 0.5)
    with pytest.raises(SeftcError, match="already taken"):
        save_packed(tmp_path / "x.safetensors", {"a.weight": get_codec("bitmask").from_dense(w), "a.weight.mask": torch.ones(1)})
    assert list(tmp_path.iterdir()) == []


def _rewrite_header(path, edit):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * ((-len(blob)) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])


def _edit_entry(key, value):
    def edit(header):
        entries = json.loads(header["__metadata__"]["seftc.tensors"])
        entries["a.weight"][key] = value
        header["__metadata__"]["seftc.tensors"] = json.dumps(entries)
    return edit


@pytest.mark.parametrize("edit,message", [
    (_edit_entry("shape", [1 << 20, 1 << 20]), "checksum mismatch"),
    (_edit_entry("shape", [20, 25]), "checksum mismatch"),
    (_edit_entry("shape", [-1, 24]), "non-negative"),
    (_edit_entry("dtype", "I64"), "dtype"),
    (_edit_entry("format", "pickle"), "unknown format"),
    (_edit_entry("version", 2), "version 2 is not supported"),
    (_edit_entry("params", {"k": 99, "block_rows": 64}), "checksum mismatch"),
    (_edit_entry("sha256", "0" * 64), "checksum mismatch"),
    (lambda h: h["__metadata__"].update({"seftc.container": "9"}), "container version"),
    (lambda h: h["__metadata__"].update({"seftc.tensors": "{"}), "not valid JSON"),
    (lambda h: h["__metadata__"].pop("seftc.tensors"), "written by seftc .*checksums are gone"),
    (lambda h: h.update({"stray": h.pop("b")}), "tensor 'b' .*is missing"),
    (lambda h: h["__metadata__"].update({"seftc.tensors": json.dumps({"a.weight": json.loads(h["__metadata__"]["seftc.tensors"])["a.weight"]})}),
     "'b' belongs to no tensor"),
])
def test_malformed_header_raises_format_error_naming_tensor(tmp_path, edit, message):
    path, _ = sample_file(tmp_path)
    _rewrite_header(path, edit)
    with pytest.raises(FormatError, match=message):
        with PackedReader(path) as r:
            for name in r.names():
                r.read_dense(name)


def test_flipped_data_byte_is_caught(tmp_path):
    path, _ = sample_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[-30] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"'a.weight'.*checksum mismatch|'b'.*checksum mismatch"):
        load_packed(path)


def test_truncated_file(tmp_path):
    path, _ = sample_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(FormatError, match="not a readable safetensors file"):
        load_packed(path)


@pytest.mark.parametrize("fmt,comp,mutate,message", [
    ("bitmask", "row_offsets", lambda t: t.flip(0), "row_offsets"),
    ("bitmask", "mask", lambda t: t ^ 0x80, "mask|row_offsets"),
    ("csr", "col_indices", lambda t: t.flip(0), "col_indices"),
    ("csr", "col_indices", lambda t: t.to(torch.uint16), "col_indices"),
    ("csr", "row_ptr", lambda t: t[:-1], "row_ptr"),
    ("2:4", "positions", lambda t: t.fill_(0), "strictly increasing"),
    ("2:4", "values", lambda t: t[:, :-1], "values"),
    ("rice", "high", lambda t: t[:-1], "high"),
    ("rice", "block_nnz", lambda t: t - t.clamp(max=1), "block_nnz"),
    ("rice", "low", lambda t: torch.cat([t, t.new_zeros(1)]), "low"),
    ("rice", "low", lambda t: t ^ 0xFF, "gap|block"),
    ("ct-sparse-24-bitmask", "bitmask", lambda t: t | 0x0F, "exactly two"),
    ("ct-sparse-bitmask", "shape", lambda t: t + 1, "shape"),
])
def test_malformed_components_raise_format_error(fmt, comp, mutate, message):
    """Structural checks, independent of the checksum (a file may be crafted with a valid one)."""
    sp = "2:4" if "24" in fmt or fmt == "2:4" else 0.9 if fmt == "rice" else 0.6
    w = make_sparse((66, 24), torch.float16, sp, seed=4)
    p = get_codec(fmt).from_dense(w)
    comps = dict(p.components)
    t = comps[comp]
    unsigned = t.dtype in (torch.uint16, torch.uint32)  # few torch ops take these; mutate as int64
    t = mutate(t.to(torch.int64) if unsigned else t.clone())
    comps[comp] = t.to(comps[comp].dtype) if unsigned and t.dtype == torch.int64 else t
    with pytest.raises(FormatError, match=f"'layer.weight' \\({fmt}\\).*({message})"):
        get_codec(fmt).decode(PackedTensor(fmt, p.shape, p.dtype, comps, p.params), "layer.weight")


def test_forged_shape_with_valid_checksum_is_bounded():
    """Even a crafted file whose checksum matches cannot make a reader allocate past the limit."""
    from seftc.formats.base import MAX_DENSE_BYTES

    p = csr.CSR_CODEC.from_dense(torch.zeros(2, 3))
    forged = PackedTensor("csr", (2, MAX_DENSE_BYTES), torch.float32, dict(p.components))
    with pytest.raises(FormatError, match="reader limit"):
        forged.to_dense("x")


def test_unknown_format_name():
    with pytest.raises(FormatError, match="unknown format"):
        get_codec("__import__")
