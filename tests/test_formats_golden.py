"""Golden files: the readers decode the checked-in files exactly, and the writer reproduces them
byte for byte, so no format can drift silently (formats/README.md, "Golden files")."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from seftc.formats.io import PackedReader

GOLDEN = Path(__file__).resolve().parents[1] / "formats" / "golden"


def _make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MG = _make_golden()


@pytest.mark.parametrize("fmt", list(MG.FILES))
def test_golden_file_decodes_exactly(fmt):
    expected = MG.load_expected()
    prefix = MG.prefix(fmt)
    with PackedReader(GOLDEN / MG.FILES[fmt]) as reader:
        names = reader.names()
        assert sorted(names) == sorted(k.split("/", 1)[1] for k in expected if k.startswith(prefix + "/"))
        for name in names:
            entry = reader.entries[name]
            assert entry.format == (fmt if name != "norm.weight" else "dense") and entry.version == 1
            got, want = reader.read_dense(name), expected[f"{prefix}/{name}"]
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name


def test_golden_files_cover_the_cases():
    t = MG.tensors(False)
    assert {v.dtype for v in t.values()} >= {torch.float32, torch.float16, torch.bfloat16}
    assert any(v.dim() == 2 and v.shape[1] % 8 for v in t.values())
    assert any(v.dim() == 2 and bool((v == 0).all(1).any()) for v in t.values())
    assert any(v.dim() == 2 and v.shape[0] > 64 for v in t.values())  # more than one rice block


def test_int8_golden_files_cover_the_cases():
    """The int8 inputs: all three dtypes, a row whose scale would be subnormal (stored as 0), a
    weight that quantizes to zero (dropped from the mask), empty rows; and they decode to within
    half a quantization step of their input."""
    expected = MG.load_expected()
    for structured in (False, True):
        for name, t in MG.int8_tensors(structured).items():
            got = expected[f"int8-{'structured' if structured else 'unstructured'}/{name}"]
            if t.dim() != 2:
                assert torch.equal(got, t)
                continue
            step = t.float().abs().amax(1, keepdim=True) / 127
            close = (got.float() - t.float()).abs() <= step / 2 + t.float().abs() * 2 ** -7
            assert bool((close | (step < 2.0 ** -126)).all()), name  # a row with a subnormal scale is stored as zeros
    tiny = MG.int8_tensors(False)["tiny.weight"]
    assert bool(tiny[0].ne(0).any()) and not bool(expected["int8-unstructured/tiny.weight"][0].ne(0).any())
    assert int((MG.int8_tensors(False)["f32.weight"] != 0).sum()) > int((expected["int8-unstructured/f32.weight"] != 0).sum())
    assert {t.dtype for t in MG.int8_tensors(True).values()} >= {torch.float32, torch.float16, torch.bfloat16}


def test_writer_reproduces_golden_bytes(tmp_path):
    MG.write(tmp_path)
    for name in [*MG.FILES.values(), *MG.EXPECTED_FILES]:
        assert (tmp_path / name).read_bytes() == (GOLDEN / name).read_bytes(), f"{name} drifted; see formats/README.md"


EXAMPLE = [[0, 1.0, 0, 0, -2.0, 0, 0, 3.0], [0, 0, 0, 0, 0, 0, 0, 0.5]]
SPEC_EXAMPLES = {  # the worked examples in formats/*.md, byte for byte
    "bitmask": ({"values": "003c00c000420038", "mask": "9280", "row_offsets": "000304"}, {},
                "d243f820da213bf1c81c56526f94be35e84ad4c67fed3a7f1ea8ec8ac8a2b831"),
    "csr": ({"values": "003c00c000420038", "col_indices": "01040707", "row_ptr": "000304"}, {},
            "4b19578200417a930d11a2d5466555ddb17f473923d1fb92f066e91cb91a0aae"),
    "2:4": ({"values": "0000003c00c0004200000000000000" + "38", "positions": "c4c4"}, {},
            "01671744823e0079239568a97d03d02e850734b8780889edd264070db09de952"),
    "rice": ({"values": "003c00c000420038", "low": "09", "high": "1501", "block_nnz": "0004", "block_bits": "0009"},
             {"k": 1, "block_rows": 64}, "be8c90f5bb449c30ba6ec379dda9ffb1e26ff76475bd2a0d00e9384ca4aeaeda"),
    "ct-sparse-bitmask": ({"shape": "0200000000000000" "0800000000000000", "compressed": "003c00c000420038", "bitmask": "9280",
                           "row_offsets": "0000000000000000" "0300000000000000"}, {},
                          "fce3852dccfb36301718f5af865e00043d78d77f022f4eea6a1296f900f139e7"),
    "ct-sparse-24-bitmask": ({"shape": "0200000000000000" "0800000000000000", "compressed": "0000003c00c000420000000000000038",
                              "bitmask": "9393"}, {}, "8046e5dbb914c7abc741b05be69e1bf2eb991c5f437e5f060bd2a4a1867923b1"),
    "bitmask-int8": ({"values": "2aab7f7f", "mask": "9280", "row_offsets": "000304", "scales": "0683c13c" "0402813b"}, {},
                     "b20cd8ff8cd7d5210ae000fdba9179951db50185e1141b395c9115aa503b56be"),
    "2:4-int8": ({"values": "002aab7f" "0000007f", "positions": "c4c4", "scales": "0683c13c" "0402813b"}, {},
                 "f26a1af661dc05afe38cbb30daae87b835dde491f3835905ad73ee271d18fc66"),
}


@pytest.mark.parametrize("fmt", list(SPEC_EXAMPLES))
def test_spec_worked_examples(fmt):
    from seftc.formats.base import raw_bytes
    from seftc.formats.registry import get_codec

    comps, params, digest = SPEC_EXAMPLES[fmt]
    packed = get_codec(fmt).from_dense(torch.tensor(EXAMPLE, dtype=torch.float16))
    assert {k: bytes(raw_bytes(v)).hex() for k, v in packed.components.items()} == comps
    assert packed.params == params
    assert packed.sha256("example.weight") == digest
    doc = "24.md" if fmt == "2:4" else "ct.md" if fmt.startswith("ct-") else "int8.md" if fmt.endswith("-int8") else f"{fmt}.md"
    docs = (GOLDEN.parent / doc).read_text()
    assert digest in docs
