// The decode kernels, written once over a vector type: qgemv.cpp includes this file twice, inside namespace avx2
// (8 floats per vector) and inside namespace avx512 (16 floats, compiled for AVX-512F), each after defining
// `struct Vec` with the operations below. Nothing here may be used outside the namespace that included it.
//
// A block is 16 consecutive weights of one row (K % 16 == 0): B = 16 / Vec::W vectors.
//
// Why one weight row at a time: at decode a product streams every weight from memory once, and what limits it
// is how many cache-line misses the core keeps in flight. A tile over several weight rows reads several streams
// at once with more arithmetic per byte between the loads, and measured at half the bandwidth of one sequential
// stream; one row with an explicit prefetch a few lines ahead reads at 80-90% of the machine's bandwidth on AVX2
// and on AVX-512. Each activation row has its own accumulators (several, so that the FMA latency does not chain),
// and a weight row, once in L1, serves every activation row.

constexpr int B = 16 / Vec::W;  // vectors per block
constexpr int64_t kPrefetchBytes = 512;
constexpr int64_t kMaxInt8Span = 2048;  // int8 weights per int32 accumulation (see row_tile_int)

struct F32Rows {
  static constexpr int kBlockBytes = 64;
  const float* w;
  int64_t K;
  const char* addr(int64_t n, int64_t k) const { return reinterpret_cast<const char*>(w + n * K + k); }
  void load(int64_t n, int64_t k, Vec::F* out) const {
    for (int j = 0; j < B; ++j) out[j] = Vec::load(w + n * K + k + j * Vec::W);
  }
};

struct Int8Rows {
  static constexpr bool kGrouped = false;
  static constexpr int kBlockBytes = 16;
  const int8_t* q;
  const float* scale;  // per weight row
  int64_t K;
  float row_scale(int64_t n) const { return scale[n]; }
  int64_t group_size() const { return std::min(K, kMaxInt8Span); }  // per-row scale: groups only bound the sums
  const char* addr(int64_t n, int64_t k) const { return reinterpret_cast<const char*>(q + n * K + k); }
  __m256i load16(int64_t n, int64_t k) const {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + n * K + k)));
  }
};

// Packed int4, unscaled (0..15): the group's scale and offset are applied once per group, not per weight.
struct Int4Rows {
  static constexpr bool kGrouped = true;
  static constexpr int kBlockBytes = 8;
  const uint8_t* q;
  const float* scale;
  const float* offset;
  int64_t K, G, gs;
  int64_t group_size() const { return gs; }
  float row_scale(int64_t) const { return 1.0f; }  // the group scales are applied per group
  const char* addr(int64_t n, int64_t k) const { return reinterpret_cast<const char*>(q + n * (K / 2) + k / 2); }
  void load(int64_t n, int64_t k, Vec::F* out) const { Vec::widen_u4(q + n * (K / 2) + k / 2, out); }
  __m256i load16(int64_t n, int64_t k) const {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + n * (K / 2) + k / 2));
    const __m128i mask = _mm_set1_epi8(0xF);
    return _mm256_cvtepu8_epi16(_mm_unpacklo_epi64(_mm_and_si128(b, mask), _mm_and_si128(_mm_srli_epi16(b, 4), mask)));
  }
  // Where groups hold whole 64-weight chunks, a chunk's 32 bytes become four vectors of 16 int16 with shifts and
  // masks alone: vector s holds nibble s of each 16-bit lane. That is not the weights' order, so the activations
  // of each such chunk are stored in the same order instead (chunk64_order, applied by qgemv.cpp once per call).
  // Groups of 32 are chunked too: a chunk's vectors then hold two groups, one per 128-bit half.
  static bool chunked(int64_t gs) { return gs % 64 == 0 || gs == 32; }
  bool chunked() const { return chunked(gs); }
  void load64(int64_t n, int64_t k, __m256i* out) const { split64(q + n * (K / 2) + k / 2, out); }
  static void split64(const uint8_t* p, __m256i* out) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i mask = _mm256_set1_epi16(0xF);
    out[0] = _mm256_and_si256(v, mask);
    out[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    out[2] = _mm256_and_si256(_mm256_srli_epi16(v, 8), mask);
    out[3] = _mm256_srli_epi16(v, 12);
  }
};

// y[m, n] for MR activation rows and one float32 weight row n.
template <int MR>
inline void row_tile(const F32Rows& rows, int64_t n, const float* x, int64_t K, float* y, int64_t ldy) {
  constexpr int A = MR == 1 ? 4 : 2;  // accumulators per activation row
  constexpr int U = A > B ? A / B : 1;  // blocks per unrolled step
  constexpr int kLines = U * F32Rows::kBlockBytes / 64;
  Vec::F acc[MR][A];
  for (int m = 0; m < MR; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = Vec::zero();
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U) {
    const char* p = rows.addr(n, k) + kPrefetchBytes;
    for (int l = 0; l < kLines; ++l) _mm_prefetch(p + 64 * l, _MM_HINT_T0);
    for (int u = 0; u < U; ++u) {
      Vec::F w[B];
      rows.load(n, k + 16 * u, w);
      for (int m = 0; m < MR; ++m)
        for (int j = 0; j < B; ++j) {
          const int a = (u * B + j) % A;
          acc[m][a] = Vec::fma(w[j], Vec::load(x + m * K + k + 16 * u + j * Vec::W), acc[m][a]);
        }
    }
  }
  for (; k < K; k += 16) {  // the blocks left over from the unrolled steps
    Vec::F w[B];
    rows.load(n, k, w);
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < B; ++j) acc[m][j % A] = Vec::fma(w[j], Vec::load(x + m * K + k + j * Vec::W), acc[m][j % A]);
  }
  for (int m = 0; m < MR; ++m) {
    Vec::F sum = acc[m][0];
    for (int a = 1; a < A; ++a) sum = Vec::add(sum, acc[m][a]);
    y[m * ldy] = Vec::hsum(sum);
  }
}

// The integer path for int8 and int4 weights: each activation row quantized to int16 with its own scale sx[m]
// (qgemv.cpp does that once per call; tested to cost under a tenth of the weights' own rounding error),
// weights widened to int16, and one vpmaddwd multiplies 16 pairs and adds them into 8 int32 lanes: half the
// instructions of widening to float, so the product stays memory-bound where the float path was compute-bound.
// The int32 lanes are turned to float once per group (int4) or per kMaxInt8Span weights (int8), which also
// bounds them: |q| <= 127, |xq| <= 32767 and 2048 / 16 sums of two products stay below 2^31.

// The int32 dot products (8 lanes) of one 64-weight chunk split by Int4Rows::split64 with its 64 activations, which
// quantize_rows stored in the same order.
inline __m256i dot64(const __m256i* w, const int16_t* xq) {
  const __m256i* x = reinterpret_cast<const __m256i*>(xq);
  const __m256i a = _mm256_add_epi32(_mm256_madd_epi16(w[0], _mm256_loadu_si256(x)),
                                     _mm256_madd_epi16(w[1], _mm256_loadu_si256(x + 1)));
  const __m256i b = _mm256_add_epi32(_mm256_madd_epi16(w[2], _mm256_loadu_si256(x + 2)),
                                     _mm256_madd_epi16(w[3], _mm256_loadu_si256(x + 3)));
  return _mm256_add_epi32(a, b);
}

// row_tile_int4_chunked's groups when they hold whole 64-weight chunks (64, 128, ...), into ``total``.
template <int MR>
inline void row_groups_int4_chunked(const Int4Rows& rows, int64_t n, const int16_t* xq, int64_t K,
                                    __m256 (&total)[MR][2]) {
  const int64_t G = rows.G, gs = rows.gs;
  const uint8_t* w = rows.q + n * (K / 2);
  const float* scale = rows.scale + n * G;
  const int64_t whole = K / gs, chunks = gs / 64;  // groups of whole chunks; a shorter last one may follow
  const uint8_t* wp = w;
  const int16_t* xp = xq;
  for (int64_t g = 0; g < whole; ++g) {
    __m256i acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_si256();
    for (int64_t c = 0; c < chunks; ++c, wp += 32, xp += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetchBytes, _MM_HINT_T0);
      __m256i v[4];
      Int4Rows::split64(wp, v);
      for (int m = 0; m < MR; ++m) acc[m] = _mm256_add_epi32(acc[m], dot64(v, xp + m * K));
    }
    const __m256 s = _mm256_set1_ps(scale[g]);
    for (int m = 0; m < MR; ++m) total[m][g & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m]), s, total[m][g & 1]);
  }
  if (whole < G) {  // the last, shorter group: its whole chunks were permuted too, so they are read as chunks
    __m256i acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_si256();
    int64_t k = whole * gs;
    for (; k + 64 <= K; k += 64) {
      __m256i v[4];
      rows.load64(n, k, v);
      for (int m = 0; m < MR; ++m) acc[m] = _mm256_add_epi32(acc[m], dot64(v, xq + m * K + k));
    }
    for (; k < K; k += 16) {
      const __m256i wv = rows.load16(n, k);
      for (int m = 0; m < MR; ++m)
        acc[m] = _mm256_add_epi32(
            acc[m], _mm256_madd_epi16(wv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + k))));
    }
    const __m256 s = _mm256_set1_ps(scale[whole]);
    for (int m = 0; m < MR; ++m) total[m][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m]), s, total[m][0]);
  }
}

// row_tile_int for packed int4 whose groups hold whole 64-weight chunks (Int4Rows::chunked): the common case, with
// the row's pointers taken once and nothing but the chunk loop and one flush per group inside, since at 64 or 128
// weights per group the generic loop's bookkeeping per group cost as much as the group's arithmetic. Two float
// totals per activation row take alternate groups, so that the flushes do not wait on each other; the offsets'
// share (sum over groups of offset * the group's activation sum) is one dot product after the loop.
template <int MR>
inline void row_tile_int4_chunked(const Int4Rows& rows, int64_t n, const int16_t* xq, const float* sx, int64_t K,
                                  const float* xsum, float* y, int64_t ldy) {
  const int64_t G = rows.G, gs = rows.gs;
  const uint8_t* w = rows.q + n * (K / 2);
  const float* scale = rows.scale + n * G;
  const float* offset = rows.offset + n * G;
  __m256 total[MR][2];
  for (int m = 0; m < MR; ++m) total[m][0] = total[m][1] = _mm256_setzero_ps();
  if (gs == 32) {
    // Each chunk holds two groups: lanes 0-7 of its vectors are weights 0-31 (Int4Rows::split64), so the low half
    // of each int32 sum is group 2c's and the high half group 2c + 1's, scaled by one vector of both scales.
    const int64_t pairs = K / 64;
    for (int64_t c = 0; c < pairs; ++c) {
      const uint8_t* wp = w + 32 * c;
      _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetchBytes, _MM_HINT_T0);
      __m256i v[4];
      Int4Rows::split64(wp, v);
      const __m256 s = _mm256_set_m128(_mm_set1_ps(scale[2 * c + 1]), _mm_set1_ps(scale[2 * c]));
      for (int m = 0; m < MR; ++m)
        total[m][c & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot64(v, xq + m * K + 64 * c)), s, total[m][c & 1]);
    }
    for (int64_t g = 2 * pairs; g < G; ++g) {  // a last half chunk (in the weights' own order) and a partial group
      __m256i acc[MR];
      for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_si256();
      for (int64_t k = 32 * g; k < std::min(K, 32 * g + 32); k += 16) {
        const __m256i wv = rows.load16(n, k);
        for (int m = 0; m < MR; ++m)
          acc[m] = _mm256_add_epi32(
              acc[m], _mm256_madd_epi16(wv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + k))));
      }
      const __m256 s = _mm256_set1_ps(scale[g]);
      for (int m = 0; m < MR; ++m) total[m][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m]), s, total[m][0]);
    }
  } else {
    row_groups_int4_chunked<MR>(rows, n, xq, K, total);
  }
  for (int m = 0; m < MR; ++m) {
    const __m256 t = _mm256_add_ps(total[m][0], total[m][1]);
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    float shift = 0.0f;
    for (int64_t g = 0; g < G; ++g) shift += offset[g] * xsum[m * G + g];
    y[m * ldy] = _mm_cvtss_f32(lo) * sx[m] + shift;
  }
}

template <int MR, typename Rows>
inline void row_tile_int(const Rows& rows, int64_t n, const int16_t* xq, const float* sx, int64_t K,
                         const float* xsum, float* y, int64_t ldy) {
  constexpr int64_t kLineWeights = 16 * 64 / Rows::kBlockBytes;  // weights per cache line of this row
  const int64_t gs = rows.group_size();
  __m256 total[MR];
  float shift[MR];
  for (int m = 0; m < MR; ++m) {
    total[m] = _mm256_setzero_ps();
    shift[m] = 0.0f;
  }
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += gs, ++g) {
    const int64_t k1 = std::min(K, k0 + gs);
    __m256i acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_si256();
    int64_t k = k0;  // (int4 in whole 64-weight chunks never comes here: row_tile_int4_chunked)
    // four blocks per step: one prefetch and one loop branch per 64 weights, two sums per row so that the adds
    // of consecutive blocks do not wait on each other
    __m256i acc2[MR];
    for (int m = 0; m < MR; ++m) acc2[m] = _mm256_setzero_si256();
    for (; k + 64 <= k1; k += 64) {
      _mm_prefetch(rows.addr(n, k) + kPrefetchBytes, _MM_HINT_T0);
      for (int u = 0; u < 4; ++u) {
        const __m256i w = rows.load16(n, k + 16 * u);
        for (int m = 0; m < MR; ++m) {
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + k + 16 * u));
          if (u % 2 == 0)
            acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(w, x));
          else
            acc2[m] = _mm256_add_epi32(acc2[m], _mm256_madd_epi16(w, x));
        }
      }
    }
    for (; k < k1; k += 16) {
      if ((k & (kLineWeights - 1)) == 0) _mm_prefetch(rows.addr(n, k) + kPrefetchBytes, _MM_HINT_T0);
      const __m256i w = rows.load16(n, k);
      for (int m = 0; m < MR; ++m)
        acc[m] = _mm256_add_epi32(
            acc[m], _mm256_madd_epi16(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + k))));
    }
    for (int m = 0; m < MR; ++m) acc[m] = _mm256_add_epi32(acc[m], acc2[m]);
    for (int m = 0; m < MR; ++m) {
      const __m256 dot = _mm256_cvtepi32_ps(acc[m]);
      if constexpr (Rows::kGrouped) {
        const int64_t i = n * rows.G + g;
        total[m] = _mm256_fmadd_ps(dot, _mm256_set1_ps(rows.scale[i]), total[m]);
        shift[m] += rows.offset[i] * xsum[m * rows.G + g];
      } else {
        total[m] = _mm256_add_ps(total[m], dot);
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(total[m]), _mm256_extractf128_ps(total[m], 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    y[m * ldy] = _mm_cvtss_f32(lo) * sx[m] * rows.row_scale(n) + shift[m];
  }
}

// Weight matrices that share their activations (q, k and v; gate and up), as one product: their rows are
// numbered one after another, and y's columns hold each matrix's outputs in turn. One call reads every matrix's
// weights once, quantizes the activations once, and wakes the threads once.
template <typename Rows>
struct Stack {
  std::vector<Rows> parts;
  std::vector<int64_t> end;  // end[j]: one past the last row of parts[j] in the stack's numbering
  void add(const Rows& rows, int64_t n) { parts.push_back(rows), end.push_back(rows_total() + n); }
  int64_t rows_total() const { return end.empty() ? 0 : end.back(); }
  int64_t K() const { return parts.front().K; }
  // Row n of the stack as (matrix, row within it).
  std::pair<const Rows*, int64_t> find(int64_t n) const {
    size_t j = 0;
    while (n >= end[j]) ++j;
    return {&parts[j], j ? n - end[j - 1] : n};
  }
};

// Every weight row n of the stack (split between threads), with activation rows taken kMaxRows at a time: the
// row comes from memory once and from L1 after. tile(rows, r, n, m0, mr) computes y[m0 .. m0 + mr, n] from row r
// of matrix rows, mr a compile-time constant.
template <typename Rows, typename Tile>
void over_rows(const Stack<Rows>& stack, int64_t M, Tile tile) {
  at::parallel_for(0, stack.rows_total(), 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const auto [rows, r] = stack.find(n);
      for (int64_t m0 = 0; m0 < M; m0 += Vec::kMaxRows) {
        switch (std::min<int64_t>(Vec::kMaxRows, M - m0)) {
          case 1: tile(*rows, r, n, m0, std::integral_constant<int, 1>{}); break;
          case 2: tile(*rows, r, n, m0, std::integral_constant<int, 2>{}); break;
          case 3: tile(*rows, r, n, m0, std::integral_constant<int, 3>{}); break;
#if RAYPRESS_WIDE
          case 4: tile(*rows, r, n, m0, std::integral_constant<int, 4>{}); break;
          case 5: tile(*rows, r, n, m0, std::integral_constant<int, 5>{}); break;
          case 6: tile(*rows, r, n, m0, std::integral_constant<int, 6>{}); break;
          case 7: tile(*rows, r, n, m0, std::integral_constant<int, 7>{}); break;
          default: tile(*rows, r, n, m0, std::integral_constant<int, 8>{}); break;
#else
          default: tile(*rows, r, n, m0, std::integral_constant<int, 4>{}); break;
#endif
        }
      }
    }
  });
}

// The entry points qgemv.cpp dispatches to: plain pointers, y[M, stack rows] row-major, K % 16 == 0.

inline void f32_gemv(const std::vector<F32Mat>& mats, const float* x, int64_t M, float* y) {
  Stack<F32Rows> stack;
  for (const auto& m : mats) stack.add(F32Rows{m.w, m.K}, m.N);
  const int64_t K = stack.K(), N = stack.rows_total();
  over_rows(stack, M, [&](const F32Rows& rows, int64_t r, int64_t n, int64_t m0, auto mr) {
    row_tile<decltype(mr)::value>(rows, r, x + m0 * K, K, y + m0 * N + n, N);
  });
}

// int8 or int4 weights; xq, sx and xsum as qgemv.cpp's quantize_rows makes them (xsum: int4 only).
template <typename Rows>
void int_gemv(const Stack<Rows>& stack, const int16_t* xq, const float* sx, const float* xsum, int64_t G, int64_t M,
              float* y) {
  const int64_t K = stack.K(), N = stack.rows_total();
  over_rows(stack, M, [&](const Rows& rows, int64_t r, int64_t n, int64_t m0, auto mr) {
    if constexpr (Rows::kGrouped) {
      if (rows.chunked()) {
        row_tile_int4_chunked<decltype(mr)::value>(rows, r, xq + m0 * K, sx + m0, K, xsum + m0 * G, y + m0 * N + n,
                                                   N);
        return;
      }
    }
    row_tile_int<decltype(mr)::value>(rows, r, xq + m0 * K, sx + m0, K, xsum ? xsum + m0 * G : nullptr,
                                      y + m0 * N + n, N);
  });
}

inline void int8_gemv(const std::vector<Int8Mat>& mats, const int16_t* xq, const float* sx, int64_t M, float* y) {
  Stack<Int8Rows> stack;
  for (const auto& m : mats) stack.add(Int8Rows{m.q, m.scale, m.K}, m.N);
  int_gemv(stack, xq, sx, nullptr, 0, M, y);
}

inline void int4_gemv(const std::vector<Int4Mat>& mats, const int16_t* xq, const float* sx, const float* xsum,
                      int64_t M, float* y) {
  Stack<Int4Rows> stack;
  for (const auto& m : mats) stack.add(Int4Rows{m.q, m.scale, m.offset, m.K, m.G, m.gs}, m.N);
  int_gemv(stack, xq, sx, xsum, mats.front().G, M, y);
}

// Packed int4 weight rows [n0, n0 + count) as float32 into dst [count, K], split between threads.
inline void int4_widen(const uint8_t* q, const float* scale, const float* offset, int64_t G, int64_t gs, int64_t K,
                       int64_t n0, int64_t count, float* dst) {
  const Int4Rows rows{q, scale, offset, K, G, gs};
  at::parallel_for(0, count, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t n = n0 + r0; n < n0 + r1; ++n) {
      float* d = dst + (n - n0) * K;
      for (int64_t k = 0; k < K; k += 16) {
        Vec::F w[B];
        rows.load(n, k, w);
        const int64_t i = n * G + k / gs;
        const Vec::F gsc = Vec::set1(scale[i]), goff = Vec::set1(offset[i]);
        for (int j = 0; j < B; ++j) Vec::store(d + k + j * Vec::W, Vec::fma(w[j], gsc, goff));
      }
    }
  });
}
