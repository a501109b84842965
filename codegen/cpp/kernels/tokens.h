// Per-token activation quantization for the GEMM paths of W8A8 and W4A8 (codegen/cpp/integer.py): the activations
// as the direct kernels see them.
//
// Per token m (as qcompile.schemes.w8a8.quantize_per_token_int8): s = absmax(x[m]) / 127 (1 for an all-zero row),
// q = clamp(rint(x / s), -127, 127) with the same float32 division and round half to even. Parameters: ints[0] mode:
//   0: y[m, k] = q * s    (float32; bfloat16 when y_bf16: rounded to nearest even once): for a float GEMM (W4A8);
//   1: y[m, k] = q as int8, and s into tensors[0] (an output: float32 [M]): for an int8 GEMM (W8A8).
// Shapes: x float32 or bfloat16 [M, K]; y [M, K]. Rows are independent: threads take whole rows, so results do not
// depend on the thread count. AVX-512 / AVX2 take 16 / 8 values a step (the same IEEE division, rounding and
// products as the scalar tail).
static inline float qt_load(const void* x, int xb, int64_t i) {
    return xb ? bf16_to_float(((const uint16_t*)x)[i]) : ((const float*)x)[i];
}

static inline float qt_code(float v, float s) {
    float q = nearbyintf(v / s);
    return q < -127.0f ? -127.0f : (q > 127.0f ? 127.0f : q);
}

#if defined(__AVX512F__)
static inline __m512 qt_load16(const void* x, int xb, int64_t i) {
    if (xb)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)x + i))), 16));
    return _mm512_loadu_ps((const float*)x + i);
}
#elif defined(__AVX2__)
static inline __m256 qt_load8(const void* x, int xb, int64_t i) {
    if (xb)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)x + i))), 16));
    return _mm256_loadu_ps((const float*)x + i);
}
#endif

static float qt_row(const void* x, int xb, void* y, int yb, int codes, int64_t m, int64_t K) {
    const int64_t base = m * K;
    int64_t k = 0;
    float absmax = 0.0f;
#if defined(__AVX512F__)
    __m512 vmax = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(qt_load16(x, xb, base + k)));
    absmax = _mm512_reduce_max_ps(vmax);
#elif defined(__AVX2__)
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 vmax = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, qt_load8(x, xb, base + k)));
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    for (int i = 0; i < 8; i++) absmax = fmaxf(absmax, lanes[i]);
#endif
    for (; k < K; k++) absmax = fmaxf(absmax, fabsf(qt_load(x, xb, base + k)));
    float s = absmax / 127.0f;
    if (!(s > 0.0f)) s = 1.0f;
    k = 0;
#if defined(__AVX512F__)
    const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    for (; k + 16 <= K; k += 16) {
        __m512 q = _mm512_roundscale_ps(_mm512_div_ps(qt_load16(x, xb, base + k), vs),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
        if (codes) {
            _mm_storeu_si128((__m128i*)((int8_t*)y + base + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q)));
            continue;
        }
        const __m512 v = _mm512_mul_ps(q, vs);
        if (yb) {  // round to nearest even (finite values: no NaN can arise from a clamped code)
            __m512i u = _mm512_castps_si512(v);
            u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                                     _mm512_set1_epi32(0x7fff)));
            _mm256_storeu_si256((__m256i*)((uint16_t*)y + base + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
        } else {
            _mm512_storeu_ps((float*)y + base + k, v);
        }
    }
#elif defined(__AVX2__)
    const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    for (; k + 8 <= K; k += 8) {
        __m256 q = _mm256_round_ps(_mm256_div_ps(qt_load8(x, xb, base + k), vs),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);
        if (codes) {
            float lanes8[8];
            _mm256_storeu_ps(lanes8, q);
            for (int i = 0; i < 8; i++) ((int8_t*)y)[base + k + i] = (int8_t)lanes8[i];
            continue;
        }
        const __m256 v = _mm256_mul_ps(q, vs);
        if (yb) {
            uint16_t* out = (uint16_t*)y + base + k;
            float lanes8[8];
            _mm256_storeu_ps(lanes8, v);
            for (int i = 0; i < 8; i++) out[i] = float_to_bf16(lanes8[i]);
        } else {
            _mm256_storeu_ps((float*)y + base + k, v);
        }
    }
#endif
    for (; k < K; k++) {
        const float q = qt_code(qt_load(x, xb, base + k), s);
        if (codes)
            ((int8_t*)y)[base + k] = (int8_t)q;
        else
            store_output(y, yb, base + k, q * s);
    }
    return s;
}

static int quantize_tokens(const qc_call* c) {
    const int64_t M = c->M, K = c->K;
    const int codes = c->ints[0] == 1;
    float* scales = codes ? (float*)c->tensors[0] : nullptr;
#pragma omp parallel for schedule(static) num_threads(c->threads)
    for (int64_t m = 0; m < M; m++) {
        const float s = qt_row(c->x, c->x_bf16 != 0, c->y, c->y_bf16 != 0, codes, m, K);
        if (scales) scales[m] = s;
    }
    return 0;
}
QC_KERNEL(quantize_tokens, quantize_tokens)
