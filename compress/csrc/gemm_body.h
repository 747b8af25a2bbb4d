// Products with many activation rows (prefill, encoders, evaluation) on integer arithmetic, written once for both
// instruction sets: qgemv.cpp includes this file after gemv_body.h inside namespace avx2 and inside namespace
// avx512 (both run the same 256-bit code; the AVX-512 copy is compiled with its target's encodings).
//
// With many rows a product is bound by arithmetic, not by reading the weights. A float32 GEMM does 16
// multiply-adds per cycle on two 8-lane FMA pipes; vpmaddwd multiplies 16 int16 pairs and adds them pairwise into 8
// int32 lanes, and two of them issue per cycle on AVX2 CPUs (Zen 3: its two integer-multiply pipes), so int16 x
// int16 products can run at up to twice float32's rate. The activations are those of the GEMV path (each row
// quantized to int16 with its own scale: 15 bits for the weight-only formats, 8 bits for int8-dynamic), so the
// GEMM gives the GEMV's numbers, and prefill and decode round alike.
//
// A tile is MR activation rows by NR weight rows: per 16 weights, NR weight vectors widened to int16 (read once,
// used MR times) and MR activation vectors (used NR times) make MR * NR products, accumulated over K as vectors of
// int32 and summed across lanes once at the end (at most every kMaxInt8Span weights for int8, which bounds the
// int32 sums as in row_tile_int). A thread takes kGemmBlock weight rows at a time and runs every activation row
// over them, MR at a time: the block's weights stay in L2 and each tile's activation rows in L1.

constexpr int kGemmRows = 4;          // activation rows per tile (MR)
constexpr int kGemmCols = 2;          // weight rows per tile (NR): 8 int32 sums stay in registers
constexpr int64_t kGemmBlock = 32;    // weight rows per thread's block: 18 KiB to 64 KiB of int8 at K = 576 to 2048

inline float hsum_epi32_as_float(__m256i v) {
  const __m256 f = _mm256_cvtepi32_ps(v);  // lanes to float first: their int32 sum could overflow
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// The int32 sums of a 4 x 2 tile over weights [k, k1): acc[2m + j] += xq[m, :] . q_j[:] (k and k1 multiples of
// 16). In assembly because GCC 12, given the same loop in intrinsics, either copied every sum between two registers
// each step or, unrolled, spilled one to the stack, whose store-to-load round trip on the sum's chain halved the
// speed (measured: 28 against 54 G multiply-adds/s on one Zen 3 core). Sums in ymm0-7, weights ymm8-9,
// activations ymm10/13, products ymm11-12/14-15.
inline void gemm_sums_4x2(const int8_t* w0, const int8_t* w1, const int16_t* x0, int64_t K, int64_t k, int64_t k1,
                          __m256i (&acc)[8]) {
  __m256i a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3], a4 = acc[4], a5 = acc[5], a6 = acc[6], a7 = acc[7];
  const int16_t* x1 = x0 + K;
  const int16_t* x2 = x1 + K;
  const int16_t* x3 = x2 + K;
  asm volatile(
      "1:\n\t"
      "vpmovsxbw (%[w0],%[k]), %%ymm8\n\t"
      "vpmovsxbw (%[w1],%[k]), %%ymm9\n\t"
      "vmovdqu (%[x0],%[k],2), %%ymm10\n\t"
      "vmovdqu (%[x1],%[k],2), %%ymm13\n\t"
      "vpmaddwd %%ymm10, %%ymm8, %%ymm11\n\t"
      "vpmaddwd %%ymm10, %%ymm9, %%ymm12\n\t"
      "vpmaddwd %%ymm13, %%ymm8, %%ymm14\n\t"
      "vpmaddwd %%ymm13, %%ymm9, %%ymm15\n\t"
      "vpaddd %%ymm11, %[a0], %[a0]\n\t"
      "vpaddd %%ymm12, %[a1], %[a1]\n\t"
      "vpaddd %%ymm14, %[a2], %[a2]\n\t"
      "vpaddd %%ymm15, %[a3], %[a3]\n\t"
      "vmovdqu (%[x2],%[k],2), %%ymm10\n\t"
      "vmovdqu (%[x3],%[k],2), %%ymm13\n\t"
      "vpmaddwd %%ymm10, %%ymm8, %%ymm11\n\t"
      "vpmaddwd %%ymm10, %%ymm9, %%ymm12\n\t"
      "vpmaddwd %%ymm13, %%ymm8, %%ymm14\n\t"
      "vpmaddwd %%ymm13, %%ymm9, %%ymm15\n\t"
      "vpaddd %%ymm11, %[a4], %[a4]\n\t"
      "vpaddd %%ymm12, %[a5], %[a5]\n\t"
      "vpaddd %%ymm14, %[a6], %[a6]\n\t"
      "vpaddd %%ymm15, %[a7], %[a7]\n\t"
      "add $16, %[k]\n\t"
      "cmp %[k1], %[k]\n\t"
      "jl 1b\n\t"
      : [a0] "+x"(a0), [a1] "+x"(a1), [a2] "+x"(a2), [a3] "+x"(a3), [a4] "+x"(a4), [a5] "+x"(a5), [a6] "+x"(a6),
        [a7] "+x"(a7), [k] "+r"(k)
      : [w0] "r"(w0), [w1] "r"(w1), [x0] "r"(x0), [x1] "r"(x1), [x2] "r"(x2), [x3] "r"(x3), [k1] "r"(k1)
      : "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory");
  acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3, acc[4] = a4, acc[5] = a5, acc[6] = a6, acc[7] = a7;
}

// y[m, j] (m < MR, j < NR) for activation rows xq[m * K ...] and weight rows n .. n + NR of rows.
template <int MR, int NR>
inline void gemm_tile_int8(const Int8Rows& rows, int64_t n, const int16_t* xq, const float* sx, int64_t K, float* y,
                           int64_t ldy) {
  float total[MR][NR] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kMaxInt8Span) {
    const int64_t k1 = std::min(K, k0 + kMaxInt8Span);
    __m256i acc[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NR; ++j) acc[m][j] = _mm256_setzero_si256();
    if constexpr (MR == 4 && NR == 2) {
      __m256i (&sums)[8] = reinterpret_cast<__m256i(&)[8]>(acc);
      gemm_sums_4x2(rows.q + n * K, rows.q + (n + 1) * K, xq, K, k0, k1, sums);
      // the 8 sums across lanes at once: hadd pairs them up (each 128-bit half on its own), then the halves add
      __m256 f[8];
      for (int i = 0; i < 8; ++i) f[i] = _mm256_cvtepi32_ps(sums[i]);
      const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(f[0], f[1]), _mm256_hadd_ps(f[2], f[3]));
      const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(f[4], f[5]), _mm256_hadd_ps(f[6], f[7]));
      // a's lanes: (s0 s1 s2 s3 | s0 s1 s2 s3) of its low and high halves, the same for b with s4..s7
      const __m256 t = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
      alignas(32) float v[8];
      _mm256_store_ps(v, t);
      for (int i = 0; i < 8; ++i) total[i / NR][i % NR] += v[i];
    } else {  // the edges of a product
      for (int64_t k = k0; k < k1; k += 16) {
        __m256i w[NR];
        for (int j = 0; j < NR; ++j) w[j] = rows.load16(n + j, k);
        for (int m = 0; m < MR; ++m) {
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + k));
          for (int j = 0; j < NR; ++j) acc[m][j] = _mm256_add_epi32(acc[m][j], _mm256_madd_epi16(w[j], x));
        }
      }
      for (int m = 0; m < MR; ++m)
        for (int j = 0; j < NR; ++j) total[m][j] += hsum_epi32_as_float(acc[m][j]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) y[m * ldy + j] = total[m][j] * sx[m] * rows.row_scale(n + j);
}

// gemm_tile_int8 with MR and NR chosen at run time (the edges of the product), up to kGemmRows x kGemmCols.
template <int MR>
inline void gemm_tile_int8_cols(int64_t nr, const Int8Rows& rows, int64_t n, const int16_t* xq, const float* sx,
                                int64_t K, float* y, int64_t ldy) {
  static_assert(kGemmCols == 2, "one case per tile width");
  if (nr == 2)
    gemm_tile_int8<MR, 2>(rows, n, xq, sx, K, y, ldy);
  else
    gemm_tile_int8<MR, 1>(rows, n, xq, sx, K, y, ldy);
}

template <int MR = kGemmRows>
inline void gemm_tile_int8_any(int64_t mr, int64_t nr, const Int8Rows& rows, int64_t n, const int16_t* xq,
                               const float* sx, int64_t K, float* y, int64_t ldy) {
  if constexpr (MR > 1) {
    if (mr < MR) return gemm_tile_int8_any<MR - 1>(mr, nr, rows, n, xq, sx, K, y, ldy);
  }
  gemm_tile_int8_cols<MR>(nr, rows, n, xq, sx, K, y, ldy);
}

// y[M, stack rows] = the int8 weights' product with xq, tiled as above; each block of weight rows lies within one
// matrix of the stack (their scales and pointers differ).
inline void int8_gemm(const std::vector<Int8Mat>& mats, const int16_t* xq, const float* sx, int64_t M, float* y) {
  Stack<Int8Rows> stack;
  for (const auto& m : mats) stack.add(Int8Rows{m.q, m.scale, m.K}, m.N);
  const int64_t K = stack.K(), N = stack.rows_total();
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (first row in the stack's numbering, rows)
  for (size_t j = 0; j < stack.parts.size(); ++j)
    for (int64_t r = j ? stack.end[j - 1] : 0; r < stack.end[j]; r += kGemmBlock)
      blocks.emplace_back(r, std::min(kGemmBlock, stack.end[j] - r));
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const auto [first, count] = blocks[b];
      const auto [rows, r0] = stack.find(first);
      for (int64_t m0 = 0; m0 < M; m0 += kGemmRows) {
        const int64_t mr = std::min<int64_t>(kGemmRows, M - m0);
        for (int64_t i = 0; i < count; i += kGemmCols) {
          const int64_t nr = std::min<int64_t>(kGemmCols, count - i);
          gemm_tile_int8_any(mr, nr, *rows, r0 + i, xq + m0 * K, sx + m0, K, y + m0 * N + first + i, N);
        }
      }
    }
  });
}
