// The fused CPU kernels of mnistlab's stacked training step (loaded by mnistlab/cpu_kernels.py).
//
// Plain C++ without PyTorch headers, so it compiles in a second or two at first use. Tensors
// arrive as raw float pointers to contiguous (N, rows, width) stacks; a nullptr switches a part
// off. Each kernel treats every model's slice on its own and cuts its work into items (a row,
// a block of columns, a block of a parameter row) whose arithmetic does not depend on which
// thread runs them or on how many models share the call: model k's bits are the same in any
// stack and at any thread count. Reductions along a row or column run in one fixed order
// (`fixed_sum`, or row after row). Built with -ffp-contract=off: a product and a sum stay two
// roundings unless std::fma says so, in vector loops and their scalar remainders alike.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int64_t LANES = 16;           // one AVX-512 register of floats
constexpr int64_t ADAM_BLOCK = 4096;    // parameters per Adam work item
constexpr uint64_t GOLDEN = 0x9e3779b97f4a7c15ULL;

// sum of f(j) for j < n in a fixed order: LANES strided partial sums, folded in halves.
template <class F>
inline float fixed_sum(int64_t n, F f) {
  float acc[LANES] = {};
  int64_t j = 0;
  for (; j + LANES <= n; j += LANES)
    for (int64_t l = 0; l < LANES; ++l) acc[l] += f(j + l);
  for (int64_t l = 0; j + l < n; ++l) acc[l] += f(j + l);
  for (int64_t w = LANES / 2; w > 0; w /= 2)
    for (int64_t l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// splitmix64's output function: a bijection of 64-bit words with full avalanche.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// The dropout stream of one model, step and hidden layer.
inline uint64_t stream_key(int64_t seed, int64_t step, int64_t layer) {
  return mix64(mix64(mix64(uint64_t(seed)) ^ uint64_t(step)) ^ uint64_t(layer));
}

// Element e's uniform draw in [0, 1): the top 24 bits of splitmix64's (e + 1)-th output.
inline float uniform(uint64_t key, int64_t e) {
  return float(mix64(key + uint64_t(e + 1) * GOLDEN) >> 40) * 0x1p-24f;
}

// A lerp as PyTorch's vectorised one: fma(w, end - start, start) for |w| < 0.5, else from end.
// Both ends are computed and one chosen by a mask, not a branch: a branch on w mispredicts half
// the time where w is a sampling weight (augmentation), which doubled the sampling's cost.
inline float lerp(float start, float end, float w) {
  const float span = end - start;
  const float from_start = std::fma(w, span, start), from_end = std::fma(w - 1.0f, span, end);
  uint32_t a, b;
  std::memcpy(&a, &from_start, 4);
  std::memcpy(&b, &from_end, 4);
  const uint32_t near_start = -uint32_t(std::fabs(w) < 0.5f);
  const uint32_t bits = (a & near_start) | (b & ~near_start);
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

#ifdef __AVX2__
// lerp (above) on eight lanes: the same two fmas and the same choice, so the same bits.
inline __m256 lerp8(__m256 start, __m256 end, __m256 w) {
  const __m256 span = _mm256_sub_ps(end, start);
  const __m256 from_start = _mm256_fmadd_ps(w, span, start);
  const __m256 from_end = _mm256_fmadd_ps(_mm256_sub_ps(w, _mm256_set1_ps(1.0f)), span, end);
  const __m256 magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), w);
  const __m256 near_start = _mm256_cmp_ps(magnitude, _mm256_set1_ps(0.5f), _CMP_LT_OQ);
  return _mm256_blendv_ps(from_end, from_start, near_start);
}

// affine_images' row, eight pixels at a time: the scalar loop's operations lane by lane (clamp
// as max then min, floor, the four reads gathered). Returns the columns done.
inline int64_t affine_row_avx2(const float* p, int32_t stride, const float* cx, const float* cy,
                               float rx, float ry, float last_x, float last_y, int64_t width,
                               float* o) {
  const __m256 zero = _mm256_setzero_ps(), hi_x = _mm256_set1_ps(last_x),
               hi_y = _mm256_set1_ps(last_y), add_x = _mm256_set1_ps(rx),
               add_y = _mm256_set1_ps(ry);
  const __m256i rows = _mm256_set1_epi32(stride), one = _mm256_set1_epi32(1);
  int64_t c = 0;
  for (; c + 8 <= width; c += 8) {
    const __m256 sx = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(_mm256_loadu_ps(cx + c), add_x),
                                                  zero), hi_x);
    const __m256 sy = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(_mm256_loadu_ps(cy + c), add_y),
                                                  zero), hi_y);
    const __m256 x0 = _mm256_floor_ps(sx), y0 = _mm256_floor_ps(sy);
    const __m256 fx = _mm256_sub_ps(sx, x0), fy = _mm256_sub_ps(sy, y0);
    const __m256i at = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_cvttps_epi32(y0), rows),
                                        _mm256_cvttps_epi32(x0));
    const __m256i below = _mm256_add_epi32(at, rows);
    const __m256 top = lerp8(_mm256_i32gather_ps(p, at, 4),
                             _mm256_i32gather_ps(p, _mm256_add_epi32(at, one), 4), fx);
    const __m256 bottom = lerp8(_mm256_i32gather_ps(p, below, 4),
                                _mm256_i32gather_ps(p, _mm256_add_epi32(below, one), 4), fx);
    _mm256_storeu_ps(o + c, lerp8(top, bottom, fy));
  }
  return c;
}
#endif

// Threads for `work` elements: one below PyTorch's grain size (at::internal::GRAIN_SIZE), as
// PyTorch's own elementwise kernels do, so small calls pay no fork and join.
int threads_for(int32_t threads, int64_t work) {
  return work >= 32768 && threads > 1 ? threads : 1;
}

struct AdamRow {
  bool on, cycled;  // cycled: one-cycle's rates, in TorchOps.cycled_adam's operations
  int64_t span;
  float wd, decay, w1, b2, c2, bc2, eps, step;  // per-row float constants
};

// Adam on elements [start, stop) of one row: PyTorch's fused kernel's operations, or with
// CYCLED those of TorchOps.cycled_adam (a lerp for v, and an fma for the update).
template <bool CYCLED>
void adam_block(const AdamRow& r, float* p, const float* g, float* m, float* v, int64_t start,
                int64_t stop) {
  for (int64_t j = start; j < stop; ++j) {
    const float gj = r.wd != 0.0f ? std::fma(p[j], r.wd, g[j]) : g[j];
    const float pj = p[j] * r.decay;
    const float mj = lerp(m[j], gj, r.w1);
    const float vj = CYCLED ? lerp(v[j], gj * gj, r.c2) : std::fma(r.c2 * gj, gj, v[j] * r.b2);
    m[j] = mj;
    v[j] = vj;
    const float denom = std::sqrt(vj) / r.bc2 + r.eps;
    p[j] = CYCLED ? std::fma(mj / denom, r.step, pj) : pj + (r.step * mj) / denom;
  }
}

}  // namespace

extern "C" {

// Adam for every row of the flat (N, row_size) tensors. hyper (N, 8) doubles per model: lr,
// beta1, beta2, eps, L2 weight decay, decoupled decay, span, kind (0: constant rates;
// 1: lr read from rates (N, steps, 2) at this step; 2: one-cycle, lr and beta1 read there).
// Kinds 0/1 follow torch._fused_adam_ / _fused_adamw_ (the AdamW L2 term added first as
// Tensor.add_(alpha) does); kind 2 follows mnistlab.backend.TorchOps.cycled_adam's operations.
// Where PyTorch's build fuses a product into a sum (its compiler contracts them), std::fma
// does so here: the same bits (checked by tests/test_cpu_kernels.py).
// Rows with frozen != 0 are left untouched. step: the step count after this step (float).
void adam(float* param, float* grad, float* exp_avg, float* exp_avg_sq, int64_t n,
          int64_t row_size, const double* hyper, const float* rates, int64_t steps,
          const float* frozen, const float* step, int32_t threads) {
  const double t = *step;
  const int64_t now = std::min<int64_t>(std::max<int64_t>(int64_t(t) - 1, 0), steps - 1);
  std::vector<AdamRow> rows(n);
  int64_t items = 0;
  std::vector<int64_t> first(n + 1);
  for (int64_t k = 0; k < n; ++k) {
    const double* h = hyper + k * 8;
    AdamRow& r = rows[k];
    const int kind = int(h[7]);
    const float* rate = rates + (k * steps + now) * 2;
    const double lr = kind == 0 ? h[0] : double(rate[0]);
    const double beta2 = h[2], decoupled = h[5];
    r.on = frozen[k] == 0.0f;
    r.span = int64_t(h[6]);
    r.cycled = kind == 2;
    r.wd = float(h[4]);
    r.eps = float(h[3]);
    r.b2 = float(beta2);
    r.c2 = float(1.0 - beta2);
    if (r.cycled) {  // float32 rates, bias corrections in float64
      const float lr_f = rate[0], beta1_f = rate[1];
      r.decay = 1.0f - lr_f * float(decoupled);
      r.w1 = 1.0f - beta1_f;
      r.bc2 = float(std::sqrt(1.0 - std::pow(beta2, t)));
      r.step = float(double(-lr_f) / (1.0 - std::pow(double(beta1_f), t)));
    } else {  // double scalars cast to float (decay is 1 where there is none)
      const double beta1 = h[1];
      r.decay = float(1.0 - lr * decoupled);
      r.w1 = float(1.0 - beta1);
      r.bc2 = float(std::sqrt(1.0 - std::pow(beta2, t)));
      r.step = float(-(lr / (1.0 - std::pow(beta1, t))));
    }
    first[k] = items;
    items += r.on ? (r.span + ADAM_BLOCK - 1) / ADAM_BLOCK : 0;
  }
  first[n] = items;
#pragma omp parallel for schedule(static) num_threads(threads_for(threads, items * ADAM_BLOCK))
  for (int64_t item = 0; item < items; ++item) {
    const int64_t k = std::upper_bound(first.begin(), first.end(), item) - first.begin() - 1;
    const AdamRow& r = rows[k];
    const int64_t start = (item - first[k]) * ADAM_BLOCK;
    const int64_t stop = std::min(start + ADAM_BLOCK, r.span);
    const int64_t at = k * row_size;
    (r.cycled ? adam_block<true> : adam_block<false>)(r, param + at, grad + at, exp_avg + at,
                                                      exp_avg_sq + at, start, stop);
  }
}

// A hidden layer after its matrix product, for x (N, rows, width): the activation (ReLU where
// relu, else x is the activation already), dropout where mask is given (mask gets the scales
// 0 or 1/(1-p_k)), LayerNorm for the models with norm_on[k] where weight is given (xhat and
// rstd get its statistics where given), into out. Dropout draws from a counter-based stream:
// model k keeps element e = row * width + column iff uniform(stream_key(seeds[k], step,
// layer), e) >= p[k], so its mask depends on nothing but its seed, the step and the layer.
void hidden_forward(const float* x, float* out, float* mask, float* xhat, float* rstd,
                    const float* weight, const float* bias, int64_t param_stride,
                    const int32_t* norm_on, const int64_t* seeds, const float* p,
                    const float* step, int64_t layer, int64_t n, int64_t rows, int64_t width,
                    int32_t relu, float eps, int32_t threads) {
  std::vector<uint64_t> keys(n);
  if (mask != nullptr)
    for (int64_t k = 0; k < n; ++k) keys[k] = stream_key(seeds[k], int64_t(*step), layer);
#pragma omp parallel for schedule(static) num_threads(threads_for(threads, n * rows * width))
  for (int64_t item = 0; item < n * rows; ++item) {
    const int64_t k = item / rows, r = item % rows, at = item * width;
    const float* xr = x + at;
    float* o = out + at;
    for (int64_t j = 0; j < width; ++j) o[j] = relu && xr[j] < 0.0f ? 0.0f : xr[j];
    if (mask != nullptr) {
      const float drop = p[k], scale = 1.0f / (1.0f - drop);
      const uint64_t key = keys[k];
      float* s = mask + at;
      for (int64_t j = 0; j < width; ++j) {
        s[j] = uniform(key, r * width + j) >= drop ? scale : 0.0f;
        o[j] = o[j] * s[j];
      }
    }
    if (weight == nullptr || norm_on[k] == 0) continue;
    const float mean = fixed_sum(width, [&](int64_t j) { return o[j]; }) / float(width);
    const float var = fixed_sum(width, [&](int64_t j) {
      const float c = o[j] - mean;
      return c * c;
    }) / float(width);
    const float rs = 1.0f / std::sqrt(var + eps);
    const float* w = weight + k * param_stride;
    const float* b = bias + k * param_stride;
    float* xh = xhat != nullptr ? xhat + at : nullptr;
    for (int64_t j = 0; j < width; ++j) {
      const float h = (o[j] - mean) * rs;
      if (xh != nullptr) xh[j] = h;
      o[j] = b[j] + h * w[j];
    }
    if (rstd != nullptr) rstd[item] = rs;
  }
}

// The gradient through a hidden layer: d (N, rows, width) at its output → out at its
// pre-activation (or its activation where gate is nullptr). Through LayerNorm for the models
// with norm_on[k] (weight given), the dropout scales (mask given) and ReLU's gate z > 0 (gate
// given). LayerNorm's weight and bias gradients (column sums over the rows, each column in
// row order) go to grad_w/grad_b, rows of the flat gradient (exact zeros for models without
// it). The bias gradient is left to PyTorch's sum, whose bits the PyTorch backend has.
void hidden_backward(const float* d, float* out, const float* xhat, const float* rstd,
                     const float* weight, int64_t weight_stride, const int32_t* norm_on,
                     float* grad_w, float* grad_b, int64_t grad_stride, const float* mask,
                     const float* gate, int64_t n, int64_t rows, int64_t width,
                     int32_t threads) {
  const int64_t blocks = (width + LANES - 1) / LANES;
#pragma omp parallel num_threads(threads_for(threads, n * rows * width))
  {
#pragma omp for schedule(static)
    for (int64_t item = 0; item < n * rows; ++item) {
      const int64_t k = item / rows, at = item * width;
      const float* g = d + at;
      float* o = out + at;
      if (weight != nullptr && norm_on[k] != 0) {
        const float* w = weight + k * weight_stride;
        const float* xh = xhat + at;
        for (int64_t j = 0; j < width; ++j) o[j] = g[j] * w[j];
        const float mean_g = fixed_sum(width, [&](int64_t j) { return o[j]; }) / float(width);
        const float mean_gx =
            fixed_sum(width, [&](int64_t j) { return o[j] * xh[j]; }) / float(width);
        const float rs = rstd[item];
        for (int64_t j = 0; j < width; ++j) o[j] = rs * (o[j] - mean_g - xh[j] * mean_gx);
      } else {
        for (int64_t j = 0; j < width; ++j) o[j] = g[j];
      }
      if (mask != nullptr)
        for (int64_t j = 0; j < width; ++j) o[j] = o[j] * mask[at + j];
      if (gate != nullptr)
        for (int64_t j = 0; j < width; ++j) o[j] = gate[at + j] > 0.0f ? o[j] : 0.0f;
    }
    if (weight != nullptr) {
#pragma omp for schedule(static)
      for (int64_t item = 0; item < n * blocks; ++item) {
        const int64_t k = item / blocks, j0 = item % blocks * LANES;
        const int64_t cols = std::min(LANES, width - j0);
        double sw[LANES] = {}, sb[LANES] = {};  // rounded once, at the end
        for (int64_t r = 0; norm_on[k] != 0 && r < rows; ++r) {
          const int64_t at = (k * rows + r) * width + j0;
          for (int64_t l = 0; l < cols; ++l) {
            sw[l] += double(d[at + l]) * double(xhat[at + l]);
            sb[l] += double(d[at + l]);
          }
        }
        for (int64_t l = 0; l < cols; ++l) {
          grad_w[k * grad_stride + j0 + l] = float(sw[l]);
          grad_b[k * grad_stride + j0 + l] = float(sb[l]);
        }
      }
    }
  }
}

// The rest of the loss after PyTorch's log_softmax and exp (whose bits the PyTorch backend
// has) for logits (N, batch, classes): grad, holding exp(log p) on entry, becomes d(sum of
// per-model mean cross-entropies)/d logits, with model k's label smoothing where smoothing is
// given, as mnistlab.backend.cross_entropy computes it; and the step's books: the plain mean
// loss added to loss_sum and kept in last_loss, the accuracy added to acc_sum, a NaN/inf loss
// marking frozen and, the first time, diverged_at = this step (step: the steps completed
// before it).
void cross_entropy_step(const float* logits, const float* logp, float* grad,
                        const int64_t* labels, int64_t label_stride, float* loss_sum,
                        float* acc_sum, float* last_loss, float* frozen, int64_t* diverged_at,
                        const float* step, const float* smoothing, int64_t n, int64_t batch,
                        int64_t classes) {
  const float inv_batch = float(1.0 / double(batch));
  const float off = float(-1.0 / double(classes)), on = float(1.0 - 1.0 / double(classes));
  for (int64_t k = 0; k < n; ++k) {
    double total = 0.0;
    int64_t correct = 0;
    const float spread = smoothing != nullptr ? smoothing[k] / float(batch) : 0.0f;
    for (int64_t r = 0; r < batch; ++r) {
      const int64_t at = (k * batch + r) * classes, y = labels[k * label_stride + r];
      const float* x = logits + at;
      float* g = grad + at;
      int64_t best = 0;  // the first maximum, NaN above all, as torch.argmax has it
      for (int64_t c = 1; c < classes && !std::isnan(x[best]); ++c)
        if (std::isnan(x[c]) || x[c] > x[best]) best = c;
      for (int64_t c = 0; c < classes; ++c) {
        g[c] = (c == y ? g[c] - 1.0f : g[c]) * inv_batch;
        if (smoothing != nullptr) g[c] = g[c] + (c == y ? on : off) * spread;
      }
      total += double(logp[at + y]);
      correct += best == y;
    }
    const float loss = float(-total / double(batch));
    const bool bad = !std::isfinite(loss);
    if (bad && frozen[k] == 0.0f) diverged_at[k] = int64_t(*step + 1.0f);
    frozen[k] = std::max(frozen[k], bad ? 1.0f : 0.0f);
    loss_sum[k] += loss;
    acc_sum[k] += float(correct) / float(batch);
    last_loss[k] = loss;
  }
}

// One step's augmented images (mnistlab.engine.augment.Augmenter.apply), for x (images,
// height * width): each output pixel (r, c) of image i is sampled bilinearly from the image
// padded by `fill` (one pixel before, two after each axis) at the source point
// (col_x[i, c] + row_x[i, r], col_y[i, c] + row_y[i, r]), clamped to the padding. The map's
// column and row terms come from PyTorch; here are the sums, floors, four reads and three
// lerps that PyTorch does as ~20 whole-batch operators, in the same roundings: the same bits.
void affine_images(const float* x, float* out, const float* col_x, const float* row_x,
                   const float* col_y, const float* row_y, int64_t images, int64_t height,
                   int64_t width, float fill, int32_t threads) {
  const int64_t pixels = height * width;
#pragma omp parallel num_threads(threads_for(threads, images * pixels))
  {
    // The image inside its fill border, so that the four reads need no bounds checks; 32-bit
    // offsets and thread-local bounds let the compiler vectorise the row (AVX2 gathers).
    const int32_t stride = int32_t(width) + 3;
    const float last_x = float(width + 1), last_y = float(height + 1);
    std::vector<float> padded((height + 3) * stride, fill);
    const float* p = padded.data();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < images; ++i) {
      for (int64_t r = 0; r < height; ++r)
        std::copy(x + i * pixels + r * width, x + i * pixels + (r + 1) * width,
                  padded.data() + (r + 1) * stride + 1);
      const float* cx = col_x + i * width;
      const float* cy = col_y + i * width;
      for (int64_t r = 0; r < height; ++r) {
        float* o = out + i * pixels + r * width;
        const float rx = row_x[i * height + r], ry = row_y[i * height + r];
        int64_t c = 0;
#ifdef __AVX2__
        c = affine_row_avx2(p, stride, cx, cy, rx, ry, last_x, last_y, width, o);
#endif
        for (; c < width; ++c) {
          const float sx = std::min(std::max(cx[c] + rx, 0.0f), last_x);
          const float sy = std::min(std::max(cy[c] + ry, 0.0f), last_y);
          const float x0 = std::floor(sx), y0 = std::floor(sy), fx = sx - x0, fy = sy - y0;
          const int32_t at = int32_t(y0) * stride + int32_t(x0);
          const float top = lerp(p[at], p[at + 1], fx);
          const float bottom = lerp(p[at + stride], p[at + stride + 1], fx);
          o[c] = lerp(top, bottom, fy);
        }
      }
    }
  }
}

}  // extern "C"
