"""Dispatch between the sparse kernel and decompress + dense GEMM (seftc.runtime.dispatch): both
paths against the reference, the decompress kernel per ISA, the scratch buffer, the measured plans
and their disk cache (written, read, keyed; corrupt or unwritable caches never crash)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from seftc.runtime import cpu, dispatch, ops, reference
from seftc.runtime.layouts import SparseLayout
from seftc.runtime.linear import SparseLinear

from test_runtime import BATCHES, ISAS, SHAPES, SPARSITIES, _tol, _weight


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if ops.backend() != "cpu-kernels":
        pytest.skip("CPU kernels are not built (no compiler); the reference is in use")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private dispatch cache folder, with the in-memory plans dropped before and after."""
    monkeypatch.setenv(dispatch.ENV_CACHE, str(tmp_path / "dispatch"))
    dispatch.forget()
    yield tmp_path / "dispatch" / dispatch.CACHE_FILE
    dispatch.forget()


def _fake_plan(first_dense: int) -> dispatch.Plan:
    """A plan whose dense path wins from `first_dense` tokens on (times made up, no clock)."""
    tokens = dispatch.LADDER
    return dispatch.Plan(tokens, tuple(1.0 for _ in tokens), tuple(0.5 if t >= first_dense else 2.0 for t in tokens))


def _cases():
    """Every (isa, rows, cols, sparsity) the path tests cover, each run under its forced ISA."""
    for isa in ("avx512", "scalar"):
        with cpu.force_isa(isa):
            for rows, cols in SHAPES:
                for sparsity in SPARSITIES:
                    if not (sparsity == "2:4" and cols % 4):
                        yield isa, rows, cols, sparsity


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("wdtype,xdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_both_paths_match_reference(path, wdtype, xdtype):
    g = torch.Generator().manual_seed(3)
    for isa, rows, cols, sparsity in _cases():
        layout = SparseLayout.from_dense(_weight(rows, cols, sparsity, wdtype), "2:4" if sparsity == "2:4" else "bitmask")
        bias = torch.randn(rows, generator=g).to(xdtype) if rows % 2 else None
        for batch in BATCHES:
            x = torch.randn(batch, cols, generator=g).to(xdtype)
            got = ops.sparse_linear(x, layout.masks, layout.values, layout.row_offsets, bias, path=path)
            want = reference.sparse_linear(x, layout.masks, layout.values, layout.row_offsets, bias)
            assert got.dtype == xdtype and got.shape == (batch, rows)
            torch.testing.assert_close(got.float(), want.float(), **_tol(xdtype),
                                       msg=lambda m: f"{path} {isa} {rows}x{cols} {sparsity} b={batch}: {m}")


def test_dense_path_3d_input_and_empty_batch():
    w = _weight(48, 130, 0.7, torch.float32)
    layout = SparseLayout.from_dense(w)
    x = torch.randn(2, 5, 130)
    got = ops.sparse_linear(x, layout.masks, layout.values, layout.row_offsets, path="dense")
    assert got.shape == (2, 5, 48)
    torch.testing.assert_close(got, x @ w.t(), rtol=1e-4, atol=1e-4)
    assert ops.sparse_linear(torch.randn(0, 130), layout.masks, layout.values, layout.row_offsets, path="dense").shape == (0, 48)


@pytest.mark.parametrize("isa", ISAS)
def test_decompress_is_exact_for_each_isa(isa):
    with cpu.force_isa(isa):
        for rows, cols in SHAPES + [(3, 16), (5, 100), (2, 64)]:
            for sparsity in SPARSITIES:
                if sparsity == "2:4" and cols % 4:
                    continue
                for wdtype in (torch.float32, torch.bfloat16):
                    w = _weight(rows, cols, sparsity, wdtype)
                    layout = SparseLayout.from_dense(w, "2:4" if sparsity == "2:4" else "bitmask")
                    for out_dtype in (torch.float32, torch.bfloat16):
                        out = torch.full((rows, cols), float("nan"), dtype=out_dtype)  # every position must be written
                        ops.decompress(layout.masks, layout.values, layout.row_offsets, out)
                        assert torch.equal(out, w.to(out_dtype)), f"{isa} {rows}x{cols} {sparsity} {wdtype}->{out_dtype}"


def test_decompress_refuses_bad_buffers():
    layout = SparseLayout.from_dense(_weight(6, 70, 0.5, torch.float32))
    for out, match in ((torch.empty(6, 200), "mask words"), (torch.empty(5, 70), "mask words"),
                       (torch.empty(70, 6).t(), "contiguous"), (torch.empty(6, 70, dtype=torch.float16), "float32 or bfloat16")):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.seftc_cpu.decompress(layout.masks, layout.values, layout.row_offsets, out)
    unpadded = layout.values[: layout.nnz_stored].clone()
    with pytest.raises(RuntimeError, match="padding"):
        torch.ops.seftc_cpu.decompress(layout.masks, unpadded, layout.row_offsets, torch.empty(6, 70))
    with pytest.raises(RuntimeError, match="padding"):
        ops.sparse_linear(torch.randn(2, 70), layout.masks, unpadded, layout.row_offsets, path="sparse")


def test_scratch_is_one_buffer_shared_across_layers_and_shapes():
    big = SparseLinear(SparseLayout.from_dense(_weight(96, 200, 0.7, torch.float32)))
    small = SparseLinear(SparseLayout.from_dense(_weight(40, 96, 0.7, torch.float32)))
    with dispatch.forced("dense"), torch.inference_mode():
        x = torch.randn(3, 200)
        small(big(x))
        first = dispatch.scratch(96, 200, torch.float32, torch.device("cpu")).data_ptr()
        small(big(x))
        assert dispatch.scratch(40, 96, torch.float32, torch.device("cpu")).data_ptr() == first
        assert dispatch.scratch_nbytes() >= 96 * 200 * 4
        held = dispatch.scratch_nbytes()
        small(big(x))
        assert dispatch.scratch_nbytes() == held  # reused, not grown per call or per layer


def test_forced_dense_with_grad_gets_a_fresh_weight():
    w = _weight(8, 70, 0.5, torch.float32)
    layer = SparseLinear(SparseLayout.from_dense(w))
    x = torch.randn(3, 70, requires_grad=True)
    with dispatch.forced("dense"):
        y = layer(x)
        layer(torch.randn(3, 70))  # would overwrite a shared scratch before backward
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(3, 70), rtol=1e-5, atol=1e-5)
    assert dispatch.choose(ops.BITMASK, x, layer.dispatch_args()[1]) == "sparse"


def test_a_layer_memoises_its_route_and_forgets_it_when_the_mode_changes(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(dispatch, "choose", lambda *a: (calls.append(1), "sparse")[1])
    layer = SparseLinear(SparseLayout.from_dense(_weight(8, 64, 0.7, torch.float32)))
    x = torch.randn(5, 64)
    with torch.inference_mode():
        for _ in range(3):
            layer(x)
        assert len(calls) == 1  # one choice per (dtype, size, threads), not per call
        layer(torch.randn(6, 64))
        layer(x.bfloat16())
        assert len(calls) == 3
        with dispatch.forced("dense"):
            layer(x)
        layer(x)
        assert len(calls) == 5
        layer.to(torch.bfloat16)  # casting drops the routes
        layer(x.bfloat16())
        assert len(calls) == 6


def test_plan_picks_the_nearest_rung_on_a_log_scale():
    plan = dispatch.Plan((1, 4, 16, 64), (1.0, 1.0, 1.0, 1.0), (2.0, 0.99, 0.5, 0.5))
    assert plan.rungs == ("sparse", "sparse", "dense", "dense")  # 0.99 is within the tie margin
    assert [plan.path(t) for t in (0, 1, 2, 3, 7, 8, 9, 31, 33, 64, 10_000)] == \
           ["sparse", "sparse", "sparse", "sparse", "sparse", "sparse", "dense", "dense", "dense", "dense", "dense"]
    with pytest.raises(ValueError):
        dispatch.Plan((4, 1), (1.0, 1.0), (1.0, 1.0))
    with pytest.raises(ValueError):
        dispatch.Plan((1,), (float("nan"),), (1.0,))


def test_cache_is_written_read_and_keyed(cache, monkeypatch):
    calls = []

    def fake_measure(paths, weight, *, x_dtype, cols, device="cpu", ladder=dispatch.LADDER):
        calls.append((x_dtype, paths.describe(*weight)[0], cols))
        return _fake_plan(16)

    monkeypatch.setattr(dispatch, "measure", fake_measure)
    w = _weight(24, 70, 0.7, torch.float32)
    layer = SparseLinear(SparseLayout.from_dense(w))
    x1, x37 = torch.randn(1, 70), torch.randn(37, 70)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x37), x37 @ w.t(), rtol=1e-4, atol=1e-4)
        layer(x1)
    assert calls == [(torch.float32, 24, 70)]  # measured once for the class, not per call
    paths, weight = layer.dispatch_args()
    stored = paths.describe(*weight)[1]
    assert dispatch.choose(paths, x1, weight) == "sparse"
    assert dispatch.choose(paths, x37, weight) == "dense"

    data = json.loads(cache.read_text())
    assert data["format"] == dispatch.CACHE_FORMAT and data["version"] == dispatch.CACHE_VERSION
    (key, entry), = data["entries"].items()
    for part in ("24x70", "x float32", "w float32", f"threads {torch.get_num_threads()}", cpu.isa(), "bitmask",
                 f"density {dispatch.density_bucket(stored, 24, 70):.2f}", f"torch {torch.__version__}"):
        assert part in key
    assert entry == _fake_plan(16).to_json()

    dispatch.forget()  # a new process: the plan comes from disk, nothing is measured
    assert dispatch.choose(paths, x37, weight) == "dense"
    assert len(calls) == 1

    # another x dtype, shape, density or thread count is another class
    dispatch.choose(paths, x37.bfloat16(), weight)
    other = SparseLinear(SparseLayout.from_dense(_weight(24, 70, 0.3, torch.float32)))
    dispatch.choose(*other.dispatch_args()[:1], x37, other.dispatch_args()[1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        dispatch.choose(paths, x37, weight)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 4 and len(json.loads(cache.read_text())["entries"]) == 4


@pytest.mark.parametrize("content", ["{not json", '{"format": "seftc-dispatch", "version": 1, "entries": {"k": {"tokens": [4, 1], '
                                     '"sparse_ms": [1, 1], "dense_ms": [1, 1]}}}', '{"format": "other", "version": 1, "entries": {}}', "[]"])
def test_a_corrupt_cache_is_ignored_with_a_note(cache, monkeypatch, capsys, content):
    monkeypatch.setattr(dispatch, "measure", lambda *a, **k: _fake_plan(8))
    cache.parent.mkdir(parents=True)
    cache.write_text(content)
    layer = SparseLinear(SparseLayout.from_dense(_weight(8, 64, 0.7, torch.float32)))
    x = torch.randn(9, 64)
    torch.testing.assert_close(layer(x), x @ layer.weight.t(), rtol=1e-4, atol=1e-4)
    err = capsys.readouterr().err
    assert "ignoring the dispatch cache" in err and "corrupt" in err and "Traceback" not in err
    assert len(json.loads(cache.read_text())["entries"]) == 1  # rewritten, valid


def test_an_unwritable_cache_keeps_the_decision_in_memory(cache, monkeypatch, capsys):
    monkeypatch.setattr(dispatch, "measure", lambda *a, **k: _fake_plan(8))
    cache.parent.parent.mkdir(parents=True, exist_ok=True)
    cache.parent.write_text("a file where the cache folder should be")
    layer = SparseLinear(SparseLayout.from_dense(_weight(8, 64, 0.7, torch.float32)))
    x = torch.randn(9, 64)
    torch.testing.assert_close(layer(x), x @ layer.weight.t(), rtol=1e-4, atol=1e-4)
    layer(x)
    err = capsys.readouterr().err
    assert err.count("cannot write the dispatch cache") == 1


def test_measure_times_both_paths_on_the_real_layer(cache):
    layer = SparseLinear(SparseLayout.from_dense(_weight(32, 96, 0.7, torch.bfloat16)))
    paths, weight = layer.dispatch_args()
    plan = dispatch.measure(paths, weight, x_dtype=torch.bfloat16, cols=96, ladder=(1, 8, 40))
    assert plan.tokens == (1, 8, 40) and all(t > 0 for t in plan.sparse_ms + plan.dense_ms)
    assert set(plan.rungs) <= {"sparse", "dense"}
    records = dispatch.calibrate(torch.nn.Sequential(layer), remeasure=False)
    assert [r["shape"] for r in records] == [[32, 96]] and records[0]["x_dtype"] == "bfloat16"
    assert os.path.isfile(cache)


def test_forced_modes_and_a_bad_env_value():
    layer = SparseLinear(SparseLayout.from_dense(_weight(8, 64, 0.7, torch.float32)))
    x = torch.randn(40, 64)
    seen = []
    real = ops.BITMASK.decompress
    spy = dispatch.LayoutPaths("bitmask", ops.BITMASK.kernel, lambda *a: (seen.append(1), real(*a))[1], ops.BITMASK.describe)
    paths, weight = layer.dispatch_args()
    for which, decompressed in (("sparse", 0), ("dense", 1)):
        with dispatch.forced(which):
            seen.clear()
            y = dispatch.run(spy, x, weight, None)
            assert len(seen) == decompressed
            torch.testing.assert_close(y, x @ layer.weight.t(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        with dispatch.forced("fastest"):
            pass
    code = ("import torch; from seftc.runtime import dispatch, ops; from seftc.runtime.layouts import SparseLayout\n"
            "L = SparseLayout.from_dense(torch.eye(8)); print(dispatch.mode())\n"
            "ops.sparse_linear(torch.randn(2, 8), L.masks, L.values, L.row_offsets)")
    for value, ok in (("dense", True), ("Sparse", True), ("fastest", False)):
        r = subprocess.run([sys.executable, "-c", code], env={**os.environ, dispatch.ENV_MODE: value}, capture_output=True, text=True, timeout=120)
        if ok:
            assert r.returncode == 0 and r.stdout.strip() == value.lower(), r.stderr
        else:
            assert r.returncode != 0 and "SEFTC_DISPATCH='fastest': choose one of auto, sparse, dense" in r.stderr


def _int8_layer(rows, cols, sparsity, bias=None):
    from seftc.runtime.int8 import SparseInt8Linear

    w = _weight(rows, cols, sparsity, torch.float32)
    linear = torch.nn.Linear(cols, rows, bias=bias is not None)
    linear.weight.data = w
    if bias is not None:
        linear.bias.data = bias
    return SparseInt8Linear.from_dense(linear, "2:4-int8" if sparsity == "2:4" else "bitmask-int8")


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_the_int8_layout_dispatches_on_both_paths(path, xdtype):
    """The int8 layout plugs into the dispatcher: its kernel, or dequantize into the scratch + dense GEMM."""
    from seftc.runtime import int8

    g = torch.Generator().manual_seed(4)
    for isa, rows, cols, sparsity in _cases():
        bias = torch.randn(rows, generator=g) if rows % 2 else None
        layer = _int8_layer(rows, cols, sparsity, bias)
        paths, weight = layer.dispatch_args()
        assert paths is int8.INT8
        dense_w = layer.layout.to_dense(torch.float32)
        for batch in BATCHES:
            x = torch.randn(batch, cols, generator=g).to(xdtype)
            got = dispatch.run(paths, x, weight, layer.bias, path)
            # the dense path multiplies by the weight dequantized to x's dtype (bf16: rounded), the kernel in fp32
            ref_w = layer.layout.to_dense(xdtype).float() if path == "dense" else dense_w
            want = torch.nn.functional.linear(x.float(), ref_w, None if bias is None else bias.float())
            assert got.dtype == xdtype and got.shape == (batch, rows)
            torch.testing.assert_close(got.float(), want, **_tol(xdtype), msg=lambda m: f"{path} {isa} {rows}x{cols} {sparsity} b={batch}: {m}")


@pytest.mark.parametrize("isa", ISAS)
def test_decompress_int8_equals_the_layouts_dense_weight(isa):
    from seftc.runtime import int8

    with cpu.force_isa(isa):
        for rows, cols in SHAPES + [(3, 16), (5, 100)]:
            for sparsity in SPARSITIES:
                if sparsity == "2:4" and cols % 4:
                    continue
                layer = _int8_layer(rows, cols, sparsity)
                for out_dtype in (torch.float32, torch.bfloat16):
                    out = torch.full((rows, cols), float("nan"), dtype=out_dtype)
                    int8.decompress_int8(layer.masks, layer.values, layer.scales, layer.row_offsets, out)
                    assert torch.equal(out, layer.layout.to_dense(out_dtype)), f"{isa} {rows}x{cols} {sparsity} -> {out_dtype}"


def test_an_int8_layer_routes_and_calibrates(cache, monkeypatch):
    monkeypatch.setattr(dispatch, "measure", lambda *a, **k: _fake_plan(16))
    layer = _int8_layer(24, 70, 0.7)
    x = torch.randn(37, 70).bfloat16()
    with torch.inference_mode():
        # 37 tokens: the (fake) plan says dense, whose weight is dequantized to bf16
        torch.testing.assert_close(layer(x).float(), x.float() @ layer.layout.to_dense(torch.bfloat16).float().t(), **_tol(torch.bfloat16))
    records = dispatch.calibrate(torch.nn.Sequential(layer, torch.nn.LayerNorm(4).bfloat16()))  # x: the model's float dtype
    assert [(r["layout"], r["weight_dtype"], r["x_dtype"], r["first_dense_tokens"]) for r in records] == [("bitmask-int8", "int8", "bfloat16", 16)]
    assert "bitmask-int8" in next(iter(json.loads(cache.read_text())["entries"]))


def test_a_fresh_process_keys_its_first_class_by_the_loaded_kernels_isa():
    """The instruction set in a class key is the kernels' (loaded first), never 'reference' by accident."""
    code = ("import torch; from seftc.runtime import cpu, dispatch, ops; from seftc.runtime.layouts import SparseLayout\n"
            "w = torch.randn(8, 64); w[w.abs() < 1] = 0; L = SparseLayout.from_dense(w)\n"
            "key = dispatch.class_key(ops.BITMASK, torch.float32, (L.masks, L.values, L.row_offsets), 64)\n"
            "print(key[-1], cpu.isa())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    key_isa, loaded_isa = r.stdout.split()
    assert key_isa == loaded_isa == cpu.isa() != "reference"
