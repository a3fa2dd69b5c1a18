// seftc CUDA kernel: y = x @ W^T for a weight in the row-wise bitmask layout of
// seftc/runtime/layouts.py (int64 mask words [R, W], values row after row, int64 row offsets),
// fp16 or bf16 values and activations, fp32 accumulation. Decode-sized batches (1..8 tokens).
//
// One warp per output row. Lane l owns mask word w = l, l + 32, ...; its values start at
// row_offset + (popcount of the row's earlier words), found with a warp-wide exclusive scan of
// the words' popcounts, so every lane decodes its word independently (no gather of indices).
// Bound to seftc::sparse_linear through binding.cpp / seftc/runtime/cuda.py; compile-checked for sm_80 and
// sm_90 (`make cuda-check`). Bound; verified on GPU: not yet (`make gpu-check` runs the checks on a GPU).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace seftc {

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

constexpr int kMaxBatch = 8;

template <typename T, int NB>
__global__ void bitmask_spmv_kernel(const unsigned long long* __restrict__ masks, const T* __restrict__ values,
                                    const long long* __restrict__ row_offsets, const T* __restrict__ x, T* __restrict__ y,
                                    int rows, int cols, int words) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const unsigned long long* m = masks + static_cast<long long>(row) * words;
  long long base = row_offsets[row];
  float acc[NB];
#pragma unroll
  for (int b = 0; b < NB; ++b) acc[b] = 0.f;

  for (int w0 = 0; w0 < words; w0 += 32) {
    const int w = w0 + lane;
    const unsigned long long bits = w < words ? m[w] : 0ull;
    const int count = __popcll(bits);
    int scan = count;  // inclusive warp scan of popcounts
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, scan, d);
      if (lane >= d) scan += up;
    }
    const long long start = base + scan - count;
    base += __shfl_sync(0xffffffffu, scan, 31);
    unsigned long long left = bits;
    long long p = start;
    while (left) {
      const int bit = __ffsll(static_cast<long long>(left)) - 1;
      left &= left - 1;
      const float v = to_f(values[p++]);
      const int col = w * 64 + bit;
#pragma unroll
      for (int b = 0; b < NB; ++b) acc[b] += v * to_f(x[static_cast<long long>(b) * cols + col]);
    }
  }
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    float s = acc[b];
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) s += __shfl_down_sync(0xffffffffu, s, d);
    if (lane == 0) y[static_cast<long long>(b) * rows + row] = from_f<T>(s);
  }
}

// Host entry: batch in 1..8; launches one warp per row, 8 warps per block.
template <typename T>
cudaError_t bitmask_spmv(const unsigned long long* masks, const T* values, const long long* row_offsets, const T* x, T* y,
                         int rows, int cols, int batch, cudaStream_t stream) {
  if (batch < 1 || batch > kMaxBatch) return cudaErrorInvalidValue;
  const int words = (cols + 63) / 64;
  const dim3 block(256);
  const dim3 grid((rows + 7) / 8);
  switch (batch) {
#define SEFTC_CASE(N) \
  case N: bitmask_spmv_kernel<T, N><<<grid, block, 0, stream>>>(masks, values, row_offsets, x, y, rows, cols, words); break;
    SEFTC_CASE(1) SEFTC_CASE(2) SEFTC_CASE(3) SEFTC_CASE(4) SEFTC_CASE(5) SEFTC_CASE(6) SEFTC_CASE(7) SEFTC_CASE(8)
#undef SEFTC_CASE
  }
  return cudaGetLastError();
}

template cudaError_t bitmask_spmv<__half>(const unsigned long long*, const __half*, const long long*, const __half*, __half*, int, int, int, cudaStream_t);
template cudaError_t bitmask_spmv<__nv_bfloat16>(const unsigned long long*, const __nv_bfloat16*, const long long*, const __nv_bfloat16*,
                                                 __nv_bfloat16*, int, int, int, cudaStream_t);

}  // namespace seftc
