// The weight-only GEMM path's dequantization (codegen/cpp/integer.py, launch.Slices): layouts as weight_only.h.
//
// Rows n0..n1 of the weight as float32, or bfloat16 when `out_bf16` [n1 - n0, K]: the reference's values
// ((u - zero) * scale in float32), rounded to nearest even for bfloat16 (the reference's `.to(x.dtype)`), so the
// GEMM that follows multiplies exactly what the reference multiplies. AVX-512: a 4-bit group first makes the 16
// values (u - zero) * scale in a register, so unpacking is one table lookup per 16 / 32 codes (vpermps / vpermw).
static inline void wo_store(float* o32, uint16_t* o16, int64_t k, float v) {
    if (o16)
        o16[k] = float_to_bf16(v);
    else
        o32[k] = v;
}

#if defined(__AVX512BW__)
// Round 16 finite floats to bfloat16 (nearest even), as 16 words.
static inline __m256i wo_bf16x16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}
#endif

// `count` codes of one 4-bit group (count may be odd only at the row's end): ((float)u - z) * s through a table of
// the 16 values, built in registers.
static void dq4_group(const uint8_t* p, int64_t count, float z, float s, float* o32, uint16_t* o16) {
    int64_t k = 0;
#if defined(__AVX512BW__)
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 values = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z)), _mm512_set1_ps(s));
    if (o16) {
        const __m512i table = _mm512_castsi256_si512(wo_bf16x16(values));  // codes index words 0-15 only
        const __m512i shifts = _mm512_set1_epi32(4 << 16);                 // words 0, 4, 0, 4, ...: low nibble first
        const __m512i mask = _mm512_set1_epi16(15);
        for (; k + 32 <= count; k += 32) {
            const __m128i b = _mm_loadu_si128((const __m128i*)(p + k / 2));
            const __m256i pairs = _mm256_set_m128i(_mm_unpackhi_epi8(b, b), _mm_unpacklo_epi8(b, b));
            const __m512i codes = _mm512_and_si512(_mm512_srlv_epi16(_mm512_cvtepu8_epi16(pairs), shifts), mask);
            _mm512_storeu_si512((void*)(o16 + k), _mm512_permutexvar_epi16(codes, table));
        }
    } else {
        const __m512i shifts = _mm512_set1_epi64(4LL << 32);  // dwords 0, 4, 0, 4, ...
        const __m512i mask = _mm512_set1_epi32(15);
        for (; k + 16 <= count; k += 16) {
            const __m128i b = _mm_loadl_epi64((const __m128i*)(p + k / 2));
            const __m512i codes = _mm512_and_si512(
                _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)), shifts), mask);
            _mm512_storeu_ps(o32 + k, _mm512_permutexvar_ps(codes, values));
        }
    }
#endif
    for (; k < count; k++) wo_store(o32, o16, k, ((float)((p[k >> 1] >> ((k & 1) * 4)) & 15) - z) * s);
}

// `count` int8 codes of one group: ((float)q - z) * s.
static void dq8_group(const int8_t* q, int64_t count, float z, float s, float* o32, uint16_t* o16) {
    int64_t k = 0;
#if defined(__AVX512BW__)
    const __m512 vz = _mm512_set1_ps(z), vs = _mm512_set1_ps(s);
    for (; k + 16 <= count; k += 16) {
        const __m512 v = _mm512_mul_ps(
            _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + k)))), vz), vs);
        if (o16)
            _mm256_storeu_si256((__m256i*)(o16 + k), wo_bf16x16(v));
        else
            _mm512_storeu_ps(o32 + k, v);
    }
#endif
    for (; k < count; k++) wo_store(o32, o16, k, ((float)q[k] - z) * s);
}

static int dequant_wo(const void* qweight, int bits, int64_t N, int64_t Kp, int64_t K, const float* scales,
                      const float* zeros, float zero_const, int64_t gs, int64_t n0, int64_t n1, void* out,
                      int out_bf16, int threads) {
    (void)N;
    const int64_t G = Kp / gs;
    const int64_t row_bytes = bits == 4 ? Kp / 2 : Kp;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t* wrow = (const uint8_t*)qweight + n * row_bytes;
        float* o32 = out_bf16 ? nullptr : (float*)out + (n - n0) * K;
        uint16_t* o16 = out_bf16 ? (uint16_t*)out + (n - n0) * K : nullptr;
        for (int64_t g = 0; g < G; g++) {
            const float s = scales[n * G + g];
            const float z = zeros ? zeros[n * G + g] : zero_const;
            const int64_t k0 = g * gs, k1 = min_i64(k0 + gs, K);
            if (k1 <= k0) break;
            float* g32 = o32 ? o32 + k0 : nullptr;
            uint16_t* g16 = o16 ? o16 + k0 : nullptr;
            if (bits == 4) {  // k0 is even: the group starts on a byte
                dq4_group(wrow + k0 / 2, k1 - k0, z, s, g32, g16);
            } else {
                dq8_group((const int8_t*)wrow + k0, k1 - k0, z, s, g32, g16);
            }
        }
    }
    return 0;
}

// Entry point (qc_abi.h): tensors, floats as linear_wo; ints: bits, Kp, group_size, n0, n1. Writes `y` as float32
// [n1 - n0, K] (bfloat16 when y_bf16) and reads no activation.
static int dequant_wo_call(const qc_call* c) {
    return dequant_wo(c->tensors[0], (int)c->ints[0], c->N, c->ints[1], c->K, (const float*)c->tensors[1],
                      wo_zeros(c), (float)c->floats[0], c->ints[2], c->ints[3], c->ints[4], c->y, c->y_bf16, c->threads);
}
QC_KERNEL(dequant_wo, dequant_wo_call)
