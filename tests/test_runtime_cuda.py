"""The CUDA side of the sparse runtime: the pure decisions and the CUDA-unavailable behaviour on the
CPU (fast tier), and the CUDA op against the reference on a GPU (`-m gpu`)."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from seftc.runtime import cuda, ops, reference, semistructured
from seftc.runtime.convert import prepare_prefill, sparsify_model
from seftc.runtime.layouts import SparseLayout, is_24
from seftc.runtime.linear import SparseLinear

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    """bench/gpu_check.py as a module (registered first: its dataclasses look themselves up there)."""
    if "seftc_gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("seftc_gpu_check", ROOT / "bench" / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["seftc_gpu_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["seftc_gpu_check"]


def _layout(rows, cols, sparsity, dtype=torch.float32, seed=0):
    w = _gpu_check().make_weight(rows, cols, sparsity, torch.Generator().manual_seed(seed))
    layout = SparseLayout.from_dense(w, "2:4" if sparsity == "2:4" else "bitmask")
    layout.values = layout.values.to(dtype)
    return w, layout


# ---------------------------------------------------------------- fast tier (CPU)

@pytest.mark.parametrize("x_dtype,v_dtype,tokens,features,want", [
    (torch.float16, torch.float16, 1, 64, "bitmap"), (torch.bfloat16, torch.bfloat16, 8, 5, "bitmap"),
    (torch.float16, torch.float16, 9, 64, "dense"), (torch.bfloat16, torch.bfloat16, 0, 64, "dense"),
    (torch.bfloat16, torch.bfloat16, 2048, 64, "dense"), (torch.float32, torch.float32, 1, 64, "reference"),
    (torch.float16, torch.float32, 1, 64, "reference"), (torch.bfloat16, torch.float16, 4, 64, "reference"),
    (torch.float16, torch.float16, 1, 0, "reference"),
])
def test_sparse_linear_path(x_dtype, v_dtype, tokens, features, want):
    assert cuda.sparse_linear_path(x_dtype, v_dtype, tokens, features) == want


@pytest.mark.parametrize("semi,dense,min_speedup,want", [
    (1.0, 2.0, 1.0, "semi-structured"), (2.0, 1.0, 1.0, "dense"), (1.0, 1.0, 1.0, "dense"),
    (None, 1.0, 1.0, "dense"), (1.0, None, 1.0, "dense"), (float("nan"), 1.0, 1.0, "dense"), (0.0, 1.0, 1.0, "dense"),
    (1.0, 1.1, 1.2, "dense"), (1.0, 1.3, 1.2, "semi-structured"),
])
def test_choose_prefill(semi, dense, min_speedup, want):
    assert semistructured.choose_prefill(semi, dense, min_speedup) == want


def test_semi_structured_constraints():
    assert semistructured.shape_allowed(1536, 576, 32, 64)
    assert not semistructured.shape_allowed(1536, 130, 32, 64)
    assert not semistructured.shape_allowed(16, 64, 32, 64)
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    assert semistructured.min_shape(SparseSemiStructuredTensorCUTLASS, torch.float16) == (32, 64)
    assert semistructured.min_shape(SparseSemiStructuredTensorCUSPARSELT, torch.bfloat16) == (16, 16)
    assert semistructured.min_shape(SparseSemiStructuredTensorCUTLASS, torch.float64) is None
    cuda_dev, lim = torch.device("cuda", 0), (32, 64)
    reason = semistructured.unsupported_reason
    assert reason("2:4", 1536, 576, torch.bfloat16, cuda_dev, lim) is None
    assert "2:4" in reason("bitmask", 1536, 576, torch.bfloat16, cuda_dev, lim)
    assert "CUDA" in reason("2:4", 1536, 576, torch.bfloat16, torch.device("cpu"), lim)
    assert "float16" in reason("2:4", 1536, 576, torch.float32, cuda_dev, lim)
    assert "multiple" in reason("2:4", 1536, 132, torch.float16, cuda_dev, lim)
    assert reason("2:4", 1536, 576, torch.float16, cuda_dev, None) is not None


def test_cuda_fallbacks_on_cpu_tensors():
    """The non-kernel paths of the CUDA implementation are device-agnostic: run them on the CPU."""
    w, layout = _layout(33, 68, 0.7, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(33, generator=g).to(torch.bfloat16)
    for x in (torch.randn(16, 68, generator=g).to(torch.bfloat16), torch.randn(2, 5, 68, generator=g).to(torch.bfloat16),
              torch.randn(0, 68).to(torch.bfloat16)):
        assert cuda.sparse_linear_path(x.dtype, layout.values.dtype, x.numel() // 68, 68) == "dense"
        got = cuda.sparse_linear_cuda(x, layout.masks, layout.values, layout.row_offsets, bias)
        want = reference.sparse_linear(x, layout.masks, layout.values, layout.row_offsets, bias)
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    x = torch.randn(3, 68, generator=g)
    got = cuda.sparse_linear_cuda(x, layout.masks, layout.values, layout.row_offsets, bias)  # float32 x: the reference
    torch.testing.assert_close(got, reference.sparse_linear(x, layout.masks, layout.values, layout.row_offsets, bias))


def test_cuda_unavailable_leaves_cpu_unchanged():
    """Without a CUDA device: no build, no warning, the CUDA key runs the reference, and the CPU op
    (whatever its backend) returns what it returned before the CUDA decision."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    code = ("import torch, warnings; warnings.simplefilter('error')\n"
            "from seftc.runtime import ops, cuda\n"
            "w = torch.randn(9, 70); w[w.abs() < 1] = 0\n"
            "from seftc.runtime.layouts import SparseLayout; L = SparseLayout.from_dense(w); x = torch.randn(2, 70)\n"
            "before = ops.sparse_linear(x, L.masks, L.values, L.row_offsets); cpu = ops.backend()\n"
            "assert ops.cuda_backend() == 'reference' and not cuda.load() and not cuda.available()\n"
            "assert torch.equal(ops.sparse_linear(x, L.masks, L.values, L.row_offsets), before) and ops.backend() == cpu\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_prefill_weight_is_cuda_only_and_dropped_on_move():
    w, _ = _layout(64, 128, "2:4")
    linear = nn.Linear(128, 64)
    linear.weight.data = w
    model = nn.Sequential(SparseLinear.from_dense(linear, "2:4"))
    assert prepare_prefill(model) == [] and model[0].prefill_weight is None  # on the CPU: nothing to decide
    decision, semi = semistructured.decide_layer("0", model[0])
    assert decision.choice == "dense" and semi is None and "CUDA" in decision.reason
    x = torch.randn(32, 128)
    before = model(x)
    model[0].prefill_weight = torch.full((64, 128), float("nan"))  # never used for CPU inputs
    assert torch.equal(model(x), before)
    model.to(torch.float32)
    assert model[0].prefill_weight is None


def test_sparsify_keeps_device_and_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w, _ = _layout(16, 64, 0.7)
        linear = nn.Linear(64, 16).to(dtype)
        linear.weight.data = w.to(dtype)
        model = nn.Sequential(linear)
        result = sparsify_model(model, targets=["0"])
        assert result.converted == ["0"] and result.prefill == []
        assert model[0].values.dtype == dtype and model[0].bias.dtype == dtype and model[0].masks.dtype == torch.int64
        assert torch.equal(model[0].weight, w.to(dtype))


def test_gencode_matches_makefile():
    makefile = (ROOT / "kernels" / "cuda" / "Makefile").read_text()
    line = re.search(r"^GENCODE\s*=\s*(.+)$", makefile, re.M).group(1).split()
    assert tuple(line) == cuda.GENCODE
    assert all((cuda.source_dir() / s).is_file() for s in cuda.SOURCES)


def test_gpu_check_cases_well_formed():
    gc = _gpu_check()
    cases = gc.cases()
    assert len({c.name for c in cases}) == len(cases)
    for c in cases:
        assert c.rows >= 1 and c.cols >= 1 and c.kind in ("op", "semi") and c.dtype in gc.TOL
        if c.sparsity == "2:4":
            assert c.cols % 4 == 0
        else:
            assert 0 < c.sparsity < 1
        if c.kind == "op":
            assert c.expect == cuda.sparse_linear_path(getattr(torch, c.dtype), getattr(torch, c.values_dtype), c.tokens, c.cols)
        else:
            assert c.sparsity == "2:4" and c.expect == "semi-structured" and c.tokens > 8
            assert semistructured.shape_allowed(c.rows, c.cols, *semistructured.FALLBACK_MIN_SHAPE)
    kernel = {(c.dtype, c.tokens, c.sparsity) for c in cases if c.expect == "bitmap"}
    assert kernel >= {(d, b, s) for d in gc.HALF for b in gc.KERNEL_BATCHES for s in gc.SPARSITIES}
    assert any(c.rows % 2 and c.cols % 2 for c in cases if c.expect == "bitmap")  # odd sizes
    assert {c.expect for c in cases} == {"bitmap", "dense", "reference", "semi-structured"}
    assert any(c.tokens == 0 for c in cases) and any(c.strided for c in cases) and any(len(c.lead) > 1 for c in cases)
    assert {c.tokens for c in cases if c.kind == "semi"} >= {gc.PREFILL_TOKENS}


def test_gpu_check_weights():
    gc = _gpu_check()
    g = torch.Generator().manual_seed(0)
    for sparsity in (0.5, 0.9):
        w = gc.make_weight(40, 300, sparsity, g)
        assert (w[0] == 0).all() and (w[1] != 0).all()
        assert abs(float((w[2:] == 0).float().mean()) - sparsity) < 0.05
    w = gc.make_weight(40, 64, "2:4", g)
    assert is_24(w) and int((w != 0).sum()) == 40 * 32 - 32  # row 0 is all zero
    if not torch.cuda.is_available():
        assert gc.main(["--skip-timing"]) == 2


# ---------------------------------------------------------------- GPU tier (`pytest -m gpu`)

def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def _tol(dtype):
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=4e-3, atol=4e-3)


@pytest.mark.gpu
def test_cuda_backend_builds():
    _needs_cuda()
    assert ops.cuda_backend() == "cuda-kernels"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9, "2:4"])
def test_cuda_kernel_matches_reference(dtype, sparsity):
    _needs_cuda()
    for rows, cols in ((1, 4), (7, 4), (65, 132), (17, 260), (300, 1000)):
        w, layout = _layout(rows, cols, sparsity, dtype)
        masks, values, offsets = layout.masks.cuda(), layout.values.cuda(), layout.row_offsets.cuda()
        bias = torch.randn(rows).to(dtype) if rows % 2 else None
        for batch in (1, 2, 3, 4, 8, 9, 64):
            x = torch.randn(batch, cols).to(dtype)
            want = reference.sparse_linear(x.float(), layout.masks, layout.values.float(), layout.row_offsets,
                                           bias.float() if bias is not None else None)
            got = ops.sparse_linear(x.cuda(), masks, values, offsets, bias.cuda() if bias is not None else None)
            assert got.dtype == dtype and got.shape == (batch, rows)
            if batch <= 8:
                raw = torch.ops.seftc_cuda.bitmask_spmv.default(x.cuda(), masks, values, offsets, bias.cuda() if bias is not None else None)
                assert torch.equal(got, raw)
            torch.testing.assert_close(got.float().cpu(), want, **_tol(dtype), msg=lambda m: f"{rows}x{cols} b={batch}: {m}")


@pytest.mark.gpu
def test_cuda_fallbacks_never_raise():
    _needs_cuda()
    _, layout = _layout(65, 130, 0.7)
    masks, offsets = layout.masks.cuda(), layout.row_offsets.cuda()
    for x_dtype, v_dtype, lead in ((torch.float32, torch.float32, (1,)), (torch.float16, torch.float32, (4,)),
                                   (torch.bfloat16, torch.float16, (2,)), (torch.float16, torch.float16, (0,)),
                                   (torch.bfloat16, torch.bfloat16, (3, 7))):
        x = torch.randn(*lead, 130).to(x_dtype)
        values = layout.values.to(v_dtype)
        want = reference.sparse_linear(x.float(), layout.masks, values.float(), layout.row_offsets)
        got = ops.sparse_linear(x.cuda(), masks, values.cuda(), offsets)
        assert got.dtype == x_dtype and got.shape == want.shape
        torch.testing.assert_close(got.float().cpu(), want, **_tol(x_dtype if x_dtype != torch.float32 else torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_prefill_matches_reference(dtype):
    _needs_cuda()
    w, layout = _layout(1536, 576, "2:4", dtype)
    linear = nn.Linear(576, 1536).to(dtype)
    linear.weight.data = w.to(dtype)
    model = nn.Sequential(linear).cuda()
    result = sparsify_model(model, targets=["0"], kind="2:4")
    assert len(result.prefill) == 1 and result.prefill[0].dense_ms is not None, result.prefill
    layer = model[0]
    layer.prefill_weight = semistructured.backend_class().from_dense(layer.layout.to_dense().contiguous())
    for tokens in (1, 8, 9, 256):
        x = torch.randn(tokens, 576).to(dtype)
        want = reference.sparse_linear(x.float(), layout.masks, layout.values.float(), layout.row_offsets, linear.bias.float().cpu())
        got = layer(x.cuda())
        torch.testing.assert_close(got.float().cpu(), want, **_tol(dtype))


@pytest.mark.gpu
def test_gpu_check_sample():
    _needs_cuda()
    assert ops.cuda_backend() == "cuda-kernels"
    gc = _gpu_check()
    for i, case in enumerate(gc.cases()[::9]):
        ok, detail = gc.run_case(case, i)
        assert ok, f"{case.name}: {detail}"
