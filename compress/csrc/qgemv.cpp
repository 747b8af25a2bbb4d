// Matrix products on quantized weights for x86 CPUs with AVX2 + FMA.
//
// At decode time a linear layer multiplies a few activation rows by a large weight matrix, so its speed is the
// speed of streaming the weights from memory. Keeping the weights int8 (or packed int4) and widening them to float
// in registers reads 4x (8x) fewer bytes than a float32 matmul. Each output n is a dot product over K, so a weight
// row is read once per tile of activation rows (up to kMaxRows rows; the Python side decides where it pays).
// The loops run on ATen's OpenMP threads: the extension must be compiled with -fopenmp, else they run on one.
//
//   int8_gemv(x[M,K] f32, q[N,K] i8, scale[N] f32)                          -> y[M,N] = (x @ q.T) * scale
//   int4_gemv(x[M,K] f32, q[N,K/2] u8, scale[N,G] f32, offset[N,G] f32, gs) -> y[M,N] = x @ W.T
//
// With more activation rows (prefill, encoders, evaluation) the product is bound by arithmetic, and ATen's float
// GEMM does that best: int8_widen_into / int4_widen_into turn stored weight rows into float32 in one parallel pass,
// into a buffer the caller reuses (fresh memory would cost a page fault per 4 KiB written), which stays in the
// last-level cache for the GEMM that follows.
//
// int4: W[n,k] = q[n,k] * scale[n,g] + offset[n,g] with g = k / gs (asymmetric: offset is the group's minimum).
// Packing: each block of 16 consecutive k holds k0..k7 in the low nibbles of its 8 bytes and k8..k15 in the high
// nibbles, so one 8-byte load widens into two contiguous runs of 8 values. K and gs are multiples of 16, so a block
// never straddles two groups; the last group may be shorter than gs.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>

namespace {

constexpr int64_t kMaxRows = 64;

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

inline __m256 widen8_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Weight rows widened 16 columns at a time into two vectors of 8 floats.
struct Int8Rows {
  const int8_t* q;
  int64_t K;
  inline void load(int64_t n, int64_t k, __m256& w0, __m256& w1) const {
    w0 = widen8_i8(q + n * K + k);
    w1 = widen8_i8(q + n * K + k + 8);
  }
};

// Widen weight rows [n0, n1) into dst[(n - n0) * K + k], each row times row_scale[n] when given.
template <typename Rows>
inline void widen_rows(const Rows& rows, int64_t n0, int64_t n1, const float* row_scale, float* dst) {
  const int64_t K = rows.K;
  for (int64_t n = n0; n < n1; ++n) {
    const __m256 s = _mm256_set1_ps(row_scale ? row_scale[n] : 1.0f);
    float* d = dst + (n - n0) * K;
    for (int64_t k = 0; k < K; k += 16) {
      __m256 w0, w1;
      rows.load(n, k, w0, w1);
      _mm256_storeu_ps(d + k, _mm256_mul_ps(w0, s));
      _mm256_storeu_ps(d + k + 8, _mm256_mul_ps(w1, s));
    }
  }
}

struct Int4Rows {
  const uint8_t* q;
  const float* scale;
  const float* offset;
  int64_t K, G, gs;
  inline void load(int64_t n, int64_t k, __m256& w0, __m256& w1) const {
    const int64_t i = n * G + k / gs;
    const __m256 s = _mm256_broadcast_ss(scale + i), o = _mm256_broadcast_ss(offset + i);
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + n * (K / 2) + k / 2)));
    w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF))), s, o);
    w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), s, o);
  }
};

// One tile: MR activation rows x NR weight rows. MR * NR independent accumulators hide the FMA latency, and each
// widened weight vector serves all MR rows. Sizes keep accumulators + weights + inputs within 16 registers.
template <int MR, int NR, typename Rows>
inline void tile(const Rows& rows, const float* x, int64_t K, int64_t n, float out[4][4]) {
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m256 w0[NR], w1[NR];
    for (int j = 0; j < NR; ++j) rows.load(n + j, k, w0[j], w1[j]);
    for (int m = 0; m < MR; ++m) {
      const __m256 x0 = _mm256_loadu_ps(x + m * K + k), x1 = _mm256_loadu_ps(x + m * K + k + 8);
      for (int j = 0; j < NR; ++j) {
        acc[m][j] = _mm256_fmadd_ps(w0[j], x0, acc[m][j]);
        acc[m][j] = _mm256_fmadd_ps(w1[j], x1, acc[m][j]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) out[m][j] = hsum(acc[m][j]);
}

// Tiles of up to 4 activation rows: 1-2 rows x 4 weight rows, 3-4 rows x 2 weight rows; single rows at the edge.
template <typename Rows>
inline int run_tile(int mr, int n_left, const Rows& rows, const float* x, int64_t K, int64_t n, float out[4][4]) {
  const int want = mr <= 2 ? 4 : 2;
  if (n_left >= want) {
    switch (mr) {
      case 1: tile<1, 4>(rows, x, K, n, out); return 4;
      case 2: tile<2, 4>(rows, x, K, n, out); return 4;
      case 3: tile<3, 2>(rows, x, K, n, out); return 2;
      default: tile<4, 2>(rows, x, K, n, out); return 2;
    }
  }
  switch (mr) {
    case 1: tile<1, 1>(rows, x, K, n, out); return 1;
    case 2: tile<2, 1>(rows, x, K, n, out); return 1;
    case 3: tile<3, 1>(rows, x, K, n, out); return 1;
    default: tile<4, 1>(rows, x, K, n, out); return 1;
  }
}

template <typename Rows>
torch::Tensor gemv(const torch::Tensor& x, const Rows& rows, int64_t N, const float* out_scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous f32 [M,K]");
  TORCH_CHECK(x.size(0) <= kMaxRows, "at most ", kMaxRows, " activation rows");
  TORCH_CHECK(x.size(1) == rows.K && rows.K % 16 == 0, "x has ", x.size(1), " columns; weights have ", rows.K);
  const int64_t M = x.size(0), K = rows.K;
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 32, [&](int64_t n0, int64_t n1) {
    float out[4][4];
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int mr = static_cast<int>(std::min<int64_t>(4, M - m0));
      for (int64_t n = n0; n < n1;) {
        const int done = run_tile(mr, static_cast<int>(n1 - n), rows, xp + m0 * K, K, n, out);
        for (int m = 0; m < mr; ++m)
          for (int j = 0; j < done; ++j) yp[(m0 + m) * N + n + j] = out_scale ? out[m][j] * out_scale[n + j] : out[m][j];
        n += done;
      }
    }
  });
  return y;
}

// Widen weight rows [n0, n0 + out.size(0)) into out, a contiguous float tensor [rows, K] (rows split between threads).
template <typename Rows>
void widen_into(const Rows& rows, int64_t N, const float* row_scale, int64_t n0, torch::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.dim() == 2 && out.size(1) == rows.K,
              "out must be contiguous f32 [rows, ", rows.K, "]");
  TORCH_CHECK(n0 >= 0 && n0 + out.size(0) <= N, "rows [", n0, ", ", n0 + out.size(0), ") out of range for ", N);
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, out.size(0), 64, [&](int64_t r0, int64_t r1) {
    widen_rows(rows, n0 + r0, n0 + r1, row_scale, dst + r0 * rows.K);
  });
}

Int8Rows int8_rows(const torch::Tensor& q, const torch::Tensor& scale) {
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && q.dim() == 2 && q.is_contiguous(), "q must be contiguous int8 [N,K]");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == q.size(0),
              "scale must be contiguous f32 [N]");
  return Int8Rows{q.data_ptr<int8_t>(), q.size(1)};
}

Int4Rows int4_rows(const torch::Tensor& q, const torch::Tensor& scale, const torch::Tensor& offset, int64_t gs) {
  TORCH_CHECK(q.scalar_type() == torch::kUInt8 && q.dim() == 2 && q.is_contiguous(), "q must be contiguous u8 [N,K/2]");
  TORCH_CHECK(gs % 16 == 0, "group size must be a multiple of 16");
  TORCH_CHECK(scale.is_contiguous() && offset.is_contiguous() && scale.scalar_type() == torch::kFloat32 &&
                  offset.scalar_type() == torch::kFloat32 && scale.sizes() == offset.sizes() &&
                  scale.dim() == 2 && scale.size(0) == q.size(0) &&
                  scale.size(1) == (q.size(1) * 2 + gs - 1) / gs,
              "scale and offset must be contiguous f32 [N, ceil(K / group size)]");
  return Int4Rows{q.data_ptr<uint8_t>(), scale.data_ptr<float>(), offset.data_ptr<float>(), q.size(1) * 2,
                  scale.size(1), gs};
}

}  // namespace

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  return gemv(x, int8_rows(q, scale), q.size(0), scale.data_ptr<float>());
}

torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor offset, int64_t gs) {
  return gemv(x, int4_rows(q, scale, offset, gs), q.size(0), nullptr);
}

void int8_widen_into(torch::Tensor q, torch::Tensor scale, int64_t n0, torch::Tensor out) {
  widen_into(int8_rows(q, scale), q.size(0), scale.data_ptr<float>(), n0, out);
}

void int4_widen_into(torch::Tensor q, torch::Tensor scale, torch::Tensor offset, int64_t gs, int64_t n0,
                     torch::Tensor out) {
  widen_into(int4_rows(q, scale, offset, gs), q.size(0), nullptr, n0, out);
}

// How many threads ATen's parallel_for runs on inside this extension (for a test: 1 when built without OpenMP).
int64_t parallel_threads(int64_t n) {
  std::atomic<int64_t> most{0};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const int64_t t = at::get_thread_num() + 1;
    for (int64_t m = most.load(); t > m && !most.compare_exchange_weak(m, t);) {
    }
  });
  return most.load();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("parallel_threads", &parallel_threads, "threads used by a parallel_for over n items (a test hook)");
  m.def("int8_widen_into", &int8_widen_into, "rows [n0, n0+len(out)) of int8 weights times their scales, into out");
  m.def("int4_widen_into", &int4_widen_into, "rows [n0, n0+len(out)) of packed int4 weights as float32, into out");
  m.def("int8_gemv", &int8_gemv, "int8-weight matrix product for a few activation rows");
  m.def("int4_gemv", &int4_gemv, "packed int4-weight matrix product for a few activation rows");
}
