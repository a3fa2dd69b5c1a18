// seftc CPU kernels: y = x @ W^T (+ bias) with W held as a row-wise bitmask layout.
//
// Layout (built by seftc/runtime/layouts.py):
//   masks       int64 [R, W]   bit i of word w of row r set <=> W[r, 64*w + i] is stored
//   values      fp32|bf16 [n]  stored values, row after row, in column order (+ zero padding)
//   row_offsets int64 [R + 1]  where each row's values start
// A 2:4 weight is the same layout with exactly two bits per aligned group of four.
//
// One build runs everywhere: the ISA is chosen at run time (__builtin_cpu_supports) and each
// SIMD path lives in functions compiled with their own target attribute.
//   level 2: AVX-512 (F, BW, VL)        a masked expand (register form) decodes 16 values per mask word
//   level 1: AVX2 + FMA                  a 256-entry shuffle table decodes 8 values per mask byte
//   level 0: scalar                      bit iteration
// Activations are converted once per call into a zero-padded fp32 buffer [T, 64*W]; tokens are
// processed in tiles of up to 8, so each decoded weight vector serves up to 8 tokens. From 16 tokens
// on (prefill) the AVX-512 path switches to a transposed-activation kernel whose work scales with
// the stored values (see rows_prefill).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int kTile = 8;     // tokens per weight decode
constexpr int kRowBlock = 32;  // rows kept hot in cache while the token tiles sweep them

int64_t g_forced = -1;

int64_t detect_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

int64_t active_isa() {
  static const int64_t best = detect_isa();
  return g_forced < 0 ? best : std::min(g_forced, best);
}

inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Job {
  const uint64_t* masks;
  const void* values;
  const int64_t* offsets;
  const float* x;  // [T, Cp]
  float* y;        // [T, R]
  int64_t R, W, Cp, T;
};

// ---------------------------------------------------------------------------------------- scalar
template <bool BF16>
void rows_scalar(const Job& j, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t* m = j.masks + r * j.W;
    for (int64_t t = 0; t < j.T; ++t) {
      const float* x = j.x + t * j.Cp;
      int64_t p = j.offsets[r];
      float acc = 0.f;
      for (int64_t w = 0; w < j.W; ++w) {
        uint64_t bits = m[w];
        while (bits) {
          int b = __builtin_ctzll(bits);
          float v = BF16 ? bf16_to_float(static_cast<const uint16_t*>(j.values)[p])
                         : static_cast<const float*>(j.values)[p];
          acc += v * x[w * 64 + b];
          ++p;
          bits &= bits - 1;
        }
      }
      j.y[t * j.R + r] = acc;
    }
  }
}

// ------------------------------------------------------------------------------------------ AVX2
struct Lut {
  alignas(32) int32_t idx[256][8];
  alignas(32) int32_t keep[256][8];
  Lut() {
    for (int b = 0; b < 256; ++b) {
      int k = 0;
      for (int l = 0; l < 8; ++l) {
        bool on = (b >> l) & 1;
        idx[b][l] = on ? k : 0;
        keep[b][l] = on ? -1 : 0;
        k += on;
      }
    }
  }
};
const Lut kLut;

template <bool BF16, int NB>
__attribute__((target("avx2,fma,popcnt"))) inline void row_avx2(const uint64_t* m, int64_t W, const void* vals,
                                                              const float* x, int64_t Cp, float* out) {
  constexpr int NA = NB == 1 ? 4 : (NB == 2 ? 2 : 1);
  __m256 acc[NB][NA];
  for (int b = 0; b < NB; ++b)
    for (int a = 0; a < NA; ++a) acc[b][a] = _mm256_setzero_ps();
  const float* pf = static_cast<const float*>(vals);
  const uint16_t* ph = static_cast<const uint16_t*>(vals);
  for (int64_t w = 0; w < W; ++w) {
    const uint64_t mw = m[w];
    if (!mw) continue;
    const float* xw = x + w * 64;
    for (int k = 0; k < 8; ++k) {
      const unsigned byte = (mw >> (8 * k)) & 0xff;
      const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kLut.idx[byte]));
      const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(kLut.keep[byte])));
      __m256 v;
      if (BF16) {
        __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ph));
        v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        ph += _mm_popcnt_u32(byte);
      } else {
        v = _mm256_loadu_ps(pf);
        pf += _mm_popcnt_u32(byte);
      }
      v = _mm256_and_ps(_mm256_permutevar8x32_ps(v, idx), keep);
      for (int b = 0; b < NB; ++b)
        acc[b][k % NA] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xw + b * Cp + 8 * k), acc[b][k % NA]);
    }
  }
  for (int b = 0; b < NB; ++b) {
    __m256 s = acc[b][0];
    for (int a = 1; a < NA; ++a) s = _mm256_add_ps(s, acc[b][a]);
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
    out[b] = _mm_cvtss_f32(q);
  }
}

// --------------------------------------------------------------------------------------- AVX-512
template <bool BF16, int NB>
__attribute__((target("avx512f,avx512bw,avx512vl,popcnt"))) inline void row_avx512(
    const uint64_t* m, int64_t W, const void* vals, const float* x, int64_t Cp, float* out) {
  constexpr int NA = NB == 1 ? 4 : (NB == 2 ? 2 : 1);
  __m512 acc[NB][NA];
  for (int b = 0; b < NB; ++b)
    for (int a = 0; a < NA; ++a) acc[b][a] = _mm512_setzero_ps();
  if (BF16) {
    // 16 bf16 values widened to fp32 in registers, then expanded like fp32 (a 16-bit expand
    // (VBMI2) measured slower here than widen + 32-bit expand).
    const uint16_t* p = static_cast<const uint16_t*>(vals);
    for (int64_t w = 0; w < W; ++w) {
      const uint64_t mw = m[w];
      const float* xw = x + w * 64;
      const uint16_t* q = p;
      p += _mm_popcnt_u64(mw);
      for (int k = 0; k < 4; ++k) {
        const __mmask16 mk = static_cast<__mmask16>(mw >> (16 * k));
        __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
        q += _mm_popcnt_u32(mk);
        __m512 wide = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
        __asm__("" : "+v"(wide));
        const __m512 v = _mm512_maskz_expand_ps(mk, wide);
        for (int b = 0; b < NB; ++b)
          acc[b][k % NA] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xw + b * Cp + 16 * k), acc[b][k % NA]);
      }
    }
  } else {
    const float* p = static_cast<const float*>(vals);
    for (int64_t w = 0; w < W; ++w) {
      const uint64_t mw = m[w];
      const float* xw = x + w * 64;
      const float* q = p;
      p += _mm_popcnt_u64(mw);
      for (int k = 0; k < 4; ++k) {
        const __mmask16 mk = static_cast<__mmask16>(mw >> (16 * k));
        __m512 raw = _mm512_loadu_ps(q);
        __asm__("" : "+v"(raw));  // keep the register form: a memory-operand expand is microcoded on some CPUs
        const __m512 v = _mm512_maskz_expand_ps(mk, raw);
        q += _mm_popcnt_u32(mk);
        for (int b = 0; b < NB; ++b)
          acc[b][k % NA] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xw + b * Cp + 16 * k), acc[b][k % NA]);
      }
    }
  }
  for (int b = 0; b < NB; ++b) {
    __m512 s = acc[b][0];
    for (int a = 1; a < NA; ++a) s = _mm512_add_ps(s, acc[b][a]);
    out[b] = _mm512_reduce_add_ps(s);
  }
}

// Prefill (many tokens), AVX-512: activations transposed to xt [Cp, Tp] (Tp = T rounded up to 16),
// so each stored weight is broadcast once and multiplied into up to 64 tokens held in 4 registers:
// the work is proportional to the stored values, not to the dense size. yt is [R, Tp].
template <bool BF16, int NZ>
__attribute__((target("avx512f,avx512bw,avx512vl,popcnt,bmi,bmi2"))) void row_prefill_avx512(
    const uint64_t* m, int64_t W, const void* vals, const float* xt, int64_t Tp, int64_t t0, float* yt) {
  __m512 acc[NZ];
  for (int i = 0; i < NZ; ++i) acc[i] = _mm512_setzero_ps();
  const float* pf = static_cast<const float*>(vals);
  const uint16_t* ph = static_cast<const uint16_t*>(vals);
  const float* base = xt + t0;
  for (int64_t w = 0; w < W; ++w) {
    uint64_t bits = m[w];
    while (bits) {
      const int64_t c = w * 64 + _tzcnt_u64(bits);
      bits = _blsr_u64(bits);
      const __m512 v = _mm512_set1_ps(BF16 ? bf16_to_float(*ph++) : *pf++);
      const float* xc = base + c * Tp;
      for (int i = 0; i < NZ; ++i) acc[i] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xc + 16 * i), acc[i]);
    }
  }
  for (int i = 0; i < NZ; ++i) _mm512_storeu_ps(yt + t0 + 16 * i, acc[i]);
}

template <bool BF16>
__attribute__((noinline)) void rows_prefill(const uint64_t* masks, const void* values, const int64_t* offsets, const float* xt,
                                            float* yt, int64_t W, int64_t Tp, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const void* vals = BF16 ? static_cast<const void*>(static_cast<const uint16_t*>(values) + offsets[r])
                            : static_cast<const void*>(static_cast<const float*>(values) + offsets[r]);
    const uint64_t* m = masks + r * W;
    float* y = yt + r * Tp;
    for (int64_t t0 = 0; t0 < Tp; t0 += 64) {
      switch (std::min<int64_t>(4, (Tp - t0) / 16)) {
        case 1: row_prefill_avx512<BF16, 1>(m, W, vals, xt, Tp, t0, y); break;
        case 2: row_prefill_avx512<BF16, 2>(m, W, vals, xt, Tp, t0, y); break;
        case 3: row_prefill_avx512<BF16, 3>(m, W, vals, xt, Tp, t0, y); break;
        default: row_prefill_avx512<BF16, 4>(m, W, vals, xt, Tp, t0, y); break;
      }
    }
  }
}

constexpr int64_t kPrefillMin = 16;  // tokens from which the transposed (prefill) kernel is used

// One token tile of one row, at compile-time tile width NB.
template <int ISA, bool BF16, int NB>
inline void tile(const Job& j, int64_t r, int64_t t0, float* out) {
  const void* vals = BF16 ? static_cast<const void*>(static_cast<const uint16_t*>(j.values) + j.offsets[r])
                          : static_cast<const void*>(static_cast<const float*>(j.values) + j.offsets[r]);
  const uint64_t* m = j.masks + r * j.W;
  const float* x = j.x + t0 * j.Cp;
  if constexpr (ISA == 2)
    row_avx512<BF16, NB>(m, j.W, vals, x, j.Cp, out);
  else
    row_avx2<BF16, NB>(m, j.W, vals, x, j.Cp, out);
}

template <int ISA, bool BF16>
__attribute__((noinline)) void rows_simd(const Job& j, int64_t r0, int64_t r1) {
  float out[kTile];
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    const int64_t re = std::min(rb + kRowBlock, r1);
    for (int64_t t0 = 0; t0 < j.T; t0 += kTile) {
      const int nb = static_cast<int>(std::min<int64_t>(kTile, j.T - t0));
      for (int64_t r = rb; r < re; ++r) {
        switch (nb) {
          case 1: tile<ISA, BF16, 1>(j, r, t0, out); break;
          case 2: tile<ISA, BF16, 2>(j, r, t0, out); break;
          case 3: tile<ISA, BF16, 3>(j, r, t0, out); break;
          case 4: tile<ISA, BF16, 4>(j, r, t0, out); break;
          case 5: tile<ISA, BF16, 5>(j, r, t0, out); break;
          case 6: tile<ISA, BF16, 6>(j, r, t0, out); break;
          case 7: tile<ISA, BF16, 7>(j, r, t0, out); break;
          default: tile<ISA, BF16, 8>(j, r, t0, out); break;
        }
        for (int b = 0; b < nb; ++b) j.y[(t0 + b) * j.R + r] = out[b];
      }
    }
  }
}

void run_rows(int64_t isa, bool bf16, const Job& j, int64_t r0, int64_t r1) {
  if (isa == 2) {
    bf16 ? rows_simd<2, true>(j, r0, r1) : rows_simd<2, false>(j, r0, r1);
  } else if (isa == 1) {
    bf16 ? rows_simd<1, true>(j, r0, r1) : rows_simd<1, false>(j, r0, r1);
  } else {
    bf16 ? rows_scalar<true>(j, r0, r1) : rows_scalar<false>(j, r0, r1);
  }
}

at::Tensor sparse_linear_cpu(const at::Tensor& x, const at::Tensor& masks, const at::Tensor& values,
                             const at::Tensor& row_offsets, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(masks.dim() == 2 && masks.scalar_type() == at::kLong, "seftc::sparse_linear: masks must be int64 [R, W]");
  TORCH_CHECK(values.dim() == 1 && (values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16),
              "seftc::sparse_linear: values must be a 1-D float32 or bfloat16 tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "seftc::sparse_linear: x must be float32 or bfloat16");
  TORCH_CHECK(x.dim() >= 1, "seftc::sparse_linear: x must have at least one dimension");
  const int64_t R = masks.size(0), W = masks.size(1), C = x.size(-1), Cp = W * 64;
  TORCH_CHECK(W == (C + 63) / 64, "seftc::sparse_linear: masks have ", W, " words per row, x has ", C, " features");
  TORCH_CHECK(row_offsets.dim() == 1 && row_offsets.scalar_type() == at::kLong && row_offsets.numel() == R + 1,
              "seftc::sparse_linear: row_offsets must be int64 [R + 1]");
  auto m = masks.contiguous();
  auto v = values.contiguous();
  auto o = row_offsets.contiguous();
  auto x2 = x.reshape({-1, C}).contiguous();
  const int64_t T = x2.size(0);

  const bool bf16 = v.scalar_type() == at::kBFloat16;
  const int64_t isa = active_isa();
  auto finish = [&](at::Tensor y) {
    if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
    auto out_shape = x.sizes().vec();
    out_shape.back() = R;
    if (x.scalar_type() != at::kFloat) y = y.to(x.scalar_type());
    return y.view(out_shape);
  };
  if (isa == 2 && T >= kPrefillMin && R > 0) {
    const int64_t Tp = (T + 15) / 16 * 16;
    auto xt = at::zeros({Cp, Tp}, x.options().dtype(at::kFloat));
    xt.narrow(0, 0, C).narrow(1, 0, T).copy_(x2.t());
    auto yt = at::empty({R, Tp}, x.options().dtype(at::kFloat));
    const uint64_t* mp = reinterpret_cast<const uint64_t*>(m.data_ptr<int64_t>());
    const float* xtp = xt.data_ptr<float>();
    float* ytp = yt.data_ptr<float>();
    const int64_t* op = o.data_ptr<int64_t>();
    const void* vp = v.data_ptr();
    at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
      bf16 ? rows_prefill<true>(mp, vp, op, xtp, ytp, W, Tp, r0, r1) : rows_prefill<false>(mp, vp, op, xtp, ytp, W, Tp, r0, r1);
    });
    return finish(yt.narrow(1, 0, T).t().contiguous());
  }
  auto xp = at::empty({T, Cp}, x.options().dtype(at::kFloat));
  float* xpd = xp.data_ptr<float>();
  if (x2.scalar_type() == at::kFloat) {
    const float* src = x2.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) {
      std::memcpy(xpd + t * Cp, src + t * C, C * sizeof(float));
      std::fill(xpd + t * Cp + C, xpd + (t + 1) * Cp, 0.f);
    }
  } else {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(x2.data_ptr<at::BFloat16>());
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t c = 0; c < C; ++c) xpd[t * Cp + c] = bf16_to_float(src[t * C + c]);
      std::fill(xpd + t * Cp + C, xpd + (t + 1) * Cp, 0.f);
    }
  }
  auto y = at::empty({T, R}, x.options().dtype(at::kFloat));
  Job j{reinterpret_cast<const uint64_t*>(m.data_ptr<int64_t>()), v.data_ptr(), o.data_ptr<int64_t>(), xpd,
        y.data_ptr<float>(), R, W, Cp, T};
  if (R > 0 && T > 0) {
    // at least ~32K weight positions per thread: below that a fork/join costs more than it saves
    const int64_t grain = std::max<int64_t>(16, 32768 / std::max<int64_t>(1, Cp * T));
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) { run_rows(isa, bf16, j, r0, r1); });
  }
  return finish(y);
}

int64_t set_isa(int64_t level) {
  g_forced = level;
  return active_isa();
}

int64_t get_isa() { return active_isa(); }

int64_t best_isa() { return detect_isa(); }

}  // namespace

TORCH_LIBRARY_IMPL(seftc, CPU, m) { m.impl("sparse_linear", &sparse_linear_cpu); }

TORCH_LIBRARY(seftc_cpu, m) {
  m.def("set_isa(int level) -> int", &set_isa);
  m.def("isa() -> int", &get_isa);
  m.def("best_isa() -> int", &best_isa);
}
