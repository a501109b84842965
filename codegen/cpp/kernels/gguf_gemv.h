// One-token (decode) form of linear_gguf for the types of 32-element blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL.
//
// Same call and result as linear_gguf's exact float form (gguf_linear.h), for M <= GGUF_GEMV_TOKENS tokens on the
// AVX2 and AVX-512 variants: each block's codes go from its bytes straight into float registers (no int8 row in a
// scratch buffer), W elements at a time, and
//   y[m, n] = sum_b d_b * (sum_e s[e] * x[m, e]) + sum_b m_b * (sum_e x[m, e])     (e over block b's 32 elements)
// with float32 FMAs (the second sum only for the types with a min, Q4_1 and Q5_1; the block sums of x come from
// gguf_prepare_f). It differs from the reference (dequantize, then F.linear) by float32 summation order only.
// Each thread takes one contiguous range of output rows: one sequential stream of blocks per thread, which the
// hardware prefetchers follow (interleaved chunks of 16 rows, a few KiB each, left a decode step's small layers
// reading at a third of the speed); each output is computed by one thread, so results do not depend on the
// thread count. gguf_gemv returns false for the calls it does not take (other types, more tokens, the scalar
// variant), which the row-scratch path of gguf_linear.h then serves.

constexpr int64_t GGUF_GEMV_TOKENS = 8;

#if defined(__AVX2__)

static inline float gguf_gemv_half(const uint8_t* p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

// W bytes from p as int32 lanes (zero- or sign-extended)
#if defined(__AVX512F__)
typedef __m512i gguf_vi;
static inline gguf_vi gguf_gemv_u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
static inline gguf_vi gguf_gemv_s8(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)); }
static inline gguf_vi gguf_gemv_and(gguf_vi v, int m) { return _mm512_and_si512(v, _mm512_set1_epi32(m)); }
static inline gguf_vi gguf_gemv_shr(gguf_vi v, int s) { return _mm512_srli_epi32(v, s); }
static inline gguf_vi gguf_gemv_add(gguf_vi v, int c) { return _mm512_add_epi32(v, _mm512_set1_epi32(c)); }
static inline vf gguf_gemv_float(gguf_vi v) { return _mm512_cvtepi32_ps(v); }
static inline vf gguf_gemv_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
// bit j of `bits` (j = 0..W-1) as 16 in lane j, else 0
static inline gguf_vi gguf_gemv_high(uint32_t bits) {
    return _mm512_maskz_mov_epi32((__mmask16)(bits & 0xffffu), _mm512_set1_epi32(16));
}
static inline gguf_vi gguf_gemv_or(gguf_vi a, gguf_vi b) { return _mm512_or_si512(a, b); }
// IQ4_NL's 16 values looked up by the codes 0..15
static inline gguf_vi gguf_gemv_kvalues(gguf_vi codes) {
    const __m512i table = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)GGUF_KVALUES));
    return _mm512_permutexvar_epi32(codes, table);
}
#else
typedef __m256i gguf_vi;
static inline gguf_vi gguf_gemv_u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
static inline gguf_vi gguf_gemv_s8(const uint8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
static inline gguf_vi gguf_gemv_and(gguf_vi v, int m) { return _mm256_and_si256(v, _mm256_set1_epi32(m)); }
static inline gguf_vi gguf_gemv_shr(gguf_vi v, int s) { return _mm256_srli_epi32(v, s); }
static inline gguf_vi gguf_gemv_add(gguf_vi v, int c) { return _mm256_add_epi32(v, _mm256_set1_epi32(c)); }
static inline vf gguf_gemv_float(gguf_vi v) { return _mm256_cvtepi32_ps(v); }
static inline vf gguf_gemv_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline gguf_vi gguf_gemv_high(uint32_t bits) {
    const __m256i lanes = _mm256_srlv_epi32(_mm256_set1_epi32((int)bits), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_slli_epi32(_mm256_and_si256(lanes, _mm256_set1_epi32(1)), 4);
}
static inline gguf_vi gguf_gemv_or(gguf_vi a, gguf_vi b) { return _mm256_or_si256(a, b); }
static inline gguf_vi gguf_gemv_kvalues(gguf_vi codes) {
    const __m256i lo = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)GGUF_KVALUES));
    const __m256i hi = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(GGUF_KVALUES + 8)));
    const __m256i low = _mm256_permutevar8x32_epi32(lo, codes), high = _mm256_permutevar8x32_epi32(hi, codes);
    return _mm256_blendv_epi8(low, high, _mm256_cmpgt_epi32(codes, _mm256_set1_epi32(7)));
}
#endif

// The codes of elements u*W .. u*W+W-1 of a block as floats (s of gguf.h's table: q-8, q-16, q, KVALUES[q]).
struct gguf_gemv_q4_0 {
    static constexpr int ID = 2, BYTES = 18;
    static constexpr bool MIN = false;
    static inline vf codes(const uint8_t* b, int u) {
        const gguf_vi v = gguf_gemv_u8(b + 2 + (u * W) % 16);
        return gguf_gemv_float(gguf_gemv_add(u * W < 16 ? gguf_gemv_and(v, 15) : gguf_gemv_shr(v, 4), -8));
    }
};
struct gguf_gemv_q4_1 {
    static constexpr int ID = 3, BYTES = 20;
    static constexpr bool MIN = true;
    static inline vf codes(const uint8_t* b, int u) {
        const gguf_vi v = gguf_gemv_u8(b + 4 + (u * W) % 16);
        return gguf_gemv_float(u * W < 16 ? gguf_gemv_and(v, 15) : gguf_gemv_shr(v, 4));
    }
};
template <int QS, int QH, int OFFSET>
static inline vf gguf_gemv_five(const uint8_t* b, int u) {
    const gguf_vi v = gguf_gemv_u8(b + QS + (u * W) % 16);
    uint32_t qh;
    memcpy(&qh, b + QH, 4);
    const gguf_vi low = u * W < 16 ? gguf_gemv_and(v, 15) : gguf_gemv_shr(v, 4);
    return gguf_gemv_float(gguf_gemv_add(gguf_gemv_or(low, gguf_gemv_high(qh >> (u * W))), OFFSET));
}
struct gguf_gemv_q5_0 {
    static constexpr int ID = 6, BYTES = 22;
    static constexpr bool MIN = false;
    static inline vf codes(const uint8_t* b, int u) { return gguf_gemv_five<6, 2, -16>(b, u); }
};
struct gguf_gemv_q5_1 {
    static constexpr int ID = 7, BYTES = 24;
    static constexpr bool MIN = true;
    static inline vf codes(const uint8_t* b, int u) { return gguf_gemv_five<8, 4, 0>(b, u); }
};
struct gguf_gemv_q8_0 {
    static constexpr int ID = 8, BYTES = 34;
    static constexpr bool MIN = false;
    static inline vf codes(const uint8_t* b, int u) { return gguf_gemv_float(gguf_gemv_s8(b + 2 + u * W)); }
};
struct gguf_gemv_iq4_nl {
    static constexpr int ID = 20, BYTES = 18;
    static constexpr bool MIN = false;
    static inline vf codes(const uint8_t* b, int u) {
        const gguf_vi v = gguf_gemv_u8(b + 2 + (u * W) % 16);
        return gguf_gemv_float(gguf_gemv_kvalues(u * W < 16 ? gguf_gemv_and(v, 15) : gguf_gemv_shr(v, 4)));
    }
};

// sum_e s[e] * x[e] over block b's 32 elements, as a vector of W partial sums
template <class T>
static inline vf gguf_gemv_block(const uint8_t* b, const float* x) {
    vf t = gguf_gemv_mul(T::codes(b, 0), vf_load(x));
    for (int u = 1; u < 32 / W; u++) t = vf_fma(T::codes(b, u), vf_load(x + u * W), t);
    return t;
}

// One token, row `row`: out without bias. Two blocks per step into two accumulators (FMA latency).
template <class T>
static inline float gguf_gemv_one(const uint8_t* row, int64_t nb, const float* xf, const float* xs) {
    vf acc0 = vf_zero(), acc1 = vf_zero();
    float low0 = 0.0f, low1 = 0.0f;
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
        const uint8_t* b = row + i * T::BYTES;
        acc0 = vf_fma(vf_bcast(gguf_gemv_half(b)), gguf_gemv_block<T>(b, xf + i * 32), acc0);
        acc1 = vf_fma(vf_bcast(gguf_gemv_half(b + T::BYTES)), gguf_gemv_block<T>(b + T::BYTES, xf + i * 32 + 32),
                      acc1);
        if (T::MIN) {
            low0 += gguf_gemv_half(b + 2) * (xs[2 * i] + xs[2 * i + 1]);
            low1 += gguf_gemv_half(b + T::BYTES + 2) * (xs[2 * i + 2] + xs[2 * i + 3]);
        }
    }
    if (i < nb) {
        const uint8_t* b = row + i * T::BYTES;
        acc0 = vf_fma(vf_bcast(gguf_gemv_half(b)), gguf_gemv_block<T>(b, xf + i * 32), acc0);
        if (T::MIN) low0 += gguf_gemv_half(b + 2) * (xs[2 * i] + xs[2 * i + 1]);
    }
    return vf_hsum(vf_add(acc0, acc1)) + (low0 + low1);
}

// MT tokens (x rows Kq apart, sums of 16 xs rows Kq / 16 apart), row `row`: out[m] without bias; each block's codes
// are decoded once for the MT tokens.
template <class T, int MT>
static inline void gguf_gemv_row(const uint8_t* row, int64_t nb, const float* xf, const float* xs, int64_t Kq,
                                 float* out) {
    if (MT == 1) {
        out[0] = gguf_gemv_one<T>(row, nb, xf, xs);
        return;
    }
    vf acc[MT];
    float low[MT];
    for (int m = 0; m < MT; m++) acc[m] = vf_zero(), low[m] = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t* b = row + i * T::BYTES;
        const vf d = vf_bcast(gguf_gemv_half(b));
        const float mn = T::MIN ? gguf_gemv_half(b + 2) : 0.0f;
        vf c[32 / W];
        for (int u = 0; u < 32 / W; u++) c[u] = T::codes(b, u);
        for (int m = 0; m < MT; m++) {
            const float* x = xf + m * Kq + i * 32;
            vf t = gguf_gemv_mul(c[0], vf_load(x));
            for (int u = 1; u < 32 / W; u++) t = vf_fma(c[u], vf_load(x + u * W), t);
            acc[m] = vf_fma(d, t, acc[m]);
            if (T::MIN) low[m] += mn * (xs[m * (Kq / 16) + 2 * i] + xs[m * (Kq / 16) + 2 * i + 1]);
        }
    }
    for (int m = 0; m < MT; m++) out[m] = vf_hsum(acc[m]) + low[m];
}

template <class T, int MT>
static void gguf_gemv_tokens(const qc_call* c, const float* xf, const float* xs, int64_t Kq, int64_t m0) {
    const int64_t N = c->N, nb = (c->K + 31) / 32, row_bytes = nb * T::BYTES;
    const uint8_t* blocks = (const uint8_t*)c->tensors[0];
#pragma omp parallel for schedule(static) num_threads(c->threads)
    for (int64_t n = 0; n < N; n++) {
        float out[MT];
        gguf_gemv_row<T, MT>(blocks + n * row_bytes, nb, xf + m0 * Kq, xs ? xs + m0 * (Kq / 16) : nullptr, Kq,
                             out);
        const float bias = c->bias ? c->bias[n] : 0.0f;
        for (int m = 0; m < MT; m++) store_output(c->y, c->y_bf16, (m0 + m) * N + n, out[m] + bias);
    }
}

template <class T>
static void gguf_gemv_type(const qc_call* c, const float* xf, const float* xs, int64_t Kq) {
    for (int64_t m0 = 0; m0 < c->M; m0 += 4) {
        switch (min_i64(4, c->M - m0)) {
            case 4: gguf_gemv_tokens<T, 4>(c, xf, xs, Kq, m0); break;
            case 3: gguf_gemv_tokens<T, 3>(c, xf, xs, Kq, m0); break;
            case 2: gguf_gemv_tokens<T, 2>(c, xf, xs, Kq, m0); break;
            default: gguf_gemv_tokens<T, 1>(c, xf, xs, Kq, m0); break;
        }
    }
}

static bool gguf_gemv(const qc_call* c, int type, const float* xf, const float* xs, int64_t Kq) {
    if (c->M > GGUF_GEMV_TOKENS) return false;
    switch (type) {
#define GGUF_GEMV_CASE(T) \
    case T::ID: gguf_gemv_type<T>(c, xf, xs, Kq); return true;
        GGUF_GEMV_CASE(gguf_gemv_q4_0)
        GGUF_GEMV_CASE(gguf_gemv_q4_1)
        GGUF_GEMV_CASE(gguf_gemv_q5_0)
        GGUF_GEMV_CASE(gguf_gemv_q5_1)
        GGUF_GEMV_CASE(gguf_gemv_q8_0)
        GGUF_GEMV_CASE(gguf_gemv_iq4_nl)
#undef GGUF_GEMV_CASE
    }
    return false;
}

#if defined(__AVX512F__)
// -- the int8-activation form (linear_gguf_q8) of Q4_0, Q4_1 and Q8_0, up to GGUF_GEMV_Q8_TOKENS tokens ------------
// The activations as gguf_prepare_q8 makes them (xq int8 per block of 32 with dx = amax / 127, x4 = -128 * sums of
// 4); per block dx_b and dx_b * (sum of its xq) are gathered once per call. Q4 types take 4 blocks a step: their 4 x 16
// code bytes in one register, low nibbles (elements 0..15 of each block) and high nibbles (16..31) against the
// activations reordered the same way once per call; vpdpbusd gives exact int32 sums, which are scaled by d_b * dx_b
// in float32 (Q4_0's -8 and Q4_1's min enter as d_b * -8, m_b times dx_b * sum xq). Q8_0 takes 2 blocks a step
// (codes + 128 against xq, started at x4). Integer sums as gguf_linear.h's q8 tiles; float32 order differs.
constexpr int64_t GGUF_GEMV_Q8_TOKENS = 4;

static inline __m128 gguf_q8_halves4(const uint8_t* p, int64_t stride) {
    uint16_t h[4];
    for (int j = 0; j < 4; j++) memcpy(h + j, p + j * stride, 2);
    return _mm_cvtph_ps(_mm_setr_epi16((short)h[0], (short)h[1], (short)h[2], (short)h[3], 0, 0, 0, 0));
}

static inline __m512 gguf_q8_lanes4(__m128 v) {  // lanes 4j..4j+3 = v[j]
    return _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                                 _mm512_castps128_ps512(v));
}

// One token, one Q4 row: sum_b d_b dx_b (q . xq) + (Q4_1) m_b dx_b sum xq, (Q4_0) - 8 d_b dx_b sum xq.
template <int QS, int BYTES, bool MIN>
static inline float gguf_q8_row_q4(const uint8_t* row, int64_t nb, const int8_t* xr, const int8_t* xq,
                                   const float* dxb, const float* xsb) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512 acc = _mm512_setzero_ps();
    __m128 side = _mm_setzero_ps();
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
        const uint8_t* p = row + b * BYTES;
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)(p + QS)));
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(p + BYTES + QS)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(p + 2 * BYTES + QS)), 2);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(p + 3 * BYTES + QS)), 3);
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        const int8_t* x = xr + b * 32;
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void*)x));
        dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512((const void*)(x + 64)));
        const __m128 d = gguf_q8_halves4(p, BYTES);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), gguf_q8_lanes4(_mm_mul_ps(d, _mm_loadu_ps(dxb + b))), acc);
        const __m128 sums = _mm_loadu_ps(xsb + b);
        side = MIN ? _mm_fmadd_ps(gguf_q8_halves4(p + 2, BYTES), sums, side)
                   : _mm_fmadd_ps(_mm_mul_ps(d, _mm_set1_ps(-8.0f)), sums, side);
    }
    float total = _mm512_reduce_add_ps(acc);
    __m128 t = _mm_add_ps(side, _mm_movehl_ps(side, side));
    total += _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
    for (; b < nb; b++) {  // the last blocks one at a time, activations in element order
        const uint8_t* p = row + b * BYTES;
        const __m128i v = _mm_loadu_si128((const __m128i*)(p + QS));
        const __m256i codes = _mm256_setr_m128i(_mm_and_si128(v, _mm_set1_epi8(0x0f)),
                                                _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0f)));
        const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), codes,
                                                _mm256_loadu_si256((const __m256i*)(xq + b * 32)));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(dot), _mm256_extracti128_si256(dot, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        const float d = gguf_gemv_half(p);
        total += d * dxb[b] * (float)_mm_cvtsi128_si32(s4) + (MIN ? gguf_gemv_half(p + 2) : -8.0f * d) * xsb[b];
    }
    return total;
}

// One token, one Q8_0 row: sum_b d_b dx_b (q . xq), two blocks a step.
static inline float gguf_q8_row_q8_0(const uint8_t* row, int64_t nb, const int8_t* xq, const int32_t* x4,
                                     const float* dxb) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 acc = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        const uint8_t* p = row + b * 34;
        __m512i v = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(p + 2)));
        v = _mm512_xor_si512(_mm512_inserti64x4(v, _mm256_loadu_si256((const __m256i*)(p + 36)), 1), flip);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_loadu_si512((const void*)(x4 + b * 8)), v,
                                                _mm512_loadu_si512((const void*)(xq + b * 32)));
        const __m512 scale = _mm512_castpd_ps(_mm512_insertf64x4(
            _mm512_castps_pd(_mm512_set1_ps(gguf_gemv_half(p) * dxb[b])),
            _mm256_castps_pd(_mm256_set1_ps(gguf_gemv_half(p + 34) * dxb[b + 1])), 1));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc);
    }
    float total = _mm512_reduce_add_ps(acc);
    for (; b < nb; b++) {
        const uint8_t* p = row + b * 34;
        const __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(p + 2)), _mm256_set1_epi8((char)0x80));
        const __m256i dot = _mm256_dpbusd_epi32(_mm256_loadu_si256((const __m256i*)(x4 + b * 8)), v,
                                                _mm256_loadu_si256((const __m256i*)(xq + b * 32)));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(dot), _mm256_extracti128_si256(dot, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        total += gguf_gemv_half(p) * dxb[b] * (float)_mm_cvtsi128_si32(s4);
    }
    return total;
}

// xq [M, Kq], dxl and x4 [M, Kq / 4] from gguf_prepare_q8 (blocks of 32); returns false for calls it does not take.
static bool gguf_gemv_q8(const qc_call* c, int type, const int8_t* xq, const float* dxl, const int32_t* x4,
                         int64_t Kq) {
    if (c->M > GGUF_GEMV_Q8_TOKENS || (type != 2 && type != 3 && type != 8)) return false;
    const int64_t M = c->M, N = c->N, nb = (c->K + 31) / 32;
    const int64_t bytes = type == 2 ? 18 : type == 3 ? 20 : 34, row_bytes = nb * bytes;
    float* dxb = (float*)scratch_alloc((size_t)(M * nb) * sizeof(float));
    float* xsb = (float*)scratch_alloc((size_t)(M * nb) * sizeof(float));
    int8_t* xr = (int8_t*)scratch_alloc((size_t)(M * nb * 32));
    if (!dxb || !xsb || !xr) {
        free(dxb), free(xsb), free(xr);
        return false;  // the row-scratch path reports the allocation failure
    }
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            const int8_t* x = xq + m * Kq + b * 32;
            int32_t sum = 0;
            for (int e = 0; e < 32; e++) sum += x[e];
            dxb[m * nb + b] = dxl[m * (Kq / 4) + b * 8];
            xsb[m * nb + b] = dxb[m * nb + b] * (float)sum;
            if (b >= nb / 4 * 4) continue;  // only full groups of 4 blocks are reordered
            int8_t* r = xr + m * nb * 32 + (b / 4) * 128 + (b % 4) * 16;
            memcpy(r, x, 16);
            memcpy(r + 64, x + 16, 16);
        }
    const uint8_t* blocks = (const uint8_t*)c->tensors[0];
#pragma omp parallel for schedule(static) num_threads(c->threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* row = blocks + n * row_bytes;
        for (int64_t m = 0; m < M; m++) {
            const int8_t* x = xq + m * Kq;
            const float *d = dxb + m * nb, *s = xsb + m * nb;
            float y;
            if (type == 2)
                y = gguf_q8_row_q4<2, 18, false>(row, nb, xr + m * nb * 32, x, d, s);
            else if (type == 3)
                y = gguf_q8_row_q4<4, 20, true>(row, nb, xr + m * nb * 32, x, d, s);
            else
                y = gguf_q8_row_q8_0(row, nb, x, x4 + m * (Kq / 4), d);
            store_output(c->y, c->y_bf16, m * N + n, y + (c->bias ? c->bias[n] : 0.0f));
        }
    }
    free(dxb), free(xsb), free(xr);
    return true;
}
#else
static bool gguf_gemv_q8(const qc_call*, int, const int8_t*, const float*, const int32_t*, int64_t) { return false; }
#endif

#else  // scalar variant: the row-scratch path of gguf_linear.h serves every call

static bool gguf_gemv(const qc_call*, int, const float*, const float*, int64_t) { return false; }
static bool gguf_gemv_q8(const qc_call*, int, const int8_t*, const float*, const int32_t*, int64_t) { return false; }

#endif
