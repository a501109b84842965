// GGUF (llama.cpp) blocks for the `gguf` family (qcompile/schemes/gguf.py, layouts in gguf_blocks.py):
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
// The bit work runs 32 bytes at a time (AVX2 in both vector variants), the f16 fields of 8 blocks at once. This file
// holds the block decoders and the activation preparation; the kernels that use them are in gguf_linear.h (many
// rows and tokens, dequantization) and gguf_gemv.h (the one-token register forms), which the build includes after
// this file (name order).

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
