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
//   level 3: AVX-512 + AVX512-BF16       level 2, and bf16 prefill above 64 tokens on vdpbf16ps (two columns per op)
//   level 2: AVX-512 (F, BW, VL)        a masked expand (register form) decodes 16 values per mask word
//   level 1: AVX2 + FMA                  a 256-entry shuffle table decodes 8 values per mask byte
//   level 0: scalar                      bit iteration
// Activations are converted once per call into a zero-padded fp32 buffer [T, 64*W]; tokens are
// processed in tiles of up to 8, so each decoded weight vector serves up to 8 tokens. From 16 tokens
// on (prefill) the AVX-512 path switches to a transposed-activation kernel whose work scales with
// the stored values (see rows_prefill); with bf16 weights and activations and AVX512-BF16 it runs
// on bf16 dot products of column pairs (see row_prefill_dpbf16).
//
// seftc_cpu::decompress (and decompress_int8, for the int8 layout of seftc/runtime/int8.py) writes
// the dense weight of a layout into a caller's buffer (fp32 or bf16): the "decompress + dense GEMM"
// path of seftc.runtime.dispatch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <vector>
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
    return __builtin_cpu_supports("avx512bf16") ? 3 : 2;
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

// Prefill (many tokens), AVX-512. Activations are laid out in panels: the tokens, padded to
// Tp = nW * WT, are cut into nW windows of WT = 16*NZ tokens, and window w is a contiguous panel
// [Cp, WT] (fp32). Each stored weight is broadcast once and multiplied into the WT tokens of its
// column, held in NZ registers: the work is proportional to the stored values, not to the dense
// size. Loop order, for the caches: a thread's rows go in blocks whose stored weights stay in L2
// (kBlockBytes); for each window, the columns go in groups of whole mask words whose slice of the
// panel fits in L1 (kChunkBytes), and each group sweeps the block's rows, adding into their
// outputs (yt [R, Tp], kept in L2). So the multiply-adds read their activations from L1, not L2.
// Two sets of accumulators take alternate stored values, so that consecutive multiply-adds into
// one register do not wait on each other's latency.
constexpr int64_t kBlockBytes = 192 * 1024;
constexpr int64_t kChunkBytes = 16 * 1024;

template <bool BF16, int NZ>
__attribute__((target("avx512f,avx512bw,avx512vl,popcnt,bmi,bmi2"))) void group_prefill_avx512(
    const uint64_t* masks, int64_t W, const void* values, int64_t* ptr, int64_t rb, int64_t re, int64_t g0, int64_t g1,
    const float* panel, float* yt, int64_t Tp) {
  constexpr int64_t WT = 16 * NZ;
  for (int64_t r = rb; r < re; ++r) {
    float* y = yt + r * Tp;
    __m512 a0[NZ], a1[NZ];
    for (int i = 0; i < NZ; ++i) {
      a0[i] = g0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(y + 16 * i);
      a1[i] = _mm512_setzero_ps();
    }
    const float* pf = static_cast<const float*>(values) + ptr[r - rb];
    const uint16_t* ph = static_cast<const uint16_t*>(values) + ptr[r - rb];
    for (int64_t w = g0; w < g1; ++w) {
      uint64_t bits = masks[r * W + w];
      while (bits) {
        int64_t c = w * 64 + _tzcnt_u64(bits);
        bits = _blsr_u64(bits);
        __m512 v = _mm512_set1_ps(BF16 ? bf16_to_float(*ph++) : *pf++);
        const float* xc = panel + c * WT;
        for (int i = 0; i < NZ; ++i) a0[i] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xc + 16 * i), a0[i]);
        if (!bits) break;
        c = w * 64 + _tzcnt_u64(bits);
        bits = _blsr_u64(bits);
        v = _mm512_set1_ps(BF16 ? bf16_to_float(*ph++) : *pf++);
        xc = panel + c * WT;
        for (int i = 0; i < NZ; ++i) a1[i] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xc + 16 * i), a1[i]);
      }
    }
    ptr[r - rb] = BF16 ? ph - static_cast<const uint16_t*>(values) : pf - static_cast<const float*>(values);
    for (int i = 0; i < NZ; ++i) _mm512_storeu_ps(y + 16 * i, _mm512_add_ps(a0[i], a1[i]));
  }
}

// Prefill with bf16 weights and activations on AVX512-BF16: panels of column pairs, [Cp/2, WT]
// 32-bit words (bf16 of column 2j in the low half, 2j+1 in the high half). Each column pair holding
// a stored value is one broadcast weight pair (a pair with one stored value gets a zero partner)
// and one vdpbf16ps per 16 tokens: two columns per instruction, products exact in fp32, fp32
// accumulation (denormal inputs and results flushed to zero, as the instruction does).
constexpr uint32_t kPairKeep[4] = {0u, 0xffffu, 0xffffu, 0xffffffffu};
constexpr int kPairShift[4] = {0, 0, 16, 0};

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,popcnt,bmi,bmi2"))) inline __m512i pair_weight(
    uint64_t mw, unsigned j2, const uint16_t*& p) {
  const unsigned two = static_cast<unsigned>(mw >> j2) & 3u;  // 1: even column, 2: odd, 3: both
  uint32_t u;
  std::memcpy(&u, p, 4);  // may read one value past the row: the buffer is padded
  p += (two & 1u) + (two >> 1);
  return _mm512_set1_epi32(static_cast<int>((u & kPairKeep[two]) << kPairShift[two]));
}

template <int NZ>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,popcnt,bmi,bmi2"))) void group_prefill_dpbf16(
    const uint64_t* masks, int64_t W, const uint16_t* values, int64_t* ptr, int64_t rb, int64_t re, int64_t g0, int64_t g1,
    const uint32_t* panel, float* yt, int64_t Tp) {
  constexpr int64_t WT = 16 * NZ;
  for (int64_t r = rb; r < re; ++r) {
    float* y = yt + r * Tp;
    __m512 a0[NZ], a1[NZ];
    for (int i = 0; i < NZ; ++i) {
      a0[i] = g0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(y + 16 * i);
      a1[i] = _mm512_setzero_ps();
    }
    const uint16_t* p = values + ptr[r - rb];
    for (int64_t w = g0; w < g1; ++w) {
      const uint64_t mw = masks[r * W + w];
      uint64_t pairs = (mw | (mw >> 1)) & 0x5555555555555555ull;  // bit 2j: column pair j holds a value
      const uint32_t* xw = panel + w * 32 * WT;
      while (pairs) {
        unsigned j2 = static_cast<unsigned>(_tzcnt_u64(pairs));
        pairs = _blsr_u64(pairs);
        __m512i wv = pair_weight(mw, j2, p);
        const uint32_t* xc = xw + (j2 >> 1) * WT;
        for (int i = 0; i < NZ; ++i)
          a0[i] = _mm512_dpbf16_ps(a0[i], (__m512bh)wv, (__m512bh)_mm512_loadu_si512(xc + 16 * i));
        if (!pairs) break;
        j2 = static_cast<unsigned>(_tzcnt_u64(pairs));
        pairs = _blsr_u64(pairs);
        wv = pair_weight(mw, j2, p);
        xc = xw + (j2 >> 1) * WT;
        for (int i = 0; i < NZ; ++i)
          a1[i] = _mm512_dpbf16_ps(a1[i], (__m512bh)wv, (__m512bh)_mm512_loadu_si512(xc + 16 * i));
      }
    }
    ptr[r - rb] = p - values;
    for (int i = 0; i < NZ; ++i) _mm512_storeu_ps(y + 16 * i, _mm512_add_ps(a0[i], a1[i]));
  }
}

struct Windows {
  int nz;      // registers (16 tokens each) per window
  int64_t n;   // windows
  int64_t Tp;  // padded tokens = n * 16 * nz
};

// Windows as equal as possible, each of at most `max_nz` registers.
Windows plan_windows(int64_t T, int max_nz) {
  const int64_t groups = (T + 15) / 16;
  const int64_t n = (groups + max_nz - 1) / max_nz;
  const int nz = static_cast<int>((groups + n - 1) / n);
  return {nz, n, n * 16 * nz};
}

// Calls group(rb, re, ptr, window, g0, g1) over row blocks x windows x column groups (see above);
// ptr[r - rb] is row r's next stored value, advanced by the group kernel.
template <class Group>
void prefill_blocked(const int64_t* offsets, int64_t W, int64_t value_bytes, int64_t r0, int64_t r1, int64_t windows,
                     int64_t group_words, Group group) {
  std::vector<int64_t> ptr;
  for (int64_t rb = r0; rb < r1;) {
    int64_t re = rb, bytes = 0;
    while (re < r1 && (re == rb || bytes < kBlockBytes)) {
      bytes += (offsets[re + 1] - offsets[re]) * value_bytes + W * 8;
      ++re;
    }
    ptr.resize(re - rb);
    for (int64_t w = 0; w < windows; ++w) {
      for (int64_t r = rb; r < re; ++r) ptr[r - rb] = offsets[r];
      for (int64_t g0 = 0; g0 < W; g0 += group_words) group(rb, re, ptr.data(), w, g0, std::min(W, g0 + group_words));
    }
    rb = re;
  }
}

#define SEFTC_NZ_SWITCH(nz, CALL) \
  switch (nz) {                   \
    case 1: CALL(1); break;       \
    case 2: CALL(2); break;       \
    case 3: CALL(3); break;       \
    case 4: CALL(4); break;       \
    case 5: CALL(5); break;       \
    case 6: CALL(6); break;       \
    case 7: CALL(7); break;       \
    default: CALL(8); break;      \
  }

constexpr int kMaxNZ = 4;        // fp32 panels: 64 tokens x 64 columns x 4 B = one 16 KB chunk per mask word
constexpr int kMaxNZPairs = 8;   // bf16 pair panels: 128 tokens x 32 pairs x 4 B = 16 KB per mask word

template <bool BF16>
__attribute__((noinline)) void rows_prefill(const uint64_t* masks, const void* values, const int64_t* offsets, const float* panels,
                                            float* yt, int64_t W, const Windows& win, int64_t r0, int64_t r1) {
  const int64_t Cp = W * 64, WT = 16 * win.nz;
  const int64_t group_words = std::max<int64_t>(1, kChunkBytes / (64 * WT * 4));
  prefill_blocked(offsets, W, BF16 ? 2 : 4, r0, r1, win.n, group_words,
                  [&](int64_t rb, int64_t re, int64_t* ptr, int64_t w, int64_t g0, int64_t g1) {
#define SEFTC_CALL(N) \
  group_prefill_avx512<BF16, N>(masks, W, values, ptr, rb, re, g0, g1, panels + w * Cp * WT, yt + w * WT, win.Tp)
                    SEFTC_NZ_SWITCH(win.nz, SEFTC_CALL)
#undef SEFTC_CALL
                  });
}

__attribute__((noinline)) void rows_prefill_dpbf16(const uint64_t* masks, const uint16_t* values, const int64_t* offsets,
                                                   const uint32_t* panels, float* yt, int64_t W, const Windows& win, int64_t r0,
                                                   int64_t r1) {
  const int64_t Cp = W * 64, WT = 16 * win.nz;
  const int64_t group_words = std::max<int64_t>(1, kChunkBytes / (32 * WT * 4));
  prefill_blocked(offsets, W, 2, r0, r1, win.n, group_words,
                  [&](int64_t rb, int64_t re, int64_t* ptr, int64_t w, int64_t g0, int64_t g1) {
#define SEFTC_CALL(N) \
  group_prefill_dpbf16<N>(masks, W, values, ptr, rb, re, g0, g1, panels + w * (Cp / 2) * WT, yt + w * WT, win.Tp)
                    SEFTC_NZ_SWITCH(win.nz, SEFTC_CALL)
#undef SEFTC_CALL
                  });
}

constexpr int64_t kPrefillMin = 16;  // tokens from which the transposed (prefill) kernel is used
constexpr int64_t kDotMin = 64;      // tokens above which bf16 prefill runs on vdpbf16ps (AVX512-BF16)

// One token tile of one row, at compile-time tile width NB.
template <int ISA, bool BF16, int NB>
inline void tile(const Job& j, int64_t r, int64_t t0, float* out) {
  const void* vals = BF16 ? static_cast<const void*>(static_cast<const uint16_t*>(j.values) + j.offsets[r])
                          : static_cast<const void*>(static_cast<const float*>(j.values) + j.offsets[r]);
  const uint64_t* m = j.masks + r * j.W;
  const float* x = j.x + t0 * j.Cp;
  if constexpr (ISA >= 2)
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
  if (isa >= 2) {
    bf16 ? rows_simd<2, true>(j, r0, r1) : rows_simd<2, false>(j, r0, r1);
  } else if (isa == 1) {
    bf16 ? rows_simd<1, true>(j, r0, r1) : rows_simd<1, false>(j, r0, r1);
  } else {
    bf16 ? rows_scalar<true>(j, r0, r1) : rows_scalar<false>(j, r0, r1);
  }
}

constexpr int64_t kPad = 16;  // seftc/runtime/layouts.py PAD: SIMD decoders read up to 16 values past a row

void check_padded(const char* op, const at::Tensor& v, const at::Tensor& o, int64_t R) {
  const int64_t stored = o.data_ptr<int64_t>()[R];
  TORCH_CHECK(o.data_ptr<int64_t>()[0] >= 0 && stored >= 0 && v.numel() >= stored + kPad, op, ": values hold ", v.numel(),
              " entries; the layout stores ", stored, " and needs ", kPad, " padding entries after them (SparseLayout pads)");
}

// ---------------------------------------------------------------------------------- decompress
// out [R, C] gets the dense weight (every position written, zeros included), in out's dtype.
template <typename In, typename Out>
void decompress_rows_scalar(const uint64_t* masks, const In* values, const int64_t* offsets, Out* out, int64_t W, int64_t C,
                            int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    Out* dst = out + r * C;
    std::fill(dst, dst + C, Out(0.f));
    const In* p = values + offsets[r];
    for (int64_t w = 0; w < W; ++w) {
      uint64_t bits = masks[r * W + w];
      while (bits) {
        const int64_t c = w * 64 + __builtin_ctzll(bits);
        bits &= bits - 1;
        if (c < C) dst[c] = static_cast<Out>(static_cast<float>(*p));
        ++p;
      }
    }
  }
}

// MODE 0: fp32 -> fp32, 1: bf16 -> bf16, 2: bf16 -> fp32 (exact widening)
template <int MODE>
__attribute__((target("avx512f,avx512bw,avx512vl,popcnt"))) void decompress_rows_avx512(
    const uint64_t* masks, const void* values, const int64_t* offsets, void* out, int64_t W, int64_t C, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t* m = masks + r * W;
    const float* pf = static_cast<const float*>(values) + offsets[r];
    const uint16_t* ph = static_cast<const uint16_t*>(values) + offsets[r];
    float* of = static_cast<float*>(out) + r * C;
    uint16_t* oh = static_cast<uint16_t*>(out) + r * C;
    for (int64_t w = 0; w < W; ++w) {
      const uint64_t mw = m[w];
      for (int k = 0; k < 4; ++k) {
        const int64_t col = w * 64 + 16 * k;
        if (col >= C) break;
        const __mmask16 st = C - col >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (C - col)) - 1);
        const __mmask16 mk = static_cast<__mmask16>(mw >> (16 * k));
        if (MODE == 0) {
          __m512 raw = _mm512_loadu_ps(pf);
          __asm__("" : "+v"(raw));  // register-form expand (see row_avx512)
          _mm512_mask_storeu_ps(of + col, st, _mm512_maskz_expand_ps(mk, raw));
          pf += _mm_popcnt_u32(mk);
        } else {
          __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ph)));
          __asm__("" : "+v"(wide));
          ph += _mm_popcnt_u32(mk);
          const __m512i e = _mm512_maskz_expand_epi32(mk, wide);
          if (MODE == 1)
            _mm256_mask_storeu_epi16(oh + col, st, _mm512_cvtepi32_epi16(e));
          else
            _mm512_mask_storeu_ps(of + col, st, _mm512_castsi512_ps(_mm512_slli_epi32(e, 16)));
        }
      }
    }
  }
}

void decompress_cpu(const at::Tensor& masks, const at::Tensor& values, const at::Tensor& row_offsets, const at::Tensor& out) {
  TORCH_CHECK(masks.dim() == 2 && masks.scalar_type() == at::kLong, "seftc_cpu::decompress: masks must be int64 [R, W]");
  TORCH_CHECK(values.dim() == 1 && (values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16),
              "seftc_cpu::decompress: values must be a 1-D float32 or bfloat16 tensor");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "seftc_cpu::decompress: out must be a contiguous float32 or bfloat16 [R, C] tensor");
  const int64_t R = masks.size(0), W = masks.size(1), C = out.size(1);
  TORCH_CHECK(out.size(0) == R && W == (C + 63) / 64, "seftc_cpu::decompress: out is ", out.sizes(), ", the layout has ", R,
              " rows of ", W, " mask words");
  TORCH_CHECK(row_offsets.dim() == 1 && row_offsets.scalar_type() == at::kLong && row_offsets.numel() == R + 1,
              "seftc_cpu::decompress: row_offsets must be int64 [R + 1]");
  auto m = masks.contiguous();
  auto v = values.contiguous();
  auto o = row_offsets.contiguous();
  check_padded("seftc_cpu::decompress", v, o, R);
  if (R == 0 || C == 0) return;
  const uint64_t* mp = reinterpret_cast<const uint64_t*>(m.data_ptr<int64_t>());
  const int64_t* op = o.data_ptr<int64_t>();
  const bool in16 = v.scalar_type() == at::kBFloat16, out16 = out.scalar_type() == at::kBFloat16;
  const int64_t isa = active_isa();
  const int64_t grain = std::max<int64_t>(1, 65536 / C);
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    if (isa >= 2 && (in16 || !out16)) {
      if (!in16)
        decompress_rows_avx512<0>(mp, v.data_ptr(), op, out.data_ptr(), W, C, r0, r1);
      else if (out16)
        decompress_rows_avx512<1>(mp, v.data_ptr(), op, out.data_ptr(), W, C, r0, r1);
      else
        decompress_rows_avx512<2>(mp, v.data_ptr(), op, out.data_ptr(), W, C, r0, r1);
    } else if (in16 && out16) {
      decompress_rows_scalar(mp, v.data_ptr<at::BFloat16>(), op, out.data_ptr<at::BFloat16>(), W, C, r0, r1);
    } else if (in16) {
      decompress_rows_scalar(mp, v.data_ptr<at::BFloat16>(), op, out.data_ptr<float>(), W, C, r0, r1);
    } else if (out16) {
      decompress_rows_scalar(mp, v.data_ptr<float>(), op, out.data_ptr<at::BFloat16>(), W, C, r0, r1);
    } else {
      decompress_rows_scalar(mp, v.data_ptr<float>(), op, out.data_ptr<float>(), W, C, r0, r1);
    }
  });
}

// ------------------------------------------------------------------------------ decompress, int8
// An int8 layout (seftc/runtime/int8.py: int8 values, float32 per-row scales) dequantized into
// out [R, C]: out[r, c] = float(q) * scale[r], rounded to out's dtype (bf16: to nearest even, as
// torch rounds) -- the same numbers as Int8Layout.to_dense.
template <typename Out>
void decompress_int8_rows_scalar(const uint64_t* masks, const int8_t* values, const float* scales, const int64_t* offsets, Out* out,
                                 int64_t W, int64_t C, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    Out* dst = out + r * C;
    std::fill(dst, dst + C, Out(0.f));
    const int8_t* p = values + offsets[r];
    const float s = scales[r];
    for (int64_t w = 0; w < W; ++w) {
      uint64_t bits = masks[r * W + w];
      while (bits) {
        const int64_t c = w * 64 + __builtin_ctzll(bits);
        bits &= bits - 1;
        if (c < C) dst[c] = static_cast<Out>(static_cast<float>(*p) * s);
        ++p;
      }
    }
  }
}

template <bool BF16_OUT>
__attribute__((target("avx512f,avx512bw,avx512vl,popcnt"))) void decompress_int8_rows_avx512(
    const uint64_t* masks, const int8_t* values, const float* scales, const int64_t* offsets, void* out, int64_t W, int64_t C,
    int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t* m = masks + r * W;
    const int8_t* p = values + offsets[r];
    const __m512 s = _mm512_set1_ps(scales[r]);
    float* of = static_cast<float*>(out) + r * C;
    uint16_t* oh = static_cast<uint16_t*>(out) + r * C;
    for (int64_t w = 0; w < W; ++w) {
      const uint64_t mw = m[w];
      for (int k = 0; k < 4; ++k) {
        const int64_t col = w * 64 + 16 * k;
        if (col >= C) break;
        const __mmask16 st = C - col >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (C - col)) - 1);
        const __mmask16 mk = static_cast<__mmask16>(mw >> (16 * k));
        __m512i wide = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));  // padded: reads stay inside
        __asm__("" : "+v"(wide));
        p += _mm_popcnt_u32(mk);
        const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_expand_epi32(mk, wide)), s);
        if (BF16_OUT) {  // round to nearest even (finite values: int8 times a finite scale)
          const __m512i b = _mm512_castps_si512(f);
          const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
          const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
          _mm256_mask_storeu_epi16(oh + col, st, _mm512_cvtepi32_epi16(rounded));
        } else {
          _mm512_mask_storeu_ps(of + col, st, f);
        }
      }
    }
  }
}

void decompress_int8_cpu(const at::Tensor& masks, const at::Tensor& values, const at::Tensor& scales, const at::Tensor& row_offsets,
                         const at::Tensor& out) {
  TORCH_CHECK(masks.dim() == 2 && masks.scalar_type() == at::kLong, "seftc_cpu::decompress_int8: masks must be int64 [R, W]");
  TORCH_CHECK(values.dim() == 1 && values.scalar_type() == at::kChar, "seftc_cpu::decompress_int8: values must be a 1-D int8 tensor");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "seftc_cpu::decompress_int8: out must be a contiguous float32 or bfloat16 [R, C] tensor");
  const int64_t R = masks.size(0), W = masks.size(1), C = out.size(1);
  TORCH_CHECK(out.size(0) == R && W == (C + 63) / 64, "seftc_cpu::decompress_int8: out is ", out.sizes(), ", the layout has ", R,
              " rows of ", W, " mask words");
  TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == at::kFloat && scales.numel() == R,
              "seftc_cpu::decompress_int8: scales must be float32 [R]");
  TORCH_CHECK(row_offsets.dim() == 1 && row_offsets.scalar_type() == at::kLong && row_offsets.numel() == R + 1,
              "seftc_cpu::decompress_int8: row_offsets must be int64 [R + 1]");
  auto m = masks.contiguous();
  auto v = values.contiguous();
  auto sc = scales.contiguous();
  auto o = row_offsets.contiguous();
  check_padded("seftc_cpu::decompress_int8", v, o, R);
  if (R == 0 || C == 0) return;
  const uint64_t* mp = reinterpret_cast<const uint64_t*>(m.data_ptr<int64_t>());
  const int8_t* vp = v.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  const int64_t* op = o.data_ptr<int64_t>();
  const bool out16 = out.scalar_type() == at::kBFloat16;
  const int64_t isa = active_isa();
  at::parallel_for(0, R, std::max<int64_t>(1, 65536 / C), [&](int64_t r0, int64_t r1) {
    if (isa >= 2)
      out16 ? decompress_int8_rows_avx512<true>(mp, vp, sp, op, out.data_ptr(), W, C, r0, r1)
            : decompress_int8_rows_avx512<false>(mp, vp, sp, op, out.data_ptr(), W, C, r0, r1);
    else if (out16)
      decompress_int8_rows_scalar(mp, vp, sp, op, out.data_ptr<at::BFloat16>(), W, C, r0, r1);
    else
      decompress_int8_rows_scalar(mp, vp, sp, op, out.data_ptr<float>(), W, C, r0, r1);
  });
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
  check_padded("seftc::sparse_linear", v, o, R);
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
  if (isa >= 2 && T >= kPrefillMin && R > 0) {
    // bf16 dot products pay a few scalar instructions per column pair: measured here, they beat the
    // fp32 broadcast kernel from 128 tokens on and lose below 64 (70% and 50% sparse, 1536 x 576)
    const bool dp = isa >= 3 && bf16 && x2.scalar_type() == at::kBFloat16 && T > kDotMin;
    const Windows win = plan_windows(T, dp ? kMaxNZPairs : kMaxNZ);
    const int64_t WT = 16 * win.nz;
    auto yt = at::empty({R, win.Tp}, x.options().dtype(at::kFloat));
    const uint64_t* mp = reinterpret_cast<const uint64_t*>(m.data_ptr<int64_t>());
    float* ytp = yt.data_ptr<float>();
    const int64_t* op = o.data_ptr<int64_t>();
    // x zero-padded to [Tp, Cp], cut into windows of WT tokens, each transposed into a panel
    auto xp = at::zeros({win.Tp, Cp}, x.options().dtype(dp ? at::kBFloat16 : at::kFloat));
    xp.narrow(0, 0, T).narrow(1, 0, C).copy_(x2);
    if (dp) {
      auto panels = xp.view(at::kInt).view({win.n, WT, Cp / 2}).transpose(1, 2).contiguous();  // [n, Cp/2, WT] pairs
      const uint32_t* pp = reinterpret_cast<const uint32_t*>(panels.data_ptr<int32_t>());
      const uint16_t* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
      at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) { rows_prefill_dpbf16(mp, vp, op, pp, ytp, W, win, r0, r1); });
    } else {
      auto panels = xp.view({win.n, WT, Cp}).transpose(1, 2).contiguous();  // [n, Cp, WT]
      const float* pp = panels.data_ptr<float>();
      const void* vp = v.data_ptr();
      at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
        bf16 ? rows_prefill<true>(mp, vp, op, pp, ytp, W, win, r0, r1) : rows_prefill<false>(mp, vp, op, pp, ytp, W, win, r0, r1);
      });
    }
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

// The level in use (set_isa included), for the extension's other kernel files (sparse_int8.cpp).
int64_t seftc_cpu_active_isa() { return active_isa(); }

TORCH_LIBRARY_IMPL(seftc, CPU, m) { m.impl("sparse_linear", &sparse_linear_cpu); }

TORCH_LIBRARY(seftc_cpu, m) {
  m.def("set_isa(int level) -> int", &set_isa);
  m.def("isa() -> int", &get_isa);
  m.def("best_isa() -> int", &best_isa);
  m.def("decompress(Tensor masks, Tensor values, Tensor row_offsets, Tensor(a!) out) -> ()", &decompress_cpu);
  m.def("decompress_int8(Tensor masks, Tensor values, Tensor scales, Tensor row_offsets, Tensor(a!) out) -> ()", &decompress_int8_cpu);
}
