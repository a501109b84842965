// FP8 block-scaled W8A8 kernel (DeepSeek-V3 / FINEGRAINED_FP8): e4m3 weights with one float32 scale per 128 x 128
// block, e4m3 activations quantized here per token and per group of 128 inputs.
//
// Shapes and dtypes: x float32 or bfloat16 [M, K]; qweight float8_e4m3fn [N, K] (row-major bytes); scales float32
// [ceil(N/128), ceil(K/128)] (the multiplier of block [n / 128, k / 128]); bias float32 [N] or NULL; y [M, N]
// float32 or bfloat16. Any M, N, K (edge blocks and groups are partial).
// Per token m and group g (inputs 128 g .. 128 g + 127): s = amax / 448 (ue8m0: the next power of two at or above
// it, from the float's bits), 1 when that is not > 0; xq = e4m3(clamp(x / s, -448, 448)), round to nearest even,
// all in float32 as the reference does, so the activation codes are the reference's bit for bit. Then
//     y[m, n] = sum_g (sum_{k in g} xq[m, k] * w[n, k]) * (s[m, g] * scales[n / 128, g]) + bias[n]
// with each group's sum in float32 (the products of two e4m3 values are exact in float32; the reference sums in
// float64, so results agree to float32 rounding of the sums, not bit for bit).
// The weight codes of a group are decoded to floats once per group (AVX2 / AVX-512: from the bits, subnormals and
// NaN included; the portable variant: a 256-entry table) and serve every token of the call, 4 tokens per register
// tile. Work is split over output rows; each row's arithmetic is the same whatever the thread count.

constexpr int64_t FP8B_BLOCK = 128;
constexpr int64_t FP8B_CHUNK = 64;  // tokens whose running sums one output row keeps on the stack

// One e4m3fn byte -> float: exponent bias 7, 3 mantissa bits, subnormals m * 2^-9, 0x7f / 0xff NaN.
static inline float fp8b_decode_one(uint8_t byte) {
    const uint32_t mag = byte & 0x7fu;
    float v;
    if (mag == 0x7fu) {
        v = NAN;
    } else if (mag < 8u) {
        v = (float)mag * (1.0f / 512.0f);
    } else {
        const uint32_t u = (mag << 20) + (120u << 23);
        memcpy(&v, &u, 4);
    }
    return (byte & 0x80u) ? -v : v;
}

#if defined(__AVX512F__)
// 16 codes -> 16 floats. A normal code's bits shifted into a float's exponent and mantissa fields and rebiased
// (+120) are its value; subnormal codes (magnitude < 8) are magnitude * 2^-9; 0x7f is NaN; the sign bit moves to 31.
static inline __m512 fp8b_decode_vec(const uint8_t* p) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    const __m512i mag = _mm512_and_si512(b, _mm512_set1_epi32(0x7f));
    const __m512i normal = _mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23));
    const __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(mag), _mm512_set1_ps(1.0f / 512.0f));
    __m512 v = _mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(8)),
                                    _mm512_castsi512_ps(normal), sub);
    v = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7f)), v, _mm512_set1_ps(NAN));
    const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), sign));
}
static inline void fp8b_store(float* out, const uint8_t* p) { _mm512_storeu_ps(out, fp8b_decode_vec(p)); }
#elif defined(__AVX2__)
// 8 codes -> 8 floats, as the AVX-512 variant.
static inline __m256 fp8b_decode_vec(const uint8_t* p) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
    const __m256i mag = _mm256_and_si256(b, _mm256_set1_epi32(0x7f));
    const __m256i normal = _mm256_add_epi32(_mm256_slli_epi32(mag, 20), _mm256_set1_epi32(120 << 23));
    const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(mag), _mm256_set1_ps(1.0f / 512.0f));
    const __m256 is_sub = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), mag));
    __m256 v = _mm256_blendv_ps(_mm256_castsi256_ps(normal), sub, is_sub);
    const __m256 is_nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7f)));
    v = _mm256_blendv_ps(v, _mm256_set1_ps(NAN), is_nan);
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
    return _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(v), sign));
}
static inline void fp8b_store(float* out, const uint8_t* p) { _mm256_storeu_ps(out, fp8b_decode_vec(p)); }
#endif

// len (<= 128) codes -> floats in out, zero-filled up to a whole number of vectors (W floats).
static inline void fp8b_decode(const uint8_t* p, int64_t len, const float* lut, float* out) {
#if defined(__AVX2__)
    int64_t k = 0;
    for (; k + W <= len; k += W) fp8b_store(out + k, p + k);
    if (k < len) {  // never read past the row: the last codes go through a zero-filled copy
        uint8_t tail[W];
        memset(tail, 0, sizeof(tail));
        memcpy(tail, p + k, (size_t)(len - k));
        fp8b_store(out + k, tail);
    }
    (void)lut;
#else
    for (int64_t k = 0; k < len; k++) out[k] = lut[p[k]];
#endif
}

// float32 scale -> 2^(exponent + (mantissa != 0)), from its bits.
static inline float fp8b_round_up_pow2(float s) {
    uint32_t u;
    memcpy(&u, &s, 4);
    const uint32_t exponent = ((u >> 23) & 0xffu) + ((u & 0x7fffffu) != 0u);
    u = exponent << 23;
    memcpy(&s, &u, 4);
    return s;
}

// float32 v, |v| <= 448 (NaN stays NaN) -> the nearest e4m3 value (ties to even), as a float.
static inline float fp8b_round_e4m3(float v) {
    const float a = fabsf(v);
    float r;
    if (a < 0.015625f) {  // subnormal range: multiples of 2^-9
        r = nearbyintf(a * 512.0f) * (1.0f / 512.0f);
    } else {  // keep 3 mantissa bits
        uint32_t u;
        memcpy(&u, &a, 4);
        u += 0x7ffffu + ((u >> 20) & 1u);
        u &= 0xfff00000u;
        memcpy(&r, &u, 4);
    }
    return copysignf(r, v);
}

// Token m's activation codes (as floats) in xq[0 .. Kp) (zeros past K) and its group scales in xs[0 .. G).
static void fp8b_quantize_token(const void* x, int x_bf16, int64_t m, int64_t K, int64_t G, int ue8m0, float* xq,
                                float* xs) {
    for (int64_t g = 0; g < G; g++) {
        const int64_t k0 = g * FP8B_BLOCK, k1 = min_i64(K, k0 + FP8B_BLOCK);
        float amax = 0.0f;
        for (int64_t k = k0; k < k1; k++) {
            const float a = fabsf(load_activation(x, x_bf16, m * K + k));
            if (a > amax || a != a) amax = a;  // NaN propagates, as torch's amax does
        }
        float s = amax / 448.0f;
        if (ue8m0) s = fp8b_round_up_pow2(s);
        if (!(s > 0.0f)) s = 1.0f;
        xs[g] = s;
        for (int64_t k = k0; k < k1; k++) {
            float v = load_activation(x, x_bf16, m * K + k) / s;
            v = v > 448.0f ? 448.0f : (v < -448.0f ? -448.0f : v);
            xq[k] = fp8b_round_e4m3(v);
        }
    }
    for (int64_t k = K; k < G * FP8B_BLOCK; k++) xq[k] = 0.0f;
}

// MT tokens (rows of x, Kp apart) against len decoded weights (len a multiple of W): MT float32 sums.
template <int MT>
static inline void fp8b_tile(const float* w, int64_t len, const float* x, int64_t Kp, float* out) {
    vf acc[MT];
    for (int m = 0; m < MT; m++) acc[m] = vf_zero();
    for (int64_t k = 0; k < len; k += W) {
        const vf wv = vf_load(w + k);
        for (int m = 0; m < MT; m++) acc[m] = vf_fma(wv, vf_load(x + m * Kp + k), acc[m]);
    }
    for (int m = 0; m < MT; m++) out[m] = vf_hsum(acc[m]);
}

static int linear_fp8_block(const void* x, int x_bf16, int64_t M, int64_t K, const uint8_t* qweight, int64_t N,
                            const float* scales, int ue8m0, const float* bias, void* y, int y_bf16, int threads) {
    const int64_t G = (K + FP8B_BLOCK - 1) / FP8B_BLOCK, Kp = G * FP8B_BLOCK;
    float* xq = (float*)scratch_alloc((size_t)(M * Kp) * sizeof(float));
    float* xs = (float*)scratch_alloc((size_t)(M * G) * sizeof(float));
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return 1;
    }
    for (int64_t m = 0; m < M; m++) fp8b_quantize_token(x, x_bf16, m, K, G, ue8m0, xq + m * Kp, xs + m * G);
    float lut[256];
    for (int i = 0; i < 256; i++) lut[i] = fp8b_decode_one((uint8_t)i);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        alignas(64) float w[FP8B_BLOCK];
        float sums[FP8B_CHUNK];
        const uint8_t* wrow = qweight + n * K;
        const float* wscale = scales + (n / FP8B_BLOCK) * G;
        for (int64_t m0 = 0; m0 < M; m0 += FP8B_CHUNK) {
            const int64_t mc = min_i64(FP8B_CHUNK, M - m0);
            for (int64_t i = 0; i < mc; i++) sums[i] = 0.0f;
            for (int64_t g = 0; g < G; g++) {
                const int64_t k0 = g * FP8B_BLOCK, len = min_i64(FP8B_BLOCK, K - k0);
                const int64_t lenv = (len + W - 1) / W * W;
                fp8b_decode(wrow + k0, len, lut, w);
                for (int64_t i = 0; i < mc; i += 4) {
                    const int64_t mt = min_i64(4, mc - i);
                    const float* xt = xq + (m0 + i) * Kp + k0;
                    float d[4];
                    switch (mt) {
                        case 4: fp8b_tile<4>(w, lenv, xt, Kp, d); break;
                        case 3: fp8b_tile<3>(w, lenv, xt, Kp, d); break;
                        case 2: fp8b_tile<2>(w, lenv, xt, Kp, d); break;
                        default: fp8b_tile<1>(w, lenv, xt, Kp, d); break;
                    }
                    for (int64_t j = 0; j < mt; j++) sums[i + j] += d[j] * (xs[(m0 + i + j) * G + g] * wscale[g]);
                }
            }
            for (int64_t i = 0; i < mc; i++) {
                float v = sums[i];
                if (bias) v += bias[n];
                store_output(y, y_bf16, (m0 + i) * N + n, v);
            }
        }
    }
    free(xq);
    free(xs);
    return 0;
}

// Dequantized weight rows n0 .. n1 - 1 (ints[1], ints[2]) into y, float32 [n1 - n0, K]: w = float(q) * scale.
// tensors as linear_fp8_block; x, bias, M, x_bf16 and y_bf16 unused. For calls of many tokens (then a float GEMM).
static int dequant_fp8_block_call(const qc_call* c) {
    const int64_t K = c->K, G = (K + FP8B_BLOCK - 1) / FP8B_BLOCK, n0 = c->ints[1], n1 = c->ints[2];
    const uint8_t* qweight = (const uint8_t*)c->tensors[0];
    const float* scales = (const float*)c->tensors[1];
    float* out = (float*)c->y;
    float lut[256];
    for (int i = 0; i < 256; i++) lut[i] = fp8b_decode_one((uint8_t)i);
#pragma omp parallel for schedule(static) num_threads(c->threads)
    for (int64_t n = n0; n < n1; n++) {
        alignas(64) float w[FP8B_BLOCK];
        float* row = out + (n - n0) * K;
        for (int64_t g = 0; g < G; g++) {
            const int64_t k0 = g * FP8B_BLOCK, len = min_i64(FP8B_BLOCK, K - k0);
            const float scale = scales[(n / FP8B_BLOCK) * G + g];
            fp8b_decode(qweight + n * K + k0, len, lut, w);
            for (int64_t k = 0; k < len; k++) row[k0 + k] = w[k] * scale;
        }
    }
    return 0;
}
QC_KERNEL(dequant_fp8_block, dequant_fp8_block_call)

// Quantized-then-dequantized activations into y, float32 [M, K]: float(xq) * s per token and group, exactly the
// codes and scales linear_fp8_block uses. ints[0]: ue8m0 flag; tensors, N and bias unused; y_bf16 must be 0.
static int fake_quant_fp8_block_call(const qc_call* c) {
    const int64_t M = c->M, K = c->K, G = (K + FP8B_BLOCK - 1) / FP8B_BLOCK, Kp = G * FP8B_BLOCK;
    float* out = (float*)c->y;
    int failed = 0;
#pragma omp parallel num_threads(c->threads) reduction(| : failed)
    {
        float* xq = (float*)scratch_alloc((size_t)Kp * sizeof(float));
        float* xs = (float*)scratch_alloc((size_t)G * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            if (!xq || !xs) {
                failed = 1;
                continue;
            }
            fp8b_quantize_token(c->x, c->x_bf16, m, K, G, (int)c->ints[0], xq, xs);
            for (int64_t k = 0; k < K; k++) out[m * K + k] = xq[k] * xs[k / FP8B_BLOCK];
        }
        free(xq);
        free(xs);
    }
    return failed;
}
QC_KERNEL(fake_quant_fp8_block, fake_quant_fp8_block_call)

// Entry point (qc_abi.h). tensors: qweight float8_e4m3fn [N, K], scales float32 [ceil(N/128), ceil(K/128)];
// ints[0]: 1 for power-of-two (ue8m0) activation scales, else 0.
static int linear_fp8_block_call(const qc_call* c) {
    return linear_fp8_block(c->x, c->x_bf16, c->M, c->K, (const uint8_t*)c->tensors[0], c->N,
                            (const float*)c->tensors[1], (int)c->ints[0], c->bias, c->y, c->y_bf16, c->threads);
}
QC_KERNEL(linear_fp8_block, linear_fp8_block_call)
