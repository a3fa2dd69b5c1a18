"""Golden files: the readers decode the checked-in files exactly, and the writer reproduces them
byte for byte, so no format can drift silently (formats/README.md, "Golden files")."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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
    expected = load_file(str(GOLDEN / "expected.safetensors"))
    prefix = "structured" if fmt in MG.STRUCTURED else "unstructured"
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


def test_writer_reproduces_golden_bytes(tmp_path):
    MG.write(tmp_path)
    for name in [*MG.FILES.values(), "expected.safetensors"]:
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
    docs = (GOLDEN.parent / ("24.md" if fmt == "2:4" else "ct.md" if fmt.startswith("ct-") else f"{fmt}.md")).read_text()
    assert digest in docs
