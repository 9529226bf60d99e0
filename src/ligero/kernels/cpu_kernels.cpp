// Ligero's CPU kernels for small-batch decode (compiled once per machine by torch.utils.cpp_extension).
//
// MKL's sgemv reaches ~12 GB/s on this kind of CPU while a plain streaming read reaches ~29 GB/s per core,
// so a row-blocked dot-product kernel split across threads is what makes decode fast. Weights stay in
// torch.nn.Linear's [out, in] row-major layout (the same layout serves prefill through MKL sgemm), except 4-bit
// group codes, which decode from a copy with rows in bundles of 8 (see int4 below).
//
// Three instruction-set tiers share the entry points at the bottom; the compiler's target picks one:
//   AVX-512 (+ VNNI for ternary, int4 tiles of 4+ rows and the int4 activation split; other int4 and int8 x int8
//   products run the AVX2 code);
//   AVX2 + FMA + F16C (most x86 laptops and servers); portable C++
//   (any CPU: each weight row is decoded to fp32 once, then dotted with the batch's rows in loops the compiler
//   vectorizes). LIGERO_FORCE_AVX2 and LIGERO_FORCE_GENERIC pick a lower tier on a CPU that has more, to test and
//   measure it; `isa()` names the tier compiled.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(LIGERO_FORCE_GENERIC)
#define LIGERO_GENERIC 1
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__) && \
    !defined(LIGERO_FORCE_AVX2)
#define LIGERO_AVX512 1
#define LIGERO_AVX2 1  // every AVX-512 CPU has AVX2: its int4 kernel, and its ternary one without VNNI, run there
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LIGERO_AVX2 1
#else
#define LIGERO_GENERIC 1
#endif
#if defined(LIGERO_AVX512) && defined(__AVX512VNNI__)
#define LIGERO_VNNI 1
#endif
#ifdef LIGERO_AVX2
#include <immintrin.h>
#endif

namespace {

// Runs f(m0, std::integral_constant<int, MT>) over activation rows in tiles of MT <= 8 (a decode batch of up to 16
// rows is one or two tiles): each kernel is compiled for a fixed tile height, so its accumulators stay in registers.
template <typename F>
inline void for_each_tile(int64_t M, F&& f) {
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    switch (std::min<int64_t>(8, M - m0)) {
      case 1: f(m0, std::integral_constant<int, 1>{}); break;
      case 2: f(m0, std::integral_constant<int, 2>{}); break;
      case 3: f(m0, std::integral_constant<int, 3>{}); break;
      case 4: f(m0, std::integral_constant<int, 4>{}); break;
      case 5: f(m0, std::integral_constant<int, 5>{}); break;
      case 6: f(m0, std::integral_constant<int, 6>{}); break;
      case 7: f(m0, std::integral_constant<int, 7>{}); break;
      default: f(m0, std::integral_constant<int, 8>{}); break;
    }
  }
}

// Per-row work split over the cores from 5 rows up: the activations' rounding before a product, and the decode
// step's norms, RoPE, cache write, MLP activation and residuals. On the calling thread alone it kept the other core waiting: at 16 rows ~4 % of the step's CPU
// samples, each core's share of them run twice as long as it needs. Chunks of whole rows: each row's arithmetic is
// the same whichever core runs it.
template <typename F>
inline void over_row_chunks(int64_t B, F&& f) {
  at::parallel_for(0, B, 4, f);
}

template <typename F>
inline void over_rows(int64_t B, F&& f) {
  over_row_chunks(B, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) f(r);
  });
}

// More than 8 rows (prefill, or a decode batch of 9-16): f(rb, re) over blocks of weight rows [rb, re) of about
// kRowBlockBytes (within L2), so each block is read from memory once and reused by every tile of activation rows,
// instead of the thread's whole share of the matrix being streamed again for each tile of 8. One tile: one block.
constexpr int64_t kRowBlockBytes = 128 * 1024;

template <typename F>
inline void for_each_row_block(int64_t begin, int64_t end, int64_t row_bytes, int64_t M, F&& f) {
  // An even count: the 512-bit kernels take bundles in pairs (an odd one goes through the 256-bit code).
  const int64_t fit = (kRowBlockBytes / std::max<int64_t>(1, row_bytes)) & ~int64_t{1};
  const int64_t rows = M <= 8 ? end - begin : std::max<int64_t>(2, fit);
  for (int64_t rb = begin; rb < end; rb += rows) f(rb, std::min(end, rb + rows));
}

// Software prefetch into every cache level. The bundle kernels fetch the next pair of bundles' bytes while they
// multiply the current pair: without it the reads from memory and the multiplies take turns instead of overlapping
// (SmolLM2's 120 int4 projections at 8 rows took ~8.4 ms: about the 1-row time, memory-bound, plus the time with
// the weights in cache).
inline void prefetch_lines(const void* p, int64_t bytes) {
  for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch((const char*)p + at, 0, 3);
}

// How far ahead the one-bundle-at-a-time (256-bit) kernels fetch: bundle u + 2 (SmolLM2's 1-row int4 projections
// ~5 % faster in an interleaved A/B; 4 ahead was no better than none).
constexpr int64_t kBundlesAhead = 2;

// Kernel tails (inputs past the last full vector) multiply-add with an explicit fma: left to the compiler, a scalar
// `s += a * b` is contracted or not depending on how it vectorizes each tile height's loops (seen under -march=native
// on AVX-512 for the AVX2 tier), and a row's result would then depend on the batch it came in.
inline float dot_tail(const float* w, const float* x, int64_t from, int64_t n) {
  float s = 0.f;
  for (int64_t i = from; i < n; ++i) s = std::fma(w[i], x[i], s);  // explicit: see kernel tails below
  return s;
}

// Portable tier: y[m, o] = sum_i w[i] x[m, i] for one decoded weight row w and every activation row m. Eight
// explicit partial sums let the compiler vectorize without reordering anything; one out-of-line copy serves
// every batch size, so a row's result does not depend on the batch it came in.
inline float dot_f32(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += a[i + k] * b[i + k];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

__attribute__((noinline)) void dot_rows_generic(const float* w, const float* x, float* y, int64_t M, int64_t in,
                                                int64_t y_stride) {
  for (int64_t m = 0; m < M; ++m) y[m * y_stride] = dot_f32(w, x + m * in, in);
}

inline float half_to_float(at::Half h) { return static_cast<float>(h); }

#ifdef LIGERO_AVX2
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum8_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// n fp16 values -> fp32 (8 at a time with F16C).
inline void halves_to_floats(const at::Half* h, float* f, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  for (; i < n; ++i) f[i] = half_to_float(h[i]);
}
#else
inline void halves_to_floats(const at::Half* h, float* f, int64_t n) {
  for (int64_t i = 0; i < n; ++i) f[i] = half_to_float(h[i]);
}
#endif

// ============================================ fp32 ============================================================
constexpr int64_t kRows = 4;  // weight rows per block: 4 independent accumulators, 4 sequential streams

// y[m, o] = sum_i W[o, i] * x[m, i] for m < M (M small: decode). Each block of W rows is read from memory
// once and reused from L1 for every row of x.
#if defined(LIGERO_AVX512)
struct F32Vector {  // one fp32 register of this tier, and the few operations gemv_rows needs
  using V = __m512;
  static constexpr int64_t kWidth = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
#elif defined(LIGERO_AVX2)
struct F32Vector {
  using V = __m256;
  static constexpr int64_t kWidth = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(V v) { return hsum8(v); }
};
#endif

void gemv_rows(const float* x, const float* w, float* y, int64_t M, int64_t in, int64_t out,
               int64_t begin, int64_t end) {
  int64_t o = begin;
#if defined(LIGERO_AVX2)  // AVX-512 or AVX2: F32Vector is the tier's widest register
  using Vec = F32Vector;
  for (; o + kRows <= end; o += kRows) {
    const float* r0 = w + o * in;
    const float* r1 = r0 + in;
    const float* r2 = r1 + in;
    const float* r3 = r2 + in;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * in;
      Vec::V a0 = Vec::zero(), a1 = a0, a2 = a0, a3 = a0;
      int64_t i = 0;
      for (; i + Vec::kWidth <= in; i += Vec::kWidth) {
        const Vec::V xv = Vec::load(xm + i);
        a0 = Vec::fmadd(Vec::load(r0 + i), xv, a0);
        a1 = Vec::fmadd(Vec::load(r1 + i), xv, a1);
        a2 = Vec::fmadd(Vec::load(r2 + i), xv, a2);
        a3 = Vec::fmadd(Vec::load(r3 + i), xv, a3);
      }
      float* ym = y + m * out + o;
      ym[0] = Vec::sum(a0) + dot_tail(r0, xm, i, in);
      ym[1] = Vec::sum(a1) + dot_tail(r1, xm, i, in);
      ym[2] = Vec::sum(a2) + dot_tail(r2, xm, i, in);
      ym[3] = Vec::sum(a3) + dot_tail(r3, xm, i, in);
    }
  }
#endif
  for (; o < end; ++o) dot_rows_generic(w + o * in, x, y + o, M, in, out);
}

// ============================================ 16-bit weights ==================================================
// fp16 or bf16 weights [out, in] widened to fp32 in registers (F16C for fp16, a 16-bit shift for bf16), fp32
// products and sums: the weights read 2 bytes each, the arithmetic is the fp32 model's. Four rows at a time, as
// gemv_rows does for fp32.
template <bool BF16>
inline float half_value(uint16_t h) {
  if (BF16) {
    const uint32_t bits = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

#ifdef LIGERO_AVX2
template <bool BF16>
inline __m256 load8_half(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}
#endif

template <bool BF16>
void gemv_half_rows(const float* x, const uint16_t* w, float* y, int64_t M, int64_t in, int64_t out, int64_t begin,
                    int64_t end) {
  int64_t o = begin;
#ifdef LIGERO_AVX2
  for (; o + 4 <= end; o += 4) {
    const uint16_t* r[4] = {w + o * in, w + (o + 1) * in, w + (o + 2) * in, w + (o + 3) * in};
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * in;
      __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      int64_t i = 0;
      for (; i + 8 <= in; i += 8) {
        const __m256 xv = _mm256_loadu_ps(xm + i);
        for (int k = 0; k < 4; ++k) a[k] = _mm256_fmadd_ps(load8_half<BF16>(r[k] + i), xv, a[k]);
      }
      for (int k = 0; k < 4; ++k) {
        float s = hsum8(a[k]);
        for (int64_t j = i; j < in; ++j) s += half_value<BF16>(r[k][j]) * xm[j];
        y[m * out + o + k] = s;
      }
    }
  }
#endif
  for (; o < end; ++o) {
    const uint16_t* row = w + o * in;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * in;
      float s = 0.f;
      for (int64_t j = 0; j < in; ++j) s += half_value<BF16>(row[j]) * xm[j];
      y[m * out + o] = s;
    }
  }
}

// ============================================ int8 ============================================================
// int8 weights, one fp32 scale per output row: y = scale[o] * sum_i q[o, i] x[i].
// Values are widened in registers (int8 -> int32 -> fp32) once per weight row and used for all MT activation
// rows (the decode batch); memory traffic is 1 byte per weight.
#if defined(LIGERO_AVX2) && !defined(LIGERO_AVX512)
// One int8 weight row against MS activation rows (stride in), fp32 products in four chains: chain k takes inputs
// 32j + 8k .. 32j + 8k + 7; y[m * out] = scale * ((c0 + c2) + (c1 + c3)), tail inputs added last.
template <int MS>
inline void int8_rows_sub4(const float* x, const int8_t* row, float scale, float* y, int64_t in, int64_t out) {
  __m256 acc[MS][4];
  for (int m = 0; m < MS; ++m)
    for (int k = 0; k < 4; ++k) acc[m][k] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= in; i += 32) {
    _mm_prefetch((const char*)(row + i + 1024), _MM_HINT_T0);  // +7-25 % on a layer streamed from memory
    for (int k = 0; k < 4; ++k) {
      const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(row + i + 8 * k))));
      for (int m = 0; m < MS; ++m) acc[m][k] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * in + i + 8 * k), acc[m][k]);
    }
  }
  for (int m = 0; m < MS; ++m) {
    const float* xm = x + m * in;
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][2]), _mm256_add_ps(acc[m][1], acc[m][3])));
    for (int64_t t = i; t < in; ++t) s = std::fma(float(row[t]), xm[t], s);  // see kernel tails
    y[m * out] = s * scale;
  }
}
#endif

template <int MT>
void gemv_int8_rows_t(const float* x, const int8_t* q, const float* scale, float* y, int64_t in, int64_t out,
                      int64_t begin, int64_t end) {
#if defined(LIGERO_AVX512)
  for (int64_t o = begin; o < end; ++o) {
    const int8_t* row = q + o * in;
    __m512 acc0[MT], acc1[MT];
    for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= in; i += 32) {
      const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(row + i))));
      const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(row + i + 16))));
      for (int m = 0; m < MT; ++m) {
        acc0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * in + i), acc0[m]);
        acc1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * in + i + 16), acc1[m]);
      }
    }
    for (int m = 0; m < MT; ++m) {
      const float* xm = x + m * in;
      float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m]));
      for (int64_t t = i; t < in; ++t) s = std::fma(float(row[t]), xm[t], s);  // see kernel tails
      y[m * out + o] = s * scale[o];
    }
  }
#elif defined(LIGERO_AVX2)
  // Activation rows in sub-tiles of up to 3 (MT <= 3 in one pass; larger tiles in passes of 2 while the weight row
  // stays in L1): four accumulator chains per activation row keep batch-1 decode at the memory's pace (two chains
  // were FMA-latency bound: 21 GB/s against 27 GB/s on a 2048 x 5632 layer, AVX2 EPYC), and more than ~12
  // accumulators spill. Every sub-tile sums a row in the same order, so a result does not depend on its batch.
  for (int64_t o = begin; o < end; ++o) {
    const int8_t* row = q + o * in;
    if constexpr (MT <= 3) {
      int8_rows_sub4<MT>(x, row, scale[o], y + o, in, out);
    } else {
      int m = 0;
      for (; m + 2 <= MT; m += 2) int8_rows_sub4<2>(x + m * in, row, scale[o], y + m * out + o, in, out);
      if (m < MT) int8_rows_sub4<1>(x + m * in, row, scale[o], y + m * out + o, in, out);
    }
  }
#else
  std::vector<float> w(in);
  for (int64_t o = begin; o < end; ++o) {
    const int8_t* row = q + o * in;
    for (int64_t i = 0; i < in; ++i) w[i] = float(row[i]);
    dot_rows_generic(w.data(), x, y + o, MT, in, out);
    for (int m = 0; m < MT; ++m) y[m * out + o] *= scale[o];
  }
#endif
}

void gemv_int8_rows(const float* x, const int8_t* q, const float* scale, float* y, int64_t M, int64_t in,
                    int64_t out, int64_t begin, int64_t end) {
  for_each_tile(M, [&](int64_t m0, auto mt) {
    gemv_int8_rows_t<decltype(mt)::value>(x + m0 * in, q, scale, y + m0 * out, in, out, begin, end);
  });
}

// int8 weights with an fp16 scale per 32 inputs (GGUF Q8_0, as loaded from GGUF files): y = sum_b scale[o, b] *
// sum_{i in b} q[o, i] x[i]. Each block's 32 products are summed in one fp32 vector, then scaled into the row's
// accumulator; the same order for every tile height.
template <int MT>
void gemv_int8_block_rows_t(const float* x, const int8_t* q, const at::Half* scale, float* y, int64_t in,
                            int64_t out, int64_t begin, int64_t end) {
  const int64_t n_blocks = in / 32;
#if defined(LIGERO_AVX2)
  for (int64_t o = begin; o < end; ++o) {
    const int8_t* row = q + o * in;
    const at::Half* rs = scale + o * n_blocks;
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n_blocks; ++b) {
      const __m128i b0 = _mm_loadu_si128((const __m128i*)(row + b * 32));
      const __m128i b1 = _mm_loadu_si128((const __m128i*)(row + b * 32 + 16));
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b0));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b0, 8)));
      const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b1));
      const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b1, 8)));
      const __m256 ws = _mm256_set1_ps(_cvtsh_ss(rs[b].x));
      for (int m = 0; m < MT; ++m) {
        const float* xb = x + m * in + b * 32;
        __m256 p = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));
        p = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), p);
        p = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), p);
        p = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), p);
        acc[m] = _mm256_fmadd_ps(p, ws, acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) y[m * out + o] = hsum8(acc[m]);
  }
#else
  std::vector<float> w(in);
  for (int64_t o = begin; o < end; ++o) {
    const int8_t* row = q + o * in;
    for (int64_t i = 0; i < in; ++i) w[i] = float(row[i]) * half_to_float(scale[o * n_blocks + i / 32]);
    dot_rows_generic(w.data(), x, y + o, MT, in, out);
  }
#endif
}

void gemv_int8_block_rows(const float* x, const int8_t* q, const at::Half* scale, float* y, int64_t M, int64_t in,
                          int64_t out, int64_t begin, int64_t end) {
  for_each_tile(M, [&](int64_t m0, auto mt) {
    gemv_int8_block_rows_t<decltype(mt)::value>(x + m0 * in, q, scale, y + m0 * out, in, out, begin, end);
  });
}

// ============================================ int4 ============================================================
// Weights: 4-bit codes per group of `group` inputs (a power-of-two multiple of 32), w = scale[g] * code +
// minimum[g] (fp16 each), saved row-major in GGUF's Q4 byte order (per 32-input block, 16 bytes; byte j holds
// input j in its low nibble and input j + 16 in its high one). Decode reads the "x8" layout made from that once
// per layer (pack_int4_x8): output rows in bundles of 8 (the last one zero-padded); per bundle and 32-block,
// 128 bytes = four 32-byte vectors, vector k = bytes 4k..4k+3 of row 0, then of row 1, ... row 7 (each 32-bit lane
// one row); per bundle and group, the 8 rows' fp16 scales (and minimums) side by side. A bundle is read as one
// sequential stream, and each lane accumulates its row's dot product, so a block ends as one vector of the 8 rows'
// results in row order: no horizontal adds, no per-row reduction or scale conversion (the earlier layout, 16 bytes
// of a row per 128-bit lane, needed three horizontal adds per block and activation row: prefill 1.3x slower).
// Reading 4 row-major rows side by side instead was slower than one row at a time (int8, measured: 0.55x;
// 4 interleaved streams defeat the prefetcher).
constexpr int64_t kBundle = 8;  // output rows per bundle of the x8 layout

// x86 tiers multiply bytes in integers (AVX2 vpmaddubsw: 32 unsigned x signed byte pairs per instruction). The
// activations are either int8 per 32-input block (act_int8_blocks, as llama.cpp's Q8_0 pairs with Q4_0/Q4_1) or
// split exactly into two int8 halves of a 16-bit fixed-point value per block (x ~ s * (256 * hi + lo), hi and lo
// in [-128, 127]): ~16-bit activation precision (relative error ~1e-5), numerically a weight-only kernel.
struct SplitX {
  // Per 32-block b, bytes [16b, 16b + 16): "first" = elements 32b..32b+15, "second" = 32b+16..32b+31,
  // matching the packed weight bytes (low nibbles, high nibbles).
  std::vector<int8_t> hi_first, hi_second, lo_first, lo_second;
  std::vector<float> scale;      // per block: x ~ scale * (the block's integers)
  std::vector<float> block_sum;  // per block: sum of x (for the minimum term)
  std::vector<int32_t> int_sum;  // per block: sum of the integers (symmetric grids: the -8 offset, exactly)
};

inline void split_x_resize(int64_t in, SplitX& sx) {
  const int64_t n_blocks = in / 32;
  for (auto* v : {&sx.hi_first, &sx.hi_second, &sx.lo_first, &sx.lo_second}) v->resize(n_blocks * 16);
  sx.scale.resize(n_blocks);
  sx.block_sum.resize(n_blocks);
  sx.int_sum.resize(n_blocks);
}

#ifdef LIGERO_VNNI
inline void split_x(const float* x, int64_t in, SplitX& sx) {
  const int64_t n_blocks = in / 32;
  split_x_resize(in, sx);
  const __m512 sign_off = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  const __m512i c128 = _mm512_set1_epi32(128), cff = _mm512_set1_epi32(0xFF);
  for (int64_t b = 0; b < n_blocks; ++b) {
    const __m512 x0 = _mm512_loadu_ps(x + b * 32), x1 = _mm512_loadu_ps(x + b * 32 + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(x0, sign_off), _mm512_and_ps(x1, sign_off)));
    sx.block_sum[b] = _mm512_reduce_add_ps(_mm512_add_ps(x0, x1));
    // 32639 (not 32767) keeps the high byte of v - lo within int8: v - lo <= 32639 + 128 = 32767.
    sx.scale[b] = amax / 32639.f;
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 32639.f / amax : 0.f);
    const __m512 halves[2] = {x0, x1};
    __m512i vsum = _mm512_setzero_si512();
    for (int h = 0; h < 2; ++h) {
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(halves[h], inv));  // round to nearest even
      const __m512i lo = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, c128), cff), c128);
      const __m512i hi = _mm512_srai_epi32(_mm512_sub_epi32(v, lo), 8);  // exact: v = 256 * hi + lo
      vsum = _mm512_add_epi32(vsum, v);
      _mm_storeu_si128((__m128i*)((h == 0 ? sx.hi_first : sx.hi_second).data() + b * 16), _mm512_cvtepi32_epi8(hi));
      _mm_storeu_si128((__m128i*)((h == 0 ? sx.lo_first : sx.lo_second).data() + b * 16), _mm512_cvtepi32_epi8(lo));
    }
    sx.int_sum[b] = _mm512_reduce_add_epi32(vsum);
  }
}
#else
// The same split in scalar code (O(in) per call, against O(in * out) for the product).
inline void split_x(const float* x, int64_t in, SplitX& sx) {
  const int64_t n_blocks = in / 32;
  split_x_resize(in, sx);
  for (int64_t b = 0; b < n_blocks; ++b) {
    const float* xb = x + b * 32;
    float amax = 0.f, sum = 0.f;
    for (int k = 0; k < 32; ++k) {
      amax = std::max(amax, std::fabs(xb[k]));
      sum += xb[k];
    }
    sx.block_sum[b] = sum;
    const float inv = amax > 0.f ? 32639.f / amax : 0.f;  // 32639: see the VNNI version
    sx.scale[b] = amax / 32639.f;
    int32_t int_sum = 0;
    for (int k = 0; k < 32; ++k) {
      const int32_t v = (int32_t)std::nearbyint(xb[k] * inv);  // round to nearest even, as cvtps2dq
      const int32_t lo = ((v + 128) & 0xFF) - 128;
      const int32_t hi = (v - lo) >> 8;
      const int64_t at = b * 16 + (k & 15);
      (k < 16 ? sx.hi_first : sx.hi_second)[at] = (int8_t)hi;
      (k < 16 ? sx.lo_first : sx.lo_second)[at] = (int8_t)lo;
      int_sum += v;
    }
    sx.int_sum[b] = int_sum;
  }
}
#endif

// int8 activations per 32-input block (the `act_int8_blocks` option, as llama.cpp's Q8_0 pairs with its Q4 types):
// x ~ xs_b * q, q = round(x * 127 / amax_b), xs_b = amax_b / 127 rounded to fp16 (as Q8_0 stores it). Stored in
// SplitX's "hi" bytes (the "lo" bytes are not read); block_sum is the sum of the rounded values, so the minimum
// term is that of the same rounded x and the whole product equals x_hat @ w_hat^T (torch reference:
// quant/formats.py fake_quantize_int8_blocks).
#ifdef LIGERO_VNNI
// In 512-bit vectors (the scalar loop below took ~17 us for 16 rows of 576 inputs, per projection: ~2.7 ms of
// SmolLM2's 16-row decode step on one core while the other waited). The same values: the max is exact, x * inv
// the same single product, and cvtps2dq rounds to nearest even as nearbyint does in the default rounding mode.
inline int32_t quantize_block_x8(const float* xb, int8_t* q_first, int8_t* q_second, float* xs) {
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(x0, abs_mask), _mm512_and_ps(x1, abs_mask)));
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  *xs = static_cast<float>(c10::Half(amax / 127.f));
  const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inv));
  _mm_storeu_si128((__m128i*)q_first, _mm512_cvtepi32_epi8(q0));
  _mm_storeu_si128((__m128i*)q_second, _mm512_cvtepi32_epi8(q1));
  return _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
}
#else
inline int32_t quantize_block_x8(const float* xb, int8_t* q_first, int8_t* q_second, float* xs) {
  float amax = 0.f;
  for (int k = 0; k < 32; ++k) amax = std::max(amax, std::fabs(xb[k]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  *xs = static_cast<float>(c10::Half(amax / 127.f));  // llama.cpp's Q8_0 stores the scale in fp16
  int32_t sum = 0;
  for (int k = 0; k < 32; ++k) {
    const int32_t v = (int32_t)std::nearbyint(xb[k] * inv);  // round to nearest even, as torch.round
    (k < 16 ? q_first : q_second)[k & 15] = (int8_t)v;
    sum += v;
  }
  return sum;
}
#endif

// x_hat = q * (amax / 127) for n_blocks blocks of 32: the rounded activations in fp32 (torch's GEMM, portable tier).
inline void round_blocks_x8(const float* x, float* x_hat, int64_t n_blocks) {
  int8_t q[32];
  for (int64_t b = 0; b < n_blocks; ++b) {
    float xs;
    quantize_block_x8(x + b * 32, q, q + 16, &xs);
    for (int k = 0; k < 32; ++k) x_hat[b * 32 + k] = (float)q[k] * xs;
  }
}

inline void quantize_x8(const float* x, int64_t in, SplitX& sx) {
  split_x_resize(in, sx);
  for (int64_t b = 0; b < in / 32; ++b) {
    const int32_t sum = quantize_block_x8(x + b * 32, sx.hi_first.data() + b * 16, sx.hi_second.data() + b * 16,
                                          &sx.scale[b]);
    sx.int_sum[b] = sum;
    sx.block_sum[b] = (float)sum * sx.scale[b];
  }
}

#ifdef LIGERO_AVX2

// acc + the byte products a (unsigned) x b (signed) summed in groups of 4 into int32 lanes: one AVX-512 VNNI
// instruction (vpdpbusd) where the CPU has it, vpmaddubsw + vpmaddwd otherwise. The callers' pairs never reach
// int16 saturation, so both give the same integers.
inline __m256i dot_u8s8(__m256i acc, __m256i a, __m256i b) {
#ifdef LIGERO_VNNI
  return _mm256_dpbusd_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
#endif
}

// Bundles [begin, end) of the x8 layout against MT activation rows. Per bundle and block, the 4 vectors are
// unpacked once for all MT rows into 8 vectors w[j] (lane r: row r's 4 codes of inputs 4j..4j+3, j < 4 from the
// low nibbles, or 16 + 4(j - 4).. from the high ones); per activation row, each w[j] meets that row's 4 matching
// activation bytes broadcast to every lane, so the 8 lanes accumulate the 8 weight rows' dot products directly (no
// horizontal adds): 8 vpmaddubsw summed in int16 (|sum| <= 8 * 2 * 15 * 128 < 2^15) and one vpmaddwd per block
// (16 + 2 with split activations; 8 vpdpbusd with AVX-512 VNNI). The integers are exact, and scaled and accumulated
// in fp32 in block order (the same order for every MT: a row's result does not depend on its batch). Symmetric grids
// (minimum null: minimum = -8 * scale) subtract 8 x the block's integer sum exactly in int32 (|result| <=
// 32 * 8 * 32767 < 2^24, so its conversion to fp32 is exact too); otherwise the minimum term is added per block.
// 4 bytes at p in every 32-bit lane: vbroadcastss from memory is a load, no shuffle (set1 from a register would
// take the shuffle port, the one the old layout's horizontal adds saturated).
inline __m256i broadcast4(const int8_t* p) { return _mm256_castps_si256(_mm256_broadcast_ss((const float*)p)); }

// The first `rows` lanes of a bundle's results to y (the last bundle of a layer may hold padding rows).
inline void store_rows(__m256 v, int64_t rows, float* y) {
  if (rows == 8) {
    _mm256_storeu_ps(y, v);
    return;
  }
  float t[8];
  _mm256_storeu_ps(t, v);
  std::copy(t, t + rows, y);
}

// sum_j w[j] . x[j] per 32-bit lane, for x's bytes at first (inputs 0-15) and second (16-31) of one block.
inline __m256i dot_lanes(const __m256i* w, const int8_t* first, const int8_t* second) {
#ifdef LIGERO_VNNI
  __m256i d = _mm256_setzero_si256();
  for (int j = 0; j < 4; ++j) d = _mm256_dpbusd_epi32(d, w[j], broadcast4(first + 4 * j));
  for (int j = 0; j < 4; ++j) d = _mm256_dpbusd_epi32(d, w[4 + j], broadcast4(second + 4 * j));
  return d;
#else
  __m256i s = _mm256_maddubs_epi16(w[0], broadcast4(first));
  for (int j = 1; j < 4; ++j) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[j], broadcast4(first + 4 * j)));
  for (int j = 0; j < 4; ++j) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[4 + j], broadcast4(second + 4 * j)));
  return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
#endif
}

template <int MT, bool ACT8>
void int4_bundles_avx2(const uint8_t* codes, const at::Half* scale, const at::Half* minimum, const SplitX* sx,
                       int64_t in, int64_t out, int64_t group, float* y, int64_t begin, int64_t end) {
  const int64_t n_blocks = in / 32, n_groups = (in + group - 1) / group;
  const int bpg_shift = __builtin_ctzll((unsigned long long)(group / 32));  // groups hold 2^k blocks
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t u = begin; u < end; ++u) {
    const uint8_t* ub = codes + u * n_blocks * 128;
    const at::Half* us = scale + u * n_groups * kBundle;
    const at::Half* um = minimum ? minimum + u * n_groups * kBundle : nullptr;
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n_blocks; ++b) {
      prefetch_lines(ub + (kBundlesAhead * n_blocks + b) * 128, 128);  // a later bundle (see prefetch_lines)
      if ((b & ((int64_t)1 << bpg_shift) - 1) == 0) {
        prefetch_lines(us + kBundlesAhead * n_groups * kBundle + (b >> bpg_shift) * kBundle, 16);
        if (um) prefetch_lines(um + kBundlesAhead * n_groups * kBundle + (b >> bpg_shift) * kBundle, 16);
      }
      __m256i w[8];
      for (int k = 0; k < 4; ++k) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(ub + b * 128 + k * 32));
        w[k] = _mm256_and_si256(v, low4);
        w[4 + k] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      }
      const int64_t g = b >> bpg_shift;
      const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(us + g * kBundle)));
      const __m256 wm = um ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(um + g * kBundle))) : ws;
      for (int m = 0; m < MT; ++m) {
        const SplitX& x = sx[m];
        __m256i dot = dot_lanes(w, x.hi_first.data() + b * 16, x.hi_second.data() + b * 16);
        if constexpr (!ACT8) {  // x = 256 * hi + lo
          dot = _mm256_add_epi32(_mm256_slli_epi32(dot, 8),
                                 dot_lanes(w, x.lo_first.data() + b * 16, x.lo_second.data() + b * 16));
        }
        if (!um)  // loaded as a broadcast and shifted: no scalar-to-vector move through the shuffle port
          dot = _mm256_sub_epi32(dot, _mm256_slli_epi32(broadcast4((const int8_t*)(x.int_sum.data() + b)), 3));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(ws, _mm256_broadcast_ss(&x.scale[b])), acc[m]);
        if (um) acc[m] = _mm256_fmadd_ps(wm, _mm256_broadcast_ss(&x.block_sum[b]), acc[m]);
      }
    }
    const int64_t rows = std::min<int64_t>(kBundle, out - u * kBundle);
    for (int m = 0; m < MT; ++m) store_rows(acc[m], rows, y + m * out + u * kBundle);
  }
}
#endif

#ifdef LIGERO_VNNI
// The same product two bundles at a time in 512-bit registers (AVX-512 VNNI): bundle u's 8 rows in the low half,
// u + 1's in the high half, so each activation broadcast and each vpdpbusd serves 16 weight rows instead of 8. Per
// lane the operations are those of int4_bundles_avx2 (exact integers, then the same fp32 multiply and fmas in the
// same order): the results are bit for bit those of the 256-bit code, which takes a last odd bundle and tiles of
// fewer than 4 activation rows. Measured in SmolLM2's 120 int4 projections (Q4_1, int8 activations), interleaved
// with the 256-bit build in one process: batch 8 0.87x the time, batch 4 0.98x; at batch 1 it took ~1.2x (two
// streams read side by side slow a memory-bound tile), hence the cut at 4. An int8 x int8 version (two blocks per
// 64-byte load) changed nothing in the Q8_0 output head (3.43 vs 3.58 ms at batch 8): not kept.
inline __m512i broadcast4_512(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);  // vpbroadcastd from memory
}

inline __m512i dot_lanes_512(const __m512i* w, const int8_t* first, const int8_t* second) {
  __m512i d = _mm512_setzero_si512();
  for (int j = 0; j < 4; ++j) d = _mm512_dpbusd_epi32(d, w[j], broadcast4_512(first + 4 * j));
  for (int j = 0; j < 4; ++j) d = _mm512_dpbusd_epi32(d, w[4 + j], broadcast4_512(second + 4 * j));
  return d;
}

inline __m512 halves_pair(const at::Half* a, const at::Half* b) {  // 8 fp16 at a, 8 at b -> 16 fp32
  const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)a)),
                                               _mm_loadu_si128((const __m128i*)b), 1);
  return _mm512_cvtph_ps(both);
}

inline void store_rows_512(__m512 v, int64_t rows, float* y) {  // as store_rows, 16 lanes
  if (rows == 16) {
    _mm512_storeu_ps(y, v);
    return;
  }
  float t[16];
  _mm512_storeu_ps(t, v);
  std::copy(t, t + rows, y);
}

// Split (~16-bit) activations only: int8 activations take int4_bundles_act8_512.
template <int MT>
void int4_bundles_avx512(const uint8_t* codes, const at::Half* scale, const at::Half* minimum, const SplitX* sx,
                         int64_t in, int64_t out, int64_t group, float* y, int64_t begin, int64_t end) {
  const int64_t n_blocks = in / 32, n_groups = (in + group - 1) / group;
  const int bpg_shift = __builtin_ctzll((unsigned long long)(group / 32));
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  int64_t u = begin;
  for (; MT >= 4 && u + 1 < end; u += 2) {
    const uint8_t* ub = codes + u * n_blocks * 128;
    const uint8_t* ub1 = ub + n_blocks * 128;
    const at::Half* us = scale + u * n_groups * kBundle;
    const at::Half* um = minimum ? minimum + u * n_groups * kBundle : nullptr;
    const int64_t next = n_groups * kBundle;  // bundle u + 1's scales follow bundle u's
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < n_blocks; ++b) {
      __m512i w[8];
      for (int k = 0; k < 4; ++k) {
        const __m512i v = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(ub + b * 128 + k * 32))),
            _mm256_loadu_si256((const __m256i*)(ub1 + b * 128 + k * 32)), 1);
        w[k] = _mm512_and_si512(v, low4);
        w[4 + k] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      }
      const int64_t g = b >> bpg_shift;
      const __m512 ws = halves_pair(us + g * kBundle, us + next + g * kBundle);
      const __m512 wm = um ? halves_pair(um + g * kBundle, um + next + g * kBundle) : ws;
      for (int m = 0; m < MT; ++m) {
        const SplitX& x = sx[m];
        __m512i dot = _mm512_add_epi32(  // x = 256 * hi + lo
            _mm512_slli_epi32(dot_lanes_512(w, x.hi_first.data() + b * 16, x.hi_second.data() + b * 16), 8),
            dot_lanes_512(w, x.lo_first.data() + b * 16, x.lo_second.data() + b * 16));
        if (!um) dot = _mm512_sub_epi32(dot, _mm512_slli_epi32(_mm512_set1_epi32(x.int_sum[b]), 3));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ws, _mm512_set1_ps(x.scale[b])), acc[m]);
        if (um) acc[m] = _mm512_fmadd_ps(wm, _mm512_set1_ps(x.block_sum[b]), acc[m]);
      }
    }
    const int64_t rows = std::min<int64_t>(2 * kBundle, out - u * kBundle);  // only the last bundle is partial
    for (int m = 0; m < MT; ++m) store_rows_512(acc[m], rows, y + m * out + u * kBundle);
  }
  if (u < end) int4_bundles_avx2<MT, false>(codes, scale, minimum, sx, in, out, group, y, u, end);
}
#endif

#ifdef LIGERO_VNNI
// int8 activations (ACT8) for a tile of MT rows, interleaved per block: bytes [(b * MT + m) * 32, + 32) hold row
// m's block b (the 16 "first" inputs, then the 16 "second"), so a tile's whole block sits at one pointer and every
// operand of the kernels below is a constant offset from it (the SplitX vectors cost a pointer load per row).
// offset = -(int_sum << shift): the integer correction of the weights' unsigned storage (w + 8 for int4, w + 128
// for Q8_0), the dot products' starting value.
struct TileX8 {
  std::vector<int8_t> q;
  std::vector<float> scale, block_sum;  // [b * MT + m]
  std::vector<int32_t> offset;          // [b * MT + m]
};

inline void pack_tile_x8(const SplitX* sx, int mt, int64_t n_blocks, int shift, TileX8& t) {
  t.q.resize(n_blocks * mt * 32);
  t.scale.resize(n_blocks * mt);
  t.block_sum.resize(n_blocks * mt);
  t.offset.resize(n_blocks * mt);
  for (int m = 0; m < mt; ++m)
    for (int64_t b = 0; b < n_blocks; ++b) {
      int8_t* dst = t.q.data() + (b * mt + m) * 32;
      std::memcpy(dst, sx[m].hi_first.data() + b * 16, 16);
      std::memcpy(dst + 16, sx[m].hi_second.data() + b * 16, 16);
      t.scale[b * mt + m] = sx[m].scale[b];
      t.block_sum[b * mt + m] = sx[m].block_sum[b];
      t.offset[b * mt + m] = -static_cast<int32_t>(static_cast<uint32_t>(sx[m].int_sum[b]) << shift);
    }
}

// The tiles of for_each_tile (8 rows each, the last one shorter), packed once per call for every worker; tiles of
// fewer than 4 rows stay unpacked (the 256-bit kernels that take them read SplitX). `row(m)` first fills sx[m]
// (quantize_x8): rounding and packing run tile by tile over the cores in one parallel pass (a decode step's 16
// rows are two tiles; rounded in chunks of 16 rows and packed on the calling thread, both ran on one core while
// the other waited: ~3 % of the 16-row step's CPU samples).
template <typename Row>
inline const TileX8* pack_tiles_x8(SplitX* sx, int64_t M, int64_t n_blocks, int shift, Row&& row) {
  thread_local std::vector<TileX8> tiles;
  tiles.resize((M + 7) / 8);
  TileX8* t = tiles.data();  // the calling thread's tiles: the workers write through this pointer
  at::parallel_for(0, (M + 7) / 8, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t m0 = 8 * i;
      const int mt = (int)std::min<int64_t>(8, M - m0);
      for (int64_t m = m0; m < m0 + mt; ++m) row(m);
      if (mt >= 4) pack_tile_x8(sx + m0, mt, n_blocks, shift, t[i]);
    }
  });
  return t;
}

// One block of two bundles against a tile's MT rows, rows interleaved: the 8 vpdpbusd of a row form a chain of
// dependent instructions, so they are issued row after row (d[0..MT) independent) instead of one row's chain at a
// time (SmolLM2's Q8_0 head at 8 rows: 2.98 -> 2.35 ms; the int4 projections did not change: memory held them,
// see prefetch_lines). Same integers and fp32 operations, in the same order, as the row-by-row kernels: bit for
// bit their results. offset null: start from 0 (an int4 grid with its own minimum term).
template <int MT>
inline void block_dots_512(const __m512i* w, const int8_t* xb, const int32_t* offset, __m512i* d) {
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m) d[m] = offset ? _mm512_set1_epi32(offset[m]) : _mm512_setzero_si512();
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    const int at = j < 4 ? 4 * j : 16 + 4 * (j - 4);
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) d[m] = _mm512_dpbusd_epi32(d[m], w[j], broadcast4_512(xb + m * 32 + at));
  }
}

// int4 x int8 activations for tiles of 4+ rows, from a TileX8 (shift 3); MIN: the grid has a minimum term.
template <int MT, bool MIN>
void int4_bundles_act8_512(const uint8_t* codes, const at::Half* scale, const at::Half* minimum, const TileX8& t,
                           const SplitX* sx, int64_t in, int64_t out, int64_t group, float* y, int64_t begin,
                           int64_t end) {
  const int64_t n_blocks = in / 32, n_groups = (in + group - 1) / group;
  const int bpg_shift = __builtin_ctzll((unsigned long long)(group / 32));
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  int64_t u = begin;
  for (; u + 1 < end; u += 2) {
    const uint8_t* ub = codes + u * n_blocks * 128;
    const uint8_t* ub1 = ub + n_blocks * 128;
    const at::Half* us = scale + u * n_groups * kBundle;
    const at::Half* um = MIN ? minimum + u * n_groups * kBundle : nullptr;
    const int64_t next = n_groups * kBundle;
    __m512 acc[MT];
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < n_blocks; ++b) {
      prefetch_lines(ub + (2 * n_blocks + b) * 128, 128);  // bundles u + 2 and u + 3: the next pair
      prefetch_lines(ub1 + (2 * n_blocks + b) * 128, 128);
      if ((b & ((int64_t)1 << bpg_shift) - 1) == 0) {  // a group's first block: the next pair's scales
        prefetch_lines(us + 2 * next + (b >> bpg_shift) * kBundle, 16);
        if constexpr (MIN) prefetch_lines(um + 2 * next + (b >> bpg_shift) * kBundle, 16);
      }
      __m512i w[8];
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        const __m512i v = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(ub + b * 128 + k * 32))),
            _mm256_loadu_si256((const __m256i*)(ub1 + b * 128 + k * 32)), 1);
        w[k] = _mm512_and_si512(v, low4);
        w[4 + k] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      }
      __m512i d[MT];
      block_dots_512<MT>(w, t.q.data() + b * MT * 32, MIN ? nullptr : t.offset.data() + b * MT, d);
      const int64_t g = b >> bpg_shift;
      const __m512 ws = halves_pair(us + g * kBundle, us + next + g * kBundle);
      const float* xs = t.scale.data() + b * MT;
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m)
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[m]), _mm512_mul_ps(ws, _mm512_set1_ps(xs[m])), acc[m]);
      if constexpr (MIN) {
        const __m512 wm = halves_pair(um + g * kBundle, um + next + g * kBundle);
        const float* bs = t.block_sum.data() + b * MT;
#pragma GCC unroll 16
        for (int m = 0; m < MT; ++m) acc[m] = _mm512_fmadd_ps(wm, _mm512_set1_ps(bs[m]), acc[m]);
      }
    }
    const int64_t rows = std::min<int64_t>(2 * kBundle, out - u * kBundle);
    for (int m = 0; m < MT; ++m) store_rows_512(acc[m], rows, y + m * out + u * kBundle);
  }
  if (u < end) int4_bundles_avx2<MT, true>(codes, scale, minimum, sx, in, out, group, y, u, end);
}
#endif

// ============================================ int8 x int8 in bundles (GGUF Q8_0) ===================================
// Q8_0 weights (fp16 scale per 32 inputs) with int8 activations, in the x8 layout of pack_int8_x8: output rows in
// bundles of 8, per bundle and block eight 32-byte vectors, vector k = bytes 4k..4k+3 of each of the 8 rows (lane
// r: row r) stored as w + 128 (unsigned, so vpdpbusd takes them as they are), and the 8 rows' scales side by side.
// Per activation row, each vector meets 4 activation bytes broadcast to all lanes, so the 8 lanes end the block
// holding the 8 rows' exact integer dot products (minus 128 x the block's activation sum): one scale multiply per
// block for 8 rows, against a conversion and a multiply per row and block in the row-major kernel above (which
// took ~6 ms for SmolLM2's 49k-row head at 16 rows). Without VNNI the unsigned bytes go in as two nibbles (each
// pair sum of vpmaddubsw then stays below 2^15), w + 128 = 16 hi + lo. Same integers, scaled and summed in block
// order for every tile height.
#ifdef LIGERO_AVX2
template <int MT>
void int8_bundles_avx2(const uint8_t* codes, const at::Half* scale, const SplitX* sx, int64_t in, int64_t out,
                       float* y, int64_t begin, int64_t end) {
  const int64_t n_blocks = in / 32;
#ifndef LIGERO_VNNI
  const __m256i low4 = _mm256_set1_epi8(0x0F);
#endif
  for (int64_t u = begin; u < end; ++u) {
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n_blocks; ++b) {
      const uint8_t* block = codes + (u * n_blocks + b) * 256;
      prefetch_lines(block + kBundlesAhead * n_blocks * 256, 256);  // a later bundle (see prefetch_lines)
      prefetch_lines(scale + ((u + kBundlesAhead) * n_blocks + b) * kBundle, 16);
      __m256i w[8];
#ifdef LIGERO_VNNI
      for (int k = 0; k < 8; ++k) w[k] = _mm256_loadu_si256((const __m256i*)(block + 32 * k));
#else
      __m256i lo[8];
      for (int k = 0; k < 8; ++k) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(block + 32 * k));
        w[k] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        lo[k] = _mm256_and_si256(v, low4);
      }
#endif
      const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(scale + (u * n_blocks + b) * kBundle)));
      for (int m = 0; m < MT; ++m) {
        const SplitX& x = sx[m];
        const int8_t* first = x.hi_first.data() + b * 16;
        const int8_t* second = x.hi_second.data() + b * 16;
        __m256i dot = dot_lanes(w, first, second);
#ifndef LIGERO_VNNI
        dot = _mm256_add_epi32(_mm256_slli_epi32(dot, 4), dot_lanes(lo, first, second));
#endif
        dot = _mm256_sub_epi32(dot, _mm256_slli_epi32(broadcast4((const int8_t*)(x.int_sum.data() + b)), 7));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(ws, _mm256_broadcast_ss(&x.scale[b])), acc[m]);
      }
    }
    const int64_t rows = std::min<int64_t>(kBundle, out - u * kBundle);
    for (int m = 0; m < MT; ++m) store_rows(acc[m], rows, y + m * out + u * kBundle);
  }
}
#endif

#ifdef LIGERO_VNNI
// Two bundles at a time in 512-bit registers (as int4_bundles_avx512, same lane operations and order: bit for bit
// the 256-bit results), for tiles of 4+ activation rows; the 256-bit code takes the rest.
template <int MT>
void int8_bundles_avx512(const uint8_t* codes, const at::Half* scale, const TileX8& t, const SplitX* sx, int64_t in,
                         int64_t out, float* y, int64_t begin, int64_t end) {
  const int64_t n_blocks = in / 32;
  int64_t u = begin;
  for (; MT >= 4 && u + 1 < end; u += 2) {
    __m512 acc[MT];
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < n_blocks; ++b) {
      const uint8_t* block = codes + (u * n_blocks + b) * 256;
      const uint8_t* block1 = block + n_blocks * 256;  // bundle u + 1's block b
      prefetch_lines(block + 2 * n_blocks * 256, 256);  // bundles u + 2 and u + 3: the next pair
      prefetch_lines(block1 + 2 * n_blocks * 256, 256);
      prefetch_lines(scale + ((u + 2) * n_blocks + b) * kBundle, 16);
      prefetch_lines(scale + ((u + 3) * n_blocks + b) * kBundle, 16);
      __m512i w[8];
      for (int k = 0; k < 8; ++k)
        w[k] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(block + 32 * k))),
                                  _mm256_loadu_si256((const __m256i*)(block1 + 32 * k)), 1);
      const at::Half* s0 = scale + (u * n_blocks + b) * kBundle;
      const __m512 ws = halves_pair(s0, s0 + n_blocks * kBundle);
      __m512i d[MT];
      block_dots_512<MT>(w, t.q.data() + b * MT * 32, t.offset.data() + b * MT, d);
      const float* xs = t.scale.data() + b * MT;
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m)
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[m]), _mm512_mul_ps(ws, _mm512_set1_ps(xs[m])), acc[m]);
    }
    const int64_t rows = std::min<int64_t>(2 * kBundle, out - u * kBundle);
    for (int m = 0; m < MT; ++m) store_rows_512(acc[m], rows, y + m * out + u * kBundle);
  }
  if (u < end) int8_bundles_avx2<MT>(codes, scale, sx, in, out, y, u, end);
}
#endif

#ifdef LIGERO_GENERIC
// Portable: decode a bundle's 8 rows to fp32 once, then dot each with every (rounded) activation row.
void int8_bundles_generic(const uint8_t* codes, const at::Half* scale, const float* x, int64_t M, int64_t in,
                          int64_t out, float* y, int64_t begin, int64_t end) {
  const int64_t n_blocks = in / 32;
  std::vector<float> w(kBundle * in);
  for (int64_t u = begin; u < end; ++u) {
    for (int64_t b = 0; b < n_blocks; ++b)
      for (int r = 0; r < kBundle; ++r) {
        const float s = half_to_float(scale[(u * n_blocks + b) * kBundle + r]);
        const uint8_t* block = codes + (u * n_blocks + b) * 256;
        for (int j = 0; j < 32; ++j) w[r * in + b * 32 + j] = s * float(int(block[(j / 4) * 32 + r * 4 + j % 4]) - 128);
      }
    for (int64_t r = 0; r < kBundle && u * kBundle + r < out; ++r)
      dot_rows_generic(w.data() + r * in, x, y + u * kBundle + r, M, in, out);
  }
}
#endif

// ============================================ int8 x int8 activations ============================================
// The int8 layer's `act_int8_blocks` option (llama.cpp's Q8_0 x Q8_0 arithmetic): activations rounded to int8 per
// 32-input block as for int4 (quantize_block_x8), stored contiguously; per weight row and block, one vpmaddubsw on
// |w| and sign(w) * x (32 byte products; |w| <= 128 and |x| <= 127, so a pair sums to at most 32512: no int16
// saturation) and one vpmaddwd give the block's exact integer dot product, scaled by the activation block's scale
// in fp32; the row's scale multiplies the sum once. Weights stay in the saved row-major layout: consecutive rows
// are one sequential stream, and each 32-byte load serves MT activation rows. Per block that is 5 instructions
// per activation row, against 12 for widening every weight to fp32 (the weight-only kernel above).
struct ActInt8 {
  std::vector<int8_t> q;     // [in]: block b at [32b, 32b + 32)
  std::vector<float> scale;  // per block: x ~ scale * q
};

inline void quantize_act_int8(const float* x, int64_t in, ActInt8& a) {
  const int64_t n_blocks = in / 32;
  a.q.resize(in);
  a.scale.resize(n_blocks);
  for (int64_t b = 0; b < n_blocks; ++b)
    quantize_block_x8(x + b * 32, a.q.data() + b * 32, a.q.data() + b * 32 + 16, &a.scale[b]);
}

#ifdef LIGERO_AVX2
// block_scale (GGUF Q8_0's fp16 per 32 inputs) or scale (fp32 per row): the other is null.
template <int MT>
void int8_act8_rows_avx2(const int8_t* q, const float* scale, const at::Half* block_scale, const ActInt8* xa,
                         float* y, int64_t in, int64_t out, int64_t begin, int64_t end) {
  const int64_t n_blocks = in / 32;
  for (int64_t o = begin; o < end; ++o) {
    const int8_t* row = q + o * in;
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n_blocks; ++b) {
      const __m256i w = _mm256_loadu_si256((const __m256i*)(row + b * 32));
      const __m256i w_abs = _mm256_sign_epi8(w, w);  // as unsigned bytes: |w|, and -128 -> 128
      const float ws = block_scale ? _cvtsh_ss(block_scale[o * n_blocks + b].x) : 1.f;
      for (int m = 0; m < MT; ++m) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(xa[m].q.data() + b * 32));
        const __m256i dot = dot_u8s8(_mm256_setzero_si256(), w_abs, _mm256_sign_epi8(xv, w));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(xa[m].scale[b] * ws), acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) y[m * out + o] = hsum8(acc[m]) * (block_scale ? 1.f : scale[o]);
  }
}
#endif

#ifdef LIGERO_GENERIC
// Portable: decode a bundle's 8 rows to fp32 once, then dot each with every activation row.
void int4_bundles_generic(const uint8_t* codes, const at::Half* scale, const at::Half* minimum, const float* x,
                          int64_t M, int64_t in, int64_t out, int64_t group, float* y, int64_t begin, int64_t end) {
  const int64_t n_blocks = in / 32, n_groups = (in + group - 1) / group;
  std::vector<float> w(kBundle * in);
  for (int64_t u = begin; u < end; ++u) {
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t at = (u * n_groups + b * 32 / group) * kBundle;
      for (int r = 0; r < kBundle; ++r) {
        const float s = half_to_float(scale[at + r]);
        const float mn = minimum ? half_to_float(minimum[at + r]) : -8.f * s;
        const uint8_t* bundle_block = codes + (u * n_blocks + b) * 128;
        for (int j = 0; j < 16; ++j) {
          const uint8_t byte = bundle_block[(j / 4) * 32 + r * 4 + j % 4];
          w[r * in + b * 32 + j] = s * float(byte & 0x0F) + mn;
          w[r * in + b * 32 + 16 + j] = s * float(byte >> 4) + mn;
        }
      }
    }
    for (int64_t r = 0; r < kBundle && u * kBundle + r < out; ++r)
      dot_rows_generic(w.data() + r * in, x, y + u * kBundle + r, M, in, out);
  }
}
#endif

// ============================================ 4-bit table codes (MXFP4 / NVFP4) ===============================
// 4-bit codes through a 16-entry value table (E2M1), packed like int4, with one scale code per block of 16 or 32
// inputs decoded through a 256-entry table (E8M0 or E4M3) and a per-tensor fp32 scale.
template <int MT>
inline void lut4_tile(const float* x, const uint8_t* packed, const uint8_t* scale_codes, const float* scale_lut,
                      const float* value_lut, float tensor_scale, int64_t in, int64_t out, int64_t block,
                      int64_t begin, int64_t end, float* y) {
  const int64_t n_blocks = in / block;
#if defined(LIGERO_AVX512)
  const __m512 lut = _mm512_loadu_ps(value_lut);
  const __m512i low4 = _mm512_set1_epi32(0xF);
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* row = packed + o * (in / 2);
    const uint8_t* srow = scale_codes + o * n_blocks;
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t i = 0; i < in; i += 32) {
      // Decoded once per weight row, used by every activation row of the tile.
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + i / 2)));
      const float s_lo = scale_lut[srow[i / block]];
      const float s_hi = scale_lut[srow[(i + 16) / block]];
      const __m512 w_lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, low4), lut), _mm512_set1_ps(s_lo));
      const __m512 w_hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut), _mm512_set1_ps(s_hi));
      for (int m = 0; m < MT; ++m) {
        acc[m] = _mm512_fmadd_ps(w_lo, _mm512_loadu_ps(x + m * in + i), acc[m]);
        acc[m] = _mm512_fmadd_ps(w_hi, _mm512_loadu_ps(x + m * in + i + 16), acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) y[m * out + o] = _mm512_reduce_add_ps(acc[m]) * tensor_scale;
  }
#elif defined(LIGERO_AVX2)
  // A 16-entry lookup from two 8-entry permutes, bit 3 of the code choosing between them (moved to the sign bit
  // for blendv).
  const __m256 lut_lo = _mm256_loadu_ps(value_lut), lut_hi = _mm256_loadu_ps(value_lut + 8);
  const __m256i low4 = _mm256_set1_epi32(0xF);
  auto lookup = [&](__m256i code) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, code), _mm256_permutevar8x32_ps(lut_hi, code),
                            _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));
  };
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* row = packed + o * (in / 2);
    const uint8_t* srow = scale_codes + o * n_blocks;
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t i = 0; i < in; i += 32) {
      const __m128i bytes = _mm_loadu_si128((const __m128i*)(row + i / 2));
      const __m256 s_lo = _mm256_set1_ps(scale_lut[srow[i / block]]);
      const __m256 s_hi = _mm256_set1_ps(scale_lut[srow[(i + 16) / block]]);
      for (int h = 0; h < 2; ++h) {  // bytes 8h..8h+7: inputs i + 8h.. (low nibbles) and i + 16 + 8h.. (high)
        const __m256i v = _mm256_cvtepu8_epi32(h == 0 ? bytes : _mm_srli_si128(bytes, 8));
        const __m256 w_lo = _mm256_mul_ps(lookup(_mm256_and_si256(v, low4)), s_lo);
        const __m256 w_hi = _mm256_mul_ps(lookup(_mm256_srli_epi32(v, 4)), s_hi);
        for (int m = 0; m < MT; ++m) {
          acc[m] = _mm256_fmadd_ps(w_lo, _mm256_loadu_ps(x + m * in + i + 8 * h), acc[m]);
          acc[m] = _mm256_fmadd_ps(w_hi, _mm256_loadu_ps(x + m * in + i + 16 + 8 * h), acc[m]);
        }
      }
    }
    for (int m = 0; m < MT; ++m) y[m * out + o] = hsum8(acc[m]) * tensor_scale;
  }
#else
  std::vector<float> w(in);
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* row = packed + o * (in / 2);
    const uint8_t* srow = scale_codes + o * n_blocks;
    for (int64_t i = 0; i < in; i += 32) {
      const float s_lo = scale_lut[srow[i / block]], s_hi = scale_lut[srow[(i + 16) / block]];
      for (int j = 0; j < 16; ++j) {
        const uint8_t byte = row[i / 2 + j];
        w[i + j] = value_lut[byte & 0x0F] * s_lo;
        w[i + 16 + j] = value_lut[byte >> 4] * s_hi;
      }
    }
    dot_rows_generic(w.data(), x, y + o, MT, in, out);
    for (int m = 0; m < MT; ++m) y[m * out + o] *= tensor_scale;
  }
#endif
}

void gemv_lut4_rows(const float* x, const uint8_t* packed, const uint8_t* scale_codes, const float* scale_lut,
                    const float* value_lut, float tensor_scale, float* y, int64_t M, int64_t in, int64_t out,
                    int64_t block, int64_t begin, int64_t end) {
  for_each_tile(M, [&](int64_t m0, auto mt) {
    lut4_tile<decltype(mt)::value>(x + m0 * in, packed, scale_codes, scale_lut, value_lut, tensor_scale, in, out,
                                   block, begin, end, y + m0 * out);
  });
}

// ============================================ 8-bit table codes (FP8) =========================================
// 8-bit codes through a 256-entry value table (FP8 E4M3 / E5M2) with one fp32 scale per output row.
//
// Both FP8 formats are fp16 with fewer bits: E5M2's byte is the high byte of the same value's fp16, and E4M3's
// sign and 7 other bits, shifted into fp16's layout, read as the value / 256 (its exponent bias is 7, fp16's
// 15; subnormals map to subnormals). fp8_bits_kind checks that identity on all 256 codes of the given table
// (NaN codes, which quantized weights never hold, aside), so the fast path is exact by construction.
constexpr int kTable = 0, kE4M3 = 1, kE5M2 = 2;

inline float fp16_bits_to_float(uint16_t h) {
  const at::Half v(h, at::Half::from_bits());
  return static_cast<float>(v);
}

inline int fp8_bits_kind(const float* lut) {
  bool e4m3 = true, e5m2 = true;
  for (int c = 0; c < 256; ++c) {
    if (std::isnan(lut[c])) continue;
    const uint16_t h4 = (uint16_t)(((c & 0x80) << 8) | ((c & 0x7F) << 7));
    e4m3 = e4m3 && fp16_bits_to_float(h4) * 256.f == lut[c];
    e5m2 = e5m2 && fp16_bits_to_float((uint16_t)(c << 8)) == lut[c];
  }
  return e4m3 ? kE4M3 : e5m2 ? kE5M2 : kTable;
}

template <int MT>
inline void lut8_tile(const float* x, const uint8_t* q, const float* row_scale, const float* lut, int kind,
                      int64_t in, int64_t out, int64_t begin, int64_t end, float* y) {
#if defined(LIGERO_AVX512)
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* row = q + o * in;
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= in; i += 16) {
      // The gather is the expensive part: once per weight row, shared by the tile's activation rows.
      const __m512 w = _mm512_i32gather_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + i))), lut, 4);
      for (int m = 0; m < MT; ++m) acc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * in + i), acc[m]);
    }
    for (int m = 0; m < MT; ++m) {
      const float* xm = x + m * in;
      float s = _mm512_reduce_add_ps(acc[m]);
      for (int64_t t = i; t < in; ++t) s = std::fma(lut[row[t]], xm[t], s);  // see kernel tails
      y[m * out + o] = s * row_scale[o];
    }
  }
#elif defined(LIGERO_AVX2)
  // AVX2 gathers are slow (~1 value per cycle); FP8 bytes become fp16 bits with two shifts instead (see
  // fp8_bits_kind), and F16C converts them. A table that is neither format falls back to the gather.
  const float post = kind == kE4M3 ? 256.f : 1.f;  // E4M3 bits read as fp16 are the value / 256
  const __m256i m7f = _mm256_set1_epi16(0x7F), m80 = _mm256_set1_epi16(0x80);
  for (int64_t o = begin; o < end; ++o) {  // two accumulator chains per row, as for int8
    const uint8_t* row = q + o * in;
    __m256 acc0[MT], acc1[MT];
    for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= in; i += 16) {
      const __m128i b = _mm_loadu_si128((const __m128i*)(row + i));
      __m256 w0, w1;
      if (kind == kTable) {
        w0 = _mm256_i32gather_ps(lut, _mm256_cvtepu8_epi32(b), 4);
        w1 = _mm256_i32gather_ps(lut, _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)), 4);
      } else {
        const __m256i v = _mm256_cvtepu8_epi16(b);
        const __m256i h = kind == kE5M2 ? _mm256_slli_epi16(v, 8)
                                        : _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(v, m80), 8),
                                                          _mm256_slli_epi16(_mm256_and_si256(v, m7f), 7));
        w0 = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
        w1 = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
      }
      for (int m = 0; m < MT; ++m) {
        acc0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * in + i), acc0[m]);
        acc1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * in + i + 8), acc1[m]);
      }
    }
    for (int m = 0; m < MT; ++m) {
      const float* xm = x + m * in;
      float tail = 0.f;
      for (int64_t t = i; t < in; ++t) tail = std::fma(lut[row[t]], xm[t], tail);  // see kernel tails
      y[m * out + o] = (hsum8(_mm256_add_ps(acc0[m], acc1[m])) * post + tail) * row_scale[o];
    }
  }
#else
  std::vector<float> w(in);
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* row = q + o * in;
    for (int64_t i = 0; i < in; ++i) w[i] = lut[row[i]];
    dot_rows_generic(w.data(), x, y + o, MT, in, out);
    for (int m = 0; m < MT; ++m) y[m * out + o] *= row_scale[o];
  }
#endif
}

void gemv_lut8_rows(const float* x, const uint8_t* q, const float* row_scale, const float* lut, int kind, float* y,
                    int64_t M, int64_t in, int64_t out, int64_t begin, int64_t end) {
  for_each_tile(M, [&](int64_t m0, auto mt) {
    lut8_tile<decltype(mt)::value>(x + m0 * in, q, row_scale, lut, kind, in, out, begin, end, y + m0 * out);
  });
}

// ============================================ ternary (BitNet b1.58) ==========================================
// Weights in the compute layout (2 bits, t = w + 1 in {0, 1, 2}; per 64 inputs byte j holds inputs j, j+16,
// j+32, j+48 at bit offsets 0, 2, 4, 6). Activations are int8 per token (BitNet's absmax), so
// sum t * x - sum x = sum w * x exactly in int32: every tier gives the same result, bit for bit.
template <int MT>
void ternary_tile(const uint8_t* packed, const float* row_scale, const int8_t* xq, const int32_t* xsum,
                  const float* xscale, int64_t in, int64_t out, int64_t begin, int64_t end, float* y) {
#if defined(LIGERO_VNNI)
  // One 16-byte load + broadcast + variable shift + mask gives 64 weights for one vpdpbusd.
  const __m512i shifts = _mm512_set_epi64(6, 6, 4, 4, 2, 2, 0, 0);
  const __m512i mask2 = _mm512_set1_epi8(0x03);
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* row = packed + o * (in / 4);
    __m512i acc[2][MT];  // even / odd chunks: two independent dpbusd chains per row (exact int32 sums)
    for (int m = 0; m < MT; ++m) acc[0][m] = acc[1][m] = _mm512_setzero_si512();
    for (int64_t c = 0; c < in / 64; ++c) {
      const __m512i t = _mm512_and_si512(
          _mm512_srlv_epi64(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(row + c * 16))), shifts), mask2);
      for (int m = 0; m < MT; ++m)
        acc[c & 1][m] = _mm512_dpbusd_epi32(acc[c & 1][m], t, _mm512_loadu_si512(xq + m * in + c * 64));
    }
    for (int m = 0; m < MT; ++m) {
      const int32_t dot = _mm512_reduce_add_epi32(_mm512_add_epi32(acc[0][m], acc[1][m])) - xsum[m];
      y[m * out + o] = (float)dot * row_scale[o] * xscale[m];
    }
  }
#elif defined(LIGERO_AVX2)
  // The 16 bytes of a chunk, broadcast to both halves and shifted by (0 | 2) and (4 | 6) bits, give inputs 0-31
  // and 32-63 in order; vpmaddubsw pairs stay within int16 (2 * 2 * 128, two summed).
  const __m256i shifts_a = _mm256_setr_epi64x(0, 0, 2, 2), shifts_b = _mm256_setr_epi64x(4, 4, 6, 6);
  const __m256i mask2 = _mm256_set1_epi8(0x03), ones = _mm256_set1_epi16(1);
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* row = packed + o * (in / 4);
    __m256i acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_si256();
    for (int64_t c = 0; c < in / 64; ++c) {
      const __m256i w = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(row + c * 16)));
      const __m256i t0 = _mm256_and_si256(_mm256_srlv_epi64(w, shifts_a), mask2);
      const __m256i t1 = _mm256_and_si256(_mm256_srlv_epi64(w, shifts_b), mask2);
      for (int m = 0; m < MT; ++m) {
        const int8_t* xc = xq + m * in + c * 64;
        const __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(t0, _mm256_loadu_si256((const __m256i*)xc)),
                                           _mm256_maddubs_epi16(t1, _mm256_loadu_si256((const __m256i*)(xc + 32))));
        acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(s, ones));
      }
    }
    for (int m = 0; m < MT; ++m) {
      const int32_t dot = hsum8_epi32(acc[m]) - xsum[m];
      y[m * out + o] = (float)dot * row_scale[o] * xscale[m];
    }
  }
#else
  std::vector<int8_t> t(in);
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* row = packed + o * (in / 4);
    for (int64_t c = 0; c < in / 64; ++c)  // byte j of a chunk: inputs j, j + 16, j + 32, j + 48
      for (int j = 0; j < 16; ++j) {
        const uint8_t byte = row[c * 16 + j];
        int8_t* tc = t.data() + c * 64 + j;
        tc[0] = byte & 3;
        tc[16] = (byte >> 2) & 3;
        tc[32] = (byte >> 4) & 3;
        tc[48] = byte >> 6;
      }
    for (int m = 0; m < MT; ++m) {
      const int8_t* xm = xq + m * in;
      int32_t dot = 0;  // exact: any order gives the same sum
      for (int64_t i = 0; i < in; ++i) dot += int32_t(t[i]) * int32_t(xm[i]);
      y[m * out + o] = (float)(dot - xsum[m]) * row_scale[o] * xscale[m];
    }
  }
#endif
}

}  // namespace

// ============================================ entry points ===================================================

std::string isa() {
#if defined(LIGERO_VNNI)
  return "avx512-vnni";
#elif defined(LIGERO_AVX512)
  return "avx512";
#elif defined(LIGERO_AVX2)
  return "avx2";
#else
  return "generic";
#endif
}

// x: [M, in] fp32 contiguous, w: [out, in] fp32 contiguous -> [M, out]
torch::Tensor linear_f32(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "linear_f32 takes fp32");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_f32: shape mismatch");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0), in = x.size(1), out = w.size(0);
  auto y = torch::empty({M, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Split output rows across threads in whole blocks (grain: 64 rows ~ 150 KB of weights at in=576).
  at::parallel_for(0, (out + kRows - 1) / kRows, 16, [&](int64_t b, int64_t e) {
    gemv_rows(xp, wp, yp, M, in, out, b * kRows, std::min(e * kRows, out));
  });
  return y;
}

// x: [M, in] fp32, w: [out, in] fp16 or bf16 -> [M, out], in fp32 arithmetic.
torch::Tensor linear_half(torch::Tensor x, torch::Tensor w) {
  const bool bf16 = w.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(x.dtype() == torch::kFloat32 && (bf16 || w.scalar_type() == torch::kHalf),
              "linear_half takes fp32 x and fp16 or bf16 weights");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_half: shape mismatch");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0), in = x.size(1), out = w.size(0);
  auto y = torch::empty({M, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (out + 3) / 4, 16, [&](int64_t b, int64_t e) {
    if (bf16)
      gemv_half_rows<true>(xp, wp, yp, M, in, out, b * 4, std::min(e * 4, out));
    else
      gemv_half_rows<false>(xp, wp, yp, M, in, out, b * 4, std::min(e * 4, out));
  });
  return y;
}

// x: [M, in] fp32, q: [out, in] int8, scale: [out] fp32 (per row) or [out, in / 32] fp16 (per 32 inputs, GGUF
// Q8_0) -> [M, out]. act_int8_blocks: round x to int8 per 32-input block first and multiply in integers.
torch::Tensor linear_int8(torch::Tensor x, torch::Tensor q, torch::Tensor scale, bool act_int8_blocks) {
  const bool blocks = scale.dim() == 2;
  TORCH_CHECK(x.dtype() == torch::kFloat32 && q.dtype() == torch::kInt8 &&
              scale.dtype() == (blocks ? torch::kFloat16 : torch::kFloat32),
              "linear_int8: fp32 x, int8 codes, fp32 row scales or fp16 block scales");
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1) && scale.size(0) == q.size(0) &&
              (!blocks || scale.size(1) * 32 == q.size(1)), "linear_int8: shape mismatch");
  TORCH_CHECK(!(act_int8_blocks || blocks) || x.size(1) % 32 == 0, "linear_int8: blocks need a multiple of 32 inputs");
  x = x.contiguous();
  scale = scale.contiguous();
  const int64_t M = x.size(0), in = x.size(1), out = q.size(0);
  auto y = torch::empty({M, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = blocks ? nullptr : scale.data_ptr<float>();
  const at::Half* bp = blocks ? scale.data_ptr<at::Half>() : nullptr;
  float* yp = y.data_ptr<float>();
  auto weight_only = [&](const float* xs) {
    at::parallel_for(0, out, 64, [&](int64_t b, int64_t e) {
      if (blocks)
        gemv_int8_block_rows(xs, qp, bp, yp, M, in, out, b, e);
      else
        gemv_int8_rows(xs, qp, sp, yp, M, in, out, b, e);
    });
  };
  if (!act_int8_blocks) {
    weight_only(xp);
    return y;
  }
#ifdef LIGERO_AVX2
  thread_local std::vector<ActInt8> act_buffers;  // reused across calls: no allocation per token
  act_buffers.resize(M);
  ActInt8* xa = act_buffers.data();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) quantize_act_int8(xp + m * in, in, xa[m]);
  });
  at::parallel_for(0, out, 64, [&](int64_t b, int64_t e) {
    for_each_row_block(b, e, in, M, [&](int64_t rb, int64_t re) {  // prefill: each block of rows read once
      for_each_tile(M, [&](int64_t m0, auto mt) {
        int8_act8_rows_avx2<decltype(mt)::value>(qp, sp, bp, xa + m0, yp + m0 * out, in, out, rb, re);
      });
    });
  });
#else
  std::vector<float> x_hat(M * in);  // portable: the rounded activations in fp32, then the weight-only kernel
  round_blocks_x8(xp, x_hat.data(), M * in / 32);
  weight_only(x_hat.data());
#endif
  return y;
}

// packed: [out, in/2] uint8 (GGUF Q4 byte order), scale/minimum: [out, G] fp16 (minimum may be empty: symmetric)
// -> the x8 layout linear_int4 reads: codes [ceil(out/8), in/32 * 128] uint8, scale and minimum [ceil(out/8),
// G * 8] fp16 (minimum empty when given empty). Padding rows are zero.
std::vector<torch::Tensor> pack_int4_x8(torch::Tensor packed, torch::Tensor scale, torch::Tensor minimum) {
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.dim() == 2 && packed.size(1) % 16 == 0,
              "pack_int4_x8: [out, in/2] uint8 codes, in a multiple of 32");
  TORCH_CHECK(scale.dtype() == torch::kFloat16 && minimum.dtype() == torch::kFloat16 && scale.dim() == 2 &&
              scale.size(0) == packed.size(0) && (minimum.numel() == 0 || minimum.sizes() == scale.sizes()),
              "pack_int4_x8: [out, G] fp16 scales and minimums (or an empty minimum)");
  packed = packed.contiguous(); scale = scale.contiguous(); minimum = minimum.contiguous();
  const int64_t out = packed.size(0), n_blocks = packed.size(1) / 16, n_groups = scale.size(1);
  const int64_t n_bundles = (out + kBundle - 1) / kBundle;
  auto codes = torch::zeros({n_bundles, n_blocks * 128}, packed.options());
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  for (int64_t o = 0; o < out; ++o) {
    const int64_t u = o / kBundle, r = o % kBundle;
    for (int64_t b = 0; b < n_blocks; ++b)
      for (int k = 0; k < 4; ++k)  // vector k: the 8 rows' bytes 4k..4k+3, row after row
        std::memcpy(cp + (u * n_blocks + b) * 128 + k * 32 + r * 4, pp + (o * n_blocks + b) * 16 + k * 4, 4);
  }
  auto bundle = [&](const torch::Tensor& t) {  // [out, G] -> [n_bundles, G * 8]: per group, the 8 rows side by side
    if (t.numel() == 0) return t;
    auto padded = torch::zeros({n_bundles * kBundle, n_groups}, t.options());
    padded.narrow(0, 0, out).copy_(t);
    return padded.view({n_bundles, kBundle, n_groups}).transpose(1, 2).contiguous()
        .view({n_bundles, n_groups * kBundle});
  };
  return {codes, bundle(scale), bundle(minimum)};
}

// q [out, in] int8 + scale [out, in / 32] fp16 (GGUF Q8_0) -> the x8 layout linear_int8_x8 reads: codes
// [ceil(out/8), in/32 * 256] uint8 (w + 128; padding rows 128, i.e. zero) and scales [ceil(out/8), in/32 * 8] fp16.
std::vector<torch::Tensor> pack_int8_x8(torch::Tensor q, torch::Tensor scale) {
  TORCH_CHECK(q.dtype() == torch::kInt8 && q.dim() == 2 && q.size(1) % 32 == 0 && scale.dtype() == torch::kFloat16 &&
              scale.dim() == 2 && scale.size(0) == q.size(0) && scale.size(1) * 32 == q.size(1),
              "pack_int8_x8: [out, in] int8 codes and [out, in / 32] fp16 scales");
  q = q.contiguous();
  const int64_t out = q.size(0), in = q.size(1), n_blocks = in / 32, n_bundles = (out + kBundle - 1) / kBundle;
  auto codes = torch::full({n_bundles, n_blocks * 256}, 128, q.options().dtype(torch::kUInt8));
  const int8_t* qp = q.data_ptr<int8_t>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  at::parallel_for(0, out, 256, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const int64_t u = o / kBundle, r = o % kBundle;
      for (int64_t b = 0; b < n_blocks; ++b)
        for (int k = 0; k < 8; ++k)  // vector k: the 8 rows' bytes 4k..4k+3, row after row
          for (int j = 0; j < 4; ++j)
            cp[(u * n_blocks + b) * 256 + k * 32 + r * 4 + j] = uint8_t(int(qp[o * in + b * 32 + 4 * k + j]) + 128);
    }
  });
  auto padded = torch::zeros({n_bundles * kBundle, n_blocks}, scale.options());
  padded.narrow(0, 0, out).copy_(scale);
  return {codes, padded.view({n_bundles, kBundle, n_blocks}).transpose(1, 2).contiguous()
                     .view({n_bundles, n_blocks * kBundle})};
}

// x: [M, in] fp32 (in % 32 == 0), rounded to int8 per 32-input block (llama.cpp's Q8_0 x Q8_0 arithmetic);
// codes, scale: pack_int8_x8's layout -> [M, out].
torch::Tensor linear_int8_x8(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, int64_t out) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && codes.dtype() == torch::kUInt8 && scale.dtype() == torch::kFloat16);
  x = x.contiguous();
  const int64_t M = x.size(0), in = x.size(1), n_bundles = (out + kBundle - 1) / kBundle;
  TORCH_CHECK(x.dim() == 2 && in % 32 == 0 && codes.size(0) == n_bundles && codes.size(1) == in / 32 * 256 &&
              scale.size(0) == n_bundles && scale.size(1) == in / 32 * kBundle,
              "linear_int8_x8: tensors not in the x8 layout");
  auto y = torch::empty({M, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
#ifdef LIGERO_GENERIC
  std::vector<float> x_hat(M * in);
  round_blocks_x8(xp, x_hat.data(), M * in / 32);
  at::parallel_for(0, n_bundles, 8, [&](int64_t b, int64_t e) {
    int8_bundles_generic(cp, sp, x_hat.data(), M, in, out, yp, b, e);
  });
#else
  thread_local std::vector<SplitX> sx_buffers;  // reused across calls: no allocation per token
  sx_buffers.resize(M);
  SplitX* sx = sx_buffers.data();
  const auto prepare = [&](int64_t m) { quantize_x8(xp + m * in, in, sx[m]); };
#ifdef LIGERO_VNNI
  const TileX8* tiles = pack_tiles_x8(sx, M, in / 32, 7, prepare);
#else
  over_rows(M, prepare);
#endif
  at::parallel_for(0, n_bundles, 8, [&](int64_t b, int64_t e) {
    for_each_row_block(b, e, kBundle * in, M, [&](int64_t rb, int64_t re) {
      for_each_tile(M, [&](int64_t m0, auto mt) {
#ifdef LIGERO_VNNI
        int8_bundles_avx512<decltype(mt)::value>(cp, sp, tiles[m0 / 8], sx + m0, in, out, yp + m0 * out, rb, re);
#else
        int8_bundles_avx2<decltype(mt)::value>(cp, sp, sx + m0, in, out, yp + m0 * out, rb, re);
#endif
      });
    });
  });
#endif
  return y;
}

// x: [M, in] fp32 (in % 32 == 0); codes, scale, minimum: the x8 layout of pack_int4_x8 (an empty minimum: a
// symmetric grid, minimum = -8 * scale, exactly; one fp16 stream less per token) -> [M, out].
// act_int8_blocks: round x to int8 per 32-input block first (see quantize_x8); otherwise x keeps ~16 bits.
torch::Tensor linear_int4(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor minimum,
                          int64_t group, bool act_int8_blocks, int64_t out) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && codes.dtype() == torch::kUInt8);
  TORCH_CHECK(scale.dtype() == torch::kFloat16 && minimum.dtype() == torch::kFloat16);
  TORCH_CHECK(group % 32 == 0 && (group & (group - 1)) == 0, "linear_int4: the group size is a power of two >= 32");
  x = x.contiguous();
  const int64_t M = x.size(0), in = x.size(1), n_groups = (in + group - 1) / group;
  const int64_t n_bundles = (out + kBundle - 1) / kBundle;
  const bool implied_minimum = minimum.numel() == 0;
  TORCH_CHECK(x.dim() == 2 && in % 32 == 0 && codes.size(0) == n_bundles && codes.size(1) == in / 32 * 128 &&
              scale.size(0) == n_bundles && scale.size(1) == n_groups * kBundle &&
              (implied_minimum || minimum.sizes() == scale.sizes()), "linear_int4: tensors not in the x8 layout");
  auto y = torch::empty({M, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* mp = implied_minimum ? nullptr : minimum.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
#ifdef LIGERO_GENERIC
  std::vector<float> x_hat;  // the rounded activations, when asked for
  if (act_int8_blocks) {
    x_hat.resize(M * in);
    round_blocks_x8(xp, x_hat.data(), M * in / 32);
    xp = x_hat.data();
  }
  at::parallel_for(0, n_bundles, 8, [&](int64_t b, int64_t e) {
    int4_bundles_generic(cp, sp, mp, xp, M, in, out, group, yp, b, e);
  });
#else
  thread_local std::vector<SplitX> sx_buffers;  // reused across calls: no allocation per token
  sx_buffers.resize(M);
  SplitX* sx = sx_buffers.data();  // the workers read the calling thread's buffers through this pointer
  const auto prepare = [&](int64_t m) {
    if (act_int8_blocks)
      quantize_x8(xp + m * in, in, sx[m]);
    else
      split_x(xp + m * in, in, sx[m]);
  };
#ifdef LIGERO_VNNI
  const TileX8* tiles = act_int8_blocks ? pack_tiles_x8(sx, M, in / 32, 3, prepare) : nullptr;
  const bool prepared = tiles != nullptr;
#else
  const bool prepared = false;
#endif
  if (!prepared) over_rows(M, prepare);
  at::parallel_for(0, n_bundles, 8, [&](int64_t b, int64_t e) {
    // One bundle's unpacking serves a whole tile of activation rows.
    for_each_row_block(b, e, kBundle * in / 2, M, [&](int64_t rb, int64_t re) {
      for_each_tile(M, [&](int64_t m0, auto mt) {
        constexpr int MT = decltype(mt)::value;
#ifdef LIGERO_VNNI
        if (act_int8_blocks && MT >= 4 && mp)
          int4_bundles_act8_512<MT, true>(cp, sp, mp, tiles[m0 / 8], sx + m0, in, out, group, yp + m0 * out, rb, re);
        else if (act_int8_blocks && MT >= 4)
          int4_bundles_act8_512<MT, false>(cp, sp, mp, tiles[m0 / 8], sx + m0, in, out, group, yp + m0 * out, rb, re);
        else if (act_int8_blocks)  // tiles of 1-3 rows: one bundle at a time
          int4_bundles_avx2<MT, true>(cp, sp, mp, sx + m0, in, out, group, yp + m0 * out, rb, re);
        else
          int4_bundles_avx512<MT>(cp, sp, mp, sx + m0, in, out, group, yp + m0 * out, rb, re);
#else
        if (act_int8_blocks)
          int4_bundles_avx2<MT, true>(cp, sp, mp, sx + m0, in, out, group, yp + m0 * out, rb, re);
        else
          int4_bundles_avx2<MT, false>(cp, sp, mp, sx + m0, in, out, group, yp + m0 * out, rb, re);
#endif
      });
    });
  });
#endif
  return y;
}

// x: [M, in] fp32 (in % 32 == 0); packed [out, in/2] u8; scale_codes [out, in/block] u8; luts fp32 [256], [16]
torch::Tensor linear_lut4(torch::Tensor x, torch::Tensor packed, torch::Tensor scale_codes, torch::Tensor scale_lut,
                          torch::Tensor value_lut, double tensor_scale, int64_t block) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && packed.dtype() == torch::kUInt8 && scale_codes.dtype() == torch::kUInt8);
  TORCH_CHECK(scale_lut.numel() == 256 && value_lut.numel() == 16 && (block == 16 || block == 32));
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 32 == 0 && packed.size(1) * 2 == x.size(1));
  x = x.contiguous();
  auto slut = scale_lut.to(torch::kFloat32).contiguous();
  auto vlut = value_lut.to(torch::kFloat32).contiguous();
  const int64_t M = x.size(0), in = x.size(1), out = packed.size(0);
  auto y = torch::empty({M, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const uint8_t* sp = scale_codes.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out, 64, [&](int64_t b, int64_t e) {
    gemv_lut4_rows(xp, pp, sp, slut.data_ptr<float>(), vlut.data_ptr<float>(), (float)tensor_scale, yp, M, in, out,
                   block, b, e);
  });
  return y;
}

// x: [M, in] fp32; q: [out, in] u8 (FP8 bytes); row_scale [out] fp32; lut [256] fp32
torch::Tensor linear_lut8(torch::Tensor x, torch::Tensor q, torch::Tensor row_scale, torch::Tensor lut) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && q.dtype() == torch::kUInt8 && row_scale.dtype() == torch::kFloat32);
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1) && lut.numel() == 256);
  x = x.contiguous();
  auto l = lut.to(torch::kFloat32).contiguous();
  const int64_t M = x.size(0), in = x.size(1), out = q.size(0);
  auto y = torch::empty({M, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = row_scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* lp = l.data_ptr<float>();
#if defined(LIGERO_AVX2) && !defined(LIGERO_AVX512)
  const int kind = fp8_bits_kind(lp);  // once per call: which decoding the table allows (only this tier uses it)
#else
  const int kind = kTable;
#endif
  at::parallel_for(0, out, 64, [&](int64_t b, int64_t e) { gemv_lut8_rows(xp, qp, sp, lp, kind, yp, M, in, out, b, e); });
  return y;
}

// x: [M, in] fp32 (in % 64 == 0); packed: [out, in/4] u8; row_scale: [out] fp32 (weight scale of the row's
// segment) -> [M, out] = (sum w q) * row_scale * x_scale
torch::Tensor linear_ternary(torch::Tensor x, torch::Tensor packed, torch::Tensor row_scale) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && packed.dtype() == torch::kUInt8 && row_scale.dtype() == torch::kFloat32);
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 64 == 0 && packed.size(1) * 4 == x.size(1) && row_scale.size(0) == packed.size(0));
  x = x.contiguous();
  const int64_t M = x.size(0), in = x.size(1), out = packed.size(0);
  auto y = torch::empty({M, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = row_scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  std::vector<int8_t> xq(M * in);
  std::vector<float> xscale(M);
  std::vector<int32_t> xsum(M);
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {  // per-token absmax int8, as BitNet b1.58 defines it
      const float* xm = xp + m * in;
      float amax = 0.f;
      for (int64_t i = 0; i < in; ++i) amax = std::max(amax, std::fabs(xm[i]));
      const float s = std::max(amax, 1e-8f) / 127.f;
      int32_t sum = 0;
      for (int64_t i = 0; i < in; ++i) {
        const int v = (int)std::max(-128.f, std::min(127.f, std::nearbyint(xm[i] / s)));
        xq[m * in + i] = (int8_t)v;
        sum += v;
      }
      xscale[m] = s;
      xsum[m] = sum;
    }
  });
  const int8_t* xqp = xq.data();
  at::parallel_for(0, out, 64, [&](int64_t b, int64_t e) {
    for_each_row_block(b, e, in / 4, M, [&](int64_t rb, int64_t re) {
      for_each_tile(M, [&](int64_t m0, auto mt) {
        ternary_tile<decltype(mt)::value>(pp, sp, xqp + m0 * in, xsum.data() + m0, xscale.data() + m0, in, out, rb,
                                          re, yp + m0 * out);
      });
    });
  });
  return y;
}

// ============================================ GGML block types (Q5_0, Q5_1, K-quants) ==========================
// llama.cpp's block formats held as stored (one GGUF tensor's bytes per layer, [out, row bytes]); layouts and the
// torch reference in quant/ggml.py. Decode: Q4_K / Q5_K / Q6_K run integer kernels on split activations (AVX2,
// below; within int4's exact-mode tolerance of the reference), the other types expand one weight row at a time to
// fp32 in a per-thread buffer (L1) and dot it with every activation row. Prefill expands the whole matrix for
// torch's GEMM. Expansions form products as the reference does ((d * sc) * q - dmin * m, no fused multiply-add),
// so they match it exactly.
namespace {
enum GgmlType : int64_t { kQ5_0 = 0, kQ5_1 = 1, kQ2_K = 2, kQ3_K = 3, kQ4_K = 4, kQ5_K = 5, kQ6_K = 6 };
constexpr int64_t kGgmlBlock[] = {32, 32, 256, 256, 256, 256, 256};     // inputs per block
constexpr int64_t kGgmlBytes[] = {22, 24, 84, 110, 144, 176, 210};      // bytes per block

inline float f16_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

#define LIGERO_NO_FMA __attribute__((optimize("fp-contract=off")))

LIGERO_NO_FMA void decode_q5(const uint8_t* b, float* y, bool with_min) {
  const float d = f16_at(b), m = with_min ? f16_at(b + 2) : 0.f;
  const int off = with_min ? 4 : 2;
  uint32_t qh;
  std::memcpy(&qh, b + off, 4);
  const uint8_t* qs = b + off + 4;
  for (int j = 0; j < 16; ++j) {
    const float lo = (float)((qs[j] & 0xF) | (((qh >> j) & 1) << 4));
    const float hi = (float)((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
    if (with_min) {
      y[j] = d * lo + m;
      y[j + 16] = d * hi + m;
    } else {
      y[j] = d * (lo - 16.f);
      y[j + 16] = d * (hi - 16.f);
    }
  }
}

// Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins packed in 12 bytes.
inline void k4_scale_min(int j, const uint8_t* s, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// All 8 scales and minimums of a Q4_K / Q5_K super-block at once, in 32-bit words (the same bits as k4_scale_min):
// sub-blocks 0-3 hold 6 bits in bytes 0-3 / 4-7; 4-7 hold 4 low bits in bytes 8-11 and 2 high bits on top of 0-7.
inline void k4_scales_mins(const uint8_t* s, uint8_t* sc, uint8_t* mn) {
  uint32_t w[3];
  std::memcpy(w, s, 12);
  const uint32_t six = 0x3f3f3f3f, four = 0x0f0f0f0f, two = 0x03030303;
  const uint32_t out[4] = {w[0] & six, (w[2] & four) | (((w[0] >> 6) & two) << 4), w[1] & six,
                           ((w[2] >> 4) & four) | (((w[1] >> 6) & two) << 4)};
  std::memcpy(sc, out, 8);
  std::memcpy(mn, out + 2, 8);
}

LIGERO_NO_FMA void decode_q45k(const uint8_t* b, float* y, bool five) {
  const float d = f16_at(b), dmin = f16_at(b + 2);
  const uint8_t* s = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + (five ? 48 : 16);
  for (int sub = 0; sub < 8; ++sub) {
    int sc, m;
    k4_scale_min(sub, s, sc, m);
    const float d1 = d * (float)sc, m1 = dmin * (float)m;
    const uint8_t* q = qs + 32 * (sub / 2);
    const int shift = 4 * (sub & 1);
    float* ys = y + 32 * sub;
    for (int l = 0; l < 32; ++l) {
      int v = (q[l] >> shift) & 0xF;
      if (five) v |= ((qh[l] >> sub) & 1) << 4;
      ys[l] = d1 * (float)v - m1;
    }
  }
}

LIGERO_NO_FMA void decode_q6k(const uint8_t* b, float* y) {
  const float d = f16_at(b + 208);
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  for (int n = 0; n < 2; ++n) {
    const uint8_t* ql = b + 64 * n;
    const uint8_t* qh = b + 128 + 32 * n;
    for (int k = 0; k < 4; ++k) {  // 32-input groups: low nibbles of ql[l], ql[l + 32], then their high nibbles
      const uint8_t* lo = ql + 32 * (k & 1);
      const int nib = 4 * (k >> 1);
      float* yk = y + 128 * n + 32 * k;
      for (int half = 0; half < 2; ++half) {
        const float dl = d * (float)sc[8 * n + 2 * k + half];
        for (int l = 16 * half; l < 16 * half + 16; ++l) {
          const int v = ((lo[l] >> nib) & 0xF) | (((qh[l] >> (2 * k)) & 3) << 4);
          yk[l] = dl * (float)(v - 32);
        }
      }
    }
  }
}

LIGERO_NO_FMA void decode_q2k(const uint8_t* b, float* y) {
  const float d = f16_at(b + 80), dmin = f16_at(b + 82);
  for (int n = 0; n < 2; ++n)
    for (int j = 0; j < 4; ++j)
      for (int half = 0; half < 2; ++half) {
        const int i = 8 * n + 2 * j + half;  // the 16 inputs' scale byte: 4-bit scale, 4-bit min
        const float dl = d * (float)(b[i] & 0xF), ml = dmin * (float)(b[i] >> 4);
        const uint8_t* q = b + 16 + 32 * n + 16 * half;
        float* yl = y + 128 * n + 32 * j + 16 * half;
        for (int l = 0; l < 16; ++l) yl[l] = dl * (float)((q[l] >> (2 * j)) & 3) - ml;
      }
}

LIGERO_NO_FMA void decode_q3k(const uint8_t* b, float* y) {
  const float d = f16_at(b + 108);
  const uint8_t* hm = b;
  const uint8_t* s = b + 96;
  for (int n = 0; n < 2; ++n)
    for (int j = 0; j < 4; ++j)
      for (int half = 0; half < 2; ++half) {
        const int i = 8 * n + 2 * j + half;
        const int low = i < 8 ? s[i] & 0xF : s[i - 8] >> 4;
        const int high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        const float dl = d * (float)((low | (high << 4)) - 32);
        const uint8_t* q = b + 32 + 32 * n + 16 * half;
        const uint8_t* h = hm + 16 * half;
        float* yl = y + 128 * n + 32 * j + 16 * half;
        for (int l = 0; l < 16; ++l) {
          const int v = ((q[l] >> (2 * j)) & 3) - (((h[l] >> (4 * n + j)) & 1) ? 0 : 4);
          yl[l] = dl * (float)v;
        }
      }
}

void ggml_decode_row(int64_t type, const uint8_t* row, float* w, int64_t in) {
  const int64_t block = kGgmlBlock[type], bytes = kGgmlBytes[type];
  for (int64_t k = 0; k < in / block; ++k) {
    const uint8_t* b = row + k * bytes;
    float* y = w + k * block;
    switch (type) {
      case kQ5_0: decode_q5(b, y, false); break;
      case kQ5_1: decode_q5(b, y, true); break;
      case kQ2_K: decode_q2k(b, y); break;
      case kQ3_K: decode_q3k(b, y); break;
      case kQ4_K: decode_q45k(b, y, false); break;
      case kQ5_K: decode_q45k(b, y, true); break;
      default: decode_q6k(b, y); break;
    }
  }
}

#ifdef LIGERO_AVX2
// Q4_K / Q5_K / Q6_K rows against split activations (SplitX: x ~ s_b (256 hi + lo) per 32-input block, ~16-bit
// precision, as the int4 kernel's exact mode), in integers: one row's super-blocks are read in order (one stream);
// per 32 inputs, vpmaddubsw on the unsigned codes (< 64: no int16 saturation) with the hi and lo bytes gives the
// block's exact integer dot product in 8 int32 lanes (lanes 0-3: inputs 0-15, 4-7: 16-31), scaled in fp32 by the
// code scale (d x the 6-bit scale, or d x the int8 scale per 16 for Q6_K, a lane vector) times s_b, accumulated in
// lanes and summed once per row. Q4_K / Q5_K minimums: dmin x m x the block's sum of x, per block, in a scalar.
// Q6_K's offset of 32: subtracted in integers (32 x the 16 inputs' integer sum) before the conversion.
inline __m256i x_natural(const int8_t* first, const int8_t* second, int64_t b) {
  return _mm256_set_m128i(_mm_loadu_si128((const __m128i*)(second + b * 16)),
                          _mm_loadu_si128((const __m128i*)(first + b * 16)));
}

inline __m256i dot_codes_split(__m256i q, const SplitX& x, int64_t b) {
  const __m256i xh = x_natural(x.hi_first.data(), x.hi_second.data(), b);
  const __m256i xl = x_natural(x.lo_first.data(), x.lo_second.data(), b);
  const __m256i zero = _mm256_setzero_si256();
  return _mm256_add_epi32(_mm256_slli_epi32(dot_u8s8(zero, q, xh), 8), dot_u8s8(zero, q, xl));
}

template <int MT>
void q45k_rows_avx2(const uint8_t* blocks, int64_t row_bytes, bool five, const SplitX* sx, int64_t in,
                    int64_t out, float* y, int64_t begin, int64_t end) {
  const int64_t n_super = in / 256, bytes = five ? 176 : 144;
  const __m256i low4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
  for (int64_t o = begin; o < end; ++o) {
    __m256 acc[MT];
    float mins[MT];
    for (int m = 0; m < MT; ++m) {
      acc[m] = _mm256_setzero_ps();
      mins[m] = 0.f;
    }
    for (int64_t s = 0; s < n_super; ++s) {
      const uint8_t* b = blocks + o * row_bytes + s * bytes;
      const float d = f16_at(b), dmin = f16_at(b + 2);
      const __m256i qh = five ? _mm256_loadu_si256((const __m256i*)(b + 16)) : _mm256_setzero_si256();
      const uint8_t* qs = b + (five ? 48 : 16);
      for (int j = 0; j < 4; ++j) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(qs + 32 * j));
        for (int h = 0; h < 2; ++h) {
          const int sub = 2 * j + h;
          int sc, mn;
          k4_scale_min(sub, b + 4, sc, mn);
          __m256i q = _mm256_and_si256(h ? _mm256_srli_epi16(v, 4) : v, low4);
          if (five) q = _mm256_or_si256(q, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, sub), one), 4));
          const int64_t blk = s * 8 + sub;
          const float ws = d * (float)sc, wm = dmin * (float)mn;
          for (int m = 0; m < MT; ++m) {
            const __m256i dot = dot_codes_split(q, sx[m], blk);
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(ws * sx[m].scale[blk]), acc[m]);
            mins[m] += wm * sx[m].block_sum[blk];
          }
        }
      }
    }
    for (int m = 0; m < MT; ++m) y[m * out + o] = hsum8(acc[m]) - mins[m];
  }
}

// sum16[m][i]: the integer sum of the split values (256 hi + lo) of inputs 16i .. 16i + 15 (Q6_K's offset term)
inline void split_sums16(const SplitX& x, int64_t in, std::vector<int32_t>& sums) {
  sums.resize(in / 16);
  for (int64_t b = 0; b < in / 32; ++b) {
    int32_t a = 0, c = 0;
    for (int k = 0; k < 16; ++k) {
      a += 256 * x.hi_first[b * 16 + k] + x.lo_first[b * 16 + k];
      c += 256 * x.hi_second[b * 16 + k] + x.lo_second[b * 16 + k];
    }
    sums[2 * b] = a;
    sums[2 * b + 1] = c;
  }
}

template <int MT>
void q6k_rows_avx2(const uint8_t* blocks, int64_t row_bytes, const SplitX* sx, const std::vector<int32_t>* sums,
                   int64_t in, int64_t out, float* y, int64_t begin, int64_t end) {
  const int64_t n_super = in / 256;
  const __m256i low4 = _mm256_set1_epi8(0x0F), three = _mm256_set1_epi8(3);
  for (int64_t o = begin; o < end; ++o) {
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t s = 0; s < n_super; ++s) {
      const uint8_t* b = blocks + o * row_bytes + s * 210;
      const float d = f16_at(b + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      for (int n = 0; n < 2; ++n) {
        const __m256i ql0 = _mm256_loadu_si256((const __m256i*)(b + 64 * n));
        const __m256i ql1 = _mm256_loadu_si256((const __m256i*)(b + 64 * n + 32));
        const __m256i qh = _mm256_loadu_si256((const __m256i*)(b + 128 + 32 * n));
        for (int k = 0; k < 4; ++k) {
          const __m256i lo = k & 1 ? ql1 : ql0;
          const __m256i nib = _mm256_and_si256(k >> 1 ? _mm256_srli_epi16(lo, 4) : lo, low4);
          const __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), three);
          const __m256i q = _mm256_or_si256(nib, _mm256_slli_epi16(high, 4));  // 0..63
          const int64_t blk = s * 8 + 4 * n + k;  // 32-input block
          const float s_lo = d * (float)sc[8 * n + 2 * k], s_hi = d * (float)sc[8 * n + 2 * k + 1];
          const __m256 ws = _mm256_setr_ps(s_lo, s_lo, s_lo, s_lo, s_hi, s_hi, s_hi, s_hi);
          for (int m = 0; m < MT; ++m) {
            const int32_t* s16 = sums[m].data() + 2 * blk;
            const __m256i offset = _mm256_setr_epi32(32 * s16[0], 0, 0, 0, 32 * s16[1], 0, 0, 0);
            const __m256i dot = _mm256_sub_epi32(dot_codes_split(q, sx[m], blk), offset);
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(ws, _mm256_set1_ps(sx[m].scale[blk])),
                                     acc[m]);
          }
        }
      }
    }
    for (int m = 0; m < MT; ++m) y[m * out + o] = hsum8(acc[m]);
  }
}
#endif

// ---- llama.cpp's activations for these types (the layer's act_int8_blocks option) -------------------------------
// K-quants meet Q8_K activations: per 256 inputs, iscale = -127 / (the input of largest |x|, with its sign),
// q = min(127, round(iscale * x)) (ties to even, as llama.cpp's nearest_int), d = 1 / iscale in fp32, and the
// integer sum of each 16 inputs (for the minimum / offset terms). Q5_0 / Q5_1 meet Q8_0 / Q8_1 (per 32, as int4).
struct ActQ8K {
  std::vector<int8_t> q;      // [in]
  std::vector<float> d;       // per 256 inputs
  std::vector<int32_t> bsum;  // per 16 inputs
  std::vector<int32_t> bsum32;  // per 32 inputs (the K4 / K5 sub-blocks' minimum terms)
};

inline void quantize_q8k(const float* x, int64_t in, ActQ8K& a) {
  const int64_t nb = in / 256;
  a.q.resize(in);
  a.d.resize(nb);
  a.bsum.resize(in / 16);
  a.bsum32.resize(in / 32);
  for (int64_t i = 0; i < nb; ++i) {
    const float* xb = x + i * 256;
    int8_t* q = a.q.data() + i * 256;
    float amax = 0.f, mx = 0.f;
    for (int j = 0; j < 256; ++j) {
      const float ax = std::fabs(xb[j]);
      if (ax > amax) {
        amax = ax;
        mx = xb[j];
      }
    }
    if (amax == 0.f) {
      a.d[i] = 0.f;
      std::memset(q, 0, 256);
    } else {
      const float iscale = -127.f / mx;
      for (int j = 0; j < 256; ++j) q[j] = (int8_t)std::min(127, (int)std::nearbyint(iscale * xb[j]));
      a.d[i] = 1.f / iscale;
    }
    for (int k = 0; k < 16; ++k) {
      int32_t sum = 0;
      for (int j = 0; j < 16; ++j) sum += q[16 * k + j];
      a.bsum[i * 16 + k] = sum;
    }
    for (int k = 0; k < 8; ++k) a.bsum32[i * 8 + k] = a.bsum[i * 16 + 2 * k] + a.bsum[i * 16 + 2 * k + 1];
  }
}

// x rounded as llama.cpp rounds a `type` layer's activations, back in fp32 (x_hat = q * d): the reference the
// integer kernels compute exactly, and what the row-expanding kernels and torch's GEMM multiply.
torch::Tensor round_act_ggml(const torch::Tensor& x, int64_t type) {
  auto out = torch::empty_like(x);
  const int64_t M = x.size(0), in = x.size(1);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (type == kQ5_0 || type == kQ5_1) {
    round_blocks_x8(xp, op, M * in / 32);
    return out;
  }
  ActQ8K a;
  for (int64_t m = 0; m < M; ++m) {
    quantize_q8k(xp + m * in, in, a);
    for (int64_t j = 0; j < in; ++j) op[m * in + j] = (float)a.q[j] * a.d[j / 256];
  }
  return out;
}

#ifdef LIGERO_AVX2
// Q4_K / Q5_K x Q8_K, as llama.cpp computes it: per 32 inputs one vpmaddubsw (codes < 32, |q| <= 127: pairs within
// int16) and one vpmaddwd by the sub-block's 6-bit scale, summed in int32 over the super-block (|sum| < 2^25);
// then d_w x d_x in fp32 per super-block, and the minimums from the 16-input sums: dmin x d_x x sum m_j (bsums).
template <int MT>
void q45k_rows_act8_avx2(const uint8_t* blocks, int64_t row_bytes, bool five, const ActQ8K* xa, int64_t in,
                         int64_t out, float* y, int64_t begin, int64_t end) {
  const int64_t n_super = in / 256, bytes = five ? 176 : 144;
  const __m256i low4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
  for (int64_t o = begin; o < end; ++o) {
    __m256 acc[MT];
    float mins[MT];
    for (int m = 0; m < MT; ++m) {
      acc[m] = _mm256_setzero_ps();
      mins[m] = 0.f;
    }
    for (int64_t s = 0; s < n_super; ++s) {
      const uint8_t* b = blocks + o * row_bytes + s * bytes;
      const float d = f16_at(b), dmin = f16_at(b + 2);
      const __m256i qh = five ? _mm256_loadu_si256((const __m256i*)(b + 16)) : _mm256_setzero_si256();
      const uint8_t* qs = b + (five ? 48 : 16);
      uint8_t sc[8], mn[8];
      k4_scales_mins(b + 4, sc, mn);
      const __m256i min_codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)mn));
      __m256i sumi[MT];
      int32_t summ[MT];
      for (int m = 0; m < MT; ++m) {
        sumi[m] = _mm256_setzero_si256();
        const __m256i bs = _mm256_loadu_si256((const __m256i*)(xa[m].bsum32.data() + s * 8));
        summ[m] = hsum8_epi32(_mm256_mullo_epi32(min_codes, bs));  // |m| < 64, |sum of 32| <= 4064: exact
      }
      for (int j = 0; j < 4; ++j) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(qs + 32 * j));
        for (int h = 0; h < 2; ++h) {
          const int sub = 2 * j + h;
          __m256i q = _mm256_and_si256(h ? _mm256_srli_epi16(v, 4) : v, low4);
          if (five) q = _mm256_or_si256(q, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, sub), one), 4));
          const __m256i scale = _mm256_set1_epi16((int16_t)sc[sub]);
          for (int m = 0; m < MT; ++m) {
            const __m256i xv = _mm256_loadu_si256((const __m256i*)(xa[m].q.data() + s * 256 + 32 * sub));
            sumi[m] = _mm256_add_epi32(sumi[m], _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), scale));
          }
        }
      }
      for (int m = 0; m < MT; ++m) {
        const float dx = xa[m].d[s];
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[m]), _mm256_set1_ps(d * dx), acc[m]);
        mins[m] += dmin * dx * (float)summ[m];
      }
    }
    for (int m = 0; m < MT; ++m) y[m * out + o] = hsum8(acc[m]) - mins[m];
  }
}

// Q6_K x Q8_K: codes 0..63 (pairs within int16), vpmaddwd by the int8 scales of the two 16-input halves, the
// offset of 32 as 32 x sum(scale x the 16 inputs' integer sum), all in int32 per super-block; then d_w x d_x.
template <int MT>
void q6k_rows_act8_avx2(const uint8_t* blocks, int64_t row_bytes, const ActQ8K* xa, int64_t in, int64_t out,
                        float* y, int64_t begin, int64_t end) {
  const int64_t n_super = in / 256;
  const __m256i low4 = _mm256_set1_epi8(0x0F), three = _mm256_set1_epi8(3);
  for (int64_t o = begin; o < end; ++o) {
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t s = 0; s < n_super; ++s) {
      const uint8_t* b = blocks + o * row_bytes + s * 210;
      const float d = f16_at(b + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      __m256i sumi[MT];
      int32_t offset[MT];
      for (int m = 0; m < MT; ++m) {
        sumi[m] = _mm256_setzero_si256();
        offset[m] = 0;
      }
      for (int n = 0; n < 2; ++n) {
        const __m256i ql0 = _mm256_loadu_si256((const __m256i*)(b + 64 * n));
        const __m256i ql1 = _mm256_loadu_si256((const __m256i*)(b + 64 * n + 32));
        const __m256i qh = _mm256_loadu_si256((const __m256i*)(b + 128 + 32 * n));
        for (int k = 0; k < 4; ++k) {
          const __m256i lo = k & 1 ? ql1 : ql0;
          const __m256i nib = _mm256_and_si256(k >> 1 ? _mm256_srli_epi16(lo, 4) : lo, low4);
          const __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), three);
          const __m256i q = _mm256_or_si256(nib, _mm256_slli_epi16(high, 4));  // 0..63
          const int blk = 4 * n + k;  // 32-input block of the super-block
          const int s_lo = sc[8 * n + 2 * k], s_hi = sc[8 * n + 2 * k + 1];
          const __m256i scale = _mm256_set_m128i(_mm_set1_epi16((int16_t)s_hi), _mm_set1_epi16((int16_t)s_lo));
          for (int m = 0; m < MT; ++m) {
            const __m256i xv = _mm256_loadu_si256((const __m256i*)(xa[m].q.data() + s * 256 + 32 * blk));
            sumi[m] = _mm256_add_epi32(sumi[m], _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), scale));
            const int32_t* bs = xa[m].bsum.data() + s * 16 + 2 * blk;
            offset[m] += 32 * (s_lo * bs[0] + s_hi * bs[1]);
          }
        }
      }
      for (int m = 0; m < MT; ++m) {
        const __m256i total = _mm256_sub_epi32(sumi[m], _mm256_setr_epi32(offset[m], 0, 0, 0, 0, 0, 0, 0));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_set1_ps(d * xa[m].d[s]), acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) y[m * out + o] = hsum8(acc[m]);
  }
}
#endif

void check_ggml(const torch::Tensor& blocks, int64_t type, int64_t in) {
  TORCH_CHECK(type >= 0 && type <= kQ6_K, "unknown GGML block type id ", type);
  TORCH_CHECK(blocks.dtype() == torch::kUInt8 && blocks.dim() == 2 && in % kGgmlBlock[type] == 0 &&
              blocks.size(1) == in / kGgmlBlock[type] * kGgmlBytes[type], "GGML blocks: [out, row bytes] uint8");
}
}  // namespace

// x: [M, in] fp32; blocks: [out, row bytes] u8 of GGML type `type` -> [M, out]. act8: x rounded as llama.cpp
// rounds it for this type first (round_act_ggml: Q8_K per 256 for K-quants, Q8_0 / Q8_1 per 32 for Q5_0 / Q5_1),
// in integer kernels for Q4_K / Q5_K / Q6_K; otherwise x keeps ~16 bits (split activations) or fp32.
torch::Tensor linear_ggml(torch::Tensor x, torch::Tensor blocks, int64_t type, bool act8) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "linear_ggml: x is [M, in] fp32");
  const int64_t M = x.size(0), in = x.size(1), out = blocks.size(0);
  check_ggml(blocks, type, in);
  x = x.contiguous();
  blocks = blocks.contiguous();
  auto y = torch::empty({M, out}, x.options());
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t rb = blocks.size(1);
  const bool k_type = type == kQ4_K || type == kQ5_K || type == kQ6_K;
#ifdef LIGERO_AVX2
  if (act8 && k_type) {
    thread_local std::vector<ActQ8K> xa_buffers;
    xa_buffers.resize(M);
    ActQ8K* xa = xa_buffers.data();
    const float* xq = x.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) quantize_q8k(xq + m * in, in, xa[m]);
    at::parallel_for(0, out, 16, [&](int64_t b, int64_t e) {
      for_each_tile(M, [&](int64_t m0, auto mt) {
        constexpr int MT = decltype(mt)::value;
        if (type == kQ6_K)
          q6k_rows_act8_avx2<MT>(bp, rb, xa + m0, in, out, yp + m0 * out, b, e);
        else
          q45k_rows_act8_avx2<MT>(bp, rb, type == kQ5_K, xa + m0, in, out, yp + m0 * out, b, e);
      });
    });
    return y;
  }
#endif
  if (act8) x = round_act_ggml(x, type);
  const float* xp = x.data_ptr<float>();
#ifdef LIGERO_AVX2
  if (k_type) {  // integer kernels on split activations
    thread_local std::vector<SplitX> sx_buffers;
    thread_local std::vector<std::vector<int32_t>> sum_buffers;
    sx_buffers.resize(M);
    sum_buffers.resize(M);
    SplitX* sx = sx_buffers.data();
    std::vector<int32_t>* sums = sum_buffers.data();
    for (int64_t m = 0; m < M; ++m) {
      split_x(xp + m * in, in, sx[m]);
      if (type == kQ6_K) split_sums16(sx[m], in, sums[m]);
    }
    at::parallel_for(0, out, 16, [&](int64_t b, int64_t e) {
      for_each_tile(M, [&](int64_t m0, auto mt) {
        constexpr int MT = decltype(mt)::value;
        if (type == kQ6_K)
          q6k_rows_avx2<MT>(bp, rb, sx + m0, sums + m0, in, out, yp + m0 * out, b, e);
        else
          q45k_rows_avx2<MT>(bp, rb, type == kQ5_K, sx + m0, in, out, yp + m0 * out, b, e);
      });
    });
    return y;
  }
#endif
  at::parallel_for(0, out, 16, [&](int64_t b, int64_t e) {
    std::vector<float> w(in);
    for (int64_t o = b; o < e; ++o) {
      ggml_decode_row(type, bp + o * rb, w.data(), in);
      dot_rows_generic(w.data(), xp, yp + o, M, in, out);
    }
  });
  return y;
}

// ============================================ K-quant quantizers ===============================================
// llama.cpp's reference quantizers for Q4_K, Q5_K (make_qkx2_quants: a weighted least-squares scale and minimum
// per 32 inputs over a sweep of grids) and Q6_K (make_qx_quants: a weighted symmetric scale per 16), one 256-input
// block at a time. The arithmetic is the reference's, operation for operation in fp32 (no fused multiply-add), so
// the bytes are llama-quantize's; quant/ggml.py holds the same algorithms in torch (the tests compare them).
#define LIGERO_EXACT __attribute__((optimize("fp-contract=off")))

LIGERO_EXACT inline int nearest(float v) { return static_cast<int>(std::nearbyint(v)); }

LIGERO_EXACT float fit_scale_min(int n, int nmax, const float* x, const float* w, uint8_t* L, float* the_min,
                                 float rmin, float rdelta, int nstep) {
  float mn = x[0], mx = x[0], sum_w = w[0], sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < mn) mn = x[i];
    if (x[i] > mx) mx = x[i];
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (mn > 0) mn = 0;
  if (mx == mn) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *the_min = -mn;
    return 0.f;
  }
  float iscale = nmax / (mx - mn);
  float scale = 1 / iscale;
  float best = 0;
  for (int i = 0; i < n; ++i) {
    L[i] = static_cast<uint8_t>(std::max(0, std::min(nmax, nearest(iscale * (x[i] - mn)))));
    const float diff = scale * L[i] + mn - x[i];
    best += w[i] * (diff * diff);
  }
  uint8_t aux[32];
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * is + nmax) / (mx - mn);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      const int l = std::max(0, std::min(nmax, nearest(iscale * (x[i] - mn))));
      aux[i] = static_cast<uint8_t>(l);
      sum_l += w[i] * l;
      sum_l2 += w[i] * l * l;
      sum_xl += w[i] * l * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float cur = 0;
      for (int i = 0; i < n; ++i) {
        const float diff = this_scale * aux[i] + this_min - x[i];
        cur += w[i] * (diff * diff);
      }
      if (cur < best) {
        for (int i = 0; i < n; ++i) L[i] = aux[i];
        best = cur;
        scale = this_scale;
        mn = this_min;
      }
    }
  }
  *the_min = -mn;
  return scale;
}

LIGERO_EXACT void quantize_q45k_block(const float* x, uint8_t* out, bool five) {
  const int nmax = five ? 31 : 15;
  uint8_t L[256];
  float scales[8], mins[8], w[32];
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 8; ++j) {
    const float* xs = x + 32 * j;
    float sum_x2 = 0;
    for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
    const float av_x = std::sqrt(sum_x2 / 32);
    for (int l = 0; l < 32; ++l) w[l] = av_x + std::fabs(xs[l]);
    scales[j] = fit_scale_min(32, nmax, xs, w, L + 32 * j, &mins[j], five ? -0.5f : -1.f, 0.1f, five ? 15 : 20);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
  const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
  uint8_t ls[8], lm[8];
  for (int j = 0; j < 8; ++j) {
    ls[j] = static_cast<uint8_t>(std::min(63, nearest(inv_scale * scales[j])));
    lm[j] = static_cast<uint8_t>(std::min(63, nearest(inv_min * mins[j])));
  }
  const c10::Half d(max_scale / 63.f), dmin(max_min / 63.f);
  std::memcpy(out, &d, 2);
  std::memcpy(out + 2, &dmin, 2);
  uint8_t* sc = out + 4;
  for (int j = 0; j < 4; ++j) {
    sc[j] = ls[j] | ((ls[j + 4] >> 4) << 6);
    sc[j + 4] = lm[j] | ((lm[j + 4] >> 4) << 6);
    sc[j + 8] = (ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4);
  }
  const float df = static_cast<float>(d), dminf = static_cast<float>(dmin);
  for (int j = 0; j < 8; ++j) {
    const float dl = df * ls[j];
    if (dl == 0) continue;
    const float dml = dminf * lm[j];
    for (int l = 0; l < 32; ++l)
      L[32 * j + l] = static_cast<uint8_t>(std::max(0, std::min(nmax, nearest((x[32 * j + l] + dml) / dl))));
  }
  uint8_t* qh = out + 16;
  uint8_t* qs = out + 16 + (five ? 32 : 0);
  if (five) std::memset(qh, 0, 32);
  for (int j = 0; j < 4; ++j)
    for (int l = 0; l < 32; ++l) {
      const uint8_t a = L[64 * j + l], b = L[64 * j + 32 + l];
      qs[32 * j + l] = (a & 0xF) | ((b & 0xF) << 4);
      if (five) qh[l] |= ((a >> 4) << (2 * j)) | ((b >> 4) << (2 * j + 1));
    }
}

LIGERO_EXACT float fit_symmetric(int n, int nmax, const float* x, uint8_t* L) {
  float amax = 0, mx = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      mx = x[i];
    }
  }
  if (amax < 1e-15f) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = -nmax / mx;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = std::max(-nmax, std::min(nmax - 1, nearest(iscale * x[i])));
    L[i] = static_cast<uint8_t>(nmax + l);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  float scale = suml2 > 0 ? sumlx / suml2 : 0.f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(nmax + 0.1f * is) / mx;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      const int l = std::max(-nmax, std::min(nmax - 1, nearest(iscale * x[i])));
      const float w = x[i] * x[i];
      sumlx += w * x[i] * l;
      suml2 += w * l * l;
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(nmax + std::max(-nmax, std::min(nmax - 1,
                                                                                    nearest(iscale * x[i]))));
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

LIGERO_EXACT void quantize_q6k_block(const float* x, uint8_t* out) {
  uint8_t L[256];
  float scales[16];
  float max_scale = 0, max_abs = 0;
  for (int j = 0; j < 16; ++j) {
    scales[j] = fit_symmetric(16, 32, x + 16 * j, L + 16 * j);
    const float a = std::fabs(scales[j]);
    if (a > max_abs) {
      max_abs = a;
      max_scale = scales[j];
    }
  }
  uint8_t* ql = out;
  uint8_t* qh = out + 128;
  int8_t* sc = reinterpret_cast<int8_t*>(out + 192);
  if (max_abs < 1e-15f) {
    std::memset(out, 0, 210);
    return;
  }
  const float iscale = -128.f / max_scale;
  const c10::Half d(1 / iscale);
  std::memcpy(out + 208, &d, 2);
  for (int j = 0; j < 16; ++j) sc[j] = static_cast<int8_t>(std::min(127, nearest(iscale * scales[j])));
  const float df = static_cast<float>(d);
  for (int j = 0; j < 16; ++j) {
    const float dl = df * sc[j];
    if (dl == 0) continue;
    for (int l = 0; l < 16; ++l)
      L[16 * j + l] = static_cast<uint8_t>(std::max(-32, std::min(31, nearest(x[16 * j + l] / dl))) + 32);
  }
  for (int h = 0; h < 2; ++h)
    for (int l = 0; l < 32; ++l) {
      const uint8_t* Lh = L + 128 * h;
      const uint8_t q0 = Lh[l], q1 = Lh[32 + l], q2 = Lh[64 + l], q3 = Lh[96 + l];
      ql[64 * h + l] = (q0 & 0xF) | ((q2 & 0xF) << 4);
      ql[64 * h + 32 + l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
      qh[32 * h + l] = (q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4) | ((q3 >> 4) << 6);
    }
}

// x: [N, 256] fp32 (one block per row) -> [N, block bytes] uint8: llama.cpp's Q4_K / Q5_K / Q6_K of each block.
torch::Tensor quantize_kquant(torch::Tensor x, int64_t type) {
  TORCH_CHECK(type == kQ4_K || type == kQ5_K || type == kQ6_K, "quantize_kquant: Q4_K, Q5_K or Q6_K");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == 256, "quantize_kquant: [N, 256] fp32");
  x = x.contiguous();
  const int64_t n = x.size(0), bytes = kGgmlBytes[type];
  auto out = torch::empty({n, bytes}, x.options().dtype(torch::kUInt8));
  const float* xp = x.data_ptr<float>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (type == kQ6_K)
        quantize_q6k_block(xp + 256 * i, op + bytes * i);
      else
        quantize_q45k_block(xp + 256 * i, op + bytes * i, type == kQ5_K);
    }
  });
  return out;
}


// blocks: [out, row bytes] u8 -> [out, in] fp32 (prefill, and any other use of the fp32 weight)
torch::Tensor dequant_ggml(torch::Tensor blocks, int64_t type, int64_t in) {
  check_ggml(blocks, type, in);
  blocks = blocks.contiguous();
  const int64_t out = blocks.size(0), rb = blocks.size(1);
  auto w = torch::empty({out, in}, torch::dtype(torch::kFloat32));
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, out, 16, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) ggml_decode_row(type, bp + o * rb, wp + o * in, in);
  });
  return w;
}

// ============================================ prefill weights ================================================
// Prefill (more rows than the GEMV kernels take) multiplies by the layer's fp32 weight with torch's GEMM. These
// decode a packed weight to fp32 in one parallel pass, exactly as quant/formats.py's torch code does (same
// products and sums, no fused multiply-add), instead of a dozen whole-matrix torch ops per layer and call.

namespace {
__attribute__((optimize("fp-contract=off"))) void dequant_int4_rows(const uint8_t* packed, const at::Half* scale,
                                                                   const at::Half* minimum, float* w, int64_t in,
                                                                   int64_t group, int64_t n_groups, int64_t b,
                                                                   int64_t e) {
  for (int64_t o = b; o < e; ++o) {
    const uint8_t* row = packed + o * (in / 2);
    float* wr = w + o * in;
    for (int64_t blk = 0; blk < in / 32; ++blk) {
      const int64_t g = blk * 32 / group;
      const float s = (float)scale[o * n_groups + g], m = (float)minimum[o * n_groups + g];
      const uint8_t* bytes = row + blk * 16;
      float* wb = wr + blk * 32;
      for (int j = 0; j < 16; ++j) {
        wb[j] = (float)(bytes[j] & 0xF) * s + m;
        wb[j + 16] = (float)(bytes[j] >> 4) * s + m;
      }
    }
  }
}
}  // namespace

// packed: [out, in/2] u8 (Q4 order), scale/minimum: [out, G] fp16 -> [out, in] fp32 = q * scale + minimum
torch::Tensor dequant_int4(torch::Tensor packed, torch::Tensor scale, torch::Tensor minimum, int64_t group) {
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && scale.dtype() == torch::kFloat16 && minimum.dtype() == torch::kFloat16);
  TORCH_CHECK(packed.dim() == 2 && group % 32 == 0, "dequant_int4: [out, in/2] codes, group a multiple of 32");
  packed = packed.contiguous(); scale = scale.contiguous(); minimum = minimum.contiguous();
  const int64_t out = packed.size(0), in = packed.size(1) * 2, n_groups = (in + group - 1) / group;
  TORCH_CHECK(in % 32 == 0 && scale.size(0) == out && scale.size(1) == n_groups && minimum.sizes() == scale.sizes());
  auto w = torch::empty({out, in}, torch::dtype(torch::kFloat32));
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* mp = minimum.data_ptr<at::Half>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, out, 16, [&](int64_t b, int64_t e) { dequant_int4_rows(pp, sp, mp, wp, in, group, n_groups, b, e); });
  return w;
}

// q: [out, in] int8, scale: [out] fp32 -> [out, in] fp32 = q * scale (one product per weight, as torch's)
torch::Tensor dequant_int8(torch::Tensor q, torch::Tensor scale) {
  const bool blocks = scale.dim() == 2;
  TORCH_CHECK(q.dtype() == torch::kInt8 && q.dim() == 2 && scale.size(0) == q.size(0) &&
              (blocks ? scale.dtype() == torch::kFloat16 && scale.size(1) * 32 == q.size(1)
                      : scale.dtype() == torch::kFloat32 && scale.numel() == q.size(0)),
              "dequant_int8: [out, in] int8 codes and [out] fp32 or [out, in / 32] fp16 scales");
  q = q.contiguous(); scale = scale.contiguous();
  const int64_t out = q.size(0), in = q.size(1);
  auto w = torch::empty({out, in}, torch::dtype(torch::kFloat32));
  const int8_t* qp = q.data_ptr<int8_t>();
  float* wp = w.data_ptr<float>();
  if (blocks) {
    const at::Half* bp = scale.data_ptr<at::Half>();
    at::parallel_for(0, out, 16, [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o)
        for (int64_t i = 0; i < in; ++i) wp[o * in + i] = (float)qp[o * in + i] * half_to_float(bp[o * (in / 32) + i / 32]);
    });
    return w;
  }
  const float* sp = scale.data_ptr<float>();
  at::parallel_for(0, out, 16, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o)
      for (int64_t i = 0; i < in; ++i) wp[o * in + i] = (float)qp[o * in + i] * sp[o];
  });
  return w;
}

// packed: [out, in/4] u8 (the ternary kernel's layout: per 64 inputs, byte j holds w+1 of inputs j, j+16, j+32,
// j+48), row_scale: [out] fp32 -> [out, in] fp32 = trit * row_scale
torch::Tensor dequant_ternary(torch::Tensor packed, torch::Tensor row_scale) {
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && row_scale.dtype() == torch::kFloat32 && packed.dim() == 2);
  packed = packed.contiguous(); row_scale = row_scale.contiguous();
  const int64_t out = packed.size(0), in = packed.size(1) * 4;
  TORCH_CHECK(in % 64 == 0 && row_scale.numel() == out, "dequant_ternary: shape mismatch");
  auto w = torch::empty({out, in}, torch::dtype(torch::kFloat32));
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = row_scale.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, out, 16, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) {
      const float s = sp[o];
      const float values[4] = {-s, 0.f * s, s, 0.f};  // trit - 1 in {-1, 0, 1} times the scale, as torch rounds it
      for (int64_t blk = 0; blk < in / 64; ++blk) {
        const uint8_t* bytes = pp + o * (in / 4) + blk * 16;
        float* wb = wp + o * in + blk * 64;
        for (int j = 0; j < 16; ++j)
          for (int k = 0; k < 4; ++k) wb[j + 16 * k] = values[(bytes[j] >> (2 * k)) & 3];
      }
    }
  });
  return w;
}

// ============================================ decode attention ================================================
// Attention for a few query positions (decode: T = 1 per sequence) over the cache's keys. torch's SDPA spends
// ~100 us per call on dispatch and setup for what is here ~20k multiply-adds; one native call per layer does it
// directly. Exact softmax in fp32 (max subtracted), the same arithmetic SDPA performs.

// q: [B, H, T, D]; k, v: [B, K, S, D] (views of the cache: the last dim contiguous); mask: [B, 1, T, S] bool
// (true = visible; every query sees at least one key) -> [B, H, T, D]. Query head h reads KV head h / (H / K).
// Keys and values are fp32 or fp16 (a half-size cache, llama.cpp's default: at many rows decode attention is
// bound by reading the cache); the arithmetic is fp32 either way.
namespace {
// Raw views of attention's operands (element strides), so the decode step can attend straight from its buffers.
struct AttendArgs {
  const float* q; int64_t qs0, qs1, qs2;  // [B, H, T, D], last dim contiguous
  const void* k; int64_t ks0, ks1, ks2;   // [B, K, S, D], fp32 or (half) fp16
  const void* v; int64_t vs0, vs1, vs2;
  const bool* mask; int64_t ms0, ms2, ms3;  // [B, 1, T, S]
  float* out;                              // [B, H, T, D] contiguous
  int64_t B, H, T, D, K, S;
  float scale;
  bool half;  // k and v hold fp16
};

inline float kv_value(float x) { return x; }
inline float kv_value(at::Half x) { return static_cast<float>(x); }
#ifdef LIGERO_AVX2
inline __m256 load8_kv(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8_kv(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

// exp(x) for 8 floats at once: 2^n * e^r with n = round(x / ln 2) and r = x - n ln 2 in [-ln2 / 2, ln2 / 2]
// (ln 2 split in two for an exact product), e^r by its degree-6 Taylor polynomial (Horner): relative error
// < 2e-7 (~2 ulp) where the result is a normal float; inputs below -87.3 give 0, NaN stays NaN. Softmax needs no more:
// torch's SDPA rounds its own exponentials differently from libm too.
#ifdef LIGERO_AVX2
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 below = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(lo, x);  // (this operand order keeps a NaN: maxps returns its second operand then)
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 e = _mm256_set1_ps(1.f / 720.f);
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.f / 120.f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.f / 24.f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.f / 6.f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(0.5f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.f));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(below, _mm256_mul_ps(e, _mm256_castsi256_ps(pow2)));
}
#endif

// p[s] = exp(p[s] - mx) for s < n (masked entries hold -inf and give 0); returns their sum, added in a fixed order.
inline float exp_shifted(float* p, int64_t n, float mx) {
  int64_t s = 0;
  float sum = 0.f;
#ifdef LIGERO_AVX2
  const __m256 m = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  for (; s + 8 <= n; s += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + s), m));
    _mm256_storeu_ps(p + s, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum8(acc);
#endif
  for (; s < n; ++s) {
    p[s] = p[s] == -INFINITY ? 0.f : std::exp(p[s] - mx);
    sum += p[s];
  }
  return sum;
}

// sum_s p[s] * v[s * stride + d] for d < D into out (p[s] == 0: skipped, a masked key). The running sums stay in
// registers (eight vectors of 8, 64 dimensions at a time) instead of in out, which the compiler must otherwise
// reload and store for every key, since out might alias v.
template <typename KV>
inline void weighted_values(const float* p, const KV* v, int64_t stride, int64_t n, int64_t D,
                            float* __restrict out) {
  int64_t d0 = 0;
#ifdef LIGERO_AVX2
  for (; d0 + 64 <= D; d0 += 64) {
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t s = 0; s < n; ++s) {
      if (p[s] == 0.f) continue;
      const __m256 w = _mm256_set1_ps(p[s]);
      const KV* vr = v + s * stride + d0;
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(w, load8_kv(vr + 8 * j), acc[j]);
    }
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + d0 + 8 * j, acc[j]);
  }
#endif
  if (d0 < D) {
    float acc[512];  // head_dim <= 512 (checked by the callers)
    const int64_t rest = D - d0;
    for (int64_t d = 0; d < rest; ++d) acc[d] = 0.f;
    for (int64_t s = 0; s < n; ++s) {
      if (p[s] == 0.f) continue;
      const float w = p[s];
      const KV* __restrict vr = v + s * stride + d0;
      for (int64_t d = 0; d < rest; ++d) acc[d] += w * kv_value(vr[d]);
    }
    for (int64_t d = 0; d < rest; ++d) out[d0 + d] = acc[d];
  }
}

// p[s] = scale * q . k[s] for the n keys at k (stride apart) that mrow (stride ms) shows, -inf for the others;
// returns the largest. With AVX2 and D a multiple of 8, four keys at a time, their four sums reduced together.
// v (not null): the values of the same keys, fetched into cache meanwhile, and the keys kKeysAhead ahead (see
// attend_core).
constexpr int64_t kKeysAhead = 8;

// The largest of n scores (a NaN is skipped, as std::max skips it here: softmax then spreads it to every output).
inline float max_score(const float* p, int64_t n) {
  float mx = -INFINITY;
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, p[i]);
  return mx;
}

// The span [first, first + n) of a query's visible keys in mask row mrow (stride ms, S keys); n >= 1, since every
// query sees a key. Attention reads only that span: a continuous batch's row sees the first slots of a long cache,
// a sliding window its last keys.
inline std::pair<int64_t, int64_t> visible_span(const bool* mrow, int64_t ms, int64_t S) {
  int64_t first = 0, last = S - 1;
  while (first < S && !mrow[first * ms]) ++first;
  while (last > first && !mrow[last * ms]) --last;
  return {first, last - first + 1};
}
inline float dot_kv(const float* q, const float* k, int64_t D) { return dot_f32(q, k, D); }
inline float dot_kv(const float* q, const at::Half* k, int64_t D) {  // dot_f32's order, fp16 keys widened first
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= D; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += q[i + j] * kv_value(k[i + j]);
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < D; ++i) s += q[i] * kv_value(k[i]);
  return s;
}
template <typename KV>
inline float attention_scores(const float* q, const KV* k, int64_t stride, const bool* mrow, int64_t ms, int64_t n,
                              int64_t D, float scale, float* p, const KV* v = nullptr) {
  int64_t s = 0;
#ifdef LIGERO_AVX2
  if (D % 8 == 0) {
    for (; s + 4 <= n; s += 4) {
      if (v) {
        for (int j = 0; j < 4; ++j) {
          prefetch_lines(k + (s + kKeysAhead + j) * stride, D * sizeof(KV));
          prefetch_lines(v + (s + j) * stride, D * sizeof(KV));
        }
      }
      __m256 acc[4];
      for (int j = 0; j < 4; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        for (int j = 0; j < 4; ++j) acc[j] = _mm256_fmadd_ps(qv, load8_kv(k + (s + j) * stride + d), acc[j]);
      }
      // [a0+a1 pairs | b], [c | d] -> one vector holding the four sums twice (low and high 128 bits added)
      const __m256 ab = _mm256_hadd_ps(acc[0], acc[1]), cd = _mm256_hadd_ps(acc[2], acc[3]);
      const __m256 abcd = _mm256_hadd_ps(ab, cd);
      const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
      float out[4];
      _mm_storeu_ps(out, _mm_mul_ps(sums, _mm_set1_ps(scale)));
      for (int j = 0; j < 4; ++j) p[s + j] = mrow[(s + j) * ms] ? out[j] : -INFINITY;
    }
  }
#endif
  for (; s < n; ++s) p[s] = mrow[s * ms] ? dot_kv(q, k + s * stride, D) * scale : -INFINITY;
  return max_score(p, n);
}

#ifdef LIGERO_AVX512
// Grouped-query attention with 64-dimensional heads (SmolLM2, TinyLlama) in 512-bit registers: the query heads
// that share a KV head (up to 3 per pass, their queries held in registers) take each key and value from one read
// and one fp16 widening, instead of each head reading and widening the group's keys again. The multiply-adds are
// the same (attention stays bound by them: 128 per head and key); in SmolLM2-135M's 16-row decode step (fp16
// cache) attention's time fell from 0.53x to 0.46x the projections' (3 runs each), ~3 % of the step.
inline __m512 load16_kv(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16_kv(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The four lanes-sums of acc[0..3] (each a 16-lane partial dot product), in that order.
inline __m128 sum4_512(const __m512* acc) {
  __m256 t[4];
  for (int j = 0; j < 4; ++j)
    t[j] = _mm256_add_ps(_mm512_castps512_ps256(acc[j]),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[j]), 1)));
  const __m256 ab = _mm256_hadd_ps(t[0], t[1]), cd = _mm256_hadd_ps(t[2], t[3]);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// p[h][s] = scale * q[h] . k[s] for HG heads over the n keys at k (stride apart) that mrow shows, -inf for the
// others. Keys four at a time: 4 x HG independent sums in flight, one widening per key for all heads.
template <int HG, typename KV>
void scores_d64(const float* const* q, const KV* k, int64_t stride, const bool* mrow, int64_t ms, int64_t n,
                float scale, float* const* p, const KV* v) {
  __m512 qv[HG][4];
  for (int h = 0; h < HG; ++h)
    for (int i = 0; i < 4; ++i) qv[h][i] = _mm512_loadu_ps(q[h] + 16 * i);
  int64_t s = 0;
  for (; s + 4 <= n; s += 4) {
    for (int j = 0; j < 4; ++j) {
      prefetch_lines(k + (s + kKeysAhead + j) * stride, 64 * sizeof(KV));
      prefetch_lines(v + (s + j) * stride, 64 * sizeof(KV));
    }
    __m512 acc[HG][4];
    for (int j = 0; j < 4; ++j) {
      const KV* kr = k + (s + j) * stride;
      const __m512 k0 = load16_kv(kr), k1 = load16_kv(kr + 16), k2 = load16_kv(kr + 32), k3 = load16_kv(kr + 48);
      for (int h = 0; h < HG; ++h)
        acc[h][j] = _mm512_fmadd_ps(qv[h][3], k3, _mm512_fmadd_ps(qv[h][2], k2,
                    _mm512_fmadd_ps(qv[h][1], k1, _mm512_mul_ps(qv[h][0], k0))));
    }
    for (int h = 0; h < HG; ++h) {
      float out[4];
      _mm_storeu_ps(out, _mm_mul_ps(sum4_512(acc[h]), _mm_set1_ps(scale)));
      for (int j = 0; j < 4; ++j) p[h][s + j] = mrow[(s + j) * ms] ? out[j] : -INFINITY;
    }
  }
  for (; s < n; ++s) {
    const KV* kr = k + s * stride;
    const __m512 k0 = load16_kv(kr), k1 = load16_kv(kr + 16), k2 = load16_kv(kr + 32), k3 = load16_kv(kr + 48);
    for (int h = 0; h < HG; ++h) {
      const __m512 acc = _mm512_fmadd_ps(qv[h][3], k3, _mm512_fmadd_ps(qv[h][2], k2,
                         _mm512_fmadd_ps(qv[h][1], k1, _mm512_mul_ps(qv[h][0], k0))));
      p[h][s] = mrow[s * ms] ? _mm512_reduce_add_ps(acc) * scale : -INFINITY;
    }
  }
}

// out[h][d] = sum_s p[h][s] * v[s][d] for HG heads (keys all heads weigh 0, the masked ones, are skipped).
template <int HG, typename KV>
void values_d64(const float* const* p, const KV* v, int64_t stride, int64_t n, float* const* out) {
  __m512 acc[HG][4];
  for (int h = 0; h < HG; ++h)
    for (int i = 0; i < 4; ++i) acc[h][i] = _mm512_setzero_ps();
  for (int64_t s = 0; s < n; ++s) {
    bool any = false;
    for (int h = 0; h < HG; ++h) any |= p[h][s] != 0.f;
    if (!any) continue;
    const KV* vr = v + s * stride;
    const __m512 v0 = load16_kv(vr), v1 = load16_kv(vr + 16), v2 = load16_kv(vr + 32), v3 = load16_kv(vr + 48);
    for (int h = 0; h < HG; ++h) {
      const __m512 w = _mm512_set1_ps(p[h][s]);
      acc[h][0] = _mm512_fmadd_ps(w, v0, acc[h][0]);
      acc[h][1] = _mm512_fmadd_ps(w, v1, acc[h][1]);
      acc[h][2] = _mm512_fmadd_ps(w, v2, acc[h][2]);
      acc[h][3] = _mm512_fmadd_ps(w, v3, acc[h][3]);
    }
  }
  for (int h = 0; h < HG; ++h)
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(out[h] + 16 * i, acc[h][i]);
}

template <int HG, typename KV>
void attend_heads_d64(const AttendArgs& a, const float* const* q, const KV* kb, const KV* vb, const bool* mrow,
                      int64_t first, int64_t n, float* const* p, float* const* out) {
  scores_d64<HG>(q, kb + first * a.ks2, a.ks2, mrow + first * a.ms3, a.ms3, n, a.scale, p, vb + first * a.vs2);
  float inv[HG];
  for (int h = 0; h < HG; ++h) {
    inv[h] = 1.f / exp_shifted(p[h], n, max_score(p[h], n));
  }
  values_d64<HG>(p, vb + first * a.vs2, a.vs2, n, out);
  for (int h = 0; h < HG; ++h)
    for (int64_t d = 0; d < 64; ++d) out[h][d] *= inv[h];
}

// One item per (row, KV head, query position): its query heads in passes of up to 3.
template <typename KV>
void attend_groups_d64(const AttendArgs& a) {
  const int64_t H = a.H, T = a.T, S = a.S, K = a.K, group = a.H / a.K;
  at::parallel_for(0, a.B * K * T, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(3 * S);
    float* p[3] = {scratch.data(), scratch.data() + S, scratch.data() + 2 * S};
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / (K * T), g = (idx / T) % K, t = idx % T;
      const bool* mrow = a.mask + b * a.ms0 + t * a.ms2;
      const KV* kb = static_cast<const KV*>(a.k) + b * a.ks0 + g * a.ks1;
      const KV* vb = static_cast<const KV*>(a.v) + b * a.vs0 + g * a.vs1;
      const auto [first, n] = visible_span(mrow, a.ms3, S);
      for (int64_t h0 = g * group; h0 < (g + 1) * group; h0 += 3) {
        const int hg = static_cast<int>(std::min<int64_t>(3, (g + 1) * group - h0));
        const float* q[3];
        float* out[3];
        for (int h = 0; h < hg; ++h) {
          q[h] = a.q + b * a.qs0 + (h0 + h) * a.qs1 + t * a.qs2;
          out[h] = a.out + ((b * H + h0 + h) * T + t) * 64;
        }
        if (hg == 3)
          attend_heads_d64<3>(a, q, kb, vb, mrow, first, n, p, out);
        else if (hg == 2)
          attend_heads_d64<2>(a, q, kb, vb, mrow, first, n, p, out);
        else
          attend_heads_d64<1>(a, q, kb, vb, mrow, first, n, p, out);
      }
    }
  });
}
#endif

// Each (row, head, query) item reads only its visible span of keys [first, last] (a continuous batch's row
// sees the first slots of a long cache; sliding windows see their last keys), scores it, exponentiates it in
// vectors and sums the values it weighs.
template <typename KV>
void attend_core_t(const AttendArgs& a) {
  const int64_t H = a.H, T = a.T, D = a.D, S = a.S, group = a.H / a.K;
  TORCH_CHECK(D <= 512, "attention: head_dim must be <= 512");
#ifdef LIGERO_AVX512
  if (D == 64) {
    attend_groups_d64<KV>(a);
    return;
  }
#endif
  at::parallel_for(0, a.B * H * T, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(S);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / (H * T), h = (idx / T) % H, t = idx % T, g = h / group;
      const float* qv = a.q + b * a.qs0 + h * a.qs1 + t * a.qs2;
      const bool* mrow = a.mask + b * a.ms0 + t * a.ms2;
      const KV* kb = static_cast<const KV*>(a.k) + b * a.ks0 + g * a.ks1;
      const KV* vb = static_cast<const KV*>(a.v) + b * a.vs0 + g * a.vs1;
      const auto [first, n] = visible_span(mrow, a.ms3, S);
      // The first query head of a KV group reads its keys and values from memory (the cache of every row and
      // layer is far larger than the CPU's caches; the group's other heads find them in L2): it prefetches keys
      // kKeysAhead ahead and the values it will weigh next, so the reads overlap its arithmetic.
      const KV* fetch_v = (h % group == 0 && a.vs2 == a.ks2) ? vb + first * a.vs2 : nullptr;
      const float mx = attention_scores(qv, kb + first * a.ks2, a.ks2, mrow + first * a.ms3, a.ms3, n, D, a.scale,
                                        p.data(), fetch_v);
      const float inv = 1.f / exp_shifted(p.data(), n, mx);
      float* o = a.out + idx * D;
      weighted_values(p.data(), vb + first * a.vs2, a.vs2, n, D, o);
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
  });
}

void attend_core(const AttendArgs& a) {
  if (a.half)
    attend_core_t<at::Half>(a);
  else
    attend_core_t<float>(a);
}
}  // namespace

torch::Tensor attend_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask, double scale) {
  const bool half = k.dtype() == torch::kFloat16;
  TORCH_CHECK(q.dtype() == torch::kFloat32 && (half || k.dtype() == torch::kFloat32) && v.dtype() == k.dtype() &&
              mask.dtype() == torch::kBool, "attend_decode takes fp32 q, fp32 or fp16 k and v, and a bool mask");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4, "attend_decode: 4-d tensors");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), K = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && v.sizes() == k.sizes() && K > 0 && H % K == 0,
              "attend_decode: shape mismatch");
  if (k.stride(3) != 1) k = k.contiguous();
  if (v.stride(3) != 1) v = v.contiguous();
  q = q.contiguous();
  mask = mask.expand({B, 1, T, S});
  auto out = torch::empty({B, H, T, D}, q.options());
  attend_core({q.data_ptr<float>(), H * T * D, T * D, D, k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
               v.data_ptr(), v.stride(0), v.stride(1), v.stride(2), mask.data_ptr<bool>(), mask.stride(0),
               mask.stride(2), mask.stride(3), out.data_ptr<float>(), B, H, T, D, K, S, (float)scale, half});
  return out;
}

// ============================================ RMSNorm =========================================================
// y = x / sqrt(mean(x^2) + eps) * (offset + w), per row (Llama: offset 0; Gemma: offset 1), in llama.cpp's
// arithmetic as models/transformer.py's rms_norm_llamacpp: fp32 squares summed in double, the mean rounded to
// fp32, 1 / sqrtf. One native call replaces torch's ~8 small ops (~50 us at decode sizes, 61 norms per SmolLM2
// token).
namespace {
inline void rms_row(const float* x, const float* w, float* y, int64_t dim, float eps, float off) {
  // Four double chains (a double sum of fp32 squares rounds to the same fp32 mean in any order).
  double s[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + 4 <= dim; i += 4)
    for (int j = 0; j < 4; ++j) {
      const float sq = x[i + j] * x[i + j];
      s[j] += (double)sq;
    }
  for (; i < dim; ++i) {
    const float sq = x[i] * x[i];
    s[0] += (double)sq;
  }
  const double sum = (s[0] + s[1]) + (s[2] + s[3]);
  const float mean = (float)(sum / (double)dim);
  const float inv = 1.f / std::sqrt(mean + eps);
  for (int64_t i = 0; i < dim; ++i) y[i] = x[i] * inv * (off + w[i]);
}
}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps, double offset) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "rms_norm takes fp32");
  const int64_t dim = w.numel();
  TORCH_CHECK(x.size(-1) == dim, "rms_norm: the last dimension must match the weight");
  x = x.contiguous();
  auto wc = w.contiguous();
  auto y = torch::empty_like(x);
  const int64_t rows = x.numel() / dim;
  const float* xp = x.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_row(xp + r * dim, wp, yp + r * dim, dim, (float)eps, (float)offset);
  });
  return y;
}

// ============================================ greedy pick =====================================================
// Greedy decoding's choice per row: the first index of the largest score (torch's argmax) and that token's
// log-probability under `logits` (the scores before logit_bias and penalties; the same tensor when none apply):
// logits[id] - max - log(sum exp(logits - max)). One read of each row instead of torch's gather + argmax +
// log_softmax over [rows, V] (~1.5 ms a step at 16 rows of a 49k vocabulary). Scores are finite (NaN unsupported).
namespace {
int64_t first_argmax(const float* s, int64_t n) {
  float best = -INFINITY;
  int64_t i = 0;
#ifdef LIGERO_AVX2
  __m256 m = _mm256_set1_ps(-INFINITY);
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + i));
  float lanes[8];
  _mm256_storeu_ps(lanes, m);
  for (float v : lanes) best = std::max(best, v);
#endif
  for (; i < n; ++i) best = std::max(best, s[i]);
  for (int64_t j = 0; j < n; ++j)
    if (s[j] == best) return j;
  return 0;  // no entry compares equal (NaN): token 0
}

// log-probability of token id under x, whose largest entry is mx
float log_prob_at(const float* x, int64_t n, float mx, int64_t id) {
  float sum = 0.f;
  int64_t i = 0;
#ifdef LIGERO_AVX2
  const __m256 m = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), m)));
  sum = hsum8(acc);
#endif
  for (; i < n; ++i) sum += std::exp(x[i] - mx);
  return x[id] - mx - std::log(sum);
}

float log_prob_of(const float* x, int64_t n, int64_t id) { return log_prob_at(x, n, x[first_argmax(x, n)], id); }
}  // namespace

std::tuple<torch::Tensor, torch::Tensor> greedy_rows(torch::Tensor scores, torch::Tensor logits) {
  TORCH_CHECK(scores.dtype() == torch::kFloat32 && logits.dtype() == torch::kFloat32 && scores.dim() == 2 &&
              scores.sizes() == logits.sizes(), "greedy_rows: scores and logits are [rows, V] fp32");
  scores = scores.contiguous();
  logits = logits.contiguous();
  const int64_t rows = scores.size(0), V = scores.size(1);
  TORCH_CHECK(V > 0, "greedy_rows: an empty vocabulary");
  auto ids = torch::empty({rows}, scores.options().dtype(torch::kInt64));
  auto log_probs = torch::empty({rows}, scores.options());
  const float* sp = scores.data_ptr<float>();
  const float* lp = logits.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  float* op = log_probs.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      ip[r] = first_argmax(sp + r * V, V);
      op[r] = log_prob_of(lp + r * V, V, ip[r]);
    }
  });
  return {ids, log_probs};
}

// greedy_rows(logits + bias, logits) for a sparse logit_bias per row (row r's entries [offsets[r], offsets[r + 1])
// of bias_ids and bias_values), without writing the biased copy of every row that torch needed (at 16 rows of a 49k
// vocabulary a [16, 49152] clone plus a few ops per row: ~0.3 ms of each decode step). The argmax of the biased row
// is its largest unbiased entry or a biased one (first index on ties, as argmax); only when the row's largest entry
// is itself biased does it take a biased copy of that one row.
std::tuple<torch::Tensor, torch::Tensor> greedy_rows_biased(torch::Tensor logits, torch::Tensor offsets,
                                                            torch::Tensor bias_ids, torch::Tensor bias_values) {
  TORCH_CHECK(logits.dtype() == torch::kFloat32 && logits.dim() == 2, "greedy_rows_biased: logits are [rows, V] fp32");
  TORCH_CHECK(offsets.dtype() == torch::kInt64 && offsets.numel() == logits.size(0) + 1 &&
              bias_ids.dtype() == torch::kInt64 && bias_values.dtype() == torch::kFloat32 &&
              bias_ids.numel() == bias_values.numel(), "greedy_rows_biased: offsets [rows + 1], ids and values");
  logits = logits.contiguous();
  offsets = offsets.contiguous();
  bias_ids = bias_ids.contiguous();
  bias_values = bias_values.contiguous();
  const int64_t rows = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "greedy_rows_biased: an empty vocabulary");
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* bi = bias_ids.data_ptr<int64_t>();
  const float* bv = bias_values.data_ptr<float>();
  TORCH_CHECK(off[0] == 0 && off[rows] == bias_ids.numel(), "greedy_rows_biased: offsets do not span the entries");
  for (int64_t k = 0; k < bias_ids.numel(); ++k)
    TORCH_CHECK(bi[k] >= 0 && bi[k] < V, "greedy_rows_biased: a biased token outside the vocabulary");
  auto ids = torch::empty({rows}, logits.options().dtype(torch::kInt64));
  auto log_probs = torch::empty({rows}, logits.options());
  const float* lp = logits.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  float* op = log_probs.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> biased;
    for (int64_t r = begin; r < end; ++r) {
      const float* x = lp + r * V;
      const int64_t top = first_argmax(x, V);
      bool top_biased = false;
      for (int64_t k = off[r]; k < off[r + 1]; ++k) top_biased |= bi[k] == top;
      int64_t best = top;
      if (top_biased) {
        biased.assign(x, x + V);
        for (int64_t k = off[r]; k < off[r + 1]; ++k) biased[bi[k]] += bv[k];
        best = first_argmax(biased.data(), V);
      } else {
        float value = x[top];
        for (int64_t k = off[r]; k < off[r + 1]; ++k) {
          const float a = x[bi[k]] + bv[k];
          if (a > value || (a == value && bi[k] < best)) {
            best = bi[k];
            value = a;
          }
        }
      }
      ip[r] = best;
      op[r] = log_prob_at(x, V, x[top], best);
    }
  });
  return {ids, log_probs};
}

// ============================================ decode step =====================================================
// One native call runs every decoder layer of a decode step (one new token per sequence, batch <= 16): norms,
// projections, RoPE, the KV-cache write, attention, the MLP and the residuals, with no Python in between. The
// layer-by-layer modules stay the reference (models/transformer.py); this mirrors their arithmetic op for op.
// A projection without a native kernel (e.g. one that rounds its activations in torch) is called back in Python.

// FP8 activations per row (quant/formats.py fake_quantize_fp8_rows, op for op): scale = amax / max (1 for an
// all-zero row), x / scale clamped to +-max, rounded to FP8 (nearest even, c10's conversion, as torch's cast),
// back to fp32 times the scale.
template <typename FP8>
torch::Tensor fake_quant_fp8_rows_t(const torch::Tensor& x, float fmax) {
  auto xc = x.contiguous();
  auto y = torch::empty_like(xc);
  const int64_t n = xc.size(-1), rows = xc.numel() / n;
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * n;
    float* yr = yp + r * n;
    float amax = 0.f;
    for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(xr[i]));
    const float scale = amax > 0.f ? amax / fmax : 1.f;
    for (int64_t i = 0; i < n; ++i) {
      const float v = std::min(std::max(xr[i] / scale, -fmax), fmax);
      yr[i] = static_cast<float>(FP8(v)) * scale;
    }
  }
  return y;
}

// x: [..., in] fp32 (in % 32 == 0) -> x rounded to int8 per 32-input block, in fp32: q * (amax / 127), exactly as
// quant/formats.py's fake_quantize_int8_blocks (the same products and roundings), in one parallel pass instead of
// a dozen whole-tensor torch ops per layer (prefill of the -a8 schemes on layers that use torch's GEMM).
torch::Tensor fake_quant_int8_blocks(torch::Tensor x) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() >= 1 && x.size(-1) % 32 == 0,
              "fake_quant_int8_blocks: fp32 with a multiple of 32 inputs");
  x = x.contiguous();
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, x.numel() / 32, 256, [&](int64_t b, int64_t e) {
    round_blocks_x8(xp + b * 32, yp + b * 32, e - b);
  });
  return y;
}

// fmt: 1 = E4M3, 2 = E5M2
torch::Tensor fake_quant_fp8_rows(torch::Tensor x, int64_t fmt) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && (fmt == 1 || fmt == 2), "fake_quant_fp8_rows: fp32, fmt 1 or 2");
  return fmt == 1 ? fake_quant_fp8_rows_t<c10::Float8_e4m3fn>(x, 448.f)
                  : fake_quant_fp8_rows_t<c10::Float8_e5m2>(x, 57344.f);
}

enum LinearKind : int64_t { kPython = 0, kF32 = 1, kInt8 = 2, kInt4 = 3, kLut4 = 4, kLut8 = 5, kTernary = 6,
                             kGgml = 7, kHalf = 8, kInt8x8 = 9 };

struct NativeLinear {
  int64_t kind;
  std::vector<torch::Tensor> t;  // the kernel's tensors, in its argument order (kLut4: + an optional row scale)
  int64_t group;                 // kInt4: group size; kLut4: block size; kGgml: the GGML type id
  bool act8;                     // kInt8, kInt4: int8 activations per 32-input block; kGgml: llama.cpp's (Q8_K ...)
  double tensor_scale;           // kLut4: one tensor scale (1.0 when a row scale follows)
  int64_t act_fp8;               // 0, or the FP8 format (1 E4M3, 2 E5M2) the activations are rounded to first
  int64_t out_features;          // kInt4, kInt8x8: output rows (the x8 layouts pad them to bundles of 8)
  py::object module;             // kPython: the module to call

  torch::Tensor operator()(const torch::Tensor& x_in) const {
    const torch::Tensor x = act_fp8 ? fake_quant_fp8_rows(x_in, act_fp8) : x_in;
    switch (kind) {
      case kF32: return linear_f32(x, t[0]);
      case kInt8: return linear_int8(x, t[0], t[1], act8);
      case kInt4: return linear_int4(x, t[0], t[1], t[2], group, act8, out_features);
      case kInt8x8: return linear_int8_x8(x, t[0], t[1], out_features);
      case kLut4: {
        auto y = linear_lut4(x, t[0], t[1], t[2], t[3], tensor_scale, group);
        return t.size() > 4 ? y.mul_(t[4]) : y;
      }
      case kLut8: return linear_lut8(x, t[0], t[1], t[2]);
      case kTernary: return linear_ternary(x, t[0], t[1]);
      case kGgml: return linear_ggml(x, t[0], group, act8);
      case kHalf: return linear_half(x, t[0]);
      default: return module(x).cast<torch::Tensor>();
    }
  }
};

struct NativeLayer {
  NativeLinear qkv, o, gate_up, down;
  torch::Tensor attn_norm, mlp_norm;
  c10::optional<torch::Tensor> attn_post_norm, mlp_post_norm, q_norm, k_norm;
  torch::Tensor k_cache, v_cache;  // [B, K, N, D] fp32 contiguous: the model's KV cache for this layer
  bool local;                      // sliding-window layer: the cache is a ring, the other kind's RoPE and mask
};

struct Scratch {
  torch::Tensor normed;  // [B, C]
  torch::Tensor attn;    // [B, H * D]
};

inline void add_rows(torch::Tensor& x, const torch::Tensor& h_in) {  // x += h, as torch adds (one rounding each)
  const auto h = h_in.contiguous();
  TORCH_CHECK(h.numel() == x.numel(), "DecodeStep: a projection returned the wrong shape");
  float* xp = x.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  const int64_t C = x.size(-1);
  over_rows(x.numel() / C, [&](int64_t r) {
    for (int64_t i = r * C; i < (r + 1) * C; ++i) xp[i] += hp[i];
  });
}

struct StepInputs {  // one layer kind's share of a step (RoPE rows, the mask over the cache after the write)
  const float* cos;
  const float* sin;
  torch::Tensor mask;   // [B, 1, 1, S] bool
  const int64_t* slot;  // [B]: the cache slot each row writes (rows of a continuous batch sit at their own positions)
};

// fp-contract off: torch rounds the products before the sum, so must this (no fused multiply-add)
__attribute__((optimize("fp-contract=off"))) inline void rope_row(float* x, const float* c, const float* s, int64_t D) {
  // x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] (HF layout), rounded as torch rounds it
  const int64_t half = D / 2;
  float tmp[512];
  for (int64_t i = 0; i < D; ++i) tmp[i] = x[i];
  for (int64_t i = 0; i < half; ++i) {
    const float a = tmp[i] * c[i], b = -tmp[i + half] * s[i];
    x[i] = a + b;
  }
  for (int64_t i = half; i < D; ++i) {
    const float a = tmp[i] * c[i], b = tmp[i - half] * s[i];
    x[i] = a + b;
  }
}

class DecodeStep {
 public:
  DecodeStep(std::vector<NativeLayer> layers, int64_t n_heads, int64_t n_kv, int64_t head_dim, double eps,
             double offset, double scale, bool gelu)
      : layers_(std::move(layers)), H_(n_heads), K_(n_kv), D_(head_dim), eps_(eps), offset_(offset), scale_(scale),
        gelu_(gelu) {
    TORCH_CHECK(D_ <= 512 && D_ % 2 == 0, "DecodeStep: head_dim must be even and <= 512");
    for (const auto& l : layers_)
      for (const NativeLinear* p : {&l.qkv, &l.o, &l.gate_up, &l.down}) python_calls_ |= p->kind == kPython;
    for (const auto& l : layers_)
      TORCH_CHECK(l.k_cache.is_contiguous() && l.v_cache.is_contiguous() && l.k_cache.size(1) == K_ &&
                  l.k_cache.size(3) == D_ && l.v_cache.dtype() == l.k_cache.dtype() &&
                  (l.k_cache.dtype() == torch::kFloat32 || l.k_cache.dtype() == torch::kFloat16),
                  "DecodeStep: bad cache tensors (fp32 or fp16 keys and values, [B, K, N, D] contiguous)");
  }

  // x: [B, C] embedded tokens -> [B, C] after every layer. cos/sin: [B, D] per kind; mask: [B, 1, 1, S]
  // bool over the cache as it is after this step's write; slots: [B] int64, where each row writes.
  // cache_row >= 0: every row of x is a token of that one cache row (a prompt chunk: B queries at consecutive
  // positions, all written before any attends, each mask hiding the later ones); -1: row b is cache row b.
  torch::Tensor run(torch::Tensor x, torch::Tensor cos_g, torch::Tensor sin_g, torch::Tensor mask_g,
                    torch::Tensor slots_g, torch::Tensor cos_l, torch::Tensor sin_l, torch::Tensor mask_l,
                    torch::Tensor slots_l, int64_t cache_row = -1) {
    TORCH_CHECK(x.dim() == 2 && x.dtype() == torch::kFloat32, "DecodeStep.run: x must be [B, C] fp32");
    x = x.contiguous().clone();
    cos_g = cos_g.contiguous(); sin_g = sin_g.contiguous(); cos_l = cos_l.contiguous(); sin_l = sin_l.contiguous();
    mask_g = mask_g.contiguous(); mask_l = mask_l.contiguous();
    slots_g = slots_g.to(torch::kInt64).contiguous(); slots_l = slots_l.to(torch::kInt64).contiguous();
    TORCH_CHECK(slots_g.numel() == x.size(0) && slots_l.numel() == x.size(0), "DecodeStep.run: one slot per row");
    const StepInputs global{cos_g.data_ptr<float>(), sin_g.data_ptr<float>(), mask_g, slots_g.data_ptr<int64_t>()};
    const StepInputs local{cos_l.data_ptr<float>(), sin_l.data_ptr<float>(), mask_l, slots_l.data_ptr<int64_t>()};
    for (const auto& layer : layers_) {  // a slot outside the cache would write past it
      const int64_t n = layer.k_cache.size(2);
      TORCH_CHECK(cache_row >= 0 ? cache_row < layer.k_cache.size(0) : layer.k_cache.size(0) == x.size(0),
                  "DecodeStep.run: the cache has another number of rows (or no row cache_row)");
      const int64_t* sl = layer.local ? local.slot : global.slot;
      for (int64_t b = 0; b < x.size(0); ++b) TORCH_CHECK(sl[b] >= 0 && sl[b] < n, "DecodeStep.run: slot out of range");
    }
    // Scratch reused by every layer: the normalized input and attention's output (no allocation per layer)
    Scratch scratch{torch::empty_like(x), torch::empty({x.size(0), H_ * D_}, x.options())};
    if (python_calls_) {  // a projection runs in Python: keep the GIL
      for (const auto& layer : layers_) layer_step(layer, x, layer.local ? local : global, scratch, cache_row);
    } else {  // all native: other Python threads (a server's event loop) run meanwhile
      py::gil_scoped_release no_gil;
      for (const auto& layer : layers_) layer_step(layer, x, layer.local ? local : global, scratch, cache_row);
    }
    return x;
  }

  // Profiling (benchmarks/decode_profile.py): seconds spent in the projections and in attention since the last
  // reset, timed only while profiling is on.
  void set_profiling(bool on) { profiling_ = on; }
  std::pair<double, double> timings() const { return {linear_s_, attention_s_}; }
  void reset_timings() { linear_s_ = attention_s_ = 0.0; }

 private:
  template <typename F>
  torch::Tensor timed(double& total, F&& f) const {
    if (!profiling_) return f();
    const auto t0 = std::chrono::steady_clock::now();
    auto y = f();
    total += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return y;
  }

  void norm_rows(const torch::Tensor& x, const torch::Tensor& w, torch::Tensor& y) const {
    const int64_t dim = w.numel(), rows = x.numel() / dim;
    const float* xp = x.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    over_rows(rows, [&](int64_t r) { rms_row(xp + r * dim, wp, yp + r * dim, dim, (float)eps_, (float)offset_); });
  }

  void layer_step(const NativeLayer& L, torch::Tensor& x, const StepInputs& in, Scratch& scratch,
                  int64_t cache_row) const {
    const int64_t B = x.size(0), H = H_, K = K_, D = D_, W = H + 2 * K;
    // --- attention ---
    norm_rows(x, L.attn_norm, scratch.normed);
    auto qkv = timed(linear_s_, [&] { return L.qkv(scratch.normed); }).contiguous();  // [B, (H + 2K) D]
    TORCH_CHECK(qkv.size(1) == W * D, "DecodeStep: the qkv projection's width does not match the heads");
    float* qp = qkv.data_ptr<float>();
    const int64_t N = L.k_cache.size(2);
    const bool half = L.k_cache.dtype() == torch::kFloat16;
    over_rows(B, [&](int64_t b) {
      float* row = qp + b * W * D;
      if (L.q_norm) {  // Gemma 3: RMSNorm per head before RoPE
        const float* wq = L.q_norm->data_ptr<float>();
        const float* wk = L.k_norm->data_ptr<float>();
        for (int64_t h = 0; h < H + K; ++h)
          rms_row(row + h * D, h < H ? wq : wk, row + h * D, D, (float)eps_, (float)offset_);
      }
      for (int64_t h = 0; h < H + K; ++h) rope_row(row + h * D, in.cos + b * D, in.sin + b * D, D);
      // write this token's keys and values into the cache slot (an fp16 cache rounds them as torch's .half());
      // a prompt chunk's rows write distinct slots of one cache row
      for (int64_t g = 0; g < K; ++g) {
        const int64_t at = (((cache_row >= 0 ? cache_row : b) * K + g) * N + in.slot[b]) * D;
        const float* kr = qp + (b * W + H + g) * D;
        const float* vr = qp + (b * W + H + K + g) * D;
        if (half) {
          at::Half* kh = L.k_cache.data_ptr<at::Half>() + at;
          at::Half* vh = L.v_cache.data_ptr<at::Half>() + at;
          for (int64_t d = 0; d < D; ++d) {
            kh[d] = at::Half(kr[d]);
            vh[d] = at::Half(vr[d]);
          }
        } else {
          std::memcpy(L.k_cache.data_ptr<float>() + at, kr, D * sizeof(float));
          std::memcpy(L.v_cache.data_ptr<float>() + at, vr, D * sizeof(float));
        }
      }
    });
    // attention straight from the qkv buffer and the cache: q [B, H, 1, D] rows of qkv, keys [B, K, S, D]
    const int64_t S = in.mask.size(3);
    // one cache row for every query (a prompt chunk): its keys at row stride 0
    const int64_t row0 = cache_row >= 0 ? cache_row * K * N * D * L.k_cache.element_size() : 0;
    const int64_t rs = cache_row >= 0 ? 0 : K * N * D;
    const AttendArgs args{qp, W * D, D, 0, static_cast<const char*>(L.k_cache.data_ptr()) + row0, rs, N * D, D,
                          static_cast<const char*>(L.v_cache.data_ptr()) + row0, rs, N * D, D,
                          in.mask.data_ptr<bool>(), S, S, 1, scratch.attn.data_ptr<float>(),
                          B, H, 1, D, K, S, (float)scale_, half};
    timed(attention_s_, [&] {
      attend_core(args);
      return scratch.attn;
    });
    auto h = timed(linear_s_, [&] { return L.o(scratch.attn); });
    if (L.attn_post_norm) norm_rows(h, *L.attn_post_norm, h);
    add_rows(x, h);
    // --- MLP ---
    norm_rows(x, L.mlp_norm, scratch.normed);
    auto gu = timed(linear_s_, [&] { return L.gate_up(scratch.normed); }).contiguous();  // [B, 2F]
    const int64_t F = gu.size(1) / 2;
    // torch's own activation kernels, so the step rounds exactly as the modules do; per chunk of rows over the
    // cores (torch keeps a [16, 1536] op on one thread), each worker in the caller's inference mode (thread-local)
    auto act = torch::empty({B, F}, gu.options());
    const bool inference = c10::InferenceMode::is_enabled();
    over_row_chunks(B, [&](int64_t b, int64_t e) {
      c10::InferenceMode mode(inference);
      auto rows = gu.narrow(0, b, e - b);
      auto out = act.narrow(0, b, e - b);
      if (gelu_)
        at::gelu_out(out, rows.narrow(1, 0, F), "tanh");
      else
        at::silu_out(out, rows.narrow(1, 0, F));
      out.mul_(rows.narrow(1, F, F));
    });
    auto d = timed(linear_s_, [&] { return L.down(act); });
    if (L.mlp_post_norm) norm_rows(d, *L.mlp_post_norm, d);
    add_rows(x, d);
  }

  std::vector<NativeLayer> layers_;
  int64_t H_, K_, D_;
  double eps_, offset_, scale_;
  bool gelu_;
  bool python_calls_ = false;
  bool profiling_ = false;
  mutable double linear_s_ = 0.0, attention_s_ = 0.0;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", &isa, "the instruction-set tier these kernels were compiled for");
  m.def("linear_f32", &linear_f32, "small-batch fp32 linear (decode GEMV)");
  m.def("linear_half", &linear_half, "small-batch linear with fp16 or bf16 weights, fp32 arithmetic");
  m.def("linear_int8", &linear_int8, "small-batch linear with int8 per-channel weights");
  m.def("linear_int4", &linear_int4, "small-batch linear with 4-bit group weights in the x8 layout");
  m.def("linear_int8_x8", &linear_int8_x8, "small-batch Q8_0 linear (int8 activations) in the x8 layout");
  m.def("pack_int8_x8", &pack_int8_x8, "int8 codes and fp16 scales per 32 inputs (Q8_0) -> the x8 kernel layout");
  m.def("pack_int4_x8", &pack_int4_x8, "row-major packed 4-bit codes, scales, minimums -> the x8 kernel layout");
  m.def("linear_lut4", &linear_lut4, "small-batch linear with 4-bit table codes and block scales (MXFP4/NVFP4)");
  m.def("linear_ternary", &linear_ternary, "small-batch BitNet b1.58 linear: 2-bit ternary x int8 activations");
  m.def("linear_lut8", &linear_lut8, "small-batch linear with 8-bit table codes and row scales (FP8)");
  m.def("attend_decode", &attend_decode, "attention of a few query positions over the KV cache (decode)");
  m.def("rms_norm", &rms_norm, "RMSNorm of a few rows (decode)");
  m.def("greedy_rows", &greedy_rows, "greedy next token per row and its log-probability (decode sampling)");
  m.def("greedy_rows_biased", &greedy_rows_biased, "greedy_rows under a sparse logit_bias per row");
  m.def("fake_quant_int8_blocks", &fake_quant_int8_blocks, "activations rounded to int8 per 32 inputs (fp32)");
  m.def("fake_quant_fp8_rows", &fake_quant_fp8_rows, "activations rounded to FP8 per row (1 E4M3, 2 E5M2)");
  m.def("dequant_int8", &dequant_int8, "int8 per-channel weights -> fp32 (prefill)");
  m.def("dequant_int4", &dequant_int4, "packed 4-bit group weights -> fp32 (prefill)");
  m.def("linear_ggml", &linear_ggml, "small-batch linear with llama.cpp block weights (Q5_0, Q5_1, K-quants)",
        py::arg("x"), py::arg("blocks"), py::arg("type"), py::arg("act8") = false);
  m.def("round_act_ggml", [](torch::Tensor x, int64_t type) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && type >= 0 && type <= kQ6_K &&
                x.size(1) % kGgmlBlock[type] == 0, "round_act_ggml: [M, in] fp32, in a multiple of the type's block");
    return round_act_ggml(x.contiguous(), type);
  }, "activations rounded as llama.cpp rounds them for a GGML type (fp32)");
  m.def("dequant_ggml", &dequant_ggml, "llama.cpp block weights -> fp32 (prefill)");
  m.def("quantize_kquant", &quantize_kquant, "fp32 blocks of 256 -> llama.cpp's Q4_K / Q5_K / Q6_K bytes");
  m.def("dequant_ternary", &dequant_ternary, "2-bit ternary layout -> fp32 (prefill)");
  py::class_<NativeLinear>(m, "NativeLinear", py::module_local(), "one projection of the native decode step")
      .def(py::init([](int64_t kind, std::vector<torch::Tensor> t, int64_t group, bool act8, double tensor_scale,
                       int64_t act_fp8, int64_t out_features, py::object module) {
             TORCH_CHECK(kind >= kPython && kind <= kInt8x8, "NativeLinear: unknown kind ", kind);
             TORCH_CHECK(kind != kPython || !module.is_none(), "NativeLinear: a Python projection needs its module");
             TORCH_CHECK(act_fp8 >= 0 && act_fp8 <= 2, "NativeLinear: act_fp8 is 0, 1 (E4M3) or 2 (E5M2)");
             return NativeLinear{kind, std::move(t), group, act8, tensor_scale, act_fp8, out_features,
                                 std::move(module)};
           }),
           py::arg("kind"), py::arg("tensors"), py::arg("group") = 0, py::arg("act8") = false,
           py::arg("tensor_scale") = 1.0, py::arg("act_fp8") = 0, py::arg("out_features") = 0,
           py::arg("module") = py::none())
      .def("__call__", &NativeLinear::operator());
  py::class_<NativeLayer>(m, "NativeLayer", py::module_local(), "one decoder layer of the native decode step")
      .def(py::init([](NativeLinear qkv, NativeLinear o, NativeLinear gate_up, NativeLinear down,
                       torch::Tensor attn_norm, torch::Tensor mlp_norm, c10::optional<torch::Tensor> attn_post_norm,
                       c10::optional<torch::Tensor> mlp_post_norm, c10::optional<torch::Tensor> q_norm,
                       c10::optional<torch::Tensor> k_norm, torch::Tensor k_cache, torch::Tensor v_cache, bool local) {
        TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "NativeLayer: q_norm and k_norm come together");
        auto c = [](c10::optional<torch::Tensor> t) {
          return t ? c10::optional<torch::Tensor>(t->contiguous()) : c10::nullopt;
        };
        return NativeLayer{std::move(qkv), std::move(o), std::move(gate_up), std::move(down),
                           attn_norm.contiguous(), mlp_norm.contiguous(), c(attn_post_norm), c(mlp_post_norm),
                           c(q_norm), c(k_norm), k_cache, v_cache, local};
      }));
  py::class_<DecodeStep>(m, "DecodeStep", py::module_local(), "every decoder layer of a decode step in one native call")
      .def(py::init<std::vector<NativeLayer>, int64_t, int64_t, int64_t, double, double, double, bool>())
      .def("run", &DecodeStep::run, py::arg("x"), py::arg("cos_g"), py::arg("sin_g"), py::arg("mask_g"),
           py::arg("slots_g"), py::arg("cos_l"), py::arg("sin_l"), py::arg("mask_l"), py::arg("slots_l"),
           py::arg("cache_row") = -1)
      .def("set_profiling", &DecodeStep::set_profiling)
      .def("timings", &DecodeStep::timings, "(seconds in projections, seconds in attention) while profiling")
      .def("reset_timings", &DecodeStep::reset_timings);
}
