"""`make gpu-check`: every CUDA path of the sparse runtime against the PyTorch reference, then timings.

Needs a CUDA device and a CUDA build of torch with nvcc (the extension is compiled on first use).
In order, in a few minutes:
1. builds the CUDA extension (`seftc.runtime.ops.cuda_backend()` must say 'cuda-kernels');
2. correctness, one PASS/FAIL line per case, against `seftc.runtime.reference` computed in fp32 on
   the CPU, error = max |got - want| / max |want| within a bound per dtype (`TOL`):
   - the bitmap kernel: float16/bfloat16, 1/2/4/8 tokens, fixed odd shapes and seeded random ones,
     sparsities 0.5/0.7/0.9 and 2:4, with an all-zero and a dense row, bias or not, 3-D and strided
     x; the op must return exactly what `seftc_cuda::bitmask_spmv` returns (it took the kernel);
   - the fallbacks: more than 8 tokens or none (decompress + matmul), float32 and mixed dtypes (the
     reference), each where the raw kernel must refuse the input;
   - 2:4 prefill through a semi-structured weight (`SparseLinear.prefill_weight`), and one
     `prepare_prefill` decision with its timings;
   - end to end: a small random LLaMA, pruned (half 2:4, half 70%), converted on CUDA, logits
     against the dense model (skipped without transformers);
3. timings (CUDA events, warm-up, median of repeats): batch-1/8 decode at 50%/70% against cuBLAS
   dense (`F.linear`) on SmolLM2-135M shapes and larger ones; 2:4 prefill at 2048 tokens,
   semi-structured and decompress + matmul against dense. Printed as speedups, never judged.

Exits 1 on any FAIL, 2 without a CUDA device.

    python bench/gpu_check.py [--dtype bfloat16] [--skip-timing] [--skip-e2e]
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runs from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# max |got - want| / max |want|: about two units in the last place of the output dtype (the
# kernel and cuBLAS accumulate in fp32; the rest is the final rounding and the summation order)
TOL = {"float16": 4e-3, "bfloat16": 1.6e-2, "float32": 1e-4}
SPARSITIES: tuple[float | str, ...] = (0.5, 0.7, 0.9, "2:4")
KERNEL_BATCHES = (1, 2, 4, 8)
HALF = ("float16", "bfloat16")
FIXED_SHAPES = ((1, 1), (3, 4), (7, 5), (33, 64), (65, 130), (17, 257), (2, 1000), (64, 4096), (1536, 576), (192, 576))
SEMI_SHAPES = ((128, 256), (1536, 576), (576, 1536), (192, 576))  # [out, in], multiples of 32 x 64
SEMI_TOKENS = (9, 64, 2048)
DECODE_SHAPES = ((576, 1536), (1536, 576), (576, 576), (576, 192), (4096, 4096), (4096, 11008))  # in -> out
PREFILL_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # in -> out
PREFILL_TOKENS = 2048


@dataclass(frozen=True)
class Case:
    """One correctness check. kind "op": `seftc::sparse_linear` on x of shape lead + (cols,);
    kind "semi": `SparseLinear` with a semi-structured prefill weight."""

    kind: str  # "op" | "semi"
    rows: int
    cols: int
    sparsity: float | str  # fraction of zeros, or "2:4"
    dtype: str  # x's dtype
    values_dtype: str
    lead: tuple[int, ...]  # x's leading dimensions
    bias: bool
    strided: bool  # x is a non-contiguous view
    expect: str  # "bitmap" | "dense" | "reference" | "semi-structured"

    @property
    def tokens(self) -> int:
        return math.prod(self.lead)

    @property
    def name(self) -> str:
        dt = self.dtype if self.values_dtype == self.dtype else f"{self.dtype}/{self.values_dtype}"
        extra = ("+bias" if self.bias else "") + ("+strided" if self.strided else "")
        return f"{self.kind}:{self.expect} {self.rows}x{self.cols} s={self.sparsity} {dt} x={list(self.lead)}{extra}"


def random_shapes(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(1, 700), rng.randint(1, 2500)) for _ in range(n)]


def expected_path(dtype: str, values_dtype: str, tokens: int, cols: int) -> str:
    from seftc.runtime.cuda import sparse_linear_path

    return sparse_linear_path(getattr(torch, dtype), getattr(torch, values_dtype), tokens, cols)


def cases(seed: int = 0) -> list[Case]:
    """Every correctness case, in a fixed order (pure: builds no tensor)."""
    out: list[Case] = []
    shapes = list(FIXED_SHAPES) + random_shapes(4, seed)
    for rows, cols in shapes:
        for sparsity in SPARSITIES:
            if sparsity == "2:4" and cols % 4:
                continue
            for dtype in HALF:
                for batch in KERNEL_BATCHES:
                    bias = (rows + batch) % 2 == 1
                    out.append(Case("op", rows, cols, sparsity, dtype, dtype, (batch,), bias, False, expected_path(dtype, dtype, batch, cols)))
    for dtype in HALF:  # leading dimensions and strides the binding must flatten
        out.append(Case("op", 65, 130, 0.7, dtype, dtype, (2, 3), True, False, "bitmap"))
        out.append(Case("op", 65, 130, 0.7, dtype, dtype, (4,), False, True, "bitmap"))
        out.append(Case("op", 33, 64, "2:4", dtype, dtype, (1, 1, 8), True, True, "bitmap"))
    fallbacks = [  # (rows, cols, sparsity, x dtype, values dtype, lead)
        (65, 130, 0.7, "float16", "float16", (9,)), (65, 130, 0.7, "bfloat16", "bfloat16", (16,)),
        (576, 1536, 0.5, "bfloat16", "bfloat16", (64,)), (33, 64, "2:4", "float16", "float16", (3, 37)),
        (65, 130, 0.7, "float16", "float16", (0,)), (65, 130, 0.7, "bfloat16", "bfloat16", (2, 0)),
        (65, 130, 0.7, "float32", "float32", (1,)), (65, 130, 0.9, "float32", "float32", (8,)),
        (17, 257, 0.5, "float32", "float32", (16,)), (65, 130, 0.7, "float16", "float32", (1,)),
        (65, 130, 0.7, "bfloat16", "float16", (4,)), (65, 130, 0.7, "float32", "bfloat16", (2,)),
    ]
    for rows, cols, sparsity, dtype, vdtype, lead in fallbacks:
        tokens = math.prod(lead)
        out.append(Case("op", rows, cols, sparsity, dtype, vdtype, lead, True, False, expected_path(dtype, vdtype, tokens, cols)))
    for rows, cols in SEMI_SHAPES:
        for dtype in HALF:
            for tokens in SEMI_TOKENS:
                if tokens == 2048 and (rows, cols) != (1536, 576):
                    continue
                out.append(Case("semi", rows, cols, "2:4", dtype, dtype, (tokens,), tokens != 9, False, "semi-structured"))
    return out


def make_weight(rows: int, cols: int, sparsity: float | str, gen: torch.Generator) -> torch.Tensor:
    """fp32 [rows, cols] pruned to `sparsity` (or 2:4 by magnitude); row 0 all zero, row 1 dense
    (under 2:4: two non-zeros in every group) when there are more than two rows."""
    w = torch.randn(rows, cols, generator=gen) / math.sqrt(cols)
    if sparsity == "2:4":
        groups = w.reshape(rows, cols // 4, 4)
        groups.scatter_(-1, groups.abs().argsort(dim=-1)[..., :2], 0.0)
        w = groups.reshape(rows, cols)
    else:
        w[torch.rand(rows, cols, generator=gen) < float(sparsity)] = 0
    if rows > 2:
        w[0] = 0
        if sparsity != "2:4":
            w[1] = torch.randn(cols, generator=gen) / math.sqrt(cols) + 0.1
    return w


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    if want.numel() == 0:
        return 0.0
    diff = (got.float().cpu() - want).abs().max().item()
    scale = want.abs().max().item()
    return diff / scale if scale > 0 else diff


def run_case(case: Case, seed: int) -> tuple[bool, str]:
    """(passed, detail) for one case."""
    from seftc.runtime import reference, semistructured
    from seftc.runtime.layouts import SparseLayout
    from seftc.runtime.linear import SparseLinear

    gen = torch.Generator().manual_seed(seed)
    dtype, vdtype = getattr(torch, case.dtype), getattr(torch, case.values_dtype)
    w = make_weight(case.rows, case.cols, case.sparsity, gen)
    layout = SparseLayout.from_dense(w, "2:4" if case.sparsity == "2:4" else "bitmask")
    masks, offsets = layout.masks.cuda(), layout.row_offsets.cuda()
    values = layout.values.to(vdtype)
    bias = (torch.randn(case.rows, generator=gen) * 0.1).to(dtype) if case.bias else None
    width = case.cols * 2 if case.strided else case.cols
    x = torch.randn(*case.lead, width, generator=gen).to(dtype)
    if case.strided:
        x = x[..., ::2]
    want = reference.sparse_linear(x.float(), layout.masks, values.float(), layout.row_offsets, bias.float() if bias is not None else None)
    xc, vc, bc = x.cuda(), values.cuda(), bias.cuda() if bias is not None else None
    notes = []
    if case.kind == "semi":
        cls = semistructured.backend_class()
        layer = SparseLinear(SparseLayout("2:4", (case.rows, case.cols), masks, vc, offsets), bc)
        # routing: with an all-zero semi-structured weight the output is exactly the bias
        layer.prefill_weight = cls.from_dense(torch.zeros(case.rows, case.cols, dtype=dtype, device="cuda"))
        probe = layer(xc)
        floor = bc.expand_as(probe) if bc is not None else torch.zeros_like(probe)
        if not torch.equal(probe, floor):
            return False, "SparseLinear did not take the semi-structured path"
        layer.prefill_weight = cls.from_dense(layer.layout.to_dense().contiguous())
        got = layer(xc)
        notes.append(cls.BACKEND)
    else:
        got = torch.ops.seftc.sparse_linear.default(xc, masks, vc, offsets, bc)
        raw_ok: bool | None = None
        try:
            raw = torch.ops.seftc_cuda.bitmask_spmv.default(xc, masks, vc, offsets, bc)
            raw_ok = True
        except RuntimeError:
            raw_ok = False
        if case.expect == "bitmap":
            if not raw_ok:
                return False, "the raw kernel refused a kernel-sized input"
            if not torch.equal(got, raw):
                return False, "the op did not return the kernel's output"
        elif raw_ok:
            return False, f"the raw kernel accepted an input it must refuse ({case.expect} case)"
    torch.cuda.synchronize()
    if got.shape != want.shape or got.dtype != dtype or got.device.type != "cuda":
        return False, f"got {tuple(got.shape)} {got.dtype} on {got.device}, want {tuple(want.shape)} {dtype} on cuda"
    err = rel_error(got, want)
    ok = err <= TOL[case.dtype]  # False for NaN
    return ok, " ".join([f"err={err:.2e} (tol {TOL[case.dtype]:.0e})", *notes])


def check_prepare_prefill() -> tuple[bool, str]:
    """`prepare_prefill` on one 2:4 layer: a decision with both timings, or a stated reason."""
    from torch import nn

    from seftc.runtime.convert import prepare_prefill
    from seftc.runtime.linear import SparseLinear

    gen = torch.Generator().manual_seed(1)
    linear = nn.Linear(4096, 4096, bias=False)
    linear.weight.data = make_weight(4096, 4096, "2:4", gen)
    model = nn.Sequential(SparseLinear.from_dense(linear, "2:4")).to("cuda", torch.bfloat16)
    decisions = prepare_prefill(model, tokens=PREFILL_TOKENS)
    if len(decisions) != 1:
        return False, f"{len(decisions)} decisions for one 2:4 layer"
    d = decisions[0]
    kept = model[0].prefill_weight is not None
    if d.semi_ms is None or d.dense_ms is None:
        return False, f"not timed: {d.reason}"
    if kept != (d.choice == "semi-structured"):
        return False, f"choice {d.choice} but prefill weight kept={kept}"
    return True, f"choice={d.choice} semi={d.semi_ms:.3f}ms dense={d.dense_ms:.3f}ms (speedup {d.dense_ms / d.semi_ms:.2f}x)"


def tiny_pruned_llama(dtype: torch.dtype) -> Any:
    """A random 2-layer LLaMA (hidden 256): attention 2:4, MLP 70% unstructured, by magnitude."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            w = module.weight.data
            if ".self_attn." in name:
                groups = w.reshape(w.shape[0], -1, 4)
                groups.scatter_(-1, groups.abs().argsort(dim=-1)[..., :2], 0.0)
            else:
                w[w.abs() < w.abs().flatten().kthvalue(int(0.7 * w.numel())).values] = 0
    return model.to(dtype)


def check_end_to_end(dtype: torch.dtype) -> tuple[bool, str]:
    """Sparse vs dense logits of a small pruned model converted on CUDA: prefill (64 tokens) and one decode step."""
    import copy

    from seftc.runtime.convert import sparsify_model

    dense = tiny_pruned_llama(dtype).cuda()
    sparse = copy.deepcopy(dense)
    result = sparsify_model(sparse)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.inference_mode():
        want, got = dense(input_ids=ids).logits.float(), sparse(input_ids=ids).logits.float()
        step_want = dense(input_ids=ids[:, :1]).logits.float()
        step_got = sparse(input_ids=ids[:, :1]).logits.float()
    err = max(rel_error(got, want.cpu()), rel_error(step_got, step_want.cpu()))
    tol = 8 * TOL[str(dtype).replace("torch.", "")]  # roundings compound through two blocks; a broken kernel is off by O(1)
    semi = sum(d.choice == "semi-structured" for d in result.prefill)
    return err <= tol, (f"{len(result.converted)} layers converted, {semi}/{len(result.prefill)} 2:4 layers semi-structured; "
                        f"logits err={err:.2e} (tol {tol:.0e})")


def cuda_ms(fn: Callable[[], Any], iters: int, repeats: int = 15, warmup: int = 3) -> float:
    """Median over `repeats` CUDA-event samples of `iters` back-to-back calls, per call, in ms."""
    for _ in range(warmup):
        for _ in range(iters):
            fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return statistics.median(samples)


def time_decode(dtype: torch.dtype) -> None:
    import torch.nn.functional as F

    from seftc.runtime.layouts import SparseLayout

    print(f"\n== decode: bitmap kernel vs cuBLAS dense (F.linear), {str(dtype).replace('torch.', '')}, us per call ==")
    print(f"{'in->out':>12} {'sparsity':>8} {'batch':>5} {'dense':>8} {'kernel':>8} {'op':>8} {'dense/kernel':>12} {'dense/op':>9} {'byte bound':>10}")
    gen = torch.Generator().manual_seed(2)
    for cols, rows in DECODE_SHAPES:
        for sparsity in (0.5, 0.7):
            w = make_weight(rows, cols, sparsity, gen)
            layout = SparseLayout.from_dense(w)
            masks, offsets, values = layout.masks.cuda(), layout.row_offsets.cuda(), layout.values.to(dtype).cuda()
            wd = w.to(dtype).cuda()
            # dense bytes over the bytes the kernel reads (values in `dtype`, mask words, row offsets)
            bound = (rows * cols * dtype.itemsize) / (layout.nnz_stored * dtype.itemsize + masks.numel() * 8 + offsets.numel() * 8)
            for batch in (1, 8):
                x = torch.randn(batch, cols, device="cuda", dtype=dtype)
                iters = 200 if rows * cols < 4_000_000 else 50
                dense = cuda_ms(lambda: F.linear(x, wd), iters)
                kernel = cuda_ms(lambda: torch.ops.seftc_cuda.bitmask_spmv.default(x, masks, values, offsets, None), iters)
                op = cuda_ms(lambda: torch.ops.seftc.sparse_linear.default(x, masks, values, offsets, None), iters)
                print(f"{cols:>5}->{rows:<6} {sparsity:>8.0%} {batch:>5} {dense * 1e3:>8.1f} {kernel * 1e3:>8.1f} {op * 1e3:>8.1f} "
                      f"{dense / kernel:>11.2f}x {dense / op:>8.2f}x {bound:>9.2f}x")


def time_prefill(dtype: torch.dtype) -> None:
    import torch.nn.functional as F

    from seftc.runtime import cuda, semistructured
    from seftc.runtime.layouts import SparseLayout

    cls = semistructured.backend_class()
    print(f"\n== 2:4 prefill at {PREFILL_TOKENS} tokens: semi-structured ({cls.BACKEND}) and decompress + matmul vs dense, "
          f"{str(dtype).replace('torch.', '')}, ms ==")
    print(f"{'in->out':>12} {'dense':>8} {'semi':>8} {'decomp+mm':>9} {'dense/semi':>10} {'dense/decomp':>12}")
    gen = torch.Generator().manual_seed(3)
    for cols, rows in PREFILL_SHAPES:
        w = make_weight(rows, cols, "2:4", gen)
        layout = SparseLayout.from_dense(w, "2:4")
        masks, offsets, values = layout.masks.cuda(), layout.row_offsets.cuda(), layout.values.to(dtype).cuda()
        wd = w.to(dtype).cuda().contiguous()
        semi = cls.from_dense(wd)
        x = torch.randn(PREFILL_TOKENS, cols, device="cuda", dtype=dtype)
        dense = cuda_ms(lambda: F.linear(x, wd), 5, repeats=9)
        sparse = cuda_ms(lambda: F.linear(x, semi), 5, repeats=9)
        decomp = cuda_ms(lambda: cuda.dense_linear(x, masks, values, offsets), 2, repeats=5, warmup=1)
        print(f"{cols:>5}->{rows:<6} {dense:>8.3f} {sparse:>8.3f} {decomp:>9.3f} {dense / sparse:>9.2f}x {dense / decomp:>11.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=HALF, help="dtype of the timings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    from seftc.runtime import ops

    start = time.perf_counter()
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name()} "
          f"(sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    backend = ops.cuda_backend()
    print(f"{'PASS' if backend == 'cuda-kernels' else 'FAIL'} build: CUDA backend {backend} ({time.perf_counter() - start:.0f}s)")
    if backend != "cuda-kernels":
        return 1
    failed: list[str] = []
    all_cases = cases(args.seed)
    for i, case in enumerate(all_cases):
        try:
            ok, detail = run_case(case, args.seed + i)
        except Exception as e:  # a crash is a failure of that case, the rest still run
            ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(f"{'PASS' if ok else 'FAIL'} {case.name}: {detail}")
        if not ok:
            failed.append(case.name)
    extra = [("prepare_prefill", check_prepare_prefill)]
    if not args.skip_e2e:
        try:
            import transformers  # noqa: F401

            extra += [(f"end-to-end {d}", lambda d=d: check_end_to_end(getattr(torch, d))) for d in HALF]
        except ImportError:
            print("SKIP end-to-end: transformers is not installed")
    for name, fn in extra:
        try:
            ok, detail = fn()
        except Exception as e:
            ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            failed.append(name)
    print(f"\n{len(all_cases) + len(extra) - len(failed)}/{len(all_cases) + len(extra)} checks passed ({time.perf_counter() - start:.0f}s)")
    if not args.skip_timing:
        dtype = getattr(torch, args.dtype)
        time_decode(dtype)
        time_prefill(dtype)
        print(f"\ntotal {time.perf_counter() - start:.0f}s")
    if failed:
        print(f"FAILED: {len(failed)} check(s): " + "; ".join(failed[:10]) + (" ..." if len(failed) > 10 else ""))
        return 1
    print("gpu-check: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
