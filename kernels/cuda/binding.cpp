// Binding of the CUDA bitmap SpMV as `seftc_cuda::bitmask_spmv` (CUDA dispatch key). Built by torch's
// extension loader together with bitmask_spmv.cu (seftc/runtime/cuda.py). The CUDA implementation of
// `seftc::sparse_linear` (seftc/runtime/ops.py) calls it for the inputs it handles (x and values both
// float16 or both bfloat16, 1..8 tokens) and runs decompress + matmul otherwise, so this op only
// checks its preconditions and raises on anything else. Bound; verified on GPU: not yet.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

namespace seftc {
template <typename T>
cudaError_t bitmask_spmv(const unsigned long long*, const T*, const long long*, const T*, T*, int, int, int, cudaStream_t);
}

namespace {

constexpr int64_t kMaxBatch = 8;  // bitmask_spmv.cu: kMaxBatch

at::Tensor bitmask_spmv_cuda(const at::Tensor& x, const at::Tensor& masks, const at::Tensor& values, const at::Tensor& row_offsets,
                             const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda() && masks.is_cuda() && values.is_cuda() && row_offsets.is_cuda(), "seftc_cuda::bitmask_spmv: CUDA tensors expected");
  TORCH_CHECK(masks.device() == x.device() && values.device() == x.device() && row_offsets.device() == x.device(),
              "seftc_cuda::bitmask_spmv: all tensors must be on ", x.device());
  TORCH_CHECK(x.scalar_type() == values.scalar_type() && (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16),
              "seftc_cuda::bitmask_spmv: x and values must both be float16 or both bfloat16");
  TORCH_CHECK(masks.dim() == 2 && masks.scalar_type() == at::kLong, "seftc_cuda::bitmask_spmv: masks must be int64 [R, W]");
  TORCH_CHECK(values.dim() == 1, "seftc_cuda::bitmask_spmv: values must be 1-D");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1, "seftc_cuda::bitmask_spmv: x must have at least one feature");
  const int64_t rows = masks.size(0), cols = x.size(-1);
  TORCH_CHECK(masks.size(1) == (cols + 63) / 64, "seftc_cuda::bitmask_spmv: masks have ", masks.size(1), " words per row, x has ", cols,
              " features");
  TORCH_CHECK(row_offsets.dim() == 1 && row_offsets.scalar_type() == at::kLong && row_offsets.numel() == rows + 1,
              "seftc_cuda::bitmask_spmv: row_offsets must be int64 [R + 1]");
  TORCH_CHECK(rows <= INT32_MAX && cols <= INT32_MAX, "seftc_cuda::bitmask_spmv: shape too large");
  const int64_t batch = x.numel() / cols;
  TORCH_CHECK(batch >= 1 && batch <= kMaxBatch, "seftc_cuda::bitmask_spmv: 1..8 tokens only, got ", batch);

  const c10::cuda::CUDAGuard guard(x.device());
  // Contiguous copies held for the whole call (a temporary's data pointer would dangle).
  const at::Tensor x2 = x.reshape({batch, cols}).contiguous();
  const at::Tensor m = masks.contiguous();
  const at::Tensor v = values.contiguous();
  const at::Tensor o = row_offsets.contiguous();
  at::Tensor y = at::empty({batch, rows}, x.options());
  if (rows > 0) {  // a zero-sized grid is a launch error
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
    auto mp = reinterpret_cast<const unsigned long long*>(m.data_ptr<int64_t>());
    auto op = reinterpret_cast<const long long*>(o.data_ptr<int64_t>());
    cudaError_t err;
    if (x.scalar_type() == at::kHalf) {
      err = seftc::bitmask_spmv<__half>(mp, reinterpret_cast<const __half*>(v.data_ptr<at::Half>()), op,
                                        reinterpret_cast<const __half*>(x2.data_ptr<at::Half>()),
                                        reinterpret_cast<__half*>(y.data_ptr<at::Half>()), static_cast<int>(rows), static_cast<int>(cols),
                                        static_cast<int>(batch), stream);
    } else {
      err = seftc::bitmask_spmv<__nv_bfloat16>(mp, reinterpret_cast<const __nv_bfloat16*>(v.data_ptr<at::BFloat16>()), op,
                                               reinterpret_cast<const __nv_bfloat16*>(x2.data_ptr<at::BFloat16>()),
                                               reinterpret_cast<__nv_bfloat16*>(y.data_ptr<at::BFloat16>()), static_cast<int>(rows),
                                               static_cast<int>(cols), static_cast<int>(batch), stream);
    }
    TORCH_CHECK(err == cudaSuccess, "seftc_cuda::bitmask_spmv: ", cudaGetErrorString(err));
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == rows, "seftc_cuda::bitmask_spmv: bias must be [R]");
    y.add_(bias->to(y.device()));
  }
  auto shape = x.sizes().vec();
  shape.back() = rows;
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY(seftc_cuda, m) {
  m.def("bitmask_spmv(Tensor x, Tensor masks, Tensor values, Tensor row_offsets, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(seftc_cuda, CUDA, m) { m.impl("bitmask_spmv", &bitmask_spmv_cuda); }
