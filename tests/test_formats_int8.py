"""The int8 formats (`bitmask-int8`, `2:4-int8`; formats/int8.md): quantization, round trip,
canonical form, corruption refusals, and `seftc pack --quantize int8` / `seftc inspect`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import pruned_tiny_llama
from test_formats_cli import run as run_strs, tiny, tiny24  # noqa: F401 (fixtures)
from seftc.errors import FormatError
from seftc.formats.base import Analysis, PackedTensor
from seftc.formats.int8 import BITMASK_INT8, TWO_FOUR_INT8
from seftc.formats.io import PackedReader, save_packed
from seftc.formats.quantize import quantize_rows

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _weight(rows: int, cols: int, sparsity: float | str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Random pruned weight with an all-zero row, a fully dense row and a tiny value that quantizes to 0."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if sparsity == "2:4":
        groups = w.reshape(rows, -1, 4)
        groups.scatter_(-1, groups.abs().argsort(dim=-1)[..., :2], 0.0)
        w = groups.reshape(rows, cols)
    else:
        w[torch.rand(rows, cols, generator=g) < sparsity] = 0
        if rows > 2:
            w[1] = torch.randn(cols, generator=g) + 3.0  # dense row
    if rows > 2:
        w[0] = 0
    if rows > 2 and cols >= 4:
        w[2, 0], w[2, 1] = 50.0, 1e-3  # 1e-3 rounds to q = 0 next to 50 and is not stored
        if sparsity == "2:4":
            w[2, 2:4] = 0
    return w.to(dtype)


def run(*args, ok: bool = True):
    return run_strs(*map(str, args), ok=ok)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _reference(t: torch.Tensor) -> torch.Tensor:
    """formats/int8.md's decode(quantize(t)), from the spec's formulas."""
    x = t.float()
    s = x.abs().amax(1) / 127
    s = torch.where(s >= 2.0 ** -126, s, torch.zeros_like(s))
    q = torch.where(s[:, None] > 0, torch.round(x / torch.where(s > 0, s, 1.0)[:, None]), torch.zeros_like(x))
    return (q * s[:, None] + 0.0).to(t.dtype)  # an int8 zero decodes to +0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec,sparsity", [(BITMASK_INT8, 0.0), (BITMASK_INT8, 0.5), (BITMASK_INT8, 0.9), (BITMASK_INT8, 1.0),
                                            (TWO_FOUR_INT8, "2:4")])
def test_round_trip_is_the_spec_quantization(codec, sparsity, dtype):
    for rows, cols in ((1, 4), (7, 12), (33, 100) if sparsity != "2:4" else (33, 96), (5, 1) if sparsity != "2:4" else (5, 4)):
        w = _weight(rows, cols, sparsity, dtype)
        p = codec.from_dense(w)
        assert p.components["values"].dtype == torch.int8 and p.components["scales"].dtype == torch.float32
        out = p.to_dense("w")
        assert out.dtype == dtype and out.shape == w.shape
        assert same_bits(out, _reference(w))
        # error at most half a step of the row's scale (plus the dtype's rounding of the product)
        s = w.float().abs().amax(1, keepdim=True) / 127
        assert bool(((out.float() - w.float()).abs() <= s / 2 + w.float().abs() * 2 ** -7 + 1e-30).all())
        assert bool((out[w == 0] == 0).all())  # pruned positions stay zero
        q, scales = codec.quantized(p, "w")
        assert bool((q[scales > 0].abs().amax(1) == 127).all()) and not q[scales == 0].any()
        again = codec.from_quantized(q, scales, dtype)
        for k, v in p.components.items():
            assert torch.equal(again.components[k], v), k


def test_sizes_at_70_percent_are_about_043_bytes_per_weight():
    w = _weight(576, 1536, 0.7)
    p = BITMASK_INT8.from_dense(w)
    assert 0.42 < p.nbytes / w.numel() < 0.44
    assert BITMASK_INT8.nbytes(Analysis(w)) == p.nbytes
    w24 = _weight(64, 256, "2:4")
    assert TWO_FOUR_INT8.from_dense(w24).nbytes == 64 * 128 + 64 * 32 + 64 * 4


def test_scale_edge_cases():
    w = torch.tensor([[0.0, 1e-37, -3e-37, 0.0], [0.0, 0.0, 0.0, 0.0], [-2.0, 0.0, 1.0, 0.0]])
    q, s = quantize_rows(w)
    assert s[0] == 0 and s[1] == 0 and not q[:2].any()  # subnormal scale -> row stored as zeros
    assert q[2].tolist() == [-127, 0, 64, 0]
    assert quantize_rows(torch.tensor([[1.0, float("nan")]])) is None
    with pytest.raises(FormatError, match="NaN or infinite"):
        BITMASK_INT8.from_dense(torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(FormatError, match="does not fit format '2:4-int8'"):
        TWO_FOUR_INT8.from_dense(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


def _mutated(p: PackedTensor, comp: str, fn) -> PackedTensor:
    comps = dict(p.components)
    comps[comp] = fn(comps[comp].clone())
    return PackedTensor(p.format, p.shape, p.dtype, comps, dict(p.params))


@pytest.mark.parametrize("codec,sparsity", [(BITMASK_INT8, 0.6), (TWO_FOUR_INT8, "2:4")])
def test_non_canonical_components_are_refused(codec, sparsity):
    p = codec.from_dense(_weight(6, 16, sparsity))
    bad = {
        "negative scale": _mutated(p, "scales", lambda s: -s),
        "subnormal scale": _mutated(p, "scales", lambda s: torch.where(s > 0, torch.full_like(s, 1e-40), s)),
        "nan scale": _mutated(p, "scales", lambda s: torch.where(s > 0, torch.full_like(s, float("nan")), s)),
        "-0.0 scale": _mutated(p, "scales", lambda s: torch.where(s == 0, torch.full_like(s, -0.0), s)),
        "overflowing scale": _mutated(p, "scales", lambda s: torch.where(s > 0, torch.full_like(s, 1e38), s)),
        "-128": _mutated(p, "values", lambda v: torch.where(v == 127, torch.full_like(v, -128), v)),
        "peak below 127": _mutated(p, "values", lambda v: torch.where(v.abs() == 127, v // 2, v)),
        "wrong dtype": _mutated(p, "values", lambda v: v.view(torch.uint8)),
    }
    if codec is BITMASK_INT8:
        bad["stored zero"] = _mutated(p, "values", lambda v: torch.where(v.abs() < 127, torch.zeros_like(v), v))
    else:
        bad["scale 0, values kept"] = _mutated(p, "scales", lambda s: torch.where(s > 0, torch.zeros_like(s), s))
    for what, m in bad.items():
        with pytest.raises(FormatError):
            m.to_dense("w")
            pytest.fail(what)


@pytest.mark.parametrize("codec,sparsity", [(BITMASK_INT8, 0.6), (TWO_FOUR_INT8, "2:4")])
def test_checksum_catches_corruption(codec, sparsity, tmp_path):
    p = codec.from_dense(_weight(8, 32, sparsity, torch.bfloat16))
    path = save_packed(tmp_path / "f.safetensors", {"layer.weight": p})
    with PackedReader(path) as r:
        assert torch.equal(r.read_dense("layer.weight"), p.to_dense())
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # last component's data (int8 values or their positions/scales)
    path.write_bytes(bytes(data))
    with PackedReader(path) as r, pytest.raises(FormatError, match="checksum"):
        r.read_dense("layer.weight")


# --- seftc pack --quantize int8 ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,fixture,expect", [("auto", "tiny", {"bitmask-int8"}), ("bitmask", "tiny", {"bitmask-int8"}),
                                                ("2:4", "tiny24", {"2:4-int8"}), ("auto", "tiny24", {"2:4-int8", "bitmask-int8"})])
def test_pack_quantize_int8(fmt, fixture, expect, request, tmp_path):
    src, state = request.getfixturevalue(fixture)
    out = tmp_path / "p"
    s = json.loads(run("pack", src, "-o", out, "--format", fmt, "--quantize", "int8", "--json").stdout)
    assert s["quantize"] == "int8" and s["formats"]["dense"] == len(state) - 14
    assert set(s["formats"]) - {"dense"} <= expect and sum(n for f, n in s["formats"].items() if f != "dense") == 14
    manifest = json.loads((out / "seftc_pack.json").read_text())
    assert manifest["quantize"] == "int8"
    sparse = [r for r in manifest["tensors"].values() if r["format"] != "dense"]
    # 50 % sparse: int8 values 0.5 B + mask or positions 0.125 B + offsets and scales (large here: 64-128 columns)
    assert s["bytes_per_weight"] == pytest.approx(sum(r["bytes"] for r in sparse) / sum(np.prod(r["shape"]) for r in sparse), rel=1e-3)
    assert 0.6 < s["bytes_per_weight"] < 0.75
    with PackedReader(out / "packed.safetensors") as r:
        for name, w in state.items():
            got = r.read_dense(name)
            if r.entries[name].format == "dense":
                assert torch.equal(got, w), name
            else:
                assert same_bits(got, _reference(w)), name
    info = json.loads(run("inspect", out, "--json").stdout)
    assert info["packed"] == {"format": fmt, "quantize": "int8"}
    assert {row["format"] for row in info["layers"]} <= expect
    assert info["bytes"]["per_target_weight"] == pytest.approx(s["bytes_per_weight"], rel=1e-3)
    assert all(abs(row["sparsity"] - 0.5) < 0.02 for row in info["layers"])
    text = run("inspect", out).stdout
    assert "B/weight" in text and "int8" in text
    unpacked = tmp_path / "u"
    run("unpack", out, "-o", unpacked)  # dequantized, loadable as a plain model
    from transformers import AutoModelForCausalLM

    sd = AutoModelForCausalLM.from_pretrained(str(unpacked)).state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    assert same_bits(sd[name], _reference(state[name]))


def test_pack_summary_line_reports_bytes_per_weight(tiny, tmp_path):
    r = run("pack", tiny[0], "-o", tmp_path / "p", "--quantize", "int8")
    assert "B/weight" in r.output and "bitmask-int8" in r.output


@pytest.mark.parametrize("fmt", ["csr", "rice", "ct-sparse-bitmask", "ct-sparse-24-bitmask"])
def test_quantize_refused_where_it_cannot_apply(tiny, tmp_path, fmt):
    out = tmp_path / "p"
    r = run("pack", tiny[0], "-o", out, "--format", fmt, "--quantize", "int8", ok=False)
    assert r.exit_code == 2 and "Traceback" not in r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--quantize int8" in lines[0] and "--format auto" in lines[0]
    assert not out.exists()


def test_quantize_refuses_non_finite_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "m"
    state = pruned_tiny_llama(src)
    model = AutoModelForCausalLM.from_pretrained(str(src))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    model.save_pretrained(src)
    r = run("pack", src, "-o", tmp_path / "p", "--quantize", "int8", ok=False)
    assert r.exit_code == 2 and "NaN or infinite" in r.output and "up_proj" in r.output and not (tmp_path / "p").exists()
    assert state  # the pruned model itself still packs without --quantize
    run("pack", src, "-o", tmp_path / "q")


def test_recipe_pack_stage_takes_quantize():
    from seftc.compress.recipe import PACK_QUANTIZE, load_recipe
    from seftc.errors import SeftcError
    from seftc.formats.registry import QUANTIZE

    assert PACK_QUANTIZE == QUANTIZE
    r = load_recipe(None, ["pack.quantize=int8", "pack.format=2:4"])
    assert r.pack.quantize == "int8" and r.pack.format == "2:4"
    with pytest.raises(SeftcError, match="--quantize int8 applies"):
        load_recipe(None, ["pack.quantize=int8", "pack.format=rice"])
    with pytest.raises(SeftcError):
        load_recipe(None, ["pack.quantize=int4"])


def test_inspect_reports_bytes_per_weight_for_unpacked_models(tiny):
    info = json.loads(run("inspect", tiny[0], "--json").stdout)
    assert info["packed"] is None and info["bytes"]["per_target_weight"] == 4.0
    assert {row["format"] for row in info["layers"]} == {"dense"}


def test_fuzz_canonical_check_covers_int8(tmp_path):
    """The fuzzer's canonical check re-encodes int8 tensors from (q, scales): a decoded golden
    tensor re-encodes to the same bytes."""
    golden = Path(__file__).resolve().parents[1] / "formats" / "golden"
    for fname in ("bitmask-int8.safetensors", "24-int8.safetensors"):
        with PackedReader(golden / fname) as r:
            for name in r.names():
                p = r.read(name)
                if p.format == "dense":
                    continue
                q, s = p.codec.quantized(p, name)
                again = p.codec.from_quantized(q, s, p.dtype)
                for k, v in p.components.items():
                    assert np.array_equal(again.components[k].numpy(), v.numpy()), (fname, name, k)


def test_inspect_a_foreign_compressed_tensors_folder(tiny, tmp_path):
    from conftest import write_foreign_ct_folder

    folder = write_foreign_ct_folder(tiny[0], tiny[1], tmp_path / "ct")
    info = json.loads(run("inspect", folder, "--json").stdout)
    assert info["packed"]["format"] == "ct-sparse-bitmask"
    proj = [row for row in info["layers"] if row["name"].endswith("proj")]
    assert proj and {row["format"] for row in proj} == {"ct-sparse-bitmask"}
    assert all(row["bytes_per_weight"] < 4 for row in proj)


def test_quantize_leaves_dense_tensors_dense(tmp_path):
    """Only tensors stored sparse get int8 values: an embedding with a few exact zeros (no sparse
    format is smaller than dense for it) stays dense and unquantized, although int8 would shrink it."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "m"
    pruned_tiny_llama(src)
    state = load_file(str(src / "model.safetensors"))
    state["model.embed_tokens.weight"][:, :2] = 0  # 2 of 64 columns: ~3 % zeros
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    s = json.loads(run("pack", src, "-o", tmp_path / "p", "--quantize", "int8", "--json").stdout)
    manifest = json.loads((tmp_path / "p" / "seftc_pack.json").read_text())
    assert manifest["tensors"]["model.embed_tokens.weight"]["format"] == "dense"
    assert s["formats"]["bitmask-int8"] == 14
    with PackedReader(tmp_path / "p" / "packed.safetensors") as r:
        assert torch.equal(r.read_dense("model.embed_tokens.weight"), state["model.embed_tokens.weight"])
