// Binding of the CUDA bitmap SpMV to seftc::sparse_linear (CUDA dispatch key). Built by torch's
// extension loader together with bitmask_spmv.cu; compile-checked here, not yet loaded by
// seftc/runtime (which runs the reference on CUDA until this is wired and tested on a GPU).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

namespace seftc {
template <typename T>
cudaError_t bitmask_spmv(const unsigned long long*, const T*, const long long*, const T*, T*, int, int, int, cudaStream_t);
}

namespace {

at::Tensor sparse_linear_cuda(const at::Tensor& x, const at::Tensor& masks, const at::Tensor& values, const at::Tensor& row_offsets,
                              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda() && masks.is_cuda() && values.is_cuda() && row_offsets.is_cuda(), "seftc::sparse_linear: CUDA tensors expected");
  TORCH_CHECK(x.scalar_type() == values.scalar_type() &&
                  (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16),
              "seftc::sparse_linear (CUDA): x and values must both be float16 or both bfloat16");
  const int64_t rows = masks.size(0), cols = x.size(-1);
  auto x2 = x.reshape({-1, cols}).contiguous();
  const int64_t batch = x2.size(0);
  TORCH_CHECK(batch >= 1 && batch <= 8, "seftc::sparse_linear (CUDA): batch 1..8 only");
  auto y = at::empty({batch, rows}, x.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto m = reinterpret_cast<const unsigned long long*>(masks.contiguous().data_ptr<int64_t>());
  auto o = reinterpret_cast<const long long*>(row_offsets.contiguous().data_ptr<int64_t>());
  cudaError_t err;
  if (x.scalar_type() == at::kHalf) {
    err = seftc::bitmask_spmv<__half>(m, reinterpret_cast<const __half*>(values.data_ptr<at::Half>()), o,
                                      reinterpret_cast<const __half*>(x2.data_ptr<at::Half>()),
                                      reinterpret_cast<__half*>(y.data_ptr<at::Half>()), rows, cols, batch, stream);
  } else {
    err = seftc::bitmask_spmv<__nv_bfloat16>(m, reinterpret_cast<const __nv_bfloat16*>(values.data_ptr<at::BFloat16>()), o,
                                             reinterpret_cast<const __nv_bfloat16*>(x2.data_ptr<at::BFloat16>()),
                                             reinterpret_cast<__nv_bfloat16*>(y.data_ptr<at::BFloat16>()), rows, cols, batch, stream);
  }
  TORCH_CHECK(err == cudaSuccess, "seftc::sparse_linear (CUDA): ", cudaGetErrorString(err));
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  auto shape = x.sizes().vec();
  shape.back() = rows;
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(seftc, CUDA, m) { m.impl("sparse_linear", &sparse_linear_cuda); }
