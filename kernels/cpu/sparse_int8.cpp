// seftc CPU kernels for sparse weights with int8 values (formats/int8.md):
//   y = (x @ Q^T) * scales (+ bias)
//
// Layout (built by seftc/runtime/int8.py, Int8Layout): the bitmask kernel layout of
// sparse_linear.cpp with int8 values and one float32 scale per row:
//   masks       int64 [R, W]      bit i of word w of row r set <=> Q[r, 64*w + i] is stored
//   values      int8  [n + 64]    stored values, row after row, in column order, then 64 zero bytes
//   scales      float32 [R]
//   row_offsets int64 [R + 1]     where each row's values start
// The int8 values are widened to fp32 in registers, products accumulate in fp32, and each row's sum
// is multiplied by its scale once. Activations (fp32 or bf16) are converted once per call into a
// zero-padded fp32 buffer [T, 64*W]; tokens run in tiles of up to 8, so each decoded weight vector
// serves up to 8 tokens, over blocks of rows kept hot in cache.
//
// The instruction set is the extension's (sparse_linear.cpp: run-time detection, capped by set_isa):
//   level 2: AVX-512 with VBMI2   one register-form vpexpandb places the (up to) 64 int8 values of a
//                                 mask word at their columns; four widen + convert + FMA steps follow
//                                 (a CPU with AVX-512 but without VBMI2 runs level 1)
//   level 1: AVX2 + FMA           8 int8 values widened to fp32, placed by a 256-entry permute table
//   level 0: scalar               bit iteration
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

int64_t seftc_cpu_active_isa();  // sparse_linear.cpp

namespace {

constexpr int kTile = 8;        // tokens per weight decode
constexpr int kRowBlock = 32;   // rows kept hot while the token tiles sweep them
constexpr int64_t kPad = 64;    // zero bytes after the last value: the AVX-512 path loads 64 at a time

bool has_vbmi2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vbmi2");
#else
  return false;
#endif
}

// 2: AVX-512 + VBMI2, 1: AVX2, 0: scalar (any AVX-512 level of the extension counts as 2)
int64_t int8_isa() {
  static const bool vbmi2 = has_vbmi2();
  const int64_t level = seftc_cpu_active_isa();
  return level >= 2 ? (vbmi2 ? 2 : 1) : level;
}

struct Job {
  const uint64_t* masks;
  const int8_t* values;
  const float* scales;
  const int64_t* offsets;
  const float* x;  // [T, Cp]
  float* y;        // [T, R]
  int64_t R, W, Cp, T;
};

// ---------------------------------------------------------------------------------------- scalar
void rows_scalar(const Job& j, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t* m = j.masks + r * j.W;
    for (int64_t t = 0; t < j.T; ++t) {
      const float* x = j.x + t * j.Cp;
      const int8_t* q = j.values + j.offsets[r];
      float acc = 0.f;
      for (int64_t w = 0; w < j.W; ++w) {
        for (uint64_t bits = m[w]; bits; bits &= bits - 1) acc += static_cast<float>(*q++) * x[w * 64 + __builtin_ctzll(bits)];
      }
      j.y[t * j.R + r] = acc * j.scales[r];
    }
  }
}

// ------------------------------------------------------------------------------------------ AVX2
struct ExpandTable {  // for each mask byte: where each of the 8 lanes takes its value from, and which lanes are kept
  alignas(32) int32_t idx[256][8];
  alignas(32) int32_t keep[256][8];
  ExpandTable() {
    for (int b = 0; b < 256; ++b) {
      for (int l = 0, k = 0; l < 8; ++l) {
        const bool on = (b >> l) & 1;
        idx[b][l] = on ? k : 0;
        keep[b][l] = on ? -1 : 0;
        k += on;
      }
    }
  }
};
const ExpandTable kExpand;

template <int NB>
__attribute__((target("avx2,fma,popcnt"))) inline void row_avx2(const uint64_t* m, int64_t W, const int8_t* q, const float* x,
                                                              int64_t Cp, float* out) {
  constexpr int NA = NB == 1 ? 4 : (NB == 2 ? 2 : 1);
  __m256 acc[NB][NA];
  for (int b = 0; b < NB; ++b)
    for (int a = 0; a < NA; ++a) acc[b][a] = _mm256_setzero_ps();
  for (int64_t w = 0; w < W; ++w) {
    const uint64_t mw = m[w];
    if (!mw) continue;
    const float* xw = x + w * 64;
    for (int k = 0; k < 8; ++k) {
      const unsigned byte = (mw >> (8 * k)) & 0xff;
      const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.idx[byte]));
      const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.keep[byte])));
      const __m256 packed = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
      q += _mm_popcnt_u32(byte);
      const __m256 v = _mm256_and_ps(_mm256_permutevar8x32_ps(packed, idx), keep);
      for (int b = 0; b < NB; ++b) acc[b][k % NA] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xw + b * Cp + 8 * k), acc[b][k % NA]);
    }
  }
  for (int b = 0; b < NB; ++b) {
    __m256 s = acc[b][0];
    for (int a = 1; a < NA; ++a) s = _mm256_add_ps(s, acc[b][a]);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    out[b] = _mm_cvtss_f32(h);
  }
}

// --------------------------------------------------------------------------------- AVX-512 + VBMI2
#define SEFTC_AVX512_INT8 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")))

// Lane K (16 columns) of a mask word's expanded int8 values, as fp32, multiplied into the NB tokens.
template <int NB, int NA, int K>
SEFTC_AVX512_INT8 inline void fma_lane(__m512i e, const float* xw, int64_t Cp, __m512 (&acc)[NB][NA]) {
  const __m128i lane = K == 0 ? _mm512_castsi512_si128(e) : _mm512_extracti32x4_epi32(e, K);
  const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lane));
  for (int b = 0; b < NB; ++b) acc[b][K % NA] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xw + b * Cp + 16 * K), acc[b][K % NA]);
}

template <int NB>
SEFTC_AVX512_INT8 inline void row_avx512(const uint64_t* m, int64_t W, const int8_t* q, const float* x, int64_t Cp, float* out) {
  constexpr int NA = NB == 1 ? 4 : (NB == 2 ? 2 : 1);
  __m512 acc[NB][NA];
  for (int b = 0; b < NB; ++b)
    for (int a = 0; a < NA; ++a) acc[b][a] = _mm512_setzero_ps();
  for (int64_t w = 0; w < W; ++w) {
    const uint64_t mw = m[w];
    if (!mw) continue;
    __m512i raw = _mm512_loadu_si512(q);
    __asm__("" : "+v"(raw));  // keep the register form: a memory-operand expand is microcoded on some CPUs
    const __m512i e = _mm512_maskz_expand_epi8(mw, raw);
    q += _mm_popcnt_u64(mw);
    const float* xw = x + w * 64;
    fma_lane<NB, NA, 0>(e, xw, Cp, acc);
    fma_lane<NB, NA, 1>(e, xw, Cp, acc);
    fma_lane<NB, NA, 2>(e, xw, Cp, acc);
    fma_lane<NB, NA, 3>(e, xw, Cp, acc);
  }
  for (int b = 0; b < NB; ++b) {
    __m512 s = acc[b][0];
    for (int a = 1; a < NA; ++a) s = _mm512_add_ps(s, acc[b][a]);
    out[b] = _mm512_reduce_add_ps(s);
  }
}

// One token tile of one row, at compile-time tile width NB; the row's scale applied on the way out.
template <int ISA, int NB>
inline void tile(const Job& j, int64_t r, int64_t t0) {
  float out[NB];
  const int8_t* q = j.values + j.offsets[r];
  const uint64_t* m = j.masks + r * j.W;
  const float* x = j.x + t0 * j.Cp;
  if constexpr (ISA == 2)
    row_avx512<NB>(m, j.W, q, x, j.Cp, out);
  else
    row_avx2<NB>(m, j.W, q, x, j.Cp, out);
  for (int b = 0; b < NB; ++b) j.y[(t0 + b) * j.R + r] = out[b] * j.scales[r];
}

template <int ISA>
__attribute__((noinline)) void rows_simd(const Job& j, int64_t r0, int64_t r1) {
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    const int64_t re = std::min(rb + kRowBlock, r1);
    for (int64_t t0 = 0; t0 < j.T; t0 += kTile) {
      const int nb = static_cast<int>(std::min<int64_t>(kTile, j.T - t0));
      for (int64_t r = rb; r < re; ++r) {
        switch (nb) {
          case 1: tile<ISA, 1>(j, r, t0); break;
          case 2: tile<ISA, 2>(j, r, t0); break;
          case 3: tile<ISA, 3>(j, r, t0); break;
          case 4: tile<ISA, 4>(j, r, t0); break;
          case 5: tile<ISA, 5>(j, r, t0); break;
          case 6: tile<ISA, 6>(j, r, t0); break;
          case 7: tile<ISA, 7>(j, r, t0); break;
          default: tile<ISA, 8>(j, r, t0); break;
        }
      }
    }
  }
}

at::Tensor sparse_linear_int8_cpu(const at::Tensor& x, const at::Tensor& masks, const at::Tensor& values, const at::Tensor& scales,
                                  const at::Tensor& row_offsets, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(masks.dim() == 2 && masks.scalar_type() == at::kLong, "seftc::sparse_linear_int8: masks must be int64 [R, W]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "seftc::sparse_linear_int8: x must be float32 or bfloat16");
  TORCH_CHECK(x.dim() >= 1, "seftc::sparse_linear_int8: x must have at least one dimension");
  const int64_t R = masks.size(0), W = masks.size(1), C = x.size(-1), Cp = W * 64;
  TORCH_CHECK(W == (C + 63) / 64, "seftc::sparse_linear_int8: masks have ", W, " words per row, x has ", C, " features");
  TORCH_CHECK(row_offsets.dim() == 1 && row_offsets.scalar_type() == at::kLong && row_offsets.numel() == R + 1,
              "seftc::sparse_linear_int8: row_offsets must be int64 [R + 1]");
  TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == at::kFloat && scales.numel() == R,
              "seftc::sparse_linear_int8: scales must be float32 [R]");
  auto o = row_offsets.contiguous();
  const int64_t n = o.data_ptr<int64_t>()[R];
  TORCH_CHECK(values.dim() == 1 && values.scalar_type() == at::kChar && values.numel() >= n + kPad,
              "seftc::sparse_linear_int8: values must be int8 [n + ", kPad, "] (the stored values, then ", kPad, " zero bytes)");
  auto m = masks.contiguous();
  auto v = values.contiguous();
  auto s = scales.contiguous();
  auto x2 = x.reshape({-1, C});
  const int64_t T = x2.size(0);
  auto xp = at::zeros({T, Cp}, x.options().dtype(at::kFloat));
  xp.narrow(1, 0, C).copy_(x2);
  auto y = at::empty({T, R}, x.options().dtype(at::kFloat));
  const Job j{reinterpret_cast<const uint64_t*>(m.data_ptr<int64_t>()), v.data_ptr<int8_t>(), s.data_ptr<float>(), o.data_ptr<int64_t>(),
              xp.data_ptr<float>(), y.data_ptr<float>(), R, W, Cp, T};
  if (R > 0 && T > 0) {
    const int64_t isa = int8_isa();
    // at least ~32K weight positions per thread: below that a fork/join costs more than it saves
    const int64_t grain = std::max<int64_t>(16, 32768 / std::max<int64_t>(1, Cp * T));
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      if (isa == 2)
        rows_simd<2>(j, r0, r1);
      else if (isa == 1)
        rows_simd<1>(j, r0, r1);
      else
        rows_scalar(j, r0, r1);
    });
  }
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
  auto shape = x.sizes().vec();
  shape.back() = R;
  return (x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type())).view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(seftc, CPU, m) { m.impl("sparse_linear_int8", &sparse_linear_int8_cpu); }
