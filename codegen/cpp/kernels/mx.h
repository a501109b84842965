// OCP MX 6- and 8-bit kernels for mxfp6 and mxfp8 (qcompile/schemes/mx.py, mxfp6.py, mxfp8.py): y = xq @ w.T + bias
//     w[n, k] = element(code[n, k]) * 2**(scales[n, k / 32] - 127)
// with xq the prepared activation: x zero-padded to Kp and, when activations are quantized, quantized per token and
// per group of 32 to the weight's element type and dequantized again (the values the reference multiplies).
//
// Element types (ints[0]; bits, exponent / mantissa bits, bias, largest value, emax = floor(log2(largest))):
//     0 e2m3: 6, 2/3, 1, 7.5, 2      1 e3m2: 6, 3/2, 3, 28, 4
//     2 e4m3: 8, 4/3, 7, 448, 8 (S.1111.111 NaN)      3 e5m2: 8, 5/2, 15, 57344, 15 (exponent 11111: Inf / NaN)
// A code is sign | E | M; its magnitude is 2**(E - bias) * (1 + M / 2**mbits), or for E = 0 (subnormals)
// 2**(1 - bias) * M / 2**mbits.
//
// Shapes and dtypes: x float32 or bfloat16 [M, K]; qweight uint8 [N, Kp * bits / 8]: 8 bits one code a byte (the
// float8 tensor's bytes); 6 bits 4 codes in 3 bytes, element 4j + i in bits 6i .. 6i + 5 of the little-endian word
// of bytes 3j .. 3j + 2; scales uint8 [N, Kp / 32] (E8M0, 255 is NaN); bias float32 [N] or NULL; y [M, N] float32 or
// bfloat16. Constraints: Kp % 32 == 0, K <= Kp.
//
// Parameters (qc_call.ints): [0] element type, [1] Kp, [2] quantize activations (0/1); dequant_mx also [3] n0, [4] n1.
// Kernels:
//   linear_mx:  y as above.
//   prepare_mx: writes xq to `y` as float32 [M, Kp] (reads no weight).
//   dequant_mx: writes rows n0..n1 of w to `y` as float32 [n1 - n0, Kp] (reads no x).
//
// Activation rule, in float32 as the reference computes it (schemes/mx.py): per group of 32,
//     e = clamp(floor(log2(amax)) - emax, -127, 127) (-127 for amax 0), value = element(v * 2**-e) * 2**e,
// element(): nearest value, ties to the even mantissa, saturating at the largest finite value (v * 2**-e is exact).
// The weight decode is a table of the 2**bits code values (AVX-512: 32-entry vpermt2ps lookups of the magnitude plus
// the sign bit; AVX2: gathers; scalar: loads), times the group's unit 2**(s - 127), then FMAs over up to 4 tokens at
// once with several accumulators; a thread computes whole outputs (one contiguous range of rows of N each: one
// sequential weight stream per thread), so results do not depend on the thread count.

struct mx_format {
    int bits, mbits, bias, emax, special;  // special: 0 none, 1 all-ones magnitude is NaN, 2 IEEE-style Inf / NaN
    float max;
};

static inline mx_format mx_format_of(int64_t id) {
    switch (id) {
        case 0: return mx_format{6, 3, 1, 2, 0, 7.5f};
        case 1: return mx_format{6, 2, 3, 4, 0, 28.0f};
        case 2: return mx_format{8, 3, 7, 8, 1, 448.0f};
        default: return mx_format{8, 2, 15, 15, 2, 57344.0f};
    }
}

// The value of each of the 2**bits codes, from the bit definition (header comment).
static void mx_table(mx_format f, float* table) {
    const int half = 1 << (f.bits - 1), ebits = f.bits - 1 - f.mbits;
    for (int c = 0; c < half; c++) {
        const int e = c >> f.mbits, m = c & ((1 << f.mbits) - 1);
        float v = e == 0 ? ldexpf((float)m, 1 - f.bias - f.mbits)
                         : ldexpf((float)((1 << f.mbits) + m), e - f.bias - f.mbits);
        if (f.special == 1 && c == half - 1) v = NAN;
        if (f.special == 2 && e == (1 << ebits) - 1) v = m == 0 ? INFINITY : NAN;
        table[c] = v;
        table[c + half] = -v;
    }
}

static inline float mx_e8m0_value(uint8_t s) { return s == 255 ? NAN : ldexpf(1.0f, (int)s - 127); }

// -- decoding 16 codes ------------------------------------------------------------------------------------------
// BITS = 6: 12 bytes hold 16 codes (element i in bits 6i .. 6i + 5 of the little-endian bit string); BITS = 8: 16.
#if defined(__AVX512F__)
struct mx_lut {
    __m512 t[8];  // the magnitudes of codes 0 .. 127 (6 bits: 0 .. 31 in t[0], t[1])
};
static inline mx_lut mx_lut_load(const float* table, int bits) {
    mx_lut l;
    for (int i = 0; i < 8; i++) l.t[i] = _mm512_loadu_ps(table + 16 * (bits == 6 ? (i & 1) : i));
    return l;
}
static inline __m128i mx_load12(const uint8_t* p) {
    int32_t tail;
    memcpy(&tail, p + 8, 4);
    return _mm_insert_epi32(_mm_loadl_epi64((const __m128i*)p), tail, 2);
}
static inline __m512i mx_codes(const uint8_t* p, int bits) {
    if (bits == 8) return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    // 16-bit words holding each element: bytes (6i / 8, 6i / 8 + 1), then shifted right by 6i % 8
    const __m128i b = mx_load12(p);
    const __m128i lo = _mm_shuffle_epi8(b, _mm_setr_epi8(0, 1, 0, 1, 1, 2, 2, 3, 3, 4, 3, 4, 4, 5, 5, 6));
    const __m128i hi = _mm_shuffle_epi8(b, _mm_setr_epi8(6, 7, 6, 7, 7, 8, 8, 9, 9, 10, 9, 10, 10, 11, 11, -1));
    const __m512i words = _mm512_cvtepu16_epi32(_mm256_set_m128i(hi, lo));
    const __m512i shifts = _mm512_setr_epi32(0, 6, 4, 2, 0, 6, 4, 2, 0, 6, 4, 2, 0, 6, 4, 2);
    return _mm512_and_si512(_mm512_srlv_epi32(words, shifts), _mm512_set1_epi32(63));
}
static inline void mx_decode16(const uint8_t* p, const mx_lut& l, int bits, vf* out) {
    const __m512i codes = mx_codes(p, bits);
    __m512 magnitude = _mm512_permutex2var_ps(l.t[0], codes, l.t[1]);  // codes' bits 0-4
    if (bits == 8) {
        const __m512 r1 = _mm512_permutex2var_ps(l.t[2], codes, l.t[3]);
        const __m512 r2 = _mm512_permutex2var_ps(l.t[4], codes, l.t[5]);
        const __m512 r3 = _mm512_permutex2var_ps(l.t[6], codes, l.t[7]);
        const __mmask16 b5 = _mm512_test_epi32_mask(codes, _mm512_set1_epi32(32));
        const __mmask16 b6 = _mm512_test_epi32_mask(codes, _mm512_set1_epi32(64));
        const __m512 low = _mm512_mask_blend_ps(b5, magnitude, r1), high = _mm512_mask_blend_ps(b5, r2, r3);
        magnitude = _mm512_mask_blend_ps(b6, low, high);
    }
    const __m512i sign = _mm512_and_si512(_mm512_slli_epi32(codes, 32 - bits), _mm512_set1_epi32((int)0x80000000u));
    out[0] = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(magnitude), sign));
}
static inline vf mx_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline void mx_store(float* p, vf v) { _mm512_storeu_ps(p, v); }
#elif defined(__AVX2__)
typedef const float* mx_lut;  // the whole table, gathered from
static inline mx_lut mx_lut_load(const float* table, int bits) { return table; }
static inline void mx_decode16(const uint8_t* p, mx_lut table, int bits, vf* out) {
    __m256i c0, c1;
    if (bits == 8) {
        c0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
        c1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8)));
    } else {
        int32_t tail;
        memcpy(&tail, p + 8, 4);
        const __m128i b = _mm_insert_epi32(_mm_loadl_epi64((const __m128i*)p), tail, 2);
        const __m128i lo = _mm_shuffle_epi8(b, _mm_setr_epi8(0, 1, 0, 1, 1, 2, 2, 3, 3, 4, 3, 4, 4, 5, 5, 6));
        const __m128i hi = _mm_shuffle_epi8(b, _mm_setr_epi8(6, 7, 6, 7, 7, 8, 8, 9, 9, 10, 9, 10, 10, 11, 11, -1));
        const __m256i shifts = _mm256_setr_epi32(0, 6, 4, 2, 0, 6, 4, 2);
        const __m256i mask = _mm256_set1_epi32(63);
        c0 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu16_epi32(lo), shifts), mask);
        c1 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu16_epi32(hi), shifts), mask);
    }
    out[0] = _mm256_i32gather_ps(table, c0, 4);
    out[1] = _mm256_i32gather_ps(table, c1, 4);
}
static inline vf mx_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline void mx_store(float* p, vf v) { _mm256_storeu_ps(p, v); }
#else
typedef const float* mx_lut;
static inline mx_lut mx_lut_load(const float* table, int bits) { return table; }
static inline void mx_decode16(const uint8_t* p, mx_lut table, int bits, vf* out) {
    if (bits == 8) {
        for (int i = 0; i < 16; i++) out[i] = table[p[i]];
        return;
    }
    for (int j = 0; j < 4; j++) {
        const uint32_t word = (uint32_t)p[3 * j] | ((uint32_t)p[3 * j + 1] << 8) | ((uint32_t)p[3 * j + 2] << 16);
        for (int i = 0; i < 4; i++) out[4 * j + i] = table[(word >> (6 * i)) & 63];
    }
}
static inline vf mx_mul(vf a, vf b) { return a * b; }
static inline void mx_store(float* p, vf v) { *p = v; }
#endif

// -- activations --------------------------------------------------------------------------------------------------
// element(v): nearest value of the type, ties to even, saturating at the largest finite value, sign kept.
static inline float mx_round(float v, mx_format f) {
    const float a = fabsf(v);
    if (!(a < f.max)) return copysignf(f.max, v) * (a == a ? 1.0f : 0.0f);  // saturate; NaN -> 0
    int e = 0;
    frexpf(a, &e);
    e -= 1;  // floor(log2(a)) for a > 0
    if (e < 1 - f.bias) e = 1 - f.bias;  // subnormal spacing
    float r = ldexpf(nearbyintf(ldexpf(a, f.mbits - e)), e - f.mbits);
    if (r > f.max) r = f.max;
    return copysignf(r, v);
}

// One row quantized per group of 32 and dequantized again (the activation rule of the header).
static void mx_quantize_row(float* row, int64_t Kp, mx_format f) {
    for (int64_t k0 = 0; k0 < Kp; k0 += 32) {
        float amax = 0.0f;
        for (int64_t k = k0; k < k0 + 32; k++) amax = fmaxf(amax, fabsf(row[k]));
        int e = -127;
        if (amax > 0.0f) {
            frexpf(amax, &e);
            e = e - 1 - f.emax;
            e = e < -127 ? -127 : (e > 127 ? 127 : e);
        }
        const float unit = ldexpf(1.0f, e), inverse = ldexpf(1.0f, -e);
        for (int64_t k = k0; k < k0 + 32; k++) row[k] = mx_round(row[k] * inverse, f) * unit;
    }
}

// x -> float32 [M, Kp]: zero padded, quantized as the parameters say.
static void mx_prepare(const void* x, int x_bf16, int64_t M, int64_t K, int64_t Kp, int quantize, mx_format f,
                       float* xp, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (M >= 16)
    for (int64_t m = 0; m < M; m++) {
        float* row = xp + m * Kp;
        for (int64_t k = 0; k < K; k++) row[k] = load_activation(x, x_bf16, m * K + k);
        for (int64_t k = K; k < Kp; k++) row[k] = 0.0f;
        if (quantize) mx_quantize_row(row, Kp, f);
    }
}

// -- weights ------------------------------------------------------------------------------------------------------
// One weight row against MT prepared activation rows; out[m] = sum_k xp[m, k] * w[k] (no bias). Blocks of 16 codes
// (BITS * 2 bytes), two per group of 32.
template <int BITS, int MT>
static inline void mx_tile(const float* xp, int64_t Kp, const uint8_t* wrow, const uint8_t* srow, const float* table,
                           const float* units, float* out) {
    constexpr int V = 16 / W;                          // vectors per block of 16 codes
    constexpr int A = MT == 1 ? 4 : (MT == 2 ? 2 : 1);  // blocks in flight (independent accumulators)
    const mx_lut lut = mx_lut_load(table, BITS);
    const int64_t blocks = Kp / 16;
    vf acc[MT][A][V];
    for (int m = 0; m < MT; m++)
        for (int a = 0; a < A; a++)
            for (int i = 0; i < V; i++) acc[m][a][i] = vf_zero();
    int64_t b = 0;
    for (; b + A <= blocks; b += A) {
        for (int a = 0; a < A; a++) {
            vf w[V];
            mx_decode16(wrow + (b + a) * 2 * BITS, lut, BITS, w);
            const vf unit = vf_bcast(units[srow[(b + a) >> 1]]);
            const float* xb = xp + (b + a) * 16;
            for (int i = 0; i < V; i++) {
                const vf wi = mx_mul(w[i], unit);
                for (int m = 0; m < MT; m++) acc[m][a][i] = vf_fma(wi, vf_load(xb + m * Kp + i * W), acc[m][a][i]);
            }
        }
    }
    for (; b < blocks; b++) {
        vf w[V];
        mx_decode16(wrow + b * 2 * BITS, lut, BITS, w);
        const vf unit = vf_bcast(units[srow[b >> 1]]);
        const float* xb = xp + b * 16;
        for (int i = 0; i < V; i++) {
            const vf wi = mx_mul(w[i], unit);
            for (int m = 0; m < MT; m++) acc[m][0][i] = vf_fma(wi, vf_load(xb + m * Kp + i * W), acc[m][0][i]);
        }
    }
    for (int m = 0; m < MT; m++) {
        vf total = acc[m][0][0];
        for (int a = 0; a < A; a++)
            for (int i = (a == 0); i < V; i++) total = vf_add(total, acc[m][a][i]);
        out[m] = vf_hsum(total);
    }
}

template <int BITS>
static void mx_rows(const float* xp, int64_t M, int64_t Kp, const uint8_t* qweight, const uint8_t* scales,
                    const float* table, const float* units, int64_t N, const float* bias, void* y, int y_bf16,
                    int threads) {
    const int64_t G = Kp / 32, row_bytes = Kp * BITS / 8;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* wrow = qweight + n * row_bytes;
        const uint8_t* srow = scales + n * G;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t mt = min_i64(4, M - m0);
            const float* xt = xp + m0 * Kp;
            float out[4];
            switch (mt) {
                case 4: mx_tile<BITS, 4>(xt, Kp, wrow, srow, table, units, out); break;
                case 3: mx_tile<BITS, 3>(xt, Kp, wrow, srow, table, units, out); break;
                case 2: mx_tile<BITS, 2>(xt, Kp, wrow, srow, table, units, out); break;
                default: mx_tile<BITS, 1>(xt, Kp, wrow, srow, table, units, out); break;
            }
            const float b = bias ? bias[n] : 0.0f;
            for (int64_t i = 0; i < mt; i++) store_output(y, y_bf16, (m0 + i) * N + n, out[i] + b);
        }
    }
}

// -- entry points (qc_abi.h) --------------------------------------------------------------------------------------
static int prepare_mx_call(const qc_call* c) {
    mx_prepare(c->x, c->x_bf16, c->M, c->K, c->ints[1], (int)c->ints[2], mx_format_of(c->ints[0]), (float*)c->y,
               c->threads);
    return 0;
}
QC_KERNEL(prepare_mx, prepare_mx_call)

static int linear_mx_call(const qc_call* c) {
    const mx_format f = mx_format_of(c->ints[0]);
    const int64_t Kp = c->ints[1];
    float table[256], units[256];
    mx_table(f, table);
    for (int s = 0; s < 256; s++) units[s] = mx_e8m0_value((uint8_t)s);
    float* xp = (float*)scratch_alloc((size_t)(c->M * Kp) * sizeof(float));
    if (!xp) return 1;
    mx_prepare(c->x, c->x_bf16, c->M, c->K, Kp, (int)c->ints[2], f, xp, c->threads);
    const uint8_t* qweight = (const uint8_t*)c->tensors[0];
    const uint8_t* scales = (const uint8_t*)c->tensors[1];
    if (f.bits == 6)
        mx_rows<6>(xp, c->M, Kp, qweight, scales, table, units, c->N, c->bias, c->y, c->y_bf16, c->threads);
    else
        mx_rows<8>(xp, c->M, Kp, qweight, scales, table, units, c->N, c->bias, c->y, c->y_bf16, c->threads);
    free(xp);
    return 0;
}
QC_KERNEL(linear_mx, linear_mx_call)

// Rows n0..n1 of w, float32 [n1 - n0, Kp].
template <int BITS>
static void mx_dequant_rows(const uint8_t* qweight, const uint8_t* scales, int64_t Kp, int64_t n0, int64_t n1,
                            const float* table, const float* units, float* out, int threads) {
    constexpr int V = 16 / W;
    const int64_t G = Kp / 32, row_bytes = Kp * BITS / 8;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = n0; n < n1; n++) {
        const mx_lut lut = mx_lut_load(table, BITS);
        const uint8_t* row = qweight + n * row_bytes;
        float* o = out + (n - n0) * Kp;
        for (int64_t b = 0; b < Kp / 16; b++) {
            vf w[V];
            mx_decode16(row + b * 2 * BITS, lut, BITS, w);
            const vf unit = vf_bcast(units[scales[n * G + (b >> 1)]]);
            for (int i = 0; i < V; i++) mx_store(o + b * 16 + i * W, mx_mul(w[i], unit));
        }
    }
}

static int dequant_mx_call(const qc_call* c) {
    const mx_format f = mx_format_of(c->ints[0]);
    float table[256], units[256];
    mx_table(f, table);
    for (int s = 0; s < 256; s++) units[s] = mx_e8m0_value((uint8_t)s);
    const uint8_t* qweight = (const uint8_t*)c->tensors[0];
    const uint8_t* scales = (const uint8_t*)c->tensors[1];
    const int64_t Kp = c->ints[1], n0 = c->ints[3], n1 = c->ints[4];
    if (f.bits == 6)
        mx_dequant_rows<6>(qweight, scales, Kp, n0, n1, table, units, (float*)c->y, c->threads);
    else
        mx_dequant_rows<8>(qweight, scales, Kp, n0, n1, table, units, (float*)c->y, c->threads);
    return 0;
}
QC_KERNEL(dequant_mx, dequant_mx_call)
