"""The sparse linear op: every CPU kernel path against the PyTorch reference."""
import pytest
import torch

from seftc.runtime import cpu, ops, reference
from seftc.runtime.layouts import SparseLayout, is_24

SHAPES = [(1, 1), (7, 5), (33, 64), (65, 130), (17, 257)]
SPARSITIES = [0.0, 0.5, 0.7, 0.9, 1.0, "2:4"]
BATCHES = [1, 3, 8, 37]
ISAS = ["avx512bf16", "avx512", "avx2", "scalar"]


def _weight(rows, cols, sparsity, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if sparsity == "2:4":
        cols4 = cols - cols % 4
        groups = w[:, :cols4].reshape(rows, -1, 4)
        drop = groups.abs().argsort(dim=-1)[..., :2]
        groups.scatter_(-1, drop, 0.0)
        w[:, :cols4] = groups.reshape(rows, cols4)
        w[:, cols4:] = 0
    else:
        w[torch.rand(rows, cols, generator=g) < sparsity] = 0
    if rows > 2:  # an all-zero row and a dense row
        w[0] = 0
        w[1] = torch.randn(cols, generator=g) + 3.0
        if sparsity == "2:4":
            w[1] = 0
    return w.to(dtype)


def _tol(dtype):
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if ops.backend() != "cpu-kernels":
        pytest.skip("CPU kernels are not built (no compiler); the reference is in use")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wdtype,xdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_kernel_matches_reference(isa, wdtype, xdtype):
    g = torch.Generator().manual_seed(1)
    with cpu.force_isa(isa) as active:
        assert active == isa or cpu.ISA_LEVELS[cpu.best_isa()] < cpu.ISA_LEVELS[isa]
        for rows, cols in SHAPES:
            for sparsity in SPARSITIES:
                if sparsity == "2:4" and cols % 4:
                    continue
                w = _weight(rows, cols, sparsity, wdtype)
                kind = "2:4" if sparsity == "2:4" else "bitmask"
                layout = SparseLayout.from_dense(w, kind)
                assert torch.equal(layout.to_dense(), w)
                bias = torch.randn(rows, generator=g).to(xdtype) if rows % 2 else None
                for batch in BATCHES:
                    x = torch.randn(batch, cols, generator=g).to(xdtype)
                    got = ops.sparse_linear(x, layout.masks, layout.values, layout.row_offsets, bias, path="sparse")
                    want = reference.sparse_linear(x, layout.masks, layout.values, layout.row_offsets, bias)
                    assert got.dtype == xdtype and got.shape == (batch, rows)
                    torch.testing.assert_close(got.float(), want.float(), **_tol(xdtype), msg=lambda m: f"{isa} {rows}x{cols} {sparsity} b={batch}: {m}")
                    dense = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
                    torch.testing.assert_close(got.float(), dense, **_tol(xdtype))


def test_paths_agree_and_3d_input():
    w = _weight(96, 200, 0.7, torch.float32)
    layout = SparseLayout.from_dense(w)
    x = torch.randn(2, 5, 200)
    outs = {}
    for isa in ISAS:
        with cpu.force_isa(isa):
            outs[isa] = ops.sparse_linear(x, layout.masks, layout.values, layout.row_offsets, path="sparse")
    assert outs["scalar"].shape == (2, 5, 96)
    for isa in ISAS[:3]:
        torch.testing.assert_close(outs[isa], outs["scalar"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_kernel_over_several_token_windows_and_row_blocks(isa, dtype):
    """Enough tokens for several register windows and enough rows for several L2 row blocks (the
    prefill kernel's loop order), on an odd column count (the last column pair has a padding half)."""
    g = torch.Generator().manual_seed(5)
    w = _weight(300, 999, 0.7, dtype)
    layout = SparseLayout.from_dense(w)
    bias = torch.randn(300, generator=g).to(dtype)
    with cpu.force_isa(isa):
        for batch in (16, 150, 333):
            x = torch.randn(batch, 999, generator=g).to(dtype)
            got = ops.sparse_linear(x, layout.masks, layout.values, layout.row_offsets, bias, path="sparse")
            want = reference.sparse_linear(x, layout.masks, layout.values, layout.row_offsets, bias)
            torch.testing.assert_close(got.float(), want.float(), **_tol(dtype), msg=lambda m: f"{isa} b={batch}: {m}")


def test_empty_batch_and_zero_rows():
    layout = SparseLayout.from_dense(torch.zeros(0, 10))
    assert ops.sparse_linear(torch.randn(3, 10), layout.masks, layout.values, layout.row_offsets).shape == (3, 0)
    layout = SparseLayout.from_dense(_weight(5, 10, 0.5, torch.float32))
    assert ops.sparse_linear(torch.randn(0, 10), layout.masks, layout.values, layout.row_offsets).shape == (0, 5)


def test_two_four_layout_has_format_bytes():
    w = _weight(8, 64, "2:4", torch.bfloat16)
    w[3, :4] = 0  # a group with no non-zero still stores two (zero) values
    assert is_24(w)
    layout = SparseLayout.from_dense(w, "2:4")
    assert layout.nnz_stored == 8 * 32
    assert torch.equal(layout.to_dense(), w)
    assert layout.nbytes == 8 * 32 * 2 + 8 * 8 + 9 * 8


def test_opcheck():
    layout = SparseLayout.from_dense(_weight(20, 70, 0.6, torch.float32))
    for args in [(torch.randn(3, 70), None), (torch.randn(2, 4, 70), torch.randn(20))]:
        torch.library.opcheck(torch.ops.seftc.sparse_linear.default, (args[0], layout.masks, layout.values, layout.row_offsets, args[1]))


def test_from_packed_components_match_dense():
    from seftc.formats.bitmask import BITMASK
    from seftc.formats.two_four import TWO_FOUR

    for codec, sparsity, kind in ((BITMASK, 0.7, "bitmask"), (TWO_FOUR, "2:4", "2:4")):
        for dtype in (torch.float32, torch.bfloat16):
            w = _weight(12, 72, sparsity, dtype)
            layout = SparseLayout.from_packed(codec.from_dense(w))
            assert layout.kind == kind and layout.values.dtype == dtype
            assert torch.equal(layout.to_dense(), w)
            x = torch.randn(3, 72).to(dtype)
            torch.testing.assert_close(ops.sparse_linear(x, layout.masks, layout.values, layout.row_offsets).float(),
                                       reference.sparse_linear(x, layout.masks, layout.values, layout.row_offsets).float(), **_tol(dtype))


def test_bad_inputs_raise():
    layout = SparseLayout.from_dense(_weight(4, 70, 0.5, torch.float32))
    with pytest.raises(RuntimeError, match="features"):
        ops.sparse_linear(torch.randn(1, 200), layout.masks, layout.values, layout.row_offsets)


@pytest.mark.gpu
def test_cuda_reference_path():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    layout = SparseLayout.from_dense(_weight(64, 128, 0.7, torch.float32))
    x = torch.randn(2, 128)
    want = reference.sparse_linear(x, layout.masks, layout.values, layout.row_offsets)
    got = ops.sparse_linear(x.cuda(), layout.masks.cuda(), layout.values.cuda(), layout.row_offsets.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_forced_reference_backend_subprocess():
    import os
    import subprocess
    import sys

    code = ("import torch; from seftc.runtime import ops; from seftc.runtime.layouts import SparseLayout\n"
            "w = torch.randn(9, 70); w[w.abs() < 1] = 0; L = SparseLayout.from_dense(w); x = torch.randn(2, 70)\n"
            "torch.testing.assert_close(ops.sparse_linear(x, L.masks, L.values, L.row_offsets), x @ w.t(), rtol=1e-4, atol=1e-4)\n"
            "print(ops.backend())")
    env = {**os.environ, "SEFTC_KERNELS": "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"
