// GGUF (llama.cpp) block kernels for the `gguf` family (qcompile/schemes/gguf.py, layouts in gguf_blocks.py):
// y = x @ w.T + bias with w[n, :] decoded from ggml's blocks, for the 12 types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K,
// Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS.
//
// Shapes and dtypes: x float32 or bfloat16 [M, K]; blocks uint8 [N, nb * BYTES] with nb = ceil(K / QK) (ggml's
// blocks unchanged, row by row; padding elements k >= K meet zero activations); bias float32 [N] or NULL; y [M, N]
// float32 or bfloat16. Parameters (qc_call.ints): [0] the ggml type id (2, 3, 6, 7, 8, 10..14, 20, 23); dequant_gguf
// also [1] n0, [2] n1. An unknown type id returns 2.
//
// Every type decodes a block into signed integers s[e] (element order, int8) and float32 factors per 16 elements,
// ds[e / 16] and dm[e / 16], with w[e] = ds * s - dm in ggml's float operations (`(d*sc)*q - dmin*m`, ...):
//   Q4_0 s = q-8, ds = d | Q4_1 s = q, ds = d, dm = -m | Q5_0 s = q-16 | Q5_1 as Q4_1 | Q8_0 s = q | Q2_K s = q,
//   ds = d*sc, dm = dmin*m | Q3_K s = q-4, ds = d*(sc-32) | Q4_K, Q5_K s = q, ds = d*sc, dm = dmin*m | Q6_K s = q-32,
//   ds = d*sc | IQ4_NL s = KVALUES[q], ds = d | IQ4_XS s = KVALUES[q], ds = d*(ls-32).
// The bit work runs 32 bytes at a time (AVX2 in both vector variants), the f16 fields of 8 blocks at once. A thread
// decodes weight rows into its scratch (K int8 + K/8 floats per row) and runs every token against them: one row at a
// time for one token, GGUF_NR rows (4 with AVX-512, 2 otherwise) for more, tokens 4 at a time. Kernels:
//   linear_gguf:    the exact float form: sum_e (ds * s[e]) * x[e] in float32 FMAs, minus sum_c dm[c] * (the sum of
//                   x over the 16 elements c). Up to 8 tokens of the 32-element types (Q4_0 .. Q8_0, IQ4_NL) take
//                   the register form of kernels/gguf_gemv.h instead (AVX2, AVX-512).
//   linear_gguf_q8: llama.cpp's form (ggml_vec_dot_<type>_q8_0 / _q8_K): per token and block of QA = QK activations
//                   (32, or 256 as Q8_K), dx = amax / 127 (float32), xq = clamp(rint(x / dx), -127, 127) (round half
//                   to even; 0 where amax is 0; dx NaN where the block holds a NaN or infinity); then y = sum over
//                   groups of 4 elements of (ds * dx) * (sum s * xq), minus sum_c dm[c] * dx * (sum of xq over c):
//                   the integer sums are exact (AVX-512 VNNI vpdpbusd on
//                   s + 128 with -128 * sum(xq) as the start value; AVX2 vpmaddubsw on |s| and sign(xq, s), pairs at
//                   most 2 * 128 * 127; scalar int32), the scales are applied in float32. Up to 4 tokens of Q4_0,
//                   Q4_1 and Q8_0 take kernels/gguf_gemv.h's register form on AVX-512 (the same integer sums).
//   dequant_gguf:   rows n0..n1 of w [n1 - n0, K]: float32 bit for bit gguf_blocks.dequantize, or bfloat16 (y_bf16)
//                   rounded to nearest even as torch's .to(torch.bfloat16) (reads no x).
// Threads take chunks of 8 output rows (dynamic); each output is computed by one thread, so results do not depend
// on the thread count.

// -- block decoders ------------------------------------------------------------------------------------------------
static const int8_t GGUF_KVALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// IEEE half (little-endian bytes) -> float, exact (subnormals, infinities and NaN included).
static inline float gguf_half(const uint8_t* p) {
    const uint32_t h = (uint32_t)p[0] | ((uint32_t)p[1] << 8);
    const uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 31, m = h & 1023;
    if (e == 0) {
        const float v = (float)m * 5.9604644775390625e-8f;  // m * 2**-24
        return sign ? -v : v;
    }
    const uint32_t bits = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112) << 23) | (m << 13));
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// 32 bytes at a time (AVX2, shared by the avx2 and avx512 variants; plain loops in the scalar one). Every value
// stays within its byte: (v >> shift) & mask, or, left shifts of values below 4 by at most 4, wrapping subtraction.
#if defined(__AVX2__)
typedef __m256i gguf_v32;
static inline gguf_v32 gguf_load32(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline void gguf_store32(int8_t* s, gguf_v32 v) { _mm256_storeu_si256((__m256i*)s, v); }
static inline gguf_v32 gguf_bits(gguf_v32 v, int shift, int mask) {
    return _mm256_and_si256(_mm256_srli_epi16(v, shift), _mm256_set1_epi8((char)mask));
}
static inline gguf_v32 gguf_or(gguf_v32 a, gguf_v32 b) { return _mm256_or_si256(a, b); }
static inline gguf_v32 gguf_shl(gguf_v32 v, int shift) { return _mm256_slli_epi16(v, shift); }
static inline gguf_v32 gguf_sub(gguf_v32 v, int c) { return _mm256_sub_epi8(v, _mm256_set1_epi8((char)c)); }
// 16 packed bytes -> 32 codes: the low nibbles of p[0..15], then the high ones.
static inline gguf_v32 gguf_nibbles(const uint8_t* p) {
    const __m128i v = _mm_loadu_si128((const __m128i*)p), mask = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
}
// 4 bytes, a little-endian u32 -> 32 bytes: byte j = bit j (0 or 1).
static inline gguf_v32 gguf_bits32(const uint8_t* p) {
    uint32_t x;
    memcpy(&x, p, 4);
    const __m256i spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    const __m256i bytes = _mm256_or_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)x), spread),
                                          _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));  // all ones where the bit is set
    return _mm256_and_si256(_mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(1));
}
// codes 0..15 -> KVALUES[code]
static inline gguf_v32 gguf_lookup(gguf_v32 codes) {
    const __m128i table = _mm_loadu_si128((const __m128i*)GGUF_KVALUES);
    return _mm256_shuffle_epi8(_mm256_set_m128i(table, table), codes);
}
#else
struct gguf_v32 {
    uint8_t b[32];
};
static inline gguf_v32 gguf_load32(const uint8_t* p) {
    gguf_v32 v;
    memcpy(v.b, p, 32);
    return v;
}
static inline void gguf_store32(int8_t* s, gguf_v32 v) { memcpy(s, v.b, 32); }
static inline gguf_v32 gguf_bits(gguf_v32 v, int shift, int mask) {
    for (int i = 0; i < 32; i++) v.b[i] = (uint8_t)((v.b[i] >> shift) & mask);
    return v;
}
static inline gguf_v32 gguf_or(gguf_v32 a, gguf_v32 b) {
    for (int i = 0; i < 32; i++) a.b[i] |= b.b[i];
    return a;
}
static inline gguf_v32 gguf_shl(gguf_v32 v, int shift) {
    for (int i = 0; i < 32; i++) v.b[i] = (uint8_t)(v.b[i] << shift);
    return v;
}
static inline gguf_v32 gguf_sub(gguf_v32 v, int c) {
    for (int i = 0; i < 32; i++) v.b[i] = (uint8_t)(v.b[i] - c);
    return v;
}
static inline gguf_v32 gguf_nibbles(const uint8_t* p) {
    gguf_v32 v;
    for (int j = 0; j < 16; j++) {
        v.b[j] = p[j] & 15;
        v.b[j + 16] = p[j] >> 4;
    }
    return v;
}
static inline gguf_v32 gguf_bits32(const uint8_t* p) {
    gguf_v32 v;
    for (int j = 0; j < 32; j++) v.b[j] = (p[j / 8] >> (j % 8)) & 1;
    return v;
}
static inline gguf_v32 gguf_lookup(gguf_v32 codes) {
    for (int i = 0; i < 32; i++) codes.b[i] = (uint8_t)GGUF_KVALUES[codes.b[i] & 15];
    return codes;
}
#endif

// n <= 8 halves at p, p + stride, ... -> float (eight at once with AVX2 integer operations, exact like gguf_half).
static inline void gguf_halves(const uint8_t* p, int64_t stride, int n, float* out) {
#if defined(__AVX2__)
    if (n == 8) {
        uint16_t h[8];
        for (int i = 0; i < 8; i++) memcpy(h + i, p + i * stride, 2);
        __m128i raw = _mm_cvtsi32_si128(h[0]);
        raw = _mm_insert_epi16(raw, h[1], 1);
        raw = _mm_insert_epi16(raw, h[2], 2);
        raw = _mm_insert_epi16(raw, h[3], 3);
        raw = _mm_insert_epi16(raw, h[4], 4);
        raw = _mm_insert_epi16(raw, h[5], 5);
        raw = _mm_insert_epi16(raw, h[6], 6);
        raw = _mm_insert_epi16(raw, h[7], 7);
        const __m256i v = _mm256_cvtepu16_epi32(raw), em = _mm256_and_si256(v, _mm256_set1_epi32(0x7fff));
        const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0x8000)), 16);
        const __m256i shifted = _mm256_slli_epi32(em, 13);
        const __m256i normal = _mm256_blendv_epi8(_mm256_add_epi32(shifted, _mm256_set1_epi32(112 << 23)),
                                                  _mm256_or_si256(shifted, _mm256_set1_epi32(0x7f800000)),
                                                  _mm256_cmpgt_epi32(em, _mm256_set1_epi32(0x7bff)));  // inf, NaN
        const __m256 subnormal = _mm256_mul_ps(_mm256_cvtepi32_ps(em), _mm256_set1_ps(5.9604644775390625e-8f));
        const __m256i bits = _mm256_blendv_epi8(normal, _mm256_castps_si256(subnormal),
                                                _mm256_cmpgt_epi32(_mm256_set1_epi32(0x400), em));
        _mm256_storeu_ps(out, _mm256_castsi256_ps(_mm256_or_si256(bits, sign)));
        return;
    }
#endif
    for (int i = 0; i < n; i++) out[i] = gguf_half(p + i * stride);
}

// 16 bytes of scale codes, kept in a register (built from 32-bit words, or loaded from the block).
#if defined(__AVX2__)
typedef __m128i gguf_b16;
static inline gguf_b16 gguf_b16_words(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3) {
    return _mm_set_epi32((int)w3, (int)w2, (int)w1, (int)w0);
}
static inline gguf_b16 gguf_b16_load(const uint8_t* p) { return _mm_loadu_si128((const __m128i*)p); }
static inline gguf_b16 gguf_b16_bits(gguf_b16 v, int shift, int mask) {
    return _mm_and_si128(_mm_srli_epi16(v, shift), _mm_set1_epi8((char)mask));
}
#else
struct gguf_b16 {
    uint8_t b[16];
};
static inline gguf_b16 gguf_b16_words(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3) {
    const uint32_t w[4] = {w0, w1, w2, w3};
    gguf_b16 v;
    memcpy(v.b, w, 16);
    return v;
}
static inline gguf_b16 gguf_b16_load(const uint8_t* p) {
    gguf_b16 v;
    memcpy(v.b, p, 16);
    return v;
}
static inline gguf_b16 gguf_b16_bits(gguf_b16 v, int shift, int mask) {
    for (int i = 0; i < 16; i++) v.b[i] = (uint8_t)((v.b[i] >> shift) & mask);
    return v;
}
#endif

// out[j] = d * (float)(code[j] - sub) for the 16 codes (unsigned bytes, or signed with SIGNED): ggml's one product.
template <bool SIGNED>
static inline void gguf_scales16(gguf_b16 codes, int sub, float d, float* out) {
#if defined(__AVX2__)
    for (int h = 0; h < 2; h++) {
        const __m128i raw = h ? _mm_srli_si128(codes, 8) : codes;
        const __m256i v = SIGNED ? _mm256_cvtepi8_epi32(raw) : _mm256_cvtepu8_epi32(raw);
        const __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(v, _mm256_set1_epi32(sub)));
        _mm256_storeu_ps(out + 8 * h, _mm256_mul_ps(_mm256_set1_ps(d), f));
    }
#else
    for (int j = 0; j < 16; j++) out[j] = d * (float)((SIGNED ? (int)(int8_t)codes.b[j] : (int)codes.b[j]) - sub);
#endif
}

// The same for the first 8 codes (unsigned), each value written twice (sub-blocks of 32): out[2j] = out[2j + 1].
static inline void gguf_scales8x2(gguf_b16 codes, int sub, float d, float* out) {
#if defined(__AVX2__)
    const __m256i v = _mm256_sub_epi32(_mm256_cvtepu8_epi32(codes), _mm256_set1_epi32(sub));
    const __m256 f = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(v));
    _mm256_storeu_ps(out, _mm256_permutevar8x32_ps(f, _mm256_set_epi32(3, 3, 2, 2, 1, 1, 0, 0)));
    _mm256_storeu_ps(out + 8, _mm256_permutevar8x32_ps(f, _mm256_set_epi32(7, 7, 6, 6, 5, 5, 4, 4)));
#else
    for (int j = 0; j < 8; j++) out[2 * j] = out[2 * j + 1] = d * (float)((int)codes.b[j] - sub);
#endif
}

// One struct per type: ggml type id, elements and bytes per block, whether it has mins, the byte offsets of its f16
// fields (HALF1 < 0: none), and decode(block, half0, half1) -> s [QK], ds, dm [QK / 16] as the header says.
struct gguf_q4_0 {  // d | qs[16]
    static constexpr int ID = 2, QK = 32, BYTES = 18, HALF0 = 0, HALF1 = -1;
    static constexpr bool MIN = false;
    static inline void decode(const uint8_t* b, float d, float, int8_t* s, float* ds, float*) {
        gguf_store32(s, gguf_sub(gguf_nibbles(b + 2), 8));
        ds[0] = ds[1] = d;
    }
};

struct gguf_q4_1 {  // d | m | qs[16]
    static constexpr int ID = 3, QK = 32, BYTES = 20, HALF0 = 0, HALF1 = 2;
    static constexpr bool MIN = true;
    static inline void decode(const uint8_t* b, float d, float m, int8_t* s, float* ds, float* dm) {
        gguf_store32(s, gguf_nibbles(b + 4));
        ds[0] = ds[1] = d;
        dm[0] = dm[1] = -m;
    }
};

struct gguf_q5_0 {  // d | qh[4] | qs[16]
    static constexpr int ID = 6, QK = 32, BYTES = 22, HALF0 = 0, HALF1 = -1;
    static constexpr bool MIN = false;
    static inline void decode(const uint8_t* b, float d, float, int8_t* s, float* ds, float*) {
        gguf_store32(s, gguf_sub(gguf_or(gguf_nibbles(b + 6), gguf_shl(gguf_bits32(b + 2), 4)), 16));
        ds[0] = ds[1] = d;
    }
};

struct gguf_q5_1 {  // d | m | qh[4] | qs[16]
    static constexpr int ID = 7, QK = 32, BYTES = 24, HALF0 = 0, HALF1 = 2;
    static constexpr bool MIN = true;
    static inline void decode(const uint8_t* b, float d, float m, int8_t* s, float* ds, float* dm) {
        gguf_store32(s, gguf_or(gguf_nibbles(b + 8), gguf_shl(gguf_bits32(b + 4), 4)));
        ds[0] = ds[1] = d;
        dm[0] = dm[1] = -m;
    }
};

struct gguf_q8_0 {  // d | qs i8[32]
    static constexpr int ID = 8, QK = 32, BYTES = 34, HALF0 = 0, HALF1 = -1;
    static constexpr bool MIN = false;
    static inline void decode(const uint8_t* b, float d, float, int8_t* s, float* ds, float*) {
        gguf_store32(s, gguf_load32(b + 2));
        ds[0] = ds[1] = d;
    }
};

struct gguf_q2_k {  // scales[16] | qs[64] | d | dmin
    static constexpr int ID = 10, QK = 256, BYTES = 84, HALF0 = 80, HALF1 = 82;
    static constexpr bool MIN = true;
    static inline void decode(const uint8_t* b, float d, float dmin, int8_t* s, float* ds, float* dm) {
        for (int h = 0; h < 2; h++) {
            const gguf_v32 q = gguf_load32(b + 16 + 32 * h);
            for (int sh = 0; sh < 4; sh++) gguf_store32(s + 128 * h + 32 * sh, gguf_bits(q, 2 * sh, 3));
        }
        const gguf_b16 scales = gguf_b16_load(b);
        gguf_scales16<false>(gguf_b16_bits(scales, 0, 15), 0, d, ds);
        gguf_scales16<false>(gguf_b16_bits(scales, 4, 15), 0, dmin, dm);
    }
};

struct gguf_q3_k {  // hmask[32] | qs[64] | scales[12] | d
    static constexpr int ID = 11, QK = 256, BYTES = 110, HALF0 = 108, HALF1 = -1;
    static constexpr bool MIN = false;
    static inline void decode(const uint8_t* b, float d, float, int8_t* s, float* ds, float*) {
        const gguf_v32 hmask = gguf_load32(b);
        for (int h = 0; h < 2; h++) {
            const gguf_v32 q = gguf_load32(b + 32 + 32 * h);
            for (int sh = 0; sh < 4; sh++) {
                const gguf_v32 high = gguf_shl(gguf_bits(hmask, 4 * h + sh, 1), 2);
                gguf_store32(s + 128 * h + 32 * sh, gguf_sub(gguf_or(gguf_bits(q, 2 * sh, 3), high), 4));
            }
        }
        // the 16 6-bit scales in order (ggml's kmask trick): low 4 bits from bytes 0..7, high 2 from bytes 8..11
        uint32_t a[3];
        memcpy(a, b + 96, 12);
        const uint32_t t = a[2], low = 0x0f0f0f0fu, two = 0x03030303u;
        const gguf_b16 sc = gguf_b16_words((a[0] & low) | ((t & two) << 4), (a[1] & low) | (((t >> 2) & two) << 4),
                                           ((a[0] >> 4) & low) | (((t >> 4) & two) << 4),
                                           ((a[1] >> 4) & low) | (((t >> 6) & two) << 4));
        gguf_scales16<false>(sc, 32, d, ds);
    }
};

// Q4_K (FIVE = 0: d | dmin | scales[12] | qs[128]) and Q5_K (d | dmin | scales[12] | qh[32] | qs[128]).
template <int FIVE>
struct gguf_qk4 {
    static constexpr int ID = FIVE ? 13 : 12, QK = 256, BYTES = FIVE ? 176 : 144, HALF0 = 0, HALF1 = 2;
    static constexpr bool MIN = true;
    static inline void decode(const uint8_t* b, float d, float dmin, int8_t* s, float* ds, float* dm) {
        const gguf_v32 qh = gguf_load32(b + 16);
        for (int c = 0; c < 4; c++) {
            const gguf_v32 q = gguf_load32(b + (FIVE ? 48 : 16) + 32 * c);
            for (int n = 0; n < 2; n++) {
                gguf_v32 v = gguf_bits(q, 4 * n, 15);
                if (FIVE) v = gguf_or(v, gguf_shl(gguf_bits(qh, 2 * c + n, 1), 4));
                gguf_store32(s + 64 * c + 32 * n, v);
            }
        }
        // the 8 6-bit scales, then the 8 mins (get_scale_min_k4 for all j at once, ggml's kmask trick)
        uint32_t u[3];
        memcpy(u, b + 4, 12);
        const uint32_t six = 0x3f3f3f3fu, low = 0x0f0f0f0fu, two = 0x03030303u;
        const uint32_t sc_high = (u[2] & low) | (((u[0] >> 6) & two) << 4);
        const uint32_t m_high = ((u[2] >> 4) & low) | (((u[1] >> 6) & two) << 4);
        gguf_scales8x2(gguf_b16_words(u[0] & six, sc_high, 0, 0), 0, d, ds);
        gguf_scales8x2(gguf_b16_words(u[1] & six, m_high, 0, 0), 0, dmin, dm);
    }
};
typedef gguf_qk4<0> gguf_q4_k;
typedef gguf_qk4<1> gguf_q5_k;

struct gguf_q6_k {  // ql[128] | qh[64] | scales i8[16] | d
    static constexpr int ID = 14, QK = 256, BYTES = 210, HALF0 = 208, HALF1 = -1;
    static constexpr bool MIN = false;
    static inline void decode(const uint8_t* b, float d, float, int8_t* s, float* ds, float*) {
        for (int h = 0; h < 2; h++) {
            const gguf_v32 qh = gguf_load32(b + 128 + 32 * h);
            for (int sh = 0; sh < 4; sh++) {
                const gguf_v32 low = gguf_bits(gguf_load32(b + 64 * h + 32 * (sh & 1)), 4 * (sh >> 1), 15);
                const gguf_v32 high = gguf_shl(gguf_bits(qh, 2 * sh, 3), 4);
                gguf_store32(s + 128 * h + 32 * sh, gguf_sub(gguf_or(low, high), 32));
            }
        }
        gguf_scales16<true>(gguf_b16_load(b + 192), 0, d, ds);
    }
};

struct gguf_iq4_nl {  // d | qs[16]
    static constexpr int ID = 20, QK = 32, BYTES = 18, HALF0 = 0, HALF1 = -1;
    static constexpr bool MIN = false;
    static inline void decode(const uint8_t* b, float d, float, int8_t* s, float* ds, float*) {
        gguf_store32(s, gguf_lookup(gguf_nibbles(b + 2)));
        ds[0] = ds[1] = d;
    }
};

struct gguf_iq4_xs {  // d | scales_h u16 | scales_l[4] | qs[128]
    static constexpr int ID = 23, QK = 256, BYTES = 136, HALF0 = 0, HALF1 = -1;
    static constexpr bool MIN = false;
    static inline void decode(const uint8_t* b, float d, float, int8_t* s, float* ds, float*) {
        for (int j = 0; j < 8; j++) gguf_store32(s + 32 * j, gguf_lookup(gguf_nibbles(b + 8 + 16 * j)));
        const uint32_t scales_h = b[2] | (b[3] << 8);
        uint32_t w[2] = {0, 0};  // ls of sub-block j in byte j
        for (int j = 0; j < 8; j++)
            w[j / 4] |= ((((uint32_t)b[4 + j / 2] >> (4 * (j % 2))) & 15) | (((scales_h >> (2 * j)) & 3) << 4))
                        << (8 * (j % 4));
        gguf_scales8x2(gguf_b16_words(w[0], w[1], 0, 0), 32, d, ds);
    }
};

// A row of nb blocks -> s [nb * QK], ds, dm [nb * QK / 16]; the f16 fields of 8 blocks are converted at once.
template <class T>
static void gguf_decode_row(const uint8_t* row, int64_t nb, int8_t* s, float* ds, float* dm) {
    constexpr int S = T::QK / 16;
    for (int64_t i0 = 0; i0 < nb; i0 += 8) {
        const int count = (int)min_i64(8, nb - i0);
        const uint8_t* b = row + i0 * T::BYTES;
        float h0[8], h1[8] = {0.0f};
        gguf_halves(b + T::HALF0, T::BYTES, count, h0);
        if (T::HALF1 >= 0) gguf_halves(b + (T::HALF1 >= 0 ? T::HALF1 : 0), T::BYTES, count, h1);
        for (int j = 0; j < count; j++)
            T::decode(b + j * T::BYTES, h0[j], h1[j], s + (i0 + j) * T::QK, ds + (i0 + j) * S, dm + (i0 + j) * S);
    }
}

// -- small vector helpers --------------------------------------------------------------------------------------------
#if defined(__AVX512F__)
static inline vf gguf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
#elif defined(__AVX2__)
static inline vf gguf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
#else
static inline vf gguf_mul(vf a, vf b) { return a * b; }
#endif

static inline float gguf_dot(const float* a, const float* b, int64_t n) {
    vf acc = vf_zero();
    int64_t i = 0;
    for (; i + W <= n; i += W) acc = vf_fma(vf_load(a + i), vf_load(b + i), acc);
    float total = vf_hsum(acc);
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

// -- activations -----------------------------------------------------------------------------------------------------
// Kq = the padded row length rounded up to 64 (the scratch and activation rows; columns past K are zero).

// Float form: x -> float32 [M, Kq]; with `xsum`, the sums of every 16 elements [M, Kq / 16].
static void gguf_prepare_f(const void* x, int x_bf16, int64_t M, int64_t K, int64_t Kq, float* xf, float* xsum,
                           int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (M >= 16)
    for (int64_t m = 0; m < M; m++) {
        float* row = xf + m * Kq;
        for (int64_t k = 0; k < K; k++) row[k] = load_activation(x, x_bf16, m * K + k);
        for (int64_t k = K; k < Kq; k++) row[k] = 0.0f;
        if (!xsum) continue;
        for (int64_t c = 0; c < Kq / 16; c++) {
            float t = 0.0f;
            for (int i = 0; i < 16; i++) t += row[16 * c + i];
            xsum[m * (Kq / 16) + c] = t;
        }
    }
}

// Int8 form: per block of QA activations dx = amax / 127, xq = clamp(rint(x / dx), -127, 127) -> int8 [M, Kq];
// dxl [M, Kq / 4] = dx of every 4 elements; with `xs16`, dx * (sum of xq over every 16 elements) [M, Kq / 16]; with
// `x4` (AVX-512), -128 * (sum of xq over every 4 elements) [M, Kq / 4], the start value of vpdpbusd on s + 128.
static void gguf_prepare_q8(const void* x, int x_bf16, int64_t M, int64_t K, int64_t Kq, int64_t QA, int8_t* xq,
                            float* dxl, float* xs16, int32_t* x4, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (M >= 16)
    for (int64_t m = 0; m < M; m++) {
        int8_t* row = xq + m * Kq;
        for (int64_t k0 = 0; k0 < Kq; k0 += QA) {
            const int64_t k1 = min_i64(k0 + QA, Kq), kx = min_i64(k1, K);
            float amax = 0.0f;
            bool finite = true;
            for (int64_t k = k0; k < kx; k++) {
                const float v = fabsf(load_activation(x, x_bf16, m * K + k));
                finite = finite && v < INFINITY;
                amax = fmaxf(amax, v);
            }
            const float d = finite ? amax / 127.0f : NAN;  // a NaN or infinite activation: NaN outputs
            for (int64_t k = k0; k < k1; k++) {
                float q = 0.0f;
                if (k < K && d > 0.0f) {
                    q = fminf(fmaxf(nearbyintf(load_activation(x, x_bf16, m * K + k) / d), -127.0f), 127.0f);
                }
                row[k] = (int8_t)q;
            }
            for (int64_t k = k0; k < k1; k += 4) {
                dxl[m * (Kq / 4) + k / 4] = d;
                if (x4) x4[m * (Kq / 4) + k / 4] = -128 * (row[k] + row[k + 1] + row[k + 2] + row[k + 3]);
            }
            if (xs16)
                for (int64_t k = k0; k < k1; k += 16) {
                    int32_t t = 0;
                    for (int i = 0; i < 16; i++) t += row[k + i];
                    xs16[m * (Kq / 16) + k / 16] = d * (float)t;
                }
        }
    }
}

// -- NR decoded rows against MT tokens -------------------------------------------------------------------------------
// The scratch holds NR rows (s [NR][Kq], ds and dm [NR][Kq / 16]); each activation vector loaded serves NR rows and
// each weight vector MT tokens. One token (decode) takes one row at a time with independent accumulators over K (the
// scratch stays in L1); more tokens take GGUF_NR rows: 4 with AVX-512 (16 accumulators), 2 otherwise.
constexpr int GGUF_NR = W == 16 ? 4 : 2;

// Float form: out[r][m] = sum_e (ds * s[e]) * xf[m, e] - sum_c dm[c] * xsum[m, c] (no bias).
template <int NR, int MT, bool MIN>
static inline void gguf_tile_f(const int8_t* s, const float* ds, const float* dm, int64_t Kq, const float* xf,
                               const float* xsum, float (*out)[4]) {
    constexpr int V = 16 / W;                  // vectors per 16 elements
    constexpr int A = NR * MT == 1 ? 4 : 1;    // independent accumulators (FMA latency)
    const int64_t C = Kq / 16;                 // a multiple of 4
    vf acc[A][NR][MT];
    for (int a = 0; a < A; a++)
        for (int r = 0; r < NR; r++)
            for (int m = 0; m < MT; m++) acc[a][r][m] = vf_zero();
    for (int64_t c0 = 0; c0 < C; c0 += A) {
        for (int a = 0; a < A; a++) {
            const int64_t c = c0 + a;
            for (int i = 0; i < V; i++) {
                const int64_t k = c * 16 + i * W;
                vf w[NR];
                for (int r = 0; r < NR; r++) w[r] = gguf_mul(s8_block(s + r * Kq + k), vf_bcast(ds[r * C + c]));
                for (int m = 0; m < MT; m++) {
                    const vf xv = vf_load(xf + m * Kq + k);
                    for (int r = 0; r < NR; r++) acc[a][r][m] = vf_fma(w[r], xv, acc[a][r][m]);
                }
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int m = 0; m < MT; m++) {
            vf total = acc[0][r][m];
            for (int a = 1; a < A; a++) total = vf_add(total, acc[a][r][m]);
            out[r][m] = vf_hsum(total) - (MIN ? gguf_dot(dm + r * C, xsum + m * C, C) : 0.0f);
        }
}

// Int8 form: out[r][m] = sum over groups of 4 elements of float(sum s * xq) * (ds * dx) - sum_c dm[c] * xs16[m, c].
#if defined(__AVX512F__)
constexpr bool GGUF_LANE_SUMS = true;  // gguf_prepare_q8 fills x4
// 64 elements g: vpdpbusd of s + 128 (uint8) with xq, started at -128 * sum(xq): exact int32 sums of 4 products.
template <int NR, int MT>
static inline void gguf_q8_step(const int8_t* s, const float* ds, int64_t Kq, const int8_t* xq, const float* dxl,
                                const int32_t* x4, int64_t g, __m512 (*acc)[MT]) {
    const int64_t L = Kq / 4, C = Kq / 16;
    const __m512i lane = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512i su[NR];
    __m512 ls[NR];
    for (int r = 0; r < NR; r++) {
        su[r] = _mm512_xor_si512(_mm512_loadu_si512((const void*)(s + r * Kq + 64 * g)), _mm512_set1_epi8((char)0x80));
        ls[r] = _mm512_permutexvar_ps(lane, _mm512_castps128_ps512(_mm_loadu_ps(ds + r * C + 4 * g)));
    }
    for (int m = 0; m < MT; m++) {
        const __m512i xv = _mm512_loadu_si512((const void*)(xq + m * Kq + 64 * g));
        const __m512i start = _mm512_loadu_si512((const void*)(x4 + m * L + 16 * g));
        const __m512 dx = _mm512_loadu_ps(dxl + m * L + 16 * g);
        for (int r = 0; r < NR; r++) {
            const __m512i dp = _mm512_dpbusd_epi32(start, su[r], xv);
            acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), _mm512_mul_ps(ls[r], dx), acc[r][m]);
        }
    }
}
#elif defined(__AVX2__)
constexpr bool GGUF_LANE_SUMS = false;
// 32 elements g: vpmaddubsw of |s| with sign(xq, s), pairs at most 2 * 128 * 127 (no saturation), then vpmaddwd.
template <int NR, int MT>
static inline void gguf_q8_step(const int8_t* s, const float* ds, int64_t Kq, const int8_t* xq, const float* dxl,
                                const int32_t*, int64_t g, __m256 (*acc)[MT]) {
    const int64_t L = Kq / 4, C = Kq / 16;
    __m256i sv[NR], magnitude[NR];
    __m256 ls[NR];
    for (int r = 0; r < NR; r++) {
        sv[r] = _mm256_loadu_si256((const __m256i*)(s + r * Kq + 32 * g));
        magnitude[r] = _mm256_abs_epi8(sv[r]);
        ls[r] = _mm256_permutevar8x32_ps(
            _mm256_castps128_ps256(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i*)(ds + r * C + 2 * g)))),
            _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0));
    }
    for (int m = 0; m < MT; m++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + m * Kq + 32 * g));
        const __m256 dx = _mm256_loadu_ps(dxl + m * L + 8 * g);
        for (int r = 0; r < NR; r++) {
            const __m256i pairs = _mm256_maddubs_epi16(magnitude[r], _mm256_sign_epi8(xv, sv[r]));
            const __m256i dp = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
            acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp), _mm256_mul_ps(ls[r], dx), acc[r][m]);
        }
    }
}
#else
constexpr bool GGUF_LANE_SUMS = false;
// 4 elements g: int32 sums.
template <int NR, int MT>
static inline void gguf_q8_step(const int8_t* s, const float* ds, int64_t Kq, const int8_t* xq, const float* dxl,
                                const int32_t*, int64_t g, float (*acc)[MT]) {
    for (int r = 0; r < NR; r++)
        for (int m = 0; m < MT; m++) {
            int32_t dp = 0;
            for (int i = 0; i < 4; i++) dp += (int32_t)s[r * Kq + 4 * g + i] * (int32_t)xq[m * Kq + 4 * g + i];
            acc[r][m] += (float)dp * (ds[r * (Kq / 16) + g / 4] * dxl[m * (Kq / 4) + g]);
        }
}
#endif

template <int NR, int MT, bool MIN>
static inline void gguf_tile_q(const int8_t* s, const float* ds, const float* dm, int64_t Kq, const int8_t* xq,
                               const float* dxl, const int32_t* x4, const float* xs16, float (*out)[4]) {
    constexpr int A = NR * MT == 1 ? 2 : 1;  // independent accumulators (FMA latency)
    constexpr int E = W == 1 ? 4 : 4 * W;    // elements per step
    const int64_t C = Kq / 16, G = Kq / E;
    vf acc[A][NR][MT];
    for (int a = 0; a < A; a++)
        for (int r = 0; r < NR; r++)
            for (int m = 0; m < MT; m++) acc[a][r][m] = vf_zero();
    int64_t g = 0;
    for (; g + A <= G; g += A)
        for (int a = 0; a < A; a++) gguf_q8_step<NR, MT>(s, ds, Kq, xq, dxl, x4, g + a, acc[a]);
    for (; g < G; g++) gguf_q8_step<NR, MT>(s, ds, Kq, xq, dxl, x4, g, acc[0]);
    for (int r = 0; r < NR; r++)
        for (int m = 0; m < MT; m++) {
            vf total = acc[0][r][m];
            for (int a = 1; a < A; a++) total = vf_add(total, acc[a][r][m]);
            out[r][m] = vf_hsum(total) - (MIN ? gguf_dot(dm + r * C, xs16 + m * C, C) : 0.0f);
        }
}

// -- kernels ---------------------------------------------------------------------------------------------------------
// One type: its block geometry and its row decoder (the only per-type code; the drivers below are shared).
typedef void (*gguf_row_decoder)(const uint8_t* row, int64_t nb, int8_t* s, float* ds, float* dm);
struct gguf_type {
    int64_t qk, bytes;
    bool min;
    gguf_row_decoder decode;
};

template <class T>
static gguf_type gguf_type_of() {
    return gguf_type{T::QK, T::BYTES, T::MIN, &gguf_decode_row<T>};
}

// The activations as the tiles read them (gguf_prepare_f / gguf_prepare_q8), and the call's output.
struct gguf_acts {
    const float *xf, *dxl, *xs;
    const int8_t* xq;
    const int32_t* x4;
    const float* bias;
    void* y;
    int y_bf16;
};

// The tiles of one form for the NR decoded rows n0.. (`rows` of them real) against every token (MT = 4, then the
// rest); adds the bias and stores.
template <int NR, bool Q8, bool MIN>
static void gguf_rows_tokens(const int8_t* s, const float* ds, const float* dm, int64_t M, int64_t Kq,
                             const gguf_acts& a, int64_t n0, int64_t rows, int64_t N) {
    const int64_t C = Kq / 16;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mt = min_i64(4, M - m0);
        float out[NR][4];
        const float* st = MIN ? a.xs + m0 * C : nullptr;
        if (Q8) {
            const int8_t* xt = a.xq + m0 * Kq;
            const float* lt = a.dxl + m0 * (Kq / 4);
            const int32_t* ct = a.x4 ? a.x4 + m0 * (Kq / 4) : nullptr;
            if constexpr (NR == 1) {
                gguf_tile_q<1, 1, MIN>(s, ds, dm, Kq, xt, lt, ct, st, out);
            } else {
                switch (mt) {
                    case 4: gguf_tile_q<NR, 4, MIN>(s, ds, dm, Kq, xt, lt, ct, st, out); break;
                    case 3: gguf_tile_q<NR, 3, MIN>(s, ds, dm, Kq, xt, lt, ct, st, out); break;
                    case 2: gguf_tile_q<NR, 2, MIN>(s, ds, dm, Kq, xt, lt, ct, st, out); break;
                    default: gguf_tile_q<NR, 1, MIN>(s, ds, dm, Kq, xt, lt, ct, st, out); break;
                }
            }
        } else {
            const float* xt = a.xf + m0 * Kq;
            if constexpr (NR == 1) {
                gguf_tile_f<1, 1, MIN>(s, ds, dm, Kq, xt, st, out);
            } else {
                switch (mt) {
                    case 4: gguf_tile_f<NR, 4, MIN>(s, ds, dm, Kq, xt, st, out); break;
                    case 3: gguf_tile_f<NR, 3, MIN>(s, ds, dm, Kq, xt, st, out); break;
                    case 2: gguf_tile_f<NR, 2, MIN>(s, ds, dm, Kq, xt, st, out); break;
                    default: gguf_tile_f<NR, 1, MIN>(s, ds, dm, Kq, xt, st, out); break;
                }
            }
        }
        for (int64_t r = 0; r < rows; r++) {
            const float b = a.bias ? a.bias[n0 + r] : 0.0f;
            for (int64_t i = 0; i < (NR == 1 ? 1 : mt); i++)
                store_output(a.y, a.y_bf16, (m0 + i) * N + n0 + r, out[r][i] + b);
        }
    }
}

// Every output row, NR at a time over the threads (M == 1 when NR == 1). Returns 1 when a scratch allocation failed.
template <int NR>
static int gguf_rows(const qc_call* c, const gguf_type t, bool q8, int64_t Kq, const gguf_acts& a) {
    const int64_t M = c->M, N = c->N, C = Kq / 16, nb = (c->K + t.qk - 1) / t.qk, row_bytes = nb * t.bytes;
    const uint8_t* blocks = (const uint8_t*)c->tensors[0];
    int failed = 0;
#pragma omp parallel num_threads(c->threads)
    {
        int8_t* s = (int8_t*)scratch_alloc((size_t)(NR * Kq));
        float* ds = (float*)scratch_alloc((size_t)(NR * C) * sizeof(float));
        float* dm = (float*)scratch_alloc((size_t)(NR * C) * sizeof(float));
        const bool ok = s && ds && dm;
        if (ok) {  // the columns past the last block stay zero
            memset(s, 0, (size_t)(NR * Kq));
            memset(ds, 0, (size_t)(NR * C) * sizeof(float));
            memset(dm, 0, (size_t)(NR * C) * sizeof(float));
        } else {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 8 / NR)
        for (int64_t i = 0; i < (N + NR - 1) / NR; i++) {
            if (!ok) continue;
            const int64_t n0 = i * NR, rows = min_i64(NR, N - n0);
            for (int64_t r = 0; r < rows; r++)
                t.decode(blocks + (n0 + r) * row_bytes, nb, s + r * Kq, ds + r * C, dm + r * C);
            for (int64_t r = rows; r < NR; r++) {  // past N: zero rows (computed, not stored)
                memset(s + r * Kq, 0, (size_t)Kq);
                memset(ds + r * C, 0, (size_t)C * sizeof(float));
                memset(dm + r * C, 0, (size_t)C * sizeof(float));
            }
            // the next rows stream in while these meet the tokens
            const int64_t ahead = min_i64(NR, N - n0 - NR) * row_bytes;
            for (int64_t b = 0; b < ahead; b += 64) __builtin_prefetch(blocks + (n0 + NR) * row_bytes + b);
            if (q8 && t.min)
                gguf_rows_tokens<NR, true, true>(s, ds, dm, M, Kq, a, n0, rows, N);
            else if (q8)
                gguf_rows_tokens<NR, true, false>(s, ds, dm, M, Kq, a, n0, rows, N);
            else if (t.min)
                gguf_rows_tokens<NR, false, true>(s, ds, dm, M, Kq, a, n0, rows, N);
            else
                gguf_rows_tokens<NR, false, false>(s, ds, dm, M, Kq, a, n0, rows, N);
        }
        free(s);
        free(ds);
        free(dm);
    }
    return failed;
}

// The one-token form of the 32-element block types (kernels/gguf_gemv.h); false where it does not take the call.
static bool gguf_gemv(const qc_call* c, int type, const float* xf, const float* xs, int64_t Kq);
static bool gguf_gemv_q8(const qc_call* c, int type, const int8_t* xq, const float* dxl, const int32_t* x4,
                         int64_t Kq);

static int gguf_linear(const qc_call* c, const gguf_type t, const bool q8) {
    const int64_t M = c->M, K = c->K;
    const int64_t nb = (K + t.qk - 1) / t.qk, Kq = (nb * t.qk + 63) / 64 * 64, C = Kq / 16;
    float* xf = q8 ? nullptr : (float*)scratch_alloc((size_t)(M * Kq) * sizeof(float));
    int8_t* xq = q8 ? (int8_t*)scratch_alloc((size_t)(M * Kq)) : nullptr;
    float* dxl = q8 ? (float*)scratch_alloc((size_t)(M * (Kq / 4)) * sizeof(float)) : nullptr;
    int32_t* x4 = q8 && GGUF_LANE_SUMS ? (int32_t*)scratch_alloc((size_t)(M * (Kq / 4)) * sizeof(int32_t)) : nullptr;
    float* xs = t.min ? (float*)scratch_alloc((size_t)(M * C) * sizeof(float)) : nullptr;
    int failed = (q8 ? !xq || !dxl || (GGUF_LANE_SUMS && !x4) : !xf) || (t.min && !xs);
    if (!failed) {
        if (q8)
            gguf_prepare_q8(c->x, c->x_bf16, M, K, Kq, t.qk, xq, dxl, xs, x4, c->threads);
        else
            gguf_prepare_f(c->x, c->x_bf16, M, K, Kq, xf, xs, c->threads);
        const gguf_acts a{xf, dxl, xs, xq, x4, c->bias, c->y, c->y_bf16};
        const bool served = q8 ? gguf_gemv_q8(c, (int)c->ints[0], xq, dxl, x4, Kq)
                               : gguf_gemv(c, (int)c->ints[0], xf, xs, Kq);
        if (!served)
            failed = M == 1 ? gguf_rows<1>(c, t, q8, Kq, a) : gguf_rows<GGUF_NR>(c, t, q8, Kq, a);
    }
    free(xf);
    free(xq);
    free(dxl);
    free(x4);
    free(xs);
    return failed;
}

// Rows n0..n1 of w as float32, or bfloat16 (y_bf16: rounded to nearest even as torch's conversion), [n1 - n0, K]:
// ds * s - dm, the reference's float operations.
#if defined(__AVX2__)
// 8 floats -> 8 bfloat16 (float_to_bf16 of common.h, eight at once)
static inline __m128i gguf_bf16x8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    const __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));  // NaN stays NaN
    const __m256i r = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet, nan), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
#endif

// 16 weights d * s[i] - m (MIN) or d * s[i] -> float32 or bfloat16 at o.
template <bool MIN>
static inline void gguf_store16(const int8_t* s, float d, float m, void* o, int bf16) {
#if defined(__AVX512F__)
    const __m512 codes = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)s)));
    __m512 w = _mm512_mul_ps(_mm512_set1_ps(d), codes);
    if (MIN) w = _mm512_sub_ps(w, _mm512_set1_ps(m));
    if (bf16) {
        _mm_storeu_si128((__m128i*)o, gguf_bf16x8(_mm512_castps512_ps256(w)));
        const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(w), 1));
        _mm_storeu_si128((__m128i*)o + 1, gguf_bf16x8(high));
    } else {
        _mm512_storeu_ps((float*)o, w);
    }
#elif defined(__AVX2__)
    for (int h = 0; h < 2; h++) {
        const __m128i raw = _mm_loadl_epi64((const __m128i*)(s + 8 * h));
        __m256 w = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)));
        if (MIN) w = _mm256_sub_ps(w, _mm256_set1_ps(m));
        if (bf16)
            _mm_storeu_si128((__m128i*)o + h, gguf_bf16x8(w));
        else
            _mm256_storeu_ps((float*)o + 8 * h, w);
    }
#else
    for (int i = 0; i < 16; i++) store_output(o, bf16, i, MIN ? d * (float)s[i] - m : d * (float)s[i]);
#endif
}

template <bool MIN>
static void gguf_dequant_row(const int8_t* s, const float* ds, const float* dm, int64_t K, void* o, int bf16) {
    const int64_t whole = K / 16 * 16, size = bf16 ? 2 : 4;
    for (int64_t k0 = 0; k0 < whole; k0 += 16)
        gguf_store16<MIN>(s + k0, ds[k0 / 16], MIN ? dm[k0 / 16] : 0.0f, (char*)o + k0 * size, bf16);
    for (int64_t k = whole; k < K; k++) {
        const float w = ds[k / 16] * (float)s[k];
        store_output(o, bf16, k, MIN ? w - dm[k / 16] : w);
    }
}

static int gguf_dequant(const qc_call* c, const gguf_type t) {
    const int64_t K = c->K, n0 = c->ints[1], n1 = c->ints[2];
    const int64_t nb = (K + t.qk - 1) / t.qk, Kp = nb * t.qk, row_bytes = nb * t.bytes;
    const uint8_t* blocks = (const uint8_t*)c->tensors[0];
    const int64_t size = c->y_bf16 ? 2 : 4;
    int failed = 0;
#pragma omp parallel num_threads(c->threads)
    {
        int8_t* s = (int8_t*)scratch_alloc((size_t)Kp);
        float* ds = (float*)scratch_alloc((size_t)(Kp / 16) * sizeof(float));
        float* dm = (float*)scratch_alloc((size_t)(Kp / 16) * sizeof(float));
        const bool ok = s && ds && dm;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 8)
        for (int64_t n = n0; n < n1; n++) {
            if (!ok) continue;
            t.decode(blocks + n * row_bytes, nb, s, ds, dm);
            void* o = (char*)c->y + (n - n0) * K * size;
            if (t.min)
                gguf_dequant_row<true>(s, ds, dm, K, o, c->y_bf16);
            else
                gguf_dequant_row<false>(s, ds, dm, K, o, c->y_bf16);
        }
        free(s);
        free(ds);
        free(dm);
    }
    return failed;
}

// One switch over the ggml type id; 2 (a parameter error the Python side never sends) for an unknown one.
#define GGUF_TYPES(X) \
    X(gguf_q4_0) X(gguf_q4_1) X(gguf_q5_0) X(gguf_q5_1) X(gguf_q8_0) X(gguf_q2_k) X(gguf_q3_k) X(gguf_q4_k) \
    X(gguf_q5_k) X(gguf_q6_k) X(gguf_iq4_nl) X(gguf_iq4_xs)

static int linear_gguf_call(const qc_call* c) {
#define GGUF_CASE(T) \
    case T::ID: return gguf_linear(c, gguf_type_of<T>(), false);
    switch (c->ints[0]) { GGUF_TYPES(GGUF_CASE) }
#undef GGUF_CASE
    return 2;
}
QC_KERNEL(linear_gguf, linear_gguf_call)

static int linear_gguf_q8_call(const qc_call* c) {
#define GGUF_CASE(T) \
    case T::ID: return gguf_linear(c, gguf_type_of<T>(), true);
    switch (c->ints[0]) { GGUF_TYPES(GGUF_CASE) }
#undef GGUF_CASE
    return 2;
}
QC_KERNEL(linear_gguf_q8, linear_gguf_q8_call)

static int dequant_gguf_call(const qc_call* c) {
#define GGUF_CASE(T) \
    case T::ID: return gguf_dequant(c, gguf_type_of<T>());
    switch (c->ints[0]) { GGUF_TYPES(GGUF_CASE) }
#undef GGUF_CASE
    return 2;
}
QC_KERNEL(dequant_gguf, dequant_gguf_call)

#undef GGUF_TYPES
