// Matrix products for decode on x86 CPUs, as torch ops (namespace `raypress`), for AVX2 + FMA and for AVX-512.
//
// At decode a linear layer multiplies a few activation rows by a large weight matrix, so its speed is the speed of
// streaming the weights from memory. Keeping the weights int8 (or packed int4) and widening them in registers reads
// 4x (8x) fewer bytes than a float32 product. int8 weights multiply the activation rows quantized to 15 bits in
// int16 lanes; packed int4 ones multiply activations quantized to int8 per block of 32, as llama.cpp's Q4 x Q8_0
// (gemv_body.h says why and at what cost). The float32 product itself streams better here than ATen's
// GEMV for up to 8 rows. The loops run on ATen's OpenMP threads (the extension is built with -fopenmp).
//
//   raypress::f32_gemv(x[M,K] f32, w[N,K] f32)                                   -> y[M,N] = x @ w.T
//   raypress::int8_gemv(x[M,K] f32, q[N,K] i8, scale[N] f32)                     -> y[M,N] = (x @ q.T) * scale
//   raypress::int8_dynamic_gemv(x, q, scale)                                   -> int8_gemv on x rounded to int8 per row
//   raypress::int4_gemv(x[M,K] f32, q[N,K/2] u8, scale[N,G], offset[N,G], gs)    -> y[M,N] = x @ W.T
//                                                                   (offset empty: the symmetric grid, -8 * scale)
//   raypress::int4_widen_into(q, scale, offset, gs, n0, out)                    weight rows as float32, into out
//
// The products take a list of weight matrices (with their scales and offsets) that share x, and return their
// outputs side by side, y[M, N1 + N2 + ...]: a layer's q, k and v projections (or gate and up) run as one op, with
// one pass over x and one wake-up of the threads, while each matrix stays the tensor it is in the model.
//
// With many activation rows (prefill, encoders, evaluation) the product is bound by arithmetic. The int8 products
// then run as a tiled GEMM on the same int16 arithmetic (gemm_body.h), up to 1.6x float32's rate on AVX2; for
// int4, ATen's float GEMM does best, on weights the Python side widens with int4_widen_into into a reused buffer.
//
// int4: W[n,k] = q[n,k] * scale[n,g] + offset[n,g] with g = k / gs (asymmetric: offset is the group's minimum).
// Packing: each block of 16 consecutive k holds k0..k7 in the low nibbles of its 8 bytes and k8..k15 in the high
// nibbles. K and gs are multiples of 16, so a block never straddles two groups; the last group may be shorter.
//
// One build holds both instruction sets (gemv_body.h compiled twice, the AVX-512 copy under a target pragma); the
// one used is chosen at the first call from cpuid, never AVX-512 on a CPU without it. RAYPRESS_ISA=avx2 forces the
// AVX2 path, and raypress::use_isa switches it at run time (for tests and benchmarks).
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops.h"

// One weight matrix of a product, as plain pointers (both instruction sets' kernels take these).
struct F32Mat {
  const float* w;
  int64_t N, K;
};
struct Int8Mat {
  const int8_t* q;
  const float* scale;
  int64_t N, K;
};
struct Int4Mat {
  const uint8_t* q;
  const float* scale;
  const float* offset;
  int64_t N, K, G, gs;
};

// 64 activations of one row quantized to int8 in two blocks of 32, each with its own scale (as llama.cpp's Q8_0),
// laid out for the int4 kernel (gemv_body.h, row_tile_int4_q8): lo[i] and hi[i] are the activations of the weights
// in the low and the high nibble of the chunk's byte i; xs holds block 0's scale in lanes 0-3 and block 1's in
// lanes 4-7, corr 8 times each block's sum of int8 values in lanes 0 and 4 (the symmetric grid's zero point).
struct alignas(32) QChunk {
  int8_t lo[32], hi[32];
  float xs[8];
  int32_t corr[8];
};

namespace avx2 {
#define RAYPRESS_WIDE 0
struct Vec {
  using F = __m256;
  static constexpr int W = 8;
  static constexpr int kMaxRows = 4;  // 16 ymm registers: 4 rows x 2 accumulators + totals + weights
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(F v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
  }
  static void widen_u4(const uint8_t* p, F* out) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    out[0] = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF)));
    out[1] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
  }
};
#include "gemv_body.h"
#include "gemm_body.h"
#undef RAYPRESS_WIDE
}  // namespace avx2

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
namespace avx512 {
#define RAYPRESS_WIDE 1
struct Vec {
  using F = __m512;
  static constexpr int W = 16;
  static constexpr int kMaxRows = 8;  // 32 zmm registers
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(F v) { return _mm512_reduce_add_ps(v); }
  static void widen_u4(const uint8_t* p, F* out) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), mask = _mm_set1_epi8(0xF);
    const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    out[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi64(lo, hi)));
  }
};
#include "gemv_body.h"
#include "gemm_body.h"
#undef RAYPRESS_WIDE
}  // namespace avx512
#pragma GCC pop_options

namespace {

enum class Isa { kAvx2, kAvx512 };

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

Isa resolve(const std::string& want) {
  if (want == "avx2") return Isa::kAvx2;
  TORCH_CHECK(want == "avx512" || want.empty(), "unknown instruction set '", want, "': expected avx2 or avx512");
  if (cpu_has_avx512()) return Isa::kAvx512;
  TORCH_CHECK(want.empty(), "this CPU has no AVX-512");
  return Isa::kAvx2;
}

std::atomic<Isa>& current_isa() {
  static std::atomic<Isa> isa{[] {
    const char* env = std::getenv("RAYPRESS_ISA");
    return resolve(env ? std::string(env) : std::string());
  }()};
  return isa;
}

const char* isa_name(Isa isa) { return isa == Isa::kAvx512 ? "avx512" : "avx2"; }

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous f32 [M,K]");
  TORCH_CHECK(x.size(1) == K && K % 16 == 0, "x has ", x.size(1), " columns; weights have ", K,
              " (a multiple of 16)");
}

void check_int8(const torch::Tensor& q, const torch::Tensor& scale) {
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && q.dim() == 2 && q.is_contiguous(), "q must be contiguous int8 [N,K]");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == q.size(0),
              "scale must be contiguous f32 [N]");
}

// offset undefined: the symmetric grid, whose offsets the int8-block kernel does not read.
void check_int4(const torch::Tensor& q, const torch::Tensor& scale, const torch::Tensor& offset, int64_t gs) {
  TORCH_CHECK(q.scalar_type() == torch::kUInt8 && q.dim() == 2 && q.is_contiguous(), "q must be contiguous u8 [N,K/2]");
  TORCH_CHECK(gs > 0 && gs % 16 == 0, "group size must be a multiple of 16");
  TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == torch::kFloat32 && scale.dim() == 2 &&
                  scale.size(0) == q.size(0) && scale.size(1) == (q.size(1) * 2 + gs - 1) / gs &&
                  (!offset.defined() || (offset.is_contiguous() && offset.scalar_type() == torch::kFloat32 &&
                                         offset.sizes() == scale.sizes())),
              "scale and offset must be contiguous f32 [N, ceil(K / group size)]");
}

// Calls fn(args...) in the namespace of the instruction set in use.
#define RAYPRESS_DISPATCH(fn, ...) \
  (current_isa().load() == Isa::kAvx512 ? avx512::fn(__VA_ARGS__) : avx2::fn(__VA_ARGS__))

// The activations as the integer path takes them: each row quantized to int16 with its own scale, and for int4
// the float sums of each group (for the offsets). Plain loops: a few ATen ops here would cost more than the product.
struct IntActivations {
  std::vector<int16_t> xq;
  std::vector<float> sx, xsum;
};

// The largest of the 8 lanes of v.
float lane_max(__m256 v) {
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  return _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
}

// Row m of x [M, K] to int16 with the scale that maps its largest magnitude to qmax: xq = nearbyint(x / scale),
// rounding half to even like kernels.quantize_per_token (x / s), in vectors of 8 (K % 16 == 0).
float quantize_row(const float* row, int64_t K, float qmax, int16_t* xq) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 most = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) most = _mm256_max_ps(most, _mm256_andnot_ps(sign, _mm256_loadu_ps(row + k)));
  const float largest = lane_max(most);
  const float scale = largest > 0.0f ? largest / qmax : 1.0f;
  const __m256 s = _mm256_set1_ps(scale);
  for (int64_t k = 0; k < K; k += 16) {  // cvtps rounds to nearest even (the default rounding mode)
    const __m256i a = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(row + k), s));
    const __m256i b = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(row + k + 8), s));
    // packs works within 128-bit halves: (a0-3 b0-3 a4-7 b4-7) -> reorder the 64-bit quarters to a0-7 b0-7
    const __m256i ab = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + k), ab);
  }
  return scale;
}

// The float sums of each group of gs activations of a row (for int4's offsets), into out[ceil(K / gs)].
void group_sums(const float* row, int64_t K, int64_t gs, float* out) {
  for (int64_t g = 0; gs > 0 && g * gs < K; ++g) {
    float sum = 0.0f;
    for (int64_t k = g * gs; k < std::min(K, (g + 1) * gs); ++k) sum += row[k];
    out[g] = sum;
  }
}

IntActivations quantize_rows(const torch::Tensor& x, int64_t gs, float qmax = 32767.0f) {
  const int64_t M = x.size(0), K = x.size(1), G = gs ? (K + gs - 1) / gs : 0;
  const float* xp = x.data_ptr<float>();
  IntActivations a{std::vector<int16_t>(M * K), std::vector<float>(M), std::vector<float>(M * G)};
  // rows split between threads once there are enough of them to pay for the wake-up (prefill)
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = xp + m * K;
      int16_t* xq = a.xq.data() + m * K;
      a.sx[m] = quantize_row(row, K, qmax, xq);
      group_sums(row, K, gs, a.xsum.data() + m * G);
    }
  });
  return a;
}

// The activations of the int4 kernel on int8 blocks: each row as ceil(K / 64) QChunks (zeros past K), and, where
// the grid has offsets to apply (with_sums), each group's sum of the activations as rounded (block scale x int8
// values). With the rounded sums the offsets see the same activations as the 4-bit values do, so the error is the
// weights times the activations' rounding (as llama.cpp's Q4_1 x Q8_1); with the exact sums it grew with the
// offsets, 3x the weights' own rounding error on a test with an outlier channel.
struct BlockActivations {
  std::vector<QChunk> chunks;
  std::vector<float> xsum;
  int64_t per_row;
};

BlockActivations quantize_blocks8(const torch::Tensor& x, int64_t gs, bool with_sums) {
  const int64_t M = x.size(0), K = x.size(1), G = (K + gs - 1) / gs, C = (K + 63) / 64;
  const float* xp = x.data_ptr<float>();
  BlockActivations a{std::vector<QChunk>(M * C), std::vector<float>(with_sums ? M * G : 0), C};
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = xp + m * K;
      for (int64_t c = 0; c < C; ++c) {
        QChunk& q = a.chunks[m * C + c];
        for (int h = 0; h < 2; ++h) {
          const int64_t k0 = 64 * c + 32 * h, n = std::clamp<int64_t>(K - k0, 0, 32);
          alignas(32) float v[32] = {};
          std::memcpy(v, row + std::min(k0, K), n * sizeof(float));
          const __m256 sign = _mm256_set1_ps(-0.0f);
          __m256 most = _mm256_setzero_ps();
          for (int i = 0; i < 32; i += 8) most = _mm256_max_ps(most, _mm256_andnot_ps(sign, _mm256_load_ps(v + i)));
          const float scale = lane_max(most) / 127.0f;
          alignas(32) int32_t r[32] = {};
          if (scale > 0.0f)  // rounded half to even, x / scale, as quantize_row
            for (int i = 0; i < 32; i += 8)
              _mm256_store_si256(reinterpret_cast<__m256i*>(r + i),
                                 _mm256_cvtps_epi32(_mm256_div_ps(_mm256_load_ps(v + i), _mm256_set1_ps(scale))));
          int32_t sum = 0;
          for (int i = 0; i < 32; ++i) {  // weight i of the block: nibble (i % 16 >= 8) of byte 16h + i / 16 * 8 + i % 8
            const int b = 16 * h + i / 16 * 8 + i % 8;
            (i % 16 < 8 ? q.lo : q.hi)[b] = static_cast<int8_t>(r[i]);
            sum += r[i];
          }
          for (int l = 0; l < 4; ++l) q.xs[4 * h + l] = scale, q.corr[4 * h + l] = l == 0 ? 8 * sum : 0;
          if (with_sums && n > 0) a.xsum[m * G + k0 / gs] += scale * static_cast<float>(sum);
        }
      }
    }
  });
  return a;
}

}  // namespace

namespace {

void check_f32_matrix(const torch::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.dim() == 2 && w.is_contiguous(), "w must be contiguous f32 [N,K]");
}

template <typename Mat>
torch::Tensor output(const torch::Tensor& x, const std::vector<Mat>& mats) {
  int64_t N = 0;
  for (const auto& m : mats) N += m.N;
  return torch::empty({x.size(0), N}, x.options());
}

std::vector<Int8Mat> int8_mats(const torch::Tensor& x, at::TensorList q, at::TensorList scale) {
  TORCH_CHECK(!q.empty() && q.size() == scale.size(), "give one scale per weight matrix (and at least one matrix)");
  std::vector<Int8Mat> mats;
  for (size_t i = 0; i < q.size(); ++i) {
    check_int8(q[i], scale[i]);
    check_x(x, q[i].size(1));
    mats.push_back({q[i].data_ptr<int8_t>(), scale[i].data_ptr<float>(), q[i].size(0), q[i].size(1)});
  }
  return mats;
}

// From this many activation rows on, the int8 products run as the tiled GEMM (gemm_body.h) rather than the GEMV.
// Measured with a model's worth of SmolLM2's layers streamed from memory, 2 cores of a Zen 3 EPYC: the GEMM ran at
// 0.89x the GEMV's speed at 8 rows, 1.04x at 12, 1.5x at 48 and 1.7x at 128 (the GEMV's single prefetched weight
// stream reads memory best when there is little arithmetic per weight).
constexpr int64_t kGemmMinRows = 12;

std::atomic<int64_t>& gemm_min_rows() {
  static std::atomic<int64_t> rows{kGemmMinRows};
  return rows;
}

torch::Tensor int8_product(const torch::Tensor& x, at::TensorList q, at::TensorList scale, float qmax) {
  const auto mats = int8_mats(x, q, scale);
  const auto a = quantize_rows(x, 0, qmax);
  auto y = output(x, mats);
  if (x.size(0) >= gemm_min_rows().load())
    RAYPRESS_DISPATCH(int8_gemm, mats, a.xq.data(), a.sx.data(), x.size(0), y.data_ptr<float>());
  else
    RAYPRESS_DISPATCH(int8_gemv, mats, a.xq.data(), a.sx.data(), x.size(0), y.data_ptr<float>());
  return y;
}

}  // namespace

torch::Tensor f32_gemv(const torch::Tensor& x, at::TensorList w) {
  TORCH_CHECK(!w.empty(), "give at least one weight matrix");
  std::vector<F32Mat> mats;
  for (const auto& m : w) {
    check_f32_matrix(m);
    check_x(x, m.size(1));
    mats.push_back({m.data_ptr<float>(), m.size(0), m.size(1)});
  }
  auto y = output(x, mats);
  RAYPRESS_DISPATCH(f32_gemv, mats, x.data_ptr<float>(), x.size(0), y.data_ptr<float>());
  return y;
}

torch::Tensor int8_gemv(const torch::Tensor& x, at::TensorList q, at::TensorList scale) {
  return int8_product(x, q, scale, 32767.0f);
}

// int8-dynamic's product: the same loop with the activations rounded to 8 bits per row (W8A8: exactly the
// per-token int8 arithmetic of that format, held in int16 lanes).
torch::Tensor int8_dynamic_gemv(const torch::Tensor& x, at::TensorList q, at::TensorList scale) {
  return int8_product(x, q, scale, 127.0f);
}

// An empty offset tensor stands for the symmetric grid (offset = -8 * scale; kernels.int4_kernel_offset): the
// int8-block kernel then never reads offsets. Groups of 32 or of whole 64-weight chunks take that kernel, other
// group sizes the int16 one.
torch::Tensor int4_gemv(const torch::Tensor& x, at::TensorList q, at::TensorList scale, at::TensorList offset,
                        int64_t gs) {
  TORCH_CHECK(!q.empty() && q.size() == scale.size() && q.size() == offset.size(),
              "give one scale and one offset per weight matrix (and at least one matrix)");
  const bool symmetric = offset[0].numel() == 0;
  const bool blocks8 = gs == 32 || gs % 64 == 0;
  std::vector<torch::Tensor> offsets;  // each matrix's: none for the int8-block kernel on the symmetric grid
  std::vector<Int4Mat> mats;
  for (size_t i = 0; i < q.size(); ++i) {
    TORCH_CHECK((offset[i].numel() == 0) == symmetric, "give every matrix its offsets, or none (symmetric) for all");
    // the int16 kernel reads offsets on every grid: the symmetric grid's made here
    offsets.push_back(!symmetric ? offset[i] : blocks8 ? torch::Tensor() : scale[i] * -8.0);
    const torch::Tensor& o = offsets.back();
    check_int4(q[i], scale[i], o, gs);
    check_x(x, q[i].size(1) * 2);
    mats.push_back({q[i].data_ptr<uint8_t>(), scale[i].data_ptr<float>(), o.defined() ? o.data_ptr<float>() : nullptr,
                    q[i].size(0), q[i].size(1) * 2, scale[i].size(1), gs});
  }
  auto y = output(x, mats);
  if (blocks8) {
    const auto a = quantize_blocks8(x, gs, !symmetric);
    RAYPRESS_DISPATCH(int4_q8_gemv, mats, a.chunks.data(), a.per_row, symmetric ? nullptr : a.xsum.data(), x.size(0),
                      y.data_ptr<float>());
  } else {
    const auto a = quantize_rows(x, gs);
    RAYPRESS_DISPATCH(int4_gemv, mats, a.xq.data(), a.sx.data(), a.xsum.data(), x.size(0), y.data_ptr<float>());
  }
  return y;
}

namespace {

void check_out(const torch::Tensor& out, int64_t K, int64_t N, int64_t n0) {
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.dim() == 2 && out.size(1) == K,
              "out must be contiguous f32 [rows, ", K, "]");
  TORCH_CHECK(n0 >= 0 && n0 + out.size(0) <= N, "rows [", n0, ", ", n0 + out.size(0), ") out of range for ", N);
}

}  // namespace

void int4_widen_into(const torch::Tensor& q, const torch::Tensor& scale, const torch::Tensor& offset, int64_t gs,
                     int64_t n0, torch::Tensor out) {
  TORCH_CHECK(offset.numel() > 0, "widening takes the offsets of every grid");
  check_int4(q, scale, offset, gs);
  check_out(out, q.size(1) * 2, q.size(0), n0);
  RAYPRESS_DISPATCH(int4_widen, q.data_ptr<uint8_t>(), scale.data_ptr<float>(), offset.data_ptr<float>(),
                    scale.size(1), gs, q.size(1) * 2, n0, out.size(0), out.data_ptr<float>());
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

// Switch the instruction set ("avx2", "avx512", or "" for the best this CPU has); returns the one now in use.
std::string use_isa(const std::string& name) {
  current_isa().store(resolve(name));
  return isa_name(current_isa().load());
}

std::string isa() { return isa_name(current_isa().load()); }

// Run int8 products with at least `rows` activation rows as the tiled GEMM; returns the previous setting (for
// tests and benchmarks, which compare the two loops on the same product).
int64_t use_gemm_from(int64_t rows) {
  TORCH_CHECK(rows >= 1, "rows must be positive");
  return gemm_min_rows().exchange(rows);
}

// The instruction sets this CPU can run the kernels with.
std::vector<std::string> cpu_isas() {
  return cpu_has_avx512() ? std::vector<std::string>{"avx2", "avx512"} : std::vector<std::string>{"avx2"};
}

TORCH_LIBRARY(raypress, m) {
  m.def("f32_gemv(Tensor x, Tensor[] w) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor[] q, Tensor[] scale) -> Tensor");
  m.def("int8_dynamic_gemv(Tensor x, Tensor[] q, Tensor[] scale) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor[] q, Tensor[] scale, Tensor[] offset, int gs) -> Tensor");
  m.def("int4_widen_into(Tensor q, Tensor scale, Tensor offset, int gs, int n0, Tensor(a!) out) -> ()");
  m.def("parallel_threads(int n) -> int", &parallel_threads);
  m.def("use_isa(str name) -> str", &use_isa);
  m.def("isa() -> str", &isa);
  m.def("use_gemm_from(int rows) -> int", &use_gemm_from);
  m.def("cpu_isas() -> str[]", &cpu_isas);
}

TORCH_LIBRARY_IMPL(raypress, CPU, m) {
  m.impl("f32_gemv", &f32_gemv);
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int8_dynamic_gemv", &int8_dynamic_gemv);
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int4_widen_into", &int4_widen_into);
}
