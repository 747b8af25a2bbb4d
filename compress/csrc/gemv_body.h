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
constexpr int64_t kMaxPairK = 1024;  // int4 rows of at most this many weights are read two at a time at batch 1

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

// The integer path for int8 weights (and int4 ones in groups other than 32 or whole 64-weight chunks, which
// row_tile_int4_q8 takes): each activation row quantized to int16 with its own scale sx[m]
// (qgemv.cpp does that once per call; tested to cost under a tenth of the weights' own rounding error),
// weights widened to int16, and one vpmaddwd multiplies 16 pairs and adds them into 8 int32 lanes: half the
// instructions of widening to float, so the product stays memory-bound where the float path was compute-bound.
// The int32 lanes are turned to float once per group (int4) or per kMaxInt8Span weights (int8), which also
// bounds them: |q| <= 127, |xq| <= 32767 and 2048 / 16 sums of two products stay below 2^31.

// The sum of the 8 lanes of v.
inline float hsum8(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  return _mm_cvtss_f32(_mm_add_ss(lo, _mm_movehdup_ps(lo)));
}

// sum_i a[i] * b[i] in vectors of 8 on two sums (a scalar loop's chain of dependent adds, one per group of a
// row, cost more than the row's products at 1.1B sizes).
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  float sum = hsum8(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// Packed int4 on activations quantized to int8 per block of 32 weights (qgemv.cpp's quantize_blocks8, in QChunks of
// 64): the arithmetic of llama.cpp's Q4 x Q8_0 products. A chunk's 32 bytes of weights become two vectors of 32
// unsigned bytes, the low and the high nibbles, and vpmaddubsw multiplies each by its 32 int8 activations (stored in
// the same order) and adds pairs into int16 lanes: 15 * 127 * 4 < 2^15, so the two results add without overflow.
// One vpmaddwd by ones widens the sums to 8 int32 lanes, 4 per block of 32: lanes 0-3 are the chunk's weights 0-31,
// lanes 4-7 weights 32-63 (every 16-weight block keeps its low nibbles in the low half). Each block's sum is
// turned to float and scaled once, by its group's scale times its activations' scale. Against the 15-bit
// activations' vpmaddwd on int16 weights (row_tile_int) this is half the activation bytes and 3 multiplies per 64
// weights instead of 4, and it keeps 1.1B-class products bound by memory rather than arithmetic.
//
// The symmetric grid (offset = -8 * scale) is applied in the integers: each block's sum less 8 times the sum of its
// activations (QChunk::corr), so its offsets are never read. Other grids add sum_g offset[g] * xsum[g] (the
// groups' float activation sums) after the loop. kPairs: groups of 32, so a chunk's halves have scales 2c and
// 2c + 1; else groups of whole chunks (64, 128, ...), one scale per chunk.
// One 64-weight chunk (its 32 bytes in v) times its activations a: the 8 block sums as floats, lanes 0-3 weights
// 0-31 and lanes 4-7 weights 32-63, less 8 times the activations' sums on the symmetric grid.
template <bool kSymmetric>
inline __m256 chunk_dot(__m256i v, const QChunk& a) {
  const __m256i nibble = _mm256_set1_epi8(0xF);
  const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
  const __m256i pairs =
      _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_load_si256(reinterpret_cast<const __m256i*>(a.lo))),
                       _mm256_maddubs_epi16(hi, _mm256_load_si256(reinterpret_cast<const __m256i*>(a.hi))));
  __m256i dot = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
  if constexpr (kSymmetric) dot = _mm256_sub_epi32(dot, _mm256_load_si256(reinterpret_cast<const __m256i*>(a.corr)));
  return _mm256_cvtepi32_ps(dot);
}

// The group scales of chunk c of a row (scale: the row's), one per lane: with groups of 32 (kPairs) scales 2c and
// 2c + 1, each over its half; else the one group's the chunk lies in.
template <bool kPairs>
inline __m256 chunk_scales(const float* scale, int64_t c, int64_t gs) {
  if constexpr (kPairs)
    return _mm256_permutevar8x32_ps(
        _mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(scale + 2 * c)))),
        _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  else
    return _mm256_set1_ps(scale[64 * c / gs]);
}

// The last chunk of a row whose K is not a multiple of 64: its bytes copied out (no read past the row), the rest
// zero (zero nibbles against zero activations add nothing).
template <bool kSymmetric>
inline __m256 tail_product(const Int4Rows& rows, const uint8_t* w, const float* scale, const QChunk& a,
                           int64_t whole) {
  alignas(32) uint8_t tail[32] = {};
  std::memcpy(tail, w + 32 * whole, (rows.K - 64 * whole) / 2);
  const int64_t g = 64 * whole / rows.gs, g2 = std::min(rows.G - 1, (64 * whole + 32) / rows.gs);
  return _mm256_mul_ps(chunk_dot<kSymmetric>(_mm256_load_si256(reinterpret_cast<const __m256i*>(tail)), a),
                       _mm256_mul_ps(_mm256_set_m128(_mm_set1_ps(scale[g2]), _mm_set1_ps(scale[g])),
                                     _mm256_load_ps(a.xs)));
}

template <int MR, bool kPairs, bool kSymmetric>
inline void row_tile_int4_q8(const Int4Rows& rows, int64_t n, const QChunk* act, int64_t chunks, const float* xsum,
                             float* y, int64_t ldy) {
  // With one row, two sets of totals take alternate chunks so that consecutive FMAs do not chain. Each set is named
  // by a constant index (the loop below is unrolled by hand): indexed by c % 2, GCC kept them on the stack, and the
  // store-to-load round trip on every chunk halved the loop's speed.
  constexpr int T = MR == 1 ? 2 : 1;
  const int64_t K = rows.K, G = rows.G, gs = rows.gs, whole = K / 64;
  const uint8_t* w = rows.q + n * (K / 2);
  const float* scale = rows.scale + n * G;
  __m256 total[T][MR];
  for (int t = 0; t < T; ++t)
    for (int m = 0; m < MR; ++m) total[t][m] = _mm256_setzero_ps();
  const auto whole_chunk = [&](int64_t c, __m256(&sums)[MR]) {
    _mm_prefetch(reinterpret_cast<const char*>(w + 32 * c) + kPrefetchBytes, _MM_HINT_T0);
    const __m256 ws = chunk_scales<kPairs>(scale, c, gs);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * c));
    for (int m = 0; m < MR; ++m) {
      const QChunk& a = act[m * chunks + c];
      sums[m] = _mm256_fmadd_ps(chunk_dot<kSymmetric>(v, a), _mm256_mul_ps(ws, _mm256_load_ps(a.xs)), sums[m]);
    }
  };
  int64_t c = 0;
  for (; c + T <= whole; c += T) {
    whole_chunk(c, total[0]);
    if constexpr (T == 2) whole_chunk(c + 1, total[T - 1]);
  }
  for (; c < whole; ++c) whole_chunk(c, total[0]);
  if (whole < chunks)
    for (int m = 0; m < MR; ++m)
      total[0][m] = _mm256_add_ps(total[0][m], tail_product<kSymmetric>(rows, w, scale, act[m * chunks + whole], whole));
  for (int m = 0; m < MR; ++m) {
    __m256 t = total[0][m];
    if constexpr (T == 2) t = _mm256_add_ps(t, total[T - 1][m]);
    y[m * ldy] = hsum8(t) + (kSymmetric ? 0.0f : dot(rows.offset + n * G, xsum + m * G, G));
  }
}

// Two adjacent weight rows (n, n + 1) on one activation row: at decode of small models (K of a few hundred) the
// work per row besides its chunks (the sums' reduction, the store, finding the row) cost as much as the chunks. Two
// rows share that, and each chunk's activations are loaded once for both; the rows lie one after the other in
// memory, so this is still one sequential stream. The two rows' sums are two independent chains.
template <bool kPairs, bool kSymmetric>
inline void row_pair_int4_q8(const Int4Rows& rows, int64_t n, const QChunk* act, int64_t chunks, const float* xsum,
                             float* y) {
  const int64_t K = rows.K, G = rows.G, gs = rows.gs, whole = K / 64;
  const uint8_t* w0 = rows.q + n * (K / 2);
  const uint8_t* w1 = w0 + K / 2;
  const float *scale0 = rows.scale + n * G, *scale1 = scale0 + G;
  __m256 total0 = _mm256_setzero_ps(), total1 = _mm256_setzero_ps();
  for (int64_t c = 0; c < whole; ++c) {
    _mm_prefetch(reinterpret_cast<const char*>(w0 + 32 * c) + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w1 + 32 * c) + kPrefetchBytes, _MM_HINT_T0);
    const QChunk& a = act[c];
    const __m256 xs = _mm256_load_ps(a.xs);
    const __m256 d0 = chunk_dot<kSymmetric>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + 32 * c)), a);
    const __m256 d1 = chunk_dot<kSymmetric>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w1 + 32 * c)), a);
    total0 = _mm256_fmadd_ps(d0, _mm256_mul_ps(chunk_scales<kPairs>(scale0, c, gs), xs), total0);
    total1 = _mm256_fmadd_ps(d1, _mm256_mul_ps(chunk_scales<kPairs>(scale1, c, gs), xs), total1);
  }
  if (whole < chunks) {
    total0 = _mm256_add_ps(total0, tail_product<kSymmetric>(rows, w0, scale0, act[whole], whole));
    total1 = _mm256_add_ps(total1, tail_product<kSymmetric>(rows, w1, scale1, act[whole], whole));
  }
  y[0] = hsum8(total0) + (kSymmetric ? 0.0f : dot(rows.offset + n * G, xsum, G));
  y[1] = hsum8(total1) + (kSymmetric ? 0.0f : dot(rows.offset + (n + 1) * G, xsum, G));
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
    int64_t k = k0;
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
    y[m * ldy] = hsum8(total[m]) * sx[m] * rows.row_scale(n) + shift[m];
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

template <bool kPairs, bool kSymmetric>
void int4_q8_tiles(const Stack<Int4Rows>& stack, const QChunk* act, int64_t chunks, const float* xsum, int64_t M,
                   float* y) {
  const int64_t G = stack.parts.front().G, N = stack.rows_total();
  if (M == 1 && stack.K() <= kMaxPairK) {  // one activation row, short weight rows: two at a time
    at::parallel_for(0, (N + 1) / 2, 8, [&](int64_t p0, int64_t p1) {
      for (int64_t n = 2 * p0; n < std::min(N, 2 * p1); n += 2) {
        const auto [rows, r] = stack.find(n);
        if (n + 1 < N && stack.find(n + 1).first == rows) {
          row_pair_int4_q8<kPairs, kSymmetric>(*rows, r, act, chunks, xsum, y + n);
          continue;
        }
        row_tile_int4_q8<1, kPairs, kSymmetric>(*rows, r, act, chunks, xsum, y + n, N);
        if (n + 1 < N) {
          const auto [next, r1] = stack.find(n + 1);
          row_tile_int4_q8<1, kPairs, kSymmetric>(*next, r1, act, chunks, xsum, y + n + 1, N);
        }
      }
    });
    return;
  }
  over_rows(stack, M, [&](const Int4Rows& rows, int64_t r, int64_t n, int64_t m0, auto mr) {
    row_tile_int4_q8<decltype(mr)::value, kPairs, kSymmetric>(rows, r, act + m0 * chunks, chunks,
                                                              xsum ? xsum + m0 * G : nullptr, y + m0 * N + n, N);
  });
}

// int4 on int8 activation blocks (groups of 32 or of whole 64-weight chunks); xsum null: the symmetric grid.
inline void int4_q8_gemv(const std::vector<Int4Mat>& mats, const QChunk* act, int64_t chunks, const float* xsum,
                         int64_t M, float* y) {
  Stack<Int4Rows> stack;
  for (const auto& m : mats) stack.add(Int4Rows{m.q, m.scale, m.offset, m.K, m.G, m.gs}, m.N);
  const bool pairs = mats.front().gs == 32;
  if (xsum == nullptr)
    pairs ? int4_q8_tiles<true, true>(stack, act, chunks, xsum, M, y)
          : int4_q8_tiles<false, true>(stack, act, chunks, xsum, M, y);
  else
    pairs ? int4_q8_tiles<true, false>(stack, act, chunks, xsum, M, y)
          : int4_q8_tiles<false, false>(stack, act, chunks, xsum, M, y);
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
