// SpQR kernels (qcompile/schemes/spqr.py): y = x @ W.T + bias with W in transformers' / spqr_quant's packed layout.
// (This file: the layout, the tables and the row decoders; the kernels are in spqr_linear.h.)
//
// Shapes and dtypes: x float32 or bfloat16 [M, K]; dense_weights int64 [ceil(N/16) * Kp/16 * 16]: word
// (t * Kp/16 + g) * 16 + i is row 16t + i of tile (t, g): bits 0-2 qs, 3-5 qz, 6+3c..8+3c the code of column
// 16g + c, 54-61 byte i/2 of the tile's second-order word (float16 ss, zs, sz, zz in bits 0-15, 16-31, 32-47,
// 48-63); row_offsets int32 [N + 1] (CSR); col_vals int32 [nnz]: float16 value in bits 16-31, permuted column in
// bits 0-15; in_perm int32 [Kp/2]: perm[2i] in bits 0-15, perm[2i+1] in bits 16-31; bias float32 [N] or NULL;
// y [M, N] float32 or bfloat16. Constraints: Kp % 16 == 0, K <= Kp <= 65536.
//
// Weight (every step a float16 operation, round to nearest even, as spqr_quant's __hsub / __hmul):
//     scale = h(ss * h(qs - sz)),  zero = h(zs * h(qz - zz)),  D[r, j] = h(scale * h(q - zero))
//     y[m, n] = sum_j D[n, j] * x[m, perm[j]] + sum over row n's outliers (j, v) of v * x[m, perm[j]] + bias[n]
// (x[m, f] = 0 for f >= K). Every h() here rounds a difference of an integer 0..7 and a float16, or a product of two
// float16 values. The scalar variant computes them exactly in double and rounds once (spqr_h). The AVX2 / AVX-512
// variants compute them in float32 and round with vcvtps2ph (F16C, round to nearest even): a product of two
// float16 values is exact in float32 (22 significant bits); a difference q - z is exact in float32 unless |z| <
// 2**-13 |q - z|, and then it lies within |z| of the integer q, so its float32 rounding cannot reach a float16
// rounding midpoint (at least 2**-11 |q - z| from q): both round to the same float16 (also checked for all 65536
// float16 z). So every variant decodes the same weights, bit for bit.
//
// Parameters (qc_call.ints): [0] Kp, [1] 1: AVX512-FP16 arithmetic allowed (see below); dequant_spqr: [0] Kp, [1] n0,
// [2] n1, [3] as linear's [1]. Kernels:
//   linear_spqr:  gathers xg[m, j] = x[m, perm[j]] once per call (float32 [M, Kp]); threads take blocks of 16 rows
//                 (one tile row) and walk its tiles in chunks of SPQR_CHUNK (32) tiles:
//                 1. tables (spqr_tables): per tile, the second-order word gives the 8 scales h(ss * h(qs - sz)) and
//                    the 8 zeros h(zs * h(qz - zz)) its rows can take, and t1[qz][q] = h(q - zero(qz)) (64 values);
//                    each row's scale sc and its t1 row (toff) are looked up by its qs and qz codes (AVX-512: 16 rows
//                    at once with vpermps);
//                 2. weights (spqr_decode), four rows at a time: per row and tile the 8 values its codes can take,
//                    h(sc * t1[qz][q]), form a table that the 16 codes index:
//                      AVX-512: the table twice in one vector (vpermps reads the low 4 bits of a lane: the code and a
//                               bit of the next one); codes from 32-bit windows of the word, bytes 0-3 broadcast to
//                               lanes 0-7 (columns 0-7), bytes 3-6 to lanes 8-15 (a merge-masked broadcast; columns
//                               8-15), shifted per lane;
//                      AVX2:    the table in 8 lanes (vpermps reads 3 bits), columns 0-7 and 8-15 from the same
//                               windows;
//                      scalar:  the table in double, one lookup per weight;
//                    into a float32 buffer of the chunk's columns (4 rows x 512 floats);
//                 3. dot products (spqr_dot): the 4 rows times every group of 4 tokens, the chunk's columns in order
//                    into one float32 accumulator per (row, token, lane) (16 / 8 / 1 lanes), kept between chunks;
//                    one token with AVX512-FP16 tables (spqr_fused_ph): steps 2 and 3 in one loop, no buffer, the
//                    same sums.
//                 While a chunk's rows decode, the next chunk's words are prefetched (4 KB: the next page, where the
//                 hardware prefetcher stops). Then each row's accumulators are reduced, its outliers added (AVX-512,
//                 8 or more: 16 at a time with gathered activations, one partial sum per lane; else one by one in CSR
//                 order) and the bias. A row's sums do not depend on the thread count.
//                 AVX512-FP16 (spqr_tables_ph / spqr_decode_ph; built by GCC 12 / clang 14 and later; used when
//                 ints[1] is 1 and the CPU has it): the same tables with vsubph / vmulph (float16 arithmetic rounds to
//                 nearest even, float16 subnormals included whatever MXCSR says: exactly h()), t1 and sc kept as
//                 float16 and a row's table converted once (vcvtph2ps): the same weights, bit for bit, in fewer
//                 instructions.
//   dequant_spqr: writes rows n0..n1 of D plus the outliers (permuted column order) to `y`, float32 or bfloat16
//                 (y_bf16) [n1 - n0, Kp] (reads no x), with the same tables and weights.

// IEEE half bits -> float, exact (subnormals, infinities, NaN).
static inline float spqr_half(uint32_t h) {
#if defined(__F16C__)
    return _cvtsh_ss((unsigned short)h);
#endif
    const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t u;
    if (exp == 0) {
        float v = (float)man * (1.0f / 16777216.0f);  // man * 2^-24
        return sign ? -v : v;
    }
    if (exp == 31)
        u = sign | 0x7f800000u | (man << 13);
    else
        u = sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// v rounded to the nearest float16 (ties to even), as a double; beyond float16's range: +-inf.
static inline double spqr_h(double v) {
    if (v == 0.0 || v != v) return v;
    const double a = fabs(v);
    if (a >= 65520.0) return copysign(INFINITY, v);
    uint64_t bits;
    memcpy(&bits, &a, 8);
    int q = (int)((bits >> 52) & 0x7ff) - 1023 - 10;  // the quantum of 11 significant bits: 2^(floor(log2 a) - 10)
    if (q < -24) q = -24;                             // subnormal quantum
    // a + 2^(q+52) has a unit in the last place of 2^q, so the addition rounds a to a multiple of 2^q, to nearest
    // even (the default rounding mode); the subtraction is exact
    const uint64_t magic_bits = (uint64_t)(q + 52 + 1023) << 52;
    double magic;
    memcpy(&magic, &magic_bits, 8);
    return copysign((a + magic) - magic, v);
}

// The 64-bit second-order word of the tile whose 16 words start at t (rows 2b and 2b+1 both carry byte b).
static inline uint64_t spqr_second(const uint64_t* t) {
    uint64_t s = 0;
    for (int r = 0; r < 16; r++) s |= ((t[r] >> 54) & 0xffu) << (8 * (r / 2));
    return s;
}

// 32 bits of a word starting at byte `at` (0..4).
static inline int32_t spqr_window(const uint64_t* w, int at) {
    int32_t v;
    memcpy(&v, (const char*)w + at, 4);
    return v;
}

#if defined(__AVX512F__)
// h() of 16 float32 values (exact float16 rounding, as a float32).
static inline __m512 spqr_h16(__m512 v) { return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT)); }
#elif defined(__AVX2__)
static inline __m256 spqr_h8(__m256 v) { return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT)); }
#endif

#if defined(__AVX512F__)
// Lanes 0-7: bits 0-31 of the word, 8-15: bits 24-55 (a broadcast, then a merge-masked broadcast: no shuffle port).
static inline __m512i spqr_windows(const uint64_t* w) {
    return _mm512_mask_set1_epi32(_mm512_set1_epi32(spqr_window(w, 0)), 0xff00, spqr_window(w, 3));
}

// The second-order word of the tile whose rows 0-7 / 8-15 are w0 / w1 (byte b = bits 54-61 of row 2b | of row 2b+1),
// in the low 64 bits: four float16 ss, zs, sz, zz.
static inline __m128i spqr_second16(__m512i w0, __m512i w1) {
    const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    const __m512i odd = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
    const __m512i rows = _mm512_or_si512(_mm512_permutex2var_epi64(w0, even, w1),
                                         _mm512_permutex2var_epi64(w0, odd, w1));
    return _mm512_cvtepi64_epi8(_mm512_srli_epi64(rows, 54));  // vpmovqb keeps bits 54-61
}
#endif

//: tiles ahead whose words the table builders prefetch (into the next chunk, which is the next page)
constexpr int64_t SPQR_AHEAD = 8;

// Tiles g0 <= g < g1 of one tile row (16 words each; i = g - g0): for row r, sc[16 i + r] = its scale and toff[16 i +
// r] = 64 i + 8 qz, where t1[64 i + 8 qz + q] = h(q - zero(qz)) for q = 0..7: row r's table before the scale.
static void spqr_tables(const uint64_t* words, int64_t g0, int64_t g1, float* sc, int32_t* toff, float* t1) {
#if defined(__AVX512F__)
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i low = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i seven = _mm512_set1_epi32(7);
    for (int64_t g = g0; g < g1; g++) {
        const int64_t i = g - g0;
        const uint64_t* t = words + g * 16;
        _mm_prefetch((const char*)(t + SPQR_AHEAD * 16), _MM_HINT_T0);  // the hardware stops at the page's end
        _mm_prefetch((const char*)(t + SPQR_AHEAD * 16 + 8), _MM_HINT_T0);
        const __m512i w0 = _mm512_loadu_si512((const void*)t), w1 = _mm512_loadu_si512((const void*)(t + 8));
        const __m512 s4 = _mm512_castps128_ps512(_mm_cvtph_ps(spqr_second16(w0, w1)));  // ss, zs, sz, zz
        // lanes 0-7: the scale of qs = lane (ss, sz), 8-15: the zero of qz = lane - 8 (zs, zz)
        const __m512 mul = _mm512_permutexvar_ps(halves, s4);
        const __m512 sub = _mm512_permutexvar_ps(_mm512_add_epi32(halves, _mm512_set1_epi32(2)), s4);
        const __m512 table = spqr_h16(_mm512_mul_ps(mul, spqr_h16(_mm512_sub_ps(iota, sub))));
        const __m512i rows = _mm512_permutex2var_epi32(w0, low, w1);  // the low 32 bits of the 16 words
        _mm512_storeu_ps(sc + i * 16, _mm512_permutexvar_ps(_mm512_and_si512(rows, seven), table));
        const __m512i qz8 = _mm512_and_si512(rows, _mm512_set1_epi32(0x38));  // 8 qz
        _mm512_storeu_si512((void*)(toff + i * 16), _mm512_add_epi32(qz8, _mm512_set1_epi32((int32_t)(64 * i))));
        for (int k = 0; k < 4; k++) {  // qz = 2k (lanes 0-7), 2k+1 (8-15)
            const __m512 zero = _mm512_permutexvar_ps(_mm512_add_epi32(halves, _mm512_set1_epi32(8 + 2 * k)), table);
            _mm512_storeu_ps(t1 + i * 64 + 16 * k, spqr_h16(_mm512_sub_ps(iota, zero)));
        }
    }
#elif defined(__AVX2__)
    const __m256 iota = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7), qz8 = _mm256_set1_epi32(0x38);
    float zeros[8];
    for (int64_t g = g0; g < g1; g++) {
        const int64_t i = g - g0;
        const uint64_t* t = words + g * 16;
        _mm_prefetch((const char*)(t + SPQR_AHEAD * 16), _MM_HINT_T0);  // the hardware stops at the page's end
        _mm_prefetch((const char*)(t + SPQR_AHEAD * 16 + 8), _MM_HINT_T0);
        __m256i w[4];
        for (int k = 0; k < 4; k++) w[k] = _mm256_loadu_si256((const __m256i*)(t + 4 * k));
        // the second-order word: bits 54-61 of rows 2b | 2b+1 (adjacent qwords) into byte b
        uint64_t s = 0;
        for (int k = 0; k < 4; k++) {
            const __m256i b = _mm256_srli_epi64(w[k], 54);
            const __m256i pair = _mm256_or_si256(b, _mm256_shuffle_epi32(b, 0x4E));  // rows 2b | 2b+1, both qwords
            s |= ((uint64_t)(_mm256_extract_epi64(pair, 0) & 0xff) << (16 * k)) |
                 ((uint64_t)(_mm256_extract_epi64(pair, 2) & 0xff) << (16 * k + 8));
        }
        const __m128 s4 = _mm_cvtph_ps(_mm_cvtsi64_si128((long long)s));  // ss, zs, sz, zz
        const __m256 ss = _mm256_set1_ps(_mm_cvtss_f32(s4));
        const __m256 zs = _mm256_set1_ps(_mm_cvtss_f32(_mm_shuffle_ps(s4, s4, 1)));
        const __m256 sz = _mm256_set1_ps(_mm_cvtss_f32(_mm_shuffle_ps(s4, s4, 2)));
        const __m256 zz = _mm256_set1_ps(_mm_cvtss_f32(_mm_shuffle_ps(s4, s4, 3)));
        const __m256 scales = spqr_h8(_mm256_mul_ps(ss, spqr_h8(_mm256_sub_ps(iota, sz))));
        _mm256_storeu_ps(zeros, spqr_h8(_mm256_mul_ps(zs, spqr_h8(_mm256_sub_ps(iota, zz)))));
        for (int qz = 0; qz < 8; qz++)
            _mm256_storeu_ps(t1 + i * 64 + 8 * qz, spqr_h8(_mm256_sub_ps(iota, _mm256_set1_ps(zeros[qz]))));
        for (int h = 0; h < 2; h++) {  // rows 8h .. 8h + 7: their low 32 bits in order, then qs and 8 qz
            const __m256 a = _mm256_castsi256_ps(w[2 * h]), b = _mm256_castsi256_ps(w[2 * h + 1]);
            const __m256 lows = _mm256_shuffle_ps(a, b, 0x88);  // rows 0, 1, 4, 5 | 2, 3, 6, 7
            const __m256i rows = _mm256_permutevar8x32_epi32(_mm256_castps_si256(lows), order);
            _mm256_storeu_ps(sc + i * 16 + 8 * h, _mm256_permutevar8x32_ps(scales, rows));  // vpermps reads qs
            const __m256i at = _mm256_add_epi32(_mm256_and_si256(rows, qz8), _mm256_set1_epi32((int32_t)(64 * i)));
            _mm256_storeu_si256((__m256i*)(toff + i * 16 + 8 * h), at);
        }
    }
#else
    for (int64_t g = g0; g < g1; g++) {
        const int64_t i = g - g0;
        const uint64_t* t = words + g * 16;
        const uint64_t s = spqr_second(t);
        double s4[4], scales[8];
        for (int k = 0; k < 4; k++) s4[k] = (double)spqr_half((uint32_t)((s >> (16 * k)) & 0xffffu));
        for (int q = 0; q < 8; q++) {
            scales[q] = spqr_h(s4[0] * spqr_h((double)q - s4[2]));
            const double zero = spqr_h(s4[1] * spqr_h((double)q - s4[3]));
            for (int c = 0; c < 8; c++) t1[i * 64 + 8 * q + c] = (float)spqr_h((double)c - zero);
        }
        for (int r = 0; r < 16; r++) {
            sc[i * 16 + r] = (float)scales[t[r] & 7u];
            toff[i * 16 + r] = (int32_t)(64 * i + 8 * ((t[r] >> 3) & 7u));
        }
    }
#endif
}

// Row r of tiles g0 <= g < g1 (tables from spqr_tables) -> out[16 (g - g0) + c] float32 (permuted column order,
// dense part only).
static void spqr_decode(const uint64_t* words, int r, int64_t g0, int64_t g1, const float* sc, const int32_t* toff,
                        const float* t1, float* out) {
#if defined(__AVX512F__)
    // columns 0-7 from bits 6..29 (a window at byte 0), 8-15 from bits 30..53 (a window at byte 3); vpermps reads the
    // low 4 bits of each lane: the code and one bit of the next, so the table holds the row's 8 values twice
    const __m512i shifts = _mm512_setr_epi32(6, 9, 12, 15, 18, 21, 24, 27, 6, 9, 12, 15, 18, 21, 24, 27);
    for (int64_t g = g0; g < g1; g++) {
        const int64_t i = g - g0;
        const uint64_t* w = words + g * 16 + r;
        const double* row = (const double*)(t1 + toff[i * 16 + r]);
        const __m512 before = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(row)));
        const __m512 table = spqr_h16(_mm512_mul_ps(_mm512_set1_ps(sc[i * 16 + r]), before));
        const __m512i codes = _mm512_srlv_epi32(spqr_windows(w), shifts);
        _mm512_storeu_ps(out + i * 16, _mm512_permutexvar_ps(codes, table));
    }
#elif defined(__AVX2__)
    // vpermps reads the low 3 bits of each lane: the code
    const __m256i shifts = _mm256_setr_epi32(6, 9, 12, 15, 18, 21, 24, 27);
    for (int64_t g = g0; g < g1; g++) {
        const int64_t i = g - g0;
        const uint64_t* w = words + g * 16 + r;
        const __m256 before = _mm256_loadu_ps(t1 + toff[i * 16 + r]);
        const __m256 table = spqr_h8(_mm256_mul_ps(_mm256_set1_ps(sc[i * 16 + r]), before));
        const __m256i lo = _mm256_srlv_epi32(_mm256_set1_epi32(spqr_window(w, 0)), shifts);
        const __m256i hi = _mm256_srlv_epi32(_mm256_set1_epi32(spqr_window(w, 3)), shifts);
        _mm256_storeu_ps(out + i * 16, _mm256_permutevar8x32_ps(table, lo));
        _mm256_storeu_ps(out + i * 16 + 8, _mm256_permutevar8x32_ps(table, hi));
    }
#else
    for (int64_t g = g0; g < g1; g++) {
        const int64_t i = g - g0;
        const uint64_t w = words[g * 16 + r];
        const double scale = sc[i * 16 + r];
        const float* before = t1 + toff[i * 16 + r];
        float lut[8];
        for (int q = 0; q < 8; q++) lut[q] = (float)spqr_h(scale * (double)before[q]);
        for (int c = 0; c < 16; c++) out[i * 16 + c] = lut[(w >> (6 + 3 * c)) & 7u];
    }
#endif
}

// Compilers that know AVX512-FP16 (GCC 12, clang 14 and later) build the float16 route of the AVX-512 variant.
#if defined(__AVX512F__) && (defined(__clang__) ? __clang_major__ >= 14 : __GNUC__ >= 12)
#define SPQR_HAVE_FP16 1
#else
#define SPQR_HAVE_FP16 0
#endif

#if SPQR_HAVE_FP16
// The same tables and weights with AVX512-FP16 arithmetic (vsubph / vmulph round to nearest even, as h(); float16
// subnormals included whatever MXCSR says), where the CPU has it: sc[16 i + r] holds the scale's float16 bits (low
// 16 bits), t1 as float16 t1h[64 i + 8 qz + q], toff in float16 elements. Same values as spqr_tables /
// spqr_decode, bit for bit.
#define SPQR_FP16 __attribute__((target("avx512fp16")))

static inline bool spqr_has_fp16() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512fp16");
}

SPQR_FP16 static void spqr_tables_ph(const uint64_t* words, int64_t g0, int64_t g1, int32_t* sc, int32_t* toff,
                                     uint16_t* t1h) {
    const __m512h iota = _mm512_castsi512_ph(_mm512_broadcast_i32x4(
        _mm_setr_epi16(0, 0x3C00, 0x4000, 0x4200, 0x4400, 0x4500, 0x4600, 0x4700)));  // 0..7 as float16
    const __m512i low = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i quarter = _mm512_set_epi16(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1,
                                             0, 0, 0, 0, 0, 0, 0, 0);  // fmt: skip
    const __m512i seven = _mm512_set1_epi32(7);
    for (int64_t g = g0; g < g1; g++) {
        const int64_t i = g - g0;
        const uint64_t* t = words + g * 16;
        _mm_prefetch((const char*)(t + SPQR_AHEAD * 16), _MM_HINT_T0);  // the hardware stops at the page's end
        _mm_prefetch((const char*)(t + SPQR_AHEAD * 16 + 8), _MM_HINT_T0);
        const __m512i w0 = _mm512_loadu_si512((const void*)t), w1 = _mm512_loadu_si512((const void*)(t + 8));
        const __m512i s4 = _mm512_castsi128_si512(spqr_second16(w0, w1));  // words 0-3: ss, zs, sz, zz
        // words 0-7: ss, 8-15: zs (then again); sub: sz, zz
        const __m512i pick = _mm512_and_si512(quarter, _mm512_set1_epi16(1));
        const __m512h mul = _mm512_castsi512_ph(_mm512_permutexvar_epi16(pick, s4));
        const __m512i pick2 = _mm512_add_epi16(pick, _mm512_set1_epi16(2));
        const __m512h sub = _mm512_castsi512_ph(_mm512_permutexvar_epi16(pick2, s4));
        // words 0-7: the scale of qs = word, 8-15: the zero of qz = word - 8
        const __m512i table = _mm512_castph_si512(_mm512_mul_ph(mul, _mm512_sub_ph(iota, sub)));
        const __m512i rows = _mm512_permutex2var_epi32(w0, low, w1);  // the low 32 bits of the 16 words
        // a dword lane qs indexes words qs and 0: the scale in the low 16 bits
        _mm512_storeu_si512((void*)(sc + i * 16), _mm512_permutexvar_epi16(_mm512_and_si512(rows, seven), table));
        const __m512i qz8 = _mm512_and_si512(rows, _mm512_set1_epi32(0x38));  // 8 qz
        _mm512_storeu_si512((void*)(toff + i * 16), _mm512_add_epi32(qz8, _mm512_set1_epi32((int32_t)(64 * i))));
        for (int k = 0; k < 2; k++) {  // qz = 4k .. 4k+3 in words 0-7, .., 24-31
            const __m512i lanes = _mm512_add_epi16(quarter, _mm512_set1_epi16((short)(8 + 4 * k)));
            const __m512h zero = _mm512_castsi512_ph(_mm512_permutexvar_epi16(lanes, table));
            _mm512_storeu_si512((void*)(t1h + i * 64 + 32 * k), _mm512_castph_si512(_mm512_sub_ph(iota, zero)));
        }
    }
}

// Row r of tile g (chunk index i = g - g0): its 16 weights, each the float32 of one of the row's 8 float16 values.
SPQR_FP16 static inline __m512 spqr_row_ph(const uint64_t* words, int r, int64_t g, int64_t i, const int32_t* sc,
                                           const int32_t* toff, const uint16_t* t1h) {
    const __m512i shifts = _mm512_setr_epi32(6, 9, 12, 15, 18, 21, 24, 27, 6, 9, 12, 15, 18, 21, 24, 27);
    int16_t scale;
    memcpy(&scale, sc + i * 16 + r, 2);
    const __m128i row = _mm_loadu_si128((const __m128i*)(t1h + toff[i * 16 + r]));
    const __m512h before = _mm512_castsi512_ph(_mm512_broadcast_i32x4(row));
    // the row's 8 values, 4 times: the low 16 (the table twice) convert to float32
    const __m512h table = _mm512_mul_ph(_mm512_castsi512_ph(_mm512_set1_epi16(scale)), before);
    const __m512 table32 = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_castph_si512(table)));
    const __m512i codes = _mm512_srlv_epi32(spqr_windows(words + g * 16 + r), shifts);
    return _mm512_permutexvar_ps(codes, table32);
}

SPQR_FP16 static void spqr_decode_ph(const uint64_t* words, int r, int64_t g0, int64_t g1, const int32_t* sc,
                                     const int32_t* toff, const uint16_t* t1h, float* out) {
    for (int64_t g = g0; g < g1; g++)
        _mm512_storeu_ps(out + (g - g0) * 16, spqr_row_ph(words, r, g, g - g0, sc, toff, t1h));
}

// One token: acc[i * 16 ..] += the weights of rows r0 + i (i < 4) times x, tiles g0 <= g < g1, no buffer.
SPQR_FP16 static void spqr_fused_ph(const uint64_t* words, int r0, int64_t g0, int64_t g1, const int32_t* sc,
                                    const int32_t* toff, const uint16_t* t1h, const float* x, float* acc) {
    __m512 a[4];
    for (int k = 0; k < 4; k++) a[k] = _mm512_loadu_ps(acc + 16 * k);
    for (int64_t g = g0; g < g1; g++) {
        const int64_t i = g - g0;
        const __m512 xv = _mm512_loadu_ps(x + i * 16);
        for (int k = 0; k < 4; k++) a[k] = _mm512_fmadd_ps(spqr_row_ph(words, r0 + k, g, i, sc, toff, t1h), xv, a[k]);
    }
    for (int k = 0; k < 4; k++) _mm512_storeu_ps(acc + 16 * k, a[k]);
}
#endif

// AVX512-FP16 arithmetic for the tables: allowed (ints) and the CPU has it.
static inline bool spqr_fp16(int64_t allowed) {
#if SPQR_HAVE_FP16
    return allowed && spqr_has_fp16();
#else
    return false;
#endif
}

static inline void spqr_tables_of(bool ph, const uint64_t* words, int64_t g0, int64_t g1, float* sc, int32_t* toff,
                                  float* t1) {
#if SPQR_HAVE_FP16
    if (ph) return spqr_tables_ph(words, g0, g1, (int32_t*)sc, toff, (uint16_t*)t1);
#endif
    spqr_tables(words, g0, g1, sc, toff, t1);
}

static inline void spqr_decode_of(bool ph, const uint64_t* words, int r, int64_t g0, int64_t g1, const float* sc,
                                  const int32_t* toff, const float* t1, float* out) {
#if SPQR_HAVE_FP16
    if (ph) return spqr_decode_ph(words, r, g0, g1, (const int32_t*)sc, toff, (const uint16_t*)t1, out);
#endif
    spqr_decode(words, r, g0, g1, sc, toff, t1, out);
}
