"""Sparse + int8 weights on the runtime (seftc.runtime.int8, kernels/cpu/sparse_int8.cpp): every CPU
kernel path against the PyTorch reference; whole packed models through load_sparse, bench and eval."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from seftc.formats.quantize import quantize_rows
from seftc.runtime import cpu, ops, reference
from seftc.runtime.int8 import INT8_PAD, Int8Layout, SparseInt8Linear, sparse_linear_int8

SHAPES = [(1, 1), (7, 5), (33, 64), (65, 130), (17, 257), (40, 12)]
SPARSITIES = [0.0, 0.5, 0.7, 0.9, 1.0, "2:4"]
BATCHES = [1, 3, 8, 37]
ISAS = ["avx512", "avx2", "scalar"]


def _weight(rows, cols, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if sparsity == "2:4":
        groups = w[:, : cols - cols % 4].reshape(rows, -1, 4)
        groups.scatter_(-1, groups.abs().argsort(dim=-1)[..., :2], 0.0)
        w[:, : cols - cols % 4] = groups.reshape(rows, -1)
        w[:, cols - cols % 4:] = 0
    else:
        w[torch.rand(rows, cols, generator=g) < sparsity] = 0
    if rows > 2:  # an all-zero row and a dense row
        w[0] = 0
        w[1] = 0 if sparsity == "2:4" else torch.randn(cols, generator=g) + 3.0
    return w


def _layout(w, sparsity):
    q, s = quantize_rows(w)
    return q, s, Int8Layout.from_quantized(q, s, "2:4-int8" if sparsity == "2:4" else "bitmask-int8")


def _tol(dtype):
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)


@pytest.fixture()
def kernels():
    from seftc.runtime import int8

    if int8.backend() != "cpu-kernels":
        pytest.skip("CPU int8 kernels are not built (no compiler); the reference is in use")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(isa, xdtype, kernels):
    g = torch.Generator().manual_seed(1)
    with cpu.force_isa(isa) as active:
        if active != isa:
            pytest.skip(f"this CPU does not run {isa}")
        for rows, cols in SHAPES:
            for sparsity in SPARSITIES:
                if sparsity == "2:4" and cols % 4:
                    continue
                w = _weight(rows, cols, sparsity)
                q, s, layout = _layout(w, sparsity)
                assert layout.values.dtype == torch.int8 and layout.values.numel() == layout.row_offsets[-1] + INT8_PAD
                assert torch.equal(layout.to_dense(), q.float() * s[:, None])
                bias = torch.randn(rows, generator=g).to(xdtype) if rows % 2 else None
                for batch in BATCHES:
                    x = torch.randn(batch, cols, generator=g).to(xdtype)
                    args = (x, layout.masks, layout.values, layout.scales, layout.row_offsets, bias)
                    got = sparse_linear_int8(*args)
                    want = reference.sparse_linear_int8(*args)
                    assert got.dtype == xdtype and got.shape == (batch, rows)
                    torch.testing.assert_close(got.float(), want.float(), **_tol(xdtype),
                                               msg=lambda m: f"{isa} {rows}x{cols} {sparsity} b={batch}: {m}")
                    dense = torch.nn.functional.linear(x.float(), q.float() * s[:, None], None if bias is None else bias.float())
                    torch.testing.assert_close(got.float(), dense, **_tol(xdtype))


def test_paths_agree_and_3d_input(kernels):
    w = _weight(96, 200, 0.7)
    _, _, layout = _layout(w, 0.7)
    x = torch.randn(2, 5, 200)
    outs = {}
    for isa in ISAS:
        with cpu.force_isa(isa):
            outs[isa] = sparse_linear_int8(x, layout.masks, layout.values, layout.scales, layout.row_offsets)
    assert outs["scalar"].shape == (2, 5, 96)
    for isa in ISAS[:2]:
        torch.testing.assert_close(outs[isa], outs["scalar"], rtol=1e-5, atol=1e-5)


def test_empty_batch_zero_rows_and_short_values_refused(kernels):
    _, _, layout = _layout(torch.zeros(0, 10), 0.5)
    assert sparse_linear_int8(torch.randn(3, 10), layout.masks, layout.values, layout.scales, layout.row_offsets).shape == (3, 0)
    _, _, layout = _layout(_weight(5, 10, 0.5), 0.5)
    assert sparse_linear_int8(torch.randn(0, 10), layout.masks, layout.values, layout.scales, layout.row_offsets).shape == (0, 5)
    with pytest.raises(RuntimeError, match="zero bytes"):  # the kernel reads 64 bytes at a time: the padding is required
        sparse_linear_int8(torch.randn(1, 10), layout.masks, layout.values[:-1], layout.scales, layout.row_offsets)


def test_opcheck():
    _, _, layout = _layout(_weight(20, 70, 0.6), 0.6)
    for x, bias in [(torch.randn(3, 70), None), (torch.randn(2, 4, 70), torch.randn(20))]:
        torch.library.opcheck(torch.ops.seftc.sparse_linear_int8.default, (x, layout.masks, layout.values, layout.scales, layout.row_offsets, bias))


def test_module_keeps_int8_values_and_fp32_scales_when_cast():
    lin = torch.nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight.copy_(_weight(24, 64, 0.7))
    m = SparseInt8Linear.from_dense(lin)
    m16 = copy.deepcopy(m).to(torch.bfloat16)
    assert m16.values.dtype == torch.int8 and m16.scales.dtype == torch.float32 and m16.bias.dtype == torch.bfloat16
    x = torch.randn(3, 64)
    q, s = quantize_rows(lin.weight.data)
    torch.testing.assert_close(m(x), torch.nn.functional.linear(x, q.float() * s[:, None], lin.bias), rtol=1e-4, atol=1e-4)
    assert m.nbytes == m.layout.nbytes + 24 * 4
    assert "bitmask-int8" in repr(m)


def test_gpu_fallback_values_are_the_dequantized_bitmask_layout():
    """On CUDA the layer runs `seftc::sparse_linear` with its values dequantized (no int8 kernel
    there); the same values on the CPU give the int8 result."""
    lin = torch.nn.Linear(100, 30, bias=False)
    with torch.no_grad():
        lin.weight.copy_(_weight(30, 100, 0.6))
    m = SparseInt8Linear.from_dense(lin)
    values = m._dequantized_values(torch.float32)
    x = torch.randn(4, 100)
    torch.testing.assert_close(ops.sparse_linear(x, m.masks, values, m.row_offsets), m(x), rtol=1e-5, atol=1e-5)


# --- whole models: load_sparse + sparsify_model, bench, eval ----------------------------------------------

@pytest.fixture(scope="module")
def packed_int8(tiny_dir, tmp_path_factory):
    from seftc.formats.packing import pack_folder
    from seftc.prune.api import prune

    root = tmp_path_factory.mktemp("int8")
    prune(str(tiny_dir), output=root / "u70", method="magnitude", sparsity=0.7)
    pack_folder(root / "u70", root / "u70-int8", quantize="int8")
    pack_folder(root / "u70", root / "u70-bitmask", "bitmask")
    return root


def test_load_sparse_runs_int8_layers(packed_int8):
    from seftc.runtime.convert import load_runtime_pair
    from seftc.formats.sparse_model import load_sparse
    from seftc.runtime.convert import sparsify_model

    from conftest import tiny_tokenizer

    model = load_sparse(packed_int8 / "u70-int8")
    result = sparsify_model(model, targets=[])
    layers = [m for m in model.modules() if isinstance(m, SparseInt8Linear)]
    assert len(layers) == len(result.converted) == 14
    pair = load_runtime_pair(str(packed_int8 / "u70-int8"), "float32")
    ids = tiny_tokenizer()("Shall I compare thee to a summer's day?", return_tensors="pt").input_ids
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, pair.dense(ids).logits, rtol=1e-3, atol=1e-3)  # int8 kernels vs dequantized dense
        plain = load_runtime_pair(str(packed_int8 / "u70-bitmask"), "float32").dense(ids).logits  # the unquantized sparse model
        assert (model(ids).logits - plain).abs().max() < 0.05 * plain.abs().max()
    bf16 = load_runtime_pair(str(packed_int8 / "u70-int8"), "bfloat16").sparse
    assert all(m.scales.dtype == torch.float32 for m in bf16.modules() if isinstance(m, SparseInt8Linear))
    with torch.inference_mode():
        assert bf16(ids).logits.dtype == torch.bfloat16


def test_bench_and_eval_accept_an_int8_packed_folder(packed_int8):
    from seftc.cli.main import cli

    folder = str(packed_int8 / "u70-int8")
    r = CliRunner().invoke(cli, ["bench", folder, "--batch", "1,2", "--json", "--repeats", "1", "--warmup", "0",
                                 "--prompt-tokens", "8", "--new-tokens", "2", "--layers", "2"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert {x["layout"] for x in out["layers"]} == {"bitmask-int8"}
    assert all(x["dense_ms"] > 0 and x["sparse_ms"] > 0 for x in out["results"])
    texts = packed_int8 / "text.txt"
    texts.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 20)
    ppl = {}
    for name in ("u70-int8", "u70-bitmask", "u70"):
        r = CliRunner().invoke(cli, ["eval", str(packed_int8 / name), "--ppl", str(texts), "--seqlen", "32",
                                     "--limit", "4", "--json"])
        assert r.exit_code == 0, r.output
        ppl[name] = json.loads(r.stdout)["ppl"]
    assert ppl["u70-bitmask"] == pytest.approx(ppl["u70"], rel=1e-4)  # packed lossless = the pruned folder
    assert ppl["u70-int8"] == pytest.approx(ppl["u70"], rel=0.05)
