// The small operations of a decode step, each one op instead of the several ATen ops (and their dispatch) that
// PyTorch spends on them: at batch 1 a step of a small model runs each of these 30-60 times on a few hundred
// floats, so the fixed cost per op, not arithmetic, is what they cost. Plain loops that the compiler vectorizes, and
// AVX2 intrinsics where it cannot (e^x, dot products, the attention's weighted sums); the extension loads only on
// CPUs with AVX2 and FMA.
//
//   raypress::rms_norm(x[N,D], weight[D], eps)                 -> x / sqrt(mean(x^2) + eps) * weight
//   raypress::add_rms_norm_(h[N,D], delta[N,D], weight, eps)   h += delta (the residual), then -> rms_norm(h)
//   raypress::silu_mul(gu[N,2I])                               -> silu(gu[:, :I]) * gu[:, I:]
//   raypress::cache_write_(keys, values, k[N,KVH,D], v, blocks[N], offsets[N])
//       keys[blocks[t], :, offsets[t]] = k[t] (and values), for the packed tokens of a step; the cache is
//       [num_blocks, KVH, block_size, D]
//   raypress::rope_write_(qkv[N,(H+2KVH)*D], cos[N,D], sin[N,D], keys, values, blocks, offsets, H)
//       the rotary embedding (rotate-half: x * cos + rotate_half(x) * sin) of the q and k heads of a fused
//       projection's output, in place, then cache_write_ of its k and v heads
//   raypress::decode_attention(q[n,H,D], keys[B,KVH,BS,D], values, tables[n,T], lengths[n], scale, window)
//       -> [n,H,D]: query i attends over the first lengths[i] positions of its sequence, position j at row j % BS
//          of block tables[i][j / BS] (the last `window` positions when window > 0); the H query heads share KVH
//          key/value heads in groups (grouped-query attention). q's rows may be strided (the q heads of
//          rope_write_'s qkv); its heads must be contiguous.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"

namespace {

void check_f32(const torch::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.dim() == dim && t.is_contiguous(), name,
              " must be a contiguous float32 tensor of ", dim, " dimensions");
}

// Sixteen independent partial sums, so that the compiler vectorizes the loop (a single running sum is a chain it
// may not reorder).
inline float dot_product(const float* a, const float* b, int64_t n) {
  float part[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) part[j] += a[i + j] * b[i + j];
  float sum = 0.0f;
  for (; i < n; ++i) sum += a[i] * b[i];
  for (int j = 0; j < 16; ++j) sum += part[j];
  return sum;
}

}  // namespace

namespace {

void rms_norm_rows(const float* xp, const float* wp, int64_t N, int64_t D, double eps, float* yp) {
  for (int64_t n = 0; n < N; ++n) {
    const float* row = xp + n * D;
    const float sum = dot_product(row, row, D);
    const float inv = 1.0f / std::sqrt(sum / static_cast<float>(D) + static_cast<float>(eps));
    for (int64_t d = 0; d < D; ++d) yp[n * D + d] = wp[d] * (row[d] * inv);
  }
}

void check_norm_weight(const torch::Tensor& weight, int64_t D) {
  check_f32(weight, 1, "weight");
  TORCH_CHECK(weight.size(0) == D, "weight has ", weight.size(0), " values for rows of ", D);
}

// keys[blocks[t], :, offsets[t]] = k rows (and values), each token's KVH heads of D floats at k + t * stride.
void write_tokens(torch::Tensor& keys, torch::Tensor& values, const float* kp, const float* vp, int64_t stride,
                  int64_t N, const torch::Tensor& blocks, const torch::Tensor& offsets) {
  TORCH_CHECK(blocks.scalar_type() == torch::kInt64 && offsets.scalar_type() == torch::kInt64 &&
                  blocks.is_contiguous() && offsets.is_contiguous() && blocks.numel() == N && offsets.numel() == N,
              "blocks and offsets must be contiguous int64 with one entry per token");
  const int64_t KVH = keys.size(1), BS = keys.size(2), D = keys.size(3);
  const int64_t *bp = blocks.data_ptr<int64_t>(), *op = offsets.data_ptr<int64_t>();
  float *kc = keys.data_ptr<float>(), *vc = values.data_ptr<float>();
  for (int64_t t = 0; t < N; ++t) {
    TORCH_CHECK(bp[t] >= 0 && bp[t] < keys.size(0) && op[t] >= 0 && op[t] < BS, "block ", bp[t], " offset ", op[t],
                " outside the cache");
    for (int64_t h = 0; h < KVH; ++h) {
      const int64_t dst = ((bp[t] * KVH + h) * BS + op[t]) * D, src = t * stride + h * D;
      std::copy(kp + src, kp + src + D, kc + dst);
      std::copy(vp + src, vp + src + D, vc + dst);
    }
  }
}

}  // namespace

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_f32(x, 2, "x");
  check_norm_weight(weight, x.size(1));
  auto y = torch::empty_like(x);
  rms_norm_rows(x.data_ptr<float>(), weight.data_ptr<float>(), x.size(0), x.size(1), eps, y.data_ptr<float>());
  return y;
}

torch::Tensor add_rms_norm_(torch::Tensor h, const torch::Tensor& delta, const torch::Tensor& weight, double eps) {
  check_f32(h, 2, "h");
  check_f32(delta, 2, "delta");
  TORCH_CHECK(h.sizes() == delta.sizes(), "h and delta must have the same shape");
  check_norm_weight(weight, h.size(1));
  float* hp = h.data_ptr<float>();
  const float* dp = delta.data_ptr<float>();
  for (int64_t i = 0; i < h.numel(); ++i) hp[i] += dp[i];
  auto y = torch::empty_like(h);
  rms_norm_rows(hp, weight.data_ptr<float>(), h.size(0), h.size(1), eps, y.data_ptr<float>());
  return y;
}

void rope_write_(torch::Tensor qkv, const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor keys,
                 torch::Tensor values, const torch::Tensor& blocks, const torch::Tensor& offsets, int64_t heads) {
  check_f32(qkv, 2, "qkv");
  check_f32(cos, 2, "cos");
  check_f32(sin, 2, "sin");
  check_f32(keys, 4, "keys");
  check_f32(values, 4, "values");
  const int64_t N = qkv.size(0), KVH = keys.size(1), D = keys.size(3), half = D / 2, width = (heads + 2 * KVH) * D;
  TORCH_CHECK(keys.sizes() == values.sizes() && qkv.size(1) == width && D % 2 == 0,
              "qkv must be [tokens, (heads + 2 kv heads) * head_dim] for the cache [blocks, kv heads, block_size, ",
              "head_dim] (an even head_dim)");
  TORCH_CHECK(cos.size(0) == N && cos.size(1) == D && sin.sizes() == cos.sizes(),
              "cos and sin must be [tokens, head_dim]");
  float* xp = qkv.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    const float *c = cp + n * D, *s = sp + n * D;
    for (int64_t h = 0; h < heads + KVH; ++h) {  // the q heads, then the k heads
      float* v = xp + n * width + h * D;
      for (int64_t d = 0; d < half; ++d) {
        const float a = v[d], b = v[d + half];
        v[d] = a * c[d] - b * s[d];
        v[d + half] = b * c[d + half] + a * s[d + half];
      }
    }
  }
  write_tokens(keys, values, xp + heads * D, xp + (heads + KVH) * D, width, N, blocks, offsets);
}

namespace {

// e^x for 8 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to r^6 (relative error ~1.2e-7),
// 2^n from the exponent bits. Inputs are clamped to [-87, 88], where float32 results stay normal.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts: r stays exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

inline float hsum8(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  return _mm_cvtss_f32(_mm_add_ss(lo, _mm_movehdup_ps(lo)));
}

inline float dot8(const float* a, const float* b, int64_t D) {  // D % 8 == 0
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), acc1);
  }
  if (d < D) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
  return hsum8(_mm256_add_ps(acc0, acc1));
}

// Softmax of s[0..count) in place, as weights that sum to 1.
void softmax_(float* s, int64_t count) {
  float most = -INFINITY;
  for (int64_t j = 0; j < count; ++j) most = std::max(most, s[j]);
  const __m256 m = _mm256_set1_ps(most);
  __m256 total8 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
    _mm256_storeu_ps(s + j, e);
    total8 = _mm256_add_ps(total8, e);
  }
  float total = hsum8(total8);
  for (; j < count; ++j) total += (s[j] = std::exp(s[j] - most));
  const __m256 inv = _mm256_set1_ps(1.0f / total);
  for (j = 0; j + 8 <= count; j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), inv));
  for (; j < count; ++j) s[j] /= total;
}

}  // namespace

torch::Tensor silu_mul(const torch::Tensor& gu) {
  check_f32(gu, 2, "gu");
  TORCH_CHECK(gu.size(1) % 2 == 0, "gu must hold gate and up side by side (an even number of columns)");
  const int64_t N = gu.size(0), I = gu.size(1) / 2;
  auto y = torch::empty({N, I}, gu.options());
  const float* gp = gu.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t n = 0; n < N; ++n) {
    const float *g = gp + n * 2 * I, *u = g + I;
    float* out = yp + n * I;
    int64_t i = 0;
    for (; i + 8 <= I; i += 8) {  // silu(g) = g / (1 + e^-g)
      const __m256 gv = _mm256_loadu_ps(g + i);
      const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    for (; i < I; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
  return y;
}

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                               const torch::Tensor& tables, const torch::Tensor& lengths, double scale,
                               int64_t window) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2),
              "q must be float32 [n, heads, head_dim] with contiguous heads");
  check_f32(keys, 4, "keys");
  check_f32(values, 4, "values");
  TORCH_CHECK(lengths.scalar_type() == torch::kInt64 && lengths.dim() == 1 && lengths.is_contiguous(),
              "lengths must be a contiguous int64 vector");
  TORCH_CHECK(tables.scalar_type() == torch::kInt64 && tables.dim() == 2 && tables.is_contiguous(),
              "tables must be a contiguous int64 [n, blocks] matrix");
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t blocks = keys.size(0), KVH = keys.size(1), BS = keys.size(2), T = tables.size(1);
  TORCH_CHECK(keys.sizes() == values.sizes() && keys.size(3) == D && lengths.size(0) == n && tables.size(0) == n &&
                  KVH > 0 && H % KVH == 0,
              "keys/values [blocks, kv heads, block_size, head_dim] must match q [n, heads, head_dim]");
  TORCH_CHECK(D % 8 == 0, "head_dim ", D, " is not a multiple of 8");
  const int64_t *len = lengths.data_ptr<int64_t>(), *tp = tables.data_ptr<int64_t>();
  int64_t longest = 1;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(len[i] >= 1 && len[i] <= T * BS, "length ", len[i], " out of 1..", T * BS, " (the block table's)");
    for (int64_t t = 0; t < (len[i] + BS - 1) / BS; ++t)
      TORCH_CHECK(tp[i * T + t] >= 0 && tp[i * T + t] < blocks, "block ", tp[i * T + t], " outside the cache");
    longest = std::max(longest, len[i]);
  }
  auto out = torch::empty({n, H, D}, q.options());
  const int64_t q_stride = q.stride(0), group = H / KVH;
  const float *qp = q.data_ptr<float>(), *kp = keys.data_ptr<float>(), *vp = values.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // One work item per (sequence, kv head): each key and value row is read once for the query heads sharing it.
  // Threads only where there is work to share: waking them costs more than a few short prefixes.
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / (longest * D * group));
  at::parallel_for(0, n * KVH, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> scores(group * longest);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i = b / KVH, kvh = b % KVH;
      const int64_t end = len[i], start = window > 0 ? std::max<int64_t>(0, end - window) : 0, count = end - start;
      const int64_t* table = tp + i * T;
      const float* qh = qp + i * q_stride + kvh * group * D;  // the group's query heads, one after another
      // positions start..end-1 lie in runs of consecutive rows, one run per block: (first row, rows, score index)
      auto each_run = [&](auto&& fn) {
        for (int64_t j = start; j < end;) {
          const int64_t off = j % BS, rows = std::min(BS - off, end - j);
          fn((table[j / BS] * KVH + kvh) * BS + off, rows, j - start);
          j += rows;
        }
      };
      each_run([&](int64_t row, int64_t rows, int64_t at) {
        const float* k = kp + row * D;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t g = 0; g < group; ++g)
            scores[g * longest + at + r] = dot8(qh + g * D, k + r * D, D) * static_cast<float>(scale);
      });
      for (int64_t g = 0; g < group; ++g) {
        const float* p = scores.data() + g * longest;
        softmax_(scores.data() + g * longest, count);
        float* o = op + (i * H + kvh * group + g) * D;
        for (int64_t d0 = 0; d0 < D; d0 += 64) {  // o = sum of p[j] * v[j], 64 outputs at a time in registers
          const int w = static_cast<int>(std::min<int64_t>(64, D - d0)) / 8;
          __m256 acc[8];
          for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
          each_run([&](int64_t row, int64_t rows, int64_t at) {
            for (int64_t r = 0; r < rows; ++r) {
              const __m256 pj = _mm256_set1_ps(p[at + r]);
              const float* vr = vp + (row + r) * D + d0;
              for (int c = 0; c < w; ++c) acc[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr + 8 * c), acc[c]);
            }
          });
          for (int c = 0; c < w; ++c) _mm256_storeu_ps(o + d0 + 8 * c, acc[c]);
        }
      }
    }
  });
  return out;
}

void cache_write_(torch::Tensor keys, torch::Tensor values, const torch::Tensor& k, const torch::Tensor& v,
                  const torch::Tensor& blocks, const torch::Tensor& offsets) {
  check_f32(keys, 4, "keys");
  check_f32(values, 4, "values");
  check_f32(k, 3, "k");
  check_f32(v, 3, "v");
  TORCH_CHECK(keys.sizes() == values.sizes() && k.sizes() == v.sizes() && k.size(1) == keys.size(1) &&
                  k.size(2) == keys.size(3),
              "k/v [tokens, kv heads, head_dim] must match the cache [blocks, kv heads, block_size, head_dim]");
  write_tokens(keys, values, k.data_ptr<float>(), v.data_ptr<float>(), k.size(1) * k.size(2), k.size(0), blocks,
               offsets);
}

TORCH_LIBRARY_FRAGMENT(raypress, m) {
  m.def("cache_write_(Tensor(a!) keys, Tensor(b!) values, Tensor k, Tensor v, Tensor blocks, Tensor offsets) -> ()");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) h, Tensor delta, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gu) -> Tensor");
  m.def("rope_write_(Tensor(a!) qkv, Tensor cos, Tensor sin, Tensor(b!) keys, Tensor(c!) values, Tensor blocks, "
        "Tensor offsets, int heads) -> ()");
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor tables, Tensor lengths, float scale, "
        "int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(raypress, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm_", &add_rms_norm_);
  m.impl("silu_mul", &silu_mul);
  m.impl("rope_write_", &rope_write_);
  m.impl("decode_attention", &decode_attention);
  m.impl("cache_write_", &cache_write_);
}
