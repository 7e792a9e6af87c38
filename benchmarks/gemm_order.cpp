// An experiment (benchmarks/bench_gemm_order.py), not part of mnistlab: the stack's matrix
// products in one summation order,
//
//   out[b, r, j] = bias[b, j] + S_1 + S_2 + ...   (added left to right; no bias: S_1 + S_2 + ...)
//   S_q = a[b, r, k] * w[b, k, j] summed over the q-th block of KC depths by sequential fused
//         multiply-adds from zero, in depth order.
//
// the order MKL's AVX2 sgemm was found to use for the MLP's products at least 16 columns wide
// on AMD EPYC Zen 3 (its 10-column products use another), so a kernel of ours could replace it
// without changing a published bit. Two things were to make it faster than MKL:
// - Depths where every row of a register tile is zero are skipped: a skipped term is an exact
//   zero, and adding one changes no sum (+0 + -0 = +0; s + ±0 = s), so the bits stay. MNIST's
//   pixels are 81 % zeros, Fashion-MNIST's 50 %. A model whose weights hold an inf or NaN skips
//   nothing (0 × inf is NaN).
// - Work items are (model, block of rows): rows are independent dot products, so the cut changes
//   no bit, and five models keep two threads equally busy.
// A 6 × 16 register tile reads its rows in place and the weights as packed 16-column panels.
// Strides are in floats; out's and bias's columns are contiguous. Built with -ffp-contract=off.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t KC = 192;  // depths per block, as MKL's AVX2 kernel
constexpr int64_t MR = 6;    // rows per register tile
constexpr int64_t NR = 16;   // columns per register tile (two AVX registers)

struct Operands {
  const float* a;
  int64_t a_b, a_r, a_k;
  const float* w;
  int64_t w_b, w_k, w_j;
  const float* bias;
  int64_t bias_b;
  float* out;
  int64_t out_b, out_r;
  int64_t rows, depth, width;
};

// The order above, one output at a time (the reference, and where there is no AVX2).
void reference_item(const Operands& o, int64_t b, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t j = 0; j < o.width; ++j) {
      const float* a = o.a + b * o.a_b + r * o.a_r;
      const float* w = o.w + b * o.w_b + j * o.w_j;
      float c = 0.0f;
      for (int64_t k0 = 0; k0 < o.depth; k0 += KC) {
        float s = 0.0f;
        for (int64_t k = k0; k < std::min(k0 + KC, o.depth); ++k)
          s = std::fma(a[k * o.a_k], w[k * o.w_k], s);
        if (k0 > 0) c = c + s;
        else c = o.bias ? o.bias[b * o.bias_b + j] + s : s;
      }
      o.out[b * o.out_b + r * o.out_r + j] = c;
    }
}

#if defined(__AVX2__) && defined(__FMA__)
inline __m256i lane_mask(int64_t lanes) {  // the first `lanes` of 8 (clamped to 0..8)
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(std::clamp<int64_t>(lanes, 0, 8))), index);
}

// MR × NR outputs over the depths `ks` of one block: S in registers, then folded into out (the
// first block: bias + S, or S; later ones: out + S). row: the tile's rows (rows past `rows`
// repeat the last: computed, not stored); wp: the block's packed column panel, NR floats a depth.
template <bool UNIT>  // UNIT: a row's depths are contiguous (a_k == 1)
inline void tile(const float* const* rows_at, int64_t a_k, const float* wp, const int32_t* ks,
                 int64_t count, bool first, const float* bias, float* out, int64_t out_r,
                 int64_t rows, int64_t cols) {
  const float* row[MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) row[i] = rows_at[i];
  if (UNIT) a_k = 1;
  __m256 s[MR][2];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) s[i][0] = s[i][1] = _mm256_setzero_ps();
  for (int64_t q = 0; q < count; ++q) {
    const int64_t k = ks[q];
    const __m256 w0 = _mm256_loadu_ps(wp + k * NR), w1 = _mm256_loadu_ps(wp + k * NR + 8);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 x = _mm256_broadcast_ss(row[i] + k * a_k);
      s[i][0] = _mm256_fmadd_ps(x, w0, s[i][0]);
      s[i][1] = _mm256_fmadd_ps(x, w1, s[i][1]);
    }
  }
  const __m256i m0 = lane_mask(cols), m1 = lane_mask(cols - 8);
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {  // a fixed count keeps s in registers
    if (i >= rows) break;
    float* o = out + i * out_r;
    __m256 c0 = s[i][0], c1 = s[i][1];
    if (!first) {
      c0 = _mm256_add_ps(_mm256_maskload_ps(o, m0), c0);
      c1 = _mm256_add_ps(_mm256_maskload_ps(o + 8, m1), c1);
    } else if (bias != nullptr) {
      c0 = _mm256_add_ps(_mm256_maskload_ps(bias, m0), c0);
      c1 = _mm256_add_ps(_mm256_maskload_ps(bias + 8, m1), c1);
    }
    _mm256_maskstore_ps(o, m0, c0);
    _mm256_maskstore_ps(o + 8, m1, c1);
  }
}

// Column panel q of model b's w: NR floats a depth, zero past the last column. Returns whether
// every value is finite.
bool pack_w(const Operands& o, int64_t b, int64_t q, float* wp) {
  const int64_t j0 = q * NR, cols = std::min(NR, o.width - j0);
  const float* w = o.w + b * o.w_b + j0 * o.w_j;
  if (o.w_j == 1) {
    const __m256i m0 = lane_mask(cols), m1 = lane_mask(cols - 8);
    for (int64_t k = 0; k < o.depth; ++k, w += o.w_k) {
      _mm256_storeu_ps(wp + k * NR, _mm256_maskload_ps(w, m0));
      _mm256_storeu_ps(wp + k * NR + 8, _mm256_maskload_ps(w + 8, m1));
    }
  } else {
    for (int64_t k = 0; k < o.depth; ++k)
      for (int64_t j = 0; j < NR; ++j) wp[k * NR + j] = j < cols ? w[k * o.w_k + j * o.w_j] : 0.0f;
  }
  __m256 finite = _mm256_setzero_ps();  // x - x is 0 for finite x, NaN for inf and NaN
  for (int64_t e = 0; e < o.depth * NR; e += 8) {
    const __m256 x = _mm256_loadu_ps(wp + e);
    finite = _mm256_add_ps(finite, _mm256_sub_ps(x, x));
  }
  return _mm256_movemask_ps(_mm256_cmp_ps(finite, finite, _CMP_UNORD_Q)) == 0;
}

// The depths of [0, depths), counted from the tile's rows, where some row of the tile is not zero (NaN counts as not zero), in
// order; every depth where `all`.
int64_t live_depths(const float* const* row, int64_t rows, int64_t a_r, int64_t a_k, int64_t depths,
                    bool all, int32_t* ks) {
  int64_t count = 0;
  if (all) {
    for (int64_t k = 0; k < depths; ++k) ks[count++] = int32_t(k);
    return count;
  }
  const __m256 zero = _mm256_setzero_ps();
  int64_t k = 0;
  if (a_k == 1) {  // each row's depths contiguous: eight depths at a time
    for (; k + 8 <= depths; k += 8) {
      __m256 any = zero;
      for (int64_t i = 0; i < rows; ++i)
        any = _mm256_or_ps(any, _mm256_cmp_ps(_mm256_loadu_ps(row[i] + k), zero, _CMP_NEQ_UQ));
      for (uint32_t bits = uint32_t(_mm256_movemask_ps(any)); bits != 0; bits &= bits - 1)
        ks[count++] = int32_t(k + __builtin_ctz(bits));
    }
  } else if (a_r == 1) {  // the tile's rows contiguous at each depth
    const __m256i mask = lane_mask(rows);
    for (; k < depths; ++k)
      if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_maskload_ps(row[0] + k * a_k, mask), zero,
                                           _CMP_NEQ_UQ)) != 0)
        ks[count++] = int32_t(k);
  }
  for (; k < depths; ++k) {
    bool live = false;
    for (int64_t i = 0; i < rows; ++i) live |= !(row[i][k * a_k] == 0.0f);
    if (live) ks[count++] = int32_t(k);
  }
  return count;
}

// Rows [r0, r1) of model b: tile by tile, depth block by depth block, its live depths found
// once and used for every column panel.
void vector_item(const Operands& o, int64_t b, int64_t r0, int64_t r1, const float* panels,
                 bool finite) {
  const int64_t panel_size = o.depth * NR, per_model = (o.width + NR - 1) / NR;
  const float* bias = o.bias ? o.bias + b * o.bias_b : nullptr;
  int32_t ks[KC];
  for (int64_t r = r0; r < r1; r += MR) {
    const int64_t rows = std::min(MR, r1 - r);
    for (int64_t k0 = 0; k0 < o.depth; k0 += KC) {
      const int64_t k1 = std::min(k0 + KC, o.depth);
      const float* row[MR];
      for (int64_t i = 0; i < MR; ++i)
        row[i] = o.a + b * o.a_b + (r + std::min(i, rows - 1)) * o.a_r + k0 * o.a_k;
      const int64_t count = live_depths(row, rows, o.a_r, o.a_k, k1 - k0, !finite, ks);
      for (int64_t j0 = 0; j0 < o.width; j0 += NR)
        (o.a_k == 1 ? tile<true> : tile<false>)(row, o.a_k, panels + (b * per_model + j0 / NR) * panel_size + k0 * NR, ks, count,
             k0 == 0, bias ? bias + j0 : nullptr, o.out + b * o.out_b + r * o.out_r + j0,
             o.out_r, rows, o.width - j0);
    }
  }
}
#endif

}  // namespace

extern "C" {

// 1 where `gemm` runs on the vector unit (AVX2 and FMA); else it runs the reference loop.
int gemm_vectorised() {
#if defined(__AVX2__) && defined(__FMA__)
  return 1;
#else
  return 0;
#endif
}

// out (n, rows, width) = a (n, rows, depth) @ w (n, depth, width) [+ bias (n, 1, width)], in
// the order above. Items: each model's rows cut into `threads / gcd(n, threads)` blocks, so n
// models on `threads` threads give every thread the same work. reference != 0: the scalar loop.
void gemm(const float* a, int64_t a_b, int64_t a_r, int64_t a_k, const float* w, int64_t w_b,
          int64_t w_k, int64_t w_j, const float* bias, int64_t bias_b, float* out,
          int64_t out_b, int64_t out_r, int64_t n, int64_t rows, int64_t depth, int64_t width,
          int32_t threads, int32_t reference) {
  const Operands o{a, a_b, a_r, a_k, w, w_b, w_k, w_j, bias, bias_b, out, out_b, out_r,
                   rows, depth, width};
  const int32_t used = n * rows * depth * width >= (int64_t(1) << 18) ? threads : 1;
  const int64_t tiles_per_model = (rows + MR - 1) / MR;
  const int64_t blocks = std::min<int64_t>(used / std::gcd<int64_t>(n, used), tiles_per_model);
  const bool scalar = reference != 0 || !gemm_vectorised();
  const int64_t panels = (width + NR - 1) / NR;
  std::vector<float> packed(scalar ? 0 : n * panels * depth * NR);
  std::vector<char> finite(scalar ? 0 : n * panels);
  float* const panel_data = packed.data();
  char* const panel_finite = finite.data();
#pragma omp parallel num_threads(used)
  {
#if defined(__AVX2__) && defined(__FMA__)
    if (!scalar) {
#pragma omp for schedule(static)
      for (int64_t item = 0; item < n * panels; ++item)
        panel_finite[item] = pack_w(o, item / panels, item % panels, panel_data + item * depth * NR);
    }
#endif
#pragma omp for schedule(static)
    for (int64_t item = 0; item < n * blocks; ++item) {
      const int64_t b = item / blocks, part = item % blocks;
      const int64_t r0 = std::min(rows, tiles_per_model * part / blocks * MR);
      const int64_t r1 = std::min(rows, tiles_per_model * (part + 1) / blocks * MR);
#if defined(__AVX2__) && defined(__FMA__)
      if (!scalar) {
        const char* f = panel_finite + b * panels;
        vector_item(o, b, r0, r1, panel_data, std::all_of(f, f + panels, [](char c) { return c; }));
        continue;
      }
#endif
      reference_item(o, b, r0, r1);
    }
  }
}

}  // extern "C"
